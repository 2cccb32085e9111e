"""What runs inside a Ray task of the matrix (`eval/ray_executor.py` submits them): one training (train
and evaluate, `train_unit`) or one training's attack cells (`attack_training`), on whichever node Ray
picks. A task loads the plug-ins, takes its share of threads, unpacks the embedded model when its node
lacks it, and reports to the driver's progress board when it starts and ends.

With storage "shared" a task reads and writes the run folder itself (a path every node sees); with
"driver" it works in a node-local scratch folder and returns what it wrote as a tar archive (bytes),
which the driver unpacks into the run folder. A FedleakError (a config or plug-in fault: it would fail
again) is returned, not raised, so Ray does not retry it; any other exception is Ray's to retry."""

from __future__ import annotations

import io
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
    """Unpack `pack`'s archive under `into` ("data" filter: no absolute paths, links out or devices)."""
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
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent if target.parent.exists()
                                            else None))
            unpack(blob, scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(scratch, target)
            except OSError:  # another task of this node got there first
                shutil.rmtree(scratch, ignore_errors=True)
    return base


def _board_call(board, method: str, *args) -> None:
    if board is not None:
        getattr(board, method).remote(*args)


def train_task(config, unit, *, out_dir: str, base_dir: str, use_cache: bool, cpus: float,
               model: tuple[str, bytes] | None, board) -> dict:
    """Train and evaluate one unit. Returns {"record", "cached", "node"} and, when `out_dir` is "" (storage
    "driver"), "files": the training folder packed; {"fedleak_error": message} for a config or plug-in fault."""
    from fedleak.eval.training_runs import train_unit

    node = node_name()
    _board_call(board, "started", ("training", unit.stem), node)
    try:
        base = _prepare(config.plugins, base_dir, cpus, model)
        if out_dir:
            record, cached = train_unit(config, unit, Path(out_dir), base_dir=base, use_cache=use_cache)
            return {"record": record, "cached": cached, "node": node}
        with tempfile.TemporaryDirectory(prefix="fedleak-ray-") as scratch:
            record, cached = train_unit(config, unit, Path(scratch), base_dir=base, use_cache=False)
            return {"record": record, "cached": cached, "node": node,
                    "files": pack(Path(scratch) / "trainings" / unit.stem)}
    except FedleakError as exc:
        return {"fedleak_error": str(exc), "node": node}
    finally:
        _board_call(board, "finished", ("training", unit.stem))


def attack_task(config, unit, record: dict, attacks, *, out_dir: str, base_dir: str, use_cache: bool, cpus: float,
                model: tuple[str, bytes] | None, board, training: bytes | None = None,
                shadows: dict[str, bytes] | None = None) -> dict:
    """Every planned attack's cells on one training. Returns {"cells", "ran", "node"} and, under storage "driver"
    (`training` holds the packed training folder, `shadows` the run's shadow files), "attack_files" (the
    training's attacks/ cache files) and "shadow_files" (shadow statistics it trained); {"fedleak_error"} for a
    config or plug-in fault."""
    from fedleak.eval.attacking import attack_training
    from fedleak.eval.cache import ATTACKS_DIR, SHADOWS_DIR
    from fedleak.eval.context import seed_context

    node = node_name()
    _board_call(board, "started", ("attacks", unit.stem), node)
    try:
        base = _prepare(config.plugins, base_dir, cpus, model)
        ctx = seed_context(config, unit.seed, base)
        if out_dir:
            cells, ran = attack_training(ctx, unit, record, Path(out_dir) / record["checkpoint_dir"], attacks,
                                         use_cache=use_cache, shadow_dir=Path(out_dir) / SHADOWS_DIR)
            return {"cells": cells, "ran": ran, "node": node}
        with tempfile.TemporaryDirectory(prefix="fedleak-ray-") as scratch:
            folder, shadow_dir = Path(scratch) / "training", Path(scratch) / SHADOWS_DIR
            unpack(training, folder)
            shadow_dir.mkdir()
            for name, blob in (shadows or {}).items():
                (shadow_dir / name).write_bytes(blob)
            cells, ran = attack_training(ctx, unit, record, folder, attacks, use_cache=use_cache,
                                         shadow_dir=shadow_dir)
            return {"cells": cells, "ran": ran, "node": node,
                    "attack_files": {p.name: p.read_bytes() for p in (folder / ATTACKS_DIR).glob("*.json")},
                    "shadow_files": {p.name: p.read_bytes() for p in shadow_dir.glob("*.safetensors")
                                     if p.name not in (shadows or {})}}
    except FedleakError as exc:
        return {"fedleak_error": str(exc), "node": node}
    finally:
        _board_call(board, "finished", ("attacks", unit.stem))


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
