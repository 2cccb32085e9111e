"""Coordinate-wise median aggregation (Yin, Chen, Ramchandran and Bartlett 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

The server replaces FedAvg by the per-coordinate median of the client adapters, unweighted by
example counts as in the paper; with an even number of clients the two middle values are averaged.
An upload with a NaN or an infinity is left out (sorting would place NaN as the largest value and
shift the middle); the round loop refuses such uploads before any rule sees them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState
from fedleak.federated.aggregation import finite_results
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def stacked_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; torch.median keeps the lower middle for even counts, the median proper
    (and numpy) averages the two middles."""
    ordered, n = stacked.sort(dim=0).values, stacked.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def coordinate_median(results: Sequence[tuple[AdapterState, int]]) -> AdapterState:
    """The per-coordinate median of the client adapters (Yin et al. 2018), unweighted.

    Args:
        results: (adapter state, num_examples) pairs; counts are ignored, non-finite states left out.

    Returns:
        The median adapter, each tensor in the first state's dtype.

    Raises:
        ValueError: no results, or none finite.
    """
    if not results:
        raise ValueError("coordinate_median needs at least one client update")
    results = [results[i] for i in finite_results(results)]
    return {key: stacked_median(torch.stack([s[key].to(torch.float64) for s, _ in results])).to(results[0][0][key].dtype)
            for key in results[0][0]}


@register_defense("median")
class Median(Defense):
    """Coordinate-wise median of client adapters instead of FedAvg (Yin et al. 2018)."""

    needs_individual_updates = True

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        return coordinate_median([(u.state, u.num_examples) for u in updates])
