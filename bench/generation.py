"""Greedy generation throughput: fedleak's length-grouped batches against a batch-1 loop and the old batching.

The workload is the demo's utility and poisoning generation: the embedded model with LoRA on all
linear layers, first trained briefly on private-format records (as a client's adapter is, so answers
are the fine-tuned ones), then the prompts of held-out records, greedy, cut at the stop tokens.
Three ways run interleaved in one process, best of the repeats:

- fedleak: `federated.generation.generate` (prompts sorted by length, neighbours batched, KV cache);
- ungrouped: the batching fedleak had before (consecutive prompts in the caller's order, left-padded
  to the batch's longest), written out here;
- batch-1: one `model.generate` per prompt (no padding at all).

Throughput counts generated tokens that matter (each generation's tokens up to and including its
stop token), the same count for all three; the outputs are compared token for token.

    .venv/bin/python bench/generation.py [--records 60] [--max-new-tokens 48] [--batch-sizes 16,32]
        [--train-epochs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedleak.federated.data import generate_records
from fedleak.federated.generation import generate
from fedleak.federated.model import model_device
from fedleak.federated.prompts import pad_id, prompt_ids, stop_ids
from fedleak.federated.training import TrainSettings, train_adapter

from common import embedded_lora  # bench/ runs as scripts: its folder is on sys.path


@torch.no_grad()
def ungrouped(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int) -> list[tuple[int, ...]]:
    """The old `generate`: batches of consecutive prompts, left-padded with the pad id; generated ids
    up to and including the first stop token."""
    stop = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        device = model_device(model)
        new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop, pad_token_id=pad)[:, width:].tolist()
        for row in new:
            cut = next((i for i, t in enumerate(row) if t in stop), None)
            out.append(tuple(row[:cut + 1] if cut is not None else row))
    return out


def fedleak_ids(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int) -> list[tuple[int, ...]]:
    return [g.ids + ((g.stop_id,) if g.finished else ())
            for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="16,32", help="comma-separated; the first is the callers' default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-records", type=int, default=60, help="records the adapter is trained on first")
    parser.add_argument("--train-epochs", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model, tokenizer, examples = embedded_lora(args.train_records)
    if args.train_epochs:  # the quick config's client training: batch 8, lr 5e-3
        train_adapter(model, examples, TrainSettings(epochs=args.train_epochs, batch_size=8, lr=5e-3),
                      pad_id=pad_id(tokenizer), generator=torch.Generator().manual_seed(0))
    records = generate_records(args.records, seed=0, purpose="heldout", private=True)
    prompts = [prompt_ids(tokenizer, r.instruction, r.input) for r in records]
    ways = {"batch-1 loop": lambda: ungrouped(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                              batch_size=1)}
    new = args.max_new_tokens
    for size in sizes:
        ways[f"fedleak grouped, batch {size}"] = (
            lambda size=size: fedleak_ids(model, tokenizer, prompts, max_new_tokens=new, batch_size=size))
        ways[f"old ungrouped, batch {size}"] = (
            lambda size=size: ungrouped(model, tokenizer, prompts, max_new_tokens=new, batch_size=size))
    timings: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every way alike
        for name, run in ways.items():
            start = time.perf_counter()
            outputs[name] = run()
            timings[name].append(time.perf_counter() - start)
    reference = outputs["batch-1 loop"]
    stop = set(stop_ids(model, tokenizer))
    tokens = sum(len(ids) for ids in reference)
    lengths = sorted(len(p) for p in prompts)
    print(f"{len(prompts)} prompts ({lengths[0]}-{lengths[-1]} tokens), max_new_tokens {args.max_new_tokens}, "
          f"{tokens} generated tokens ({sum(bool(ids) and ids[-1] in stop for ids in reference)} ended by a stop "
          f"token), {torch.get_num_threads()} threads, best of {args.repeats}")
    best = {name: min(t) for name, t in timings.items()}
    for name, seconds in best.items():
        differ = sum(a != b for a, b in zip(outputs[name], reference))
        print(f"{name:28s} {seconds:6.2f} s {tokens / seconds:8,.0f} tokens/s   "
              f"{best['batch-1 loop'] / seconds:5.2f}x batch-1   outputs differing from batch-1: {differ}")
    for size in sizes:
        grouped, old = best[f"fedleak grouped, batch {size}"], best[f"old ungrouped, batch {size}"]
        print(f"batch {size}: fedleak grouped / batch-1 loop {best['batch-1 loop'] / grouped:.2f}x, "
              f"/ old ungrouped {old / grouped:.2f}x")


if __name__ == "__main__":
    main()
