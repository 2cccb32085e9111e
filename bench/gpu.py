"""GPU benchmark (issue 16): LoRA training throughput and MFU, QLoRA memory, DP-SGD, scoring and FEDIT
round cost on real-size shapes with random weights, each figure beside its reference from the same run.

Shapes (random bf16 weights built on the GPU, saved to a temporary folder with a small BPE tokenizer and
loaded through fedleak's `load_base_model`; nothing is downloaded): Llama-3 1B (hidden 2048, 16 layers,
32/8 heads, MLP 8192, vocab 128256, tied), Llama-3 8B (4096, 32 layers, 32/8 heads, MLP 14336) and
Qwen2 7B (3584, 28 layers, 28/4 heads, MLP 18944, vocab 152064). Inputs are random ids, 512 tokens, the
loss on the second half. LoRA r=16 on all linear layers (q/k/v/o and the MLP projections).

  1. LoRA training tokens/s (fedleak's `train_adapter`, the largest batch of 16/8/4/2/1 that fits) and
     model FLOP utilisation. Training FLOPs per token with a frozen base: 4N + 12 L h T, N the matmul
     weights (layers' linear maps and the output head; not the embedding lookup), forward 2N, backward
     through the activations 2N (no weight gradients for the frozen base), 12 L h T PaLM's attention
     term (L layers, h hidden, T = 512). Against (a) the bf16 peak measured here by an 8192^3 matmul
     loop and (b) the datasheet's dense bf16 peak (H100/H200 SXM 989, H100 PCIe 756, A100 312, L40S
     362, A10G 125, RTX 4090 165 TFLOP/s). Goal: >= 40% for the 8B shape.
  2. 4-bit QLoRA (load_base_model quantization="4bit", needs fedleak[gpu]) peak memory of one training
     step at batch 4 x 512 on the 8B shape, also with gradient checkpointing. Goal: < 24 GB.
  3. DP-SGD step (Opacus hooks, as bench/dp_overhead.py) against the plain step, 1B, same batches,
     interleaved. Goal: <= 1.3x.
  4. Membership scoring (`compute_stats`) tokens/s against a bare forward pass at the same batch. Goal:
     within 2x.
  5. Peak memory of a 10-client FEDIT round against a 1-client one (fedleak's `run_rounds`), 1B.
     Goal: ~1.0.

    .venv/bin/python bench/gpu.py [--shapes llama-1b,llama-8b,qwen2-7b] [--steps 10] [--json out.json]
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu.py --smoke   # CPU check of every path, toy shapes

Without a CUDA GPU (and without --smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedleak.attacks.membership.stats import compute_stats
from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import FederatedData, generate_records
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, batches, collate, encode, sequence_losses, train_adapter

from gpu_shapes import (SHAPES, SMOKE_SHAPES, allocated_gb, datasheet_peak, free, is_oom,  # bench/ on sys.path
                        make_tokenizer, measured_peak, peak_gb, random_examples, reset_peak, sync, write_model)

ROWS: list[dict] = []  # the summary table (and the JSON's "results")


def row(metric: str, value, reference, ratio, goal: str, unit: str = "", note: str = "") -> None:
    ROWS.append({"metric": metric, "value": value, "reference": reference, "ratio": ratio, "goal": goal,
                 "unit": unit, **({"note": note} if note else {})})


def fmt(x, digits=2) -> str:
    return "n/a" if x is None else (f"{x:,.{digits}f}" if isinstance(x, float) else str(x))


def guarded(label: str, fn, *args, **kwargs):
    """Run one measurement; a failure prints (and joins the table) instead of ending the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one broken line must not cost the others their device time
        print(f"  {label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        print("".join(f"    {line}\n" for line in traceback.format_exc().splitlines()[-6:]), end="")
        row(label, "FAILED", None, None, "", note=f"{type(exc).__name__}: {str(exc)[:300]}")
        return None


def train_settings(batch: int) -> TrainSettings:
    return TrainSettings(epochs=1, batch_size=batch, lr=1e-4)


def timed_train(model, examples, batch, device) -> float:
    """Seconds of fedleak's `train_adapter` over `examples` (one epoch, batches in order)."""
    sync(device)
    start = time.perf_counter()
    train_adapter(model, examples, train_settings(batch), pad_id=0, generator=None)
    sync(device)
    return time.perf_counter() - start


def lora_throughput(name, shape, model, device, args, peaks) -> None:
    """1. Tokens/s of LoRA training at the largest batch that fits; MFU against both peaks."""
    seq = args.seq
    for batch in args.batches:
        examples = random_examples(batch * (args.steps + 1), seq, shape.vocab, seed=1)
        try:
            reset_peak(device)
            timed_train(model, examples[:batch], batch, device)  # warm-up step; OOM shows here
            seconds = timed_train(model, examples[batch:], batch, device)
            break
        except Exception as exc:
            if not is_oom(exc) or batch == args.batches[-1]:
                raise
            print(f"  batch {batch} x {seq}: out of memory, trying a smaller batch")
            model.zero_grad(set_to_none=True)
            free(device)
    tokens_s = args.steps * batch * seq / seconds
    achieved = tokens_s * shape.train_flops_per_token(seq)
    print(f"  LoRA training: batch {batch} x {seq}, {args.steps} steps, {tokens_s:,.0f} tokens/s, "
          f"{achieved / 1e12:.2f} TFLOP/s (N = {shape.matmul_params() / 1e6:,.1f} M matmul weights), "
          f"peak memory {fmt(peak_gb(device))} GB")
    row(f"{name} LoRA train tokens/s (batch {batch} x {seq})", tokens_s, None, None, "", "tok/s")
    goal = ">= 0.40" if name == "llama-8b" else ""
    for label, peak in (("measured", peaks["measured"]), ("datasheet", peaks["datasheet"])):
        mfu = achieved / peak if peak else None
        print(f"  MFU vs {label} peak ({fmt(peak and peak / 1e12)} TFLOP/s): {fmt(mfu and 100 * mfu, 1)}%"
              + ("   goal >= 40%" if goal else ""))
        row(f"{name} MFU vs {label} peak", achieved / 1e12, peak and peak / 1e12, mfu, goal, "TFLOP/s")


def scoring_speed(name, shape, model, tokenizer, device, args) -> None:
    """4. compute_stats over N records against a bare forward pass over the same batches."""
    records = generate_records(args.records, seed=0, purpose="bench-gpu", private=True)
    examples = encode(records, tokenizer, max_length=args.seq, response_only=True)
    tokens = sum(len(e.input_ids) for e in examples)

    @torch.no_grad()
    def forward_only():
        for batch in batches(examples, batch_size=args.score_batch, pad_id=tokenizer.pad_token_id):
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False).logits  # as compute_stats calls it

    def stats_pass():
        compute_stats(model, tokenizer, records, max_length=args.seq, response_only=True,
                      batch_size=args.score_batch)

    model.eval()
    times = {"forward": [], "stats": []}
    for i in range(args.repeats + 1):  # interleaved; the first round warms up
        for key, fn in (("forward", forward_only), ("stats", stats_pass)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i:
                times[key].append(time.perf_counter() - start)
    fwd, st = tokens / min(times["forward"]), tokens / min(times["stats"])
    print(f"  membership scoring: {len(records)} records, {tokens} tokens, batch {args.score_batch}: "
          f"compute_stats {st:,.0f} tokens/s, forward only {fwd:,.0f} tokens/s, {fwd / st:.2f}x slower   goal <= 2x")
    row(f"{name} scoring tokens/s (compute_stats vs forward)", st, fwd, fwd / st, "<= 2.00", "tok/s")


def dp_overhead(model, shape, device, args) -> None:
    """3. Opacus DP-SGD (hooks) step against the plain step, same batches, interleaved (bench/dp_overhead.py)."""
    from opacus import PrivacyEngine

    batch = args.dp_batch
    full = collate(random_examples(batch * args.steps, args.seq, shape.vocab, seed=2), 0)
    batched = [{k: v[i:i + batch] for k, v in full.items()} for i in range(0, len(full["input_ids"]), batch)]
    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> float:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        sync(device)
        start = time.perf_counter()
        for b in batched:
            sequence_losses(model, {k: v.to(device) for k, v in b.items()}).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    def private() -> float:
        dataset = TensorDataset(full["input_ids"], full["attention_mask"], full["labels"])
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=torch.optim.AdamW(params, lr=1e-4),
                data_loader=DataLoader(dataset, batch_size=batch), noise_multiplier=1.0, max_grad_norm=1.0,
                poisson_sampling=False, grad_sample_mode="hooks")
            try:
                sync(device)
                start = time.perf_counter()
                for ids, mask, labels in loader:
                    b = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
                    sequence_losses(module, b).mean().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sync(device)
                return time.perf_counter() - start
            finally:
                module.cleanup()

    plain(), private()  # warm-up
    times = {"plain": [], "dp": []}
    for _ in range(args.repeats):
        times["plain"].append(plain())
        times["dp"].append(private())
    p, d = (1000 * min(times[k]) / len(batched) for k in ("plain", "dp"))
    model.zero_grad(set_to_none=True)
    print(f"  DP-SGD (Opacus hooks): batch {batch} x {args.seq}: plain {p:.1f} ms, DP {d:.1f} ms, "
          f"{d / p:.2f}x   goal <= 1.3x")
    row(f"DP-SGD step vs plain (batch {batch} x {args.seq})", d, p, d / p, "<= 1.30", "ms")


