"""A Little Is Enough (Baruch, Baruch and Goldberg 2019, "A Little Is Enough: Circumventing Defenses
For Distributed Learning").

Every malicious client sends mu - z * sigma, where mu and sigma are the coordinate-wise mean and
standard deviation of the honest updates: within z standard deviations of the mean on every
coordinate, so median- and distance-based rules keep it, while all malicious clients pull the same
way. Without an explicit `z`, the paper's choice for n uploads of which f are malicious:
s = floor(n / 2 + 1) - f and z = Phi^-1((n - s) / n). The paper assumes a malicious minority; where
s <= 0 (half or more malicious) its formula has no answer and z is clamped to Phi^-1(1 - 1e-6) = 4.75.

Omniscient, as in the paper: the attacker reads the honest clients' updates of the round (with no
honest upload in a round it uses its own clients' trained updates).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import ModelPoisoning, RoundUpdates
from fedleak.common.params import NonNegativeFloat


def alie_z(n: int, f: int) -> float:
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def alie_update(honest: torch.Tensor, *, z: float) -> torch.Tensor:
    """mu - z * sigma over the rows of `honest` (sample std; zero with a single row)."""
    sigma = honest.std(dim=0) if len(honest) > 1 else torch.zeros_like(honest[0])
    return honest.mean(dim=0) - z * sigma


@register_attack("alie")
class ALIE(ModelPoisoning):
    """ALIE: send mean - z std of the honest updates, inside every coordinate's spread (Baruch et al. 2019)."""

    omniscient = True

    def __init__(self, *, z: NonNegativeFloat | None = None):  # unset: the paper's choice from n and f
        """Set how far below the honest mean the malicious update sits.

        Args:
            z: standard deviations of the honest updates subtracted from their mean, per coordinate (the paper's
                z); 0 = the honest mean; unset: the paper's choice from the uploads n and malicious f (at most 4.75).
        """
        self.z = z

    def poison_update(self, delta: torch.Tensor, round_updates: RoundUpdates) -> torch.Tensor:
        z = self.z if self.z is not None else alie_z(round_updates.num_uploads, round_updates.num_malicious)
        return alie_update(round_updates.honest, z=z)
