"""Training and evaluating one unit of the matrix (an algorithm under a defense and a poisoning
scenario, with one seed): its checkpoints and training.json, its utility and trigger rates in
evaluation.json, both read back from the cache when their keys match, and the results record built
from the two; also the untrained base model's utility, the floor every training is read against."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fedleak.common.io import atomic_write_json
from fedleak.common.params import instantiate
from fedleak.eval.cache import (EVALUATION_FILE, TRAINING_FILE, cache_key, code_fingerprint, data_fingerprint,
                                evaluation_key, model_fingerprint, read_json, training_key, utility_key)
from fedleak.eval.config import RunConfig, build_defense, plain
from fedleak.eval.context import SeedContext, unit_context
from fedleak.eval.fit import synthetic_domain
from fedleak.eval.plan import TrainingUnit
from fedleak.eval.poisoning import (backdoor_prompts, backdoors_of, build_adversary, detection, measures_safety,
                                    refusal_rates, safety_prompts, scenario_record, trigger_rates)
from fedleak.eval.utility import evaluate_utility
from fedleak.federated import checkpoint
from fedleak.federated.adapters import DEFAULT, add_peft_adapter
from fedleak.federated.data import FederatedData
from fedleak.federated.fedpit import SelfGenerating
from fedleak.federated.model import shared_base_model
from fedleak.federated.loop import run_rounds
from fedleak.federated.rounds import ALGORITHMS, TrainingSetup

log = logging.getLogger(__name__)

SYNTHETIC_EXAMPLES = 3  # synthetic records per training quoted in the results (and report)


def upload_bytes(history: list[dict]) -> tuple[float | None, int]:
    """Bytes uploaded: the mean per client and round (None when nothing was), and the total."""
    sent = [n for entry in history for n in entry.get("upload_bytes", {}).values()]
    return (float(np.mean(sent)) if sent else None), int(sum(sent))


def view_utility(model, config: RunConfig, data: FederatedData, tokenizer, final_dir: Path,
                 view_keys: list[str]) -> dict:
    """Utility on the held-out records of each view but the uploads, from the final round's checkpoints."""
    records = data.heldout[: config.utility.records]
    out: dict = {"records": len(records), "clients": {}}
    for key in view_keys:
        observer, client = checkpoint.parse_view_key(key)
        if observer == "upload":
            continue
        checkpoint.apply_saved_view(model, final_dir, observer, client, config.model.adapter)
        scores = evaluate_utility(model, tokenizer, records, max_length=config.federation.max_length,
                                  batch_size=config.utility.batch_size, max_new_tokens=config.utility.max_new_tokens)
        if observer == "global":
            out["global"] = scores
        else:
            out["clients"][str(client)] = scores
    if out["clients"]:
        out["client_mean"] = {m: float(np.mean([s[m] for s in out["clients"].values()]))
                              for m in next(iter(out["clients"].values()))}
    return out


def _synthetic_summary(history: list[dict]) -> dict | None:
    totals: dict[str, int] = {}
    for entry in history:
        for metrics in entry["client_metrics"].values():
            for key, value in metrics.get("selfgen", {}).items():
                totals[key] = totals.get(key, 0) + value
    return totals or None


def sanitisation_summary(history: list[dict]) -> dict | None:
    """What the defense's `client_records` changed in the clients' records (scrub), summed over clients: per part
    of the defense, `records`, `changed`, `identifiers_left` and `replaced` per entity, each client counted once
    (its facts are the same every round). None when no client's records were changed or described."""
    per_client: dict[str, dict] = {}
    for entry in history:
        for client, metrics in entry["client_metrics"].items():
            if metrics.get("sanitisation"):
                per_client[client] = metrics["sanitisation"]
    totals: dict[str, dict] = {}
    for facts in per_client.values():
        for part, counts in facts.items():
            total = totals.setdefault(part, {"clients": 0, "replaced": {}})
            total["clients"] += 1
            for key, value in counts.items():
                if isinstance(value, dict):
                    for entity, n in value.items():
                        total.setdefault(key, {})[entity] = total.setdefault(key, {}).get(entity, 0) + n
                else:
                    total[key] = total.get(key, 0) + value
    return totals or None


SELF_GENERATED_SCOPE = (
    "the DP-SGD trainings on their records as generated: the synthetic records are generated with the "
    "clients' real records as in-context demonstrations, without noise, so what a real record passes into "
    "them (and through them into the global adapter) is not bounded")


