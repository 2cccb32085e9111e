"""Run the attack matrix: train each defense once, probe the final round with each attack."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedleak.attacks.base import ATTACKS, MembershipAttack, Target
from fedleak.defenses.base import DEFENSES
from fedleak.eval.config import RunConfig, instantiate
from fedleak.eval.metrics import membership_metrics, roc_points
from fedleak.eval.results import SCHEMA, git_commit, library_versions, write_results
from fedleak.federated import checkpoint
from fedleak.federated.adapters import set_adapter_state
from fedleak.federated.data import FederatedData, Record
from fedleak.federated.datasource import prepare_data
from fedleak.federated.fedit import run_fedit
from fedleak.federated.model import build_embedded, load_base_model
from fedleak.federated.seeding import numpy_rng
from fedleak.federated.training import encode, mean_loss

ALGORITHM = "fedit"


def resolve_model(config: RunConfig) -> tuple[str, dict]:
    """The base model's folder or id, and facts about it for the results file."""
    if config.model.name != "embedded":
        return config.model.name, {"name": config.model.name}
    path = build_embedded(config.model.embedded)
    build = json.loads((path / "fedleak_build.json").read_text())
    return str(path), {"name": "embedded", "path": str(path), "parameters": build["parameters"],
                       "vocab": build["vocab"], "build_seconds": round(build["build_seconds"], 1),
                       "pretrain_final_loss": build["pretrain_final_loss"]}


def membership_split(data: FederatedData, clients: set[int], *, seed: int) -> tuple[list[Record], list[Record]]:
    """Equal numbers of members (records that the given clients trained on) and held-out non-members."""
    members = data.members_of(clients)
    n = min(len(members), len(data.heldout))
    rng = numpy_rng(seed, "membership-split")
    pick = lambda records: [records[int(i)] for i in sorted(rng.choice(len(records), size=n, replace=False))]
    return pick(members), pick(data.heldout)


def run_membership(attack: MembershipAttack, target: Target, members, nonmembers) -> dict:
    start = time.perf_counter()
    scores = np.concatenate([attack.score(target, members), attack.score(target, nonmembers)])
    y_true = np.concatenate([np.ones(len(members), dtype=int), np.zeros(len(nonmembers), dtype=int)])
    fpr, tpr = roc_points(y_true, scores)
    return {"metrics": membership_metrics(y_true, scores), "n_members": len(members),
            "n_nonmembers": len(nonmembers), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "attack_seconds": time.perf_counter() - start}


def run_matrix(config: RunConfig, out_dir: Path, *, config_path: str | None = None, progress: bool = True) -> dict:
    started = dt.datetime.now(dt.timezone.utc)
    out_dir = Path(out_dir)
    base_dir = Path(config_path).parent if config_path else Path(".")
    fed, seed = config.federation, config.seed
    data = prepare_data(config.data, seed=seed, num_clients=fed.clients, partition_method=fed.partition,
                        alpha=fed.alpha, min_records=fed.min_records_per_client, base_dir=base_dir)
    model_ref, model_info = resolve_model(config)
    training_hash = config.hash("seed", "model", "data", "federation")
    trainings, cells = [], []
    defenses = tqdm(config.matrix.defenses, desc="defenses", unit="training", disable=not progress)
    for spec in defenses:
        defense = instantiate(DEFENSES.get(spec.name), spec.kwargs, f"matrix.defenses: {spec.label}")
        base_model, tokenizer = load_base_model(model_ref, allow_download=config.model.allow_download)
        training_dir = out_dir / "trainings" / f"{ALGORITHM}-{spec.label}-seed{seed}"
        run = run_fedit(base_model=base_model, tokenizer=tokenizer, data=data, federation=fed,
                        lora=config.model.lora, hooks=defense, seed=seed, out_dir=training_dir,
                        config_hash=training_hash, progress=progress, label=spec.label)
        # Attacks read the checkpoint, not the in-memory model: the path a third party would use.
        final_dir = checkpoint.round_dir(training_dir, run.final_round)
        set_adapter_state(run.model, checkpoint.load_view(final_dir, "global"))
        heldout_loss = mean_loss(run.model, encode(data.heldout, tokenizer, max_length=fed.max_length,
                                                   response_only=fed.response_only_loss),
                                 batch_size=32, pad_id=tokenizer.pad_token_id)
        key = {"algorithm": ALGORITHM, "defense": spec.label, "seed": seed}
        trainings.append({
            **key, "defense_name": spec.name, "defense_params": spec.kwargs,
            "checkpoint_dir": str(training_dir.relative_to(out_dir)), "train_seconds": run.train_seconds,
            "utility": {"heldout_loss": heldout_loss, "heldout_perplexity": math.exp(heldout_loss)},
            "rounds": [{k: v for k, v in r.items() if k != "client_metrics"} for r in run.history],
        })
        trained = {c for r in run.history for c in r["clients"]}  # with client_fraction < 1 some may never train
        members, nonmembers = membership_split(data, trained, seed=seed)
        target = Target(model=run.model, tokenizer=tokenizer, observer="global", round=run.final_round,
                        max_length=fed.max_length, response_only=fed.response_only_loss)
        for attack_spec in config.matrix.attacks:
            attack = instantiate(ATTACKS.get(attack_spec.name), attack_spec.kwargs,
                                 f"matrix.attacks: {attack_spec.label}")
            outcome = run_membership(attack, target, members, nonmembers)
            cells.append({
                **key, "attack": attack_spec.label, "attack_name": attack_spec.name,
                "attack_params": attack_spec.kwargs, "family": attack.family, "observer": target.observer,
                "client": target.client, "round": target.round, "metrics": outcome["metrics"],
                "n_members": outcome["n_members"], "n_nonmembers": outcome["n_nonmembers"],
                "roc": outcome["roc"],
                "timings": {"attack_seconds": outcome["attack_seconds"], "train_seconds": run.train_seconds},
            })
        del run, base_model
    versions = library_versions()
    results = {
        "schema": SCHEMA, "fedleak_version": versions["fedleak"], "versions": versions,
        "git_commit": git_commit(), "seed": seed, "config_path": config_path, "config": config.to_dict(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info, "data": data.summary(), "trainings": trainings, "cells": cells,
    }
    write_results(out_dir, results)
    return results
