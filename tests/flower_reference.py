"""The matrix both Flower modules compare with fedleak's own round loop: tests/test_flower.py runs it on the
Simulation Engine, tests/test_flower_deployment.py trains its FEDPIT under DP-SGD through SuperNodes. Its
in-process run is the reference of both, trained once per session (conftest's `flower_inprocess`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# FEDIT under FedAvg (the parity case), here under a backdoor whose malicious client poisons its data on
# the client and boosts its update on the server, and FEDPIT under DP-SGD with a budget: its local adapter,
# synthetic records and accountant live in each node's state; FEDIT under secure aggregation, which on Flower is
# its SecAgg+ protocol (in process: the simulated view). The robust rules and DP-FedAvg run in the same
# `ServerSide.finish_round` on both engines, after the same uploads, so FedAvg's parity stands for them (the median
# and DP-FedAvg ran here too until the test's time had to shrink).
MATRIX = """
[matrix]
algorithms = ["fedit", { name = "fedpit", synthetic_per_round = 4, max_attempts = 6 }]
defenses = ["none", { name = "dp_sgd", target_epsilon = 8.0 }, "secagg"]
attacks = [{ name = "loss", observers = ["global", "upload", "client"], rounds = "all" }]
scenarios = [{ name = "backdoor", clients = [1], attacks = [{ name = "backdoor", poison_rate = 1.0 },
                                                              { name = "scaling", boost = 2.0 }] }]
include = [
    { algorithm = "fedit", defense = "none", scenario = "backdoor" },
    { algorithm = "fedpit", defense = "dp_sgd", scenario = "clean" },
    { algorithm = "fedit", defense = "secagg", scenario = "clean" },
]
"""
# The deployment's training: the same settings, so the same adapters, accountant and synthetic records.
FEDPIT = "fedpit(max_attempts=6,synthetic_per_round=4)/dp_sgd(target_epsilon=8.0)"


def run_inprocess(folder: Path, tiny_run_config: str) -> Path:
    """`fedleak run` of the matrix on one torch thread (Flower's clients run on one: the same float order)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.toml"
    config.write_text(tiny_run_config + MATRIX)
    out = folder / "inprocess"
    proc = subprocess.run([sys.executable, "-m", "fedleak", "run", str(config), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
