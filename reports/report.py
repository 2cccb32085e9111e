"""Leakage report (Markdown and self-contained HTML) rendered from a run's results.json only.

Both renderings share one document model: a list of sections, each holding paragraphs, tables
(header + rows of strings) and figures (PNG bytes), so they always carry the same numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedleak.federated.errors import FedleakError
from fedleak.federated.io import atomic_write_bytes, atomic_write_text

CLEAN = "clean"  # the scenario without malicious clients (eval.config.CLEAN; reports import nothing heavy)

MEMBERSHIP_COLUMNS = (("tpr@0.01fpr", "TPR@1%FPR"), ("tpr@0.001fpr", "TPR@0.1%FPR"),
                      ("balanced_accuracy", "balanced acc."), ("epsilon_lb", "empirical eps"),
                      ("one_run_epsilon_lb", "one-run eps"))
OBSERVER_ORDER = ("global", "upload", "client")
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


def fmt(value, digits: int = 3) -> str:
    """How every number appears in both reports (tests look for these strings)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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


def roc_plot_png(cells: list[dict], title: str) -> bytes:
    """Log-log ROC curves, one per cell, as LiRA (Carlini et al. 2022) presents them."""
    import matplotlib

    fig, ax = _axes(9.0, 4.8)
    floor = 1e-3
    # One colour per training, one line style per client, legend beside the axes: many curves stay legible.
    trainings = list(dict.fromkeys(_key(c) for c in cells))
    colours = matplotlib.colormaps["tab10" if len(trainings) <= 10 else "tab20"]
    styles = ("-", "--", ":", "-.")
    for cell in cells:
        fpr = [max(f, floor) for f in cell["roc"]["fpr"] if f is not None]
        tpr = [max(t, floor) for t in cell["roc"]["tpr"] if t is not None]
        ax.plot(fpr, tpr, linewidth=1.2, color=colours(trainings.index(_key(cell))),
                linestyle=styles[(cell["client"] or 0) % len(styles)],
                label=f"{_view_label(cell)} (AUC {fmt(cell['metrics'].get('auc'))})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    return _png(fig, ax)


def _view_label(cell: dict) -> str:
    return f"{cell['algorithm']}/{_defense(cell)} {_view(cell)} r{cell['round']}"


def _mean_range(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} [{fmt(min(values))}-{fmt(max(values))}]"


def _key(item: dict) -> tuple:
    """Which training a cell or training record belongs to (results before scenarios: all clean)."""
    return item["algorithm"], item["defense"], item.get("scenario", CLEAN), item.get("seed")


def _defense(item: dict) -> str:
    """The defense column: a poisoned training's scenario follows its defense."""
    scenario = item.get("scenario", CLEAN)
    return item["defense"] if scenario == CLEAN else f"{item['defense']} [{scenario}]"


def _final(results: dict) -> list[dict]:
    """Cells of each training's final round (other rounds feed the over-rounds plots)."""
    last = {_key(t): len(t["rounds"]) for t in results["trainings"] if t.get("rounds")}
    for c in results["cells"]:  # results without round history: the latest round attacked
        if _key(c) not in last or c["round"] > last[_key(c)]:
            last[_key(c)] = c["round"]
    return [c for c in results["cells"] if c["round"] == last[_key(c)]]


def _best(cells: list[dict], metric: str) -> tuple[float | None, str]:
    scored = [(c["metrics"].get(metric), c) for c in cells if c["metrics"].get(metric) is not None]
    if not scored:
        return None, ""
    value, cell = max(scored, key=lambda x: x[0])
    return value, cell["attack"]


def leakage_table(results: dict) -> Table:
    """One row per training: the strongest membership attack per observer (mean over clients), the
    audit bounds next to the accountant's epsilon, and headline extraction numbers."""
    cells = [c for c in _final(results) if c["family"] != "poisoning"]
    rows = []
    for training in results["trainings"]:
        mine = [c for c in cells if _key(c) == _key(training)]
        if not mine:
            continue  # no privacy attack probed it (a poisoned training: the poisoning section covers it)
        membership = [c for c in mine if c["family"] == "membership"]
        row = [training["algorithm"], _defense(training)]
        for observer in OBSERVER_ORDER:
            per_attack = {}
            for c in membership:
                if c["observer"] == observer and c["metrics"].get("auc") is not None:
                    per_attack.setdefault(c["attack"], []).append(c["metrics"]["auc"])
            if per_attack:
                attack, aucs = max(per_attack.items(), key=lambda kv: np.mean(kv[1]))
                row.append(f"{_mean_range(aucs)} ({attack})")
            else:
                row.append("n/a")
        eps_global, global_attack = _best([c for c in membership if c["observer"] == "global"], "epsilon_lb")
        eps, eps_attack = _best(membership, "epsilon_lb")
        one_run, _ = _best(membership, "one_run_epsilon_lb")
        row += [f"{fmt(eps_global, 2)} ({global_attack})" if eps_global is not None else "n/a",
                f"{fmt(eps, 2)} ({eps_attack})" if eps is not None else "n/a", fmt(one_run, 2),
                _epsilon(training.get("privacy"))]
        extraction = {c["attack_name"]: c for c in mine if c["family"] == "extraction" and c["observer"] == "global"}
        row += [fmt(extraction["discoverable"]["metrics"].get("exact_rate")) if "discoverable" in extraction else "n/a",
                fmt(extraction["pii"]["metrics"].get("own_fraction")) if "pii" in extraction else "n/a",
                fmt(extraction["exposure"]["metrics"].get("exposure_max"), 1) if "exposure" in extraction else "n/a"]
        rows.append(row)
    return Table(["algorithm", "defense", *[f"best AUC {o}" for o in OBSERVER_ORDER], "empirical eps global",
                  "empirical eps (max over views)",
                  "one-run eps (max)", "epsilon (accountant)", "discoverable exact (global)",
                  "PII own (global)", "max exposure (global)"], rows)


def utility_table(results: dict) -> Table:
    base = results.get("base_utility")
    rows = [["base model", "(no adapter)", fmt(base["loss"]), fmt(base["perplexity"]), fmt(base["rouge_l"]),
             "n/a", "n/a", "n/a", "n/a", "n/a"]] if base else []
    for t in results["trainings"]:
        if t.get("scenario", CLEAN) != CLEAN:
            continue  # poisoned trainings' utility: the poisoning section
        u = t["utility"]
        g, c = u.get("global", {}), u.get("client_mean", {})
        rows.append([t["algorithm"], t["defense"], fmt(g.get("loss")), fmt(g.get("perplexity")), fmt(g.get("rouge_l")),
                     fmt(c.get("loss")), fmt(c.get("perplexity")), fmt(c.get("rouge_l")), _epsilon(t.get("privacy")),
                     fmt(t["train_seconds"], 1)])
    return Table(["algorithm", "defense", "global loss", "global ppl", "global ROUGE-L", "client loss",
                  "client ppl", "client ROUGE-L", "epsilon (accountant)", "train s"], rows)


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


def _auc_with_interval(metrics: dict) -> str:
    auc, low, high = metrics.get("auc"), metrics.get("auc_low"), metrics.get("auc_high")
    return fmt(auc) if low is None or high is None else f"{fmt(auc)} [{fmt(low)}-{fmt(high)}]"


def membership_table(results: dict) -> Table:
    rows = [[c["algorithm"], _defense(c), c["attack"], c["observer"], fmt(c["client"]), fmt(c["round"]),
             _auc_with_interval(c["metrics"]), *[fmt(c["metrics"].get(k)) for k, _ in MEMBERSHIP_COLUMNS],
             fmt(c["n_members"]), fmt(c["n_nonmembers"])]
            for c in _final(results) if c["family"] == "membership"]
    return Table(["algorithm", "defense", "attack", "observer", "client", "round", "AUC [95% CI]",
                  *[h for _, h in MEMBERSHIP_COLUMNS], "members", "non-members"], rows)


def extraction_section(results: dict) -> Section | None:
    cells = [c for c in _final(results) if c["family"] == "extraction"]
    if not cells:
        return None
    section = Section("Training-data extraction", [
        "Extraction attacks against each view's own training data (for `upload` and `client` views, that client's "
        "records). `discoverable`: greedy answers to the training prompts that reproduce the private response "
        "exactly or at ROUGE-L >= tau, and the prefix/suffix protocol; `pii`: private identifiers that appear "
        "verbatim in answers to prompts that do not contain them; `exposure`: log2(candidates) - log2(rank) of each "
        "canary's secret; `generate_rank`: precision at k of sampled generations ranked by perplexity, zlib and "
        "reference ratios."])
    for attack in dict.fromkeys(c["attack"] for c in cells):
        mine = [c for c in cells if c["attack"] == attack]
        metrics = list(dict.fromkeys(m for c in mine for m in c["metrics"]))
        section.blocks.append(Table(
            ["algorithm", "defense", "attack", "view", *metrics],
            [[c["algorithm"], _defense(c), c["attack"], _view(c), *[fmt(c["metrics"].get(m)) for m in metrics]]
             for c in mine]))
        notes = sorted({c["details"].get("note") for c in mine if c.get("details", {}).get("note")})
        section.blocks += [f"{attack}: {note}" for note in notes]
    exposure = [c for c in cells if c["attack_name"] == "exposure" and c["details"].get("canaries")]
    if exposure:
        section.blocks.append(Figure("exposure-vs-repetitions", "Canary exposure against repetition count "
                                     "(0 = reference canaries never inserted)", exposure_plot_png(exposure)))
    return section


def _view(cell: dict) -> str:
    return cell["observer"] if cell["client"] is None else f"{cell['observer']}/{cell['client']}"


def exposure_plot_png(cells: list[dict]) -> bytes:
    fig, ax = _axes(7.5, 4.2)
    ticks: set[int] = set()
    for cell in cells:
        by_reps: dict[int, list[float]] = {}
        for canary in cell["details"]["canaries"] + cell["details"].get("reference_canaries", []):
            if canary.get("exposure") is not None:
                by_reps.setdefault(int(canary["repetitions"]), []).append(canary["exposure"])
        reps = sorted(by_reps)
        ticks.update(reps)
        ax.plot(reps, [np.mean(by_reps[r]) for r in reps], marker="o", linewidth=1.2,
                label=f"{cell['algorithm']}/{_defense(cell)} {_view(cell)}")
    ax.set(xscale="symlog", xlabel="repetitions of the canary in training data (0: never inserted)",
           ylabel="exposure (bits)", xticks=sorted(ticks), xticklabels=[str(t) for t in sorted(ticks)],
           title="Canary exposure")
    return _png(fig, ax)


def rounds_plot_png(cells: list[dict], title: str) -> bytes:
    """AUC over rounds, one line per training and view (the FEDPIT paper's view of leakage over training)."""
    fig, ax = _axes(7.5, 4.2)
    lines: dict[str, list[tuple[int, float]]] = {}
    for c in cells:
        if c["metrics"].get("auc") is not None:
            lines.setdefault(f"{c['algorithm']}/{_defense(c)} {_view(c)}", []).append((c["round"], c["metrics"]["auc"]))
    for label, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1.2, label=label)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="round (0 = before training)", ylabel="AUC", title=title)
    return _png(fig, ax)


