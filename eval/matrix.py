"""Run the attack matrix: train each (algorithm, defense, scenario, seed) once, evaluate its utility
(and, under poisoning, its trigger rates), then run each privacy attack on every requested observer's
view of every requested round (final by default).

Work is cached on disk, keyed by a hash of what produced it, so a rerun (after a crash or kill -9,
or with one more attack) does only what is missing and writes the same results:

    trainings/<stem>/round-XXXX/...      checkpoints (federated/checkpoint.py)
    trainings/<stem>/training.json       key, history, costs: the folder appears complete or not at all
    trainings/<stem>/evaluation.json     key, utility, poisoning trigger rates
    trainings/<stem>/attacks/<attack>.json   key, the attack's cells on that training

Trainings are independent and run in parallel processes with `jobs` > 1; attacks run in this
process afterwards (LiRA's shadows and the reference model's statistics are shared per seed). The
attacks on one view run back to back on one loaded view, so the logit-based membership scores
share their forward passes (`attacks/membership/stats.py`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedleak import __version__
from fedleak.attacks.base import ATTACKS, AttackEnvironment, MembershipAttack, Secrets, Target
from fedleak.attacks.membership.stats import scorable
from fedleak.eval.aggregate import aggregate_cells, aggregate_trainings
from fedleak.eval.audit import empirical_epsilon, one_run_epsilon
from fedleak.eval.config import AttackSettings, ComponentSpec, RunConfig, build_defense, instantiate, plain
from fedleak.eval.metrics import membership_metrics, roc_points
from fedleak.eval.plan import PlannedTraining, TrainingUnit, attack_cells, plan, training_steps
from fedleak.eval.poisoning import (backdoors_of, build_adversary, detection, poisoning_cells, scenario_record,
                                    trigger_rates)
from fedleak.eval.results import SCHEMA, git_commit, library_versions, machine_info, write_results
from fedleak.eval.utility import evaluate_utility
from fedleak.federated import checkpoint
from fedleak.federated.adapters import add_lora, apply_view
from fedleak.federated.data import Canary, FederatedData, Record
from fedleak.federated.datasource import prepare_data
from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_json, sha256_file
from fedleak.federated.model import build_embedded, load_base_model
from fedleak.federated.rounds import ALGORITHMS, TrainingSetup, run_rounds
from fedleak.federated.seeding import derive_seed, numpy_rng

log = logging.getLogger("fedleak")

SYNTHETIC_EXAMPLES = 3  # synthetic records per training quoted in the results (and report)
TRAINING_FILE, EVALUATION_FILE, ATTACKS_DIR = "training.json", "evaluation.json", "attacks"
LOCK_FILE = ".fedleak.lock"


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_model(config: RunConfig) -> tuple[str, dict]:
    """The base model's folder or id, and facts about it for the results file."""
    if config.model.name != "embedded":
        return config.model.name, {"name": config.model.name}
    path = build_embedded(config.model.embedded)
    build = json.loads((path / "fedleak_build.json").read_text())
    return str(path), {"name": "embedded", "path": str(path), "parameters": build["parameters"],
                       "vocab": build["vocab"], "build_seconds": round(build["build_seconds"], 1),
                       "pretrain_final_loss": build["pretrain_final_loss"]}


def membership_split(members: list[Record], heldout: list[Record], *, seed: int,
                     purpose: str) -> tuple[list[Record], list[Record]]:
    """Equal numbers of members and held-out non-members, drawn with the run's seed."""
    n = min(len(members), len(heldout))
    rng = numpy_rng(seed, "membership-split", purpose)
    pick = lambda records: [records[int(i)] for i in sorted(rng.choice(len(records), size=n, replace=False))]
    return pick(members), pick(heldout)


def _balanced_candidates(members, nonmembers):
    return list(members) + list(nonmembers), np.r_[np.ones(len(members), int), np.zeros(len(nonmembers), int)]


