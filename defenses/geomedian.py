"""Geometric median aggregation, RFA (Pillutla, Kakade and Harchaoui 2022, "Robust Aggregation for
Federated Learning").

The smoothed Weiszfeld algorithm: starting from the weighted mean, repeatedly re-weight each
client by alpha_i / max(nu, |v - w_i|) (alpha_i its share of examples) and take the weighted mean,
for at most `max_iter` iterations or until the objective stops improving by more than `ftol`.
An upload with a NaN or an infinity is left out (one such point makes the starting mean, and with
it every iterate, non-finite); the round loop refuses such uploads before any rule sees them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.federated.aggregation import finite_results
from fedleak.common.params import NonNegativeFloat, PositiveFloat, PositiveInt
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def geometric_median(results: Sequence[tuple[AdapterState, int]], *, max_iter: int = 10, nu: float = 1e-6,
                     ftol: float = 1e-6) -> tuple[AdapterState, int]:
    """The smoothed Weiszfeld estimate and the number of iterations it took (Pillutla et al. 2022).

    Args:
        results: (adapter state, num_examples) pairs; example shares are the weights alpha_i; non-finite
            states are left out.
        max_iter: at most this many Weiszfeld iterations.
        nu: distances below nu count as nu when re-weighting.
        ftol: stop once the objective changes by at most ftol times its value.

    Returns:
        The geometric median adapter (in the first state's dtypes) and the iterations run.

    Raises:
        ValueError: no result is finite.
    """
    results = [results[i] for i in finite_results(results)]
    points = torch.stack([flatten(state) for state, _ in results])
    alphas = torch.tensor([float(n) for _, n in results], dtype=torch.float64)
    alphas = alphas / alphas.sum()
    median = (alphas[:, None] * points).sum(0)
    objective = float((alphas * (points - median).norm(dim=1)).sum())
    iterations = 0
    for iterations in range(1, max_iter + 1):
        weights = alphas / (points - median).norm(dim=1).clamp(min=nu)
        median = (weights[:, None] * points).sum(0) / weights.sum()
        new_objective = float((alphas * (points - median).norm(dim=1)).sum())
        if abs(objective - new_objective) <= ftol * new_objective:
            break
        objective = new_objective
    return unflatten(median, results[0][0]), iterations


@register_defense("geomedian")
class GeoMedian(Defense):
    """Geometric median of the uploads by smoothed Weiszfeld iterations, RFA (Pillutla et al. 2022)."""

    needs_individual_updates = True

    def __init__(self, *, max_iter: PositiveInt = 10, nu: PositiveFloat = 1e-6, ftol: NonNegativeFloat = 1e-6):
        """Set the stopping rule and smoothing of the Weiszfeld iterations.

        Args:
            max_iter: at most this many smoothed Weiszfeld iterations per round.
            nu: smoothing: distances to the current estimate below nu count as nu when re-weighting (the paper's
                nu), so an upload at the median does not get infinite weight.
            ftol: stop once the objective changes by at most ftol times its value (relative tolerance); 0 = only
                when it stops changing exactly, else after max_iter.
        """
        self.max_iter, self.nu, self.ftol = max_iter, nu, ftol

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        state, iterations = geometric_median([(u.state, u.num_examples) for u in updates], max_iter=self.max_iter,
                                             nu=self.nu, ftol=self.ftol)
        info.metrics["weiszfeld_iterations"] = iterations
        return state