def _record_level(clients: dict[str, dict]) -> dict:
    """The record-level fields from each client's last accounting (`ClientJob.privacy`)."""
    order = sorted(clients, key=int)
    out = {"record_level_epsilon": max(clients[c]["epsilon"] for c in order),
           "record_level_delta": clients[order[0]]["delta"],
           "record_level_epsilon_per_client": {c: clients[c]["epsilon"] for c in order}}
    accounting = {c: clients[c]["accounting"] for c in order if "accounting" in clients[c]}
    if accounting:  # the RDP accountant's (sigma, sample rate, steps) history: epsilon can be recomputed from it
        out["record_level_accounting"] = accounting
        out["record_level_sample_rate"] = {c: list(dict.fromkeys(q for _, q, _ in h)) for c, h in accounting.items()}
        out["record_level_steps"] = {c: sum(k for _, _, k in h) for c, h in accounting.items()}
    targets = {clients[c].get("target_epsilon") for c in order} - {None}
    if targets:
        out["target_epsilon"] = min(targets)
        out["exceeded_target"] = out["record_level_epsilon"] > out["target_epsilon"]
    return out


def _privacy(history: list[dict], *, self_generated: bool = False) -> dict | None:
    """The accountants' final epsilons: user-level from the server (DP-FedAvg), record-level from the
    clients (DP-SGD; the largest over clients, each client's last report).

    Args:
        history: the round history; a private client's accounting is in each round's `client_privacy`
            (a defense that only puts `epsilon` and `delta` in the client metrics is read from there).
        self_generated: the algorithm trains on records generated from the clients' real ones (FEDPIT,
            LOCIT+SA): the record-level guarantee's scope is stated in `record_level_scope`.

    Returns:
        The privacy record of results.json (None when no accountant ran): `record_level_epsilon`,
        `record_level_delta`, `..._per_client`, `..._accounting`, `..._sample_rate` (accounted rates, per
        client), `..._steps`, `target_epsilon` and `exceeded_target` with a target, and the user-level
        `user_level_epsilon`, `user_level_delta`, `user_level_sample_rate`, `user_level_steps`.
    """
    out = {}
    server = [r for r in history if "epsilon" in r]
    if server:
        out["user_level_epsilon"], out["user_level_delta"] = server[-1]["epsilon"], server[-1]["delta"]
        if "sample_rate" in server[-1]:
            out["user_level_sample_rate"] = server[-1]["sample_rate"]
            out["user_level_steps"] = server[-1]["accounted_steps"]
    clients: dict[str, dict] = {}
    for r in history:
        clients.update(r.get("client_privacy", {}))
    if not clients:  # a defense that reports in the client metrics only
        for r in history:
            clients.update({c: m for c, m in r["client_metrics"].items() if "epsilon" in m})
    if clients:
        out.update(_record_level(clients))
        if self_generated:
            out["record_level_scope"] = SELF_GENERATED_SCOPE
    return out or None


