"""Gaussian noise updates (the Gaussian Byzantine attack of Blanchard, El Mhamdi, Guerraoui and
Stainer 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", and Fang
et al. 2020).

The malicious client sends an isotropic Gaussian vector instead of its update, rescaled to L2 norm
`norm` (by default the norm of the update it trained, so the norm alone does not give it away).
"""

from __future__ import annotations

import torch

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import ModelPoisoning, RoundUpdates
from fedleak.common.params import PositiveFloat


def gaussian_update(like: torch.Tensor, *, norm: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    return noise * (norm / float(noise.norm()))


@register_attack("gaussian")
class Gaussian(ModelPoisoning):
    """Gaussian: send random noise of a given norm instead of the update (Blanchard et al. 2017)."""

    def __init__(self, *, norm: PositiveFloat | None = None):  # unset: the trained update's norm
        """Set the norm of the noise sent.

        Args:
            norm: L2 norm of the Gaussian vector sent instead of the update; unset: the norm of the update the
                client trained.
        """
        self.norm = norm

    def poison_update(self, delta: torch.Tensor, round_updates: RoundUpdates) -> torch.Tensor:
        norm = self.norm if self.norm is not None else float(delta.norm())
        return gaussian_update(delta, norm=norm, generator=round_updates.generator)
