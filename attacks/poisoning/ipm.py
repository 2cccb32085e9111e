"""Inner-product manipulation (Xie, Koyejo and Gupta 2020, "Fall of Empires: Breaking Byzantine-
tolerant SGD by Inner Product Manipulation").

Every malicious client sends -epsilon times the mean of the honest updates, so the aggregate's
inner product with the true update shrinks or turns negative: a small epsilon (0.1 in the paper)
passes Krum and the median, a large one (100) defeats the mean.

Omniscient, as in the paper: the attacker reads the honest clients' updates of the round (with no
honest upload in a round it uses its own clients' trained updates).
"""

from __future__ import annotations

import torch

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import ModelPoisoning, RoundUpdates
from fedleak.common.params import PositiveFloat


def ipm_update(honest: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    return -epsilon * honest.mean(dim=0)


@register_attack("ipm")
class IPM(ModelPoisoning):
    """IPM: send minus epsilon times the honest mean update (Xie et al. 2020)."""

    omniscient = True

    def __init__(self, *, epsilon: PositiveFloat = 0.5):
        """Set the IPM factor.

        Args:
            epsilon: the update sent is -epsilon times the honest clients' mean update (the paper's epsilon: 0.1
                passes Krum and the median, 100 defeats the mean).
        """
        self.epsilon = epsilon

    def poison_update(self, delta: torch.Tensor, round_updates: RoundUpdates) -> torch.Tensor:
        return ipm_update(round_updates.honest, epsilon=self.epsilon)
