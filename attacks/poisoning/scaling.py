"""Model replacement by scaling (Bagdasaryan, Veit, Hua, Estrin and Shmatikov 2020, "How To Backdoor
Federated Learning").

The malicious client multiplies its update (upload minus global adapter) by a boost factor, so
that its update survives averaging. Without an explicit `boost` it uses the paper's replacement
factor under FedAvg: total examples of the round / its own examples, which makes the aggregate
equal (up to the honest updates) to its own model. With `backdoor` listed first this is the
standard model-replacement backdoor.
"""

from __future__ import annotations

import torch

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import ModelPoisoning, RoundUpdates
from fedleak.common.params import PositiveFloat


def scale_update(delta: torch.Tensor, *, boost: float) -> torch.Tensor:
    return delta * boost


@register_attack("scaling")
class Scaling(ModelPoisoning):
    """Scaling / model replacement: boost the malicious update (Bagdasaryan et al. 2020)."""

    def __init__(self, *, boost: PositiveFloat | None = None):  # unset: the FedAvg replacement factor
        """Set the boost factor.

        Args:
            boost: factor the malicious update (upload minus global adapter) is multiplied by (the paper's gamma);
                unset: the FedAvg replacement factor, the round's total examples / the client's own examples.
        """
        self.boost = boost

    def poison_update(self, delta: torch.Tensor, round_updates: RoundUpdates) -> torch.Tensor:
        boost = self.boost if self.boost is not None else round_updates.total_examples / max(round_updates.own_examples, 1)
        return scale_update(delta, boost=boost)
