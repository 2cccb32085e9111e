"""The report's document model and how values are written in it: sections of paragraphs, tables (header
+ rows of strings) and figures (PNG bytes, rendered once), shared by the Markdown and HTML renderings so
both carry the same numbers; and the formatting of numbers, intervals and labels every section uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedleak.common.names import CLEAN


@dataclass
class Table:
    """A table: header and rows, every cell already a string."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    """A figure, rendered once: inline in the HTML, a file under plots/ for the Markdown."""

    name: str  # file stem under plots/
    caption: str
    png: bytes


@dataclass
class Section:
    """A titled section: its paragraphs, tables and figures in order."""

    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Tables and Figures


def fmt(value, digits: int = 3) -> str:
    """How every number appears in both reports (tests look for these strings)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value, interval: tuple | None, digits: int = 3) -> str:
    """A value with its interval, `0.612 [0.550, 0.670]` (a comma: bounds can be negative)."""
    if is_number(value) and interval and all(is_number(b) for b in interval):
        return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"
    return fmt(value, digits)


def signed(value, digits: int = 3) -> str:
    """A change, with its sign."""
    return f"{value:+.{digits}f}" if is_number(value) else "n/a"


def is_number(value) -> bool:
    """A finite int or float (not a bool, None or NaN: what results write for an unmeasured value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_range(values: list[float | None]) -> str:
    """The mean of the measured values with their range, `0.700 [0.600-0.800]`."""
    values = [v for v in values if is_number(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} [{fmt(min(values))}-{fmt(max(values))}]"


def slug(text: str) -> str:
    """A figure's file stem from its attack and view labels."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def defense_label(item: dict) -> str:
    """The defense column: a poisoned training's scenario follows its defense."""
    scenario = item.get("scenario", CLEAN)
    return item["defense"] if scenario == CLEAN else f"{item['defense']} [{scenario}]"


def view(cell: dict) -> str:
    """The attacked view: the observer, and the client for a client's upload or model."""
    return cell["observer"] if cell["client"] is None else f"{cell['observer']}/{cell['client']}"


def view_label(cell: dict) -> str:
    """A cell's training, view and round, as legends name a curve."""
    return f"{cell['algorithm']}/{defense_label(cell)} {view(cell)} r{cell['round']}"


def epsilon_text(privacy: dict | None) -> str:
    """The accountant's epsilon: record-level (DP-SGD, worst client; against its target, loudly when above
    it) and/or user-level (DP-FedAvg)."""
    if not privacy:
        return "n/a"
    parts = []
    if "record_level_epsilon" in privacy:
        spent, target = privacy["record_level_epsilon"], privacy.get("target_epsilon")
        against = "" if not is_number(target) else \
            f" EXCEEDS target {target:g}" if is_number(spent) and spent > target else f" of target {target:g}"
        scope = ", not what real records pass into self-generated data" if privacy.get("record_level_scope") else ""
        parts.append(f"record {fmt(spent, 2)}{against} (delta {privacy['record_level_delta']:g}{scope})")
    if "user_level_epsilon" in privacy:
        parts.append(f"user {fmt(privacy['user_level_epsilon'], 2)} (delta {privacy['user_level_delta']:g})")
    return "; ".join(parts)


def _find_params(params, names: tuple[str, ...]) -> dict:
    """Parameters by name in a defense's params, also inside a composition's {part: params}."""
    found = {}
    if isinstance(params, dict):
        for key, value in params.items():
            if key in names and value is not None:
                found[key] = value
            else:
                found.update(_find_params(value, names))
    return found


def privacy_level(training: dict, *, epsilon: bool = True) -> str:
    """A DP training's privacy level in a few characters: its noise setting and the accountant's epsilon."""
    params = _find_params(training.get("defense_params") or {}, ("target_epsilon", "noise_multiplier"))
    parts = [f"target ε={params['target_epsilon']:g}"] if "target_epsilon" in params else []
    parts += [f"σ={params['noise_multiplier']:g}"] if "noise_multiplier" in params else []
    privacy = (training.get("privacy") or {}) if epsilon else {}
    for level in ("record", "user"):
        if is_number(privacy.get(f"{level}_level_epsilon")):
            parts.append(f"ε={privacy[f'{level}_level_epsilon']:.2f} ({level})")
    return ", ".join(parts)
