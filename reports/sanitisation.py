"""What a data-sanitising defense (scrub) changed in the clients' records, beside the ranking that shows what it
bought: records changed, replacements per entity, and the data's declared identifiers its patterns missed."""

from __future__ import annotations

from fedleak.reports.document import Table, defense_label, fmt
from fedleak.reports.merge import Merged

SANITISATION_INTRO = (
    "Data sanitisation (defenses that rewrite each client's records before training, e.g. `scrub`): the records "
    "changed, the placeholders put in per entity, and the identifiers the data declares (patients' names, dates, "
    "numbers, canary secrets) still in the scrubbed text, which its patterns missed; summed over clients, the "
    "mean over seeds where several. Its leakage and utility cost are in the ranking above: the membership "
    "attacks score each candidate as the defense rewrites it (an attacker who knows the defense), the extraction "
    "attacks look for the original identifiers and secrets, and a canary design whose secrets no pattern matches "
    "(the one-run audit by design) shows what still leaks.")


def _mean(values: list) -> float:
    return sum(values) / len(values)


def sanitisation_table(run: Merged) -> Table | None:
    """One row per training and sanitising part; None when no training changed its records."""
    rows = []
    for t in run.trainings:
        per_seed = [s.get("sanitisation") for s in t.get("per_seed", [t]) if s.get("sanitisation")]
        if not per_seed:
            continue
        for part in per_seed[0]:
            facts = [p[part] for p in per_seed if part in p]
            entities = sorted({e for f in facts for e in f["replaced"]})
            replaced = ", ".join(f"{e} {fmt(_mean([f['replaced'].get(e, 0) for f in facts]), 1)}" for e in entities)
            left = [f["identifiers_left"] for f in facts if "identifiers_left" in f]
            rows.append([t["algorithm"], defense_label(t), part,
                         f"{fmt(_mean([f['changed'] for f in facts]), 1)} of {fmt(_mean([f['records'] for f in facts]), 1)}",
                         replaced or "none", fmt(_mean(left), 1) if left else "n/a"])
    if not rows:
        return None
    return Table(["algorithm", "defense", "sanitiser", "records changed", "replacements per entity",
                  "declared identifiers left"], rows)
