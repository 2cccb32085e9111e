"""Min-K% Prob (Shi et al. 2023, "Detecting Pretraining Data from Large Language Models") and
Min-K%++ (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training Data from
Large Language Models").

Min-K%:   score(x) = mean of the k% lowest token log-probs log p(x_t | x_<t).
Min-K%++: each token's log-prob is standardised by the mean mu_t and std sigma_t of log p(z) for z
          drawn from the model's next-token distribution, (log p(x_t) - mu_t) / sigma_t, then the
          k% lowest are averaged. Members sit at local maxima of the likelihood, so their tokens
          score high against what the model expected.
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.membership.stats import ORIGINAL, TARGET, LogitAttack, TokenStats
from fedleak.common.params import UnitInterval


def lowest_k_mean(values: np.ndarray, mask: np.ndarray, *, k: float) -> np.ndarray:
    """Per row, the mean of the ceil(k * n) lowest masked values (at least one)."""
    out = np.empty(len(values))
    for i, (row, keep) in enumerate(zip(values, mask)):
        v = np.sort(row[keep])
        out[i] = v[: max(1, int(np.ceil(k * len(v))))].mean() if len(v) else np.nan
    return out


class _MinK(LogitAttack):
    def __init__(self, *, k: UnitInterval = 0.2):  # the fraction of lowest-scoring tokens averaged
        """Set the share of tokens scored.

        Args:
            k: fraction of a record's scored tokens averaged, those with the lowest (for min_k_pp: standardised)
                log-probs (the paper's k%, as a fraction: 0.2 = 20%); at least one token.
        """
        self.k = k


@register_attack("min_k")
class MinKAttack(_MinK):
    """Min-K% Prob: mean of the k% lowest token log-probs (Shi et al. 2023)."""

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        s = stats[TARGET, ORIGINAL]
        return lowest_k_mean(s.logp, s.mask, k=self.k)


@register_attack("min_k_pp")
class MinKPlusPlusAttack(_MinK):
    """Min-K%++: token log-probs standardised by the next-token distribution (Zhang et al. 2024)."""

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        s = stats[TARGET, ORIGINAL]
        z = (s.logp - s.mu) / np.maximum(s.sigma, 1e-12)
        return lowest_k_mean(z, s.mask, k=self.k)
