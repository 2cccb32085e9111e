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
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from fedleak.attacks.base import ATTACKS, ExtractionResult, MembershipAttack, Secrets, Target
from fedleak.attacks.membership.stats import BASE, reference_cache
from fedleak.attacks.updates import ServerRecord
from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_json
from fedleak.common.params import instantiate
from fedleak.eval.audit import empirical_epsilon, one_run_by_design
from fedleak.eval.cache import (ATTACKS_DIR, cache_key, code_fingerprint, data_fingerprint, model_fingerprint,
                                read_json)
from fedleak.eval.config import AttackSettings, ComponentSpec, plain
from fedleak.eval.context import SeedContext
from fedleak.eval.membership_split import CATEGORY_MATCHED, MembershipSplit, membership_split  # noqa: F401 (re-exported)
from fedleak.eval.metrics import UndefinedMetricWarning, membership_metrics, roc_points
from fedleak.eval.plan import TrainingUnit
from fedleak.federated import checkpoint
from fedleak.federated.adapters import add_peft_adapter
from fedleak.federated.canary_designs import RANDOM, design_of
from fedleak.federated.data import Canary, FederatedData, Record
from fedleak.federated.model import shared_base_model
from fedleak.federated.rounds import ALGORITHMS
from fedleak.federated.seeding import derive_seed

log = logging.getLogger(__name__)


def _balanced_candidates(members, nonmembers):
    return list(members) + list(nonmembers), np.r_[np.ones(len(members), int), np.zeros(len(nonmembers), int)]


def _checked_scores(attack: MembershipAttack, target: Target, records: list[Record]) -> np.ndarray:
    """`attack.score` held to its contract: one float per record (a plug-in's fault is a FedleakError)."""
    raw = attack.score(target, records)
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise FedleakError(f"attack {type(attack).__name__}: score() returned {type(raw).__name__} that is not an "
                           f"array of numbers: return one float per record (fedleak.attacks.base)") from None
    if scores.shape != (len(records),):
        raise FedleakError(f"attack {type(attack).__name__}: score() returned shape {scores.shape} for "
                           f"{len(records)} records: return one score per record (fedleak.attacks.base)")
    return scores


def blind_scores(attack: MembershipAttack, target: Target, records: list[Record]) -> np.ndarray:
    """The same attack on the view's base model (adapters switched off): a baseline that never looks at
    what the view trained on, so its AUC must sit at chance when members and non-members are alike.

    The base model is the same for every view of a run, so its statistics live in one run-wide cache,
    the `reference` attack's for the base model (`reference_cache`), keyed by the records: each record
    set passes through the base model once per run, whichever attack asks first.

    Returns:
        float64 array of shape (N,), in the order of `records`.

    Raises:
        FedleakError: the target's model is not a peft model whose adapters can be switched off.
    """
    if not hasattr(target.model, "disable_adapter"):
        raise FedleakError("the blind baseline needs a peft model whose adapters can be switched off "
                           "(disable_adapter): attack a peft-wrapped view")
    blind = dataclasses.replace(target, cache=reference_cache(target, BASE))
    with target.model.disable_adapter():
        return _checked_scores(attack, blind, records)


def _not_finite_note(scores: np.ndarray, what: str, *, update_round_0: bool = False) -> str | None:
    bad = int((~np.isfinite(scores)).sum())
    why = "round 0 is the initial adapter: there is no update to read" if update_round_0 else "a diverged model?"
    return f"{bad} of {len(scores)} {what} scores are NaN or infinite ({why}): metrics undefined" if bad else None


