"""The report's first section: each attack's headline number against every algorithm and defense (the
heatmap and its table), what redaction covers, how to read the numbers, the leakage table (the strongest
attack per view, the audit bounds beside the accountant's epsilon) and the utility table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedleak.common.names import CHANCE_AUC, CLEAN, OBSERVERS
from fedleak.reports.document import Figure, Section, Table, defense_label, epsilon_text, fmt, is_number, mean_range
from fedleak.reports.merge import (Merged, best, by, is_interval_key, metric_text, pair, train_seconds, training_key,
                                  utility_text)
from fedleak.reports.plots import axes, png, wrap
from fedleak.reports.redact import redaction_note

INTRO = ("Membership inference: higher AUC and TPR at low FPR mean more leakage (0.5 AUC is chance). "
         "With n non-members an FPR below 1/n cannot be measured: such a TPR@x%FPR reads \"not resolvable\" and "
         "the TPR at FPR = 1/n stands beside it. Blind AUC: the same attack on the base model (adapters off), "
         "chance when members and non-members are alike. Observers: "
         "`global` is the aggregated adapter (server and every client), `upload` a client's upload (a curious "
         "server), `client` a client's final model (the client itself); for `upload` and `client` the members "
         "are that client's records, and on every view the non-members are held-out records in the same number per "
         "category. Tables show the final round unless they say otherwise; AUC intervals are "
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
HEATMAP_CAPTION = ("Summary: each attack's headline number. Membership rows: the largest AUC over views and "
                   "clients at the final round, on the clean trainings; extraction rows: exact-match rate "
                   "(discoverable), share of own identifiers leaked (pii), largest canary exposure in bits "
                   "(exposure), share of sampled generations with private text (generate_rank), worst view; "
                   "poisoning rows: the scenario's trainings, attack success rate for a backdoor (in the table with its "
                   "Clopper-Pearson interval; the poisoning section says which differences the intervals "
                   "resolve), the drop of the refusal rate on held-out harmful requests against the clean training for a "
                   "safety attack, else the increase of the global model's held-out loss. Colour runs within each row from no leakage (white: AUC "
                   "0.5, rate 0) to the most (AUC 1, rate 1; exposure and loss: the row's largest); grey: not "
                   "measured.")


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
    "adversarial_prompt": Headline("secret_rate_with", "others' secrets written with the suffix", (0.0, 1.0)),
    "adversarial_trigger": Headline("target_rate_with", "target written with the suffix, no trigger", (0.0, 1.0)),
}


@dataclass
class HeadlineRow:
    """One heatmap row: an attack's headline per (algorithm, defense)."""

    label: str
    values: dict[tuple[str, str], float | None]  # (algorithm, defense) -> value
    scale: tuple[float, float] | None  # colour range; None: the row's own range
    digits: int = 2
    texts: dict[tuple[str, str], str] = field(default_factory=dict)  # the table's text where it has an interval


def headline(cells: list[dict]) -> Headline:
    """The headline of one attack's (or poisoning scenario's) cells."""
    family, name = cells[0]["family"], cells[0].get("attack_name", cells[0]["attack"])
    if family == "membership":
        return Headline("auc", "AUC (worst view)", (CHANCE_AUC, 1.0))
    if family == "poisoning":  # targeted attacks have an ASR; untargeted ones are judged by the damage
        if any("asr" in c["metrics"] for c in cells):
            return Headline("asr", "ASR", (0.0, 1.0))
        if any("refusal_drop" in c["metrics"] for c in cells):  # a safety attack: refusals lost
            return Headline("refusal_drop", "refusal-rate drop", (0.0, 1.0))
        return Headline("loss_increase", "held-out loss increase")
    if name in EXTRACTION_HEADLINES:
        return EXTRACTION_HEADLINES[name]
    first = next((m for c in cells for m in c["metrics"] if not is_interval_key(m, c["metrics"])), "n/a")
    return Headline(first, first)  # a plug-in attack: its first metric


