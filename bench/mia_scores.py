"""Cost of running every logit-based membership score on a view against one `loss` run.

All of `loss`, `zlib`, `min_k`, `min_k_pp`, `lowercase` and `reference` read one shared forward pass
per (model, text variant) and batch. Three side-by-side timings on fresh views (empty caches):

  loss            the `loss` attack alone: the baseline, 1.00x
  single-input    loss + zlib + min_k + min_k_pp + reference, with the reference (base model)
                  statistics already cached, as they are for every view but the first of a run
  all six         the same plus `lowercase`, whose lowercased text needs one more target pass,
                  and the reference pass not cached (the first view of a run)

    .venv/bin/python bench/mia_scores.py [--records 180 --repeats 3]
"""

from __future__ import annotations

import argparse
import time

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Target
from fedleak.federated.data import generate_records

from common import embedded_lora  # bench/ runs as scripts: its folder is on sys.path

SINGLE_INPUT = ("loss", "zlib", "min_k", "min_k_pp", "reference")
ALL = SINGLE_INPUT + ("lowercase",)


def timed(model, tokenizer, records, names, env) -> float:
    target = Target(model=model, tokenizer=tokenizer, observer="global", round=1, max_length=256, env=env)
    start = time.perf_counter()
    for name in names:
        ATTACKS.get(name)().score(target, records)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer, _ = embedded_lora(1)
    records = generate_records(args.records, seed=0, purpose="bench-mia", private=True)
    ATTACKS.get("loss")  # import every built-in attack before timing
    warm_env = AttackEnvironment(tokenizer=tokenizer, seed=0, batch_size=args.batch_size)
    timed(model, tokenizer, records, ("reference",), warm_env)  # fills the run-wide reference cache
    timings = {"loss": [], "single-input": [], "all six": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits all alike
        timings["loss"].append(timed(model, tokenizer, records, ("loss",), warm_env))
        timings["single-input"].append(timed(model, tokenizer, records, SINGLE_INPUT, warm_env))
        cold_env = AttackEnvironment(tokenizer=tokenizer, seed=0, batch_size=args.batch_size)
        timings["all six"].append(timed(model, tokenizer, records, ALL, cold_env))
    best = {k: min(v) for k, v in timings.items()}
    print(f"{args.records} records, batch {args.batch_size}, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:13s} {seconds:6.2f} s   {seconds / best['loss']:.2f}x loss")


if __name__ == "__main__":
    main()
