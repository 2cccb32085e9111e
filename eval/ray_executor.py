"""The matrix on a Ray cluster (`[executor] name = "ray"`, `fedleak run --executor ray [--address A]`):
every uncached training is one Ray task and every training's attack cells one more, submitted as soon
as its training is there, each reserving `[executor]`'s CPUs and GPUs, so the cluster's nodes work
through the matrix in parallel. Ray schedules, retries and moves the bytes; fedleak only says what to run.

Resume is the cache's (`eval/cache.py`): finished trainings and attack files are read back by the
driver, so a restarted driver submits only what is missing. A task that still fails after
`max_retries` retries is recorded in results.json's `failures` and the rest of the matrix completes;
a FedleakError (a config or plug-in fault) stops the run as it does on one machine.

Storage: "shared" (the output folder, the config's folder and the model on a path every node sees;
tasks write there) or "driver" (tasks work node-locally and return their files, which the driver
writes; the config's folder travels as Ray's working_dir). The embedded model is built once by the
driver and shipped to nodes that lack it in either mode."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_bytes
from fedleak.eval.attacking import attack_key, cached_cells
from fedleak.eval.cache import ATTACKS_DIR, SHADOWS_DIR, TRAINING_FILE, read_json, training_key
from fedleak.eval.config import RunConfig
from fedleak.eval.context import unit_context
from fedleak.eval.plan import PlannedTraining, TrainingUnit
from fedleak.eval.ray_tasks import ProgressBoard, attack_task, pack, train_task, unpack
from fedleak.eval.training_runs import cached_training

log = logging.getLogger("fedleak")


def check_available() -> None:
    """Raises FedleakError when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FedleakError("executor \"ray\" needs Ray: pip install 'fedleak[ray]'") from None


