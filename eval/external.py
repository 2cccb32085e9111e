"""Attacking the checkpoints of one training outside a matrix run (`fedleak attack`): fedleak's own
training folder (its training.json says what trained it, checked against the config) or another
tool's checkpoints in the documented layout, whose participants come from the round manifests."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import instantiate
from fedleak.eval.attacking import attack_training
from fedleak.eval.cache import ATTACKS_DIR, SHADOWS_DIR, TRAINING_FILE, cache_key, read_json, run_lock, training_key
from fedleak.eval.config import ComponentSpec, RunConfig, component_spec
from fedleak.eval.context import report_data_quality, resolve_model, unit_context
from fedleak.eval.matrix import results_record
from fedleak.eval.plan import TrainingUnit, plan
from fedleak.eval.results import write_results
from fedleak.eval.training_runs import base_model_utility, training_record, upload_bytes, view_utility
from fedleak.federated import checkpoint
from fedleak.federated.adapters import add_peft_adapter
from fedleak.federated.model import shared_base_model
from fedleak.federated.rounds import ALGORITHMS


def checkpoint_rounds(training_dir: Path) -> list[int]:
    """A training folder's complete rounds, or a one-line error saying what a training folder is."""
    rounds = checkpoint.rounds(training_dir) if Path(training_dir).is_dir() else []
    for r in rounds:  # every manifest and file, with its one-line errors, before any work
        checkpoint.verify_round(checkpoint.round_dir(training_dir, r))
    _training_json(training_dir)
    if not rounds:
        raise FedleakError(f"{training_dir}: no round-XXXX/manifest.json in it: give a training folder "
                           f"(trainings/<name> of a run, or checkpoints in the layout of README 'Checkpoint format')")
    return rounds


def _training_json(training_dir: Path) -> dict | None:
    """The folder's training.json (None: another tool's checkpoints), or a one-line error when it is there
    but is not one fedleak wrote (attacking with a guessed unit would mislabel every number)."""
    path = Path(training_dir) / TRAINING_FILE
    if not path.exists():
        return None
    trained = read_json(path)
    unit = trained.get("unit") if trained else None
    if not isinstance(trained.get("key") if trained else None, str) or not isinstance(unit, dict) or not (
            {"algorithm", "defense", "scenario", "seed"} <= set(unit)):
        raise FedleakError(f"{path}: not a training.json that fedleak wrote (no 'key' and 'unit'): restore it, or "
                           f"remove it to attack the checkpoints as another tool's (--algorithm, --seed)")
    return trained


def _external_history(training_dir: Path, rounds: list[int], num_clients: int) -> list[dict]:
    """Per-round participants from the manifests (every client when a manifest does not say)."""
    return [{"round": r, "clients": checkpoint.read_manifest(checkpoint.round_dir(training_dir, r)).get(
        "clients", list(range(num_clients))), "client_metrics": {}} for r in rounds if r > 0]


def _external_training(key: str, history: list[dict], algorithm, views: list[str]) -> dict:
    """What training.json would say of another tool's checkpoints: nothing of their training's
    defense, timing or privacy is known."""
    per_round, total = upload_bytes(history)
    return {"key": key, "algorithm_params": algorithm.params(), "defense_params": {}, "train_seconds": 0.0,
            "views": views, "synthetic": None, "privacy": None, "synthetic_examples": [], "rounds": history,
            "upload_bytes_per_client_per_round": per_round, "upload_bytes_total": total,
            "torch_threads": torch.get_num_threads()}


