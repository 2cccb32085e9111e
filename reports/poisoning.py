"""Poisoning scenarios: per training under attack, the backdoor's success against the clean model's rate,
the damage to the global model's utility and which uploads a selecting rule excluded, with bar and
per-round plots and the triggered prompts' answers (identifiers redacted). Rates carry their exact
binomial intervals (Clopper and Pearson 1934), and two rates are compared only when their intervals
do not overlap."""

from __future__ import annotations

from typing import Callable

from fedleak.reports.document import Figure, Section, Table, is_number, signed
from fedleak.reports.merge import Merged, interval, metric_text
from fedleak.reports.plots import axes, png

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
    "Multi-Krum, Bulyan): the share of malicious and of honest uploads the rule left out, over all rounds. "
    "Brackets: the exact binomial (Clopper-Pearson) interval of each rate at the run's `attack.confidence`, over "
    "the prompts (ASR, false trigger, clean-model ASR) or the uploads (detection, false exclusion); with several "
    "seeds, the interval across seeds. The comparison column says whether the ASR is higher or lower than the "
    "same model's false trigger rate (a backdoor proper: the target comes with the trigger), than the clean "
    "model's ASR (an effect at all) and than FedAvg's ASR (defense `none`, same scenario: what the defense "
    "buys), each only when the two intervals do not overlap; otherwise they are not distinguishable at this "
    "number of prompts.")


def distinguishable(a: tuple | None, b: tuple | None) -> str:
    """How rate a compares with rate b by their intervals: "higher" or "lower" only when the intervals do
    not overlap (a conservative test: the right side to err on before crediting a defense), else "not
    distinguishable"; "n/a" when either interval is missing.

    Args:
        a: (low, high) of the rate being described, or None.
        b: (low, high) of the rate it is compared with, or None.
    """
    if not a or not b or not all(is_number(v) for v in (*a, *b)):
        return "n/a"
    if a[0] > b[1]:
        return "higher"
    if a[1] < b[0]:
        return "lower"
    return "not distinguishable"


def asr_comparisons(cell: dict, cells: list[dict]) -> tuple[str, str, str]:
    """A backdoor cell's ASR against its own false trigger rate (is the target tied to the trigger?), the
    clean model's ASR (is there an effect?) and FedAvg's ASR in the same scenario (does the defense help?).

    Args:
        cell: a poisoning cell with an ASR.
        cells: every poisoning cell of the run (FedAvg's is the one with defense `none`, same algorithm and scenario).

    Returns:
        (against the false trigger rate, the clean model, FedAvg): each "higher", "lower", "not
        distinguishable" or "n/a" ("(FedAvg)" for FedAvg's own cell).
    """
    own = interval(cell, "asr")
    fedavg = next((c for c in cells if c["defense"] == "none" and c["algorithm"] == cell["algorithm"]
                   and c["scenario"] == cell["scenario"]), None)
    versus_fedavg = ("(FedAvg)" if fedavg is cell else
                     distinguishable(own, interval(fedavg, "asr")) if fedavg else "n/a")
    return (distinguishable(own, interval(cell, "false_trigger_rate")),
            distinguishable(own, interval(cell, "clean_model_asr")), versus_fedavg)


def poisoning_table(run: Merged) -> Table:
    """One row per poisoning cell: the attacks, the malicious clients, success, damage and detection."""
    cells = run.of_family("poisoning", every_round=True)
    rows = []
    for c in cells:
        m, details = c["metrics"], c.get("details") or {}
        rouge_change = -m["rouge_l_drop"] if is_number(m.get("rouge_l_drop")) else None
        versus = " / ".join(asr_comparisons(c, cells)) if is_number(m.get("asr")) else "n/a"
        rows.append([c["algorithm"], c["defense"], c["scenario"], " + ".join(details.get("attacks", [])),
                     ", ".join(str(i) for i in details.get("malicious_clients", [])),
                     str(details.get("prompts", "n/a")),
                     metric_text(c, "asr"), metric_text(c, "false_trigger_rate"), metric_text(c, "clean_model_asr"),
                     versus,
                     " / ".join(metric_text(c, k) for k in ("target_recall", "target_recall_untriggered",
                                                         "clean_model_target_recall")),
                     f"{metric_text(c, 'loss')} ({signed(m.get('loss_increase'))})",
                     f"{metric_text(c, 'rouge_l')} ({signed(rouge_change)})",
                     metric_text(c, "detection_rate"), metric_text(c, "false_exclusion_rate")])
    return Table(["algorithm", "defense", "scenario", "attacks", "malicious clients", "prompts", "ASR",
                  "false trigger", "clean-model ASR", "ASR vs false trigger / clean model / FedAvg", "target recall: trigger / none / clean model", "global loss (change)",
                  "global ROUGE-L (change)", "detection", "false exclusion"], rows)


