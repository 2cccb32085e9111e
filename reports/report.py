"""Leakage report (Markdown and self-contained HTML) rendered from a run's results.json only."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from fedleak.federated.errors import FedleakError
from fedleak.federated.io import atomic_write_bytes, atomic_write_text

MEMBERSHIP_COLUMNS = (("auc", "AUC"), ("tpr@0.01fpr", "TPR@1%FPR"), ("tpr@0.001fpr", "TPR@0.1%FPR"))


def fmt(value, digits: int = 3) -> str:
    """How every number appears in both reports (tests look for these strings)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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


def roc_plot_png(cells: list[dict], title: str) -> bytes:
    """Log-log ROC curves, one per cell, as LiRA (Carlini et al. 2022) presents them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
    floor = 1e-3
    for cell in cells:
        fpr = [max(f, floor) for f in cell["roc"]["fpr"] if f is not None]
        tpr = [max(t, floor) for t in cell["roc"]["tpr"] if t is not None]
        auc = cell["metrics"].get("auc")
        ax.plot(fpr, tpr, label=f"{cell['algorithm']}/{cell['defense']} {cell['observer']} r{cell['round']} "
                                f"(AUC {fmt(auc)})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _membership_rows(cells: list[dict]) -> list[list[str]]:
    return [[c["algorithm"], c["defense"], c["attack"], c["observer"], fmt(c["round"]),
             *[fmt(c["metrics"].get(k)) for k, _ in MEMBERSHIP_COLUMNS], fmt(c["n_members"]), fmt(c["n_nonmembers"])]
            for c in cells if c["family"] == "membership"]


MEMBERSHIP_HEADER = ["algorithm", "defense", "attack", "observer", "round", *[h for _, h in MEMBERSHIP_COLUMNS],
                     "members", "non-members"]
UTILITY_HEADER = ["algorithm", "defense", "held-out loss", "perplexity", "train seconds"]


def _utility_rows(trainings: list[dict]) -> list[list[str]]:
    return [[t["algorithm"], t["defense"], fmt(t["utility"]["heldout_loss"]), fmt(t["utility"]["heldout_perplexity"]),
             fmt(t["train_seconds"], 1)] for t in trainings]


def _provenance(results: dict) -> list[tuple[str, str]]:
    model = results.get("model", {})
    rows = [("fedleak", str(results.get("fedleak_version"))), ("git commit", str(results.get("git_commit"))),
            ("seed", str(results.get("seed"))), ("config", str(results.get("config_path"))),
            ("started", str(results.get("started_at"))), ("finished", str(results.get("finished_at"))),
            ("model", f"{model.get('name')} ({model.get('parameters', '?')} parameters)"),
            ("data", json.dumps(results.get("data", {})))]
    rows += [(name, str(version)) for name, version in results.get("versions", {}).items()]
    return rows


def _attack_groups(results: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for cell in results["cells"]:
        if cell["family"] == "membership":
            groups.setdefault(cell["attack"], []).append(cell)
    return groups


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


INTRO = ("Membership inference: higher AUC and TPR at low FPR mean more leakage (0.5 AUC is chance). "
         "With n non-members, a TPR at an FPR below 1/n is the TPR at zero false positives.")


def render_markdown(results: dict, plots: dict[str, str]) -> str:
    parts = ["# fedleak leakage report", "", INTRO, "",
             "## Membership inference", "", _md_table(MEMBERSHIP_HEADER, _membership_rows(results["cells"])), ""]
    for attack, path in plots.items():
        parts += [f"![ROC of {attack}]({path})", ""]
    parts += ["## Utility (final global model)", "", _md_table(UTILITY_HEADER, _utility_rows(results["trainings"])), "",
              "## Provenance", "", _md_table(["what", "value"], [list(r) for r in _provenance(results)]), ""]
    return "\n".join(parts)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.note{color:#555}"""


def render_html(results: dict, plots: dict[str, bytes]) -> str:
    images = "".join(
        f'<figure><img alt="ROC of {html.escape(attack)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>ROC of {html.escape(attack)} (log-log)</figcaption></figure>'
        for attack, png in plots.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedleak leakage report</title><style>{STYLE}</style></head>
<body><h1>fedleak leakage report</h1>
<p class="note">{html.escape(INTRO)}</p>
<h2>Membership inference</h2>{_html_table(MEMBERSHIP_HEADER, _membership_rows(results["cells"]))}{images}
<h2>Utility (final global model)</h2>{_html_table(UTILITY_HEADER, _utility_rows(results["trainings"]))}
<h2>Provenance</h2>{_html_table(["what", "value"], [list(r) for r in _provenance(results)])}
</body></html>
"""


def write_report(run_dir: Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    pngs = {attack: roc_plot_png(cells, f"ROC: {attack}") for attack, cells in _attack_groups(results).items()}
    paths = {}
    for attack, png in pngs.items():
        name = "plots/roc-" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in attack) + ".png"
        atomic_write_bytes(run_dir / name, png)
        paths[attack] = name
    atomic_write_text(run_dir / "report.md", render_markdown(results, paths))
    atomic_write_text(run_dir / "report.html", render_html(results, pngs))
    return run_dir / "report.md", run_dir / "report.html"
