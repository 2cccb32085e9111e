"""Norm bounding (Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor Federated
Learning?").

The server clips each client's update (its upload minus the global adapter it started from) to
L2 norm at most `max_norm` before aggregating, so no single client can move the model far. It
changes the updates only, so it composes with any aggregation rule (FedAvg, median, DP-FedAvg).
"""

from __future__ import annotations

from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.common.params import PositiveFloat
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def clip_update(state: AdapterState, reference: AdapterState, *, max_norm: float) -> tuple[AdapterState, float]:
    """`reference + delta * min(1, max_norm / |delta|)` and the update's norm before clipping."""
    delta = flatten(state) - flatten(reference)
    norm = float(delta.norm())
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return unflatten(flatten(reference) + delta * scale, state), norm


@register_defense("norm_bound")
class NormBound(Defense):
    """Norm bounding: clip every client update to an L2 norm before aggregation (Sun et al. 2019)."""

    def __init__(self, *, max_norm: PositiveFloat = 1.0):
        """Set the norm bound.

        Args:
            max_norm: L2 bound of each client update (upload minus the global adapter it started from): a longer
                update is scaled down to it, a shorter one kept.
        """
        self.max_norm = max_norm

    def before_aggregation(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                           info: RoundInfo) -> list[ClientUpdate]:
        clipped, norms = [], []
        for u in updates:
            state, norm = clip_update(u.state, global_state, max_norm=self.max_norm)
            clipped.append(ClientUpdate(client=u.client, state=state, num_examples=u.num_examples))
            norms.append(norm)
        info.metrics["update_norms"] = dict(zip((str(u.client) for u in updates), norms))
        return clipped