def _axes(width: float, height: float):
    """A figure and its axes on the non-interactive backend (reports are written without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def _png(fig, ax) -> bytes:
    """PNG bytes of the figure, legend beside the axes so many curves stay legible."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def rounds_section(results: dict) -> Section | None:
    membership = [c for c in results["cells"] if c["family"] == "membership"]
    figures = []
    for attack in dict.fromkeys(c["attack"] for c in membership):
        for observer in OBSERVER_ORDER:
            cells = [c for c in membership if c["attack"] == attack and c["observer"] == observer]
            if len({c["round"] for c in cells}) > 1:
                figures.append(Figure(_slug(f"rounds-{attack}-{observer}"), f"AUC of {attack} on the {observer} "
                                      f"view over rounds", rounds_plot_png(cells, f"{attack}: {observer} view")))
    return Section("Leakage over rounds", figures) if figures else None


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
    cells = [c for c in results["cells"] if c["family"] == "poisoning"]
    rows = [[c["algorithm"], c["defense"], c["scenario"], " + ".join(c["details"].get("attacks", [])),
             ", ".join(str(m) for m in c["details"].get("malicious_clients", [])),
             fmt(c["metrics"].get("asr")), fmt(c["metrics"].get("false_trigger_rate")),
             fmt(c["metrics"].get("clean_model_asr")),
             " / ".join(fmt(c["metrics"].get(k)) for k in ("target_recall", "target_recall_untriggered",
                                                            "clean_model_target_recall")),
             f"{fmt(c['metrics'].get('loss'))} ({_signed(c['metrics'].get('loss_increase'))})",
             f"{fmt(c['metrics'].get('rouge_l'))} ({_signed(-c['metrics']['rouge_l_drop'] if c['metrics'].get('rouge_l_drop') is not None else None)})",
             fmt(c["metrics"].get("detection_rate")), fmt(c["metrics"].get("false_exclusion_rate"))]
            for c in cells]
    return Table(["algorithm", "defense", "scenario", "attacks", "malicious clients", "ASR", "false trigger",
                  "clean-model ASR", "target recall: trigger / none / clean model", "global loss (change)", "global ROUGE-L (change)", "detection",
                  "false exclusion"], rows)


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


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


