"""Client training throughput against the machine's matmul peak, and against a bare Hugging Face loop.

Side by side in one process, on the embedded model with LoRA on all linear layers, the same records in
the same fixed batches (in order), interleaved repeats, best of each:

  fedleak    `train_adapter`: per-record mean losses (what DP-SGD's per-record clipping needs), the
             output head at target positions only, batches packed where rows can share (`batching.py`)
  bare HF    the loop a user would write: right-padded batches, `model(**batch).loss` (logits and the
             loss at every position), the same optimizer and clipping
  peak       a 1024 x 1024 fp32 matmul at the same thread count: the machine's practical peak

Useful FLOPs count what the loss needs, per record of T tokens with P prompt tokens masked out:
frozen weights 4 N_frozen T (forward, and the backward to the inputs only), LoRA weights 6 N_lora T,
the output head 4 V H (T - P) (forward and input gradient, at target positions), causal attention
6 L H T (T + 1) (QK^T and AV, forward and backward). Padding, and the head at prompt positions, are
not useful: model FLOP utilisation (MFU) = useful FLOPs / time / peak. Beside it, the MFU by the
common 6 N FLOPs per token (N: all linear weights, frozen ones and the head included), which credits
work LoRA training does not do.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_step.py [--steps 30 --batch-size 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedleak.federated.training import IGNORE, TrainSettings, batches, train_adapter

from common import embedded_lora  # bench/ runs as scripts: its folder is on sys.path


def bare_loop(model, batch_list, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for batch in batch_list:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square fp32 matmul at the current thread count (best of 3 runs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best


def six_n(model) -> float:
    """The usual 6 N FLOPs per token (N: every weight a token passes through but the embeddings), the
    convention that counts frozen weights' skipped weight gradients and the head at every position."""
    return 6.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def useful_flops(model, examples) -> tuple[float, int, int]:
    """(useful FLOPs of one pass over `examples`, real tokens, target tokens), per the docstring."""
    config = model.get_base_model().config
    head = model.get_output_embeddings().weight.numel()
    frozen = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and "lora_" not in name) - head
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    flops, tokens, targets = 0.0, 0, 0
    for e in examples:
        t = len(e.input_ids)
        n_targets = sum(label != IGNORE for label in e.labels[1:])
        flops += 4 * frozen * t + 6 * lora * t + 4 * head * n_targets + 6 * layers * hidden * t * (t + 1)
        tokens, targets = tokens + t, targets + n_targets
    return flops, tokens, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer, examples = embedded_lora(args.steps * args.batch_size)
    batch_list = list(batches(examples, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id))
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, lr=1e-4)
    timings = {"fedleak": [], "bare": [], "peak": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits all alike
        timings["peak"].append(matmul_peak())
        start = time.perf_counter()
        train_adapter(model, examples, settings, pad_id=tokenizer.pad_token_id, generator=None)
        timings["fedleak"].append(time.perf_counter() - start)
        start = time.perf_counter()
        bare_loop(model, batch_list, settings.lr)
        timings["bare"].append(time.perf_counter() - start)
    fedleak, bare, peak = min(timings["fedleak"]), min(timings["bare"]), max(timings["peak"])
    flops, tokens, targets = useful_flops(model, examples)
    computed = sum(b["input_ids"].numel() for b in batch_list)
    print(f"{len(batch_list)} steps of batch {args.batch_size}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats}: {tokens} tokens ({targets} of them targets), padded batches would compute {computed} "
          f"({1 - tokens / computed:.0%} padding); useful work {flops / tokens / 1e6:.2f} MFLOP per token")
    print(f"fp32 matmul peak (1024^3): {peak / 1e9:.1f} GFLOP/s")
    for name, seconds in (("fedleak train_adapter", fedleak), ("bare HF labels loop", bare)):
        print(f"{name:22s} {seconds:.2f} s, {tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e9:.1f} "
              f"useful GFLOP/s, MFU {flops / seconds / peak:.0%} of the matmul peak "
              f"({six_n(model) * tokens / seconds / peak:.0%} counting 6 N per token)")
    print(f"ratio bare / fedleak (time): {bare / fedleak:.2f}x")


if __name__ == "__main__":
    main()
