"""Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of Distributed Learning
in Byzantium").

Pick theta = n - 2f uploads by repeatedly taking the Krum winner out of the remaining pool; then,
per coordinate, average the beta = theta - 2f values closest to the coordinate-wise median of the
selection. Needs n >= 4f + 3 clients per round. An upload with a NaN or an infinity is left out
before selection (n counts the finite uploads); the round loop refuses such uploads before any rule.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.defenses.base import Defense, register_defense
from fedleak.defenses.krum import krum_select
from fedleak.defenses.median import stacked_median
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.federated.aggregation import finite_results
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def bulyan_select(results: Sequence[tuple[AdapterState, int]], *, f: int) -> list[int]:
    """Indices of the theta = n - 2f uploads picked by repeated Krum, n the finite uploads."""
    remaining = finite_results(results)
    selected = []
    for _ in range(len(remaining) - 2 * f):
        pick = remaining[krum_select([results[i] for i in remaining], f=f)[0]]
        selected.append(pick)
        remaining.remove(pick)
    return selected


def bulyan(results: Sequence[tuple[AdapterState, int]], *, f: int) -> tuple[AdapterState, list[int]]:
    """Bulyan's aggregate and the selected indices (El Mhamdi et al. 2018).

    Args:
        results: (adapter state, num_examples) pairs; counts are ignored, non-finite states left out.
        f: malicious uploads tolerated.

    Returns:
        The aggregate (in the first state's dtypes) and the indices into `results` Krum selected.

    Raises:
        ValueError: fewer than 4f + 3 finite results (nothing left to average).
    """
    selected = bulyan_select(results, f=f)
    beta = len(selected) - 2 * f
    if beta < 1:
        raise ValueError(f"bulyan: f = {f} leaves no value to average of {len(selected)} selected finite updates")
    vectors = torch.stack([flatten(results[i][0]) for i in selected])
    closest = (vectors - stacked_median(vectors)).abs().argsort(dim=0, stable=True)[:beta]
    return unflatten(vectors.gather(0, closest).mean(dim=0), results[0][0]), selected


def bulyan_precondition(n: int, f: int) -> None:
    if n < 4 * f + 3:
        raise FedleakError(f"bulyan: f = {f} needs at least 4f + 3 = {4 * f + 3} clients per round, got {n}: "
                           f"lower f or sample more clients")


@register_defense("bulyan")
class Bulyan(Defense):
    """Bulyan: Krum-based selection, then a coordinate-wise trimmed average around the median (El Mhamdi et al. 2018)."""

    needs_individual_updates = True

    def __init__(self, *, f: NonNegativeInt = 0):
        """Set the number of malicious uploads Bulyan tolerates.

        Args:
            f: malicious clients tolerated per round (the paper's f): n - 2f uploads are selected by repeated Krum,
                then beta = n - 4f values per coordinate averaged; needs at least 4f + 3 clients per round.
        """
        self.f = f

    def check(self, *, clients_per_round: int) -> None:
        bulyan_precondition(clients_per_round, self.f)

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        bulyan_precondition(len(updates), self.f)
        state, selected = bulyan([(u.state, u.num_examples) for u in updates], f=self.f)
        info.metrics["excluded_clients"] = [u.client for i, u in enumerate(updates) if i not in selected]
        return state
