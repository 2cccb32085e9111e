"""DP-FedAvg, user-level differential privacy at the server (McMahan, Ramage, Talwar and Zhang 2018,
"Learning Differentially Private Recurrent Language Models").

Each client's update (upload minus the global adapter) is clipped to L2 norm `clip_norm`; the
server adds Gaussian noise with std `noise_multiplier * clip_norm` to the sum and divides by the
expected number of clients per round (the fixed-denominator estimator; updates are unweighted).
Privacy is accounted by Opacus's RDP accountant with sampling rate = clients per round / total
clients and one step per round (a round whose aggregation runs); the epsilon, sample rate and
accounted steps after each round are in that round's metrics. It takes no target epsilon, so
there is no noise to solve: what it charges is what it reports. Our
client sampling is a fixed-size draw without replacement, which the Poisson analysis approximates,
as in the paper. Clipping is a client-side operation in the protocol, so it composes with secure
aggregation.
"""

from __future__ import annotations

import torch

from fedleak.defenses.base import Defense, register_defense
from fedleak.defenses.norm_bound import clip_update
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.common.params import NonNegativeFloat, OpenUnitInterval, PositiveFloat
from fedleak.federated.hooks import ClientUpdate, RoundInfo


@register_defense("dp_fedavg")
class DPFedAvg(Defense):
    """DP-FedAvg: clip each client update, add Gaussian noise to the sum at the server (McMahan et al. 2018)."""

    def __init__(self, *, noise_multiplier: NonNegativeFloat = 1.0, clip_norm: PositiveFloat = 1.0,
                 delta: OpenUnitInterval = 1e-5):
        """Set the server-side clipping and noise of DP-FedAvg.

        Args:
            noise_multiplier: std of the Gaussian noise added to the sum of clipped updates, in units of clip_norm
                (the paper's z); 0 = clipping only, no privacy (epsilon reported as inf).
            clip_norm: L2 bound each client update (upload minus global adapter) is clipped to (the paper's S).
            delta: the delta at which the RDP accountant reports each round's epsilon.
        """
        self.noise_multiplier, self.clip_norm, self.delta = noise_multiplier, clip_norm, delta
        self.accountant = None
        self._reference: AdapterState | None = None

    def before_aggregation(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                           info: RoundInfo) -> list[ClientUpdate]:
        self._reference = global_state
        return [ClientUpdate(client=u.client, state=clip_update(u.state, global_state, max_norm=self.clip_norm)[0],
                             num_examples=u.num_examples) for u in updates]

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        from opacus.accountants import RDPAccountant

        reference = flatten(self._reference)
        total = sum(flatten(u.state) - reference for u in updates)
        noise = torch.normal(0.0, self.noise_multiplier * self.clip_norm, size=reference.shape,
                             generator=info.generator, dtype=torch.float64)
        expected = len(info.clients)
        if self.accountant is None:
            self.accountant = RDPAccountant()
        # The rate and the one step per round are what this accountant is charged, and all it is charged.
        sample_rate = expected / info.num_clients_total
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        info.metrics["epsilon"] = float(self.accountant.get_epsilon(self.delta)) if self.noise_multiplier > 0 \
            else float("inf")
        info.metrics["delta"] = self.delta
        info.metrics["sample_rate"] = sample_rate
        info.metrics["accounted_steps"] = sum(steps for _, _, steps in self.accountant.history)
        return unflatten(reference + (total + noise) / expected, self._reference)
