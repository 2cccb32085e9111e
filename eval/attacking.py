"""The privacy attacks on one training's checkpoints: each requested observer's view of each requested
round is loaded once and every attack wanting it runs back to back on it (so the logit-based
membership scores share their forward passes, `attacks/membership/stats.py`), scored against what
that view trained on; each attack's cells are cached in its own file under the attack's key.

Membership cells score category-matched members and held-out non-members of the view's clients (the
same records for every view of the same clients) and carry a blind baseline: the same attack on the
base model, adapters off, at chance when the two sides come from one distribution. A numeric failure
of one cell (NaN scores of a diverged model) is recorded in that cell; the run goes on.

Views that load the same adapter files (FEDIT's `upload/i` and `client/i`: one file) share one
statistics cache (`adapter_identity`), so each distinct model is scored once per record set; their
non-member draw is the same already (it depends on the client set only)."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from fedleak.attacks.base import ATTACKS, ExtractionResult, MembershipAttack, Secrets, Target
from fedleak.attacks.updates import ServerRecord
from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_json
from fedleak.common.params import instantiate
from fedleak.eval.cache import (ATTACKS_DIR, cache_key, code_fingerprint, data_fingerprint, model_fingerprint,
                                read_json)
from fedleak.eval.config import AttackSettings, ComponentSpec, plain
from fedleak.eval.context import SeedContext
from fedleak.eval.membership_cell import run_membership
from fedleak.eval.membership_split import membership_split
from fedleak.eval.plan import TrainingUnit
from fedleak.federated import checkpoint
from fedleak.federated.adapters import add_peft_adapter
from fedleak.federated.data import Canary, FederatedData, Record
from fedleak.federated.model import shared_base_model
from fedleak.federated.rounds import ALGORITHMS
from fedleak.federated.seeding import derive_seed

log = logging.getLogger(__name__)


# Numeric failures of one cell (a diverged model, a degenerate statistic) are recorded in the cell; a
# FedleakError (configuration, plug-in contract) and programming errors still stop the run.
CELL_FAILURES = (ValueError, ArithmeticError, RuntimeError)
_NON_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)


def _is_cell_failure(exc: BaseException) -> bool:
    """Floating-point overflow counts as a numeric failure of the cell; a ValueError, another
    ArithmeticError or torch's RuntimeError only when it names NaN or inf (sklearn on NaN scores,
    sampling from a NaN distribution), since the same types report unpacking, broadcasting and shape
    bugs and out-of-memory, which must stop the run."""
    if isinstance(exc, (FedleakError, NotImplementedError, RecursionError)):
        return False
    if isinstance(exc, (FloatingPointError, OverflowError)):
        return True
    return bool(_NON_FINITE.search(str(exc)))


MEMBERSHIP_METRICS = ("auc", "auc_low", "auc_high", "blind_auc", "blind_auc_low", "blind_auc_high", "epsilon_lb")


def _failed_cell(exc: BaseException, *, membership: bool) -> dict:
    """The fields of a cell whose attack failed numerically: NaN metrics (written as null) and the error."""
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    if membership:
        return {"metrics": dict.fromkeys(MEMBERSHIP_METRICS, float("nan")), "n_members": 0, "n_nonmembers": 0,
                "error": error}
    return {"metrics": {}, "details": {"note": error}, "error": error}


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
    clients: tuple[int, ...]  # whose records: the membership split depends on these, not on the view


def _view_truth(algorithm, history: list[dict], data: FederatedData, observer: str, client: int | None,
                rnd: int) -> _ViewTruth:
    if observer == "global":
        # Round 0 is the initial adapter: scored against the final members, it is the pre-training baseline.
        upto = history if rnd == 0 else [entry for entry in history if entry["round"] <= rnd]
        # Whose uploads entered the global adapter (older histories and other tools' record the sampled clients).
        contributors = {c for entry in upto for c in entry.get("aggregated", entry["clients"])}
        clients = algorithm.global_clients(data, contributors)
        others = data.heldout
    else:
        clients = {client}
        others = data.members_of(set(range(len(data.clients))) - clients) or data.heldout
    members = data.members_of(clients)
    secrets = Secrets(records=members, canaries=[c for c in data.canaries if c.client in clients],
                      reference_canaries=list(data.reference_canaries), other_records=list(others),
                      nonmembers=list(data.heldout), clients={c: data.members_of({c}) for c in sorted(clients)})
    return _ViewTruth(members, secrets, [c for c in data.audit_canaries if c.client in clients],
                      tuple(sorted(clients)))


def _membership_cell(ctx: SeedContext, attack: MembershipAttack, target: Target, truth: _ViewTruth, *,
                     spec: ComponentSpec, unit: TrainingUnit, rnd: int, delta: float, tokenizer,
                     rewrite: Callable[[list[Record]], list[Record]] | None = None) -> dict:
    """One membership cell's fields: category-matched members and non-members of the view's clients
    (the same for every view of those clients, and so is the bootstrap's seed), the metrics with their
    blind baseline, the audit; `rewrite`: the training's sanitising defense, applied to what is scored."""
    cfg = ctx.config
    scorable_members = ctx.scorable(truth.members, tokenizer)
    split = membership_split(scorable_members, ctx.scorable(ctx.data.heldout, tokenizer), seed=cfg.seed,
                             clients=truth.clients)
    if not split.members:  # no category of the view's records has a held-out record: nothing to compare
        error = ("no category-matched pairs: no held-out record shares a category with the view's "
                 f"{len(scorable_members)} scorable members (raise data.file.heldout_fraction or check the categories)")
        return {**_failed_cell(ValueError(error), membership=True), "error": error, **split.record(),
                "unscorable_members": len(truth.members) - len(scorable_members)}
    outcome = run_membership(attack, target, split.members, split.nonmembers, settings=cfg.attack, delta=delta,
                             seed=derive_seed(cfg.seed, unit.label, "clients", *truth.clients, rnd, spec.label),
                             audit=truth.audit, audit_designs=cfg.data.embedded.audit_canary_designs,
                             rewrite=rewrite)
    if outcome.get("error"):
        log.warning("attack %s on %s/%s round %d of %s: %s", spec.label, target.observer, target.client, rnd,
                    unit.label, outcome["error"])
    return {**{k: outcome[k] for k in ("metrics", "n_members", "n_nonmembers", "roc", "audit", "blind_note")
               if k in outcome},
            **({"error": outcome["error"]} if "error" in outcome else {}), **split.record(),
            "unscorable_members": len(truth.members) - len(scorable_members)}


def _extraction_cell(attack, spec: ComponentSpec, target: Target, truth: _ViewTruth) -> dict:
    found = attack.run(target, truth.secrets)
    if not isinstance(found, ExtractionResult):
        raise FedleakError(f"attack {spec.name}: run() returned {type(found).__name__}, not an "
                           f"ExtractionResult (fedleak.attacks.base): fix the plug-in")
    return found.to_dict()


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


def adapter_identity(folder: Path, view: str) -> tuple[tuple[str, str], ...]:
    """What a view's model is: its (peft adapter name, file sha256) pairs from the round's manifest.
    Views with equal identities load the same tensors into the same base model (FEDIT's `upload/i` and
    `client/i` are one file), so they share one statistics cache: each distinct model file is scored
    once per record set."""
    manifest = checkpoint.read_manifest(folder)
    files = manifest["views"][view]
    return tuple(sorted((name, manifest["files"][stem]["sha256"]) for name, stem in files.items()))


def _hides_uploads(unit: TrainingUnit) -> bool:
    from fedleak.defenses.base import DEFENSES

    return any(getattr(DEFENSES.get(p.name), "hides_uploads", False) for p in (unit.defense.parts or (unit.defense,)))


def _record_rewrite(unit: TrainingUnit) -> Callable[[list[Record]], list[Record]] | None:
    """The training's sanitising defense as the attacker applies it to candidates; None when none rewrites records."""
    from fedleak.defenses.base import Defense
    from fedleak.eval.matrix_config import build_defense

    defense = build_defense(unit.defense, f"matrix.defenses: {unit.defense.label}")
    parts = getattr(defense, "parts", [defense])
    if all(type(p).client_records is Defense.client_records for p in parts):
        return None
    return lambda records: defense.client_records(list(records), client=-1)[0]


def attack_training(ctx: SeedContext, unit: TrainingUnit, record: dict, training_dir: Path,
                    attacks: list[tuple[ComponentSpec, tuple[str, ...]]], *, algorithm=None, progress: bool = False,
                    use_cache: bool = True, cache_dir: Path | None = None,
                    shadow_dir: Path | None = None) -> tuple[list[dict], int]:
    """Every planned attack's cells on one training (cached ones read back, in `cache_dir`, by default
    the training's attacks/ folder); returns the cells in attack order and how many attacks ran.
    `shadow_dir` keeps run-wide attack results on disk (LiRA's shadows), for every process and node."""
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
        base_model, tokenizer = shared_base_model(ctx.model_ref, **cfg.model.load_options())
        model = add_peft_adapter(base_model, cfg.model.adapter, seed=0)  # every view loads its own weights
        env = ctx.environment(tokenizer)
        env.progress = progress
        if shadow_dir is not None and use_cache:
            env.cache_dir = Path(shadow_dir)
            env.cache_salt = cache_key(code_fingerprint(cfg.plugins), model_fingerprint(cfg), data_fingerprint(ctx))
        rewrite = _record_rewrite(unit)
        if rewrite is not None:  # the adaptive attacker's pool (LiRA's, RMIA's shadows) is scrubbed like its candidates
            env = dataclasses.replace(env, population=rewrite(env.population))
        privacy = record["privacy"] or {}
        # The empirical epsilon is a bound at the accountant's delta when there is one.
        delta = privacy.get("record_level_delta", privacy.get("user_level_delta", cfg.attack.delta))
        fresh: dict[str, list[dict]] = {_cache_name(spec): [] for spec, *_ in todo}
        probes = [(r, v) for r in sorted({r for spec, *_ in todo for r in _rounds_of(spec, final_round)} & set(present))
                 for v in checkpoint.available_views(checkpoint.round_dir(training_dir, r))]
        def wanted_on(rnd: int, view: str):
            observer = checkpoint.parse_view_key(view)[0]
            return [(spec, attack) for spec, observers, _, attack in todo
                    if observer in observers and rnd in _rounds_of(spec, final_round)]

        # Each round's global view first: an attack may carry what it found there to the round's other views
        # (`attacks/extraction/gcg.py`'s suffix).
        probes = sorted(((rnd, view) for rnd, view in probes if wanted_on(rnd, view)),
                        key=lambda probe: (probe[0], probe[1] != "global"))
        # Views loading the same adapter files share one statistics cache, kept until the last of them.
        identities = [adapter_identity(checkpoint.round_dir(training_dir, rnd), view) for rnd, view in probes]
        server = ServerRecord(training_dir, cfg.model.adapter, hides_uploads=_hides_uploads(unit))
        uses = Counter(identities)
        caches: dict[tuple, dict] = {}
        for (rnd, view), identity in tqdm(list(zip(probes, identities)), desc=f"{unit.label} attacks", unit="view",
                                          disable=not progress, leave=False):
            folder = checkpoint.round_dir(training_dir, rnd)
            observer, client = checkpoint.parse_view_key(view)
            wanted = wanted_on(rnd, view)
            checkpoint.apply_saved_view(model, folder, observer, client, cfg.model.adapter)
            truth = _view_truth(algorithm, history, data, observer, client, rnd)
            target = Target(model=model, tokenizer=tokenizer, observer=observer, client=client, round=rnd,
                            max_length=fed.max_length, response_only=fed.response_only_loss, env=env,
                            cache=caches.setdefault(identity, {}), server=server)
            uses[identity] -= 1
            if not uses[identity]:
                del caches[identity]  # the dict lives on in `target` until this view is done
            for spec, attack in wanted:
                cell = {**unit.key(), "attack": spec.label, "attack_name": spec.name, "attack_params": attack.params(),
                        "family": attack.family, "access": attack.access, "observer": observer, "client": client, "round": rnd}
                membership = isinstance(attack, MembershipAttack)
                if membership and not truth.members:
                    continue
                start = time.perf_counter()
                try:
                    cell.update(_membership_cell(ctx, attack, target, truth, spec=spec, unit=unit, rnd=rnd,
                                                 delta=delta, tokenizer=tokenizer, rewrite=rewrite) if membership
                                else _extraction_cell(attack, spec, target, truth))
                except CELL_FAILURES as exc:
                    if not _is_cell_failure(exc):
                        raise
                    cell.update(_failed_cell(exc, membership=membership))
                    log.warning("attack %s on %s round %d of %s failed, recorded in its cell: %s", spec.label, view,
                                rnd, unit.label, cell["error"])
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
