"""The one merge of a run's results across seeds, computed once per report and handed to every section:
one cell per cell key and one training per (algorithm, defense, scenario), holding the means over seeds
with their across-seed intervals (the results' `aggregates`) and the seeds' own records; and how a
section reads a merged cell or training (its interval, the largest value over cells, groups of cells)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedleak.common.names import CELL_GROUP, CLEAN, TRAINING_GROUP
from fedleak.reports.document import fmt_ci, is_number, view


def _group_key(item: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(item.get(f, CLEAN) if f == "scenario" else item.get(f) for f in fields)


def _groups(items: list[dict], fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        groups.setdefault(_group_key(item, fields), []).append(item)
    return groups


def _mean_over_seeds(per_seed: list[dict], stats: dict) -> tuple[dict, dict]:
    """Each metric's mean over seeds and its across-seed interval: the results' aggregate when it has
    one, else the plain mean (an interval needs the aggregate: n/a)."""
    if len(per_seed) == 1:
        return dict(per_seed[0]), {}
    means, intervals = {}, {}
    for name in dict.fromkeys(k for m in per_seed for k in m):
        stat = stats.get(name) or {}
        values = [m[name] for m in per_seed if is_number(m.get(name))]
        complete = len(values) == len(per_seed)  # a metric some seeds lack has no mean across seeds
        means[name] = stat.get("mean") if "mean" in stat else (float(np.mean(values)) if values and complete else None)
        if is_number(stat.get("ci_low")) and is_number(stat.get("ci_high")):
            intervals[name] = (stat["ci_low"], stat["ci_high"])
    return means, intervals


def merge_cells(cells: list[dict], aggregates: list[dict]) -> list[dict]:
    """One cell per cell key across seeds: `metrics` the means, `ci` their intervals, `seeds` and
    `per_seed` the seeds' own cells; everything else is the first seed's (ROC, details)."""
    stats = {_group_key(a, CELL_GROUP): a.get("metrics", {}) for a in aggregates}
    out = []
    for key, group in _groups(cells, CELL_GROUP).items():
        metrics, intervals = _mean_over_seeds([c["metrics"] for c in group], stats.get(key, {}))
        out.append({**group[0], "seed": None, "metrics": metrics, "ci": intervals,
                    "seeds": [c.get("seed") for c in group], "per_seed": group})
    return out


def merge_trainings(trainings: list[dict], aggregates: list[dict]) -> list[dict]:
    """One training per (algorithm, defense, scenario) across seeds: utility means with `utility_ci`,
    the largest accountant epsilon over seeds (the partition, so each client's sampling rate, varies)."""
    stats = {_group_key(a, TRAINING_GROUP): a.get("utility", {}) for a in aggregates}
    out = []
    for key, group in _groups(trainings, TRAINING_GROUP).items():
        utility, intervals = dict(group[0].get("utility", {})), {}
        for name in ("global", "client_mean"):
            per_seed = [t["utility"][name] for t in group if (t.get("utility") or {}).get(name)]
            if per_seed:
                utility[name], intervals[name] = _mean_over_seeds(per_seed, stats.get(key, {}).get(name, {}))
        out.append({**group[0], "seed": None, "utility": utility, "utility_ci": intervals,
                    "privacy": _worst_privacy([t.get("privacy") for t in group]),
                    "seeds": [t.get("seed") for t in group], "per_seed": group})
    return out


def _worst_privacy(privacies: list[dict | None]) -> dict | None:
    privacies = [p for p in privacies if p]
    if not privacies:
        return None
    out = dict(privacies[0])
    for name in ("record_level_epsilon", "user_level_epsilon"):
        values = [p[name] for p in privacies if is_number(p.get(name))]
        if values:
            out[name] = max(values)
    return out


def _base_utility(results: dict) -> dict | None:
    """The base model's utility: the mean over seeds when each seed has its own held-out records."""
    per_seed = list((results.get("base_utility_per_seed") or {}).values())
    if len(per_seed) > 1:
        return {k: float(np.mean([u[k] for u in per_seed if is_number(u.get(k))]))
                for k in ("loss", "perplexity", "rouge_l") if any(is_number(u.get(k)) for u in per_seed)}
    return results.get("base_utility")


@dataclass
class Merged:
    """A run's results merged across seeds, with the raw results for what sections show per seed."""

    results: dict
    seeds: list
    cells: list[dict]  # every round
    final: list[dict]  # each training's final round
    trainings: list[dict]
    final_per_seed: list[dict]  # the final round's cells as the results list them, one per seed
    base_utility: dict | None

    def clean_privacy(self) -> list[dict]:
        """Final-round privacy-attack cells on the clean trainings (poisoned ones: the poisoning section)."""
        return [c for c in self.final if c["family"] != "poisoning" and c.get("scenario", CLEAN) == CLEAN]

    def of_family(self, family: str, *, every_round: bool = False) -> list[dict]:
        """Merged cells of one attack family, at the final round unless every_round."""
        return [c for c in (self.cells if every_round else self.final) if c["family"] == family]


def merged(results: dict) -> Merged:
    """The merge every section reads (a report computes it once)."""
    aggregates = results.get("aggregates") or []
    final = _final(results)
    return Merged(results, run_seeds(results), merge_cells(results["cells"], aggregates),
                  merge_cells(final, aggregates),
                  merge_trainings(results["trainings"], results.get("training_aggregates") or []),
                  final, _base_utility(results))


def run_seeds(results: dict) -> list:
    """The run's seeds: `seeds` (schema 4), else the one `seed`, else those the cells name."""
    if results.get("seeds"):
        return list(results["seeds"])
    if results.get("seed") is not None:
        return [results["seed"]]
    return list(dict.fromkeys(c.get("seed") for c in results["cells"] if c.get("seed") is not None))


def training_key(item: dict) -> tuple:
    """Which training a cell or training record belongs to (results before scenarios: all clean)."""
    return item["algorithm"], item["defense"], item.get("scenario", CLEAN), item.get("seed")


def _final(results: dict) -> list[dict]:
    """Cells of each training's final round (other rounds feed the over-rounds plots)."""
    last = {training_key(t): len(t["rounds"]) for t in results["trainings"] if t.get("rounds")}
    for c in results["cells"]:  # results without round history: the latest round attacked
        if training_key(c) not in last or c["round"] > last[training_key(c)]:
            last[training_key(c)] = c["round"]
    return [c for c in results["cells"] if c["round"] == last[training_key(c)]]


def train_seconds(training: dict) -> float | None:
    """A training's time in training proper (schema 4's cost; older results: `train_seconds`)."""
    return (training.get("cost") or {}).get("train_seconds", training.get("train_seconds"))


def interval(item: dict, metric: str) -> tuple | None:
    """The interval beside a metric: across seeds when there are several, else the metric's own
    (bootstrap) interval `<metric>_low`/`_high` or `<metric>_ci_low`/`_ci_high` when it has one."""
    if len(item.get("seeds", [])) > 1:
        return item.get("ci", {}).get(metric)
    metrics = item["metrics"]
    for low, high in ((f"{metric}_low", f"{metric}_high"), (f"{metric}_ci_low", f"{metric}_ci_high")):
        if is_number(metrics.get(low)) and is_number(metrics.get(high)):
            return metrics[low], metrics[high]
    return None


def metric_text(cell: dict, name: str, digits: int = 3) -> str:
    """A cell's metric with its interval."""
    return fmt_ci(cell["metrics"].get(name), interval(cell, name), digits)


def utility_text(training: dict, view_name: str, name: str, digits: int = 3) -> str:
    """A training's utility score on one view (`global`, `client_mean`) with its across-seed interval."""
    value = (training.get("utility", {}).get(view_name) or {}).get(name)
    several = len(training.get("seeds", [])) > 1
    return fmt_ci(value, training.get("utility_ci", {}).get(view_name, {}).get(name) if several else None, digits)


def is_interval_key(name: str, metrics: dict) -> bool:
    """`auc_low` beside `auc`: shown inside auc's brackets, not as a column of its own."""
    for suffix in ("_ci_low", "_ci_high", "_low", "_high"):
        if name.endswith(suffix) and name[: -len(suffix)] in metrics:
            return True
    return False


def pair(item: dict) -> tuple[str, str]:
    """(algorithm, defense): a column of the summary heatmap, a row of the defense ranking."""
    return item["algorithm"], item["defense"]


def best(cells: list[dict], metric: str) -> tuple[float | None, dict | None]:
    """The largest value of a metric over cells, and the cell it comes from."""
    scored = [(c["metrics"][metric], c) for c in cells if is_number(c["metrics"].get(metric))]
    if not scored:
        return None, None
    return max(scored, key=lambda x: x[0])


def by(cells: list[dict], name: str) -> dict[str, list[dict]]:
    """Cells grouped by one field (attack, scenario), in the order they first appear."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c[name], []).append(c)
    return groups


def worst_auc_cell(cells: list[dict]) -> dict | None:
    """The membership cell with the largest AUC (over attacks, views and clients), or None."""
    return best([c for c in cells if c["family"] == "membership"], "auc")[1]


def worst_auc(cells: list[dict]) -> tuple[float | None, str]:
    """Worst case over membership attacks and views (all clients) at the final round: the largest AUC."""
    cell = worst_auc_cell(cells)
    return (cell["metrics"]["auc"], f"{cell['attack']}, {view(cell)}") if cell else (None, "")
