"""Membership inference at the final round: every cell's AUC beside its blind baseline (the same attack on
the base model), TPR at low FPR (or "not resolvable" where the non-members are too few) and audit bounds
(means over seeds, then each seed's own numbers), the one-run bound of each audit canary design side by side,
and log-log ROC curves per attack and observer."""

from __future__ import annotations

import math
import re

from fedleak.common.names import OBSERVERS
from fedleak.reports.document import (Figure, Section, Table, defense_label, fmt, fmt_ci, is_number, slug, view,
                                      view_label)
from fedleak.reports.merge import Merged, interval, metric_text, training_key
from fedleak.reports.plots import axes, png

MATCHED_NOTE = ("Members and non-members are drawn matched by category (as many held-out records as members in "
                "each category, the same records for every view of the same clients).")
UNMATCHED_NOTE = ("These results predate category matching: each view's non-members are a uniform draw of the "
                  "held-out split, so a client's topic mix alone can separate them; compare each AUC with its "
                  "blind baseline where there is one.")
BLIND_NOTE = ("Blind AUC: the same attack on the base model with the adapters switched off, which never sees what "
              "the view trained on; it sits at 0.5 when members and non-members come from one distribution, and "
              "an AUC is leakage only as far as it exceeds its blind baseline.")
MEMBERSHIP_COLUMNS = (("balanced_accuracy", "balanced acc."), ("epsilon_lb", "empirical eps"),
                      ("one_run_epsilon_lb", "one-run eps"))


def _tpr_columns(cells: list[dict]) -> list[tuple[str, str]]:
    """TPR at each FPR the cells carry (`tpr@0.01fpr` -> TPR@1%FPR), largest FPR first."""
    names = {k for c in cells for k in c["metrics"] if re.fullmatch(r"tpr@[0-9.e-]+fpr", k)}
    return [(n, f"TPR@{_fpr(n) * 100:g}%FPR") for n in sorted(names, key=_fpr, reverse=True)]


def _fpr(name: str) -> float:
    return float(name[4:-3])


def unresolvable(cell: dict, name: str) -> bool:
    """Whether the cell's non-members are too few to measure the FPR of `tpr@<f>fpr`: f < 1/n0. Read
    from the counts, so results written before `min_resolvable_fpr` existed (where such a cell holds
    the TPR at zero false positives) are caught too."""
    n0 = cell.get("n_nonmembers")
    return isinstance(n0, int) and n0 > 0 and 0 < _fpr(name) * n0 < 1 - 1e-9


def tpr_text(cell: dict, name: str) -> str:
    """A TPR@x%FPR cell: its value, or "not resolvable (n non-members)"."""
    if unresolvable(cell, name):
        return f"not resolvable ({cell['n_nonmembers']} non-members)"
    return metric_text(cell, name)


def min_fpr_text(cell: dict) -> str:
    """The TPR read at the smallest resolvable FPR, 1/n0, and that FPR: `0.150 @ 1.67%`."""
    fpr, tpr = cell["metrics"].get("min_resolvable_fpr"), cell["metrics"].get("tpr_at_min_fpr")
    return f"{fmt(tpr)} @ {fpr * 100:.2g}%" if is_number(fpr) and is_number(tpr) else "n/a"


def resolution_note(cells: list[dict]) -> str | None:
    """One sentence naming the TPR columns some cell cannot resolve, and where the resolvable TPR was read."""
    columns = [(n, h) for n, h in _tpr_columns(cells) if any(unresolvable(c, n) for c in cells)]
    if not columns:
        return None
    counts = sorted({c["n_nonmembers"] for c in cells if any(unresolvable(c, n) for n, _ in columns)})
    fprs = [c["metrics"]["min_resolvable_fpr"] for c in cells if is_number(c["metrics"].get("min_resolvable_fpr"))]
    where = lambda f: f"{f * 100:.2g}%"
    spread = where(min(fprs)) if fprs and min(fprs) == max(fprs) else \
        (f"{where(min(fprs))} to {where(max(fprs))}" if fprs else "")
    read = f"read at FPR = 1/n ({spread} here)" if fprs else "at FPR = 1/n (not recorded in these results)"
    need = " and ".join(f"{h} needs at least {math.ceil(1 / _fpr(n) - 1e-9)}" for n, h in columns)
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return (f"An FPR below 1/n cannot be measured with n non-members: {need} non-members, so cells with fewer "
            f"(here {span}) say \"not resolvable\", and \"TPR@1/n FPR\" gives the TPR {read}.")


def blind_text(cell: dict) -> str:
    """The blind baseline's AUC with its interval (n/a in results written before it existed; "none (reads the
    updates)" for an update-based attack, whose base model has no update)."""
    if cell.get("blind_note") and "blind_auc" not in cell["metrics"]:
        return "none (reads the updates)"
    return metric_text(cell, "blind_auc")


