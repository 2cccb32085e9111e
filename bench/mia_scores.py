"""Membership scoring speed: fedleak's shared batched pass against MIMIR's own loop, and the cost of
every logit-based score on a view against one `loss` run.

Part 1 (`--part mimir`), loss + zlib + Min-K% + Min-K%++ on the same model, records and scored tokens,
timed side by side with interleaved repeats:

  fedleak         `compute_stats` through the attacks (`attacks/membership/stats.py`): records batched
                  by length, the LM head and the softmax only at scored positions, one pass per batch
  mimir loop      MIMIR's real loop (iamgroot42/mimir, run.py `get_mia_scores` and models.py
                  `get_probabilities`), rewritten here: batch 1, per document ONE forward pass (with
                  `labels=`, as MIMIR calls it) shared by LOSS, zlib, Min-K% and Min-K%++, the logits
                  moved to the CPU, a log-softmax over the full vocabulary at every position, a Python
                  loop over the tokens picking each log-prob with `.item()`, Min-K%++'s mu and sigma
                  over the stacked full distributions
  forward only    the floor: the forward pass alone over fedleak's batches, the output head at the
                  scored positions only, no softmax or statistics; what fedleak's scoring adds to it
                  is the softmax and the statistics
  per attack      the same loop with one forward pass per attack per document (each MIMIR attack
                  called without the shared `probs`: LOSS, zlib, Min-K% and Min-K%++ each run
                  `get_probabilities` again)

The MIMIR loop is given fedleak's token ids and masks (MIMIR's pretokenized path), so both score the
same tokens; the bench checks that their LOSS scores agree.

Part 2 (`--part overhead`), on fresh views (empty caches):

  loss            the `loss` attack alone: the baseline, 1.00x
  single-input    loss + zlib + min_k + min_k_pp + reference, with the reference (base model)
                  statistics already cached, as they are for every view but the first of a run
  all six         the same plus `lowercase`, whose lowercased text needs one more target pass,
                  and the reference pass not cached (the first view of a run)

    OMP_NUM_THREADS=1 .venv/bin/python bench/mia_scores.py [--records 120 --repeats 3 --part all]
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np
import torch

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Target
from fedleak.federated.data import generate_records
from fedleak.federated.batching import scored_logits
from fedleak.federated.training import IGNORE, collate, encode

from common import embedded_lora  # bench/ runs as scripts: its folder is on sys.path

MIMIR_SCORES = ("loss", "zlib", "min_k", "min_k_pp")
SINGLE_INPUT = ("loss", "zlib", "min_k", "min_k_pp", "reference")
ALL = SINGLE_INPUT + ("lowercase",)


def timed(model, tokenizer, records, names, env) -> float:
    target = Target(model=model, tokenizer=tokenizer, observer="global", round=1, max_length=256, env=env)
    start = time.perf_counter()
    for name in names:
        ATTACKS.get(name)().score(target, records)
    return time.perf_counter() - start


# --- MIMIR's loop (facts from iamgroot42/mimir: models.py get_probabilities/get_ll, run.py get_mia_scores,
# attacks/{loss,zlib,min_k,min_k_plus_plus}.py), on fedleak's token ids and masks -------------------------

@torch.no_grad()
def mimir_probabilities(model, ids: list[int], labels: list[int], return_all_probs: bool = False):
    """`LanguageModel.get_probabilities` at batch 1 (one stride: every record fits the context)."""
    input_ids = torch.tensor([ids])
    target_ids = torch.tensor([labels])
    logits = model(input_ids=input_ids, labels=target_ids).logits.cpu()
    log_probabilities = torch.nn.functional.log_softmax(logits[..., :-1, :].contiguous(), dim=-1)
    shift_labels = target_ids[..., 1:].contiguous()[0]
    target_token_log_prob, all_token_log_prob = [], []
    for i, token_id in enumerate(shift_labels):
        if token_id != -100:
            target_token_log_prob.append(log_probabilities[0, i, token_id].item())
            all_token_log_prob.append(log_probabilities[0, i])
    all_token_log_prob = torch.stack(all_token_log_prob, dim=0)
    return (target_token_log_prob, all_token_log_prob) if return_all_probs else target_token_log_prob


def mimir_get_ll(probs) -> float:
    return -np.mean(probs)


def mimir_zlib(document: str, loss: float) -> float:
    return loss / len(zlib.compress(bytes(document, "utf-8")))


def mimir_min_k(probs, k: float = 0.2) -> float:
    ngram_probs = [np.mean(probs[i:i + 1]) for i in range(0, len(probs))]  # window 1, stride 1
    return -np.mean(sorted(ngram_probs)[: int(len(ngram_probs) * k)])


def mimir_min_k_pp(probs, all_probs, k: float = 0.2) -> float:
    mu = (torch.exp(all_probs) * all_probs).sum(-1)
    sigma = (torch.exp(all_probs) * torch.square(all_probs)).sum(-1) - torch.square(mu)
    scores = (np.array(probs) - mu.numpy()) / sigma.sqrt().numpy()
    return -np.mean(sorted(scores)[: int(len(scores) * k)])


def mimir_loop(model, documents, shared: bool = True) -> dict[str, list[float]]:
    """run.py's per-document loop: `get_probabilities` once per document shared by every attack
    (`shared`), or once per attack (each attack's own `get_probabilities` when not handed `probs`)."""
    out = {name: [] for name in MIMIR_SCORES}
    for text, ids, labels in documents:
        if shared:
            probs, all_probs = mimir_probabilities(model, ids, labels, return_all_probs=True)
            loss = mimir_get_ll(probs)
            out["loss"].append(loss)
            out["zlib"].append(mimir_zlib(text, loss))
            out["min_k"].append(mimir_min_k(probs))
            out["min_k_pp"].append(mimir_min_k_pp(probs, all_probs))
        else:
            out["loss"].append(mimir_get_ll(mimir_probabilities(model, ids, labels)))
            out["zlib"].append(mimir_zlib(text, mimir_get_ll(mimir_probabilities(model, ids, labels))))
            out["min_k"].append(mimir_min_k(mimir_probabilities(model, ids, labels)))
            out["min_k_pp"].append(mimir_min_k_pp(*mimir_probabilities(model, ids, labels, return_all_probs=True)))
    return out


def mimir_part(model, tokenizer, records, args) -> None:
    examples = encode(records, tokenizer, max_length=256, response_only=True)  # what a Target scores
    documents = [(r.output, list(e.input_ids), list(e.labels)) for r, e in zip(records, examples)]
    model.eval()
    env = lambda: AttackEnvironment(tokenizer=tokenizer, seed=0, batch_size=args.batch_size)
    # Warm-up, and the check that both compute the same thing (LOSS, up to the sign convention).
    target = Target(model=model, tokenizer=tokenizer, observer="global", round=1, max_length=256, env=env())
    ours = ATTACKS.get("loss")().score(target, records)
    theirs = np.array(mimir_loop(model, documents[:8])["loss"])
    print(f"LOSS agreement on 8 records: max |fedleak - MIMIR| = {np.abs(-ours[:8] - theirs).max():.2e} nats")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    padded = [collate([examples[i] for i in order[s:s + args.batch_size]], tokenizer.pad_token_id)
              for s in range(0, len(order), args.batch_size)]
    runs = {"fedleak": lambda: timed(model, tokenizer, records, MIMIR_SCORES, env()),
            "forward only": lambda: _clock(lambda: bare_forward(model, padded)),
            "mimir loop": lambda: _clock(lambda: mimir_loop(model, documents)),
            "per attack": lambda: _clock(lambda: mimir_loop(model, documents, shared=False))}
    timings = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits all alike
        for name, run in runs.items():
            timings[name].append(run())
    best = {k: min(v) for k, v in timings.items()}
    scored = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    print(f"{len(records)} records ({scored} scored tokens), loss + zlib + min_k + min_k_pp, fedleak batch "
          f"{args.batch_size}, {torch.get_num_threads()} thread(s), best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:13s} {seconds:6.2f} s   fedleak is {seconds / best['fedleak']:5.2f}x faster")


@torch.no_grad()
def bare_forward(model, padded) -> None:
    """The floor: the forward pass alone over fedleak's length-sorted batches, the output head at the
    scored positions only (it runs nowhere else in fedleak either), no softmax or statistics."""
    for batch in padded:
        scored_logits(model, batch, batch["labels"][:, 1:] != IGNORE)


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead_part(model, tokenizer, records, args) -> None:
    warm_env = AttackEnvironment(tokenizer=tokenizer, seed=0, batch_size=args.batch_size)
    timed(model, tokenizer, records, ("reference",), warm_env)  # fills the run-wide reference cache
    timings = {"loss": [], "single-input": [], "all six": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits all alike
        timings["loss"].append(timed(model, tokenizer, records, ("loss",), warm_env))
        timings["single-input"].append(timed(model, tokenizer, records, SINGLE_INPUT, warm_env))
        cold_env = AttackEnvironment(tokenizer=tokenizer, seed=0, batch_size=args.batch_size)
        timings["all six"].append(timed(model, tokenizer, records, ALL, cold_env))
    best = {k: min(v) for k, v in timings.items()}
    print(f"{len(records)} records, batch {args.batch_size}, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:13s} {seconds:6.2f} s   {seconds / best['loss']:.2f}x loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("mimir", "overhead", "all"), default="all")
    args = parser.parse_args()
    model, tokenizer, _ = embedded_lora(1)
    records = generate_records(args.records, seed=0, purpose="bench-mia", private=True)
    ATTACKS.get("loss")  # import every built-in attack before timing
    if args.part in ("mimir", "all"):
        mimir_part(model, tokenizer, records, args)
    if args.part in ("overhead", "all"):
        overhead_part(model, tokenizer, records, args)


if __name__ == "__main__":
    main()
