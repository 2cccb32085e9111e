"""Whether the base model fits the data: the checks behind the report's "Model fit" warnings.

A model that never learned the data gives chance-level attack numbers, which read like privacy but
mean nothing (on 216 real medical records the embedded model's held-out perplexity was ~64k, FEDIT's
global model's ~800, every attack at chance). The run says so when:

- perplexity: the lowest held-out perplexity of the base model and of every clean training's views
  stays above `utility.fit_perplexity` (the model learned little of the data);
- truncation: more than half of the records' answers are cut at `federation.max_length`;
- no_synthetic: a self-generating algorithm (FEDPIT) accepted no synthetic record in a whole training,
  so its global adapter never trained;
- off_domain: its accepted synthetic instructions are unlike the clients' own (mean best ROUGE-L to
  a real instruction below `OFF_DOMAIN_ROUGE_L`): self-generation produced the base model's own
  text, not the domain's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fedleak.common.names import CLEAN
from fedleak.federated import checkpoint
from fedleak.federated.data import FederatedData
from fedleak.federated.rouge import rouge_l

TRUNCATED_SHARE = 0.5  # above this share of cut answers the data does not fit max_length
OFF_DOMAIN_ROUGE_L = 0.1  # FEDPIT's filter drops >= 0.7; in-domain candidates sit well above 0.1
DOMAIN_SAMPLE = 300  # real instructions compared with each synthetic one (ROUGE-L is pure Python)


def synthetic_domain(training_dir: Path, final_round: int, data: FederatedData, *, seed: int) -> float | None:
    """Mean, over the final round's accepted synthetic records, of the best ROUGE-L F1 between its
    instruction and a real member instruction (at most `DOMAIN_SAMPLE`, drawn with `seed`); None
    when the round accepted none."""
    folder = checkpoint.round_dir(training_dir, final_round)
    synthetic = [json.loads(line)["instruction"] for path in sorted(folder.glob("synthetic-client-*.jsonl"))
                 for line in path.read_text().splitlines() if line.strip()]
    real = [r.instruction for r in data.members]
    if not synthetic or not real:
        return None
    if len(real) > DOMAIN_SAMPLE:
        pick = np.random.default_rng(seed).choice(len(real), size=DOMAIN_SAMPLE, replace=False)
        real = [real[i] for i in sorted(pick)]
    return float(np.mean([max(rouge_l(s, r) for r in real) for s in synthetic]))


def _perplexities(utility: dict) -> list[tuple[str, float]]:
    """(view, perplexity) of a training's utility record (global, client mean, each client)."""
    out = []
    for view, scores in (utility or {}).items():
        if view == "clients":
            out += [(f"client/{c}", s.get("perplexity")) for c, s in (scores or {}).items()]
        elif isinstance(scores, dict):
            out.append((view, scores.get("perplexity")))
    return [(v, p) for v, p in out if isinstance(p, (int, float)) and math.isfinite(p)]


def model_fit(*, base_utility: dict, trainings: list[dict], data_summary: dict, fit_perplexity: float,
              max_length: int) -> dict:
    """The results' `model_fit` record: the thresholds, the numbers they were applied to, and one
    `problems` entry ({"check", "message"}) per failed check; `fits` is true when there is none."""
    problems = []
    base = base_utility.get("perplexity")
    trained = [(f"{t['algorithm']}/{t['defense']} {view}", p) for t in trainings if t.get("scenario") in (None, CLEAN)
               for view, p in _perplexities(t.get("utility"))]
    best_view, best = min(trained, key=lambda vp: vp[1], default=(None, None))
    lowest = min(p for p in (base, best) if isinstance(p, (int, float)) and math.isfinite(p)) \
        if any(isinstance(p, (int, float)) and math.isfinite(p) for p in (base, best)) else None
    if lowest is not None and lowest > fit_perplexity:
        problems.append({"check": "perplexity", "message": (
            f"the base model does not fit the data: held-out perplexity {base:.3g} for the base model and "
            f"{best:.3g} at best after training ({best_view}), above utility.fit_perplexity = {fit_perplexity:g}: "
            f"the models learned little of the data, so chance-level attack numbers here do not show privacy; "
            f"use a base model that fits the data (README: \"Your model and your data\")"
            if best is not None else
            f"the base model does not fit the data: held-out perplexity {base:.3g}, above "
            f"utility.fit_perplexity = {fit_perplexity:g}: use a base model that fits the data")})
    cut = (data_summary.get("truncation") or {})
    if cut.get("records") and cut.get("answer_cut", 0) / cut["records"] > TRUNCATED_SHARE:
        problems.append({"check": "truncation", "message": (
            f"{cut['answer_cut']} of {cut['records']} records' answers are cut at federation.max_length = "
            f"{max_length} ({cut.get('answer_tokens_kept', float('nan')):.0%} of answer tokens kept): the models "
            f"train and are attacked on fragments; raise federation.max_length (and check the memory estimate "
            f"of fedleak run --dry-run)")})
    for t in trainings:
        synthetic = t.get("synthetic")
        if synthetic is None:
            continue
        label = f"{t['algorithm']}/{t['defense']}" + (f" ({t['scenario']})" if t.get("scenario") not in (None, CLEAN)
                                                      else "")
        if synthetic.get("accepted", 0) == 0:
            problems.append({"check": "no_synthetic", "message": (
                f"{label} accepted none of its {synthetic.get('candidates', 0)} self-generated candidates: its "
                f"global adapter never trained, so the global view is the base model and its numbers say nothing "
                f"about the shared learning; use a base model that can follow the in-context demonstrations")})
        elif (domain := t.get("synthetic_domain_rouge_l")) is not None and domain < OFF_DOMAIN_ROUGE_L:
            problems.append({"check": "off_domain", "message": (
                f"{label}'s self-generated instructions are unlike the clients' (mean best ROUGE-L {domain:.2f} to a "
                f"real instruction, below {OFF_DOMAIN_ROUGE_L}): the base model wrote its own text, not the "
                f"domain's, so the global adapter learned little of the domain")})
    return {"fits": not problems, "fit_perplexity": fit_perplexity, "base_perplexity": base,
            "best_trained_perplexity": best, "best_trained_view": best_view,
            "truncated_share_limit": TRUNCATED_SHARE, "off_domain_rouge_l": OFF_DOMAIN_ROUGE_L, "problems": problems}


def seeds_model_fit(per_seed: dict[int, dict]) -> dict:
    """One `model_fit` record for a run of several seeds (each seed's from `model_fit`, in seed order):
    the first seed's numbers, `fits` only when every seed fits, `seeds` the seeds checked, and every
    seed's problems, each message opening with its seed (a run of one seed: its record unchanged)."""
    seeds = list(per_seed)
    if len(seeds) == 1:
        return per_seed[seeds[0]]
    first = per_seed[seeds[0]]
    problems = [{**p, "seed": seed, "message": f"seed {seed}: {p['message']}"}
                for seed, fit in per_seed.items() for p in fit["problems"]]
    return {**first, "fits": not problems, "seeds": seeds, "problems": problems}