def run_membership(attack: MembershipAttack, target: Target, members, nonmembers, *, settings: AttackSettings,
                   delta: float, seed: int, audit: list[Canary] = ()) -> dict:
    """Score members and non-members in one call (so the attacks on a view share one forward pass),
    then the metrics, the empirical epsilon and, with audit canaries, the one-run audit."""
    records, y_true = _balanced_candidates(members, nonmembers)
    scores = attack.score(target, records)
    metrics = membership_metrics(y_true, scores, n_bootstrap=settings.bootstrap, confidence=settings.confidence,
                                 seed=derive_seed(seed, "bootstrap"))
    empirical = empirical_epsilon(y_true, scores, delta=delta, confidence=settings.confidence)
    metrics["epsilon_lb"] = empirical["epsilon_lb"]
    outcome = {"metrics": metrics, "n_members": len(members), "n_nonmembers": len(nonmembers),
               "audit": {"empirical": empirical}}
    if audit:
        included = np.array([c.repetitions > 0 for c in audit])
        audit_scores = attack.score(target, [c.record(0) for c in audit])
        if included.any() and not included.all():
            one_run = one_run_epsilon(included, audit_scores, delta=delta, confidence=settings.confidence)
            metrics["one_run_epsilon_lb"] = one_run["epsilon_lb"]
            outcome["audit"]["one_run"] = one_run
    fpr, tpr = roc_points(y_true, scores)
    outcome["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return outcome


def _rounds_of(spec: ComponentSpec, final_round: int) -> list[int]:
    if spec.rounds == "final":
        return [final_round]
    if spec.rounds == "all":
        return list(range(final_round + 1))
    return [r for r in spec.rounds if r <= final_round]


@dataclass
class _ViewTruth:
    """What one view of one round trained on: the ground truth its attacks are scored against."""

    members: list[Record]
    secrets: Secrets
    audit: list[Canary]


def _view_truth(algorithm, history: list[dict], data: FederatedData, observer: str, client: int | None,
                rnd: int) -> _ViewTruth:
    if observer == "global":
        # Round 0 is the initial adapter: scored against the final members, it is the pre-training baseline.
        upto = history if rnd == 0 else [entry for entry in history if entry["round"] <= rnd]
        contributors = {c for entry in upto for c in entry["clients"]}
        clients = algorithm.global_clients(data, contributors)
        others = data.heldout
    else:
        clients = {client}
        others = data.members_of(set(range(len(data.clients))) - clients) or data.heldout
    members = data.members_of(clients)
    secrets = Secrets(records=members, canaries=[c for c in data.canaries if c.client in clients],
                      reference_canaries=list(data.reference_canaries), other_records=list(others),
                      nonmembers=list(data.heldout))
    return _ViewTruth(members, secrets, [c for c in data.audit_canaries if c.client in clients])


@dataclass
class SeedContext:
    """What every training and attack of one seed shares: the data, the model, the attack environment."""

    config: RunConfig  # config.for_seed(seed)
    data: FederatedData
    data_sha256: str | None  # a user data file's content
    env: AttackEnvironment | None = None
    scorable_cache: dict = field(default_factory=dict)

    @functools.cached_property
    def model_ref(self) -> str:
        """Resolved on first use: a dry run never builds the embedded model."""
        return resolve_model(self.config)[0]

    def scorable(self, records: list[Record], tokenizer) -> list[Record]:
        """Records with a scored token (a prompt filling max_length has no loss): the others leave every split."""
        key = tuple(r.record_id for r in records)
        if key not in self.scorable_cache:
            fed = self.config.federation
            self.scorable_cache[key] = scorable(records, tokenizer, max_length=fed.max_length,
                                                response_only=fed.response_only_loss)
        return self.scorable_cache[key]

    def environment(self, tokenizer) -> AttackEnvironment:
        if self.env is None:
            cfg, fed, data = self.config, self.config.federation, self.data
            self.env = AttackEnvironment(
                tokenizer=tokenizer, seed=cfg.seed, max_length=fed.max_length, response_only=fed.response_only_loss,
                batch_size=cfg.attack.batch_size, base_model_ref=self.model_ref, lora=cfg.model.lora,
                allow_download=cfg.model.allow_download,
                # The attacker's pool: every candidate it scores (members, held-out records, audit canaries).
                population=data.members + data.heldout + [c.record(0) for c in data.audit_canaries],
                train=dataclasses.replace(fed.train_settings(), epochs=fed.rounds * fed.local_epochs))
        return self.env


def _data_path(config: RunConfig, base_dir: Path) -> Path | None:
    if config.data.source != "file":
        return None
    path = Path(config.data.file.path)
    return path if path.is_absolute() else base_dir / path


_CONTEXTS: dict[tuple, SeedContext] = {}  # per process: a worker keeps its seed's data between trainings


def seed_context(config: RunConfig, seed: int, base_dir: Path) -> SeedContext:
    key = (config.hash(), seed, str(base_dir))
    if key not in _CONTEXTS:
        cfg = config.for_seed(seed)
        fed = cfg.federation
        data = prepare_data(cfg.data, seed=seed, num_clients=fed.clients, partition_method=fed.partition,
                            alpha=fed.alpha, min_records=fed.min_records_per_client, base_dir=base_dir)
        path = _data_path(cfg, base_dir)
        _CONTEXTS[key] = SeedContext(cfg, data, sha256_file(path) if path else None)
    return _CONTEXTS[key]


CODE_FOLDERS = ("attacks", "common", "defenses", "eval", "federated")  # what trains, evaluates and attacks (not reports/)


@functools.cache
def code_fingerprint(plugins: tuple[str, ...] = ()) -> str:
    """sha256 of fedleak's training, evaluation and attack code and of the plug-in modules: an edited
    algorithm, defense or attack invalidates what it produced (results.json's git_commit would lie)."""
    import importlib
    import sys

    root = Path(__file__).resolve().parent.parent
    files = sorted(p for folder in CODE_FOLDERS for p in (root / folder).rglob("*.py"))
    for module in plugins:
        path = getattr(sys.modules.get(module) or importlib.import_module(module), "__file__", None)
        files += [Path(path)] if path else []
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def model_fingerprint(config: RunConfig) -> dict:
    """What the base model is: the embedded build's settings, or the name plus, for a local folder, its
    files' names and sizes (reading gigabytes of weights to hash them would cost more than it saves).
    A hub id is taken at its name: pin a revision by downloading it to a folder."""
    model = plain(config.model)
    out = {"name": model["name"], "lora": model["lora"]}
    if model["name"] == "embedded":
        out["embedded"] = model["embedded"]
    elif Path(model["name"]).is_dir():
        out["files"] = sorted((p.name, p.stat().st_size) for p in Path(model["name"]).iterdir() if p.is_file())
    return out


def data_fingerprint(ctx: SeedContext) -> dict:
    data = plain(ctx.config.data)
    return {"source": data["source"], data["source"]: data[data["source"]], "file_sha256": ctx.data_sha256}


def training_key(ctx: SeedContext, unit: TrainingUnit) -> str:
    cfg = ctx.config
    return cache_key("training", __version__, code_fingerprint(cfg.plugins), cfg.seed, model_fingerprint(cfg),
                     data_fingerprint(ctx), plain(cfg.federation), plain(unit.algorithm), plain(unit.defense),
                     plain(unit.scenario) if unit.scenario else None)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _upload_bytes(history: list[dict]) -> tuple[float | None, int]:
    sent = [n for entry in history for n in entry.get("upload_bytes", {}).values()]
    return (float(np.mean(sent)) if sent else None), int(sum(sent))


def _utility(model, config: RunConfig, data: FederatedData, tokenizer, final_dir: Path, view_keys: list[str]) -> dict:
    records = data.heldout[: config.utility.records]
    out: dict = {"records": len(records), "clients": {}}
    for key in view_keys:
        observer, client = checkpoint.parse_view_key(key)
        if observer == "upload":
            continue
        apply_view(model, checkpoint.load_view(final_dir, observer, client), config.model.lora)
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


def _privacy(history: list[dict]) -> dict | None:
    """The accountants' final epsilons: user-level from the server (DP-FedAvg), record-level from the
    clients (DP-SGD; the largest over clients, each client's last report)."""
    out = {}
    server = [(r["epsilon"], r["delta"]) for r in history if "epsilon" in r]
    if server:
        out["user_level_epsilon"], out["user_level_delta"] = server[-1]
    clients = {}
    for r in history:
        for client, metrics in r["client_metrics"].items():
            if "epsilon" in metrics:
                clients[client] = (metrics["epsilon"], metrics["delta"])
    if clients:
        out["record_level_epsilon"] = max(e for e, _ in clients.values())
        out["record_level_delta"] = next(iter(clients.values()))[1]
        out["record_level_epsilon_per_client"] = {c: e for c, (e, _) in sorted(clients.items())}
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
           progress: bool):
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
                          lora=cfg.model.lora, hooks=defense, seed=cfg.seed, out_dir=scratch,
                          config_hash=key, progress=progress, label=unit.label)
    if unit.scenario:
        setup.adversary = build_adversary(unit.scenario, cfg)
    run = run_rounds(setup, algorithm)
    per_round, total = _upload_bytes(run.history)
    trained = {
        "format": "fedleak-training/1", "key": key,
        "unit": {"algorithm": plain(unit.algorithm), "defense": plain(unit.defense),
                 "scenario": plain(unit.scenario) if unit.scenario else None, "seed": unit.seed},
        "algorithm_params": algorithm.params(), "defense_params": defense.params(),
        "train_seconds": run.train_seconds, "final_round": run.final_round,
        "views": checkpoint.available_views(checkpoint.round_dir(scratch, run.final_round)),
        "synthetic": _synthetic_summary(run.history), "privacy": _privacy(run.history),
        "synthetic_examples": _synthetic_examples(scratch, run.final_round),
        "upload_bytes_per_client_per_round": per_round, "upload_bytes_total": total,
        "torch_threads": torch.get_num_threads(), "rounds": run.history,
    }
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
    utility = _utility(model, cfg, ctx.data, tokenizer, final_dir,
                       [k for k in trained["views"] if unit.scenario is None or k == "global"])
    utility_seconds = time.perf_counter() - start
    poisoning = None
    if ALGORITHMS.get(unit.algorithm.name).federated:
        start = time.perf_counter()
        poisoning = {**scenario_record(unit.scenario, cfg), "backdoors": {}, "detection": detection(trained["rounds"])}
        # The clean training measures every backdoor of the matrix (how often the trigger gets the
        # target without poisoning); a poisoned training, its own.
        own = {k: b for k, b in backdoors_of(cfg.matrix.scenarios).items()
               if unit.scenario is None or k in {a.label for a in unit.scenario.attacks}}
        if own:
            apply_view(model, checkpoint.load_view(final_dir, "global", None), cfg.model.lora)
        for name, backdoor in own.items():
            poisoning["backdoors"][name] = trigger_rates(model, tokenizer, backdoor, ctx.data.heldout[: cfg.poisoning.prompts],
                                                         batch_size=cfg.poisoning.batch_size)
        poisoning["seconds"] = time.perf_counter() - start
    return {"format": "fedleak-evaluation/1", "key": key, "utility": utility, "utility_seconds": utility_seconds,
            "poisoning": poisoning}


