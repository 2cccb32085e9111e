"""What runs inside a Ray task of the matrix (`eval/ray_executor.py` submits them): one training (train
and evaluate, `train_unit`) or one training's attack cells (`attack_training`), on whichever node Ray
picks. A task loads the plug-ins, takes its share of threads, unpacks the embedded model when its node
lacks it, and reports to the driver's progress board when it starts and ends.

With storage "shared" a task reads and writes the run folder itself (a path every node sees); with
"driver" it works in a node-local scratch folder and returns what it wrote as a tar archive (bytes),
which the driver unpacks into the run folder. A FedleakError (a config or plug-in fault: it would fail
again) is returned, not raised, so Ray does not retry it; any other exception is Ray's to retry."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from fedleak.common.errors import FedleakError


def pack(folder: Path, arcname: str = ".") -> bytes:
    """A folder as an uncompressed tar archive in memory (checkpoints are safetensors: gzip gains little)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(folder), arcname=arcname)
    return buffer.getvalue()


def unpack(blob: bytes, into: Path) -> None:
    """Unpack `pack`'s archive under `into` ("data" filter: no absolute paths, links out or devices).

    Raises:
        FedleakError: this Python lacks tarfile's extraction filters (before 3.10.12 / 3.11.4).
    """
    if not hasattr(tarfile, "data_filter"):
        raise FedleakError("executor ray needs tarfile's extraction filters: use Python >= 3.10.12 or >= 3.11.4")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(str(into), filter="data")