def attack_checkpoint(config: RunConfig, training_dir: Path, out_dir: Path, *, config_path: str | None = None,
                      algorithm: str | None = None, seed: int | None = None, only: tuple[str, ...] = (),
                      progress: bool = True, use_cache: bool = True) -> dict:
    """Run the config's privacy attacks on the checkpoints of one training: fedleak's own (its
    training.json names the algorithm, defense, scenario and seed) or another tool's written in the
    documented layout (round-XXXX/manifest.json + safetensors adapters; `algorithm` says whose
    global model it is, the config's data and federation say who trained on what)."""
    started = dt.datetime.now(dt.timezone.utc)
    training_dir, out_dir = Path(training_dir), Path(out_dir)
    base_dir = Path(config_path).parent if config_path else Path(".")
    rounds = checkpoint_rounds(training_dir)
    trained = _training_json(training_dir)
    if trained:
        u = trained["unit"]
        scenario = None
        if u["scenario"]:
            scenario = next((s for s in config.matrix.scenarios if s.name == u["scenario"]["name"]), None)
            if scenario is None:
                raise FedleakError(f"{training_dir}: a training under poisoning scenario {u['scenario']['name']!r}, "
                                   f"which {config_path} does not declare: pass the config it was trained with")
        setting = tuple(u["setting"]) if u.get("setting") else None  # a sweep's variant: its path and value
        unit = TrainingUnit(component_spec(u["algorithm"], "algorithms"), component_spec(u["defense"], "defenses"),
                            scenario, u["seed"], setting)
        ctx = unit_context(config, unit, base_dir)
        if training_key(ctx, unit) != trained["key"]:
            raise FedleakError(f"{training_dir}/{TRAINING_FILE}: trained with other model, data, federation or "
                               f"fedleak code than {config_path} here: pass the config it was trained with (or "
                               f"retrain: `fedleak train`)")
    else:
        unit = TrainingUnit(component_spec({"name": algorithm or "fedit"}, "algorithms"), ComponentSpec("none"), None,
                            config.run_seeds[0] if seed is None else seed)
        ctx = unit_context(config, unit, base_dir)
        history = _external_history(training_dir, rounds, config.federation.clients)
        # The checkpoints and everything that says who trained on what (seed, data, algorithm).
        key = cache_key("external", [(checkpoint.round_dir(training_dir, r) / "manifest.json").read_text()
                                     for r in rounds], training_key(ctx, unit))
    one = dataclasses.replace(config, seed=unit.seed, seeds=(), matrix=dataclasses.replace(
        config.matrix, algorithms=(unit.algorithm,), defenses=(unit.defense,),
        scenarios=(unit.scenario,) if unit.scenario else ()))
    attacks = next((p.attacks for p in plan(one, only)
                    if (p.unit.scenario_name, p.unit.setting) == (unit.scenario_name, unit.setting)), [])
    if not attacks:
        raise FedleakError(f"{config_path}: matrix.attacks run no privacy attack on {unit.label} (its rules, the "
                           f"attacks' scenarios or --only leave none): add one or change matrix.exclude")
    with run_lock(out_dir):
        base_model, tokenizer = shared_base_model(ctx.model_ref, **ctx.config.model.load_options())
        final_dir = checkpoint.round_dir(training_dir, rounds[-1])
        views = checkpoint.available_views(final_dir)
        algorithm_obj = instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs,
                                    f"--algorithm {unit.algorithm.label}")
        start = time.perf_counter()
        utility = view_utility(add_peft_adapter(base_model, ctx.config.model.adapter, seed=0), ctx.config, ctx.data, tokenizer,
                               final_dir, views if unit.scenario is None else ["global"])
        evaluated = {"utility": utility, "utility_seconds": time.perf_counter() - start, "poisoning": None}
        trained = trained or _external_training(key, history, algorithm_obj, views)
        record = training_record(unit, trained, evaluated, str(training_dir.resolve()))
        cells, _ = attack_training(ctx, unit, record, training_dir, attacks, algorithm=algorithm_obj,
                                   progress=progress, cache_dir=out_dir / ATTACKS_DIR, use_cache=use_cache,
                                   shadow_dir=out_dir / SHADOWS_DIR)
        # The data's warnings and truncation counts, as `run` gives them (after the checkpoints proved usable:
        # a failing command prints its one error line alone).
        report_data_quality(config, base_dir, ctx.model_ref)
        results = results_record(config, config_path=config_path, only=only, jobs=1, started=started,
                                 model_info=resolve_model(config)[1], data={unit.seed: ctx.data},
                                 base_utility={unit.seed: base_model_utility(ctx, out_dir, use_cache)},
                                 trainings=[record], cells=cells, checkpoint_dir=str(training_dir))
        write_results(out_dir, results)
        return results
