"""Sweeps (`[matrix.sweep]`, `[matrix] adaptations`): leakage and utility against each swept setting, per
algorithm and defense, with what each variant trains and uploads; a difference from the configured value
inside the intervals is called not distinguishable, never ranked."""

from __future__ import annotations

from fedleak.common.names import CLEAN
from fedleak.reports.document import Figure, Section, Table, defense_label, fmt, fmt_ci, is_number
from fedleak.reports.merge import Merged, best, interval, training_key, utility_text
from fedleak.reports.plots import axes, png
from fedleak.reports.poisoning import distinguishable

SWEEP_INTRO = (
    "Each swept setting varies alone, the others as configured; a row per value of it, the configured value "
    "first (marked *). Best AUC global: the strongest membership attack on the global model, with its interval "
    "(bootstrap, or across seeds) and the same score without the trained adapters (blind). Against the configured "
    "value's row, a variant is \"higher\" or \"lower\" only when the two intervals do not overlap; otherwise the "
    "difference is not distinguishable. Adapter parameters: what one client trains; uploaded: bytes a client "
    "sends per round (0 without a server).")


def _configured(config: dict, path: str):
    node = config
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _global_auc(run: Merged, training: dict) -> tuple[float | None, tuple | None, dict | None]:
    cells = [c for c in run.final if training_key(c) == training_key(training) and c["family"] == "membership"
             and c["observer"] == "global"]
    value, cell = best(cells, "auc")
    return value, (interval(cell, "auc") if cell else None), cell


def _rows(run: Merged, path: str) -> list[tuple[str, str, object, dict]]:
    """(algorithm, defense, value, training) of the clean trainings at the configured value or this path's."""
    configured = _configured((run.results.get("config") or {}), path)
    out = []
    for t in run.trainings:
        if t.get("scenario", CLEAN) != CLEAN:
            continue
        setting = t.get("setting")
        if setting and setting["path"] != path:
            continue
        name = t["algorithm"].split(" [")[0]  # the label without the variant's "[setting=value]"
        out.append((name, defense_label(t), setting["value"] if setting else configured, t))
    return out


def sweep_table(run: Merged, path: str) -> Table:
    rows, reference = [], {}
    entries = _rows(run, path)
    for name, defense, value, t in entries:
        if not t.get("setting"):
            reference[(name, defense)] = _global_auc(run, t)[1]
    leaf = path.rsplit(".", 1)[-1]
    for name, defense, value, t in sorted(entries, key=lambda e: (e[0], e[1], bool(e[3].get("setting")))):
        auc, band, cell = _global_auc(run, t)
        blind = cell["metrics"].get("blind_auc") if cell else None
        exposure, _ = best([c for c in run.final if training_key(c) == training_key(t)
                            and c.get("attack_name") == "exposure" and c["observer"] == "global"], "exposure_max")
        cost = t.get("cost") or {}
        rows.append([name, defense, f"{value}{'' if t.get('setting') else ' *'}",
                     (f"{fmt_ci(auc, band)} ({cell['attack']}; blind {fmt(blind)})" if cell else "n/a"),
                     distinguishable(band, reference.get((name, defense))) if t.get("setting") else "(configured)",
                     fmt(exposure, 1), utility_text(t, "global", "loss"), utility_text(t, "global", "rouge_l"),
                     fmt(t.get("adapter_parameters"), 0), fmt(cost.get("upload_bytes_per_client_per_round"), 0)])
    return Table(["algorithm", "defense", leaf, "best AUC global", "vs configured", "max exposure (global)",
                  "global loss", "global ROUGE-L", "adapter parameters", "uploaded bytes / client / round"], rows)


def sweep_figure(run: Merged, path: str) -> Figure | None:
    """Best global AUC (with its interval) and global ROUGE-L against the swept value, a line per algorithm and
    defense; a categorical axis for texts, a log axis for positive numbers spanning a decade or more."""
    entries = _rows(run, path)
    values = list(dict.fromkeys(v for _, _, v, _ in entries))
    if len(values) < 2:
        return None
    numeric = all(is_number(v) for v in values)
    order = sorted(values) if numeric else values
    fig, (left, right) = axes(9.0, 3.6, ncols=2)
    for key in dict.fromkeys((n, d) for n, d, _, _ in entries):
        points = sorted(((order.index(v), t) for n, d, v, t in entries if (n, d) == key), key=lambda p: p[0])
        xs = [order[i] if numeric else i for i, _ in points]
        aucs = [_global_auc(run, t) for _, t in points]
        ys = [a[0] if is_number(a[0]) else float("nan") for a in aucs]
        lows = [y - a[1][0] if a[1] else 0.0 for y, a in zip(ys, aucs)]
        highs = [a[1][1] - y if a[1] else 0.0 for y, a in zip(ys, aucs)]
        left.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=f"{key[0]}/{key[1]}")
        rouge = [(t.get("utility", {}).get("global") or {}).get("rouge_l") for _, t in points]
        right.plot(xs, [r if is_number(r) else float("nan") for r in rouge], marker="o", label=f"{key[0]}/{key[1]}")
    for ax, title in ((left, "best AUC, global view"), (right, "global ROUGE-L")):
        ax.set_xlabel(path)
        ax.set_title(title)
        if numeric and min(order) > 0 and max(order) >= 10 * min(order):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order])
    left.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    return Figure(f"sweep-{path.replace('.', '-')}", f"Leakage and utility against {path}", png(fig, right))


def sweep_section(run: Merged) -> Section | None:
    paths = list(dict.fromkeys(t["setting"]["path"] for t in run.trainings if t.get("setting")))
    if not paths:
        return None
    blocks: list = [SWEEP_INTRO]
    for path in paths:
        blocks.append(f"**{path}**")
        blocks.append(sweep_table(run, path))
        if (figure := sweep_figure(run, path)) is not None:
            blocks.append(figure)
    return Section("Sweeps", blocks)