def evaluation_key(ctx: SeedContext, unit: TrainingUnit, train_key: str) -> str:
    cfg = ctx.config
    backdoors = sorted(a.label for s in cfg.matrix.scenarios for a in s.attacks)
    return cache_key("evaluation", train_key, plain(cfg.utility), plain(cfg.poisoning), backdoors)


def _training_record(unit: TrainingUnit, trained: dict, evaluated: dict, training_dir: Path, out_dir: Path) -> dict:
    poisoning_seconds = (evaluated["poisoning"] or {}).get("seconds", 0.0)
    return {
        **unit.key(), "algorithm_name": unit.algorithm.name, "algorithm_params": trained["algorithm_params"],
        "defense_name": unit.defense.name, "defense_params": trained["defense_params"],
        "checkpoint_dir": str(training_dir.relative_to(out_dir)), "training_key": trained["key"],
        "train_seconds": trained["train_seconds"], "utility_seconds": evaluated["utility_seconds"],
        "utility": evaluated["utility"], "poisoning": evaluated["poisoning"], "views": trained["views"],
        "synthetic": trained["synthetic"], "privacy": trained["privacy"],
        "synthetic_examples": trained["synthetic_examples"],
        "cost": {"wall_seconds": trained["train_seconds"] + evaluated["utility_seconds"] + poisoning_seconds,
                 "train_seconds": trained["train_seconds"],
                 "upload_bytes_per_client_per_round": trained["upload_bytes_per_client_per_round"],
                 "upload_bytes_total": trained["upload_bytes_total"], "torch_threads": trained["torch_threads"]},
        "rounds": trained["rounds"],
    }


