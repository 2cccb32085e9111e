"""Cost of a DP-SGD step (Opacus, grad_sample_mode="hooks") against the plain step, side by side.

Both loops run on the embedded model with LoRA on all linear layers, on the same fixed batches
(no Poisson sampling, so batch sizes match), in one process, interleaved; the ratio is what to
read. Opacus's per-sample gradients are only for the LoRA parameters (the base is frozen).

    .venv/bin/python bench/dp_overhead.py [--steps 40] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedleak.federated.training import collate, sequence_losses

from common import embedded_lora  # bench/ runs as scripts: its folder is on sys.path


def plain_pass(model, batches, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        sequence_losses(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def dp_pass(model, batches, lr, batch_size):
    from opacus import PrivacyEngine

    params = [p for p in model.parameters() if p.requires_grad]
    padded = [(b["input_ids"], b["attention_mask"], b["labels"]) for b in batches]
    dataset = TensorDataset(*(torch.cat([p[i] for p in padded]) for i in range(3)))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.AdamW(params, lr=lr),
            data_loader=DataLoader(dataset, batch_size=batch_size), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode="hooks")
        start = time.perf_counter()
        for ids, mask, labels in loader:
            sequence_losses(module, {"input_ids": ids, "attention_mask": mask, "labels": labels}).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
    module.cleanup()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer, examples = embedded_lora(args.steps * args.batch_size)
    # One width for every batch, so both loops see identical tensors.
    full = collate(examples, tokenizer.pad_token_id)
    batches = [{k: v[i:i + args.batch_size] for k, v in full.items()} for i in range(0, len(examples), args.batch_size)]
    timings = {"plain": [], "dp": []}
    for _ in range(args.repeats):
        timings["plain"].append(plain_pass(model, batches, 1e-4))
        timings["dp"].append(dp_pass(model, batches, 1e-4, args.batch_size))
    plain, dp = min(timings["plain"]), min(timings["dp"])
    print(f"steps {len(batches)}, batch {args.batch_size}, width {full['input_ids'].shape[1]}, best of {args.repeats}")
    print(f"plain step:         {1000 * plain / len(batches):.1f} ms")
    print(f"DP-SGD step (hooks): {1000 * dp / len(batches):.1f} ms")
    print(f"ratio DP / plain:   {dp / plain:.2f}x")


if __name__ == "__main__":
    main()