def _synthetic_examples(training_dir: Path, final_round: int) -> list[dict]:
    folder = checkpoint.round_dir(training_dir, final_round)
    rows = []
    for path in sorted(folder.glob("synthetic-client-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()[:SYNTHETIC_EXAMPLES]]
    return rows[:SYNTHETIC_EXAMPLES]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train(ctx: SeedContext, unit: TrainingUnit, training_dir: Path, key: str, base_model, tokenizer,
           progress: bool, base_dir: Path, grid=None):
    """Train into a scratch folder and move it into place once complete: a killed training leaves no
    folder that looks finished."""
    cfg = ctx.config
    algorithm = instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs,
                            f"matrix.algorithms: {unit.algorithm.label}")
    defense = build_defense(unit.defense, f"matrix.defenses: {unit.defense.label}")
    for stale in training_dir.parent.glob(f".{training_dir.name}.partial-*"):  # left by a killed run
        if not _alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = training_dir.with_name(f".{training_dir.name}.partial-{os.getpid()}")
    setup = TrainingSetup(base_model=base_model, tokenizer=tokenizer, data=ctx.data, federation=cfg.federation,
                          adapter=cfg.model.adapter, hooks=defense, seed=cfg.seed, out_dir=scratch,
                          config_hash=key, progress=progress, label=unit.label)
    if unit.scenario:
        setup.adversary = build_adversary(unit.scenario, cfg)
    engine = cfg.engine.name if algorithm.federated else "inprocess"  # no exchange: nothing for Flower to run
    if grid is not None:  # this process is a ServerApp on a real Flower federation
        from fedleak.eval.flower_engine import deployment_rounds

        engine = "flower-deployment"
        run = deployment_rounds(grid, setup, algorithm, cfg, unit, base_dir=base_dir, model_ref=ctx.model_ref)
    elif engine == "flower":
        from fedleak.eval.flower_engine import flower_rounds

        run = flower_rounds(setup, algorithm, cfg, unit, base_dir=base_dir, model_ref=ctx.model_ref)
    else:
        run = run_rounds(setup, algorithm)
    per_round, total = upload_bytes(run.history)
    trained = {
        "format": "fedleak-training/1", "key": key,
        "unit": {"algorithm": plain(unit.algorithm), "defense": plain(unit.defense),
                 "scenario": plain(unit.scenario) if unit.scenario else None, "seed": unit.seed,
                 "setting": list(unit.setting) if unit.setting else None},
        "algorithm_params": algorithm.params(), "defense_params": defense.params(),
        "train_seconds": run.train_seconds, "final_round": run.final_round,
        "views": checkpoint.available_views(checkpoint.round_dir(scratch, run.final_round)),
        "synthetic": _synthetic_summary(run.history),
        "privacy": _privacy(run.history, self_generated=isinstance(algorithm, SelfGenerating)),
        "synthetic_examples": _synthetic_examples(scratch, run.final_round),
        "synthetic_domain_rouge_l": (synthetic_domain(scratch, run.final_round, ctx.data, seed=cfg.seed)
                                     if isinstance(algorithm, SelfGenerating) else None),
        "upload_bytes_per_client_per_round": per_round, "upload_bytes_total": total,
        "adapter_parameters": _adapter_parameters(checkpoint.round_dir(scratch, run.final_round)),
        "torch_threads": torch.get_num_threads(), "engine": engine, "rounds": run.history,
    }
    if trained["synthetic"] is not None and trained["synthetic"].get("accepted", 0) == 0:
        log.warning("%s accepted none of its %d self-generated candidates: its global adapter never trained "
                    "(the global view is the base model); the report says so", unit.label,
                    trained["synthetic"].get("candidates", 0))
    atomic_write_json(scratch / TRAINING_FILE, trained)
    shutil.rmtree(training_dir, ignore_errors=True)
    os.replace(scratch, training_dir)
    return trained, run.model


def _evaluate(ctx: SeedContext, unit: TrainingUnit, trained: dict, training_dir: Path, key: str, model,
              tokenizer) -> dict:
    cfg = ctx.config
    final_dir = checkpoint.round_dir(training_dir, trained["final_round"])
    start = time.perf_counter()
    # A poisoned training is judged by its global model (the clients' models are the clean run's business).
    utility = view_utility(model, cfg, ctx.data, tokenizer, final_dir,
                       [k for k in trained["views"] if unit.scenario is None or k == "global"])
    utility_seconds = time.perf_counter() - start
    poisoning = None
    if ALGORITHMS.get(unit.algorithm.name).federated:
        start = time.perf_counter()
        poisoning = {**scenario_record(unit.scenario, cfg), "backdoors": {}, "detection": detection(trained["rounds"], confidence=cfg.attack.confidence)}
        # The clean training measures every backdoor of the matrix (how often the trigger gets the
        # target without poisoning); a poisoned training, its own.
        own = {k: b for k, b in backdoors_of(cfg.matrix.scenarios).items()
               if unit.scenario is None or k in {a.label for a in unit.scenario.attacks}}
        if own:
            checkpoint.apply_saved_view(model, final_dir, "global", None, cfg.model.adapter)
        for name, backdoor in own.items():
            poisoning["backdoors"][name] = trigger_rates(model, tokenizer, backdoor,
                                                         backdoor_prompts(ctx.data.heldout, cfg.poisoning.prompts),
                                                         batch_size=cfg.poisoning.batch_size,
                                                         confidence=cfg.attack.confidence)
        if measures_safety(cfg, _defense_names(unit)):  # the refusal rate: a safety attack's target, or its defense's
            if not own:
                checkpoint.apply_saved_view(model, final_dir, "global", None, cfg.model.adapter)
            poisoning["safety"] = refusal_rates(model, tokenizer, safety_prompts(cfg.poisoning.prompts),
                                                batch_size=cfg.poisoning.batch_size, confidence=cfg.attack.confidence)
        poisoning["seconds"] = time.perf_counter() - start
    return {"format": "fedleak-evaluation/1", "key": key, "utility": utility, "utility_seconds": utility_seconds,
            "poisoning": poisoning}


def _defense_names(unit: TrainingUnit) -> tuple[str, ...]:
    """The training's defense and, for a composition, its parts."""
    return (unit.defense.name, *(p.name for p in unit.defense.parts or ()))


def _adapter_parameters(folder: Path) -> int | None:
    """What one client trains: the tensors of the shared adapter in the round's first view."""
    views = checkpoint.available_views(folder)
    if not views:
        return None
    observer, _, client = views[0].partition("/")
    view = checkpoint.load_view(folder, observer, int(client) if client else None)
    return sum(t.numel() for t in view.get(DEFAULT, {}).values()) or None


def training_record(unit: TrainingUnit, trained: dict, evaluated: dict, checkpoint_dir: str) -> dict:
    """A training's record in the results file.

    Args:
        trained: training.json's content (or, for another tool's checkpoints, the same fields).
        evaluated: evaluation.json's content (utility, utility_seconds, poisoning).
        checkpoint_dir: where the checkpoints are, as the results file names them.
    """
    poisoning_seconds = (evaluated["poisoning"] or {}).get("seconds", 0.0)
    return {
        **unit.key(), "algorithm_name": unit.algorithm.name, "algorithm_params": trained["algorithm_params"],
        "defense_name": unit.defense.name, "defense_params": trained["defense_params"],
        "checkpoint_dir": checkpoint_dir, "training_key": trained["key"],
        "adapter_parameters": trained.get("adapter_parameters"),
        "train_seconds": trained["train_seconds"], "utility_seconds": evaluated["utility_seconds"],
        "utility": evaluated["utility"], "poisoning": evaluated["poisoning"], "views": trained["views"],
        "synthetic": trained["synthetic"], "privacy": trained["privacy"],
        "synthetic_examples": trained["synthetic_examples"],
        "synthetic_domain_rouge_l": trained.get("synthetic_domain_rouge_l"),
        "sanitisation": sanitisation_summary(trained["rounds"]),
        "cost": {"wall_seconds": trained["train_seconds"] + evaluated["utility_seconds"] + poisoning_seconds,
                 "train_seconds": trained["train_seconds"],
                 "upload_bytes_per_client_per_round": trained["upload_bytes_per_client_per_round"],
                 "upload_bytes_total": trained["upload_bytes_total"], "torch_threads": trained["torch_threads"],
                 "engine": trained.get("engine")},
        "rounds": trained["rounds"],
    }


def cached_training(config: RunConfig, unit: TrainingUnit, out_dir: Path, *, base_dir: Path) -> dict | None:
    """The training's results record when its checkpoints and evaluation are cached under their keys."""
    ctx = unit_context(config, unit, base_dir)
    training_dir = Path(out_dir) / "trainings" / unit.stem
    t_key = training_key(ctx, unit)
    trained = read_json(training_dir / TRAINING_FILE)
    evaluated = read_json(training_dir / EVALUATION_FILE)
    if (trained or {}).get("key") == t_key and (evaluated or {}).get("key") == evaluation_key(ctx, unit, t_key):
        return training_record(unit, trained, evaluated, str(training_dir.relative_to(out_dir)))
    return None


def train_unit(config: RunConfig, unit: TrainingUnit, out_dir: Path, *, base_dir: Path, progress: bool = False,
               use_cache: bool = True, grid=None) -> tuple[dict, bool]:
    """Train (unless cached) and evaluate one training; returns its results record and whether all of
    it came from the cache. With a Flower `grid` (a ServerApp's), the clients are that federation's nodes."""
    ctx = unit_context(config, unit, base_dir)
    training_dir = Path(out_dir) / "trainings" / unit.stem
    t_key = training_key(ctx, unit)
    e_key = evaluation_key(ctx, unit, t_key)
    trained = read_json(training_dir / TRAINING_FILE) if use_cache else None
    trained = trained if trained and trained.get("key") == t_key else None
    evaluated = read_json(training_dir / EVALUATION_FILE) if trained else None
    evaluated = evaluated if evaluated and evaluated.get("key") == e_key else None
    if trained and evaluated:
        return training_record(unit, trained, evaluated, str(training_dir.relative_to(out_dir))), True
    base_model, tokenizer = shared_base_model(ctx.model_ref, **ctx.config.model.load_options())
    if trained is None:
        trained, model = _train(ctx, unit, training_dir, t_key, base_model, tokenizer, progress, base_dir, grid)
    else:  # checkpoints are there, the evaluation settings changed: the views carry every weight
        model = add_peft_adapter(base_model, ctx.config.model.adapter, seed=0)
    evaluated = _evaluate(ctx, unit, trained, training_dir, e_key, model, tokenizer)
    atomic_write_json(training_dir / EVALUATION_FILE, evaluated)
    return training_record(unit, trained, evaluated, str(training_dir.relative_to(out_dir))), False


def base_model_utility(ctx: SeedContext, out_dir: Path, use_cache: bool) -> dict:
    """The untrained base model's utility: the floor every training's utility is read against."""
    cfg = ctx.config
    path = Path(out_dir) / f"base-utility-seed{cfg.seed}.json"
    key = cache_key("base-utility", code_fingerprint(cfg.plugins), model_fingerprint(cfg), data_fingerprint(ctx),
                    utility_key(cfg), cfg.federation.max_length)
    cached = read_json(path) if use_cache else None
    if cached and cached.get("key") == key:
        return cached["utility"]
    model, tokenizer = shared_base_model(ctx.model_ref, **cfg.model.load_options())
    utility = evaluate_utility(model, tokenizer, ctx.data.heldout[: cfg.utility.records],
                               max_length=cfg.federation.max_length, batch_size=cfg.utility.batch_size,
                               max_new_tokens=cfg.utility.max_new_tokens)
    atomic_write_json(path, {"key": key, "utility": utility})
    return utility
