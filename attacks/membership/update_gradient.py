"""Update-gradient alignment: a curious server tests whether a record's gradient points where an update went.

Local training moves the shared adapter against its records' gradients, so a member's gradient at the round's
starting point, g(x) = grad of x's mean token loss with respect to the shared LoRA tensors at global(r - 1),
aligns with the update that round produced, Delta = adapter(r) - global(r - 1); a non-member's aligns only as
far as the domain is shared. Two scores:

    cosine:      cos(-g(x), Delta)                          (SGD steps along -g)
    projection:  ||P_U g(x)|| / ||g(x)||,  U = span{Delta(1), ..., Delta(r)}

Cosine: Li, Li and Ribeiro 2023, "Effective Passive Membership Inference Attacks in Federated Learning against
Overparameterized Models" (ICLR; gradients of overparameterised models behave like near-orthogonal random
vectors, so a member's stands out in the update), the measurement FedMIA-II tests per client (Zhu et al. 2024,
arXiv 2402.06289, `fedmia.py`). Projection: the share of the gradient inside the subspace the updates span, in
the spirit of ProjRes (Deng, Chen, Luo, Liu, Wang, Cai, Liu, Jia and Fu 2026, "Toward Efficient Membership
Inference Attacks against Federated Large Language Models: A Projection Residual Approach", arXiv 2604.21197,
which projects hidden embeddings onto the gradient subspace; here the record's own gradient is projected onto
the view's update subspace). U's orthonormal basis comes from the SVD of the update matrix, through its Gram
matrix, so the cached dots g . Delta_j are all each record needs. `history = "all"` averages the score over
rounds 1..r, each round's gradient taken at its own starting point global(t - 1).

Threat model: an honest-but-curious server holding the training's checkpoints (`attacks/updates.py`). On an
`upload/i` view the target is client i's update (what the server receives without secure aggregation); on the
`global` view it is the aggregate global(r) - global(r - 1), all a server learns under secure aggregation, so
the attack stays valid there (against the union of the sampled clients' records). Not on `client/i`: a
client's own model is not a server view. Round 0 has no update: NaN scores (the cell's metrics are undefined).
There is no blind baseline (the base model has no update to read): `eval/attacking.py` records none.

Local training here is AdamW, which rescales coordinates: the update is not -lr * sum g, so the alignment is a
correlation, not the exact sum a plain-SGD client would send.

Cost: one forward plus one backward per record per round used (1 with `history = "current"`, r with "all"),
batch 1 (`record_gradients`), plus host memory for the round's update matrix: (clients + 1) x t rows of the
adapter's size in float64. Gradients are reduced to their dots with every update of rounds 1..t on the fly and
cached per round and record in `env.cache`, so every view and update attack of the training (FedMIA's cosine
statistic included) shares one backward per record and round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.attacks.updates import GLOBAL, UPLOAD, ServerRecord, flat, record_gradients, server_of
from fedleak.common.errors import FedleakError
from fedleak.federated.checkpoint import view_key
from fedleak.federated.data import Record

COSINE, PROJECTION = "cosine", "projection"
CURRENT, ALL = "current", "all"
RANK_TOLERANCE = 1e-6  # singular values below this share of the largest span no direction (float64 Gram)


def record_key(record: Record) -> tuple:
    """What identifies a record in a cache (its id and its content: ids can repeat across record sets)."""
    return record.record_id, hash(record)


@dataclass
class RoundGradients:
    """Per-record gradients at global(rnd - 1) reduced to their dots with every update of rounds 1..rnd.

    `rows` names the updates ((round, view), view "global" = the aggregate, "upload/i" = client i's), `gram`
    their inner products [M, M]; `stats` maps a record key to (dots [M], gradient norm)."""

    rows: tuple[tuple[int, str], ...]
    gram: np.ndarray
    norms_of_rows: np.ndarray
    stats: dict = field(default_factory=dict)

    def index(self, rnd: int, view: str) -> int:
        return self.rows.index((rnd, view))


def _round_rows(server: ServerRecord, rnd: int) -> list[tuple[int, str]]:
    """Every update the server holds from rounds 1..rnd: the aggregate and each upload."""
    rows = []
    for t in range(1, rnd + 1):
        for view in [GLOBAL] + [view_key(UPLOAD, c) for c in server.clients(t)]:
            if server.available(t, view):
                rows.append((t, view))
    return rows


def round_gradients(target: Target, server: ServerRecord, records: Sequence[Record], rnd: int) -> tuple[
        RoundGradients, np.ndarray, np.ndarray]:
    """(the round's cache, dots [N, M], norms [N]) of `records`' gradients at global(rnd - 1); a backward pass
    only for records not cached yet. Cached in `env.cache` (the view's without an environment) per training,
    round and scoring settings, so every view and attack of the training shares them."""
    home = target.env.cache if target.env is not None else target.cache
    key = ("update-gradients", str(server.training_dir), rnd, target.max_length, target.response_only)
    cache: RoundGradients | None = home.get(key)
    rows = cache.rows if cache is not None else tuple(_round_rows(server, rnd))
    unique = {record_key(r): r for r in records}
    missing = [r for k, r in unique.items() if cache is None or k not in cache.stats]
    if cache is None or missing:
        start = server.state(rnd - 1, GLOBAL)
        keys = sorted(start)
        basis = torch.stack([flat(server.update(t, view), keys) for t, view in rows])  # [M, P] float64
        if cache is None:
            cache = home[key] = RoundGradients(rows, (basis @ basis.T).numpy(), basis.norm(dim=1).numpy())
        if missing:
            with server.viewing(target, start):
                dots, norms = record_gradients(target.model, target.tokenizer, missing, basis, keys=keys,
                                               max_length=target.max_length, response_only=target.response_only)
            cache.stats.update({record_key(r): (d, n) for r, d, n in zip(missing, dots, norms)})
    found = [cache.stats[record_key(r)] for r in records]
    return cache, np.array([d for d, _ in found]).reshape(len(records), len(cache.rows)), np.array([n for _, n in found])


def cosines(dots: np.ndarray, norms: np.ndarray, row_norm: float) -> np.ndarray:
    """cos(-g, Delta) from g . Delta, ||g|| and ||Delta||; 0 where either vector is zero (no direction)."""
    denominator = norms * row_norm
    return np.divide(-dots, denominator, out=np.zeros_like(dots, dtype=np.float64), where=denominator > 0)


def projection_share(dots: np.ndarray, gram: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """||P_U g|| / ||g|| for each row of `dots` [N, K] = g . Delta_k, U = span of the K updates with Gram matrix
    `gram` [K, K].

    The update matrix A [P, K] = W S V^T (thin SVD) gives A^T A = V S^2 V^T, so the orthonormal basis W of U
    satisfies W^T g = S^-1 V^T (A^T g): the dots and the Gram matrix suffice. Directions with a singular value
    below RANK_TOLERANCE of the largest are dropped (a repeated update adds no dimension). 0 where g = 0."""
    eigenvalues, vectors = np.linalg.eigh(gram)
    singular = np.sqrt(np.clip(eigenvalues, 0.0, None))
    keep = singular > RANK_TOLERANCE * singular.max(initial=0.0)
    coordinates = (dots @ vectors[:, keep]) / singular[keep]
    inside = np.sqrt((coordinates ** 2).sum(1))
    return np.divide(inside, norms, out=np.zeros_like(inside), where=norms > 0)


def view_of(target: Target) -> str:
    """The checkpoint view key of the target ("global" or "upload/i")."""
    return GLOBAL if target.observer == GLOBAL else view_key(target.observer, target.client)


@register_attack("update_gradient")
class UpdateGradientAttack(MembershipAttack):
    """How well a record's gradient at the round's start explains the view's update (Li et al. 2023; ProjRes)."""

    access = "updates"
    observers = (GLOBAL, UPLOAD)
    observers_why = "a client's own model is not a server view"

    def __init__(self, *, similarity: Literal["cosine", "projection"] = COSINE,
                 history: Literal["current", "all"] = CURRENT):
        """Set the similarity and the rounds it reads.

        Args:
            similarity: "cosine": cos(-g, Delta) with the view's update of the round; "projection": the share
                of g's norm inside the span of the view's updates of rounds 1..t (sign-blind).
            history: "current": the view's round r only (one backward per record); "all": the mean of the
                per-round scores over rounds 1..r, each with the gradient at that round's start (r backwards).
        """
        self.similarity = similarity
        self.history = history

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """Alignment scores (see `MembershipAttack.score`): higher = the record explains more of the update.

        Raises:
            FedleakError: the target is a client's view, or carries no checkpoints (`Target.server`).
        """
        if target.observer not in (GLOBAL, UPLOAD):
            raise FedleakError(f"attack update_gradient: observer {target.observer!r} is not a server view: list "
                               f"it under observers = [\"global\", \"upload\"] (it reads the server's updates)")
        server = server_of(target, "update_gradient")
        if target.round < 1:
            return np.full(len(records), np.nan)  # round 0 is the initial adapter: no update yet
        view = view_of(target)
        wanted = [target.round] if self.history == CURRENT else list(range(1, target.round + 1))
        used = [t for t in wanted if server.available(t, view)]
        if not used:
            raise FedleakError(f"attack update_gradient: the checkpoints hold no update of {view!r} up to round "
                               f"{target.round}: attack a view the server received")
        per_round = []
        for t in used:
            cache, dots, norms = round_gradients(target, server, records, t)
            if self.similarity == COSINE:
                j = cache.index(t, view)
                per_round.append(cosines(dots[:, j], norms, cache.norms_of_rows[j]))
            else:
                span = [cache.index(s, view) for s in range(1, t + 1) if (s, view) in cache.rows]
                per_round.append(projection_share(dots[:, span], cache.gram[np.ix_(span, span)], norms))
        return np.mean(per_round, axis=0)
