"""Privacy auditing: empirical lower bounds on the epsilon of a (supposedly) DP training run.

- Jagielski, Ullman and Oprea (2020), "Auditing Differentially Private Machine Learning: How Private
  is Private SGD?", and Nasr, Song, Thakurta, Papernot and Carlini (2021), "Adversary Instantiation:
  Lower Bounds for Differentially Private Machine Learning": turn a membership test's false positive
  and false negative rates, bounded by Clopper-Pearson intervals, into an epsilon lower bound
  (`empirical_epsilon`).
- Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training Run": canaries each
  included with probability 1/2 in a single run; the number of correct membership guesses is
  compared with the binomial tail that eps-DP allows (`one_run_epsilon`); `one_run_by_design` audits
  each canary design of Panda, Tang, Nasr, Choquette-Choo and Mittal (2025), "Privacy Auditing of
  Large Language Models" (arXiv 2503.06808), on its own.

Same conventions as `fedleak.eval.metrics`: higher score = member / included.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import beta, binom

from fedleak.eval.metrics import (UndefinedMetricWarning, _check_confidence, _split_by_class, auc_confidence_interval,
                                  roc_auc)

_EPS_MAX = 50.0  # e^50 / (1 + e^50) is 1 in float64: no finite count of guesses can reject more


def _check_delta(delta: float) -> None:
    if not 0 <= delta < 1:
        raise ValueError(f"delta = {delta}: must be in [0, 1), e.g. 1e-5")


def clopper_pearson(successes, trials, *, confidence: float = 0.95):
    """Two-sided exact binomial interval (low, high) for successes / trials, elementwise.

    This is the Clopper-Pearson formula through beta quantiles, written out because scipy's
    binomtest(...).proportion_ci is scalar-only. Scalars in give floats out, arrays give arrays.
    """
    _check_confidence(confidence)
    k, n = np.broadcast_arrays(np.asarray(successes, dtype=float), np.asarray(trials, dtype=float))
    if np.any(k != np.round(k)) or np.any(n != np.round(n)):
        raise ValueError("successes and trials must be whole counts")
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials and trials >= 1 elementwise")
    tail = (1 - confidence) / 2
    with np.errstate(invalid="ignore"):  # the beta parameter k or n - k is 0 at the ends; fixed below
        low = np.where(k == 0, 0.0, beta.ppf(tail, k, n - k + 1))
        high = np.where(k == n, 1.0, beta.ppf(1 - tail, k + 1, n - k))
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def empirical_epsilon(y_true, y_score, *, delta: float, confidence: float = 0.95) -> dict:
    """Epsilon lower bound from a membership test, the largest over all score thresholds.

    At each threshold t (predict member when score >= t) the false positive rate among non-members
    and the false negative rate among members get Clopper-Pearson upper bounds FPR_u, FNR_u, and
    (eps, delta)-DP requires FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta, so
    eps >= max(ln((1 - delta - FPR_u) / FNR_u), ln((1 - delta - FNR_u) / FPR_u), 0).

    Each rate takes the upper end of a two-sided interval at `confidence`, i.e. a one-sided bound at
    1 - (1 - confidence) / 2, so by a union bound both hold together with probability `confidence`.
    Taking the best threshold on the same scores, as is common, is slightly optimistic; choose the
    threshold on held-out scores for a strict guarantee.

    Returns {"epsilon_lb", "threshold", "fpr", "fnr", "confidence", "delta"}, fpr and fnr being the
    empirical rates at the best threshold. With one class present: NaNs and an
    UndefinedMetricWarning.
    """
    _check_delta(delta)
    _check_confidence(confidence)
    result = {"epsilon_lb": float("nan"), "threshold": float("nan"), "fpr": float("nan"),
              "fnr": float("nan"), "confidence": confidence, "delta": delta}
    split = _split_by_class(y_true, y_score)
    if split is None:
        return result
    members, non_members = np.sort(split[0]), np.sort(split[1])
    n1, n0 = len(members), len(non_members)
    thresholds = np.unique(np.concatenate([members, non_members]))
    fp = n0 - np.searchsorted(non_members, thresholds, side="left")  # non-members scoring >= t
    fn = np.searchsorted(members, thresholds, side="left")  # members scoring < t
    fpr_u = clopper_pearson(fp, np.full_like(fp, n0), confidence=confidence)[1]
    fnr_u = clopper_pearson(fn, np.full_like(fn, n1), confidence=confidence)[1]

    def log_ratio(num, den):
        # A non-positive numerator bounds nothing; upper bounds are never 0, but guard anyway.
        ok = (num > 0) & (den > 0)
        return np.where(ok, np.log(np.where(ok, num, 1.0) / np.where(ok, den, 1.0)), 0.0)

    eps = np.maximum(np.maximum(log_ratio(1 - delta - fpr_u, fnr_u), log_ratio(1 - delta - fnr_u, fpr_u)), 0.0)
    best = int(np.argmax(eps))
    result.update(epsilon_lb=float(eps[best]), threshold=float(thresholds[best]),
                  fpr=float(fp[best] / n0), fnr=float(fn[best] / n1))
    return result


def _one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of v or more correct guesses out of r if the training run were (eps, delta)-DP.

    Pure DP: P[Binomial(r, e^eps / (1 + e^eps)) >= v]. For delta > 0 the correction of Steinke et al.
    (2023, Appendix D) adds 2 m delta max_{1 <= i <= v} P[v - i <= Binomial < v] / i.
    """
    q = expit(eps)
    tail = binom.sf(v - 1, r, q)  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return float(tail)
    i = np.arange(1, v + 1)
    alpha = np.max((binom.sf(v - i - 1, r, q) - tail) / i)
    return float(min(tail + 2 * m * delta * alpha, 1.0))


