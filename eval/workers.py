"""Running the matrix's work on this machine: the trainings, then each training's attack cells, in this
process or, with `jobs` > 1, in a pool of spawned worker processes (`run_all`). Each worker loads the
plug-ins, takes its share of torch's threads, logs to the run's log file and dies with its parent; an error
or Ctrl-C stops the pool at once.

With a pool, a training's attacks start as soon as its training is there, ahead of the trainings still
queued, so the workers stay busy across the two phases and the longest attack jobs (the clean FEDIT's)
do not wait for the last training. Run-wide attack state lives on disk (LiRA's shadows, under a file lock
in `attacks/membership/lira.py`), so the workers share it; each cell is the same whichever worker runs it."""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedleak.common.errors import FedleakError
from fedleak.eval.attacking import attack_key, attack_training, cached_cells
from fedleak.eval.cache import ATTACKS_DIR, SHADOWS_DIR
from fedleak.eval.config import RunConfig
from fedleak.eval.context import unit_context
from fedleak.eval.plan import PlannedTraining, TrainingUnit
from fedleak.eval.training_runs import cached_training, train_unit

log = logging.getLogger("fedleak")


def _worker_init(plugins: tuple[str, ...], base_dir: str, threads: int, log_path: str | None) -> None:
    import signal

    from fedleak.common.logs import LOG_FORMAT, quiet_libraries
    from fedleak.eval.config import load_plugins

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    _die_with_parent()
    quiet_libraries()
    torch.set_num_threads(threads)
    load_plugins(plugins, "plugins", Path(base_dir))
    if log_path:  # the worker's lines go to the run's log file too (appended line by line)
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _die_with_parent() -> None:
    """A worker whose parent was killed (kill -9) must not go on writing into the run folder that a
    resumed run is using: on Linux the kernel kills it with the parent (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _log_file() -> str | None:
    return next((h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)), None)


def attack_unit(config: RunConfig, item: PlannedTraining, record: dict, out_dir: Path, *, base_dir: Path,
                use_cache: bool, progress: bool = False) -> tuple[list[dict], int, float]:
    """One training's planned attack cells (cached ones read back); returns the cells in attack order, how
    many attacks ran and the wall seconds."""
    start = time.perf_counter()
    ctx = unit_context(config, item.unit, base_dir)
    cells, ran = attack_training(ctx, item.unit, record, out_dir / record["checkpoint_dir"], item.attacks,
                                 progress=progress, use_cache=use_cache, shadow_dir=out_dir / SHADOWS_DIR)
    return cells, ran, time.perf_counter() - start


def _all_cached(config: RunConfig, item: PlannedTraining, record: dict, out_dir: Path, base_dir: Path) -> list | None:
    """The training's cells when every planned attack is cached (read here: a worker would import torch to read
    JSON files), else None."""
    attack_settings = unit_context(config, item.unit, base_dir).config.attack
    cells = []
    for spec, observers in item.attacks:
        found = cached_cells(out_dir / record["checkpoint_dir"] / ATTACKS_DIR, spec,
                             attack_key(record["training_key"], spec, observers, attack_settings))
        if found is None:
            return None
        cells += found
    return cells


def run_all(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, base_dir: Path, jobs: int,
            progress: bool, use_cache: bool) -> tuple[dict[TrainingUnit, dict], dict[TrainingUnit, list[dict]]]:
    """Train every planned unit not cached, then run its attacks, `jobs` processes at a time; returns each unit's
    results record and its attack cells (in attack order)."""
    records: dict[TrainingUnit, dict] = {}
    cells: dict[TrainingUnit, list[dict]] = {}
    attacked = [p for p in planned if p.attacks]
    train_bar = tqdm(total=len(planned), desc="trainings", unit="training", disable=not progress)
    attack_bar = tqdm(total=len(attacked), desc="attacks", unit="training", disable=not progress or not attacked)

    def trained(unit: TrainingUnit, record: dict, cached: bool) -> None:
        records[unit] = record
        log.info("training %s seed %d: %s", unit.label, unit.seed,
                 "cached" if cached else f"{record['cost']['wall_seconds']:.1f} s")
        train_bar.update()

    def attacks_done(item: PlannedTraining, found: list[dict], ran: int, seconds: float) -> None:
        cells[item.unit] = found
        log.info("attacks on %s seed %d: %d run, %d cached (%.1f s)", item.unit.label, item.unit.seed, ran,
                 len(item.attacks) - ran, seconds)
        attack_bar.update()

    todo = []
    for item in planned:  # cached trainings are read here: a worker would import torch to read a JSON file
        record = cached_training(config, item.unit, out_dir, base_dir=base_dir) if use_cache else None
        if record:
            trained(item.unit, record, True)
        else:
            todo.append(item)
    if jobs <= 1:
        for item in todo:
            trained(item.unit, *train_unit(config, item.unit, out_dir, base_dir=base_dir, progress=progress,
                                           use_cache=use_cache))
        for item in attacked:
            attacks_done(item, *attack_unit(config, item, records[item.unit], out_dir, base_dir=base_dir,
                                            use_cache=use_cache, progress=progress))
    else:
        ready = []  # trained, with attacks to run
        for item in attacked:
            if item.unit in records:
                found = _all_cached(config, item, records[item.unit], out_dir, base_dir) if use_cache else None
                if found is not None:
                    attacks_done(item, found, 0, 0.0)
                else:
                    ready.append(item)
        if todo or ready:
            _pool_run(config, todo, ready, records, out_dir, base_dir=base_dir, jobs=jobs, use_cache=use_cache,
                      trained=trained, attacks_done=attacks_done)
    train_bar.close()
    attack_bar.close()
    return {p.unit: records[p.unit] for p in planned}, {p.unit: cells[p.unit] for p in attacked}


def _pool_run(config: RunConfig, todo: list[PlannedTraining], ready: list[PlannedTraining],
              records: dict[TrainingUnit, dict], out_dir: Path, *, base_dir: Path, jobs: int, use_cache: bool,
              trained, attacks_done) -> None:
    """The pool: a free worker takes the trained unit with the most attacks first (the likely longest job),
    else the next training. `trained` records each training (in `records`), `attacks_done` each unit's cells."""
    threads = max(1, torch.get_num_threads() // jobs)  # OMP_NUM_THREADS or the cores, shared out
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(config.plugins, str(base_dir), threads, _log_file()))
    # Trainings with attacks first: their attack jobs then interleave with the rest, and the short poisoned
    # trainings fill the end.
    queue, ready, running = sorted(todo, key=lambda p: not p.attacks), list(ready), {}

    def submit() -> None:
        while len(running) < jobs and (ready or queue):
            if ready:
                item = max(ready, key=lambda p: len(p.attacks))
                ready.remove(item)
                future = pool.submit(attack_unit, config, item, records[item.unit],
                                     out_dir, base_dir=base_dir, use_cache=use_cache)
                running[future] = ("attack", item)
            else:
                item = queue.pop(0)
                running[pool.submit(train_unit, config, item.unit, out_dir, base_dir=base_dir,
                                    use_cache=use_cache)] = ("train", item)

    try:
        submit()
        while running:
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                kind, item = running.pop(future)
                if kind == "train":
                    trained(item.unit, *future.result())
                    if item.attacks:
                        ready.append(item)
                else:
                    attacks_done(item, *future.result())
            submit()
    except BaseException as exc:  # an error or Ctrl-C stops at once: queued work cancelled, running killed
        processes = list(getattr(pool, "_processes", {}).values())  # the executor has no public terminate
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True)  # the executor notices the dead workers and releases its queues
        if isinstance(exc, BrokenProcessPool):
            raise FedleakError("a worker process died (out of memory or killed; or a script calling run_matrix "
                               "with jobs > 1 lacks `if __name__ == \"__main__\":`): rerun, finished trainings and "
                               "attacks are cached") from None
        raise
    pool.shutdown(wait=True)