def round_memory(base, tokenizer, device, args) -> None:
    """5. Peak memory of one FEDIT round (fedleak's run_rounds, plain FedAvg) with 10 clients vs 1."""
    from fedleak.federated.fedit import FedIT
    from fedleak.federated.hooks import TrainingHooks
    from fedleak.federated.loop import run_rounds
    from fedleak.federated.rounds import FederationSettings, TrainingSetup

    per_client = args.round_records
    peaks = {}
    for clients in (1, 10):
        records = generate_records(per_client * clients, seed=3, purpose="bench-round", private=True)
        data = FederatedData(clients=[records[i::clients] for i in range(clients)], heldout=[])
        fed = FederationSettings(clients=clients, rounds=1, local_epochs=1, batch_size=args.round_batch,
                                 max_length=args.seq, min_records_per_client=1)
        with tempfile.TemporaryDirectory(prefix="fedleak-bench-round-") as out:
            setup = TrainingSetup(base_model=base, tokenizer=tokenizer, data=data, federation=fed,
                                  adapter=LoraSettings(), hooks=TrainingHooks(), seed=0, out_dir=Path(out),
                                  config_hash="bench-gpu", progress=False, label=f"{clients} clients")
            reset_peak(device)
            start = time.perf_counter()
            run = run_rounds(setup, FedIT())
            peaks[clients] = peak_gb(device)
            print(f"  FEDIT round, {clients:2d} client(s) x {per_client} records: "
                  f"{time.perf_counter() - start:.1f} s, peak memory {fmt(peaks[clients])} GB")
            del run, setup
    ratio = peaks[10] / peaks[1] if peaks[1] else None
    print(f"  10-client round peak / 1-client peak: {fmt(ratio)}   goal ~1.0")
    row("FEDIT round peak memory, 10 clients vs 1", peaks[10], peaks[1], ratio, "~1.00", "GB")