def cached_training(config: RunConfig, unit: TrainingUnit, out_dir: Path, *, base_dir: Path) -> dict | None:
    """The training's results record when its checkpoints and evaluation are cached under their keys."""
    ctx = seed_context(config, unit.seed, base_dir)
    training_dir = Path(out_dir) / "trainings" / unit.stem
    t_key = training_key(ctx, unit)
    trained = _read_json(training_dir / TRAINING_FILE)
    evaluated = _read_json(training_dir / EVALUATION_FILE)
    if (trained or {}).get("key") == t_key and (evaluated or {}).get("key") == evaluation_key(ctx, unit, t_key):
        return _training_record(unit, trained, evaluated, training_dir, Path(out_dir))
    return None


def train_unit(config: RunConfig, unit: TrainingUnit, out_dir: Path, *, base_dir: Path, progress: bool = False,
               use_cache: bool = True) -> tuple[dict, bool]:
    """Train (unless cached) and evaluate one training; returns its results record and whether all of
    it came from the cache."""
    ctx = seed_context(config, unit.seed, base_dir)
    training_dir = Path(out_dir) / "trainings" / unit.stem
    t_key = training_key(ctx, unit)
    e_key = evaluation_key(ctx, unit, t_key)
    trained = _read_json(training_dir / TRAINING_FILE) if use_cache else None
    trained = trained if trained and trained.get("key") == t_key else None
    evaluated = _read_json(training_dir / EVALUATION_FILE) if trained else None
    evaluated = evaluated if evaluated and evaluated.get("key") == e_key else None
    if trained and evaluated:
        return _training_record(unit, trained, evaluated, training_dir, Path(out_dir)), True
    base_model, tokenizer = load_base_model(ctx.model_ref, allow_download=ctx.config.model.allow_download)
    if trained is None:
        trained, model = _train(ctx, unit, training_dir, t_key, base_model, tokenizer, progress)
    else:  # checkpoints are there, the evaluation settings changed: the views carry every weight
        model = add_lora(base_model, ctx.config.model.lora, seed=0)
    evaluated = _evaluate(ctx, unit, trained, training_dir, e_key, model, tokenizer)
    atomic_write_json(training_dir / EVALUATION_FILE, evaluated)
    return _training_record(unit, trained, evaluated, training_dir, Path(out_dir)), False


