"""Training the matrix's units, in this process or, with `jobs` > 1, in a pool of spawned worker
processes (`train_all`): each worker loads the plug-ins, takes its share of torch's threads, logs to
the run's log file and dies with its parent; an error or Ctrl-C stops the pool at once."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedleak.common.errors import FedleakError
from fedleak.eval.config import RunConfig
from fedleak.eval.plan import TrainingUnit
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


def train_all(config: RunConfig, units: list[TrainingUnit], out_dir: Path, *, base_dir: Path, jobs: int,
              progress: bool, use_cache: bool) -> dict[TrainingUnit, dict]:
    """Train and evaluate every unit not cached, `jobs` at a time; returns each unit's results record."""
    records: dict[TrainingUnit, dict] = {}
    bar = tqdm(total=len(units), desc="trainings", unit="training", disable=not progress)

    def done(unit: TrainingUnit, record: dict, cached: bool) -> None:
        records[unit] = record
        log.info("training %s seed %d: %s", unit.label, unit.seed,
                 "cached" if cached else f"{record['cost']['wall_seconds']:.1f} s")
        bar.update()

    todo = []
    for unit in units:  # cached ones are read here: a worker would import torch to read a JSON file
        record = cached_training(config, unit, out_dir, base_dir=base_dir) if use_cache else None
        if record:
            done(unit, record, True)
        else:
            todo.append(unit)
    if jobs <= 1:
        for unit in todo:
            done(unit, *train_unit(config, unit, out_dir, base_dir=base_dir, progress=progress, use_cache=use_cache))
    elif todo:
        threads = max(1, torch.get_num_threads() // jobs)  # OMP_NUM_THREADS or the cores, shared out
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init,
                                   initargs=(config.plugins, str(base_dir), threads, _log_file()))
        try:
            futures = {pool.submit(train_unit, config, unit, out_dir, base_dir=base_dir, use_cache=use_cache): unit
                       for unit in todo}
            for future in as_completed(futures):
                done(futures[future], *future.result())
        except BaseException as exc:  # an error or Ctrl-C stops at once: queued trainings cancelled, running killed
            processes = list(getattr(pool, "_processes", {}).values())  # the executor has no public terminate
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                if process.is_alive():
                    process.terminate()
            pool.shutdown(wait=True)  # the executor notices the dead workers and releases its queues
            if isinstance(exc, BrokenProcessPool):
                raise FedleakError("a training process died (out of memory or killed; or a script calling "
                                   "run_matrix with jobs > 1 lacks `if __name__ == \"__main__\":`): rerun, "
                                   "finished trainings are cached") from None
            raise
        pool.shutdown(wait=True)
    bar.close()
    return {unit: records[unit] for unit in units}
