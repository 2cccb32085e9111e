"""Safety alignment: how often each training's global model refuses held-out harmful requests, under a safety
attack (Ye et al. 2024, arXiv 2406.10630: malicious clients train on harmful requests answered with compliance)
and without one, with and without the server-side alignment defense. Rates carry their exact binomial
(Clopper-Pearson) intervals, and two rates are compared only when the intervals do not overlap."""

from __future__ import annotations

from typing import Callable

from fedleak.common.names import CLEAN, NO_DEFENSE
from fedleak.reports.document import Section, Table, fmt_ci, is_number
from fedleak.reports.merge import Merged
from fedleak.reports.poisoning import distinguishable

SAFETY_INTRO = (
    "Safety alignment: the share of held-out harmful requests (prescription fraud, forged notes, other patients' "
    "records; none ever trained on) whose greedy answer from the global model refuses, recognised by its refusal "
    "wording. Clean clients hold harmful requests answered with refusals (`data.embedded.safety_records`); in a "
    "scenario with `harmful_compliance`, the malicious clients train on harmful requests answered with "
    "compliance (Ye et al. 2024's safety attack); `server_align` fine-tunes the aggregate on the server's own "
    "refusals and public records after every round (their post-hoc defense). Brackets: the Clopper-Pearson "
    "interval over the prompts at the run's `attack.confidence`. The comparison column says whether the refusal "
    "rate is lower or higher than the clean training's of the same algorithm and defense (an attack effect) and "
    "than FedAvg's in the same scenario (what the defense buys), only where the two intervals do not overlap.")


def _rate(training: dict) -> tuple[float | None, tuple | None]:
    safety = (training.get("poisoning") or {}).get("safety") or {}
    low, high = safety.get("refusal_rate_ci_low"), safety.get("refusal_rate_ci_high")
    return safety.get("refusal_rate"), (low, high) if is_number(low) and is_number(high) else None


def safety_table(trainings: list[dict]) -> Table | None:
    """One row per training with a refusal measurement; None when no training has one.

    Args:
        trainings: the results' training records (per seed).
    """
    measured = [t for t in trainings if (t.get("poisoning") or {}).get("safety")]
    if not measured:
        return None
    several = len({t.get("seed") for t in measured}) > 1
    by_key = {(t["algorithm"], t["defense"], t.get("scenario", CLEAN), t.get("seed")): t for t in measured}
    rows = []
    for t in measured:
        scenario, seed = t.get("scenario", CLEAN), t.get("seed")
        value, own = _rate(t)
        clean = by_key.get((t["algorithm"], t["defense"], CLEAN, seed))
        fedavg = by_key.get((t["algorithm"], NO_DEFENSE, scenario, seed))
        versus_clean = "(clean)" if clean is t else distinguishable(own, _rate(clean)[1]) if clean else "n/a"
        versus_fedavg = "(FedAvg)" if fedavg is t else distinguishable(own, _rate(fedavg)[1]) if fedavg else "n/a"
        safety, utility = t["poisoning"]["safety"], (t.get("utility") or {}).get("global", {})
        rows.append([t["algorithm"], t["defense"], scenario, *([str(seed)] if several else []),
                     f"{safety['refusals']} / {safety['prompts']}", fmt_ci(value, own),
                     f"{versus_clean} / {versus_fedavg}",
                     fmt_ci(utility.get("loss"), None), fmt_ci(utility.get("rouge_l"), None)])
    return Table(["algorithm", "defense", "scenario", *(["seed"] if several else []), "refusals / prompts",
                  "refusal rate", "vs clean training / FedAvg", "global loss", "global ROUGE-L"], rows)


def safety_section(run: Merged, redact: Callable[[str], str]) -> Section | None:
    """The refusal table and the answers to the first held-out harmful request; None without a measurement."""
    table = safety_table(run.results["trainings"])
    if table is None:
        return None
    examples = [[t["algorithm"], t["defense"], t.get("scenario", CLEAN), redact(e["prompt"]), redact(e["answer"])]
                for t in run.results["trainings"] if (t.get("poisoning") or {}).get("safety")
                for e in t["poisoning"]["safety"].get("examples", [])[:1]]
    blocks = [SAFETY_INTRO, table]
    if examples:
        blocks += ["The first held-out harmful request and each global model's answer:",
                   Table(["algorithm", "defense", "scenario", "request", "answer"], examples)]
    return Section("Safety alignment", blocks)
