"""FoolsGold (Fung, Yoon and Beschastnikh 2020, "The Limitations of Federated Learning in Sybil Settings",
RAID 2020, arXiv 1808.04866).

Sybils that push one poisoned objective send updates that look alike round after round, where honest clients'
data differ. The server keeps each client's history H_i (the sum of its updates upload - start over the rounds it
took part in) and weights each upload by how unlike the others its history is:

    cs_ij = cos(H_i, H_j) (i != j),   v_i = max_j cs_ij
    pardoning: cs_ij <- cs_ij v_i / v_j where v_i < v_j    (an honest client that resembles a sybil less than the
                                                            sybils resemble each other keeps more weight)
    a_i = clip(1 - max_j cs_ij, 0, 1);  a_i <- a_i / max_k a_k;  a_i <- 0.99 where a_i = 1
    w_i = clip(kappa (ln(a_i / (1 - a_i)) + 0.5), 0, 1)
    new global = start + (1/n) sum_i w_i (upload_i - start)

as in the authors' code (github DistributedML/FoolsGold): the weighted sum is divided by n, not by sum_i w_i, so
a round whose uploads are all down-weighted moves the model less. The paper's optional feature-importance
weighting of the output layer is not applied: every LoRA coordinate counts alike. Similarities are computed among
the round's participants (a client never sampled has no history to compare). Unweighted by example counts. The
histories are kept for one training (reset at round 1). An upload with a NaN or an infinity is left out; the
round loop refuses such uploads before any rule sees them. Needs at least 2 clients per round.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveFloat
from fedleak.defenses.base import Defense, register_defense, round_start, update_rows
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def foolsgold_weights(histories: torch.Tensor, *, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client weights in [0, 1] from their update histories (Fung et al. 2020, Algorithm 1).

    Args:
        histories: [n, P] one row per client: the sum of its updates so far (n >= 2; a zero row is similar to
            nothing).
        kappa: the confidence parameter scaling the logit (the paper's kappa).

    Returns:
        [n] float64 weights: 0 for a client whose history (after pardoning) points the same way as another's, 1 for
        the most distinct ones.
    """
    h = histories.to(torch.float64)
    unit = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    n = len(h)
    cs = unit @ unit.T - torch.eye(n, dtype=torch.float64)
    top = cs.max(dim=1).values
    pardon = top[:, None] < top[None, :]  # v_i < v_j: scale cs_ij by v_i / v_j
    cs = torch.where(pardon, cs * top[:, None] / torch.where(top[None, :] == 0, 1.0, top[None, :]), cs)
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)
    if float(alpha.max()) == 0:
        return torch.zeros(n, dtype=torch.float64)  # every history has a twin: nobody is trusted
    alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1, torch.tensor(0.99, dtype=torch.float64), alpha)
    logit = torch.where(alpha > 0, torch.log(alpha / (1 - alpha)), torch.tensor(-math.inf, dtype=torch.float64))
    return (kappa * (logit + 0.5)).clamp(0, 1)


def foolsgold(results: Sequence[tuple[AdapterState, int]], start: AdapterState, histories: torch.Tensor, *,
              kappa: float = 1.0) -> tuple[AdapterState, torch.Tensor, torch.Tensor]:
    """The FoolsGold aggregate of one round (Fung et al. 2020).

    Args:
        results: (upload, num_examples) pairs; counts are ignored, non-finite uploads left out.
        start: the global adapter the round's clients started from (each update is upload - start).
        histories: [len(results), P] each client's history before this round (zeros for a first upload), in the
            order of `results`, flattened as `federated.adapters.flatten` does.
        kappa: the confidence parameter (the paper's kappa).

    Returns:
        The new global adapter (in the first upload's dtypes), the histories after this round (non-finite uploads
        add nothing), and the weights, one per result (0 for a non-finite upload).

    Raises:
        ValueError: fewer than 2 finite results, or none.
    """
    kept, base, deltas = update_rows(results, start)
    if len(kept) < 2:
        raise ValueError(f"foolsgold needs at least 2 finite client updates to compare, got {len(kept)}")
    after = histories.to(torch.float64).clone()
    after[kept] += deltas
    w = foolsgold_weights(after[kept], kappa=kappa)
    weights = torch.zeros(len(results), dtype=torch.float64)
    weights[kept] = w
    return unflatten(base + (w[:, None] * deltas).sum(dim=0) / len(kept), results[kept[0]][0]), after, weights


@register_defense("foolsgold")
class FoolsGold(Defense):
    """FoolsGold: down-weight clients whose update histories look alike (Fung et al. 2020)."""

    needs_individual_updates = True

    def __init__(self, *, kappa: PositiveFloat = 1.0):
        """Set the confidence of the weighting.

        Args:
            kappa: confidence parameter of the logit that turns dissimilarity into a weight (the paper's kappa):
                larger values push weights towards 0 or 1.
        """
        self.kappa = kappa
        self._histories: dict[int, torch.Tensor] = {}

    def check(self, *, clients_per_round: int) -> None:
        if clients_per_round < 2:
            raise FedleakError(f"foolsgold compares clients' update histories: it needs at least 2 clients per round, "
                               f"got {clients_per_round}: raise federation.clients or federation.client_fraction")

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        if info.round == 1:
            self._histories = {}  # a new training
        start = round_start(info, self.name)
        size = flatten(start).numel()
        rows = [self._histories.get(u.client) for u in updates]
        histories = torch.stack([r if r is not None and r.numel() == size else torch.zeros(size, dtype=torch.float64)
                                 for r in rows])
        try:
            state, after, weights = foolsgold([(u.state, u.num_examples) for u in updates], start, histories,
                                              kappa=self.kappa)
        except ValueError as e:
            raise FedleakError(f"foolsgold, round {info.round}: {e}: raise federation.clients or "
                               f"federation.client_fraction") from None
        for u, row in zip(updates, after):
            self._histories[u.client] = row
        info.metrics["foolsgold_weights"] = {str(u.client): float(w) for u, w in zip(updates, weights)}
        info.metrics["excluded_clients"] = [u.client for u, w in zip(updates, weights) if float(w) == 0]
        return state
