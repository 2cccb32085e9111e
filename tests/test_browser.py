"""The HTML report in a real browser (Debian's chromium driven by playwright): it loads without errors,
every figure decodes, model output carrying HTML stays text and runs nothing. Leaves a full-page
screenshot in test-artifacts/ (or $FEDLEAK_TEST_ARTIFACTS) for a person to look at."""

import json
import os
import shutil
from pathlib import Path

import pytest

from fedleak.reports.report import write_report
from test_report import IMG, SCRIPT, rich_results

REPO = Path(__file__).resolve().parent.parent
# Debian's build, never playwright's own browser download (machines here are offline).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")


def _artifacts() -> Path:
    folder = Path(os.environ.get("FEDLEAK_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_report_in_chromium(tmp_path):
    executable = _chromium()
    if executable is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright comes with the dev extras (.[dev])")
    (tmp_path / "results.json").write_text(json.dumps(rich_results(seeds=(0, 1))))
    markdown_path, html_path = write_report(tmp_path)
    figures = markdown_path.read_text().count("](plots/")
    assert figures == len(list((tmp_path / "plots").glob("*.png"))) > 6

    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth])")
            text = page.evaluate("document.body.innerText")
            pwned = page.evaluate("typeof window.__pwned")
            page.screenshot(path=str(_artifacts() / "report.png"), full_page=True)
        finally:
            browser.close()

    assert errors == []
    assert len(images) == figures and all(complete and width > 0 for complete, width in images)
    assert SCRIPT in text and IMG in text  # shown as text...
    assert pwned == "undefined"  # ...and never run
