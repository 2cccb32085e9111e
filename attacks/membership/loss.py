"""LOSS membership inference (Yeom, Giacomelli, Fredrikson and Jha 2018, "Privacy Risk in
Machine Learning: Analyzing the Connection to Overfitting").

score(x) = -mean token NLL of x under the target: training members tend to have lower loss.
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.membership.stats import ORIGINAL, TARGET, LogitAttack, TokenStats


@register_attack("loss")
class LossAttack(LogitAttack):
    """LOSS: a lower loss on a record means member (Yeom et al. 2018)."""

    def __init__(self):
        pass

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        return -stats[TARGET, ORIGINAL].loss
