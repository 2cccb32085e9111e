import math

import numpy as np
import pytest

from fedleak.eval.metrics import (UndefinedMetricWarning, membership_metrics, roc_auc, roc_points,
                                  tpr_at_fpr)


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
    assert membership_metrics(y, scores)["tpr@0.001fpr"] == 0.5


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
