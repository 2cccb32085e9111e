"""The results file: one typed schema for every run (provenance, trainings, cells).

`results.json` holds the config, fedleak and library versions, the git commit, the seed, one record
per training (utility, timings, per-round history) and one record per attack cell (metrics, ROC
points, timings). `results.csv` flattens the cells for pandas and spreadsheets.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from fedleak.common.io import atomic_write_json, atomic_write_text

SCHEMA = "fedleak-results/7"  # 2: rounds, audit bounds, extraction details; 3: poisoning; 4: seeds, cost, machine;
# 5: identifiers (what the report redacts); 6: matched non-members and blind baselines, resolvable TPRs, rate
# intervals, planned DP budgets, data quality and file provenance, plug-ins, refused uploads; 7: model fit
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "numpy", "scikit-learn", "matplotlib")
CELL_KEYS = ("algorithm", "defense", "scenario", "attack", "family", "observer", "client", "round", "seed",
             "n_members", "n_nonmembers")


SCHEMA_FILE = Path(__file__).with_name("results.schema.json")  # the documented schema of results.json


def validate_results(results: dict) -> None:
    """Check a results dict against results.schema.json.

    Args:
        results: a parsed results.json (NaN/inf are read as the null they are written as).

    Raises:
        ValueError: naming the JSON path and the rule of the first (up to five) violations.
    """
    import json

    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(_finite(results)), key=lambda e: list(e.absolute_path))
    if errors:
        raise ValueError(f"results.json does not follow {SCHEMA_FILE.name}: "
                         + "; ".join(f"{e.json_path}: {e.message[:200]}" for e in errors[:5]))


def validate_file(path: Path) -> dict:
    """`fedleak validate`: read a results.json (or the run folder holding one) and check it against the schema.

    Returns:
        the parsed results.

    Raises:
        FedleakError: the file is missing, is not JSON, or breaks the schema (the message names the path).
    """
    import json

    from fedleak.common.errors import FedleakError

    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedleakError(f"{path}: not found: give a run folder or its results.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedleakError(f"{path}: not JSON ({exc}): give the results.json that fedleak wrote") from None
    except OSError as exc:  # a folder named results.json, no permission
        raise FedleakError(f"{path}: cannot be read ({exc.strerror or exc}): give a readable results.json "
                           f"that fedleak wrote") from None
    if not isinstance(results, dict):
        raise FedleakError(f"{path}: a results file is a JSON object: give the results.json that fedleak wrote")
    try:
        validate_results(results)
    except ValueError as exc:
        raise FedleakError(f"{path}: {exc}: fix those fields, or give a results.json that fedleak wrote") from None
    return results


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("fedleak", *LIBRARIES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info(*, jobs: int = 1) -> dict:
    """The machine a run's timings belong to (numbers also depend on torch's thread count)."""
    import os

    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jobs": jobs}


def git_commit() -> str | None:
    """HEAD of the checkout fedleak runs from, with '-dirty' if it has uncommitted changes."""
    path = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _finite(obj):
    """NaN/inf become null so results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def metric_names(cells: list[dict]) -> list[str]:
    names: list[str] = []
    for cell in cells:
        names += [m for m in cell["metrics"] if m not in names]
    return names


def cells_csv(cells: list[dict]) -> str:
    metrics = metric_names(cells)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CELL_KEYS, *metrics, "wall_seconds", "upload_bytes_per_client_per_round"])
    for cell in cells:
        cost = cell.get("cost", {})
        writer.writerow([("" if cell.get(k) is None else cell.get(k)) for k in CELL_KEYS]
                        + [("" if cell["metrics"].get(m) is None else cell["metrics"][m]) for m in metrics]
                        + [("" if cost.get(k) is None else cost[k])
                           for k in ("wall_seconds", "upload_bytes_per_client_per_round")])
    return buffer.getvalue()


def write_results(out_dir: Path, results: dict) -> Path:
    results = _finite(results)
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.csv", cells_csv(results["cells"]))
    atomic_write_json(out_dir / "results.json", results)
    return out_dir / "results.json"
