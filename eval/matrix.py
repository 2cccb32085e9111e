"""Run the attack matrix: train each (algorithm, defense, scenario, seed) once, evaluate its utility
(and, under poisoning, its trigger rates), then run each privacy attack on every requested observer's
view of every requested round (final by default), and write the results file. Finished work is cached
on disk (`cache.py`), so a rerun does only what is missing and writes the same results. Trainings are
independent and run in parallel processes with `jobs` > 1 (`workers.py`, one training: `training_runs.py`),
each training's attacks in the same pool as soon as it is trained (`attacking.py`; LiRA's shadows are
trained once per run and kept on disk for every process). With executor "ray" both are tasks on a Ray cluster
(`ray_executor.py`). `external.py` attacks one training's checkpoints alone."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from fedleak.common.errors import FedleakError
from fedleak.common.params import instantiate
from fedleak.eval.aggregate import aggregate_cells, aggregate_trainings
from fedleak.eval.attacking import attack_key, cached_cells
from fedleak.eval.cache import ATTACKS_DIR, plugin_records, run_lock, training_key
from fedleak.eval.config import RunConfig
from fedleak.eval.context import check_data, describe_data, report_data_quality, resolve_model, seed_context, unit_context
from fedleak.eval.fit import model_fit, seeds_model_fit
from fedleak.eval.identifiers import identifiers_record
from fedleak.eval.plan import PlannedTraining, attack_cells, left_out, plan, training_steps
from fedleak.eval.poisoning import poisoning_cells
from fedleak.eval.results import SCHEMA, git_commit, library_versions, machine_info, write_results
from fedleak.eval.training_runs import base_model_utility, cached_training
from fedleak.eval.workers import run_all
from fedleak.federated.data import FederatedData
from fedleak.federated.model import release_shared_model
from fedleak.federated.rounds import ALGORITHMS

log = logging.getLogger("fedleak")


def describe(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, base_dir: Path,
             use_cache: bool = True, jobs: int = 1) -> str:
    """The dry run: every training and attack with its cache state, the work left and each phase's peak memory.

    Raises:
        FedleakError: the largest phase's estimated peak exceeds the device's available memory (`eval/memory.py`).
    """
    from fedleak.eval.memory import memory_lines

    lines, trainings_left, steps_left, cells_left, cells_total = describe_data(config, base_dir), 0, 0, 0, 0
    for item in planned:
        unit = item.unit
        ctx = unit_context(config, unit, base_dir)
        training_dir = Path(out_dir) / "trainings" / unit.stem
        t_key = training_key(ctx, unit)
        cached = use_cache and cached_training(config, unit, out_dir, base_dir=base_dir) is not None
        algorithm = instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs,
                                f"matrix.algorithms: {unit.algorithm.label}")
        steps = training_steps(ctx.config, unit, [len(records) for records in algorithm.client_data(ctx.data)])
        trainings_left += not cached
        steps_left += 0 if cached else steps
        lines.append(f"training {unit.label} seed {unit.seed}: {'cached' if cached else f'about {steps} steps'}")
        for spec, observers in item.attacks:
            n = attack_cells(ctx.config, unit, spec, observers)
            done = cached and cached_cells(training_dir / ATTACKS_DIR, spec,
                                           attack_key(t_key, spec, observers, ctx.config.attack)) is not None
            cells_total += n
            cells_left += 0 if done else n
            rounds = spec.rounds if isinstance(spec.rounds, str) else list(spec.rounds)
            if n:
                lines.append(f"  attack {spec.label} on {', '.join(observers)} (rounds: {rounds}): about {n} cells"
                             + (" (cached)" if done else ""))
    lines += left_out(config)
    lines.append(f"{len(planned)} trainings ({trainings_left} to train, about {steps_left} optimizer steps), about "
                 f"{cells_total} attack cells ({cells_left} to run), seeds {list(config.run_seeds)}")
    lines += memory_lines(config, jobs=jobs)
    return "\n".join(lines)


def run_matrix(config: RunConfig, out_dir: Path, *, config_path: str | None = None, progress: bool = True,
               jobs: int = 1, only: tuple[str, ...] = (), use_cache: bool = True) -> dict:
    """Run (or resume) the matrix into `out_dir` and write results.json and results.csv."""
    if jobs < 1:
        raise FedleakError(f"--jobs {jobs}: give at least 1 (the number of trainings run at once)")
    planned = plan(config, only)
    if config.engine.name == "flower":
        from fedleak.eval.flower_engine import check_available, check_unit

        check_available()  # before any model build
        for item in planned:  # what SecAgg+ on Flower cannot run fails before any training
            if ALGORITHMS.get(item.unit.algorithm.name).federated:
                check_unit(config, item.unit)
        if jobs > 1:  # Ray already spreads one training's clients over the cores
            log.warning("engine \"flower\": --jobs %d ignored, trainings run one at a time (each on Ray, "
                        "engine.num_cpus per client)", jobs)
            jobs = 1
    if config.executor.name == "ray":
        from fedleak.eval.ray_executor import check_available as ray_available
        from fedleak.eval.ray_executor import check_reachable

        ray_available()
        check_reachable(config.executor.address)  # before the model build and base utility of minutes
        if config.engine.name == "flower":
            raise FedleakError("executor \"ray\" with engine \"flower\": Flower's simulation is itself a Ray job and "
                               "cannot run inside a Ray task: set engine.name = \"inprocess\" (the same results)")
        if jobs > 1:
            log.warning("executor \"ray\": --jobs %d ignored, Ray runs as many tasks as executor.train_cpus and "
                        "train_gpus allow", jobs)
            jobs = 1
    with run_lock(Path(out_dir)):
        return _run_planned(config, planned, Path(out_dir), config_path=config_path, progress=progress, jobs=jobs,
                            only=only, use_cache=use_cache)


def _run_planned(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, config_path: str | None,
                 progress: bool, jobs: int, only: tuple[str, ...], use_cache: bool) -> dict:
    started = dt.datetime.now(dt.timezone.utc)
    base_dir = Path(config_path).parent if config_path else Path(".")
    seeds = list(config.run_seeds)
    check_data(config, base_dir)  # a bad data file fails in seconds, before a model build of minutes
    model_ref, model_info = resolve_model(config)  # built once here, before any worker needs it
    report_data_quality(config, base_dir, model_ref)  # warnings, and truncation counted with its tokenizer
    base_utility = {s: base_model_utility(seed_context(config, s, base_dir), out_dir, use_cache) for s in seeds}
    for line in left_out(config):
        log.info("%s", line)
    log.info("%d trainings, seeds %s, %d job(s); cache in %s", len(planned), seeds, jobs, out_dir / "trainings")
    extra: dict = {}
    if config.executor.name == "ray":
        from fedleak.eval.ray_executor import run_on_ray

        release_shared_model()  # the tasks load their own copies
        records, found, failures, extra["executor"] = run_on_ray(config, planned, out_dir, base_dir=base_dir,
                                                                 model_ref=model_ref, use_cache=use_cache,
                                                                 progress=progress)
        extra["failures"] = failures
        trainings = [records[p.unit] for p in planned if p.unit in records]
        cells = [cell for p in planned for cell in found.get(p.unit, [])]
    else:
        trainings, cells = _run_here(config, planned, out_dir, base_dir=base_dir, jobs=jobs, progress=progress,
                                     use_cache=use_cache)
    cells += poisoning_cells(trainings, config.matrix.scenarios)
    contexts = {s: seed_context(config, s, base_dir) for s in seeds}
    results = results_record(config, config_path=config_path, only=only, jobs=jobs, started=started,
                             model_info=model_info, data={s: c.data for s, c in contexts.items()},
                             base_utility=base_utility, trainings=trainings, cells=cells, **extra)
    write_results(out_dir, results)
    return results


def _run_here(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, base_dir: Path, jobs: int,
              progress: bool, use_cache: bool) -> tuple[list[dict], list[dict]]:
    """The trainings and their attacks on this machine (`jobs` processes, `workers.py`)."""
    if jobs > 1:
        release_shared_model()  # each worker loads its own copy: this one would be one more on the device
    records, found = run_all(config, planned, out_dir, base_dir=base_dir, jobs=jobs, progress=progress,
                             use_cache=use_cache)
    return [records[p.unit] for p in planned], [cell for p in planned for cell in found.get(p.unit, [])]


def results_record(config: RunConfig, *, config_path: str | None, only: tuple[str, ...], jobs: int,
                   started: dt.datetime, model_info: dict, data: dict[int, FederatedData],
                   base_utility: dict[int, dict], trainings: list[dict], cells: list[dict], **extra) -> dict:
    """The results file's record (eval/results.schema.json): provenance, then the run's records."""
    versions = library_versions()
    seeds = list(data)
    return {
        "schema": SCHEMA, "fedleak_version": versions["fedleak"], "versions": versions,
        "git_commit": git_commit(), "seed": seeds[0], "seeds": seeds, "config_path": config_path,
        "config": config.to_dict(), "only": list(only), "plugins": plugin_records(config.plugins),
        "machine": machine_info(jobs=jobs), **extra,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info, "data": data[seeds[0]].summary(),
        "data_per_seed": {str(s): d.summary() for s, d in data.items()},
        "identifiers": identifiers_record(config, list(data.values())),
        "base_utility": base_utility[seeds[0]], "base_utility_per_seed": {str(s): u for s, u in base_utility.items()},
        "model_fit": seeds_model_fit({seed: model_fit(
            base_utility=base_utility[seed], data_summary=data[seed].summary(),
            trainings=[t for t in trainings if t.get("seed", seeds[0]) == seed],
            fit_perplexity=config.utility.fit_perplexity, max_length=config.federation.max_length) for seed in seeds}),
        "trainings": trainings, "cells": cells,
        "aggregates": aggregate_cells(cells), "training_aggregates": aggregate_trainings(trainings),
    }