def _cache_name(spec: ComponentSpec) -> str:
    """An attack's cache file: the label and its observers (one attack may be listed twice, for
    disjoint observers)."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", f"{spec.label}-{'+'.join(spec.observers)}") + ".json"


def attack_key(training_key: str, spec: ComponentSpec, observers: tuple[str, ...], settings: AttackSettings) -> str:
    return cache_key("attack", training_key, plain(spec), sorted(observers), plain(settings))


def attack_training(ctx: SeedContext, unit: TrainingUnit, record: dict, training_dir: Path,
                    attacks: list[tuple[ComponentSpec, tuple[str, ...]]], *, algorithm=None, progress: bool = False,
                    use_cache: bool = True, cache_dir: Path | None = None) -> tuple[list[dict], int]:
    """Every planned attack's cells on one training (cached ones read back, in `cache_dir`, by default
    the training's attacks/ folder); returns the cells in attack order and how many attacks ran."""
    cfg, fed, data = ctx.config, ctx.config.federation, ctx.data
    history = record["rounds"]
    present = checkpoint.rounds(training_dir)
    final_round = present[-1]
    cache_dir = cache_dir or training_dir / ATTACKS_DIR
    results: dict[str, list[dict]] = {}
    todo = []
    for spec, observers in attacks:
        key = attack_key(record["training_key"], spec, observers, cfg.attack)
        cached = _read_json(cache_dir / _cache_name(spec)) if use_cache else None
        if cached and cached.get("key") == key:
            results[_cache_name(spec)] = cached["cells"]
        else:
            todo.append((spec, observers, key, instantiate(ATTACKS.get(spec.name), spec.kwargs,
                                                           f"matrix.attacks: {spec.label}")))
    if todo:
        algorithm = algorithm or instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs,
                                             f"matrix.algorithms: {unit.algorithm.label}")
        base_model, tokenizer = load_base_model(ctx.model_ref, allow_download=cfg.model.allow_download)
        model = add_lora(base_model, cfg.model.lora, seed=0)  # every view loads its own weights
        env = ctx.environment(tokenizer)
        env.progress = progress
        privacy = record["privacy"] or {}
        # The empirical epsilon is a bound at the accountant's delta when there is one.
        delta = privacy.get("record_level_delta", privacy.get("user_level_delta", cfg.attack.delta))
        fresh: dict[str, list[dict]] = {_cache_name(spec): [] for spec, *_ in todo}
        probes = [(r, v) for r in sorted({r for spec, *_ in todo for r in _rounds_of(spec, final_round)} & set(present))
                 for v in checkpoint.available_views(checkpoint.round_dir(training_dir, r))]
        for rnd, view in tqdm(probes, desc=f"{unit.label} attacks", unit="view", disable=not progress, leave=False):
            folder = checkpoint.round_dir(training_dir, rnd)
            observer, client = checkpoint.parse_view_key(view)
            wanted = [(spec, attack) for spec, observers, _, attack in todo
                      if observer in observers and rnd in _rounds_of(spec, final_round)]
            if not wanted:
                continue
            apply_view(model, checkpoint.load_view(folder, observer, client), cfg.model.lora)
            truth = _view_truth(algorithm, history, data, observer, client, rnd)
            target = Target(model=model, tokenizer=tokenizer, observer=observer, client=client, round=rnd,
                            max_length=fed.max_length, response_only=fed.response_only_loss, env=env)
            for spec, attack in wanted:
                cell = {**unit.key(), "attack": spec.label, "attack_name": spec.name, "attack_params": attack.params(),
                        "family": attack.family, "observer": observer, "client": client, "round": rnd}
                start = time.perf_counter()
                if isinstance(attack, MembershipAttack):
                    if not truth.members:
                        continue
                    members, nonmembers = membership_split(ctx.scorable(truth.members, tokenizer),
                                                           ctx.scorable(data.heldout, tokenizer),
                                                           seed=cfg.seed, purpose=view)
                    outcome = run_membership(attack, target, members, nonmembers, settings=cfg.attack, delta=delta,
                                             seed=derive_seed(cfg.seed, unit.label, view, rnd, spec.label),
                                             audit=truth.audit)
                    cell.update({k: outcome[k] for k in ("metrics", "n_members", "n_nonmembers", "roc", "audit")})
                    cell["unscorable_members"] = len(truth.members) - len(ctx.scorable(truth.members, tokenizer))
                else:
                    outcome = attack.run(target, truth.secrets)
                    cell.update({"metrics": outcome["metrics"], "details": outcome.get("details", {})})
                seconds = time.perf_counter() - start
                cell["timings"] = {"attack_seconds": seconds, "train_seconds": record["train_seconds"]}
                cell["cost"] = {"wall_seconds": seconds, "upload_bytes_per_client_per_round":
                                record["cost"]["upload_bytes_per_client_per_round"]}
                fresh[_cache_name(spec)].append(cell)
        for spec, observers, key, _ in todo:
            atomic_write_json(cache_dir / _cache_name(spec),
                              {"format": "fedleak-attack/1", "key": key, "cells": fresh[_cache_name(spec)]})
            results[_cache_name(spec)] = fresh[_cache_name(spec)]
    return [cell for spec, _ in attacks for cell in results[_cache_name(spec)]], len(todo)


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


