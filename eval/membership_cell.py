"""One membership cell: an attack's scores of a view's members and non-members (one call, so the attacks on a
view share their forward passes), its metrics with intervals, the blind baseline (the same attack on the base
model, adapters off) and the audits (empirical epsilon; the one-run audit of each canary design)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import numpy as np

from fedleak.attacks.base import MembershipAttack, Target
from fedleak.attacks.membership.stats import BASE, reference_cache
from fedleak.common.errors import FedleakError
from fedleak.eval.audit import empirical_epsilon, one_run_by_design
from fedleak.eval.config import AttackSettings
from fedleak.eval.metrics import UndefinedMetricWarning, membership_metrics, roc_points
from fedleak.federated.canary_designs import RANDOM, design_of
from fedleak.federated.data import Canary, Record
from fedleak.federated.seeding import derive_seed


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
