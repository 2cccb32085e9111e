"""Leakage report (Markdown and self-contained HTML) rendered from a run's results.json only: reads the
file, merges the results across seeds once, assembles the sections in order and writes report.md,
report.html and plots/. With several seeds, every table shows the mean over seeds with its across-seed
interval (the results' `aggregates`); text that may carry private identifiers goes through
`redact.redactor` first. The sections live in their own modules; this is the entry point the CLI uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_bytes, atomic_write_text
from fedleak.reports.defenses import defenses_section
from fedleak.reports.document import Figure, Section
from fedleak.reports.dp import dp_section
from fedleak.reports.extraction import extraction_section
from fedleak.reports.fit import fit_section
from fedleak.reports.membership import membership_section
from fedleak.reports.merge import merged
from fedleak.reports.poisoning import poisoning_section
from fedleak.reports.provenance import provenance_section
from fedleak.reports.redact import redactor
from fedleak.reports.server import server_section
from fedleak.reports.render import render_html, render_markdown
from fedleak.reports.rounds import rounds_section
from fedleak.reports.safety import safety_section
from fedleak.reports.summary import summary_section
from fedleak.reports.sweep import sweep_section
from fedleak.reports.synthetic import synthetic_section


def load_results(run_dir: Path) -> dict:
    """run_dir/results.json, or a one-line error saying what the folder should be."""
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise FedleakError(f"{path} not found: give the output folder of a finished `fedleak run`") from None
    except json.JSONDecodeError as exc:
        raise FedleakError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): rerun `fedleak run`") from None
    except UnicodeDecodeError as exc:
        raise FedleakError(f"{path} is not UTF-8 text (byte {exc.start}): give the output folder of a `fedleak run`, "
                           f"or rerun it") from None
    except OSError as exc:
        raise FedleakError(f"{path} cannot be read ({exc.strerror or exc}): give the output folder of a finished "
                           f"`fedleak run`") from None
    schema = results.get("schema") if isinstance(results, dict) else None
    if not str(schema or "").startswith("fedleak-results/"):
        raise FedleakError(f"{path}: field 'schema' is {schema!r}: not a fedleak results file; give the output "
                           f"folder of a `fedleak run`")
    return results


def build_document(results: dict, *, show_secrets: bool = False) -> list[Section]:
    """The report's sections in order; those without anything to show are left out."""
    run = merged(results)
    redact = redactor(results, show_secrets=show_secrets)
    fit = fit_section(run)
    warning = fit is not None and not run.results["model_fit"]["fits"]  # before every number it qualifies
    sections = [fit if warning else None, summary_section(run, show_secrets=show_secrets), defenses_section(run), sweep_section(run),
                dp_section(run), membership_section(run), server_section(run), rounds_section(run),
                extraction_section(run, redact),
                poisoning_section(run, redact), safety_section(run, redact), synthetic_section(run, redact),
                None if warning else fit,
                provenance_section(run)]
    return [s for s in sections if s]


def write_report(run_dir: Path, *, show_secrets: bool = False) -> tuple[Path, Path]:
    """report.md, report.html and plots/ from run_dir/results.json; identifiers redacted unless show_secrets."""
    run_dir = Path(run_dir)
    sections = build_document(load_results(run_dir), show_secrets=show_secrets)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                atomic_write_bytes(run_dir / "plots" / f"{block.name}.png", block.png)
    atomic_write_text(run_dir / "report.md", render_markdown(sections))
    atomic_write_text(run_dir / "report.html", render_html(sections))
    return run_dir / "report.md", run_dir / "report.html"