def node_name() -> str:
    """This node as the driver's progress lines and results.json name it: its IP and the start of Ray's node id
    (two nodes of one machine share the IP)."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def _prepare(plugins: tuple[str, ...], base_dir: str, cpus: float, model: tuple[str, bytes] | None) -> Path:
    """The task's process: threads, quiet libraries, plug-ins, the embedded model; returns the base folder
    (the config's folder: the working directory Ray unpacked under storage "driver")."""
    import torch

    from fedleak.common.logs import quiet_libraries
    from fedleak.eval.config import load_plugins
    from fedleak.federated.embedded import cache_root

    torch.set_num_threads(max(1, math.floor(cpus)))
    quiet_libraries()
    base = Path(base_dir) if base_dir else Path.cwd()
    load_plugins(plugins, "plugins", base)
    if model is not None:  # the embedded model, built once by the driver: a node without it unpacks it
        name, blob = model
        target = cache_root() / name
        if not (target / "fedleak_build.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))  # same filesystem: os.replace
            unpack(blob, scratch)
            try:
                os.replace(scratch, target)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)
                if not (target / "fedleak_build.json").exists():  # not another task of this node getting there first
                    raise
    return base


def resolved_dtype(device: str) -> str:
    """model.dtype "auto" as this task resolves it (it sees only the GPUs it reserved): "float32", "bfloat16"."""
    from fedleak.federated.model import DTYPES, resolve_device, resolve_dtype

    resolved = resolve_dtype("auto", resolve_device(device))
    return next(name for name, dtype in DTYPES.items() if dtype == resolved)


class _Lines(logging.Handler):
    """fedleak's warnings in a task, sent back for the driver's log (Ray does not forward them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured():
    handler = _Lines()
    root = logging.getLogger("fedleak")
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)


def train_task(config, unit, *, out_dir: str, base_dir: str, use_cache: bool, cpus: float,
               model: tuple[str, bytes] | None, board, training: bytes | None = None) -> dict:
    """Train and evaluate one unit. Returns {"record", "cached", "node", "log"} (the task's warnings) and, when
    `out_dir` is "" (storage "driver"), "files": the training folder packed (`training`: the folder as the
    driver has it, when only its evaluation is missing); {"fedleak_error": message} for a config or plug-in
    fault."""
    from fedleak.eval.training_runs import train_unit

    node = node_name()
    board.started.remote(("training", unit.stem), node)
    try:
        with _captured() as lines:
            base = _prepare(config.plugins, base_dir, cpus, model)
            if out_dir:
                record, cached = train_unit(config, unit, Path(out_dir), base_dir=base, use_cache=use_cache)
                return {"record": record, "cached": cached, "node": node, "log": lines}
            with tempfile.TemporaryDirectory(prefix="fedleak-ray-") as scratch:
                folder = Path(scratch) / "trainings" / unit.stem
                if training is not None:  # its checkpoints, to evaluate again without training again
                    unpack(training, folder)
                record, cached = train_unit(config, unit, Path(scratch), base_dir=base, use_cache=training is not None)
                return {"record": record, "cached": cached, "node": node, "files": pack(folder), "log": lines}
    except FedleakError as exc:
        return {"fedleak_error": str(exc), "node": node}
    finally:
        board.finished.remote(("training", unit.stem))


def attack_task(config, unit, record: dict, attacks, *, out_dir: str, base_dir: str, use_cache: bool, cpus: float,
                model: tuple[str, bytes] | None, board, training: bytes | None = None,
                shadows: dict[str, bytes] | None = None) -> dict:
    """Every planned attack's cells on one training. Returns {"cells", "ran", "node", "log"} and, under storage "driver"
    (`training` holds the packed training folder, `shadows` the run's shadow files), "attack_files" (the
    training's attacks/ cache files) and "shadow_files" (shadow statistics it trained); {"fedleak_error"} for a
    config or plug-in fault."""
    node = node_name()
    board.started.remote(("attacks", unit.stem), node)
    try:
        with _captured() as lines:
            return {**_attack(config, unit, record, attacks, out_dir=out_dir, base_dir=base_dir, use_cache=use_cache,
                              cpus=cpus, model=model, training=training, shadows=shadows), "node": node, "log": lines}
    except FedleakError as exc:
        return {"fedleak_error": str(exc), "node": node}
    finally:
        board.finished.remote(("attacks", unit.stem))


def _attack(config, unit, record: dict, attacks, *, out_dir: str, base_dir: str, use_cache: bool, cpus: float,
            model, training: bytes | None, shadows: dict[str, bytes] | None) -> dict:
    from fedleak.eval.attacking import attack_training
    from fedleak.eval.cache import ATTACKS_DIR, SHADOWS_DIR
    from fedleak.eval.context import unit_context

    base = _prepare(config.plugins, base_dir, cpus, model)
    ctx = unit_context(config, unit, base)
    if out_dir:
        cells, ran = attack_training(ctx, unit, record, Path(out_dir) / record["checkpoint_dir"], attacks,
                                     use_cache=use_cache, shadow_dir=Path(out_dir) / SHADOWS_DIR)
        return {"cells": cells, "ran": ran}
    with tempfile.TemporaryDirectory(prefix="fedleak-ray-") as scratch:
        folder, shadow_dir = Path(scratch) / "training", Path(scratch) / SHADOWS_DIR
        unpack(training, folder)
        shadow_dir.mkdir()
        for name, blob in (shadows or {}).items():
            (shadow_dir / name).write_bytes(blob)
        cells, ran = attack_training(ctx, unit, record, folder, attacks, use_cache=use_cache, shadow_dir=shadow_dir)
        return {"cells": cells, "ran": ran,
                "attack_files": {p.name: p.read_bytes() for p in (folder / ATTACKS_DIR).glob("*.json")},
                "shadow_files": {p.name: p.read_bytes() for p in shadow_dir.glob("*.safetensors")
                                 if p.name not in (shadows or {})}}


class ProgressBoard:
    """The tasks running now and their node (a Ray actor: tasks report in, the driver reads)."""

    def __init__(self):
        self.running: dict[tuple[str, str], str] = {}

    def started(self, key: tuple[str, str], node: str) -> None:
        self.running[key] = node

    def finished(self, key: tuple[str, str]) -> None:
        self.running.pop(key, None)

    def snapshot(self) -> dict[tuple[str, str], str]:
        return dict(self.running)