def _train_all(config: RunConfig, units: list[TrainingUnit], out_dir: Path, *, base_dir: Path, jobs: int,
               progress: bool, use_cache: bool) -> dict[TrainingUnit, dict]:
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


def describe(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, base_dir: Path,
             use_cache: bool = True) -> str:
    """The dry run: every training and attack with its cache state, and the work left."""
    lines, trainings_left, steps_left, cells_left, cells_total = [], 0, 0, 0, 0
    for item in planned:
        unit = item.unit
        ctx = seed_context(config, unit.seed, base_dir)
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
            done = cached and (_read_json(training_dir / ATTACKS_DIR / _cache_name(spec)) or {}).get(
                "key") == attack_key(t_key, spec, observers, ctx.config.attack)
            cells_total += n
            cells_left += 0 if done else n
            rounds = spec.rounds if isinstance(spec.rounds, str) else list(spec.rounds)
            if n:
                lines.append(f"  attack {spec.label} on {', '.join(observers)} (rounds: {rounds}): about {n} cells"
                             + (" (cached)" if done else ""))
    lines.append(f"{len(planned)} trainings ({trainings_left} to train, about {steps_left} optimizer steps), about "
                 f"{cells_total} attack cells ({cells_left} to run), seeds {list(config.run_seeds)}")
    return "\n".join(lines)


