"""Differential privacy and its audit: each DP training's accountant epsilon beside the empirical lower
bounds the membership attacks give on the views the guarantee covers, with the audit's verdict."""

from __future__ import annotations

from fedleak.common.names import CLEAN
from fedleak.reports.document import Figure, Section, Table, defense_label, fmt, is_number, privacy_level, view
from fedleak.reports.merge import Merged, best, training_key
from fedleak.reports.plots import axes, png, wrap

DP_INTRO = (
    "Differential privacy: the accountant's epsilon (an upper bound, at its delta) beside the empirical lower "
    "bounds the membership attacks give (final round, largest over attacks). With a target epsilon, DP-SGD's "
    "noise is solved so that each client's spent epsilon (every DP training it runs, all rounds, at the sample "
    "rates Opacus accounts) meets the target; a spent epsilon above it is marked EXCEEDS. The record-level "
    "guarantee (DP-SGD) covers every view; the user-level one (DP-FedAvg) the global model only. FEDPIT and "
    "LOCIT+SA generate their synthetic records with the clients' real records as in-context demonstrations, "
    "without noise: their record-level epsilon bounds the DP-SGD trainings on the records as generated, not "
    "what a real record passes into the synthetic data, so it covers no view for the real records' membership. "
    "`audit`: whether every lower bound on a covered view stays at or below the accountant's epsilon, as it must.")
NOT_COVERED = "none (real records reach the synthetic data without noise)"


def _scope(privacy: dict) -> tuple[float | None, str]:
    """The epsilon the covered views are held to and which views those are (record-level when both apply:
    it covers every view, unless the training's data is self-generated from the real records)."""
    if is_number(privacy.get("record_level_epsilon")) and not privacy.get("record_level_scope"):
        return privacy["record_level_epsilon"], "every view"
    if is_number(privacy.get("user_level_epsilon")):
        return privacy["user_level_epsilon"], "global"
    return None, NOT_COVERED


def _covered(cells: list[dict], privacy: dict) -> list[dict]:
    covers = _scope(privacy)[1]
    if covers == "every view":
        return cells
    return [c for c in cells if c["observer"] == "global"] if covers == "global" else []


def _guarantee(privacy: dict) -> float | None:
    """The accountant's epsilon shown beside the bounds: the covering one, else the record-level one."""
    epsilon = _scope(privacy)[0]
    return epsilon if epsilon is not None else privacy.get("record_level_epsilon")


def spent_text(privacy: dict) -> str:
    """The record-level epsilon spent, loudly marked when above its target."""
    spent, target = privacy.get("record_level_epsilon"), privacy.get("target_epsilon")
    if is_number(spent) and is_number(target) and spent > target:
        return f"{fmt(spent, 2)} EXCEEDS target"
    return fmt(spent, 2)


def dp_rows(run: Merged) -> list[tuple[dict, float | None, float | None, float | None]]:
    """(training, accountant epsilon, largest empirical bound and largest one-run bound on covered views)."""
    membership = run.of_family("membership")
    out = []
    for t in run.trainings:
        mine = [c for c in membership if training_key(c) == training_key(t)]
        if not t.get("privacy") or (t.get("scenario", CLEAN) != CLEAN and not mine):
            continue  # a poisoned DP training without privacy attacks: the poisoning section has it
        covered = _covered(mine, t["privacy"])
        bound, one_run = best(covered, "epsilon_lb")[0], best(covered, "one_run_epsilon_lb")[0]
        out.append((t, _guarantee(t["privacy"]), bound, one_run))
    return out


def dp_table(run: Merged, rows: list) -> Table:
    """The dp_rows with each bound's attack and view, and the audit's verdict."""
    membership = run.of_family("membership")
    table = []
    for t, guarantee, bound, one_run in rows:
        mine = [c for c in membership if training_key(c) == training_key(t)]
        privacy = t["privacy"]
        global_bound, global_cell = best([c for c in mine if c["observer"] == "global"], "epsilon_lb")
        any_bound, any_cell = best(mine, "epsilon_lb")
        bounds = [b for b in (bound, one_run) if is_number(b)]
        covers = _scope(privacy)[1]
        verdict = ("n/a: no view covered" if covers == NOT_COVERED else "n/a" if not bounds or guarantee is None else
                   "consistent" if max(bounds) <= guarantee else "lower bound above the accountant: broken DP?")
        table.append([t["algorithm"], defense_label(t), privacy_level(t, epsilon=False) or "n/a",
                      fmt(privacy.get("target_epsilon"), 2), spent_text(privacy),
                      fmt(privacy.get("user_level_epsilon"), 2),
                      f"{fmt(global_bound, 2)} ({global_cell['attack']})" if global_cell else "n/a",
                      f"{fmt(any_bound, 2)} ({any_cell['attack']}, {view(any_cell)})" if any_cell else "n/a",
                      fmt(best(mine, "one_run_epsilon_lb")[0], 2),
                      covers, verdict])
    return Table(["algorithm", "defense", "noise setting", "target eps", "record-level eps spent (accountant)",
                  "user-level eps (accountant)", "empirical eps global", "empirical eps (max over views)",
                  "one-run eps (max)", "guarantee covers", "audit"], table)


def dp_bars_png(rows) -> bytes:
    """Bars per DP training: the accountant's epsilon beside the two empirical lower bounds."""
    fig, ax = axes(7.5, 4.2)
    labels = [wrap(f"{t['algorithm']}/{defense_label(t)}", 22) for t, *_ in rows]
    series = (("accountant epsilon", 1), ("empirical lower bound (covered views)", 2), ("one-run lower bound", 3))
    width = 0.8 / len(series)
    for j, (name, index) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        values = [r[index] if is_number(r[index]) else 0.0 for r in rows]
        bars = ax.bar(xs, values, width=width, label=name)
        ax.bar_label(bars, labels=[fmt(r[index], 2) for r in rows], fontsize=6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set(ylabel="epsilon", title="Accountant epsilon against the audit's lower bounds")
    return png(fig, ax)


def dp_section(run: Merged) -> Section | None:
    """The DP table and its bars; None when no training has an accountant."""
    rows = dp_rows(run)
    if not rows:
        return None
    blocks: list = [DP_INTRO, dp_table(run, rows)]
    if any(is_number(b) for _, _, b, _ in rows):
        blocks.append(Figure("dp-epsilons", "Accountant epsilon and the empirical lower bounds (largest over "
                             "attacks on the views the guarantee covers; n/a drawn as 0)", dp_bars_png(rows)))
    return Section("Differential privacy: accountant and audit", blocks)