def membership_table(run: Merged) -> Table:
    """Every final-round membership cell: AUC beside the blind baseline, TPR at low FPR and audit bounds."""
    cells = run.of_family("membership")
    tprs = _tpr_columns(cells)
    several = len(run.seeds) > 1
    rows = [[c["algorithm"], defense_label(c), c["attack"], c["observer"], fmt(c["client"]), fmt(c["round"]),
             *([str(len(c["seeds"]))] if several else []), metric_text(c, "auc"), blind_text(c),
             *[tpr_text(c, k) for k, _ in tprs], min_fpr_text(c), *[metric_text(c, k) for k, _ in MEMBERSHIP_COLUMNS],
             fmt(c["n_members"]), fmt(c["n_nonmembers"])] for c in cells]
    ci = lambda h: f"{h} [95% CI]"
    return Table(["algorithm", "defense", "attack", "observer", "client", "round", *(["seeds"] if several else []),
                  ci("AUC"), ci("blind AUC"), *[ci(h) if several else h for _, h in tprs], "TPR@1/n FPR",
                  *[ci(h) if several else h for _, h in MEMBERSHIP_COLUMNS], "members", "non-members"], rows)


def per_seed_table(run: Merged) -> Table:
    """The final round's membership cells of each seed, as the results list them."""
    cells = [c for c in run.final_per_seed if c["family"] == "membership"]
    tprs = _tpr_columns(cells)
    own = lambda c, k: fmt_ci(c["metrics"].get(k), interval({"metrics": c["metrics"]}, k))
    rows = [[c["algorithm"], defense_label(c), c["attack"], view(c), fmt(c.get("seed")), own(c, "auc"),
             own(c, "blind_auc"), *[tpr_text(c, k) for k, _ in tprs], min_fpr_text(c), own(c, "epsilon_lb")]
            for c in cells]
    return Table(["algorithm", "defense", "attack", "view", "seed", "AUC [95% CI]", "blind AUC [95% CI]",
                  *[h for _, h in tprs], "TPR@1/n FPR", "empirical eps"], rows)


DESIGN_PREFIX = "one_run_epsilon_lb_"


def canary_designs(cells: list[dict]) -> list[str]:
    """The canary designs audited separately in these cells (`one_run_epsilon_lb_<design>`), in run order."""
    return list(dict.fromkeys(k.removeprefix(DESIGN_PREFIX) for c in cells for k in c["metrics"]
                              if k.startswith(DESIGN_PREFIX)))


def design_note(designs: list[str], described: dict | None = None) -> str:
    """What each design is (as results.json's data summary describes it) and how to read its bound."""
    described = described or {}
    what = "; ".join(f"`{d}`: {(described.get(d) or {}).get('design', 'not described in these results')}"
                     for d in designs)
    return ("One-run audit by canary design (data.embedded.audit_canary_designs): each design has its own audit "
            "canaries, each inserted once with probability 1/2, and its own one-run epsilon lower bound (Steinke, "
            "Nasr and Jagielski 2023) at 95% confidence; canary AUC separates the design's inserted canaries from "
            f"its left-out ones, a finer comparison than the bound's coarse steps. Designs: {what}. The membership "
            "table's one-run eps is the first design's.")


def design_table(run: Merged) -> Table | None:
    """Final-round membership cells: each canary design's one-run epsilon bound and canary AUC side by side."""
    cells = [c for c in run.of_family("membership") if any(k.startswith(DESIGN_PREFIX) for k in c["metrics"])]
    designs = canary_designs(cells)
    if not designs:
        return None
    ci = " [95% CI]" if len(run.seeds) > 1 else ""
    pairs = lambda c: [text for d in designs for text in (metric_text(c, DESIGN_PREFIX + d, 2),
                                                           metric_text(c, f"canary_auc_{d}"))]
    rows = [[c["algorithm"], defense_label(c), c["attack"], view(c), *pairs(c)] for c in cells]
    return Table(["algorithm", "defense", "attack", "view",
                  *[h for d in designs for h in (f"one-run eps: {d}{ci}", f"canary AUC: {d} [95% CI]")]], rows)


def failed_note(cells: list[dict]) -> str | None:
    """The cells whose attack failed on a view (their metrics are n/a), each with its one-line error."""
    failed = [c for c in cells if c.get("error")]
    if not failed:
        return None
    return (f"{len(failed)} membership cell(s) have no metrics: " +
            "; ".join(f"{c['algorithm']}/{defense_label(c)} {c['attack']} on {view(c)}: {c['error']}"
                      for c in failed[:10]) + ("; ..." if len(failed) > 10 else "") + ".")


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
                label=f"{view_label(cell)} (AUC {fmt(cell['metrics'].get('auc'))}, blind "
                      f"{fmt(cell['metrics'].get('blind_auc'))})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    for axis in (ax.xaxis, ax.yaxis):  # 0.001 rather than 10^-3: plainer, and no mathtext to lay out
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        # Minor ticks at 2 and 5 x each decade: matplotlib's default lays out ~100 unlabelled ticks per axis,
        # most of a report's drawing time with 30 ROC plots.
        axis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0), numticks=10))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return png(fig, ax)


def membership_section(run: Merged) -> Section:
    """The membership tables and a ROC plot per attack and observer."""
    cells = [c for c in run.of_family("membership") if c.get("roc")]
    several = len(run.seeds) > 1
    matched = any(c.get("nonmember_sampling") for c in run.of_family("membership"))
    blocks: list = [f"{MATCHED_NOTE if matched else UNMATCHED_NOTE} {BLIND_NOTE}", membership_table(run)]
    blocks += [note for note in (resolution_note(run.of_family("membership")),
                                 failed_note(run.of_family("membership"))) if note]
    designs = design_table(run)
    if designs is not None:
        blocks += [design_note(canary_designs(run.of_family("membership")),
                               (run.results.get("data") or {}).get("audit_canary_designs")), designs]
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
