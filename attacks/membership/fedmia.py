"""FedMIA (Zhu, Li, Gu, Yao, Fan and Han 2024, "FedMIA: An Effective Membership Inference Attack Exploiting 'All
for One' Principle in Federated Learning", arXiv 2402.06289; code: github.com/Liar-Mask/FedMIA).

Client datasets are disjoint, so every other client's upload is a model that never trained on the target
client's records: across clients it samples the record's non-member distribution, for free. For a record x,
client i (the target) and each round t of 1..r in which i and at least one other client uploaded:

    s_k(x, t)   = the record's statistic under client k's round-t upload, higher = more member-like:
                  "loss":   -(mean token loss of x) under upload_k(t)                       (FedMIA-I)
                  "cosine": cos(-g(x), Delta_k(t)), g at global(t - 1), Delta_k(t) = upload_k(t) - global(t - 1)
                                                                                            (FedMIA-II)
    mu, sigma^2 = mean and variance of s_k(x, t) over the other clients k != i (per record, ddof = 0 as
                  the authors' code; `global_variance`: the variance pooled over the scored records)
    p_t(x)      = Phi((s_i(x, t) - mu) / sigma)      one-sided test of the null "x is not in client i's data"
    score(x)    = mean over the rounds of p_t(x)     (the paper's averaged score over communication rounds)

Higher = member. The paper's statistic for classifiers is the hinge (logit margin) or the gradient cosine;
for a language model the loss statistic is the mean token log-prob, as LiRA here (`lira.py`).

Threat model: an honest-but-curious server that sees every client's individual upload of every round
(`attacks/updates.py`): valid on `upload/i` views only, round >= 1. Secure aggregation hides the uploads,
and with one client there is no reference: both raise FedleakError. Under FEDIT a client's later uploads
start from a global adapter that holds the target's earlier updates, so the reference clients' statistics
are pulled toward member-like values too; the test stays one-sided against that reference. Round 0 has no
upload: NaN scores. There is no blind baseline (the base model has no upload to read): none is recorded.

Cost: "loss": one forward pass of the candidates per (client, round) upload of rounds 1..r, batched by
length (`compute_stats`) and cached per upload and record in `env.cache`, so the views of one training
share them (the target's own upload reuses the view's shared pass); "cosine": one forward plus one backward
per record per round (`record_gradients`), shared with `update_gradient` (`round_gradients`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from scipy.special import ndtr

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.attacks.membership.stats import compute_stats, shared_stats
from fedleak.attacks.membership.update_gradient import (cosines, record_key, round_gradients)
from fedleak.attacks.updates import UPLOAD, ServerRecord, server_of
from fedleak.common.errors import FedleakError
from fedleak.federated.checkpoint import view_key
from fedleak.federated.data import Record

LOSS, COSINE = "loss", "cosine"
CURRENT, ALL = "current", "all"
MIN_VARIANCE = 1e-12  # floor for a variance of exactly 0 (identical reference statistics)


def fedmia_scores(observed: np.ndarray, reference: np.ndarray, *, global_variance: bool = False) -> np.ndarray:
    """FedMIA's per-round probabilities and their mean over rounds.

    Args:
        observed: [T, N] the target client's statistic of each record in each round (higher = member-like).
        reference: [T, K, N] the other clients' statistics (K >= 1 per round; NaN where a client did not
            upload that round).
        global_variance: pool each round's variance over the N records instead of one per record.

    Returns:
        [N] the mean over rounds of Phi((observed - mu) / sigma), mu and sigma^2 the mean and (ddof = 0)
        variance of the reference over clients.
    """
    observed = np.asarray(observed, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 3 or observed.shape != (reference.shape[0], reference.shape[2]):
        raise ValueError(f"shapes differ: observed {observed.shape}, reference {reference.shape}")
    mu = np.nanmean(reference, axis=1)
    var = np.nanvar(reference, axis=1)
    if global_variance:
        var = np.repeat(var.mean(axis=1, keepdims=True), var.shape[1], axis=1)
    probabilities = ndtr((observed - mu) / np.sqrt(np.maximum(var, MIN_VARIANCE)))
    return probabilities.mean(axis=0)


def upload_statistics(target: Target, server: ServerRecord, records: Sequence[Record], rnd: int,
                      client: int) -> np.ndarray:
    """-(mean token loss) of `records` under client `client`'s round-`rnd` upload; cached per upload and record
    in `env.cache` (the view's without an environment), so every view of the training shares the passes."""
    view = view_key(UPLOAD, client)
    home = target.env.cache if target.env is not None else target.cache
    cache = home.setdefault(("fedmia-loss", str(server.training_dir), rnd, view, target.max_length,
                             target.response_only), {})
    unique = {record_key(r): r for r in records}
    missing = [r for k, r in unique.items() if k not in cache]
    if missing:
        if (target.observer, target.client, target.round) == (UPLOAD, client, rnd):
            missing = list(records)  # the view's own model: the pass LOSS and the other logit attacks share
            stats = shared_stats(target, missing)
        else:
            with server.viewing(target, server.state(rnd, view)):
                stats = compute_stats(target.model, target.tokenizer, missing, max_length=target.max_length,
                                      response_only=target.response_only, batch_size=target.batch_size,
                                      progress=target.env is not None and target.env.progress)
        cache.update({record_key(r): -loss for r, loss in zip(missing, stats.loss)})
    return np.array([cache[record_key(r)] for r in records])


@register_attack("fedmia")
class FedMIAAttack(MembershipAttack):
    """FedMIA: the target client's statistic against the other clients' uploads as the non-member reference,
    one-sided Gaussian test averaged over rounds (Zhu et al. 2024)."""

    access = "updates"
    observers = (UPLOAD,)
    observers_why = "FedMIA compares one client's upload with the other clients' uploads"

    def __init__(self, *, statistic: Literal["loss", "cosine"] = LOSS, global_variance: bool = False,
                 history: Literal["current", "all"] = ALL):
        """Set the statistic, the variance and the rounds.

        Args:
            statistic: "loss": the record's mean token log-prob under each client's upload (FedMIA-I);
                "cosine": cos(-g, Delta_k) of the record's gradient at the round's start with each client's
                update (FedMIA-II).
            global_variance: false: each record's variance over the other clients (the paper's); true: one
                variance per round pooled over the scored records (steadier with few clients).
            history: "all": average over rounds 1..r (the paper's "all for one" over time); "current": the
                view's round only.
        """
        self.statistic = statistic
        self.global_variance = global_variance
        self.history = history

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """FedMIA scores in [0, 1] (see `MembershipAttack.score`).

        Raises:
            FedleakError: the view is not a client's upload, secure aggregation hides the uploads, no other
                client uploaded alongside the target, or the target carries no checkpoints.
        """
        if target.observer != UPLOAD:
            raise FedleakError(f"attack fedmia: observer {target.observer!r}: FedMIA tests a client's upload "
                               f"against the other clients' uploads: list it under observers = [\"upload\"]")
        server = server_of(target, "fedmia")
        if server.hides_uploads:
            raise FedleakError("attack fedmia: secure aggregation hides the clients' individual uploads, which "
                               "FedMIA compares: attack that training with update_gradient on the global view")
        if target.round < 1:
            return np.full(len(records), np.nan)  # round 0: no upload yet
        wanted = [target.round] if self.history == CURRENT else range(1, target.round + 1)
        plan = []  # (round, the other clients that uploaded alongside the target)
        for t in wanted:
            uploaded = [c for c in server.clients(t) if server.available(t, view_key(UPLOAD, c))]
            others = [c for c in uploaded if c != target.client]
            if target.client in uploaded and others:
                plan.append((t, others))
        if not plan:
            raise FedleakError(f"attack fedmia: no other client's upload accompanies client {target.client}'s up "
                               f"to round {target.round}: FedMIA needs at least 2 clients per round")
        width = max(len(others) for _, others in plan)
        observed = np.empty((len(plan), len(records)))
        reference = np.full((len(plan), width, len(records)), np.nan)
        for i, (t, others) in enumerate(plan):
            if self.statistic == LOSS:
                observed[i] = upload_statistics(target, server, records, t, target.client)
                for j, c in enumerate(others):
                    reference[i, j] = upload_statistics(target, server, records, t, c)
            else:
                cache, dots, norms = round_gradients(target, server, records, t)
                row = cache.index(t, view_key(UPLOAD, target.client))
                observed[i] = cosines(dots[:, row], norms, cache.norms_of_rows[row])
                for j, c in enumerate(others):
                    row = cache.index(t, view_key(UPLOAD, c))
                    reference[i, j] = cosines(dots[:, row], norms, cache.norms_of_rows[row])
        return fedmia_scores(observed, reference, global_variance=self.global_variance)