def run_membership(attack: MembershipAttack, target: Target, members, nonmembers, *, settings: AttackSettings,
                   delta: float, seed: int, audit: list[Canary] = (), audit_designs=(RANDOM,),
                   blind: bool = True, rewrite: Callable[[list[Record]], list[Record]] | None = None) -> dict:
    """Score members and non-members in one call (so the attacks on a view share one forward pass),
    then the metrics, the blind baseline, the empirical epsilon and, with audit canaries, the one-run
    audit (Steinke, Nasr and Jagielski 2023) of each canary design on its own.

    Args:
        members, nonmembers: the n1 and n0 records scored (label 1 and 0).
        seed: the bootstrap's; the view and its blind baseline resample the same records.
        audit_designs: the run's canary designs (`data.embedded.audit_canary_designs`), the first giving
            `one_run_epsilon_lb` and `audit.one_run`.
        blind: also score the base model (`blind_scores`); needs a peft target.
        rewrite: the records as the view's training data holds them (a sanitising defense's `client_records`):
            an attacker who knows the defense scores the candidates and the audit canaries rewritten the same way
            (the adaptive attack); None: as they are.

    Returns:
        {"metrics", "n_members", "n_nonmembers", "audit"}, "roc" where defined, and "error" when some scores are NaN or
        infinite: `membership_metrics`' keys, `blind_auc` with `blind_auc_low`/`_high`, `epsilon_lb`
        and `one_run_epsilon_lb`; NaN where undefined, never an exception for NaN scores. With designs
        beyond ["random"] also `audit.one_run_designs` ({design: bound and canary AUC}) and the metrics
        `one_run_epsilon_lb_<design>` and `canary_auc_<design>` (with `_low`/`_high`).

    Raises:
        FedleakError: the attack breaks its contract (not one score per record) or the blind baseline
            has no adapters to switch off.
    """
    records, y_true = _balanced_candidates(members, nonmembers)
    rewrite = rewrite or (lambda rs: rs)
    records = rewrite(records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # the cell's `error` says it once
        scores = _checked_scores(attack, target, records)
        metrics = membership_metrics(y_true, scores, n_bootstrap=settings.bootstrap, confidence=settings.confidence,
                                     seed=derive_seed(seed, "bootstrap"))
        notes = [_not_finite_note(scores, "member and non-member", update_round_0=attack.access == "updates"
                                  and target.round == 0)]
        blind_note = None
        if blind and attack.access == "updates":  # the base model has no update to read
            blind_note = ("no blind baseline: the attack reads the server's updates, which the base model does not "
                          "have; its members and non-members are the category-matched draw every attack scores")
        elif blind:
            base_scores = blind_scores(attack, target, records)
            base = membership_metrics(y_true, base_scores, n_bootstrap=settings.bootstrap,
                                      confidence=settings.confidence, seed=derive_seed(seed, "bootstrap"))
            metrics.update({f"blind_{k}": base[k] for k in ("auc", "auc_low", "auc_high")})
            notes.append(_not_finite_note(base_scores, "blind-baseline"))
        empirical = empirical_epsilon(y_true, scores, delta=delta, confidence=settings.confidence)
        metrics["epsilon_lb"] = empirical["epsilon_lb"]
        outcome = {"metrics": metrics, "n_members": len(members), "n_nonmembers": len(nonmembers),
                   "audit": {"empirical": empirical}, **({"blind_note": blind_note} if blind_note else {})}
        if audit:
            included = np.array([c.repetitions > 0 for c in audit])
            audit_scores = _checked_scores(attack, target, rewrite([c.record(0) for c in audit]))  # every design at once
            designed = list(audit_designs) != [RANDOM]  # today's run keeps today's fields alone
            by_design = one_run_by_design(included, audit_scores, [design_of(c) for c in audit], audit_designs,
                                          delta=delta, confidence=settings.confidence,
                                          n_bootstrap=settings.bootstrap if designed else 0,
                                          seed=derive_seed(seed, "canaries"))
            first = by_design.get(audit_designs[0])
            if first is not None:
                metrics["one_run_epsilon_lb"] = first["epsilon_lb"]
                outcome["audit"]["one_run"] = {k: v for k, v in first.items() if not k.startswith("auc")}
            if designed:
                outcome["audit"]["one_run_designs"] = by_design
                for design, bound in by_design.items():
                    metrics[f"one_run_epsilon_lb_{design}"] = bound["epsilon_lb"]
                    metrics.update({f"canary_auc_{design}{end}": bound[f"auc{end}"] for end in ("", "_low", "_high")})
        fpr, tpr = roc_points(y_true, scores)
    if np.isfinite(fpr).all():  # an undefined ROC (NaN scores, one class) has no curve to plot
        outcome["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if any(notes):
        outcome["error"] = "; ".join(n for n in notes if n)
    return outcome


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

        probes = [(rnd, view) for rnd, view in probes if wanted_on(rnd, view)]
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
