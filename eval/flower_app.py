"""fedleak on a deployed Flower federation (the Deployment Engine): the apps `flwr run` starts, and the app
folder that names them.

`server_app` runs on the SuperLink's side: it reads the run config (`config`: the fedleak TOML on the server,
`out`: the output folder, `training`: which training of the matrix, by label), trains it with the connected
SuperNodes as its clients (one per client, each started with `--node-config "partition-id=I data-file=F
out-dir=D"`) and writes the server's views (`global`, `upload/i`) and training.json under
`out/trainings/<name>/`, as `fedleak run` does, so `fedleak attack` probes them unchanged. `client_app` runs
on each SuperNode: it trains on the node's own records and writes the node's `client/i` view into its
`out-dir`; that view never leaves the node.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flwr.serverapp import ServerApp

from fedleak.common.errors import FedleakError
from fedleak.eval.flower_engine import build_client_side
from fedleak.federated.flower.engine import client_app as _client_app

log = logging.getLogger("fedleak")

client_app = _client_app(build_client_side)
server_app = ServerApp()

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedleak-flower-app"
version = "1.0.0"
description = "fedleak's ServerApp and ClientApp (the code is the installed fedleak package)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedleak"

[tool.flwr.app.components]
serverapp = "fedleak.eval.flower_app:server_app"
clientapp = "fedleak.eval.flower_app:client_app"

[tool.flwr.app.config]
config = ""
out = ""
training = ""
"""


def write_app(folder: Path) -> Path:
    """A Flower app folder (`flwr run FOLDER ...`) whose components are fedleak's installed apps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    (folder / "fedleak_flower_app.py").write_text('"""fedleak\'s apps live in the installed package: '
                                                   'fedleak.eval.flower_app."""\n')
    return folder


def pick_training(config, label: str):
    """The federated training of `config`'s matrix whose label (algorithm/defense[/scenario]) or folder name is
    `label` (default: the first), for the config's first seed."""
    from fedleak.eval.plan import _federated, all_trainings
    from fedleak.federated.registry import did_you_mean

    units = [u for u in all_trainings(config) if _federated(u.algorithm) and u.seed == config.run_seeds[0]]
    if not units:
        raise FedleakError("the config's matrix has no federated training: add fedit or fedpit to matrix.algorithms")
    if not label:
        return units[0]
    for unit in units:
        if label in (unit.label, unit.stem):
            return unit
    labels = [u.label for u in units]
    raise FedleakError(f"training = {label!r} is not in the matrix: {did_you_mean(label, labels)}"
                       f"give one of {', '.join(labels)}")


@server_app.main()
def main(grid, context) -> None:
    from fedleak.eval.config import load_config
    from fedleak.eval.training_runs import train_unit

    run_config = dict(context.run_config)
    path, out = str(run_config.get("config", "")), str(run_config.get("out", ""))
    if not path or not out:
        raise FedleakError("the run config needs config (the fedleak TOML on the server) and out (the output "
                           "folder): flwr run ... --run-config 'config=\"run.toml\" out=\"runs/flower\"'")
    config = load_config(path)
    unit = pick_training(config, str(run_config.get("training", "")))
    record, _ = train_unit(config, unit, Path(out), base_dir=Path(path).parent, use_cache=False, grid=grid)
    log.info("trained %s on the federation into %s", unit.label, Path(out) / record["checkpoint_dir"])


def submit(config_path: str, *, superlink: str, out: Path, training: str = "", root_certificates: str | None = None,
           quiet: bool = False) -> Path:
    """`flwr run` fedleak's apps on the SuperLink at `superlink` (host:port), training `training` of the config;
    returns the server's training folder once written.

    Args:
        config_path: the fedleak TOML, as the SuperLink's machine sees it (its ServerApp reads it).
        superlink: the SuperLink's address (`flower-superlink --host H --port P`).
        out: the server's output folder, as the SuperLink's machine sees it.
        training: the training's label (algorithm/defense[/scenario]); "": the matrix's first federated one.
        root_certificates: the CA certificate of a TLS SuperLink; None: an insecure (plain HTTP) connection.
        quiet: do not stream the run's logs.

    Raises:
        FedleakError: a config or training that cannot run, `flwr` missing, or a run that wrote no training.
    """
    from fedleak.eval.config import load_config

    config = load_config(config_path)
    unit = pick_training(config, training)  # a wrong label fails here, before anything is submitted
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    if not Path(flwr).exists():
        raise FedleakError("the flwr command is not installed: pip install 'fedleak[flower]'")
    folder = Path(out).resolve() / "trainings" / unit.stem
    with tempfile.TemporaryDirectory(prefix="fedleak-flwr-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        security = (f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates
                    else "insecure = true")
        (home / "config.toml").write_text(f'[superlink]\ndefault = "fedleak"\n\n[superlink.fedleak]\n'
                                          f'address = "{superlink}"\n{security}\n')
        app = write_app(Path(tmp) / "app")
        run_config = (f'config="{Path(config_path).resolve()}" out="{Path(out).resolve()}" '
                      f'training="{unit.label}"')
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}
        proc = subprocess.Popen([flwr, "run", str(app), "fedleak", "--run-config", run_config, "--stream"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # the run's log, streamed until it ends
            lines.append(line)
            if not quiet:
                sys.stdout.write(line)
        proc.wait()
        started = re.search(r"started run (\d+)", "".join(lines))
        if proc.returncode != 0 or not started:
            tail = " ".join("".join(lines[-5:]).split())[-400:]
            raise FedleakError(f"flwr run failed (exit status {proc.returncode}: {tail}): is a SuperLink listening on "
                               f"{superlink}? start it with flower-superlink")
        status, details = _run_status(flwr, started.group(1), env)
    if "completed" not in status:
        raise FedleakError(f"Flower run {started.group(1)} ended {status!r}{_why(lines, details)} (the whole log: "
                           f"`flwr log {started.group(1)}` against the SuperLink)")
    return folder


def _run_status(flwr: str, run_id: str, env: dict) -> tuple[str, str]:
    """A finished run's status and its details as the SuperLink reports them (`flwr ls --run-id`), e.g.
    ("finished:completed", "")."""
    proc = subprocess.run([flwr, "ls", "fedleak", "--run-id", run_id, "--format", "json"], env=env,
                          capture_output=True, text=True)
    try:
        run = json.loads(proc.stdout).get("runs", [])[0]
        return str(run.get("status", "unknown")), str(run.get("status-details", "") or "")
    except (json.JSONDecodeError, IndexError, AttributeError):
        return f"unknown ({' '.join((proc.stdout + proc.stderr).split())[-200:]})", ""


def _why(lines: list[str], details: str) -> str:
    """Why a run failed: the ServerApp's last FedleakError, else the SuperLink's status details and the log's
    last error line (the log is not printed under --quiet)."""
    reasons = [line.split("FedleakError:", 1)[1].strip() for line in lines if "FedleakError:" in line]
    if reasons:
        return f": {reasons[-1]}"
    errors = [" ".join(line.split()) for line in lines if re.search(r"\bERROR\b|Error:|Exception", line)]
    said = "; ".join(x for x in (details.strip(), errors[-1][-300:] if errors else "") if x)
    return f": {said}" if said else ""
