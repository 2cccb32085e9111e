"""Run the attack matrix: train each (algorithm, defense, scenario) once, then evaluate utility, run
each privacy attack on every requested observer's view of every requested round (final by default),
and measure each poisoning scenario against the clean training of the same (algorithm, defense).

The attacks on one view run back to back on one loaded view, so the logit-based membership
scores share their forward passes (`attacks/membership/stats.py`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedleak.attacks.base import ATTACKS, AttackEnvironment, MembershipAttack, Secrets, Target
from fedleak.attacks.membership.stats import scorable
from fedleak.eval.audit import empirical_epsilon, one_run_epsilon
from fedleak.eval.config import (CLEAN, AttackSettings, ComponentSpec, RunConfig, ScenarioSpec, build_defense,
                                 instantiate)
from fedleak.eval.metrics import membership_metrics, roc_points
from fedleak.eval.poisoning import (backdoors_of, build_adversary, detection, poisoning_cells, scenario_record,
                                    trigger_rates)
from fedleak.eval.results import SCHEMA, git_commit, library_versions, write_results
from fedleak.eval.utility import evaluate_utility
from fedleak.federated import checkpoint
from fedleak.federated.adapters import apply_view
from fedleak.federated.data import Canary, FederatedData, Record
from fedleak.federated.datasource import prepare_data
from fedleak.federated.model import build_embedded, load_base_model
from fedleak.federated.rounds import ALGORITHMS, TrainingRun, TrainingSetup, run_rounds
from fedleak.federated.seeding import derive_seed, numpy_rng

NO_DEFENSE = ComponentSpec("none")
SYNTHETIC_EXAMPLES = 3  # synthetic records per training quoted in the results (and report)


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


def trainings_of(config: RunConfig) -> list[tuple[ComponentSpec, ComponentSpec, ScenarioSpec | None]]:
    """(algorithm, defense, scenario) triples, None being the clean scenario: defenses and malicious
    clients hook into a federation, so non-federated baselines (CENIT, LOCIT) train once, clean and
    without a defense; `matrix.exclude` rules drop triples."""
    triples = []
    scenarios = [None, *config.matrix.scenarios]
    for algorithm in config.matrix.algorithms:
        if ALGORITHMS.get(algorithm.name).federated:
            triples += [(algorithm, defense, scenario) for scenario in scenarios for defense in config.matrix.defenses]
        else:
            triples.append((algorithm, NO_DEFENSE, None))
    return [(a, d, s) for a, d, s in triples
            if not any(rule.matches(a, d, s.name if s else CLEAN) for rule in config.matrix.exclude)]


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


def _view_truth(algorithm, run: TrainingRun, data: FederatedData, observer: str, client: int | None,
                rnd: int) -> _ViewTruth:
    if observer == "global":
        # Round 0 is the initial adapter: scored against the final members, it is the pre-training baseline.
        upto = run.history if rnd == 0 else run.history[:rnd]
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


def _utility(run: TrainingRun, config: RunConfig, data: FederatedData, tokenizer, final_dir: Path,
             view_keys: list[str]) -> dict:
    records = data.heldout[: config.utility.records]
    out: dict = {"records": len(records), "clients": {}}
    for key in view_keys:
        observer, client = checkpoint.parse_view_key(key)
        if observer == "upload":
            continue
        apply_view(run.model, checkpoint.load_view(final_dir, observer, client), config.model.lora)
        scores = evaluate_utility(run.model, tokenizer, records, max_length=config.federation.max_length,
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


def run_matrix(config: RunConfig, out_dir: Path, *, config_path: str | None = None, progress: bool = True) -> dict:
    started = dt.datetime.now(dt.timezone.utc)
    out_dir = Path(out_dir)
    base_dir = Path(config_path).parent if config_path else Path(".")
    fed, seed = config.federation, config.seed
    data = prepare_data(config.data, seed=seed, num_clients=fed.clients, partition_method=fed.partition,
                        alpha=fed.alpha, min_records=fed.min_records_per_client, base_dir=base_dir)
    model_ref, model_info = resolve_model(config)
    training_hash = config.hash("seed", "model", "data", "federation")
    base_model, tokenizer = load_base_model(model_ref, allow_download=config.model.allow_download)
    base_utility = evaluate_utility(base_model, tokenizer, data.heldout[: config.utility.records],
                                    max_length=fed.max_length, batch_size=config.utility.batch_size,
                                    max_new_tokens=config.utility.max_new_tokens)
    env = AttackEnvironment(
        tokenizer=tokenizer, seed=seed, max_length=fed.max_length, response_only=fed.response_only_loss,
        batch_size=config.attack.batch_size, base_model_ref=model_ref, lora=config.model.lora,
        allow_download=config.model.allow_download,
        # The attacker's pool: every candidate it scores (members, held-out records, audit canaries).
        population=data.members + data.heldout + [c.record(0) for c in data.audit_canaries],
        train=dataclasses.replace(fed.train_settings(), epochs=fed.rounds * fed.local_epochs))
    # Records with no scored token (a prompt filling max_length) have no loss: left out of every split.
    scorable_cache: dict[tuple, list[Record]] = {}

    def scorable_(records: list[Record]) -> list[Record]:
        key = tuple(r.record_id for r in records)
        if key not in scorable_cache:
            scorable_cache[key] = scorable(records, tokenizer, max_length=fed.max_length,
                                           response_only=fed.response_only_loss)
        return scorable_cache[key]

    backdoors = backdoors_of(config.matrix.scenarios)
    backdoor_records = data.heldout[: config.poisoning.prompts]
    trainings, cells = [], []
    for algorithm_spec, defense_spec, scenario in tqdm(trainings_of(config), desc="trainings", unit="training",
                                                       disable=not progress):
        algorithm = instantiate(ALGORITHMS.get(algorithm_spec.name), algorithm_spec.kwargs,
                                f"matrix.algorithms: {algorithm_spec.label}")
        defense = build_defense(defense_spec, f"matrix.defenses: {defense_spec.label}")
        scenario_name = scenario.name if scenario else CLEAN
        base_model, tokenizer = load_base_model(model_ref, allow_download=config.model.allow_download)
        stem = f"{algorithm_spec.label}-{defense_spec.label}" + (f"-{scenario.name}" if scenario else "")
        training_dir = out_dir / "trainings" / f"{stem}-seed{seed}"
        label = f"{algorithm_spec.label}/{defense_spec.label}" + (f"/{scenario.name}" if scenario else "")
        setup = TrainingSetup(base_model=base_model, tokenizer=tokenizer, data=data, federation=fed,
                              lora=config.model.lora, hooks=defense, seed=seed, out_dir=training_dir,
                              config_hash=training_hash, progress=progress, label=label)
        if scenario:
            setup.adversary = build_adversary(scenario, config)
        run = run_rounds(setup, algorithm)
        # Everything below reads the checkpoints, not the in-memory state: the path a third party uses.
        final_dir = checkpoint.round_dir(training_dir, run.final_round)
        view_keys = checkpoint.available_views(final_dir)
        key = {"algorithm": algorithm_spec.label, "defense": defense_spec.label, "scenario": scenario_name,
               "seed": seed}
        eval_start = time.perf_counter()
        # A poisoned training is judged by its global model (the clients' models are the clean run's business).
        utility = _utility(run, config, data, tokenizer, final_dir,
                           [k for k in view_keys if scenario is None or k == "global"])
        utility_seconds = time.perf_counter() - eval_start
        poisoning = None
        if ALGORITHMS.get(algorithm_spec.name).federated:
            start = time.perf_counter()
            poisoning = {**scenario_record(scenario, config), "backdoors": {}, "detection": detection(run.history)}
            # The clean training measures every backdoor of the matrix (how often the trigger gets the
            # target without poisoning); a poisoned training, its own.
            own = {k: b for k, b in backdoors.items() if scenario is None or k in {a.label for a in scenario.attacks}}
            if own:
                apply_view(run.model, checkpoint.load_view(final_dir, "global", None), config.model.lora)
            for name, backdoor in own.items():
                poisoning["backdoors"][name] = trigger_rates(run.model, tokenizer, backdoor, backdoor_records,
                                                             batch_size=config.poisoning.batch_size)
            poisoning["seconds"] = time.perf_counter() - start
        trainings.append({
            **key, "algorithm_name": algorithm_spec.name, "algorithm_params": algorithm.params(),
            "defense_name": defense_spec.name, "defense_params": defense.params(),
            "checkpoint_dir": str(training_dir.relative_to(out_dir)), "train_seconds": run.train_seconds,
            "utility_seconds": utility_seconds, "utility": utility, "poisoning": poisoning,
            "views": view_keys, "synthetic": _synthetic_summary(run.history),
            "privacy": _privacy(run.history),
            "synthetic_examples": _synthetic_examples(training_dir, run.final_round), "rounds": run.history,
        })
        attacks = [(spec, instantiate(ATTACKS.get(spec.name), spec.kwargs, f"matrix.attacks: {spec.label}"))
                   for spec in config.matrix.attacks if scenario_name in spec.scenarios
                   and not any(rule.skips(spec, algorithm_spec, defense_spec, scenario_name)
                               for rule in config.matrix.exclude)]
        privacy = trainings[-1]["privacy"] or {}
        # The empirical epsilon is a bound at the accountant's delta when there is one.
        delta = privacy.get("record_level_delta", privacy.get("user_level_delta", config.attack.delta))
        for rnd in sorted({r for spec, _ in attacks for r in _rounds_of(spec, run.final_round)}):
            folder = checkpoint.round_dir(training_dir, rnd)
            for view in checkpoint.available_views(folder):
                observer, client = checkpoint.parse_view_key(view)
                wanted = [(spec, attack) for spec, attack in attacks
                          if observer in spec.observers and rnd in _rounds_of(spec, run.final_round)]
                if not wanted:
                    continue
                apply_view(run.model, checkpoint.load_view(folder, observer, client), config.model.lora)
                truth = _view_truth(algorithm, run, data, observer, client, rnd)
                target = Target(model=run.model, tokenizer=tokenizer, observer=observer, client=client, round=rnd,
                                max_length=fed.max_length, response_only=fed.response_only_loss, env=env)
                for spec, attack in wanted:
                    cell = {**key, "attack": spec.label, "attack_name": spec.name, "attack_params": attack.params(),
                            "family": attack.family, "observer": observer, "client": client, "round": rnd}
                    start = time.perf_counter()
                    if isinstance(attack, MembershipAttack):
                        if not truth.members:
                            continue
                        members, nonmembers = membership_split(scorable_(truth.members), scorable_(data.heldout),
                                                               seed=seed, purpose=view)
                        outcome = run_membership(attack, target, members, nonmembers, settings=config.attack,
                                                 delta=delta, seed=derive_seed(seed, label, view, rnd, spec.label),
                                                 audit=truth.audit)
                        cell.update({k: outcome[k] for k in ("metrics", "n_members", "n_nonmembers", "roc", "audit")})
                        cell["unscorable_members"] = len(truth.members) - len(scorable_(truth.members))
                    else:
                        outcome = attack.run(target, truth.secrets)
                        cell.update({"metrics": outcome["metrics"], "details": outcome.get("details", {})})
                    cell["timings"] = {"attack_seconds": time.perf_counter() - start,
                                       "train_seconds": run.train_seconds}
                    cells.append(cell)
        del run, base_model
    cells += poisoning_cells(trainings, config.matrix.scenarios)
    versions = library_versions()
    results = {
        "schema": SCHEMA, "fedleak_version": versions["fedleak"], "versions": versions,
        "git_commit": git_commit(), "seed": seed, "config_path": config_path, "config": config.to_dict(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info, "data": data.summary(), "base_utility": base_utility, "trainings": trainings,
        "cells": cells,
    }
    write_results(out_dir, results)
    return results