def _one_run_bound(m: int, r: int, v: int, delta: float, level: float) -> float:
    """The largest eps whose p-value is below `level` (0 if none): the p-value grows with eps."""
    if _one_run_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    if _one_run_p_value(m, r, v, _EPS_MAX, delta) < level:
        return _EPS_MAX
    return float(brentq(lambda e: _one_run_p_value(m, r, v, e, delta) - level, 0.0, _EPS_MAX, xtol=1e-9))


def one_run_epsilon(included, y_score, *, delta: float = 0.0, confidence: float = 0.95,
                    abstain: bool = True) -> dict:
    """Epsilon lower bound from one training run (Steinke, Nasr and Jagielski 2023).

    `included[i]` says whether canary i went into training, each independently with probability 1/2;
    a higher `y_score` means "included". The auditor guesses "included" for the k_plus highest scores
    and "excluded" for the k_minus lowest and abstains on the rest. If training is eps-DP, the number
    of correct guesses out of r = k_plus + k_minus is stochastically dominated by
    Binomial(r, e^eps / (1 + e^eps)), so each eps whose tail P[Binomial >= correct] falls below the
    test level is rejected; the bound is the largest rejected eps (found by root-finding on [0, 50]).
    delta > 0 uses the paper's approximate-DP p-value (its Appendix D): the binomial tail plus
    2 m delta max_i P[correct - i <= Binomial < correct] / i.

    The guess counts are searched over a grid: k_plus in 1, 2, 4, ... up to m, plus m // 2, with
    k_minus = k_plus (capped at m - k_plus) when `abstain`, else k_minus = m - k_plus. The paper's
    experiments likewise report the best over several guess counts, which is optimistic by itself;
    here each grid point is tested at level (1 - confidence) / len(grid) (Bonferroni), so the reported
    best bound holds at `confidence`. Ties in the scores are broken by canary order, never by
    `included`, so the guesses stay a function of the scores alone, as the theorem needs.

    Returns {"epsilon_lb", "guesses", "correct", "k_plus", "k_minus", "canaries", "confidence",
    "delta"}; with a NaN or infinite score, NaNs and an UndefinedMetricWarning (the ranking is undefined).
    """
    _check_delta(delta)
    _check_confidence(confidence)
    included, y_score = np.asarray(included), np.asarray(y_score, dtype=float)
    if included.shape != y_score.shape or included.ndim != 1 or len(included) == 0:
        raise ValueError(f"included {included.shape} and y_score {y_score.shape} must be 1-D, non-empty "
                         "and the same length")
    if not np.isin(included, (0, 1)).all():
        raise ValueError("included must be booleans (or 0/1): True where the canary was trained on")
    included = included.astype(bool)
    m = len(included)
    if not np.isfinite(y_score).all():
        warnings.warn(f"{int((~np.isfinite(y_score)).sum())} of {m} canary scores are NaN or infinite: the one-run "
                      f"bound is undefined, returning NaN", UndefinedMetricWarning, stacklevel=2)
        nan = float("nan")
        return {"epsilon_lb": nan, "guesses": 0, "correct": 0, "k_plus": 0, "k_minus": 0, "canaries": m,
                "confidence": confidence, "delta": delta}
    by_score = included[np.argsort(-y_score, kind="stable")]  # highest score first
    correct_plus = np.concatenate([[0], np.cumsum(by_score)])  # included among the top k
    correct_minus = np.concatenate([[0], np.cumsum(~by_score[::-1])])  # excluded among the bottom k

    powers = 2 ** np.arange(int(np.log2(m)) + 1)
    grid = sorted({int(k) for k in powers if k <= m} | ({m // 2} if m >= 2 else set()))
    level = (1 - confidence) / len(grid)
    best = None
    for k_plus in grid:
        k_minus = min(k_plus, m - k_plus) if abstain else m - k_plus
        r, v = k_plus + k_minus, int(correct_plus[k_plus] + correct_minus[k_minus])
        eps = _one_run_bound(m, r, v, delta, level)
        if best is None or eps > best["epsilon_lb"]:
            best = {"epsilon_lb": eps, "guesses": r, "correct": v, "k_plus": k_plus, "k_minus": k_minus}
    return {**best, "canaries": m, "confidence": confidence, "delta": delta}


def one_run_by_design(included, y_score, designs, order, *, delta: float = 0.0, confidence: float = 0.95,
                      n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    """The one-run audit of each canary design on its own canaries: `designs[i]` names canary i's design.

    Each design's canaries were drawn and inserted independently of the others', so each gives its own
    bound at `confidence` (the largest over designs would hold at a lower one). Beside each bound the
    canaries' AUC (included against left out, with a stratified bootstrap interval): with a few dozen
    canaries the bound moves in coarse steps, and the AUC compares designs more finely.

    Returns {design: one_run_epsilon's dict plus "auc", "auc_low", "auc_high"} for each design in
    `order` whose canaries here are neither all included nor all left out (no bound otherwise).
    """
    included, y_score, designs = np.asarray(included), np.asarray(y_score, dtype=float), np.asarray(designs)
    if not included.shape == y_score.shape == designs.shape:
        raise ValueError(f"included {included.shape}, y_score {y_score.shape} and designs {designs.shape} must "
                         "have one entry per canary")
    out = {}
    for design in order:
        mine = designs == design
        inc, scores = included[mine].astype(bool), y_score[mine]
        if not inc.any() or inc.all():
            continue
        result = one_run_epsilon(inc, scores, delta=delta, confidence=confidence)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)  # one_run_epsilon has warned of NaN scores
            low, high = auc_confidence_interval(inc, scores, n_bootstrap=n_bootstrap, confidence=confidence,
                                                seed=seed) if n_bootstrap else (float("nan"), float("nan"))
            out[design] = {**result, "auc": roc_auc(inc, scores), "auc_low": low, "auc_high": high}
    return out
