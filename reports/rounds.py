"""Leakage over rounds: the membership AUC of every training attacked per round, one plot per attack and
observer with the algorithms side by side (the FEDPIT paper's comparison)."""

from __future__ import annotations

import numpy as np

from fedleak.common.names import CHANCE_AUC, OBSERVERS
from fedleak.reports.document import Figure, Section, defense_label, is_number, slug
from fedleak.reports.merge import Merged
from fedleak.reports.plots import axes, png


def rounds_lines(cells: list[dict]) -> dict[str, dict[int, list[float]]]:
    """AUC per round for each training (label algorithm/defense): every client's and seed's value, so
    the algorithms sit side by side in one plot (the FEDPIT paper's comparison)."""
    lines: dict[str, dict[int, list[float]]] = {}
    for c in cells:
        values = [s["metrics"]["auc"] for s in c.get("per_seed", [c]) if is_number(s["metrics"].get("auc"))]
        if values:
            lines.setdefault(f"{c['algorithm']}/{defense_label(c)}", {}).setdefault(c["round"], []).extend(values)
    return lines


def rounds_plot_png(cells: list[dict], title: str) -> bytes:
    """AUC over rounds, one line per training: the mean over clients and seeds, their range as a band."""
    fig, ax = axes(7.5, 4.2)
    for label, by_round in rounds_lines(cells).items():
        rounds = sorted(by_round)
        line, = ax.plot(rounds, [np.mean(by_round[r]) for r in rounds], marker=".", linewidth=1.2, label=label)
        if any(len(by_round[r]) > 1 for r in rounds):
            ax.fill_between(rounds, [min(by_round[r]) for r in rounds], [max(by_round[r]) for r in rounds],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(CHANCE_AUC, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="round (0 = before training)", ylabel="AUC", title=title)
    return png(fig, ax)


def rounds_section(run: Merged) -> Section | None:
    """One over-rounds plot per attack and observer attacked at several rounds; None when none was."""
    membership = run.of_family("membership", every_round=True)
    figures = []
    for attack in dict.fromkeys(c["attack"] for c in membership):
        for observer in OBSERVERS:
            cells = [c for c in membership if c["attack"] == attack and c["observer"] == observer]
            if len({c["round"] for c in cells}) > 1:
                figures.append(Figure(slug(f"rounds-{attack}-{observer}"), f"AUC of {attack} on the {observer} "
                                      "view over rounds, every algorithm and defense attacked per round in one plot "
                                      "(line: mean over clients and seeds; band: their range)",
                                      rounds_plot_png(cells, f"{attack}: {observer} view")))
    return Section("Leakage over rounds", figures) if figures else None
