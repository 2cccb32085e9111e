"""Membership-inference metrics as pure functions of (y_true, y_score).

Higher `y_score` means "member" (label 1), as in scikit-learn, so no sign flips anywhere. With only
one class present, or a score that is NaN or infinite (a model whose training diverged), the metrics
are undefined: an UndefinedMetricWarning and NaN, not a crash after hours of training.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve


class UndefinedMetricWarning(UserWarning):
    pass


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray] | None:
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=float)
    if y_true.shape != y_score.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must be 1-D and the same length")
    bad = int((~np.isfinite(y_score)).sum())
    if bad:
        warnings.warn(f"{bad} of {len(y_score)} scores are NaN or infinite: ROC metrics are undefined, returning NaN",
                      UndefinedMetricWarning, stacklevel=3)
        return None
    if len(np.unique(y_true)) < 2:
        warnings.warn("only one class in y_true: ROC metrics are undefined, returning NaN",
                      UndefinedMetricWarning, stacklevel=3)
        return None
    return y_true, y_score


def _split_by_class(y_true, y_score) -> tuple[np.ndarray, np.ndarray] | None:
    """(member scores, non-member scores), or None (after a warning) with one class.

    The member label is the greater of the two, as roc_auc_score takes it for {0, 1} or bools.
    """
    checked = _check(y_true, y_score)
    if checked is None:
        return None
    y_true, y_score = checked
    classes = np.unique(y_true)
    if len(classes) != 2:
        raise ValueError(f"y_true has {len(classes)} classes {classes[:5]}: pass binary labels (1 = member)")
    is_member = y_true == classes[1]
    return y_score[is_member], y_score[~is_member]


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must be in (0, 1), e.g. 0.95")


def roc_auc(y_true, y_score) -> float:
    checked = _check(y_true, y_score)
    return float("nan") if checked is None else float(roc_auc_score(*checked))


def roc_points(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every threshold, for log-log ROC plots."""
    checked = _check(y_true, y_score)
    if checked is None:
        return np.array([np.nan]), np.array([np.nan])
    fpr, tpr, _ = roc_curve(*checked, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(y_true, y_score, *, fpr: float) -> float:
    """The highest TPR among thresholds whose FPR is at most `fpr` (Carlini et al. 2022's low-FPR view).

    With n0 non-members the FPRs reachable are multiples of 1/n0, so a budget 0 < fpr < 1/n0 reads the
    TPR at FPR 0; `membership_metrics` reports such a budget as unresolvable (NaN) instead.
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr = {fpr}: must be in [0, 1]")
    checked = _check(y_true, y_score)
    if checked is None:
        return float("nan")
    fprs, tprs, _ = roc_curve(*checked, drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def _rank_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """ROC AUC of each row: pos (B, n1) member scores against neg (B, n0) non-member scores.

    Hand-written because roc_auc_score takes one sample at a time; the Mann-Whitney form
    AUC = (sum of member ranks - n1(n1+1)/2) / (n1 n0), with tied scores given their average rank,
    equals roc_auc_score and ranks every row in a single rankdata call.
    """
    n1, n0 = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # method="average" handles ties
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auc_confidence_interval(y_true, y_score, *, n_bootstrap: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC.

    Members and non-members are resampled separately (stratified), so every resample has both
    classes and the class sizes stay fixed, as they are by design in a membership experiment.
    """
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap = {n_bootstrap!r}: must be a positive integer, e.g. 1000")
    _check_confidence(confidence)
    split = _split_by_class(y_true, y_score)
    if split is None:
        return float("nan"), float("nan")
    pos, neg = split
    rng = np.random.default_rng(seed)
    # Blocks of resamples keep the (B, n1 + n0) rank matrix near 32 MB however large the sample.
    block = max(1, 4_000_000 // (len(pos) + len(neg)))
    aucs = []
    for start in range(0, n_bootstrap, block):
        b = min(block, n_bootstrap - start)
        aucs.append(_rank_auc(pos[rng.integers(0, len(pos), size=(b, len(pos)))],
                              neg[rng.integers(0, len(neg), size=(b, len(neg)))]))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(aucs), [tail, 1 - tail])
    return float(low), float(high)


def balanced_accuracy_best(y_true, y_score) -> float:
    """The best balanced accuracy (TPR + 1 - FPR) / 2 over all thresholds of the ROC."""
    checked = _check(y_true, y_score)
    if checked is None:
        return float("nan")
    fpr, tpr, _ = roc_curve(*checked, drop_intermediate=False)
    return float(((tpr + 1 - fpr) / 2).max())


def min_resolvable_fpr(n_nonmembers: int) -> float:
    """The smallest non-zero FPR that n0 non-members can measure: 1/n0 (NaN without non-members)."""
    return 1.0 / n_nonmembers if n_nonmembers > 0 else float("nan")


def resolvable(fpr: float, n_nonmembers: int) -> bool:
    """Whether n0 non-members can measure an FPR budget: 0 (no false positive) or at least 1/n0."""
    # A relative slack so that 0.01 with 100 non-members (0.01 * 100 = 1.0000000000000002) counts.
    return fpr == 0 or fpr * n_nonmembers >= 1 - 1e-9


def membership_metrics(y_true, y_score, *, fprs: tuple[float, ...] = (0.01, 0.001), n_bootstrap: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """AUC with its bootstrap interval, TPR at each FPR in `fprs`, best balanced accuracy.

    Args:
        y_true: shape (N,), 1 = member, 0 = non-member.
        y_score: shape (N,), higher = member.

    Returns:
        `auc`, `auc_low`, `auc_high` (n_bootstrap=0 skips the interval: NaN), `tpr@{f:g}fpr` for each f
        in `fprs` (NaN when f is below `min_resolvable_fpr` = 1/n0: n0 non-members cannot measure it),
        `min_resolvable_fpr` and `tpr_at_min_fpr` (the TPR read at FPR = 1/n0), `balanced_accuracy`.
        Every value is NaN, with an UndefinedMetricWarning, for one class or non-finite scores.

    Raises:
        ValueError: shapes differ, more than two classes, bad n_bootstrap or confidence.
    """
    metrics = {"auc": roc_auc(y_true, y_score)}
    if n_bootstrap == 0:
        _check_confidence(confidence)
        metrics["auc_low"] = metrics["auc_high"] = float("nan")
    else:
        metrics["auc_low"], metrics["auc_high"] = auc_confidence_interval(
            y_true, y_score, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    n0 = int((np.asarray(y_true) == np.min(y_true)).sum()) if len(np.unique(y_true)) == 2 else 0
    for f in fprs:
        metrics[f"tpr@{f:g}fpr"] = tpr_at_fpr(y_true, y_score, fpr=f) if resolvable(f, n0) else float("nan")
    metrics["min_resolvable_fpr"] = min_resolvable_fpr(n0)
    metrics["tpr_at_min_fpr"] = tpr_at_fpr(y_true, y_score, fpr=metrics["min_resolvable_fpr"]) if n0 else float("nan")
    metrics["balanced_accuracy"] = balanced_accuracy_best(y_true, y_score)
    return metrics