def headline_rows(run: Merged) -> list[HeadlineRow]:
    """The summary heatmap's rows: each privacy attack's headline on the clean trainings (worst case over
    views and clients), each poisoning scenario's on its own trainings."""
    scenarios = by(run.of_family("poisoning"), "scenario")
    groups = [*by(run.clean_privacy(), "attack").items(),
              *((f"{scenario} scenario", cells) for scenario, cells in scenarios.items())]
    rows = []
    for title, cells in groups:
        head = headline(cells)
        values: dict[tuple[str, str], float | None] = {}
        texts: dict[tuple[str, str], str] = {}
        for p in dict.fromkeys(pair(c) for c in cells):
            values[p], cell = best([c for c in cells if pair(c) == p], head.metric)
            if cell is not None and cell["family"] == "poisoning":  # an ASR on a few prompts needs its interval
                texts[p] = metric_text(cell, head.metric, head.digits)
        rows.append(HeadlineRow(f"{title}: {head.label}", values, head.scale, head.digits, texts))
    return rows


def headline_columns(run: Merged, rows: list[HeadlineRow]) -> list[tuple[str, str]]:
    """(algorithm, defense) pairs with a value in some row, in the order the run trained them."""
    order = [pair(t) for t in run.results["trainings"]] + [p for r in rows for p in r.values]
    present = {p for r in rows for p, v in r.values.items() if v is not None}
    return [p for p in dict.fromkeys(order) if p in present]


def headline_table(columns: list[tuple[str, str]], rows: list[HeadlineRow]) -> Table:
    """The heatmap's numbers as a table (the Markdown report's only view of them)."""
    return Table(["attack: headline", *[f"{a}/{d}" for a, d in columns]],
                 [[r.label, *[r.texts.get(p) or fmt(r.values.get(p), r.digits) for p in columns]] for r in rows])


def _shade(row: HeadlineRow, columns: list[tuple[str, str]]) -> list[float]:
    """Each value's place in its row's colour range, 0 (no leakage) to 1; NaN where missing."""
    values = [r if is_number(r := row.values.get(p)) else math.nan for p in columns]
    finite = [v for v in values if not math.isnan(v)]
    low, high = row.scale or (min([0.0, *finite]), max([0.0, *finite]))
    span = (high - low) or 1.0
    return [min(max((v - low) / span, 0.0), 1.0) if not math.isnan(v) else math.nan for v in values]


