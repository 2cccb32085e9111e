"""Norm bounding (Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor Federated
Learning?").

The server clips each client's update (its upload minus the global adapter it started from) to
L2 norm at most `max_norm` before aggregating, so no single client can move the model far. It
changes the updates only, so it composes with any aggregation rule (FedAvg, median, DP-FedAvg).
An update whose norm is not finite (a NaN or an infinity in the upload) cannot be clipped: it is
left out of the round and listed in `norm_bound_refused` (the round loop refuses such uploads first).
"""

from __future__ import annotations

import math

from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.common.params import PositiveFloat
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def clip_update(state: AdapterState, reference: AdapterState, *, max_norm: float) -> tuple[AdapterState, float]:
    """Clip one client update to an L2 norm (Sun et al. 2019).

    Args:
        state: the client's upload.
        reference: the global adapter it started from (the update is `state - reference`).
        max_norm: the bound.

    Returns:
        `reference + delta * min(1, max_norm / |delta|)` and the update's norm before clipping. A
        non-finite norm (NaN or inf in the upload) gives `reference` itself, the zero update: such
        an update carries no usable direction, and scaling it would still be NaN (inf * 0).
    """
    delta = flatten(state) - flatten(reference)
    norm = float(delta.norm())
    if not math.isfinite(norm):
        return unflatten(flatten(reference), state), norm
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
        clipped, norms, refused = [], [], []
        for u in updates:
            state, norm = clip_update(u.state, global_state, max_norm=self.max_norm)
            norms.append(norm)
            if not math.isfinite(norm):  # never pass it on, not even as a zero update that dilutes FedAvg
                refused.append(u.client)
                continue
            clipped.append(ClientUpdate(client=u.client, state=state, num_examples=u.num_examples))
        info.metrics["update_norms"] = dict(zip((str(u.client) for u in updates), norms))
        if refused:
            info.metrics["norm_bound_refused"] = refused
        return clipped
