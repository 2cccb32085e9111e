"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent").

Each client's score is the sum of squared distances to its n - f - 2 nearest other clients; Krum
keeps the lowest-scoring upload, Multi-Krum averages the m lowest (weighted by example counts, as
Flower does). Needs n > 2f + 2 clients per round. An upload with a NaN or an infinity is never
selected (its distances are not numbers; scores are computed among the finite uploads); the round
loop refuses such uploads before any rule sees them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState, flatten
from fedleak.federated.aggregation import fedavg, finite_results
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveInt
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def krum_scores(vectors: torch.Tensor, *, f: int) -> torch.Tensor:
    """Each row's sum of squared distances to its n - f - 2 nearest other rows (at least one)."""
    distances = torch.cdist(vectors, vectors) ** 2
    closest = max(1, len(vectors) - f - 2)
    # Row i sorted ascending starts with its zero distance to itself: skip it.
    return distances.sort(dim=1).values[:, 1:closest + 1].sum(dim=1)


def krum_select(results: Sequence[tuple[AdapterState, int]], *, f: int, m: int = 1) -> list[int]:
    """Indices of the m uploads with the lowest Krum scores (Blanchard et al. 2017).

    Args:
        results: (adapter state, num_examples) pairs; non-finite states are never selected.
        f: malicious uploads tolerated (n counts the finite uploads).
        m: how many to select (fewer when fewer are finite).

    Returns:
        Indices into `results`, best score first.

    Raises:
        ValueError: no result is finite.
    """
    finite = finite_results(results)
    vectors = torch.stack([flatten(results[i][0]) for i in finite])
    return [finite[i] for i in torch.argsort(krum_scores(vectors, f=f), stable=True)[:m].tolist()]


def krum_precondition(n: int, f: int, name: str) -> None:
    if n <= 2 * f + 2:
        raise FedleakError(f"{name}: f = {f} needs more than 2f + 2 = {2 * f + 2} clients per round, got {n}: "
                           f"lower f or sample more clients (federation.clients, federation.client_fraction)")


@register_defense("krum")
class Krum(Defense):
    """Krum: keep the one upload closest to its n - f - 2 neighbours (Blanchard et al. 2017)."""

    needs_individual_updates = True

    def __init__(self, *, f: NonNegativeInt = 0):
        """Set the number of malicious uploads Krum tolerates.

        Args:
            f: malicious clients tolerated per round (the paper's f): a score sums the squared distances to the
                n - f - 2 nearest other uploads; needs more than 2f + 2 clients per round.
        """
        self.f = f

    def check(self, *, clients_per_round: int) -> None:
        krum_precondition(clients_per_round, self.f, "krum")

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        krum_precondition(len(updates), self.f, "krum")
        results = [(u.state, u.num_examples) for u in updates]
        chosen = krum_select(results, f=self.f)[0]
        info.metrics["excluded_clients"] = [u.client for i, u in enumerate(updates) if i != chosen]
        return dict(results[chosen][0])


@register_defense("multikrum")
class MultiKrum(Defense):
    """Multi-Krum: average the m uploads with the best Krum scores (Blanchard et al. 2017)."""

    needs_individual_updates = True

    def __init__(self, *, f: NonNegativeInt = 0, m: PositiveInt = 1):
        """Set the number of malicious uploads tolerated and of uploads averaged.

        Args:
            f: malicious clients tolerated per round (the paper's f), as for krum; needs more than 2f + 2 clients
                per round.
            m: uploads with the lowest Krum scores averaged, weighted by example counts (the paper's m; 1 = Krum);
                at most the clients per round.
        """
        self.f, self.m = f, m

    def check(self, *, clients_per_round: int) -> None:
        krum_precondition(clients_per_round, self.f, "multikrum")
        if self.m > clients_per_round:
            raise FedleakError(f"multikrum: m = {self.m} exceeds the {clients_per_round} clients per round")

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        krum_precondition(len(updates), self.f, "multikrum")
        results = [(u.state, u.num_examples) for u in updates]
        chosen = set(krum_select(results, f=self.f, m=min(self.m, len(updates))))
        info.metrics["excluded_clients"] = [u.client for i, u in enumerate(updates) if i not in chosen]
        return fedavg([results[i] for i in sorted(chosen)])