def poisoning_bars_png(cells: list[dict], metric: str, ylabel: str, title: str, *,
                       baseline: str | None = None) -> bytes:
    """Grouped bars: one group per defense, one bar per scenario (and the clean baseline as a marker); a
    metric with an interval gets it as an error bar."""
    fig, ax = axes(7.5, 4.2)
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    scenarios = list(dict.fromkeys(f"{c['algorithm']} {c['scenario']}" for c in cells))
    width = 0.8 / max(len(scenarios), 1)
    for j, scenario in enumerate(scenarios):
        mine = {c["defense"]: c for c in cells if f"{c['algorithm']} {c['scenario']}" == scenario}
        xs = [i + (j - (len(scenarios) - 1) / 2) * width for i, d in enumerate(defenses) if d in mine]
        heights = [mine[d]["metrics"].get(metric) or 0.0 for d in defenses if d in mine]
        bounds = [interval(mine[d], metric) for d in defenses if d in mine]
        errors = None
        if all(b is not None for b in bounds):  # matplotlib wants distances below and above each bar
            errors = [[max(h - b[0], 0.0) for h, b in zip(heights, bounds)],
                      [max(b[1] - h, 0.0) for h, b in zip(heights, bounds)]]
        ax.bar(xs, heights, width=width, label=scenario, yerr=errors, capsize=3 if errors else 0)
        if baseline:
            ax.plot(xs, [mine[d]["metrics"].get(baseline) or 0.0 for d in defenses if d in mine], linestyle="none",
                    marker="_", markersize=14, color="black", label="clean model" if j == 0 else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xticks=range(len(defenses)), ylabel=ylabel, title=title)
    ax.set_xticklabels(defenses, rotation=20, ha="right", fontsize=7)
    return png(fig, ax)


def detection_plot_png(cells: list[dict]) -> bytes:
    """Per round: the share of malicious and of honest uploads a selecting rule excluded."""
    fig, ax = axes(7.5, 4.2)
    for c in cells:
        rows = [r for r in c["details"]["detection_rounds"] if r["detection_rate"] is not None]
        ax.plot([r["round"] for r in rows], [r["detection_rate"] for r in rows], marker="o", linewidth=1.2,
                label=f"{c['algorithm']}/{c['defense']} [{c['scenario']}] detection")
        rows = [r for r in c["details"]["detection_rounds"] if r["false_exclusion_rate"] is not None]
        ax.plot([r["round"] for r in rows], [r["false_exclusion_rate"] for r in rows], marker="x", linestyle=":",
                linewidth=1.0, label=f"{c['algorithm']}/{c['defense']} [{c['scenario']}] false exclusion")
    ax.set(xlabel="round", ylabel="share of uploads excluded", ylim=(-0.05, 1.05),
           title="Malicious (detection) and honest (false exclusion) uploads excluded")
    return png(fig, ax)


def poisoning_section(run: Merged, redact: Callable[[str], str]) -> Section | None:
    """The poisoning table, its plots and the triggered prompts' answers; None without poisoning cells."""
    cells = run.of_family("poisoning", every_round=True)
    if not cells:
        return None
    section = Section("Poisoning", [POISONING_INTRO, poisoning_table(run)])
    backdoor = [c for c in cells if is_number(c["metrics"].get("asr"))]
    if backdoor:
        section.blocks.append(Figure("poisoning-asr", "Backdoor attack success rate by defense, with its "
                                     "Clopper-Pearson interval (black: the clean model's rate on the same "
                                     "triggered prompts)",
                                     poisoning_bars_png(backdoor, "asr", "attack success rate", "Backdoor ASR",
                                                        baseline="clean_model_asr")))
        section.blocks.append(Figure("poisoning-target-recall", "Backdoor target recall by defense: share of the "
                                     "target's words in the triggered answers (black: the clean model's)",
                                     poisoning_bars_png(backdoor, "target_recall", "target recall",
                                                        "Backdoor target recall", baseline="clean_model_target_recall")))
    if any(is_number(c["metrics"].get("rouge_l_drop")) for c in cells):
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
