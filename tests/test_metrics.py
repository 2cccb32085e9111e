import math
import time

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedleak.eval.metrics import (UndefinedMetricWarning, _rank_auc, auc_confidence_interval,
                                  balanced_accuracy_best, membership_metrics, roc_auc, roc_points,
                                  tpr_at_fpr)


def _shifted_normal(n_per_class, *, shift=0.5, seed=1):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_per_class, int), np.zeros(n_per_class, int)]
    return y, rng.normal(size=2 * n_per_class) + shift * y


def test_auc_on_known_scores():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    # pairs (member, non-member): (3,1) (3,2) (3,4)x (5,*) -> 5 of 6 ordered correctly
    assert roc_auc([1, 1, 0, 0, 0], [3, 5, 1, 2, 4]) == pytest.approx(5 / 6)


def test_tpr_at_fpr_takes_the_best_threshold_under_the_fpr_budget():
    y = [1] * 4 + [0] * 100
    scores = [10, 9, 0.5, 0.4] + [1.0] + [0.0] * 99  # one non-member scores above two members
    assert tpr_at_fpr(y, scores, fpr=0.0) == 0.5
    assert tpr_at_fpr(y, scores, fpr=0.01) == 1.0
    metrics = membership_metrics(y, scores, n_bootstrap=10)
    assert metrics["tpr@0.01fpr"] == 1.0  # 100 non-members resolve 1% FPR exactly
    assert math.isnan(metrics["tpr@0.001fpr"])  # ... but not 0.1%: that would be the TPR at FPR 0
    assert metrics["min_resolvable_fpr"] == 0.01 and metrics["tpr_at_min_fpr"] == 1.0


def test_tpr_below_the_resolvable_fpr_is_nan_and_read_at_one_over_n_instead():
    # 10 non-members: FPR moves in steps of 0.1. Scores, highest first: m m n m m, 9 n, m m
    y = [1, 1, 0, 1, 1] + [0] * 9 + [1, 1]
    scores = list(range(16, 0, -1))
    metrics = membership_metrics(y, scores, n_bootstrap=10)
    assert math.isnan(metrics["tpr@0.01fpr"]) and math.isnan(metrics["tpr@0.001fpr"])
    assert metrics["min_resolvable_fpr"] == pytest.approx(0.1)
    assert metrics["tpr_at_min_fpr"] == pytest.approx(4 / 6)  # one false positive (score 14) allows 4 of 6 members
    assert membership_metrics(y, scores, fprs=(0.1, 0.2, 0.05), n_bootstrap=10)["tpr@0.1fpr"] == pytest.approx(4 / 6)
    wider = membership_metrics(y, scores, fprs=(0.2, 0.05), n_bootstrap=10)
    assert wider["tpr@0.2fpr"] == pytest.approx(4 / 6) and math.isnan(wider["tpr@0.05fpr"])
    assert tpr_at_fpr(y, scores, fpr=0.0) == pytest.approx(2 / 6)  # FPR 0 is measurable: no false positive


def test_non_finite_scores_warn_and_give_nan_not_a_crash():
    y = [1, 1, 1, 0, 0, 0]
    for bad in (float("nan"), float("inf")):
        scores = [0.9, bad, 0.7, 0.1, 0.2, 0.3]
        with pytest.warns(UndefinedMetricWarning, match="1 of 6 scores are NaN or infinite"):
            metrics = membership_metrics(y, scores, n_bootstrap=50)
        assert all(math.isnan(metrics[k]) for k in ("auc", "auc_low", "auc_high", "tpr@0.01fpr", "tpr_at_min_fpr",
                                                      "balanced_accuracy"))
        assert metrics["min_resolvable_fpr"] == pytest.approx(1 / 3)  # a fact of the data, not of the scores
        with pytest.warns(UndefinedMetricWarning):
            fpr, _ = roc_points(y, scores)
        assert np.isnan(fpr).all()


def test_single_class_warns_and_returns_nan():
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(roc_auc([1, 1], [0.3, 0.4]))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(tpr_at_fpr([0, 0], [0.3, 0.4], fpr=0.01))
    with pytest.warns(UndefinedMetricWarning):
        fpr, tpr = roc_points([0, 0], [0.3, 0.4])
    assert np.isnan(fpr).all()


def test_bad_shapes_and_fpr_are_rejected():
    with pytest.raises(ValueError):
        roc_auc([1, 0], [0.5])
    with pytest.raises(ValueError):
        tpr_at_fpr([1, 0], [0.5, 0.2], fpr=2)


def test_auc_interval_contains_the_point_auc_and_narrows_with_more_samples():
    widths = []
    for n in (50, 2000):
        y, scores = _shifted_normal(n)
        low, high = auc_confidence_interval(y, scores)
        assert low < roc_auc(y, scores) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # width shrinks like 1/sqrt(n): 40x the data, ~6x narrower


def test_auc_interval_of_a_perfect_separation_is_degenerate():
    y = [1] * 20 + [0] * 20
    scores = np.r_[np.linspace(2, 3, 20), np.linspace(0, 1, 20)]
    assert roc_auc(y, scores) == 1.0
    assert auc_confidence_interval(y, scores, n_bootstrap=200) == (1.0, 1.0)


