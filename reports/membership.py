"""Membership inference at the final round: every cell's AUC, TPR at low FPR and audit bounds (means over
seeds, then each seed's own numbers), and log-log ROC curves per attack and observer."""

from __future__ import annotations

import re

from fedleak.common.names import OBSERVERS
from fedleak.reports.document import Figure, Section, Table, defense_label, fmt, fmt_ci, slug, view, view_label
from fedleak.reports.merge import Merged, interval, metric_text, training_key
from fedleak.reports.plots import axes, png

MEMBERSHIP_COLUMNS = (("balanced_accuracy", "balanced acc."), ("epsilon_lb", "empirical eps"),
                      ("one_run_epsilon_lb", "one-run eps"))


def _tpr_columns(cells: list[dict]) -> list[tuple[str, str]]:
    """TPR at each FPR the cells carry (`tpr@0.01fpr` -> TPR@1%FPR), largest FPR first."""
    names = {k for c in cells for k in c["metrics"] if re.fullmatch(r"tpr@[0-9.e-]+fpr", k)}
    fpr = lambda name: float(name[4:-3])
    return [(n, f"TPR@{fpr(n) * 100:g}%FPR") for n in sorted(names, key=fpr, reverse=True)]


def membership_table(run: Merged) -> Table:
    """Every final-round membership cell: AUC, TPR at low FPR and audit bounds (means over seeds)."""
    cells = run.of_family("membership")
    columns = [("auc", "AUC"), *_tpr_columns(cells), *MEMBERSHIP_COLUMNS]
    several = len(run.seeds) > 1
    rows = [[c["algorithm"], defense_label(c), c["attack"], c["observer"], fmt(c["client"]), fmt(c["round"]),
             *([str(len(c["seeds"]))] if several else []), *[metric_text(c, k) for k, _ in columns],
             fmt(c["n_members"]), fmt(c["n_nonmembers"])] for c in cells]
    return Table(["algorithm", "defense", "attack", "observer", "client", "round", *(["seeds"] if several else []),
                  *[f"{h} [95% CI]" if k == "auc" or several else h for k, h in columns],
                  "members", "non-members"], rows)


def per_seed_table(run: Merged) -> Table:
    """The final round's membership cells of each seed, as the results list them."""
    cells = [c for c in run.final_per_seed if c["family"] == "membership"]
    columns = [("auc", "AUC [95% CI]"), *_tpr_columns(cells), ("epsilon_lb", "empirical eps")]
    rows = [[c["algorithm"], defense_label(c), c["attack"], view(c), fmt(c.get("seed")),
             *[fmt_ci(c["metrics"].get(k), interval({"metrics": c["metrics"]}, k)) for k, _ in columns]]
            for c in cells]
    return Table(["algorithm", "defense", "attack", "view", "seed", *[h for _, h in columns]], rows)


def roc_plot_png(cells: list[dict], title: str) -> bytes:
    """Log-log ROC curves, one per cell, as LiRA (Carlini et al. 2022) presents them."""
    import matplotlib
    import matplotlib.ticker

    fig, ax = axes(9.0, 4.8)
    floor = 1e-3
    # One colour per training, one line style per client, legend beside the axes: many curves stay legible.
    trainings = list(dict.fromkeys(training_key(c) for c in cells))
    colours = matplotlib.colormaps["tab10" if len(trainings) <= 10 else "tab20"]
    styles = ("-", "--", ":", "-.")
    for cell in cells:
        fpr = [max(f, floor) for f in cell["roc"]["fpr"] if f is not None]
        tpr = [max(t, floor) for t in cell["roc"]["tpr"] if t is not None]
        ax.plot(fpr, tpr, linewidth=1.2, color=colours(trainings.index(training_key(cell)) % colours.N),
                linestyle=styles[(cell["client"] or 0) % len(styles)],
                label=f"{view_label(cell)} (AUC {fmt(cell['metrics'].get('auc'))})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    for axis in (ax.xaxis, ax.yaxis):  # 0.001 rather than 10^-3: plainer, and no mathtext to lay out
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return png(fig, ax)


def membership_section(run: Merged) -> Section:
    """The membership tables and a ROC plot per attack and observer."""
    cells = [c for c in run.of_family("membership") if c.get("roc")]
    several = len(run.seeds) > 1
    blocks: list = [membership_table(run)]
    if several:
        blocks += ["Each seed's own numbers (final round; AUC intervals: bootstrap within the seed):",
                   per_seed_table(run)]
    for attack in dict.fromkeys(c["attack"] for c in cells):
        for observer in OBSERVERS:
            mine = [c for c in cells if c["attack"] == attack and c["observer"] == observer]
            if mine:
                blocks.append(Figure(slug(f"roc-{attack}-{observer}"), f"ROC of {attack} on the {observer} view "
                                     f"(log-log{', first seed' if several else ''})",
                                     roc_plot_png(mine, f"{attack}: {observer} view")))
    return Section("Membership inference", blocks)
