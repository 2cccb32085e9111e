"""Each distinct model file is scored once per record set: FEDIT's `upload/i` and `client/i` load the same
adapter file, so they share one statistics cache (`eval/attacking.py` `adapter_identity`), with cells
unchanged."""

from __future__ import annotations

import json
import shutil

import numpy as np

from fedleak.attacks.membership import stats
from fedleak.eval import attacking

MATRIX = """
[matrix]
algorithms = ["fedit"]
defenses = ["none"]
attacks = [{ name = "loss", observers = ["global", "upload", "client"] },
           { name = "min_k_pp", observers = ["upload", "client"] }]
"""

VOLATILE = {"timings", "cost"}  # wall-clock fields


def _run(config, out, monkeypatch, *, shared: bool):
    from fedleak.eval.matrix import run_matrix

    for cached in out.glob("**/attacks"):  # the trainings stay cached, every attack runs again
        shutil.rmtree(cached)
    passes = []
    real = stats.compute_stats

    def counting(model, tokenizer, records, **kwargs):
        passes.append(len(records))
        return real(model, tokenizer, records, **kwargs)

    monkeypatch.setattr(stats, "compute_stats", counting)
    if not shared:  # the old behaviour: every view its own cache
        monkeypatch.setattr(attacking, "adapter_identity", lambda folder, view: (str(folder), view))
    results = run_matrix(config, out, progress=False)
    monkeypatch.undo()
    cells = [{k: v for k, v in c.items() if k not in VOLATILE} for c in results["cells"]]
    return cells, passes, sum(c["timings"]["attack_seconds"] for c in results["cells"])


def test_views_of_one_adapter_file_share_their_passes_and_keep_their_numbers(tmp_path, tiny_run_config, monkeypatch):
    from fedleak.eval.config import load_config

    (tmp_path / "run.toml").write_text(tiny_run_config + MATRIX)
    config = load_config(tmp_path / "run.toml")
    out = tmp_path / "out"
    _run(config, out, monkeypatch, shared=True)  # trains (and scores what training scores) once
    alone_cells, alone_passes, alone_seconds = _run(config, out, monkeypatch, shared=False)
    shared_cells, shared_passes, shared_seconds = _run(config, out, monkeypatch, shared=True)
    print(f"compute_stats calls: {len(alone_passes)} -> {len(shared_passes)}; attack seconds "
          f"{alone_seconds:.2f} -> {shared_seconds:.2f}")
    assert json.dumps(shared_cells, sort_keys=True) == json.dumps(alone_cells, sort_keys=True)  # unchanged (NaN too)
    final = max(c["round"] for c in shared_cells)
    views = {(c["attack"], c["observer"], c["client"]): c for c in shared_cells if c["round"] == final}
    clients = sorted({client for _, observer, client in views if observer == "upload"})
    assert clients
    for attack in ("loss", "min_k_pp"):
        for i in clients:  # upload/i and client/i: one file, one set of numbers
            upload, client = views[(attack, "upload", i)], views[(attack, "client", i)]
            for field in ("metrics", "record_ids", "roc", "audit"):
                assert json.dumps(upload[field], sort_keys=True) == json.dumps(client[field], sort_keys=True), field
    # The target passes of client/i are gone: per view, the members + non-members pass and the audit's.
    assert len(shared_passes) < len(alone_passes)
    # Each client/i view scores nothing of its own: every pass of the shared run is one of the unshared run's.
    unshared_client_passes = len(alone_passes) - len(shared_passes)
    assert unshared_client_passes > 0 and np.isfinite(shared_seconds)