def test_auc_interval_is_reproducible_from_the_seed():
    y, scores = _shifted_normal(90)
    assert auc_confidence_interval(y, scores, seed=3) == auc_confidence_interval(y, scores, seed=3)
    assert auc_confidence_interval(y, scores, seed=3) != auc_confidence_interval(y, scores, seed=4)
    # a wider confidence gives a wider interval on the same resamples
    low90, high90 = auc_confidence_interval(y, scores, confidence=0.90)
    low99, high99 = auc_confidence_interval(y, scores, confidence=0.99)
    assert low99 < low90 and high90 < high99


def test_rank_auc_equals_sklearn_on_each_resample():
    rng = np.random.default_rng(0)
    # integer scores so that resamples are full of ties, which must count one half each
    members, non_members = rng.integers(0, 6, 30), rng.integers(0, 5, 25)
    pos = members[rng.integers(0, 30, size=(5, 30))]
    neg = non_members[rng.integers(0, 25, size=(5, 25))]
    y = np.r_[np.ones(30), np.zeros(25)]
    expected = [roc_auc_score(y, np.r_[p, q]) for p, q in zip(pos, neg)]
    np.testing.assert_allclose(_rank_auc(pos, neg), expected, rtol=0, atol=1e-12)


def test_auc_interval_is_fast_enough_for_hundreds_of_cells():
    y, scores = _shifted_normal(90)
    auc_confidence_interval(y, scores)  # warm-up
    start = time.perf_counter()
    auc_confidence_interval(y, scores, n_bootstrap=1000)
    # ~12 ms measured on one core; the bound is loose because the test machine is shared
    assert time.perf_counter() - start < 0.5


def test_best_balanced_accuracy_on_a_hand_example():
    y, scores = [1, 1, 0, 0, 0], [3, 5, 1, 2, 4]
    # threshold >= 5: TPR 1/2, FPR 0   -> 3/4
    # threshold >= 4: TPR 1/2, FPR 1/3 -> 7/12
    # threshold >= 3: TPR 1,   FPR 1/3 -> 5/6   (the best)
    # threshold >= 2: TPR 1,   FPR 2/3 -> 2/3;  >= 1: TPR 1, FPR 1 -> 1/2
    assert balanced_accuracy_best(y, scores) == pytest.approx(5 / 6)
    assert balanced_accuracy_score(y, np.asarray(scores) >= 3) == pytest.approx(5 / 6)
    assert balanced_accuracy_best([1, 0], [0.2, 0.9]) == 0.5  # predicting one class for all is 1/2


def test_membership_metrics_keys_and_skipping_the_interval():
    y, scores = _shifted_normal(90)
    metrics = membership_metrics(y, scores, n_bootstrap=200)
    assert list(metrics) == ["auc", "auc_low", "auc_high", "tpr@0.01fpr", "tpr@0.001fpr", "min_resolvable_fpr",
                             "tpr_at_min_fpr", "balanced_accuracy"]
    assert math.isnan(metrics["tpr@0.001fpr"]) and metrics["min_resolvable_fpr"] == 1 / 90
    assert metrics["auc_low"] < metrics["auc"] < metrics["auc_high"]
    assert (metrics["auc_low"], metrics["auc_high"]) == auc_confidence_interval(y, scores, n_bootstrap=200)
    assert metrics["balanced_accuracy"] == balanced_accuracy_best(y, scores)
    skipped = membership_metrics(y, scores, n_bootstrap=0)
    assert math.isnan(skipped["auc_low"]) and math.isnan(skipped["auc_high"])
    assert skipped["auc"] == metrics["auc"]


def test_new_metrics_with_one_class_warn_and_return_nan():
    with pytest.warns(UndefinedMetricWarning):
        low, high = auc_confidence_interval([1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(low) and math.isnan(high)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(balanced_accuracy_best([0, 0], [0.1, 0.2]))
    with pytest.warns(UndefinedMetricWarning):
        metrics = membership_metrics([0, 0], [0.1, 0.2])
    assert all(math.isnan(v) for v in metrics.values())


@pytest.mark.parametrize("kwargs", [{"n_bootstrap": 0}, {"n_bootstrap": -5}, {"n_bootstrap": 10.5},
                                    {"confidence": 0}, {"confidence": 1.5}])
def test_bad_interval_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        auc_confidence_interval([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3], **kwargs)


def test_more_than_two_classes_are_rejected():
    with pytest.raises(ValueError, match="classes"):
        auc_confidence_interval([0, 1, 2], [0.1, 0.2, 0.3])


def test_a_metric_some_seeds_lack_has_no_mean_across_seeds():
    from fedleak.eval.aggregate import mean_interval

    full = mean_interval([0.5, 0.7, 0.6])
    assert full["mean"] == pytest.approx(0.6) and full["n"] == 3 and full["ci_low"] < 0.6 < full["ci_high"]
    # TPR@1%FPR resolvable in one seed of two: the one seed's value must not stand for both.
    assert mean_interval([0.4, None]) == {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    assert mean_interval([float("nan"), 0.4])["mean"] is None
