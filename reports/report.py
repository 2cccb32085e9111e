"""Leakage report (Markdown and self-contained HTML) rendered from a run's results.json only.

Both renderings share one document model: a list of sections, each holding paragraphs, tables
(header + rows of strings) and figures (PNG bytes, rendered once), so they always carry the same numbers.
With several seeds, every table shows the mean over seeds with its across-seed interval (the results'
`aggregates`); text that may carry private identifiers goes through `redact.redactor` first.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_bytes, atomic_write_text
from fedleak.reports.redact import MARKER, redactor

CLEAN = "clean"  # the scenario without malicious clients (eval.config.CLEAN; reports import nothing heavy)
NO_DEFENSE = "none"
CHANCE_AUC = 0.5

CELL_GROUP = ("algorithm", "defense", "scenario", "attack", "family", "observer", "client", "round")
TRAINING_GROUP = ("algorithm", "defense", "scenario")
MEMBERSHIP_COLUMNS = (("balanced_accuracy", "balanced acc."), ("epsilon_lb", "empirical eps"),
                      ("one_run_epsilon_lb", "one-run eps"))
OBSERVER_ORDER = ("global", "upload", "client")
EXAMPLES_PER_KIND = 2  # per cell and kind of example: enough to see what leaks, short enough to read

INTRO = ("Membership inference: higher AUC and TPR at low FPR mean more leakage (0.5 AUC is chance). "
         "With n non-members, a TPR at an FPR below 1/n is the TPR at zero false positives. Observers: "
         "`global` is the aggregated adapter (server and every client), `upload` a client's upload (a curious "
         "server), `client` a client's final model (the client itself); for `upload` and `client` the members "
         "are that client's records. Tables show the final round unless they say otherwise; AUC intervals are "
         "bootstrap confidence intervals. The empirical epsilon is a lower bound on the epsilon of any "
         "differential-privacy guarantee the view could have (Clopper-Pearson bounds on the attack's FPR and FNR at "
         "its best threshold); the one-run epsilon comes from audit canaries inserted with probability 1/2 "
         "(Steinke, Nasr and Jagielski 2023). Both sit next to the accountant's epsilon: a lower bound above it "
         "would mean a broken implementation, for the views the guarantee covers (DP-SGD's record-level epsilon: "
         "every view; DP-FedAvg's user-level epsilon: the global model only, the uploads and client models get "
         "no server noise).")
SEEDS_NOTE = ("This run has {n} seeds ({seeds}): every number is the mean over seeds and brackets hold the 95% "
              "Student-t confidence interval of that mean across seeds (n/a below two seeds with a value); "
              "the membership section keeps each seed's own numbers, and ROC curves, examples and per-round "
              "details show the first seed.")
REDACTED_NOTE = (f"Private identifiers in model outputs, prompts and examples are replaced by `{MARKER}`: names, "
                 "dates, record numbers, phone numbers and canary secrets in the formats of fedleak's synthetic "
                 "data (clinicians' names and any number of six digits or more too), and every identifier the "
                 "results list. "
                 "`fedleak report RUN_DIR --show-secrets` writes the report with them in full.")
SHOWN_NOTE = ("This report shows private identifiers in full (written with `--show-secrets`): keep it as private "
              "as the training data; `fedleak report RUN_DIR` rewrites it redacted.")


def fmt(value, digits: int = 3) -> str:
    """How every number appears in both reports (tests look for these strings)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value, interval: tuple | None, digits: int = 3) -> str:
    """A value with its interval, `0.612 [0.550, 0.670]` (a comma: bounds can be negative)."""
    if _number(value) and interval and all(_number(b) for b in interval):
        return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"
    return fmt(value, digits)


def _signed(value, digits: int = 3) -> str:
    return f"{value:+.{digits}f}" if _number(value) else "n/a"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file stem under plots/
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Tables and Figures


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise FedleakError(f"{path} not found: give the output folder of a finished `fedleak run`") from None
    except json.JSONDecodeError as exc:
        raise FedleakError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): rerun `fedleak run`") from None
    if not str(results.get("schema", "")).startswith("fedleak-results/"):
        raise FedleakError(f"{path}: field 'schema' is {results.get('schema')!r}: not a fedleak results file")
    return results


# ---------------------------------------------------------------------------------------------- seeds


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
        values = [m[name] for m in per_seed if _number(m.get(name))]
        means[name] = stat.get("mean") if "mean" in stat else (float(np.mean(values)) if values else None)
        if _number(stat.get("ci_low")) and _number(stat.get("ci_high")):
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
        for view in ("global", "client_mean"):
            per_seed = [t["utility"][view] for t in group if (t.get("utility") or {}).get(view)]
            if per_seed:
                utility[view], intervals[view] = _mean_over_seeds(per_seed, stats.get(key, {}).get(view, {}))
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
        values = [p[name] for p in privacies if _number(p.get(name))]
        if values:
            out[name] = max(values)
    return out


@dataclass
class Merged:
    cells: list[dict]  # every round
    final: list[dict]  # each training's final round
    trainings: list[dict]


def merged(results: dict) -> Merged:
    aggregates = results.get("aggregates") or []
    return Merged(merge_cells(results["cells"], aggregates), merge_cells(_final(results), aggregates),
                  merge_trainings(results["trainings"], results.get("training_aggregates") or []))


def run_seeds(results: dict) -> list:
    """The run's seeds: `seeds` (schema 4), else the one `seed`, else those the cells name."""
    if results.get("seeds"):
        return list(results["seeds"])
    if results.get("seed") is not None:
        return [results["seed"]]
    return list(dict.fromkeys(c.get("seed") for c in results["cells"] if c.get("seed") is not None))


def _interval(item: dict, metric: str) -> tuple | None:
    """The interval beside a metric: across seeds when there are several, else the metric's own
    (bootstrap) interval `<metric>_low`/`_high` or `<metric>_ci_low`/`_ci_high` when it has one."""
    if len(item.get("seeds", [])) > 1:
        return item.get("ci", {}).get(metric)
    metrics = item["metrics"]
    for low, high in ((f"{metric}_low", f"{metric}_high"), (f"{metric}_ci_low", f"{metric}_ci_high")):
        if _number(metrics.get(low)) and _number(metrics.get(high)):
            return metrics[low], metrics[high]
    return None


def _metric(cell: dict, name: str, digits: int = 3) -> str:
    return fmt_ci(cell["metrics"].get(name), _interval(cell, name), digits)


def _utility(training: dict, view: str, name: str, digits: int = 3) -> str:
    value = (training.get("utility", {}).get(view) or {}).get(name)
    interval = training.get("utility_ci", {}).get(view, {}).get(name) if len(training.get("seeds", [])) > 1 else None
    return fmt_ci(value, interval, digits)


def _is_interval_key(name: str, metrics: dict) -> bool:
    """`auc_low` beside `auc`: shown inside auc's brackets, not as a column of its own."""
    for suffix in ("_ci_low", "_ci_high", "_low", "_high"):
        if name.endswith(suffix) and name[: -len(suffix)] in metrics:
            return True
    return False


# ------------------------------------------------------------------------------------------ helpers


def _key(item: dict) -> tuple:
    """Which training a cell or training record belongs to (results before scenarios: all clean)."""
    return item["algorithm"], item["defense"], item.get("scenario", CLEAN), item.get("seed")


