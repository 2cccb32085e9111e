"""Training-data extraction: each extraction attack's metrics per view, what the attacks got out (model
outputs, identifiers redacted) and canary exposure against the number of repetitions."""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedleak.reports.document import Figure, Section, Table, defense_label, fmt, is_number, view
from fedleak.reports.merge import Merged, is_interval_key, metric_text
from fedleak.reports.plots import axes, png

EXAMPLES_PER_KIND = 2  # per cell and kind of example: enough to see what leaks, short enough to read
EXTRACTION_INTRO = (
    "Extraction attacks against each view's own training data (for `upload` and `client` views, that client's "
    "records). `discoverable`: greedy answers to the training prompts that reproduce the private response "
    "exactly or at ROUGE-L of at least tau, and the prefix/suffix protocol; `pii`: private identifiers that "
    "appear verbatim in answers to prompts that do not contain them; `exposure`: log2(candidates) - log2(rank) "
    "of each canary's secret; `generate_rank`: precision at k of sampled generations ranked by perplexity, "
    "zlib and reference ratios; `adversarial_prompt`: other clients' canary secrets a GCG suffix makes the model "
    "write (on the global view, where it was optimised, and carried unchanged to other views); "
    "`adversarial_trigger`: held-out answers carrying a backdoor's target with the suffix and no trigger.")


def extraction_examples(cell: dict, redact: Callable[[str], str]) -> list[tuple[str, str]]:
    """(what, model output) pairs from an extraction cell's details, identifiers redacted."""
    d = cell.get("details") or {}
    out = []
    for e in d.get("examples", [])[:EXAMPLES_PER_KIND]:
        what = "exact reproduction" if e.get("exact") else f"near-verbatim answer (ROUGE-L {fmt(e.get('rouge'), 2)})"
        out.append((f"{what} of {redact(str(e.get('record_id')))}", redact(str(e.get("generated", "")))))
    for e in d.get("prefix_suffix_examples", [])[:EXAMPLES_PER_KIND]:
        out.append((f"suffix of {redact(str(e.get('record_id')))} after its prefix", redact(str(e.get("suffix", "")))))
    for kind in ("own", "cross"):
        for e in d.get(f"{kind}_examples", [])[:EXAMPLES_PER_KIND]:
            out.append((f"{kind} {e.get('type')} {redact(str(e.get('identifier')))} leaked",
                        redact(str(e.get("output", "")))))
    for text in d.get("answers_with", [])[:EXAMPLES_PER_KIND]:
        out.append(("held-out prompt's answer with the adversarial suffix, no trigger", redact(str(text))))
    hits = {h["text"]: h for ranking in (d.get("top") or {}).values() for h in ranking if h.get("hit")}
    for text, h in list(hits.items())[:EXAMPLES_PER_KIND]:
        out.append((f"sampled generation with private text: {redact(str(h.get('why', '')))}", redact(text)))
    return out


def exposure_plot_png(cells: list[dict]) -> bytes:
    """Mean canary exposure per repetition count, one line per cell."""
    fig, ax = axes(7.5, 4.2)
    ticks: set[int] = set()
    for cell in cells:
        by_reps: dict[int, list[float]] = {}
        for canary in cell["details"]["canaries"] + cell["details"].get("reference_canaries", []):
            if is_number(canary.get("exposure")):
                by_reps.setdefault(int(canary["repetitions"]), []).append(canary["exposure"])
        reps = sorted(by_reps)
        ticks.update(reps)
        ax.plot(reps, [np.mean(by_reps[r]) for r in reps], marker="o", linewidth=1.2,
                label=f"{cell['algorithm']}/{defense_label(cell)} {view(cell)}")
    ax.set(xscale="symlog", xlabel="repetitions of the canary in training data (0: never inserted)",
           ylabel="exposure (bits)", xticks=sorted(ticks), xticklabels=[str(t) for t in sorted(ticks)],
           title="Canary exposure")
    return png(fig, ax)


def extraction_section(run: Merged, redact: Callable[[str], str]) -> Section | None:
    """Per extraction attack its metrics per view, then the examples and the exposure plot; None
    without extraction cells."""
    cells = run.of_family("extraction")
    if not cells:
        return None
    section = Section("Training-data extraction", [EXTRACTION_INTRO])
    for attack in dict.fromkeys(c["attack"] for c in cells):
        mine = [c for c in cells if c["attack"] == attack]
        metrics = list(dict.fromkeys(m for c in mine for m in c["metrics"] if not is_interval_key(m, c["metrics"])))
        section.blocks.append(Table(
            ["algorithm", "defense", "attack", "view", *metrics],
            [[c["algorithm"], defense_label(c), c["attack"], view(c), *[metric_text(c, m) for m in metrics]]
             for c in mine]))
        notes = sorted({c["details"].get("note") for c in mine if (c.get("details") or {}).get("note")})
        section.blocks += [f"{attack}: {note}" for note in notes]
    examples = [[c["algorithm"], defense_label(c), c["attack"], view(c), what, text]
                for c in cells for what, text in extraction_examples(c, redact)]
    if examples:
        section.blocks += ["What the attacks got out (model outputs, up to two per attack, view and kind"
                           f"{', first seed' if len(run.seeds) > 1 else ''}):",
                           Table(["algorithm", "defense", "attack", "view", "what", "model output"], examples)]
    exposure = [c for c in cells if c.get("attack_name") == "exposure" and (c.get("details") or {}).get("canaries")]
    if exposure:
        section.blocks.append(Figure("exposure-vs-repetitions", "Canary exposure against repetition count "
                                     "(0 = reference canaries never inserted)", exposure_plot_png(exposure)))
    return section
