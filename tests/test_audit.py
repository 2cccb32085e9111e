import math

import numpy as np
import pytest
from scipy.special import logit
from scipy.stats import binom, binomtest

from fedleak.eval.audit import clopper_pearson, empirical_epsilon, one_run_epsilon
from fedleak.eval.metrics import UndefinedMetricWarning


def _exact_ci(k, n, confidence):
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return ci.low, ci.high


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_scipy_binomtest(confidence):
    pairs = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (0, 100), (50, 100), (99, 100), (7, 1000)]
    k, n = np.array(pairs).T
    low, high = clopper_pearson(k, n, confidence=confidence)
    expected = np.array([_exact_ci(int(a), int(b), confidence) for a, b in pairs])
    np.testing.assert_allclose(low, expected[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(high, expected[:, 1], rtol=1e-9, atol=1e-12)
    assert low[0] == 0.0 and high[1] == 1.0  # exact ends at 0 and n successes


def test_clopper_pearson_scalars_and_broadcasting():
    low, high = clopper_pearson(3, 10)
    assert isinstance(low, float) and (low, high) == pytest.approx(_exact_ci(3, 10, 0.95))
    low, high = clopper_pearson(np.array([[0, 5], [5, 10]]), 10)
    assert low.shape == high.shape == (2, 2)


@pytest.mark.parametrize("args, kwargs", [((11, 10), {}), ((-1, 10), {}), ((0, 0), {}), ((1.5, 10), {}),
                                          ((3, 10), {"confidence": 1.0}), ((3, 10), {"confidence": 0})])
def test_clopper_pearson_rejects_bad_arguments(args, kwargs):
    with pytest.raises(ValueError):
        clopper_pearson(*args, **kwargs)


def test_empirical_epsilon_on_known_counts():
    # 100 members, 100 non-members; thresholding at 1 finds 50 members and no non-member.
    # The only other threshold (0, everyone a member) has FPR 1 and bounds nothing.
    y = np.r_[np.ones(100), np.zeros(100)]
    scores = np.r_[np.ones(50), np.zeros(50), np.zeros(100)]
    delta = 1e-5
    fpr_u = _exact_ci(0, 100, 0.95)[1]  # 0 false positives among 100
    fnr_u = _exact_ci(50, 100, 0.95)[1]  # 50 false negatives among 100
    expected = max(math.log((1 - delta - fpr_u) / fnr_u), math.log((1 - delta - fnr_u) / fpr_u), 0)
    assert expected > 0
    result = empirical_epsilon(y, scores, delta=delta)
    assert result["epsilon_lb"] == pytest.approx(expected, rel=1e-9)
    assert result["threshold"] == 1.0 and result["fpr"] == 0.0 and result["fnr"] == 0.5
    assert result["confidence"] == 0.95 and result["delta"] == delta


def test_empirical_epsilon_of_a_perfect_separation():
    # no errors among n per class: both upper bounds are 1 - (alpha/2)^(1/n)
    n, delta, confidence = 200, 1e-5, 0.95
    y = np.r_[np.ones(n), np.zeros(n)]
    scores = np.r_[np.linspace(1, 2, n), np.linspace(-1, 0, n)]
    u = 1 - ((1 - confidence) / 2) ** (1 / n)
    result = empirical_epsilon(y, scores, delta=delta, confidence=confidence)
    assert result["epsilon_lb"] == pytest.approx(math.log((1 - delta - u) / u), rel=1e-9)
    assert result["fpr"] == result["fnr"] == 0.0 and result["threshold"] == 1.0


def test_empirical_epsilon_of_random_scores_is_small():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(500), np.zeros(500)]
    assert empirical_epsilon(y, rng.normal(size=1000), delta=1e-5)["epsilon_lb"] < 0.5


def test_empirical_epsilon_with_one_class_warns_and_returns_nan():
    with pytest.warns(UndefinedMetricWarning):
        result = empirical_epsilon([1, 1, 1], [0.1, 0.5, 0.9], delta=0)
    assert math.isnan(result["epsilon_lb"]) and math.isnan(result["threshold"])


@pytest.mark.parametrize("kwargs", [{"delta": -0.1}, {"delta": 1.0}, {"delta": 0, "confidence": 1.0},
                                    {"delta": 0, "confidence": -0.5}])
def test_empirical_epsilon_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        empirical_epsilon([1, 0], [0.9, 0.1], **kwargs)


def _perfect_canaries(m, seed=0):
    # exactly half included, in random order, scored perfectly
    included = np.random.default_rng(seed).permutation(np.arange(m) < m // 2)
    return included, included + 0.0


def _grid_size(m):
    return len({2 ** j for j in range(int(math.log2(m)) + 1)} | {m // 2})


def test_one_run_epsilon_all_correct_matches_the_closed_form():
    # all r = m guesses correct: P[Bin(r, p) >= r] = p^r, so eps = logit(level^(1/r)) where the
    # level is (1 - confidence) split over the grid (Bonferroni).
    m, confidence = 1000, 0.95
    included, scores = _perfect_canaries(m)
    result = one_run_epsilon(included, scores, confidence=confidence)
    level = (1 - confidence) / _grid_size(m)
    assert result["guesses"] == result["correct"] == m
    assert result["k_plus"] == result["k_minus"] == m // 2 and result["canaries"] == m
    assert result["epsilon_lb"] == pytest.approx(logit(level ** (1 / m)), abs=1e-6)
    # and the tail at that eps is exactly the level
    assert binom.sf(m - 1, m, 1 / (1 + math.exp(-result["epsilon_lb"]))) == pytest.approx(level, rel=1e-5)


def test_one_run_epsilon_grows_with_the_number_of_canaries():
    bounds = [one_run_epsilon(*_perfect_canaries(m))["epsilon_lb"] for m in (100, 1000, 10000)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_one_run_epsilon_of_random_scores_is_near_zero():
    rng = np.random.default_rng(0)
    for abstain in (True, False):
        result = one_run_epsilon(rng.random(1000) < 0.5, rng.normal(size=1000), abstain=abstain)
        assert result["epsilon_lb"] < 0.2


def test_one_run_epsilon_without_abstention_guesses_every_canary():
    rng = np.random.default_rng(1)
    included = rng.random(500) < 0.5
    result = one_run_epsilon(included, included + rng.normal(scale=0.5, size=500), abstain=False)
    assert result["guesses"] == 500 and result["k_plus"] + result["k_minus"] == 500
    assert result["epsilon_lb"] > 1


def test_one_run_epsilon_with_delta_is_at_most_the_pure_bound():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(scale=0.7, size=1000)
    pure = one_run_epsilon(included, scores)["epsilon_lb"]
    approx = one_run_epsilon(included, scores, delta=1e-5)["epsilon_lb"]
    assert 0 < approx <= pure
    assert one_run_epsilon(included, scores, delta=0.1)["epsilon_lb"] < approx


def test_one_run_p_value_matches_its_approximate_dp_formula():
    # 2 m delta max_i P[v - i <= Bin(r, q) < v] / i added to the tail, summed here term by term
    from fedleak.eval.audit import _one_run_p_value
    m, r, v, eps, delta = 200, 40, 33, 1.0, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(r + 1)]
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    assert _one_run_p_value(m, r, v, eps, delta) == pytest.approx(sum(pmf[v:]) + 2 * m * delta * alpha, rel=1e-9)


@pytest.mark.parametrize("kwargs", [{"delta": -1e-5}, {"delta": 1.0}, {"confidence": 1.0}])
def test_one_run_epsilon_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        one_run_epsilon([True, False], [0.9, 0.1], **kwargs)


def test_one_run_epsilon_rejects_bad_inputs():
    with pytest.raises(ValueError):
        one_run_epsilon([True, False], [0.9])
    with pytest.raises(ValueError):
        one_run_epsilon([0.3, 1], [0.9, 0.1])
    with pytest.raises(ValueError):
        one_run_epsilon([], [])