def _base_utility(ctx: SeedContext, out_dir: Path, use_cache: bool) -> dict:
    """The untrained base model's utility: the floor every training's utility is read against."""
    cfg = ctx.config
    path = Path(out_dir) / f"base-utility-seed{cfg.seed}.json"
    key = cache_key("base-utility", code_fingerprint(cfg.plugins), model_fingerprint(cfg), data_fingerprint(ctx),
                    plain(cfg.utility), cfg.federation.max_length)
    cached = _read_json(path) if use_cache else None
    if cached and cached.get("key") == key:
        return cached["utility"]
    model, tokenizer = load_base_model(ctx.model_ref, allow_download=cfg.model.allow_download)
    utility = evaluate_utility(model, tokenizer, ctx.data.heldout[: cfg.utility.records],
                               max_length=cfg.federation.max_length, batch_size=cfg.utility.batch_size,
                               max_new_tokens=cfg.utility.max_new_tokens)
    atomic_write_json(path, {"key": key, "utility": utility})
    return utility


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """One fedleak process per output folder: a second would train into the same cache. The kernel drops
    the lock when its holder dies, kill -9 included."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FedleakError(f"{out_dir}: another fedleak process (pid {handle.read().strip() or '?'}) is using "
                               f"this output folder: wait for it to finish or pass another --out") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def run_matrix(config: RunConfig, out_dir: Path, *, config_path: str | None = None, progress: bool = True,
               jobs: int = 1, only: tuple[str, ...] = (), use_cache: bool = True) -> dict:
    """Run (or resume) the matrix into `out_dir` and write results.json and results.csv."""
    if jobs < 1:
        raise FedleakError(f"--jobs {jobs}: give at least 1 (the number of trainings run at once)")
    planned = plan(config, only)
    with run_lock(Path(out_dir)):
        return _run_planned(config, planned, Path(out_dir), config_path=config_path, progress=progress, jobs=jobs,
                            only=only, use_cache=use_cache)


def _run_planned(config: RunConfig, planned: list[PlannedTraining], out_dir: Path, *, config_path: str | None,
                 progress: bool, jobs: int, only: tuple[str, ...], use_cache: bool) -> dict:
    started = dt.datetime.now(dt.timezone.utc)
    base_dir = Path(config_path).parent if config_path else Path(".")
    seeds = list(config.run_seeds)
    _, model_info = resolve_model(config)  # built once here, before any worker needs it
    base_utility = {s: _base_utility(seed_context(config, s, base_dir), out_dir, use_cache) for s in seeds}
    log.info("%d trainings, seeds %s, %d job(s); cache in %s", len(planned), seeds, jobs, out_dir / "trainings")
    records = _train_all(config, [p.unit for p in planned], out_dir, base_dir=base_dir, jobs=jobs,
                         progress=progress, use_cache=use_cache)
    trainings = [records[p.unit] for p in planned]
    cells = []
    for item in tqdm(planned, desc="attacks", unit="training", disable=not progress or not any(p.attacks for p in planned)):
        if not item.attacks:
            continue
        ctx = seed_context(config, item.unit.seed, base_dir)
        start = time.perf_counter()
        found, ran = attack_training(ctx, item.unit, records[item.unit], out_dir / records[item.unit]["checkpoint_dir"],
                                     item.attacks, progress=progress, use_cache=use_cache)
        cells += found
        log.info("attacks on %s seed %d: %d run, %d cached (%.1f s)", item.unit.label, item.unit.seed, ran,
                 len(item.attacks) - ran, time.perf_counter() - start)
    cells += poisoning_cells(trainings, config.matrix.scenarios)
    contexts = {s: seed_context(config, s, base_dir) for s in seeds}
    results = _results(config, config_path=config_path, only=only, jobs=jobs, started=started, model_info=model_info,
                       data={s: c.data for s, c in contexts.items()}, base_utility=base_utility,
                       trainings=trainings, cells=cells)
    write_results(out_dir, results)
    return results


def _results(config: RunConfig, *, config_path: str | None, only: tuple[str, ...], jobs: int, started: dt.datetime,
             model_info: dict, data: dict[int, FederatedData], base_utility: dict[int, dict], trainings: list[dict],
             cells: list[dict], **extra) -> dict:
    """The results file's record (eval/results.schema.json): provenance, then the run's records."""
    versions = library_versions()
    seeds = list(data)
    return {
        "schema": SCHEMA, "fedleak_version": versions["fedleak"], "versions": versions,
        "git_commit": git_commit(), "seed": seeds[0], "seeds": seeds, "config_path": config_path,
        "config": config.to_dict(), "only": list(only), "machine": machine_info(jobs=jobs), **extra,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info, "data": data[seeds[0]].summary(),
        "data_per_seed": {str(s): d.summary() for s, d in data.items()},
        "base_utility": base_utility[seeds[0]], "base_utility_per_seed": {str(s): u for s, u in base_utility.items()},
        "trainings": trainings, "cells": cells,
        "aggregates": aggregate_cells(cells), "training_aggregates": aggregate_trainings(trainings),
    }


def checkpoint_rounds(training_dir: Path) -> list[int]:
    """A training folder's complete rounds, or a one-line error saying what a training folder is."""
    rounds = checkpoint.rounds(training_dir) if Path(training_dir).is_dir() else []
    for r in rounds:
        checkpoint.read_manifest(checkpoint.round_dir(training_dir, r))  # its one-line errors, before any work
    if not rounds:
        raise FedleakError(f"{training_dir}: no round-XXXX/manifest.json in it: give a training folder "
                           f"(trainings/<name> of a run, or checkpoints in the layout of README 'Checkpoint format')")
    return rounds


def _external_history(training_dir: Path, rounds: list[int], num_clients: int) -> list[dict]:
    """Per-round participants from the manifests (every client when a manifest does not say)."""
    return [{"round": r, "clients": checkpoint.read_manifest(checkpoint.round_dir(training_dir, r)).get(
        "clients", list(range(num_clients))), "client_metrics": {}} for r in rounds if r > 0]


