"""Cost of fedleak's client training step against a bare loop on the same model and batches.

fedleak computes a per-sequence token-mean loss (what per-sample DP clipping needs) from its own
log-softmax; the bare loop uses Hugging Face's `labels=` loss. Both run side by side in one process
on the embedded model with LoRA on all linear layers; the ratio is what to read.

    .venv/bin/python bench/train_step.py [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedleak.federated.training import TrainSettings, batches, train_adapter

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer, examples = embedded_lora(args.steps * args.batch_size)
    batch_list = list(batches(examples, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id))
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, lr=1e-4)
    timings = {"fedleak": [], "bare": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
        start = time.perf_counter()
        train_adapter(model, examples, settings, pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
        timings["fedleak"].append(time.perf_counter() - start)
        start = time.perf_counter()
        bare_loop(model, batch_list, settings.lr)
        timings["bare"].append(time.perf_counter() - start)
    fedleak, bare = min(timings["fedleak"]), min(timings["bare"])
    tokens = sum(int(b["attention_mask"].sum()) for b in batch_list)
    print(f"steps {len(batch_list)}, batch {args.batch_size}, {tokens} tokens per pass, best of {args.repeats}")
    print(f"fedleak train_adapter: {fedleak:.2f} s ({tokens / fedleak:,.0f} tokens/s)")
    print(f"bare HF labels loop:   {bare:.2f} s ({tokens / bare:,.0f} tokens/s)")
    print(f"ratio fedleak / bare:  {fedleak / bare:.2f}x")


if __name__ == "__main__":
    main()
