"""Robust learning rate (Ozdayi, Kantarcioglu and Gel 2021, "Defending against Backdoors in Federated Learning
with Robust Learning Rate", AAAI 2021, arXiv 2007.03767).

The server counts, coordinate by coordinate, the signs of the clients' updates d_i = upload_i - start and
reverses its learning rate where too few of them agree:

    eta_k = +eta  if |sum_i sign(d_i,k)| >= threshold  else  -eta
    new global = start + eta (.) sum_i n_i d_i / sum_i n_i          ((.): coordinate-wise product)

A backdoor needs coordinates the honest majority does not push: there the signs disagree, and the step moves
against the attacker instead of with it. With every coordinate agreed the rule is FedAvg scaled by eta. Under
LoRA the coordinates are the A and B factors' entries, each counted on its own (peft-style FEDIT averages the
factors separately). An upload with a NaN or an infinity is left out; the round loop refuses such uploads
before any rule sees them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveFloat, PositiveInt
from fedleak.defenses.base import Defense, register_defense, round_start, update_rows
from fedleak.federated.adapters import AdapterState, unflatten
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def robust_lr(results: Sequence[tuple[AdapterState, int]], start: AdapterState, *, threshold: int,
              server_lr: float = 1.0) -> tuple[AdapterState, float]:
    """The robust-learning-rate aggregate (Ozdayi et al. 2021).

    Args:
        results: (upload, num_examples) pairs; non-finite uploads are left out.
        start: the global adapter the round's clients started from (each update is upload - start).
        threshold: the sign agreement |sum_i sign(d_i,k)| a coordinate needs to keep +server_lr (the paper's theta).
        server_lr: the server learning rate's magnitude (the paper's eta; 1 = FedAvg where every coordinate agrees).

    Returns:
        The new global adapter (in the first upload's dtypes) and the share of coordinates whose rate was reversed.

    Raises:
        ValueError: no results, or none finite.
    """
    kept, base, deltas = update_rows(results, start)
    weights = torch.tensor([float(results[i][1]) for i in kept], dtype=torch.float64)
    agreement = deltas.sign().sum(dim=0).abs()
    rates = server_lr * (2 * (agreement >= threshold).to(torch.float64) - 1)  # float64: server_lr unrounded
    mean = (weights[:, None] * deltas).sum(dim=0) / weights.sum()
    return unflatten(base + rates * mean, results[kept[0]][0]), float((agreement < threshold).double().mean())


@register_defense("robust_lr")
class RobustLR(Defense):
    """Robust learning rate: reverse the server's step on coordinates whose update signs disagree (Ozdayi et al. 2021)."""

    needs_individual_updates = True

    def __init__(self, *, threshold: PositiveInt = 2, server_lr: PositiveFloat = 1.0):
        """Set the sign agreement and the server's step.

        Args:
            threshold: how many more clients must push a coordinate one way than the other for the server to
                follow (the paper's theta: |sum of the updates' signs| >= threshold); at most the clients per
                round, since a larger one reverses every coordinate.
            server_lr: magnitude of the server's learning rate (the paper's eta): the aggregate update is scaled by
                +server_lr where the clients agree and -server_lr where they do not.
        """
        self.threshold = threshold
        self.server_lr = server_lr

    def check(self, *, clients_per_round: int) -> None:
        if self.threshold > clients_per_round:
            raise FedleakError(f"robust_lr: threshold = {self.threshold} exceeds the {clients_per_round} clients per "
                               f"round, so every coordinate's step would be reversed: lower threshold")

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        state, reversed_share = robust_lr([(u.state, u.num_examples) for u in updates], round_start(info, self.name),
                                          threshold=self.threshold, server_lr=self.server_lr)
        info.metrics["robust_lr_reversed"] = reversed_share
        return state
