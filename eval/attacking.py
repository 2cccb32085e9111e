"""The privacy attacks on one training's checkpoints: each requested observer's view of each requested
round is loaded once and every attack wanting it runs back to back on it (so the logit-based
membership scores share their forward passes, `attacks/membership/stats.py`), scored against what
that view trained on; each attack's cells are cached in its own file under the attack's key."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedleak.attacks.base import ATTACKS, ExtractionResult, MembershipAttack, Secrets, Target
from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_json
from fedleak.common.params import instantiate
from fedleak.eval.audit import empirical_epsilon, one_run_epsilon
from fedleak.eval.cache import ATTACKS_DIR, cache_key, read_json
from fedleak.eval.config import AttackSettings, ComponentSpec, plain
from fedleak.eval.context import SeedContext
from fedleak.eval.metrics import membership_metrics, roc_points
from fedleak.eval.plan import TrainingUnit
from fedleak.federated import checkpoint
from fedleak.federated.adapters import add_lora
from fedleak.federated.data import Canary, FederatedData, Record
from fedleak.federated.model import load_base_model
from fedleak.federated.rounds import ALGORITHMS
from fedleak.federated.seeding import derive_seed, numpy_rng


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


def _cache_name(spec: ComponentSpec) -> str:
    """An attack's cache file: the label and its observers (one attack may be listed twice, for
    disjoint observers)."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", f"{spec.label}-{'+'.join(spec.observers)}") + ".json"


def attack_key(training_key: str, spec: ComponentSpec, observers: tuple[str, ...], settings: AttackSettings) -> str:
    """The key of one attack's cells on one training."""
    return cache_key("attack", training_key, plain(spec), sorted(observers), plain(settings))


def cached_cells(cache_dir: Path, spec: ComponentSpec, key: str) -> list[dict] | None:
    """An attack's cells cached in `cache_dir` under `key`, or None."""
    cached = read_json(cache_dir / _cache_name(spec))
    return cached["cells"] if cached and cached.get("key") == key else None


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
        cells = cached_cells(cache_dir, spec, key) if use_cache else None
        if cells is not None:
            results[_cache_name(spec)] = cells
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
            checkpoint.apply_saved_view(model, folder, observer, client, cfg.model.lora)
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
                    found = attack.run(target, truth.secrets)
                    if not isinstance(found, ExtractionResult):
                        raise FedleakError(f"attack {spec.name}: run() returned {type(found).__name__}, not an "
                                           f"ExtractionResult (fedleak.attacks.base): fix the plug-in")
                    cell.update(found.to_dict())
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