@contextlib.contextmanager
def connected(config: RunConfig, base_dir: Path, out_dir: Path):
    """Ray connected for the run: the cluster at `executor.address`, or a Ray instance started for it (stopped
    after). Yields a description of the cluster for results.json."""
    import ray

    settings = config.executor
    env_vars = {"RAY_DISABLE_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runtime_env: dict = {"env_vars": env_vars}
    if settings.storage == "driver":  # the config's folder (plug-ins, data files) travels to every node
        excludes = [".git", ".venv", "__pycache__"]
        if out_dir.resolve().is_relative_to(base_dir.resolve()):
            excludes.append("/" + str(out_dir.resolve().relative_to(base_dir.resolve())))
        runtime_env.update(working_dir=str(base_dir.resolve()), excludes=excludes)
        # A data file is often git-ignored; Ray's packaging skips ignored files unless told not to.
        os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    options = dict(runtime_env=runtime_env, log_to_driver=False, configure_logging=False, namespace="fedleak")
    try:
        if settings.address:
            ray.init(address=settings.address, **options)
        else:
            ray.init(num_cpus=settings.num_cpus or None, include_dashboard=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        said = " ".join(str(exc).split())[:200]
        if "size" in said.lower() and settings.storage == "driver":
            raise FedleakError(f"executor.storage = \"driver\": Ray cannot ship the config's folder {base_dir} ({said}): "
                               f"keep only the config, plug-ins and data files there") from None
        raise FedleakError(f"executor.address = {settings.address!r}: cannot connect to Ray ({said}): start the head "
                           f"with `ray start --head --port PORT` and pass its HOST:PORT") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        _check_resources(settings, nodes)
        yield {"name": "ray", "address": settings.address or "local", "storage": settings.storage,
               "ray_version": ray.__version__, "nodes": len(nodes),
               "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
               "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes)}
    finally:
        ray.shutdown()


def _check_resources(settings, nodes: list[dict]) -> None:
    """A task no node can hold would wait forever: say so now.

    Raises:
        FedleakError: naming the setting and the largest node.
    """
    for kind in ("train", "attack"):
        cpus, gpus = getattr(settings, f"{kind}_cpus"), getattr(settings, f"{kind}_gpus")
        if not any(n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus for n in nodes):
            most = max(((n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes), default=(0, 0))
            raise FedleakError(f"executor.{kind}_cpus = {cpus:g}, {kind}_gpus = {gpus:g}: no node of the Ray cluster has "
                               f"that much (the largest: {most[0]:g} CPUs, {most[1]:g} GPUs): lower them or add a node")


def check_reachable(address: str) -> None:
    """A HOST:PORT nobody listens on fails in seconds (ray.init would retry it for minutes).

    Raises:
        FedleakError: naming the address and how to start a head there.
    """
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedleakError(f"executor.address = {address!r}: give HOST:PORT (the head's `ray start --head --port`), "
                           f"ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise FedleakError(f"executor.address = {address!r}: cannot connect to Ray ({exc.strerror or exc}): start the "
                           f"head with `ray start --head --port {port}` there, or pass its HOST:PORT") from None


def _one_line(exc: BaseException) -> str:
    """A task's error in one line: the exception Ray carried back, not Ray's traceback around it."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:400]


@dataclass
class _Work:
    """What the driver tracks: submitted tasks, results, progress."""

    pending: dict = field(default_factory=dict)  # ObjectRef -> (kind, PlannedTraining)
    records: dict = field(default_factory=dict)  # TrainingUnit -> results record
    cells: dict = field(default_factory=dict)  # TrainingUnit -> cells
    failures: list = field(default_factory=list)
    done: dict = field(default_factory=lambda: {"training": 0, "attacks": 0})
    total: dict = field(default_factory=lambda: {"training": 0, "attacks": 0})


def run_on_ray(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, base_dir: Path, model_ref: str,
               use_cache: bool, progress: bool) -> tuple[dict[TrainingUnit, dict], dict[TrainingUnit, list], list, dict]:
    """Every planned training and its attack cells as Ray tasks; returns (records, cells per training, failures,
    executor record). Cached work is read here and never submitted."""
    import ray

    settings = config.executor
    shared = settings.storage == "shared"
    out_dir = out_dir.absolute()  # a task's working directory is not the driver's (absolute, not resolve(): a
    # symlink the driver sees, e.g. to an automount, may resolve to a path other nodes lack)
    with connected(config, base_dir, out_dir) as executor:
        config = _as_tasks_see_it(config)
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        model = _model_blob(config, model_ref)
        model_ref_obj = ray.put(model) if model else None
        common = dict(base_dir=str(base_dir.absolute()) if shared else "", board=board)
        train = ray.remote(train_task).options(num_cpus=settings.train_cpus, num_gpus=settings.train_gpus,
                                               max_retries=settings.max_retries, retry_exceptions=True)
        attack = ray.remote(attack_task).options(num_cpus=settings.attack_cpus, num_gpus=settings.attack_gpus,
                                                 max_retries=settings.max_retries, retry_exceptions=True)
        work = _Work()
        bars = {kind: tqdm(desc=f"{kind} tasks", unit="task", disable=not progress, total=0)
                for kind in ("training", "attacks")}

        def submit_attacks(item: PlannedTraining) -> None:
            record = work.records[item.unit]
            cells = _cached_attack_cells(config, item, record, out_dir, base_dir) if use_cache else None
            if cells is not None or not item.attacks:
                work.cells[item.unit] = cells or []
                return
            extra = {}
            if not shared:
                extra = {"training": ray.put(pack(out_dir / record["checkpoint_dir"])),
                         "shadows": {p.name: p.read_bytes() for p in (out_dir / SHADOWS_DIR).glob("*.safetensors")}}
            ref = attack.remote(config, item.unit, record, item.attacks, out_dir=str(out_dir) if shared else "",
                                use_cache=use_cache, cpus=settings.attack_cpus, model=model_ref_obj, **common, **extra)
            work.pending[ref] = ("attacks", item)
            _count(work, bars, "attacks")

        for item in planned:
            record = cached_training(config, item.unit, out_dir, base_dir=base_dir) if use_cache else None
            if record is not None:
                work.records[item.unit] = record
                log.info("training %s seed %d: cached", item.unit.label, item.unit.seed)
                submit_attacks(item)
            else:
                extra = {}
                if not shared and use_cache:  # trained already, evaluation settings changed: only re-evaluate
                    folder = out_dir / "trainings" / item.unit.stem
                    trained = read_json(folder / TRAINING_FILE) or {}
                    if trained.get("key") == training_key(unit_context(config, item.unit, base_dir), item.unit):
                        extra["training"] = ray.put(pack(folder))
                ref = train.remote(config, item.unit, out_dir=str(out_dir) if shared else "", use_cache=use_cache,
                                   cpus=settings.train_cpus, model=model_ref_obj, **common, **extra)
                work.pending[ref] = ("training", item)
                _count(work, bars, "training")
        last_line, said = 0.0, ""
        try:
            while work.pending:
                ready, _ = ray.wait(list(work.pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    kind, item = work.pending.pop(ref)
                    result = _result(ref, kind, item, work, settings.max_retries)
                    bars[kind].update()
                    work.done[kind] += 1
                    if result is None:
                        continue
                    for line in result.get("log", []):  # the task's warnings, as a local run logs them
                        log.warning("[%s] %s", result["node"], line)
                    if kind == "training":
                        if "files" in result:  # storage "driver": the driver writes the training folder
                            _install(out_dir / "trainings" / item.unit.stem, result["files"])
                        record = {**result["record"], "cost": {**result["record"]["cost"], "node": result["node"]}}
                        work.records[item.unit] = record
                        log.info("training %s seed %d: %s on %s", item.unit.label, item.unit.seed,
                                 "cached" if result["cached"] else f"{record['cost']['wall_seconds']:.1f} s",
                                 result["node"])
                        submit_attacks(item)
                    else:
                        folder = out_dir / work.records[item.unit]["checkpoint_dir"]
                        for name, blob in result.get("attack_files", {}).items():
                            atomic_write_bytes(folder / ATTACKS_DIR / name, blob)
                        for name, blob in result.get("shadow_files", {}).items():
                            atomic_write_bytes(out_dir / SHADOWS_DIR / name, blob)
                        work.cells[item.unit] = [{**c, "cost": {**c["cost"], "node": result["node"]}}
                                                 if "cost" in c else c for c in result["cells"]]
                        log.info("attacks on %s seed %d: %d run on %s", item.unit.label, item.unit.seed,
                                 result["ran"], result["node"])
                line = _progress_line(work, _running(board, work))
                if (line != said and time.monotonic() - last_line >= settings.progress_interval) or not work.pending:
                    log.info("%s", line)
                    last_line, said = time.monotonic(), line
        except BaseException:
            for ref in work.pending:  # a FedleakError or Ctrl-C: nothing queued runs on
                ray.cancel(ref, force=True)
            raise
        finally:
            for bar in bars.values():
                bar.close()
    return work.records, work.cells, work.failures, executor


def _as_tasks_see_it(config: RunConfig) -> RunConfig:
    """The config with model.dtype "auto" resolved as a training task resolves it: the cache keys hold the
    resolved dtype, and a task (which sees only the GPUs it reserved) and the driver must agree on them."""
    import dataclasses

    import ray

    from fedleak.eval.ray_tasks import resolved_dtype

    from fedleak.eval.sweep import methods_of

    methods = methods_of(config)
    if config.model.dtype != "auto" or methods == {"full"}:  # full fine-tuning loads "auto" as float32 anywhere
        return config
    probe = ray.remote(resolved_dtype).options(num_cpus=config.executor.train_cpus,
                                               num_gpus=config.executor.train_gpus)
    try:
        dtype = ray.get(probe.remote(config.model.device))
    except ray.exceptions.RayError as exc:  # e.g. model.device = "cuda" for tasks that reserve no GPU
        raise FedleakError(f"model.device = {config.model.device!r}: a training task (executor.train_gpus = "
                           f"{config.executor.train_gpus:g}) cannot use it ({_one_line(exc)}): reserve GPUs with "
                           f"executor.train_gpus or set model.device = \"auto\"") from None
    if "full" in methods and dtype != "float32":  # the variants inherit the resolved dtype, which full refuses
        raise FedleakError(f"model.dtype = \"auto\" is {dtype} on the training tasks' nodes, which full fine-tuning "
                           f"(a variant of matrix.adaptations or matrix.sweep) cannot train in: set model.dtype = "
                           f"\"float32\" for the run, or take \"full\" out of the matrix")
    log.info("executor ray: model.dtype \"auto\" is %s on the training tasks' nodes", dtype)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))


def _count(work: _Work, bars: dict, kind: str) -> None:
    work.total[kind] += 1
    bars[kind].total = work.total[kind]
    bars[kind].refresh()


def _result(ref, kind: str, item: PlannedTraining, work: _Work, retries: int) -> dict | None:
    """A finished task's result; None when it failed after its retries (recorded in `work.failures`).

    Raises:
        FedleakError: the task hit a config or plug-in fault (retrying would not help).
    """
    import ray

    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as exc:  # the task raised, or its worker or node died (out of memory too)
        error = _one_line(exc)
        log.warning("%s task of %s seed %d failed after %d attempt(s), recorded in results.json: %s", kind,
                    item.unit.label, item.unit.seed, retries + 1, error)
        work.failures.append({**item.unit.key(), "task": kind, "error": error, "attempts": retries + 1})
        if kind == "training" and item.attacks:
            work.failures.append({**item.unit.key(), "task": "attacks", "error": "not run: its training failed",
                                  "attempts": 0})
        return None
    if "fedleak_error" in result:
        raise FedleakError(f"{kind} of {item.unit.label} seed {item.unit.seed} on {result['node']}: "
                           f"{result['fedleak_error']}")
    return result


def _cached_attack_cells(config: RunConfig, item: PlannedTraining, record: dict, out_dir: Path,
                         base_dir: Path) -> list | None:
    """Every planned attack's cells of a training when all are cached (read here, no task), else None."""
    ctx = unit_context(config, item.unit, base_dir)
    t_key = training_key(ctx, item.unit)
    cells = []
    for spec, observers in item.attacks:
        found = cached_cells(out_dir / record["checkpoint_dir"] / ATTACKS_DIR, spec,
                             attack_key(t_key, spec, observers, ctx.config.attack))
        if found is None:
            return None
        cells += found
    return cells


def _running(board, work: _Work) -> dict:
    """The tasks running now, by node: the board's word for tasks still pending (a finished task's last
    message may come late, a killed one's never); best effort, the run does not depend on it."""
    import ray

    try:
        running = ray.get(board.snapshot.remote(), timeout=10)
    except ray.exceptions.RayError:
        return {}
    pending = {(kind, item.unit.stem) for kind, item in work.pending.values()}
    return {key: node for key, node in running.items() if key in pending}


def _progress_line(work: _Work, running: dict[tuple[str, str], str]) -> str:
    parts = []
    for kind, label in (("training", "trainings"), ("attacks", "attack tasks")):
        mine = sorted((stem, node) for (k, stem), node in running.items() if k == kind)
        queued = work.total[kind] - work.done[kind] - len(mine)
        where = "".join(f" {stem}@{node}" for stem, node in mine)
        cells = f" ({sum(map(len, work.cells.values()))} cells)" if kind == "attacks" else ""
        parts.append(f"{label} {work.done[kind]}/{work.total[kind]} done{cells}, {len(mine)} running{where}, "
                     f"{max(0, queued)} queued")
    failed = f"; {len(work.failures)} failed" if work.failures else ""
    return "ray: " + "; ".join(parts) + failed


def _model_blob(config: RunConfig, model_ref: str) -> tuple[str, bytes] | None:
    """The embedded model packed, for nodes that lack it (a user's model is a hub id or a path nodes see)."""
    if config.model.name != "embedded":
        return None
    folder = Path(model_ref)
    return folder.name, pack(folder)


def _install(target: Path, blob: bytes) -> None:
    """A task's training folder into the run folder, whole or not at all (as a local training moves its scratch)."""
    import shutil

    scratch = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    unpack(blob, scratch)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)


def describe_failures(failures: list[dict]) -> str:
    """One line for the CLI: how many tasks failed and what to do."""
    kinds = {f["task"] for f in failures if f["attempts"]}
    return (f"{sum(1 for f in failures if f['attempts'])} Ray task(s) ({', '.join(sorted(kinds))}) failed after their "
            f"retries and are recorded in results.json's failures: fix the cause and rerun (finished work is cached)")