def poisoning_section(results: dict) -> Section | None:
    cells = [c for c in results["cells"] if c["family"] == "poisoning"]
    if not cells:
        return None
    section = Section("Poisoning", [POISONING_INTRO, poisoning_table(results)])
    backdoor = [c for c in cells if c["metrics"].get("asr") is not None]
    if backdoor:
        section.blocks.append(Figure("poisoning-asr", "Backdoor attack success rate by defense (black: the clean "
                                     "model's rate on the same triggered prompts)",
                                     poisoning_bars_png(backdoor, "asr", "attack success rate", "Backdoor ASR",
                                                        baseline="clean_model_asr")))
        section.blocks.append(Figure("poisoning-target-recall", "Backdoor target recall by defense: share of the "
                                     "target's words in the triggered answers (black: the clean model's)",
                                     poisoning_bars_png(backdoor, "target_recall", "target recall",
                                                        "Backdoor target recall", baseline="clean_model_target_recall")))
    if any(c["metrics"].get("rouge_l_drop") is not None for c in cells):
        section.blocks.append(Figure("poisoning-utility", "Drop of the global model's ROUGE-L against the clean "
                                     "training of the same defense",
                                     poisoning_bars_png(cells, "rouge_l_drop", "ROUGE-L drop", "Utility drop")))
    detected = [c for c in cells if c["details"].get("detection_rounds")]
    if detected:
        section.blocks.append(Figure("poisoning-detection", "Detection and false exclusion per round (selecting "
                                     "rules)", detection_plot_png(detected)))
    examples = [[c["algorithm"], c["defense"], c["scenario"], e["prompt"], e["answer"]]
                for c in backdoor for e in c["details"].get("examples", [])[:1]]
    if examples:
        section.blocks += ["Triggered prompts and the global model's answers (first prompt per training):",
                           Table(["algorithm", "defense", "scenario", "triggered prompt", "answer"], examples)]
    return section


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def synthetic_section(results: dict) -> Section | None:
    with_synthetic = [t for t in results["trainings"] if t.get("synthetic")]
    if not with_synthetic:
        return None
    counts = ["candidates", "accepted", "near_duplicate", "truncated", "malformed", "length", "empty",
              "response_dropped"]
    section = Section("Self-generated data", [
        "Counts over all clients and rounds: candidates generated by in-context learning, accepted records, "
        "and what each filter dropped.",
        Table(["algorithm", "defense", *counts],
              [[t["algorithm"], _defense(t), *[fmt(t["synthetic"].get(k, 0)) for k in counts]] for t in with_synthetic])])
    examples = [[t["algorithm"], _defense(t), e["instruction"], e["output"]]
                for t in with_synthetic for e in t.get("synthetic_examples", [])]
    if examples:
        section.blocks += ["Examples from the final round:", Table(["algorithm", "defense", "instruction", "response"],
                                                                    examples)]
    return section