def heatmap_png(columns: list[tuple[str, str]], rows: list[HeadlineRow]) -> bytes:
    """The summary heatmap: rows shaded within their own colour range, values written in the cells."""
    import matplotlib

    fig, ax = axes(max(7.0, 2.5 + 0.85 * len(columns)), max(2.5, 1.6 + 0.38 * len(rows)))
    shades = np.ma.masked_invalid(np.array([_shade(r, columns) for r in rows], dtype=float))
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#e3e3e3")  # missing: grey, blank
    ax.imshow(shades, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(rows):
        for j, p in enumerate(columns):
            if is_number(row.values.get(p)):
                ax.text(j, i, fmt(row.values[p], row.digits), ha="center", va="center", fontsize=7,
                        color="white" if shades[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([wrap(f"{a}/{d}") for a, d in columns], rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([wrap(r.label, 48) for r in rows], fontsize=7)
    ax.set_title("Headline leakage: attack (row) against algorithm/defense (column)", fontsize=8)
    return png(fig, ax, legend=False)


def summary_section(run: Merged, *, show_secrets: bool) -> Section:
    """The heatmap and its table, the notes on redaction, seeds and reading, leakage and utility."""
    rows = headline_rows(run)
    columns = headline_columns(run, rows)
    blocks: list = []
    if rows and columns:
        blocks += [Figure("summary-heatmap", HEATMAP_CAPTION, heatmap_png(columns, rows)),
                   headline_table(columns, rows)]
    blocks.append(redaction_note(run.results, show_secrets=show_secrets))
    if len(run.seeds) > 1:
        blocks.append(SEEDS_NOTE.format(n=len(run.seeds), seeds=", ".join(map(str, run.seeds))))
    blocks += [INTRO, leakage_table(run)]
    failed = [c for c in run.results["cells"] if c.get("error")]
    if failed:  # the run went on past them; their metrics are n/a in every table
        blocks.append(f"{len(failed)} attack cell(s) failed on their view and have no metrics, first: "
                      f"{failed[0]['attack']} on {failed[0]['observer']}: {failed[0]['error']}")
    blocks += [utility_table(run),
               "Utility on held-out records: mean response-token loss, perplexity, and ROUGE-L F1 of greedy answers; "
               "`client` columns average the clients' final models."]
    return Section("Summary", blocks)


def leakage_table(run: Merged) -> Table:
    """One row per training: the strongest membership attack per observer (mean over clients), the
    audit bounds next to the accountant's epsilon, and headline extraction numbers."""
    cells = [c for c in run.final if c["family"] != "poisoning"]
    rows = []
    for training in run.trainings:
        mine = [c for c in cells if training_key(c) == training_key(training)]
        if not mine:
            continue  # no privacy attack probed it (a poisoned training: the poisoning section covers it)
        membership = [c for c in mine if c["family"] == "membership"]
        row = [training["algorithm"], defense_label(training)]
        for observer in OBSERVERS:
            per_attack: dict[str, list[dict]] = {}
            for c in membership:
                if c["observer"] == observer and is_number(c["metrics"].get("auc")):
                    per_attack.setdefault(c["attack"], []).append(c)
            if per_attack:
                attack, chosen = max(per_attack.items(), key=lambda kv: np.mean([c["metrics"]["auc"] for c in kv[1]]))
                blind = _mean_of(chosen, lambda c: c["metrics"].get("blind_auc"))
                row.append(f"{mean_range([c['metrics']['auc'] for c in chosen])} ({attack}"
                           f"{f'; blind {fmt(blind)}' if blind is not None else ''})")
            else:
                row.append("n/a")
        eps_global, global_cell = best([c for c in membership if c["observer"] == "global"], "epsilon_lb")
        eps, eps_cell = best(membership, "epsilon_lb")
        one_run, _ = best(membership, "one_run_epsilon_lb")
        row += [f"{fmt(eps_global, 2)} ({global_cell['attack']})" if global_cell else "n/a",
                f"{fmt(eps, 2)} ({eps_cell['attack']})" if eps_cell else "n/a", fmt(one_run, 2),
                epsilon_text(training.get("privacy"))]
        extraction = {c["attack_name"]: c for c in mine if c["family"] == "extraction" and c["observer"] == "global"}
        row += [metric_text(extraction["discoverable"], "exact_rate") if "discoverable" in extraction else "n/a",
                metric_text(extraction["pii"], "own_fraction") if "pii" in extraction else "n/a",
                metric_text(extraction["exposure"], "exposure_max", 1) if "exposure" in extraction else "n/a"]
        rows.append(row)
    return Table(["algorithm", "defense", *[f"best AUC {o}" for o in OBSERVERS], "empirical eps global",
                  "empirical eps (max over views)",
                  "one-run eps (max)", "epsilon (accountant)", "discoverable exact (global)",
                  "PII own (global)", "max exposure (global)"], rows)


def _mean_of(items: list[dict], value_of: Callable[[dict], float | None]) -> float | None:
    values = [v for v in map(value_of, items) if is_number(v)]
    return float(np.mean(values)) if values else None


def utility_table(run: Merged) -> Table:
    """The base model's and each clean training's held-out utility (means over seeds)."""
    base = run.base_utility
    rows = [["base model", "(no adapter)", fmt(base.get("loss")), fmt(base.get("perplexity")),
             fmt(base.get("rouge_l")), "n/a", "n/a", "n/a", "n/a", "n/a"]] if base else []
    for t in run.trainings:
        if t.get("scenario", CLEAN) != CLEAN:
            continue  # poisoned trainings' utility: the poisoning section
        rows.append([t["algorithm"], t["defense"],
                     *[utility_text(t, view, name) for view in ("global", "client_mean")
                       for name in ("loss", "perplexity", "rouge_l")],
                     epsilon_text(t.get("privacy")), fmt(_mean_of(t["per_seed"], train_seconds), 1)])
    return Table(["algorithm", "defense", "global loss", "global ppl", "global ROUGE-L", "client loss",
                  "client ppl", "client ROUGE-L", "epsilon (accountant)", "train s"], rows)
