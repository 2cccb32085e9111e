"""Centred clipping (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust Optimization",
ICML 2021, arXiv 2012.10333).

The server clips every client's update around a centre instead of around zero, starting from the previous
round's aggregate update (the history a Byzantine client cannot rewrite in one round), and moves the centre by
the mean of the clipped differences, `iterations` times:

    v_0 = the previous round's aggregate update (0 in round 1),      d_i = upload_i - start
    v_{l+1} = v_l + (1/n) sum_i (d_i - v_l) min(1, tau / ||d_i - v_l||)
    new global = start + v_L

Each client moves the aggregate by at most tau / n per iteration, however far its update lies, and honest
updates near the centre pass unclipped. Unweighted by example counts, as in the paper. The centre is carried
from round to round of one training (reset at round 1); with client sampling it is the aggregate of whoever
took part. An upload with a NaN or an infinity is left out; the round loop refuses such uploads before any rule
sees them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.common.params import PositiveFloat, PositiveInt
from fedleak.defenses.base import Defense, register_defense, round_start, update_rows
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.federated.hooks import ClientUpdate, RoundInfo


def centered_clip(results: Sequence[tuple[AdapterState, int]], start: AdapterState, *, tau: float,
                  iterations: int = 1, center: torch.Tensor | None = None) -> tuple[AdapterState, torch.Tensor, list[int]]:
    """The centred-clipping aggregate (Karimireddy et al. 2021).

    Args:
        results: (upload, num_examples) pairs; counts are ignored, non-finite uploads left out.
        start: the global adapter the round's clients started from (each update is upload - start).
        tau: the clipping radius around the centre, in the updates' L2 norm.
        iterations: clipping steps L.
        center: the starting centre v_0 as one flattened float64 vector (`federated.adapters.flatten` order);
            None: zero.

    Returns:
        The new global adapter (start + v_L, in the first upload's dtypes), v_L itself (the next round's v_0), and
        the indices into `results` whose update was clipped in the last iteration.

    Raises:
        ValueError: no results, or none finite.
    """
    kept, base, deltas = update_rows(results, start)
    v = torch.zeros_like(base) if center is None else center.to(torch.float64).clone()
    clipped: list[int] = []
    for _ in range(iterations):
        diff = deltas - v
        norms = diff.norm(dim=1)
        scale = torch.clamp(tau / norms.clamp_min(torch.finfo(torch.float64).tiny), max=1.0)
        v = v + (diff * scale[:, None]).mean(dim=0)
        clipped = [kept[i] for i in torch.nonzero(norms > tau).flatten().tolist()]
    return unflatten(base + v, results[kept[0]][0]), v, clipped


@register_defense("centered_clip")
class CenteredClip(Defense):
    """Centred clipping: clip each update around the previous aggregate update (Karimireddy et al. 2021)."""

    needs_individual_updates = True

    def __init__(self, *, tau: PositiveFloat = 1.0, iterations: PositiveInt = 1):
        """Set the clipping radius and steps.

        Args:
            tau: clipping radius around the centre, in the L2 norm of an update (upload minus the round's starting
                global adapter): an update farther than tau from the centre counts for a difference of length tau.
            iterations: clipping steps per round (the paper's L; it uses 1 with its momentum centre).
        """
        self.tau = tau
        self.iterations = iterations
        self._center: torch.Tensor | None = None

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        if info.round == 1:
            self._center = None  # a new training: no history yet
        center = self._center
        start = round_start(info, self.name)
        if center is not None and center.numel() != flatten(start).numel():
            center = None  # another adapter's history (a component reused across trainings): start afresh
        state, self._center, clipped = centered_clip([(u.state, u.num_examples) for u in updates], start,
                                                     tau=self.tau, iterations=self.iterations, center=center)
        info.metrics["centered_clip_clipped"] = [updates[i].client for i in clipped]
        return state
