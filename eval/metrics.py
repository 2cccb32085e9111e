"""Membership-inference metrics as pure functions of (y_true, y_score).

Higher `y_score` means "member" (label 1), as in scikit-learn, so no sign flips anywhere. With only
one class present the metrics are undefined: a warning and NaN, not a crash.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


class UndefinedMetricWarning(UserWarning):
    pass


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray] | None:
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=float)
    if y_true.shape != y_score.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must be 1-D and the same length")
    if len(np.unique(y_true)) < 2:
        warnings.warn("only one class in y_true: ROC metrics are undefined, returning NaN",
                      UndefinedMetricWarning, stacklevel=3)
        return None
    return y_true, y_score


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
    """The highest TPR among thresholds whose FPR is at most `fpr` (Carlini et al. 2022's low-FPR view)."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr = {fpr}: must be in [0, 1]")
    checked = _check(y_true, y_score)
    if checked is None:
        return float("nan")
    fprs, tprs, _ = roc_curve(*checked, drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def membership_metrics(y_true, y_score, *, fprs: tuple[float, ...] = (0.01, 0.001)) -> dict[str, float]:
    metrics = {"auc": roc_auc(y_true, y_score)}
    for f in fprs:
        metrics[f"tpr@{f:g}fpr"] = tpr_at_fpr(y_true, y_score, fpr=f)
    return metrics
