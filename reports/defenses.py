"""The defense ranking: what each defense buys against the same algorithm without defense (the drop of
the worst-case membership AUC, ranked only where the two AUCs' intervals do not overlap; extraction
headlines, utility cost, poisoning headlines), and the privacy-utility frontier of the clean trainings
with its Pareto front."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedleak.common.names import CHANCE_AUC, CLEAN, NO_DEFENSE
from fedleak.reports.document import Figure, Section, Table, epsilon_text, fmt, is_number, privacy_level, signed
from fedleak.reports.merge import Merged, best, by, interval, metric_text, pair, worst_auc, worst_auc_cell
from fedleak.reports.plots import axes, png
from fedleak.reports.sanitisation import SANITISATION_INTRO, sanitisation_table
from fedleak.reports.summary import headline

DEFENSES_INTRO = (
    "What each defense buys against the same algorithm without defense (`none`), clean trainings, final round. "
    "Leakage: the worst-case membership AUC (largest over attacks, views and clients); its reduction is the drop "
    "of that AUC's excess over chance (0.5), with the share of the excess removed, given only where the two AUCs' "
    "95% intervals (bootstrap within a seed; across seeds with several) do not overlap, a conservative test; "
    "where they overlap the difference is inside the noise and the row reads \"not distinguishable\". Rows "
    "with a distinguishable reduction are ranked within each algorithm, largest first; the others follow "
    "unranked, in training order. The worst-case AUC's blind baseline (the same attack on the base model) "
    "stands beside it. Extraction "
    "columns: each attack's headline on its worst view, with the change against `none`; utility cost: change of "
    "the global model's held-out loss (+ is worse) and ROUGE-L (- is worse); poisoning columns: the defense's "
    "headline under each scenario (ASR for a backdoor). With several seeds the numbers are means and the changes "
    "differences of means. n/a: not measured.")
FRONTIER_CAPTION = (
    "Privacy-utility frontier: one point per algorithm and defense (clean training), the worst-case membership "
    "AUC against the global model's held-out loss, numbered as in the legend; DP defenses are labelled with "
    "their noise setting and the accountant's epsilon. Circles joined by the line: the Pareto frontier (no other "
    "point has both less leakage and lower loss).")


@dataclass
class DefenseRow:
    """One row of the defense ranking: the numbers it is ranked by, and the row as rendered."""

    algorithm: str
    defense: str
    worst_auc: float | None
    worst_where: str
    reduction: float | None  # drop of the worst-case AUC against `none` (positive: less leakage)
    share: float | None  # reduction / the baseline's excess over chance
    cells: list[str]  # the rendered row
    distinguishable: bool = False  # the two worst-case AUCs' intervals do not overlap: the reduction is ranked


def separated(cell: dict | None, other: dict | None) -> bool | None:
    """Whether two cells' AUC intervals are disjoint (a conservative test of a difference); None when
    either lacks an interval."""
    a, b = (interval(c, "auc") if c else None for c in (cell, other))
    if not a or not b:
        return None
    return a[1] < b[0] or b[1] < a[0]


def _reduction_text(reduction: float | None, share: float | None, distinct: bool | None) -> str:
    if reduction is None:
        return "n/a"
    if distinct is None:
        return f"not distinguishable (no interval; {signed(reduction)})"
    if not distinct:
        return f"not distinguishable ({signed(reduction)}, intervals overlap)"
    return signed(reduction) + (f" ({fmt(share * 100, 0)}%)" if share is not None else "")


def defense_rows(run: Merged) -> list[DefenseRow]:
    """The ranking's rows: every (algorithm, defense) against the same algorithm without defense, ranked
    within each algorithm by the drop of the worst-case membership AUC."""
    privacy, poisoning = run.clean_privacy(), run.of_family("poisoning")
    clean = {pair(t): t for t in run.trainings if t.get("scenario", CLEAN) == CLEAN}
    pairs = list(dict.fromkeys([*clean, *map(pair, privacy), *map(pair, poisoning)]))
    extraction = by([c for c in privacy if c["family"] == "extraction"], "attack")
    scenarios = by(poisoning, "scenario")
    worst_cell = {p: worst_auc_cell([c for c in privacy if pair(c) == p]) for p in pairs}
    worst = {p: worst_auc([worst_cell[p]] if worst_cell[p] else []) for p in pairs}
    rows = []
    for p in pairs:
        base = (p[0], NO_DEFENSE)
        auc, where = worst[p]
        base_auc = worst.get(base, (None, ""))[0]
        reduction = base_auc - auc if is_number(auc) and is_number(base_auc) and p != base else None
        distinct = separated(worst_cell[p], worst_cell.get(base)) if reduction is not None else None
        share = reduction / (base_auc - CHANCE_AUC) if distinct and base_auc > CHANCE_AUC else None
        if p == base:
            change = "baseline" if is_number(auc) else "n/a"
        else:
            change = _reduction_text(reduction, share, distinct)
        blind = (worst_cell[p] or {}).get("metrics", {}).get("blind_auc")
        where += f"; blind {fmt(blind)}" if is_number(blind) else ""
        cells = [p[0], p[1], f"{fmt(auc)} ({where})" if is_number(auc) else "n/a", change]
        for attack_cells in extraction.values():
            metric = headline(attack_cells).metric
            value, _ = best([c for c in attack_cells if pair(c) == p], metric)
            base_value, _ = best([c for c in attack_cells if pair(c) == base], metric)
            delta = value - base_value if is_number(value) and is_number(base_value) and p != base else None
            cells.append(fmt(value) + (f" ({signed(delta)})" if delta is not None else ""))
        training, base_training = clean.get(p), clean.get(base)
        for name in ("loss", "rouge_l"):
            value = _global(training, name)
            base_value = _global(base_training, name)
            cells.append(signed(value - base_value) if is_number(value) and is_number(base_value) and p != base
                         else ("baseline" if p == base and is_number(value) else "n/a"))
        cells.append(epsilon_text(training.get("privacy")) if training else "n/a")
        for scenario_cells in scenarios.values():
            metric = headline(scenario_cells).metric
            value, cell = best([c for c in scenario_cells if pair(c) == p], metric)
            cells.append(metric_text(cell, metric) if cell else fmt(value))  # an ASR on n prompts: its interval
        rows.append(DefenseRow(p[0], p[1], auc, where, reduction, share, cells, bool(distinct)))
    order = list(dict.fromkeys(r.algorithm for r in rows))
    # Within an algorithm: the baseline's "reduction" is 0, so it sits between defenses that help and hurt;
    # a reduction inside the noise is never ranked (stable sort: those keep training order, after).
    baseline = lambda r: r.defense == NO_DEFENSE and is_number(r.worst_auc)
    ranked = lambda r: baseline(r) or r.distinguishable
    drop = lambda r: 0.0 if baseline(r) or not ranked(r) else r.reduction
    return sorted(rows, key=lambda r: (order.index(r.algorithm), not ranked(r), -drop(r)))


def _global(training: dict | None, name: str) -> float | None:
    return ((training or {}).get("utility", {}).get("global") or {}).get(name)


def defense_table(run: Merged) -> Table:
    """The ranking as a table: one column per extraction attack and per poisoning scenario the run has."""
    extraction = by([c for c in run.clean_privacy() if c["family"] == "extraction"], "attack")
    header = ["algorithm", "defense", "worst-case AUC (attack, view)", "AUC excess removed (share)"]
    header += [f"{attack}: {headline(cells).label} (change)" for attack, cells in extraction.items()]
    header += ["global loss change", "global ROUGE-L change", "epsilon (accountant)"]
    header += [f"{scenario} scenario: {headline(cells).label}"
               for scenario, cells in by(run.of_family("poisoning"), "scenario").items()]
    return Table(header, [r.cells for r in defense_rows(run)])


@dataclass
class FrontierPoint:
    """One clean training on the privacy-utility plane."""

    pair: tuple[str, str]  # (algorithm, defense)
    label: str
    auc: float  # worst-case membership AUC
    loss: float  # global held-out loss


def frontier_points(run: Merged) -> list[FrontierPoint]:
    """One point per clean training that has both a membership AUC and a global held-out loss."""
    privacy = [c for c in run.clean_privacy() if c["family"] == "membership"]
    points = []
    for t in run.trainings:
        if t.get("scenario", CLEAN) != CLEAN:
            continue
        auc, _ = worst_auc([c for c in privacy if pair(c) == pair(t)])
        loss = _global(t, "loss")
        if is_number(auc) and is_number(loss):
            level = privacy_level(t) if t.get("privacy") else ""
            name = t.get("algorithm_name", t["algorithm"])  # FEDPIT's label with its parameters is long
            if t.get("setting"):  # a sweep's variant: its setting tells it from the configured training
                name += f" [{t['setting']['path'].rsplit('.', 1)[-1]}={t['setting']['value']}]"
            defense = t.get("defense_name", t["defense"]) if level else t["defense"]
            points.append(FrontierPoint(pair(t), f"{name}/{defense}" + (f" ({level})" if level else ""), auc, loss))
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
    """The frontier plot: every point numbered, the Pareto front joined, the base model's loss and chance."""
    fig, ax = axes(8.0, 4.6)
    front = pareto_front(points)
    # Points carry numbers and the legend their labels: long labels next to close points would overlap.
    for i, p in enumerate(points):
        ax.scatter([p.auc], [p.loss], s=28, marker="o" if i in front else "x", color="C3" if i in front else "C0",
                   zorder=3, label=f"{i + 1}: {p.label}")
        ax.annotate(str(i + 1), (p.auc, p.loss), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.plot([points[i].auc for i in front], [points[i].loss for i in front], color="C3", linewidth=1.2,
            drawstyle="steps-post", label="Pareto frontier")
    if is_number(base_loss):
        ax.axhline(base_loss, color="grey", linestyle=":", linewidth=1, label="base model (no adapter)")
    ax.axvline(CHANCE_AUC, color="grey", linestyle="--", linewidth=1, label="chance AUC")
    ax.set(xlabel="worst-case membership AUC (leakage)", ylabel="global held-out loss (lower is better)",
           title="Privacy-utility frontier")
    return png(fig, ax)


def defenses_section(run: Merged) -> Section | None:
    """The ranking and the frontier; None when no defense was measured."""
    table = defense_table(run)
    if not table.rows:
        return None
    blocks: list = [DEFENSES_INTRO, table]
    scrubbed = sanitisation_table(run)
    if scrubbed is not None:
        blocks += [SANITISATION_INTRO, scrubbed]
    points = frontier_points(run)
    if points:
        shown = {p.pair for p in points}
        left_out = [f"{t['algorithm']}/{t['defense']}" for t in run.trainings
                    if t.get("scenario", CLEAN) == CLEAN and pair(t) not in shown]
        caption = FRONTIER_CAPTION
        if left_out:
            caption += f" Without a global loss or a membership AUC, not shown: {', '.join(left_out)}."
        blocks.append(Figure("privacy-utility-frontier", caption,
                             frontier_png(points, (run.base_utility or {}).get("loss"))))
    return Section("Which defense buys what", blocks)