def attack_checkpoint(config: RunConfig, training_dir: Path, out_dir: Path, *, config_path: str | None = None,
                      algorithm: str | None = None, seed: int | None = None, only: tuple[str, ...] = (),
                      progress: bool = True, use_cache: bool = True) -> dict:
    """Run the config's privacy attacks on the checkpoints of one training: fedleak's own (its
    training.json names the algorithm, defense, scenario and seed) or another tool's written in the
    documented layout (round-XXXX/manifest.json + safetensors adapters; `algorithm` says whose
    global model it is, the config's data and federation say who trained on what)."""
    from fedleak.eval.config import component_spec

    started = dt.datetime.now(dt.timezone.utc)
    training_dir, out_dir = Path(training_dir), Path(out_dir)
    base_dir = Path(config_path).parent if config_path else Path(".")
    rounds = checkpoint_rounds(training_dir)
    trained = _read_json(training_dir / TRAINING_FILE)
    if trained:
        u = trained["unit"]
        scenario = None
        if u["scenario"]:
            scenario = next((s for s in config.matrix.scenarios if s.name == u["scenario"]["name"]), None)
            if scenario is None:
                raise FedleakError(f"{training_dir}: a training under poisoning scenario {u['scenario']['name']!r}, "
                                   f"which {config_path} does not declare: pass the config it was trained with")
        unit = TrainingUnit(component_spec(u["algorithm"], "algorithms"), component_spec(u["defense"], "defenses"),
                            scenario, u["seed"])
        ctx = seed_context(config, unit.seed, base_dir)
        if training_key(ctx, unit) != trained["key"]:
            raise FedleakError(f"{training_dir}/{TRAINING_FILE}: trained with other model, data, federation or "
                               f"fedleak code than {config_path} here: pass the config it was trained with (or "
                               f"retrain: `fedleak train`)")
        history, privacy, key = trained["rounds"], trained["privacy"], trained["key"]
    else:
        unit = TrainingUnit(component_spec({"name": algorithm or "fedit"}, "algorithms"), ComponentSpec("none"), None,
                            config.run_seeds[0] if seed is None else seed)
        ctx = seed_context(config, unit.seed, base_dir)
        history, privacy = _external_history(training_dir, rounds, config.federation.clients), None
        # The checkpoints and everything that says who trained on what (seed, data, algorithm).
        key = cache_key("external", [(checkpoint.round_dir(training_dir, r) / "manifest.json").read_text()
                                     for r in rounds], training_key(ctx, unit))
    one = dataclasses.replace(config, seed=unit.seed, seeds=(), matrix=dataclasses.replace(
        config.matrix, algorithms=(unit.algorithm,), defenses=(unit.defense,),
        scenarios=(unit.scenario,) if unit.scenario else ()))
    attacks = next((p.attacks for p in plan(one, only) if p.unit.scenario_name == unit.scenario_name), [])
    if not attacks:
        raise FedleakError(f"{config_path}: matrix.attacks run no privacy attack on {unit.label} (its rules, the "
                           f"attacks' scenarios or --only leave none): add one or change matrix.exclude")
    with run_lock(out_dir):
        base_model, tokenizer = load_base_model(ctx.model_ref, allow_download=config.model.allow_download)
        final_dir = checkpoint.round_dir(training_dir, rounds[-1])
        views = checkpoint.available_views(final_dir)
        algorithm_obj = instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs,
                                    f"--algorithm {unit.algorithm.label}")
        start = time.perf_counter()
        utility = _utility(add_lora(base_model, config.model.lora, seed=0), ctx.config, ctx.data, tokenizer,
                           final_dir, views if unit.scenario is None else ["global"])
        upload_per_round, upload_total = _upload_bytes(history)
        train_seconds = (trained or {}).get("train_seconds", 0.0)
        record = {
            **unit.key(), "algorithm_name": unit.algorithm.name, "algorithm_params": algorithm_obj.params(),
            "defense_name": unit.defense.name, "defense_params": (trained or {}).get("defense_params", {}),
            "checkpoint_dir": str(training_dir.resolve()), "training_key": key, "train_seconds": train_seconds,
            "utility_seconds": time.perf_counter() - start, "utility": utility, "poisoning": None, "views": views,
            "synthetic": (trained or {}).get("synthetic"), "privacy": privacy,
            "synthetic_examples": (trained or {}).get("synthetic_examples", []), "rounds": history,
            "cost": {"wall_seconds": train_seconds, "train_seconds": train_seconds,
                     "upload_bytes_per_client_per_round": upload_per_round, "upload_bytes_total": upload_total,
                     "torch_threads": (trained or {}).get("torch_threads", torch.get_num_threads())}}
        cells, _ = attack_training(ctx, unit, record, training_dir, attacks, algorithm=algorithm_obj,
                                   progress=progress, cache_dir=out_dir / ATTACKS_DIR, use_cache=use_cache)
        results = _results(config, config_path=config_path, only=only, jobs=1, started=started,
                           model_info=resolve_model(config)[1], data={unit.seed: ctx.data},
                           base_utility={unit.seed: _base_utility(ctx, out_dir, use_cache)}, trainings=[record],
                           cells=cells, checkpoint_dir=str(training_dir))
        write_results(out_dir, results)
        return results