def qlora_memory(folder, shape, device, args) -> None:
    """2. Peak memory of a 4-bit QLoRA training step, batch 4 x 512 (and with gradient checkpointing)."""
    what = "QLoRA 4-bit"
    try:
        base, _ = load_base_model(folder, device=str(device), dtype=args.dtype, quantization="4bit")
    except FedleakError as exc:
        extra = " (bitsandbytes missing: the extra fedleak[gpu] is needed)" if not find_spec("bitsandbytes") else ""
        print(f"  QLoRA 4-bit: skipped{extra}: {exc}")
        row(f"llama-8b QLoRA 4-bit step peak (4 x {args.seq})", "skipped", 24.0, None, "< 24 GB", "GB",
            note=f"{extra.strip(' ()')}: {exc}".lstrip(": "))
        if not args.smoke:
            return
        print("  (smoke: the same step on the unquantised toy model, with and without checkpointing)")
        base, _ = load_base_model(folder, device=str(device), dtype=args.dtype)
        what = "unquantised smoke stand-in"
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    examples = random_examples(4, args.seq, shape.vocab, seed=4)
    for checkpointing in (False, True):
        if checkpointing:  # the call load_base_model(gradient_checkpointing=True) makes, without a second load
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        weights = allocated_gb(device)
        reset_peak(device)
        train_adapter(model, examples, train_settings(4), pad_id=0, generator=None)
        peak = peak_gb(device)
        label = "gradient checkpointing" if checkpointing else "no checkpointing"
        print(f"  {what} step, batch 4 x {args.seq}, {label}: peak {fmt(peak)} GB "
              f"(weights {fmt(weights)} GB)   goal < 24 GB")
        row(f"llama-8b {what} peak (4 x {args.seq}, {label})", peak, 24.0, peak and peak / 24.0,
            "< 1.00 (24 GB)", "GB")


