"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates").

For each coordinate the server drops the floor(beta * n) largest and smallest client values and
averages the rest, unweighted. Needs 0 <= beta < 0.5 and at least one value left. An upload with a
NaN or an infinity is left out before trimming (n counts the finite uploads); the round loop refuses
such uploads before any rule sees them.
"""

from __future__ import annotations

import math
from typing import Annotated, Sequence

import torch

from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState
from fedleak.federated.aggregation import finite_results
from fedleak.common.errors import FedleakError
from fedleak.common.params import Range
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def trimmed_mean(results: Sequence[tuple[AdapterState, int]], *, beta: float) -> AdapterState:
    """The per-coordinate mean after trimming floor(beta * n) values at each end (Yin et al. 2018).

    Args:
        results: (adapter state, num_examples) pairs; counts are ignored, non-finite states left out.
        beta: fraction trimmed at each end, 0 <= beta < 0.5.

    Returns:
        The trimmed-mean adapter, each tensor in the first state's dtype.

    Raises:
        ValueError: beta leaves no value, or no result is finite.
    """
    results = [results[i] for i in finite_results(results)]
    n = len(results)
    cut = math.floor(beta * n)
    if not 0 <= beta < 0.5 or n - 2 * cut < 1:
        raise ValueError(f"trimmed_mean with beta = {beta} leaves no value of {n}")
    out = {}
    for key in results[0][0]:
        ordered = torch.stack([s[key].to(torch.float64) for s, _ in results]).sort(dim=0).values
        out[key] = ordered[cut:n - cut].mean(dim=0).to(results[0][0][key].dtype)
    return out


@register_defense("trimmed_mean")
class TrimmedMean(Defense):
    """Coordinate-wise trimmed mean: drop the beta fraction of extreme values at each end (Yin et al. 2018)."""

    needs_individual_updates = True

    def __init__(self, *, beta: Annotated[float, Range(ge=0, lt=0.5)] = 0.1):
        """Set the trimmed fraction.

        Args:
            beta: fraction trimmed at each end (the paper's beta): per coordinate the floor(beta * n) largest and
                as many smallest values are dropped; 0 = plain unweighted mean. At least one value must remain.
        """
        self.beta = beta

    def check(self, *, clients_per_round: int) -> None:
        if clients_per_round - 2 * math.floor(self.beta * clients_per_round) < 1:
            raise FedleakError(f"trimmed_mean: beta = {self.beta} trims every one of {clients_per_round} clients "
                               f"per round: lower beta or sample more clients")

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        return trimmed_mean([(u.state, u.num_examples) for u in updates], beta=self.beta)
