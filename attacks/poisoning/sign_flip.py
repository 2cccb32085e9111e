"""Sign flipping (Damaskinos, El Mhamdi, Guerraoui, Patra and Taziki 2018, "Asynchronous Byzantine
Machine Learning", and the reversed-gradient attack of Fang, Cao, Jia and Gong 2020, "Local Model
Poisoning Attacks to Byzantine-Robust Federated Learning").

The malicious client sends its update negated and multiplied by `scale`: it pushes the global
model away from what its data teaches.
"""

from __future__ import annotations

import torch

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import ModelPoisoning, RoundUpdates
from fedleak.common.params import PositiveFloat


def flip_update(delta: torch.Tensor, *, scale: float) -> torch.Tensor:
    return -scale * delta


@register_attack("sign_flip")
class SignFlip(ModelPoisoning):
    """Sign flip: send the negated (and scaled) update (Damaskinos et al. 2018)."""

    def __init__(self, *, scale: PositiveFloat = 1.0):
        """Set the factor of the negated update.

        Args:
            scale: the update sent is -scale times the trained update; 1 = plain negation.
        """
        self.scale = scale

    def poison_update(self, delta: torch.Tensor, round_updates: RoundUpdates) -> torch.Tensor:
        return flip_update(delta, scale=self.scale)