def bench_shape(name, shape, workdir, tokenizer_folder, device, args, peaks) -> None:
    print(f"\n== {name}: {shape}")
    folder = workdir / name
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    start = time.perf_counter()
    write_model(shape, folder, device=device, dtype=dtype, tokenizer_folder=tokenizer_folder)
    base, tokenizer = load_base_model(folder, device=str(device), dtype=args.dtype)
    model = add_peft_adapter(base, LoraSettings(r=16), seed=0)
    print(f"  written and loaded in {time.perf_counter() - start:.0f} s; weights {fmt(allocated_gb(device))} GB")
    # fedleak moves every batch to the model's device itself (training, scoring, generation).
    guarded(f"{name} LoRA training", lora_throughput, name, shape, model, device, args, peaks)
    guarded(f"{name} membership scoring", scoring_speed, name, shape, model, tokenizer, device, args)
    if name == "llama-1b":
        guarded("DP-SGD overhead", dp_overhead, model, shape, device, args)
        guarded("FEDIT round memory", round_memory, base, tokenizer, device, args)
    del model, base
    free(device)
    if name == "llama-8b":
        guarded("QLoRA 4-bit memory", qlora_memory, folder, shape, device, args)
        free(device)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  done in {time.perf_counter() - start:.0f} s; left allocated {fmt(allocated_gb(device))} GB")


def summary(device_name: str) -> None:
    print(f"\n== summary ({device_name})")
    print(f"{'metric':72s} {'unit':>7s} {'value':>11s} {'reference':>11s} {'ratio':>6s}  goal")
    for r in ROWS:
        value = r["value"] if isinstance(r["value"], str) else fmt(r["value"])
        print(f"{r['metric']:72s} {r['unit']:>7s} {value:>11s} {fmt(r['reference']):>11s} {fmt(r['ratio']):>6s}  "
              f"{r['goal']}" + (f"  ({r['note']})" if r.get("note") else ""))


def quiet() -> None:
    """No weight-loading progress bars or deprecation chatter between the printed lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --smoke)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="CPU check of every path on toy shapes")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the model folders go (up to ~16 GB at once; default: the system temp folder)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                        help="weights' dtype (default bfloat16 on the GPU, float32 with --smoke)")
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}: choose from {list(SHAPES)}")
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU and this machine has none (or torch is a CPU build): skipped. "
              "Run with --smoke for a CPU check of every code path.")
        return
    smoke = args.smoke
    quiet()
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    args.steps = args.steps or (3 if smoke else 10)
    args.seq = 64 if smoke else 512
    args.dtype = args.dtype or ("float32" if smoke else "bfloat16")
    args.batches = (2,) if smoke else (16, 8, 4, 2, 1)
    args.dp_batch, args.records, args.score_batch = (2, 12, 4) if smoke else (8, 256, 32)
    args.round_records, args.round_batch = (2, 2) if smoke else (8, 4)
    table = SMOKE_SHAPES if smoke else SHAPES
    device_name = "CPU (smoke)" if smoke else torch.cuda.get_device_name(device)
    print(f"device {device_name}; torch {torch.__version__}; python {platform.python_version()}; "
          f"shapes {shapes}; seq {args.seq}; steps {args.steps}")
    peak = measured_peak(device, smoke=smoke)
    sheet = None if smoke else datasheet_peak(device_name)
    peaks = {"measured": peak, "datasheet": sheet}
    print(f"matmul peak measured: {peak / 1e12:.3f} TFLOP/s ({'256^3 fp32' if smoke else '8192^3 bf16'}); "
          f"datasheet: {fmt(sheet and sheet / 1e12, 0)} TFLOP/s")
    for needed, what in (("llama-8b", "QLoRA memory"), ("llama-1b", "DP-SGD and FEDIT round lines")):
        if needed not in shapes:
            print(f"({what} need the {needed} shape: not run)")
    with tempfile.TemporaryDirectory(prefix="fedleak-bench-gpu-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        make_tokenizer(workdir / "tokenizer")
        for name in shapes:
            bench_shape(name, table[name], workdir, workdir / "tokenizer", device, args, peaks)
    summary(device_name)
    if args.json:
        import peft
        import transformers

        args.json.write_text(json.dumps({
            "device": device_name, "smoke": smoke, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda, "seq": args.seq, "steps": args.steps, "shapes": shapes,
            "matmul_peak_tflops": peak / 1e12, "datasheet_peak_tflops": sheet and sheet / 1e12,
            "results": ROWS}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