def _pair(item: dict) -> tuple[str, str]:
    return item["algorithm"], item["defense"]


def _defense(item: dict) -> str:
    """The defense column: a poisoned training's scenario follows its defense."""
    scenario = item.get("scenario", CLEAN)
    return item["defense"] if scenario == CLEAN else f"{item['defense']} [{scenario}]"


def _view(cell: dict) -> str:
    return cell["observer"] if cell["client"] is None else f"{cell['observer']}/{cell['client']}"


def _view_label(cell: dict) -> str:
    return f"{cell['algorithm']}/{_defense(cell)} {_view(cell)} r{cell['round']}"


def _final(results: dict) -> list[dict]:
    """Cells of each training's final round (other rounds feed the over-rounds plots)."""
    last = {_key(t): len(t["rounds"]) for t in results["trainings"] if t.get("rounds")}
    for c in results["cells"]:  # results without round history: the latest round attacked
        if _key(c) not in last or c["round"] > last[_key(c)]:
            last[_key(c)] = c["round"]
    return [c for c in results["cells"] if c["round"] == last[_key(c)]]


def _mean_range(values: list[float | None]) -> str:
    values = [v for v in values if _number(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} [{fmt(min(values))}-{fmt(max(values))}]"


def _best(cells: list[dict], metric: str) -> tuple[float | None, dict | None]:
    """The largest value of a metric over cells, and the cell it comes from."""
    scored = [(c["metrics"][metric], c) for c in cells if _number(c["metrics"].get(metric))]
    if not scored:
        return None, None
    return max(scored, key=lambda x: x[0])


def _by(cells: list[dict], name: str) -> dict[str, list[dict]]:
    """Cells grouped by one field (attack, scenario), in the order they first appear."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c[name], []).append(c)
    return groups


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def _epsilon(privacy: dict | None) -> str:
    """The accountant's epsilon: record-level (DP-SGD, worst client) and/or user-level (DP-FedAvg)."""
    if not privacy:
        return "n/a"
    parts = []
    if "record_level_epsilon" in privacy:
        parts.append(f"record {fmt(privacy['record_level_epsilon'], 2)} (delta {privacy['record_level_delta']:g})")
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
        if _number(privacy.get(f"{level}_level_epsilon")):
            parts.append(f"ε={privacy[f'{level}_level_epsilon']:.2f} ({level})")
    return ", ".join(parts)


def _worst_auc(cells: list[dict]) -> tuple[float | None, str]:
    """Worst case over membership attacks and views (all clients) at the final round: the largest AUC."""
    value, cell = _best([c for c in cells if c["family"] == "membership"], "auc")
    return value, (f"{cell['attack']}, {_view(cell)}" if cell else "")


# ------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class Headline:
    """The number that says how much an attack got: its metric, a label, and the colour range from no
    leakage to the most (None: the row's own range)."""

    metric: str
    label: str
    scale: tuple[float, float] | None = None
    digits: int = 2


EXTRACTION_HEADLINES = {
    "discoverable": Headline("exact_rate", "exact-match rate", (0.0, 1.0)),
    "pii": Headline("own_fraction", "own identifiers leaked", (0.0, 1.0)),
    "exposure": Headline("exposure_max", "max exposure (bits)", None, digits=1),
    "generate_rank": Headline("hit_rate", "samples with private text", (0.0, 1.0)),
}


@dataclass
class HeadlineRow:
    label: str
    values: dict[tuple[str, str], float | None]  # (algorithm, defense) -> value
    scale: tuple[float, float] | None  # colour range; None: the row's own range
    digits: int = 2


def headline(cells: list[dict]) -> Headline:
    """The headline of one attack's (or poisoning scenario's) cells."""
    family, name = cells[0]["family"], cells[0].get("attack_name", cells[0]["attack"])
    if family == "membership":
        return Headline("auc", "AUC (worst view)", (CHANCE_AUC, 1.0))
    if family == "poisoning":  # targeted attacks have an ASR; untargeted ones are judged by the damage
        if any("asr" in c["metrics"] for c in cells):
            return Headline("asr", "ASR", (0.0, 1.0))
        return Headline("loss_increase", "held-out loss increase")
    if name in EXTRACTION_HEADLINES:
        return EXTRACTION_HEADLINES[name]
    first = next((m for c in cells for m in c["metrics"] if not _is_interval_key(m, c["metrics"])), "n/a")
    return Headline(first, first)  # a plug-in attack: its first metric


def headline_rows(results: dict) -> list[HeadlineRow]:
    """The summary heatmap's rows: each privacy attack's headline on the clean trainings (worst case over
    views and clients), each poisoning scenario's on its own trainings."""
    final = merged(results).final
    privacy = [c for c in final if c["family"] != "poisoning" and c.get("scenario", CLEAN) == CLEAN]
    poisoning = [c for c in final if c["family"] == "poisoning"]
    groups = [*_by(privacy, "attack").items(),
              *((f"{scenario} scenario", cells) for scenario, cells in _by(poisoning, "scenario").items())]
    rows = []
    for title, cells in groups:
        head = headline(cells)
        values: dict[tuple[str, str], float | None] = {}
        for pair in dict.fromkeys(_pair(c) for c in cells):
            values[pair], _ = _best([c for c in cells if _pair(c) == pair], head.metric)
        rows.append(HeadlineRow(f"{title}: {head.label}", values, head.scale, head.digits))
    return rows


def headline_columns(results: dict, rows: list[HeadlineRow]) -> list[tuple[str, str]]:
    """(algorithm, defense) pairs with a value in some row, in the order the run trained them."""
    order = [_pair(t) for t in results["trainings"]] + [p for r in rows for p in r.values]
    present = {p for r in rows for p, v in r.values.items() if v is not None}
    return [p for p in dict.fromkeys(order) if p in present]


def headline_table(columns: list[tuple[str, str]], rows: list[HeadlineRow]) -> Table:
    return Table(["attack: headline", *[f"{a}/{d}" for a, d in columns]],
                 [[r.label, *[fmt(r.values.get(p), r.digits) for p in columns]] for r in rows])


def _shade(row: HeadlineRow, columns: list[tuple[str, str]]) -> list[float]:
    """Each value's place in its row's colour range, 0 (no leakage) to 1; NaN where missing."""
    values = [r if _number(r := row.values.get(p)) else math.nan for p in columns]
    finite = [v for v in values if not math.isnan(v)]
    low, high = row.scale or (min([0.0, *finite]), max([0.0, *finite]))
    span = (high - low) or 1.0
    return [min(max((v - low) / span, 0.0), 1.0) if not math.isnan(v) else math.nan for v in values]


def heatmap_png(columns: list[tuple[str, str]], rows: list[HeadlineRow]) -> bytes:
    import matplotlib

    fig, ax = _axes(max(7.0, 2.5 + 0.85 * len(columns)), max(2.5, 1.6 + 0.38 * len(rows)))
    shades = np.ma.masked_invalid(np.array([_shade(r, columns) for r in rows], dtype=float))
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#e3e3e3")  # missing: grey, blank
    ax.imshow(shades, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(rows):
        for j, pair in enumerate(columns):
            if _number(row.values.get(pair)):
                ax.text(j, i, fmt(row.values[pair], row.digits), ha="center", va="center", fontsize=7,
                        color="white" if shades[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([_wrap(f"{a}/{d}") for a, d in columns], rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_wrap(r.label, 48) for r in rows], fontsize=7)
    ax.set_title("Headline leakage: attack (row) against algorithm/defense (column)", fontsize=8)
    return _png(fig, ax, legend=False)


def _wrap(text: str, width: int = 26) -> str:
    """Long labels (an algorithm with its parameters) over several lines; commas are break points."""
    lines = textwrap.wrap(text.replace(",", ", "), width, break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines) or text


HEATMAP_CAPTION = ("Summary: each attack's headline number. Membership rows: the largest AUC over views and "
                   "clients at the final round, on the clean trainings; extraction rows: exact-match rate "
                   "(discoverable), share of own identifiers leaked (pii), largest canary exposure in bits "
                   "(exposure), share of sampled generations with private text (generate_rank), worst view; "
                   "poisoning rows: the scenario's trainings, attack success rate for a backdoor, else the increase "
                   "of the global model's held-out loss. Colour runs within each row from no leakage (white: AUC "
                   "0.5, rate 0) to the most (AUC 1, rate 1; exposure and loss: the row's largest); grey: not "
                   "measured.")


def summary_section(results: dict, *, show_secrets: bool) -> Section:
    rows = headline_rows(results)
    columns = headline_columns(results, rows)
    blocks: list = []
    if rows and columns:
        blocks += [Figure("summary-heatmap", HEATMAP_CAPTION, heatmap_png(columns, rows)),
                   headline_table(columns, rows)]
    blocks.append(SHOWN_NOTE if show_secrets else REDACTED_NOTE)
    seeds = run_seeds(results)
    if len(seeds) > 1:
        blocks.append(SEEDS_NOTE.format(n=len(seeds), seeds=", ".join(map(str, seeds))))
    blocks += [INTRO, leakage_table(results), utility_table(results),
               "Utility on held-out records: mean response-token loss, perplexity, and ROUGE-L F1 of greedy answers; "
               "`client` columns average the clients' final models."]
    return Section("Summary", blocks)


def leakage_table(results: dict) -> Table:
    """One row per training: the strongest membership attack per observer (mean over clients), the
    audit bounds next to the accountant's epsilon, and headline extraction numbers."""
    m = merged(results)
    cells = [c for c in m.final if c["family"] != "poisoning"]
    rows = []
    for training in m.trainings:
        mine = [c for c in cells if _key(c) == _key(training)]
        if not mine:
            continue  # no privacy attack probed it (a poisoned training: the poisoning section covers it)
        membership = [c for c in mine if c["family"] == "membership"]
        row = [training["algorithm"], _defense(training)]
        for observer in OBSERVER_ORDER:
            per_attack: dict[str, list[float]] = {}
            for c in membership:
                if c["observer"] == observer and _number(c["metrics"].get("auc")):
                    per_attack.setdefault(c["attack"], []).append(c["metrics"]["auc"])
            if per_attack:
                attack, aucs = max(per_attack.items(), key=lambda kv: np.mean(kv[1]))
                row.append(f"{_mean_range(aucs)} ({attack})")
            else:
                row.append("n/a")
        eps_global, global_cell = _best([c for c in membership if c["observer"] == "global"], "epsilon_lb")
        eps, eps_cell = _best(membership, "epsilon_lb")
        one_run, _ = _best(membership, "one_run_epsilon_lb")
        row += [f"{fmt(eps_global, 2)} ({global_cell['attack']})" if global_cell else "n/a",
                f"{fmt(eps, 2)} ({eps_cell['attack']})" if eps_cell else "n/a", fmt(one_run, 2),
                _epsilon(training.get("privacy"))]
        extraction = {c["attack_name"]: c for c in mine if c["family"] == "extraction" and c["observer"] == "global"}
        row += [_metric(extraction["discoverable"], "exact_rate") if "discoverable" in extraction else "n/a",
                _metric(extraction["pii"], "own_fraction") if "pii" in extraction else "n/a",
                _metric(extraction["exposure"], "exposure_max", 1) if "exposure" in extraction else "n/a"]
        rows.append(row)
    return Table(["algorithm", "defense", *[f"best AUC {o}" for o in OBSERVER_ORDER], "empirical eps global",
                  "empirical eps (max over views)",
                  "one-run eps (max)", "epsilon (accountant)", "discoverable exact (global)",
                  "PII own (global)", "max exposure (global)"], rows)


def _base_utility(results: dict) -> dict | None:
    """The base model's utility: the mean over seeds when each seed has its own held-out records."""
    per_seed = list((results.get("base_utility_per_seed") or {}).values())
    if len(per_seed) > 1:
        return {k: float(np.mean([u[k] for u in per_seed if _number(u.get(k))]))
                for k in ("loss", "perplexity", "rouge_l") if any(_number(u.get(k)) for u in per_seed)}
    return results.get("base_utility")


def _mean_of(items: list[dict], value_of: Callable[[dict], float | None]) -> float | None:
    values = [v for v in map(value_of, items) if _number(v)]
    return float(np.mean(values)) if values else None


def _train_seconds(training: dict) -> float | None:
    return (training.get("cost") or {}).get("train_seconds", training.get("train_seconds"))


def utility_table(results: dict) -> Table:
    base = _base_utility(results)
    rows = [["base model", "(no adapter)", fmt(base.get("loss")), fmt(base.get("perplexity")),
             fmt(base.get("rouge_l")), "n/a", "n/a", "n/a", "n/a", "n/a"]] if base else []
    for t in merged(results).trainings:
        if t.get("scenario", CLEAN) != CLEAN:
            continue  # poisoned trainings' utility: the poisoning section
        rows.append([t["algorithm"], t["defense"],
                     *[_utility(t, view, name) for view in ("global", "client_mean")
                       for name in ("loss", "perplexity", "rouge_l")],
                     _epsilon(t.get("privacy")), fmt(_mean_of(t["per_seed"], _train_seconds), 1)])
    return Table(["algorithm", "defense", "global loss", "global ppl", "global ROUGE-L", "client loss",
                  "client ppl", "client ROUGE-L", "epsilon (accountant)", "train s"], rows)


# ---------------------------------------------------------------------------------- defense ranking


DEFENSES_INTRO = (
    "What each defense buys against the same algorithm without defense (`none`), clean trainings, final round. "
    "Leakage: the worst-case membership AUC (largest over attacks, views and clients); its reduction is the drop "
    "of that AUC's excess over chance (0.5), with the share of the excess removed. Rows are ranked within each "
    "algorithm by that reduction, largest first; rows without a measured reduction come last. Extraction "
    "columns: each attack's headline on its worst view, with the change against `none`; utility cost: change of "
    "the global model's held-out loss (+ is worse) and ROUGE-L (- is worse); poisoning columns: the defense's "
    "headline under each scenario (ASR for a backdoor). With several seeds the numbers are means and the changes "
    "differences of means. n/a: not measured.")


@dataclass
class DefenseRow:
    algorithm: str
    defense: str
    worst_auc: float | None
    worst_where: str
    reduction: float | None  # drop of the worst-case AUC against `none` (positive: less leakage)
    share: float | None  # reduction / the baseline's excess over chance
    cells: list[str]  # the rendered row


def defense_rows(results: dict) -> list[DefenseRow]:
    m = merged(results)
    privacy = [c for c in m.final if c["family"] != "poisoning" and c.get("scenario", CLEAN) == CLEAN]
    poisoning = [c for c in m.final if c["family"] == "poisoning"]
    clean = {_pair(t): t for t in m.trainings if t.get("scenario", CLEAN) == CLEAN}
    pairs = list(dict.fromkeys([*clean, *map(_pair, privacy), *map(_pair, poisoning)]))
    extraction = _by([c for c in privacy if c["family"] == "extraction"], "attack")
    scenarios = _by(poisoning, "scenario")
    worst = {p: _worst_auc([c for c in privacy if _pair(c) == p]) for p in pairs}
    rows = []
    for pair in pairs:
        base = (pair[0], NO_DEFENSE)
        auc, where = worst[pair]
        base_auc = worst.get(base, (None, ""))[0]
        reduction = base_auc - auc if _number(auc) and _number(base_auc) and pair != base else None
        share = reduction / (base_auc - CHANCE_AUC) if reduction is not None and base_auc > CHANCE_AUC else None
        if pair == base:
            change = "baseline" if _number(auc) else "n/a"
        else:
            change = _signed(reduction) + (f" ({fmt(share * 100, 0)}%)" if share is not None else "")
        cells = [pair[0], pair[1], f"{fmt(auc)} ({where})" if _number(auc) else "n/a", change]
        for attack_cells in extraction.values():
            metric = headline(attack_cells).metric
            value, _ = _best([c for c in attack_cells if _pair(c) == pair], metric)
            base_value, _ = _best([c for c in attack_cells if _pair(c) == base], metric)
            delta = value - base_value if _number(value) and _number(base_value) and pair != base else None
            cells.append(fmt(value) + (f" ({_signed(delta)})" if delta is not None else ""))
        training, base_training = clean.get(pair), clean.get(base)
        for name in ("loss", "rouge_l"):
            value = _global(training, name)
            base_value = _global(base_training, name)
            cells.append(_signed(value - base_value) if _number(value) and _number(base_value) and pair != base
                         else ("baseline" if pair == base and _number(value) else "n/a"))
        cells.append(_epsilon(training.get("privacy")) if training else "n/a")
        for scenario_cells in scenarios.values():
            metric = headline(scenario_cells).metric
            cells.append(fmt(_best([c for c in scenario_cells if _pair(c) == pair], metric)[0]))
        rows.append(DefenseRow(pair[0], pair[1], auc, where, reduction, share, cells))
    order = list(dict.fromkeys(r.algorithm for r in rows))
    # Within an algorithm: the baseline's "reduction" is 0, so it sits between defenses that help and hurt.
    effective = lambda r: 0.0 if (r.defense == NO_DEFENSE and _number(r.worst_auc)) else r.reduction
    return sorted(rows, key=lambda r: (order.index(r.algorithm), effective(r) is None, -(effective(r) or 0.0)))


def _global(training: dict | None, name: str) -> float | None:
    return ((training or {}).get("utility", {}).get("global") or {}).get(name)


def defense_table(results: dict) -> Table:
    m = merged(results)
    privacy = [c for c in m.final if c["family"] != "poisoning" and c.get("scenario", CLEAN) == CLEAN]
    poisoning = [c for c in m.final if c["family"] == "poisoning"]
    extraction = _by([c for c in privacy if c["family"] == "extraction"], "attack")
    header = ["algorithm", "defense", "worst-case AUC (attack, view)", "AUC excess removed (share)"]
    header += [f"{attack}: {headline(cells).label} (change)" for attack, cells in extraction.items()]
    header += ["global loss change", "global ROUGE-L change", "epsilon (accountant)"]
    header += [f"{scenario} scenario: {headline(cells).label}"
               for scenario, cells in _by(poisoning, "scenario").items()]
    return Table(header, [r.cells for r in defense_rows(results)])


@dataclass
class FrontierPoint:
    pair: tuple[str, str]  # (algorithm, defense)
    label: str
    auc: float  # worst-case membership AUC
    loss: float  # global held-out loss


def frontier_points(results: dict) -> list[FrontierPoint]:
    """One point per clean training that has both a membership AUC and a global held-out loss."""
    m = merged(results)
    privacy = [c for c in m.final if c["family"] == "membership" and c.get("scenario", CLEAN) == CLEAN]
    points = []
    for t in m.trainings:
        if t.get("scenario", CLEAN) != CLEAN:
            continue
        auc, _ = _worst_auc([c for c in privacy if _pair(c) == _pair(t)])
        loss = _global(t, "loss")
        if _number(auc) and _number(loss):
            level = privacy_level(t) if t.get("privacy") else ""
            name = t.get("algorithm_name", t["algorithm"])  # FEDPIT's label with its parameters is long
            defense = t.get("defense_name", t["defense"]) if level else t["defense"]
            points.append(FrontierPoint(_pair(t), f"{name}/{defense}" + (f" ({level})" if level else ""), auc, loss))
    return points


def pareto_front(points: list[FrontierPoint]) -> list[int]:
    """Indices of the points no other point beats on both leakage and loss (lower is better), by AUC."""
    order = sorted(range(len(points)), key=lambda i: (points[i].auc, points[i].loss))
    front, best_loss = [], math.inf
    for i in order:
        if points[i].loss < best_loss:
            front.append(i)
            best_loss = points[i].loss
    return front


def frontier_png(points: list[FrontierPoint], base_loss: float | None) -> bytes:
    fig, ax = _axes(8.0, 4.6)
    front = pareto_front(points)
    # Points carry numbers and the legend their labels: long labels next to close points would overlap.
    for i, p in enumerate(points):
        ax.scatter([p.auc], [p.loss], s=28, marker="o" if i in front else "x", color="C3" if i in front else "C0",
                   zorder=3, label=f"{i + 1}: {p.label}")
        ax.annotate(str(i + 1), (p.auc, p.loss), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.plot([points[i].auc for i in front], [points[i].loss for i in front], color="C3", linewidth=1.2,
            drawstyle="steps-post", label="Pareto frontier")
    if _number(base_loss):
        ax.axhline(base_loss, color="grey", linestyle=":", linewidth=1, label="base model (no adapter)")
    ax.axvline(CHANCE_AUC, color="grey", linestyle="--", linewidth=1, label="chance AUC")
    ax.set(xlabel="worst-case membership AUC (leakage)", ylabel="global held-out loss (lower is better)",
           title="Privacy-utility frontier")
    return _png(fig, ax)


def defenses_section(results: dict) -> Section | None:
    table = defense_table(results)
    if not table.rows:
        return None
    blocks: list = [DEFENSES_INTRO, table]
    points = frontier_points(results)
    if points:
        shown = {p.pair for p in points}
        left_out = [f"{t['algorithm']}/{t['defense']}" for t in merged(results).trainings
                    if t.get("scenario", CLEAN) == CLEAN and _pair(t) not in shown]
        caption = ("Privacy-utility frontier: one point per algorithm and defense (clean training), the worst-case "
                   "membership AUC against the global model's held-out loss, numbered as in the legend; DP defenses "
                   "are labelled with their noise setting and the accountant's epsilon. Circles joined by the line: "
                   "the Pareto frontier (no other point has both less leakage and lower loss).")
        if left_out:
            caption += f" Without a global loss or a membership AUC, not shown: {', '.join(left_out)}."
        blocks.append(Figure("privacy-utility-frontier", caption,
                             frontier_png(points, (_base_utility(results) or {}).get("loss"))))
    return Section("Which defense buys what", blocks)


# --------------------------------------------------------------------------------------------- DP


DP_INTRO = (
    "Differential privacy: the accountant's epsilon (an upper bound, at its delta) beside the empirical lower "
    "bounds the membership attacks give (final round, largest over attacks). The record-level guarantee (DP-SGD) "
    "covers every view; the user-level one (DP-FedAvg) the global model only. `audit`: whether every lower bound "
    "on a covered view stays at or below the accountant's epsilon, as it must.")


def _covered(cells: list[dict], privacy: dict) -> list[dict]:
    return cells if _number(privacy.get("record_level_epsilon")) else [c for c in cells if c["observer"] == "global"]


def _guarantee(privacy: dict) -> float | None:
    """The epsilon the covered views are held to (record-level when both apply: it covers every view)."""
    for name in ("record_level_epsilon", "user_level_epsilon"):
        if _number(privacy.get(name)):
            return privacy[name]
    return None


def dp_rows(results: dict) -> list[tuple[dict, float | None, float | None, float | None]]:
    """(training, accountant epsilon, largest empirical bound and largest one-run bound on covered views)."""
    m = merged(results)
    membership = [c for c in m.final if c["family"] == "membership"]
    out = []
    for t in m.trainings:
        mine = [c for c in membership if _key(c) == _key(t)]
        if not t.get("privacy") or (t.get("scenario", CLEAN) != CLEAN and not mine):
            continue  # a poisoned DP training without privacy attacks: the poisoning section has it
        covered = _covered(mine, t["privacy"])
        bound, one_run = _best(covered, "epsilon_lb")[0], _best(covered, "one_run_epsilon_lb")[0]
        out.append((t, _guarantee(t["privacy"]), bound, one_run))
    return out


def dp_table(results: dict) -> Table:
    membership = [c for c in merged(results).final if c["family"] == "membership"]
    rows = []
    for t, guarantee, bound, one_run in dp_rows(results):
        mine = [c for c in membership if _key(c) == _key(t)]
        privacy = t["privacy"]
        global_bound, global_cell = _best([c for c in mine if c["observer"] == "global"], "epsilon_lb")
        any_bound, any_cell = _best(mine, "epsilon_lb")
        bounds = [b for b in (bound, one_run) if _number(b)]
        verdict = ("n/a" if not bounds or guarantee is None else
                   "consistent" if max(bounds) <= guarantee else "lower bound above the accountant: broken DP?")
        rows.append([t["algorithm"], _defense(t), privacy_level(t, epsilon=False) or "n/a",
                     fmt(privacy.get("record_level_epsilon"), 2), fmt(privacy.get("user_level_epsilon"), 2),
                     f"{fmt(global_bound, 2)} ({global_cell['attack']})" if global_cell else "n/a",
                     f"{fmt(any_bound, 2)} ({any_cell['attack']}, {_view(any_cell)})" if any_cell else "n/a",
                     fmt(_best(mine, "one_run_epsilon_lb")[0], 2),
                     "every view" if _number(privacy.get("record_level_epsilon")) else "global", verdict])
    return Table(["algorithm", "defense", "noise setting", "record-level eps (accountant)",
                  "user-level eps (accountant)", "empirical eps global", "empirical eps (max over views)",
                  "one-run eps (max)", "guarantee covers", "audit"], rows)


def dp_bars_png(rows) -> bytes:
    fig, ax = _axes(7.5, 4.2)
    labels = [_wrap(f"{t['algorithm']}/{_defense(t)}", 22) for t, *_ in rows]
    series = (("accountant epsilon", 1), ("empirical lower bound (covered views)", 2), ("one-run lower bound", 3))
    width = 0.8 / len(series)
    for j, (name, index) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        values = [r[index] if _number(r[index]) else 0.0 for r in rows]
        bars = ax.bar(xs, values, width=width, label=name)
        ax.bar_label(bars, labels=[fmt(r[index], 2) for r in rows], fontsize=6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set(ylabel="epsilon", title="Accountant epsilon against the audit's lower bounds")
    return _png(fig, ax)


def dp_section(results: dict) -> Section | None:
    rows = dp_rows(results)
    if not rows:
        return None
    blocks: list = [DP_INTRO, dp_table(results)]
    if any(_number(b) for _, _, b, _ in rows):
        blocks.append(Figure("dp-epsilons", "Accountant epsilon and the empirical lower bounds (largest over "
                             "attacks on the views the guarantee covers; n/a drawn as 0)", dp_bars_png(rows)))
    return Section("Differential privacy: accountant and audit", blocks)


# ------------------------------------------------------------------------------------- membership


def _tpr_columns(cells: list[dict]) -> list[tuple[str, str]]:
    """TPR at each FPR the cells carry (`tpr@0.01fpr` -> TPR@1%FPR), largest FPR first."""
    names = {k for c in cells for k in c["metrics"] if re.fullmatch(r"tpr@[0-9.e-]+fpr", k)}
    fpr = lambda name: float(name[4:-3])
    return [(n, f"TPR@{fpr(n) * 100:g}%FPR") for n in sorted(names, key=fpr, reverse=True)]


def membership_table(results: dict) -> Table:
    cells = [c for c in merged(results).final if c["family"] == "membership"]
    columns = [("auc", "AUC"), *_tpr_columns(cells), *MEMBERSHIP_COLUMNS]
    several = len(run_seeds(results)) > 1
    rows = [[c["algorithm"], _defense(c), c["attack"], c["observer"], fmt(c["client"]), fmt(c["round"]),
             *([str(len(c["seeds"]))] if several else []), *[_metric(c, k) for k, _ in columns],
             fmt(c["n_members"]), fmt(c["n_nonmembers"])] for c in cells]
    return Table(["algorithm", "defense", "attack", "observer", "client", "round", *(["seeds"] if several else []),
                  *[f"{h} [95% CI]" if k == "auc" or several else h for k, h in columns],
                  "members", "non-members"], rows)


def per_seed_table(results: dict) -> Table:
    cells = [c for c in _final(results) if c["family"] == "membership"]
    columns = [("auc", "AUC [95% CI]"), *_tpr_columns(cells), ("epsilon_lb", "empirical eps")]
    rows = [[c["algorithm"], _defense(c), c["attack"], _view(c), fmt(c.get("seed")),
             *[fmt_ci(c["metrics"].get(k), _interval({"metrics": c["metrics"]}, k)) for k, _ in columns]]
            for c in cells]
    return Table(["algorithm", "defense", "attack", "view", "seed", *[h for _, h in columns]], rows)


def roc_plot_png(cells: list[dict], title: str) -> bytes:
    """Log-log ROC curves, one per cell, as LiRA (Carlini et al. 2022) presents them."""
    import matplotlib
    import matplotlib.ticker

    fig, ax = _axes(9.0, 4.8)
    floor = 1e-3
    # One colour per training, one line style per client, legend beside the axes: many curves stay legible.
    trainings = list(dict.fromkeys(_key(c) for c in cells))
    colours = matplotlib.colormaps["tab10" if len(trainings) <= 10 else "tab20"]
    styles = ("-", "--", ":", "-.")
    for cell in cells:
        fpr = [max(f, floor) for f in cell["roc"]["fpr"] if f is not None]
        tpr = [max(t, floor) for t in cell["roc"]["tpr"] if t is not None]
        ax.plot(fpr, tpr, linewidth=1.2, color=colours(trainings.index(_key(cell)) % colours.N),
                linestyle=styles[(cell["client"] or 0) % len(styles)],
                label=f"{_view_label(cell)} (AUC {fmt(cell['metrics'].get('auc'))})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    for axis in (ax.xaxis, ax.yaxis):  # 0.001 rather than 10^-3: plainer, and no mathtext to lay out
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return _png(fig, ax)


def membership_section(results: dict) -> Section:
    cells = [c for c in merged(results).final if c["family"] == "membership" and c.get("roc")]
    several = len(run_seeds(results)) > 1
    blocks: list = [membership_table(results)]
    if several:
        blocks += ["Each seed's own numbers (final round; AUC intervals: bootstrap within the seed):",
                   per_seed_table(results)]
    for attack in dict.fromkeys(c["attack"] for c in cells):
        for observer in OBSERVER_ORDER:
            mine = [c for c in cells if c["attack"] == attack and c["observer"] == observer]
            if mine:
                blocks.append(Figure(_slug(f"roc-{attack}-{observer}"), f"ROC of {attack} on the {observer} view "
                                     f"(log-log{', first seed' if several else ''})",
                                     roc_plot_png(mine, f"{attack}: {observer} view")))
    return Section("Membership inference", blocks)


# ---------------------------------------------------------------------------------------- rounds


def rounds_lines(cells: list[dict]) -> dict[str, dict[int, list[float]]]:
    """AUC per round for each training (label algorithm/defense): every client's and seed's value, so
    the algorithms sit side by side in one plot (the FEDPIT paper's comparison)."""
    lines: dict[str, dict[int, list[float]]] = {}
    for c in cells:
        values = [s["metrics"]["auc"] for s in c.get("per_seed", [c]) if _number(s["metrics"].get("auc"))]
        if values:
            lines.setdefault(f"{c['algorithm']}/{_defense(c)}", {}).setdefault(c["round"], []).extend(values)
    return lines


def rounds_plot_png(cells: list[dict], title: str) -> bytes:
    """AUC over rounds, one line per training: the mean over clients and seeds, their range as a band."""
    fig, ax = _axes(7.5, 4.2)
    for label, by_round in rounds_lines(cells).items():
        rounds = sorted(by_round)
        line, = ax.plot(rounds, [np.mean(by_round[r]) for r in rounds], marker=".", linewidth=1.2, label=label)
        if any(len(by_round[r]) > 1 for r in rounds):
            ax.fill_between(rounds, [min(by_round[r]) for r in rounds], [max(by_round[r]) for r in rounds],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(CHANCE_AUC, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="round (0 = before training)", ylabel="AUC", title=title)
    return _png(fig, ax)


def rounds_section(results: dict) -> Section | None:
    membership = [c for c in merged(results).cells if c["family"] == "membership"]
    figures = []
    for attack in dict.fromkeys(c["attack"] for c in membership):
        for observer in OBSERVER_ORDER:
            cells = [c for c in membership if c["attack"] == attack and c["observer"] == observer]
            if len({c["round"] for c in cells}) > 1:
                figures.append(Figure(_slug(f"rounds-{attack}-{observer}"), f"AUC of {attack} on the {observer} "
                                      "view over rounds, every algorithm and defense attacked per round in one plot "
                                      "(line: mean over clients and seeds; band: their range)",
                                      rounds_plot_png(cells, f"{attack}: {observer} view")))
    return Section("Leakage over rounds", figures) if figures else None


# ------------------------------------------------------------------------------------ extraction


def extraction_examples(cell: dict, redact: Callable[[str], str]) -> list[tuple[str, str]]:
    """(what, model output) pairs from an extraction cell's details, identifiers redacted."""
    d = cell.get("details") or {}
    out = []
    for e in d.get("examples", [])[:EXAMPLES_PER_KIND]:
        what = "exact reproduction" if e.get("exact") else f"near-verbatim answer (ROUGE-L {fmt(e.get('rouge'), 2)})"
        out.append((f"{what} of {redact(str(e.get('record_id')))}", redact(str(e.get("generated", "")))))
    for e in d.get("prefix_suffix_examples", [])[:EXAMPLES_PER_KIND]:
        out.append((f"suffix of {redact(str(e.get('record_id')))} after its prefix", redact(str(e.get("suffix", "")))))
    for kind in ("own", "cross"):
        for e in d.get(f"{kind}_examples", [])[:EXAMPLES_PER_KIND]:
            out.append((f"{kind} {e.get('type')} {redact(str(e.get('identifier')))} leaked",
                        redact(str(e.get("output", "")))))
    hits = {h["text"]: h for ranking in (d.get("top") or {}).values() for h in ranking if h.get("hit")}
    for text, h in list(hits.items())[:EXAMPLES_PER_KIND]:
        out.append((f"sampled generation with private text: {redact(str(h.get('why', '')))}", redact(text)))
    return out


def exposure_plot_png(cells: list[dict]) -> bytes:
    fig, ax = _axes(7.5, 4.2)
    ticks: set[int] = set()
    for cell in cells:
        by_reps: dict[int, list[float]] = {}
        for canary in cell["details"]["canaries"] + cell["details"].get("reference_canaries", []):
            if _number(canary.get("exposure")):
                by_reps.setdefault(int(canary["repetitions"]), []).append(canary["exposure"])
        reps = sorted(by_reps)
        ticks.update(reps)
        ax.plot(reps, [np.mean(by_reps[r]) for r in reps], marker="o", linewidth=1.2,
                label=f"{cell['algorithm']}/{_defense(cell)} {_view(cell)}")
    ax.set(xscale="symlog", xlabel="repetitions of the canary in training data (0: never inserted)",
           ylabel="exposure (bits)", xticks=sorted(ticks), xticklabels=[str(t) for t in sorted(ticks)],
           title="Canary exposure")
    return _png(fig, ax)


def extraction_section(results: dict, redact: Callable[[str], str]) -> Section | None:
    cells = [c for c in merged(results).final if c["family"] == "extraction"]
    if not cells:
        return None
    section = Section("Training-data extraction", [
        "Extraction attacks against each view's own training data (for `upload` and `client` views, that client's "
        "records). `discoverable`: greedy answers to the training prompts that reproduce the private response "
        "exactly or at ROUGE-L of at least tau, and the prefix/suffix protocol; `pii`: private identifiers that "
        "appear verbatim in answers to prompts that do not contain them; `exposure`: log2(candidates) - log2(rank) "
        "of each canary's secret; `generate_rank`: precision at k of sampled generations ranked by perplexity, "
        "zlib and reference ratios."])
    for attack in dict.fromkeys(c["attack"] for c in cells):
        mine = [c for c in cells if c["attack"] == attack]
        metrics = list(dict.fromkeys(m for c in mine for m in c["metrics"] if not _is_interval_key(m, c["metrics"])))
        section.blocks.append(Table(
            ["algorithm", "defense", "attack", "view", *metrics],
            [[c["algorithm"], _defense(c), c["attack"], _view(c), *[_metric(c, m) for m in metrics]] for c in mine]))
        notes = sorted({c["details"].get("note") for c in mine if (c.get("details") or {}).get("note")})
        section.blocks += [f"{attack}: {note}" for note in notes]
    examples = [[c["algorithm"], _defense(c), c["attack"], _view(c), what, text]
                for c in cells for what, text in extraction_examples(c, redact)]
    if examples:
        section.blocks += ["What the attacks got out (model outputs, up to two per attack, view and kind"
                           f"{', first seed' if len(run_seeds(results)) > 1 else ''}):",
                           Table(["algorithm", "defense", "attack", "view", "what", "model output"], examples)]
    exposure = [c for c in cells if c.get("attack_name") == "exposure" and (c.get("details") or {}).get("canaries")]
    if exposure:
        section.blocks.append(Figure("exposure-vs-repetitions", "Canary exposure against repetition count "
                                     "(0 = reference canaries never inserted)", exposure_plot_png(exposure)))
    return section


# ------------------------------------------------------------------------------------- poisoning


POISONING_INTRO = (
    "Poisoning scenarios: malicious clients (chosen with the run's seed) poison the data behind their upload "
    "(`backdoor`, `label_flip`) and/or the upload itself (`scaling`, `sign_flip`, `gaussian`, `alie`, `ipm`). "
    "ASR: share of held-out prompts carrying the trigger whose greedy answer from the global model contains the "
    "attacker's target; false trigger: the same prompts without the trigger; clean-model ASR: the triggered "
    "prompts on the clean training of the same algorithm and defense (the rate without poisoning). Target "
    "recall: the share of the target's words an answer contains in order, averaged over the triggered prompts, "
    "the same prompts without trigger, and the triggered prompts on the clean model (a graded signal where "
    "the whole target is not yet emitted). Loss and "
    "ROUGE-L are the global model's on held-out records, with their change against that clean training "
    "(loss up and ROUGE-L down = damage). Detection and false exclusion (selecting rules only: Krum, "
    "Multi-Krum, Bulyan): the share of malicious and of honest uploads the rule left out, over all rounds.")


def poisoning_table(results: dict) -> Table:
    cells = [c for c in merged(results).cells if c["family"] == "poisoning"]
    rows = []
    for c in cells:
        m, details = c["metrics"], c.get("details") or {}
        rouge_change = -m["rouge_l_drop"] if _number(m.get("rouge_l_drop")) else None
        rows.append([c["algorithm"], c["defense"], c["scenario"], " + ".join(details.get("attacks", [])),
                     ", ".join(str(i) for i in details.get("malicious_clients", [])),
                     _metric(c, "asr"), _metric(c, "false_trigger_rate"), _metric(c, "clean_model_asr"),
                     " / ".join(_metric(c, k) for k in ("target_recall", "target_recall_untriggered",
                                                         "clean_model_target_recall")),
                     f"{_metric(c, 'loss')} ({_signed(m.get('loss_increase'))})",
                     f"{_metric(c, 'rouge_l')} ({_signed(rouge_change)})",
                     _metric(c, "detection_rate"), _metric(c, "false_exclusion_rate")])
    return Table(["algorithm", "defense", "scenario", "attacks", "malicious clients", "ASR", "false trigger",
                  "clean-model ASR", "target recall: trigger / none / clean model", "global loss (change)",
                  "global ROUGE-L (change)", "detection", "false exclusion"], rows)


def poisoning_bars_png(cells: list[dict], metric: str, ylabel: str, title: str, *, baseline: str | None = None) -> bytes:
    """Grouped bars: one group per defense, one bar per scenario (and the clean baseline as a marker)."""
    fig, ax = _axes(7.5, 4.2)
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    scenarios = list(dict.fromkeys(f"{c['algorithm']} {c['scenario']}" for c in cells))
    width = 0.8 / max(len(scenarios), 1)
    for j, scenario in enumerate(scenarios):
        mine = {c["defense"]: c for c in cells if f"{c['algorithm']} {c['scenario']}" == scenario}
        xs = [i + (j - (len(scenarios) - 1) / 2) * width for i, d in enumerate(defenses) if d in mine]
        ax.bar(xs, [mine[d]["metrics"].get(metric) or 0.0 for d in defenses if d in mine], width=width, label=scenario)
        if baseline:
            ax.plot(xs, [mine[d]["metrics"].get(baseline) or 0.0 for d in defenses if d in mine], linestyle="none",
                    marker="_", markersize=14, color="black", label="clean model" if j == 0 else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xticks=range(len(defenses)), ylabel=ylabel, title=title)
    ax.set_xticklabels(defenses, rotation=20, ha="right", fontsize=7)
    return _png(fig, ax)


def detection_plot_png(cells: list[dict]) -> bytes:
    fig, ax = _axes(7.5, 4.2)
    for c in cells:
        rows = [r for r in c["details"]["detection_rounds"] if r["detection_rate"] is not None]
        ax.plot([r["round"] for r in rows], [r["detection_rate"] for r in rows], marker="o", linewidth=1.2,
                label=f"{c['algorithm']}/{c['defense']} [{c['scenario']}] detection")
        rows = [r for r in c["details"]["detection_rounds"] if r["false_exclusion_rate"] is not None]
        ax.plot([r["round"] for r in rows], [r["false_exclusion_rate"] for r in rows], marker="x", linestyle=":",
                linewidth=1.0, label=f"{c['algorithm']}/{c['defense']} [{c['scenario']}] false exclusion")
    ax.set(xlabel="round", ylabel="share of uploads excluded", ylim=(-0.05, 1.05),
           title="Malicious (detection) and honest (false exclusion) uploads excluded")
    return _png(fig, ax)


def poisoning_section(results: dict, redact: Callable[[str], str]) -> Section | None:
    cells = [c for c in merged(results).cells if c["family"] == "poisoning"]
    if not cells:
        return None
    section = Section("Poisoning", [POISONING_INTRO, poisoning_table(results)])
    backdoor = [c for c in cells if _number(c["metrics"].get("asr"))]
    if backdoor:
        section.blocks.append(Figure("poisoning-asr", "Backdoor attack success rate by defense (black: the clean "
                                     "model's rate on the same triggered prompts)",
                                     poisoning_bars_png(backdoor, "asr", "attack success rate", "Backdoor ASR",
                                                        baseline="clean_model_asr")))
        section.blocks.append(Figure("poisoning-target-recall", "Backdoor target recall by defense: share of the "
                                     "target's words in the triggered answers (black: the clean model's)",
                                     poisoning_bars_png(backdoor, "target_recall", "target recall",
                                                        "Backdoor target recall", baseline="clean_model_target_recall")))
    if any(_number(c["metrics"].get("rouge_l_drop")) for c in cells):
        section.blocks.append(Figure("poisoning-utility", "Drop of the global model's ROUGE-L against the clean "
                                     "training of the same defense",
                                     poisoning_bars_png(cells, "rouge_l_drop", "ROUGE-L drop", "Utility drop")))
    detected = [c for c in cells if (c.get("details") or {}).get("detection_rounds")]
    if detected:
        section.blocks.append(Figure("poisoning-detection", "Detection and false exclusion per round (selecting "
                                     "rules)", detection_plot_png(detected)))
    examples = [[c["algorithm"], c["defense"], c["scenario"], redact(str(e.get("prompt", ""))),
                 redact(str(e.get("answer", "")))]
                for c in backdoor for e in (c.get("details") or {}).get("examples", [])[:1]]
    if examples:
        section.blocks += ["Triggered prompts and the global model's answers (first prompt per training):",
                           Table(["algorithm", "defense", "scenario", "triggered prompt", "answer"], examples)]
    return section


# ------------------------------------------------------------------------------------- synthetic


def synthetic_section(results: dict, redact: Callable[[str], str]) -> Section | None:
    with_synthetic = [t for t in results["trainings"] if t.get("synthetic")]
    if not with_synthetic:
        return None
    several = len(run_seeds(results)) > 1
    seed = lambda t: [fmt(t.get("seed"))] if several else []
    counts = ["candidates", "accepted", "near_duplicate", "truncated", "malformed", "length", "empty",
              "response_dropped"]
    section = Section("Self-generated data", [
        "Counts over all clients and rounds: candidates generated by in-context learning, accepted records, "
        "and what each filter dropped.",
        Table(["algorithm", "defense", *(["seed"] if several else []), *counts],
              [[t["algorithm"], _defense(t), *seed(t), *[fmt(t["synthetic"].get(k, 0)) for k in counts]]
               for t in with_synthetic])])
    examples = [[t["algorithm"], _defense(t), *seed(t), redact(str(e.get("instruction", ""))),
                 redact(str(e.get("output", "")))]
                for t in with_synthetic for e in t.get("synthetic_examples", [])]
    if examples:
        section.blocks += ["Examples from the final round:",
                           Table(["algorithm", "defense", *(["seed"] if several else []), "instruction", "response"],
                                 examples)]
    return section


# ----------------------------------------------------------------------------- provenance and cost


def _duration(started: str | None, finished: str | None) -> str:
    try:
        seconds = (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return "n/a"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _machine(machine: dict | None) -> str:
    if not machine:
        return "n/a"
    get = lambda name: fmt(machine.get(name))
    return (f"{get('platform')} ({get('machine')}), python {get('python')}, {get('cpu_count')} CPUs, "
            f"{get('torch_threads')} torch threads, {get('jobs')} parallel jobs")


def provenance_table(results: dict) -> Table:
    model = results.get("model", {})
    rows = [["fedleak", fmt(results.get("fedleak_version"))], ["git commit", fmt(results.get("git_commit"))],
            ["seeds", ", ".join(map(str, run_seeds(results))) or "n/a"], ["config", fmt(results.get("config_path"))],
            ["machine", _machine(results.get("machine"))],
            ["started", fmt(results.get("started_at"))], ["finished", fmt(results.get("finished_at"))],
            ["run wall time", _duration(results.get("started_at"), results.get("finished_at"))],
            ["subset (--only)", ", ".join(results.get("only") or []) or "none: the whole matrix"],
            *([["checkpoints attacked", results["checkpoint_dir"]]] if results.get("checkpoint_dir") else []),
            ["model", f"{model.get('name')} ({model.get('parameters', '?')} parameters)"],
            ["data", json.dumps(results.get("data", {}))]]
    rows += [[name, fmt(version)] for name, version in results.get("versions", {}).items()]
    return Table(["what", "value"], rows)


def _bytes(value) -> str:
    if not _number(value):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "n/a"


def training_cost_table(results: dict) -> Table:
    rows = []
    for t in results["trainings"]:
        cost = t.get("cost") or {}
        rows.append([t["algorithm"], t["defense"], t.get("scenario", CLEAN), fmt(t.get("seed")),
                     fmt(cost.get("wall_seconds"), 1), fmt(_train_seconds(t), 1),
                     _bytes(cost.get("upload_bytes_per_client_per_round")), _bytes(cost.get("upload_bytes_total"))])
    return Table(["algorithm", "defense", "scenario", "seed", "wall s", "train s", "upload per client per round",
                  "upload total"], rows)


def attack_cost_table(results: dict) -> Table:
    """Per attack: cells, and total seconds over them (wall: schema 4's cost; attack: the older timings)."""
    rows = []
    for attack in dict.fromkeys(c["attack"] for c in results["cells"]):
        cells = [c for c in results["cells"] if c["attack"] == attack]
        rows.append([attack, cells[0]["family"], str(len(cells)),
                     _total([(c.get("cost") or {}).get("wall_seconds") for c in cells]),
                     _total([(c.get("timings") or {}).get("attack_seconds") for c in cells])])
    return Table(["attack", "family", "cells", "total wall s", "total attack s"], rows)


def _total(values: list) -> str:
    """A sum that says when some terms are missing instead of passing for the whole."""
    known = [v for v in values if _number(v)]
    if not known:
        return "n/a"
    return fmt(float(sum(known)), 1) + ("" if len(known) == len(values) else f" ({len(known)} of {len(values)} cells)")


def provenance_section(results: dict) -> Section:
    return Section("Provenance and cost", [
        provenance_table(results),
        "Cost per training (wall: training, utility and poisoning evaluation; upload: what each client sends the "
        "server per round, and in all; n/a: not recorded, as in results before schema 4):",
        training_cost_table(results), "Cost per attack, over all its cells (trainings, views, rounds and seeds):",
        attack_cost_table(results)])


# -------------------------------------------------------------------------------------- document


def build_document(results: dict, *, show_secrets: bool = False) -> list[Section]:
    redact = redactor(results, show_secrets=show_secrets)
    sections = [summary_section(results, show_secrets=show_secrets)]
    for optional in (defenses_section(results), dp_section(results)):
        if optional:
            sections.append(optional)
    sections.append(membership_section(results))
    for optional in (rounds_section(results), extraction_section(results, redact), poisoning_section(results, redact),
                     synthetic_section(results, redact)):
        if optional:
            sections.append(optional)
    sections.append(provenance_section(results))
    return sections


def _axes(width: float, height: float):
    """A figure and its axes on the non-interactive backend (reports are written without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def _png(fig, ax, *, legend: bool = True) -> bytes:
    """PNG bytes of the figure, legend beside the axes so many curves stay legible."""
    import matplotlib.pyplot as plt

    if legend:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _md_text(text: str) -> str:
    """Text from the results as Markdown shows it: HTML-escaped, so a renderer that passes raw HTML
    through shows a model's `<script>` as text instead of running it."""
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    lines = ["# fedleak leakage report", ""]
    for section in sections:
        lines += [f"## {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                alt = _md_text(block.caption).replace("[", "(").replace("]", ")").replace("\n", " ")
                lines.append(f"![{alt}](plots/{block.name}.png)")
            else:
                lines.append(_md_text(block))
            lines.append("")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:12px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;min-width:3em}
th{background:#f3f3f3;position:sticky;top:0}figure{display:inline-block;margin:.5em}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;max-width:60em}p{max-width:60em}"""


def _html_text(text: str) -> str:
    """Escape first, then mark up the Markdown `code` spans our own paragraphs use."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(sections: list[Section]) -> str:
    body = []
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode()
                body.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_html_text(block.caption)}</figcaption></figure>")
            else:
                body.append(f"<p>{_html_text(block)}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedleak leakage report</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>fedleak leakage report</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: Path, *, show_secrets: bool = False) -> tuple[Path, Path]:
    """report.md, report.html and plots/ from run_dir/results.json; identifiers redacted unless show_secrets."""
    run_dir = Path(run_dir)
    sections = build_document(load_results(run_dir), show_secrets=show_secrets)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                atomic_write_bytes(run_dir / "plots" / f"{block.name}.png", block.png)
    atomic_write_text(run_dir / "report.md", render_markdown(sections))
    atomic_write_text(run_dir / "report.html", render_html(sections))
    return run_dir / "report.md", run_dir / "report.html"