def provenance_table(results: dict) -> Table:
    model = results.get("model", {})
    rows = [["fedleak", str(results.get("fedleak_version"))], ["git commit", str(results.get("git_commit"))],
            ["seed", str(results.get("seed"))], ["config", str(results.get("config_path"))],
            ["started", str(results.get("started_at"))], ["finished", str(results.get("finished_at"))],
            ["model", f"{model.get('name')} ({model.get('parameters', '?')} parameters)"],
            ["data", json.dumps(results.get("data", {}))]]
    rows += [[name, str(version)] for name, version in results.get("versions", {}).items()]
    return Table(["what", "value"], rows)


def build_document(results: dict) -> list[Section]:
    membership = [c for c in _final(results) if c["family"] == "membership"]
    figures = []
    for attack in dict.fromkeys(c["attack"] for c in membership):
        for observer in OBSERVER_ORDER:
            cells = [c for c in membership if c["attack"] == attack and c["observer"] == observer]
            if cells:
                figures.append(Figure(_slug(f"roc-{attack}-{observer}"), f"ROC of {attack} on the {observer} view "
                                      f"(log-log)", roc_plot_png(cells, f"{attack}: {observer} view")))
    sections = [
        Section("Summary", [INTRO, leakage_table(results), utility_table(results),
                            "Utility on held-out records: mean response-token loss, perplexity, and ROUGE-L F1 of "
                            "greedy answers; `client` columns average the clients' final models."]),
        Section("Membership inference", [membership_table(results), *figures]),
    ]
    for optional in (rounds_section(results), extraction_section(results), poisoning_section(results),
                     synthetic_section(results)):
        if optional:
            sections.append(optional)
    sections.append(Section("Provenance", [provenance_table(results)]))
    return sections


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    lines = ["# fedleak leakage report", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}](plots/{block.name}.png)")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:12px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;min-width:3em}
th{background:#f3f3f3;position:sticky;top:0}figure{display:inline-block;margin:.5em}img{max-width:100%;border:1px solid #eee}
p{max-width:60em}"""


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
                            f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
            else:  # paragraphs carry Markdown `code` spans; escape first, then mark them up
                body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(block)) + "</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedleak leakage report</title>"
            f"<style>{STYLE}</style></head>\n<body><h1>fedleak leakage report</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    sections = build_document(load_results(run_dir))
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                atomic_write_bytes(run_dir / "plots" / f"{block.name}.png", block.png)
    atomic_write_text(run_dir / "report.md", render_markdown(sections))
    atomic_write_text(run_dir / "report.html", render_html(sections))
    return run_dir / "report.md", run_dir / "report.html"
