"""Across seeds: the mean of every metric with a Student-t confidence interval (seeds are few, so
not a normal one), for each cell and each training's utility."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from fedleak.common.names import CELL_GROUP, TRAINING_GROUP  # noqa: F401  (the report groups by the same)


def mean_interval(values: list[float], *, confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and the t interval of the mean; null where n is too small.

    A metric some seeds lack (null: a TPR the seed's non-members cannot resolve, a failed cell) has no
    mean across seeds: the mean of the others would stand for every seed. `n` counts the seeds with a value.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0 or n < len(values):
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": n}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _aggregate(items: list[dict], group: tuple[str, ...], values_of) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        groups.setdefault(tuple(item.get(k) for k in group), []).append(item)
    out = []
    for key, members in groups.items():
        per_metric: dict[str, list[float]] = {}
        for member in members:
            for name, value in values_of(member).items():
                if _numeric(value) or value is None:
                    per_metric.setdefault(name, []).append(value)
        out.append({**dict(zip(group, key)), "seeds": sorted({m["seed"] for m in members}),
                    "metrics": {name: mean_interval(values) for name, values in per_metric.items()}})
    return out


def aggregate_cells(cells: list[dict]) -> list[dict]:
    """One record per cell key across seeds (the client index is kept: client i of each seed's partition)."""
    return _aggregate(cells, CELL_GROUP, lambda cell: cell["metrics"])


def aggregate_trainings(trainings: list[dict]) -> list[dict]:
    """Utility per (algorithm, defense, scenario) across seeds: the global model's and the clients' mean."""
    def utility(training: dict) -> dict:
        u = training["utility"]
        return {**{f"global/{k}": v for k, v in (u.get("global") or {}).items()},
                **{f"client_mean/{k}": v for k, v in (u.get("client_mean") or {}).items()}}

    out = _aggregate(trainings, TRAINING_GROUP, utility)
    for record in out:
        flat = record.pop("metrics")
        record["utility"] = {}
        for name, summary in flat.items():
            view, metric = name.split("/", 1)
            record["utility"].setdefault(view, {})[metric] = summary
    return out
