"""DC-PDD (Zhang, Zhang, Guo, de Rijke, Fan and Cheng 2024, "Pretraining Data Detection for Large Language
Models: A Divergence-based Calibration Method", arXiv 2409.14781; code: zhang-wei-chao/DC-PDD).

The target's token probabilities are calibrated by how frequent each token is in a reference corpus.
For a record x with scored tokens x_1..x_n, keep each distinct token's first occurrence (FOS(x)); with
p_i = p(x_i | x_<i) under the target and f(x_i) the token's Laplace-smoothed frequency in the reference
corpus, f(t) = (count(t) + 1) / (sum of counts + |V|):

    alpha_i = min(p_i * log(1 / f(x_i)), a)          (a: the paper's upper bound)
    score(x) = mean of alpha_i over FOS(x)

Higher = member (the official code and MIMIR negate it because they rank lower = member). A token the
model predicts far more confidently than its corpus frequency warrants is evidence the model saw x; the
cap keeps a few such tokens from dominating, and first occurrences keep a repeated token from counting
twice.

The reference corpus is the attacker's public pool (`AttackEnvironment.public`: records no model of the
run trained on, from the targets' domain) in the training format, tokenised with the target's tokenizer;
its scored tokens (the responses under response-only training, what the target's scores look at) are
counted, all occurrences, as the paper counts its corpus. The table is built once per run (`env.cache`).

The cap: the official code's default is a = 0.01, for 50k-token vocabularies and pretrained models whose
token probabilities are mostly small. A fine-tuned model puts most of its response tokens near p = 1, and
with the embedded model's 1.5k tokens log(1 / f) runs from about 2.5 to 10, so a = 0.01 clips nearly every
token and the score degenerates to the share of near-impossible tokens. Mean AUC over the global and
three upload views (FEDIT/none, round 3): on the tests' federation (tests/frontier.py) a = 0.01, 0.1,
0.5, 1, 2, 100 give 0.71, 0.61, 0.64, 0.72, 0.71, 0.68 (LOSS 0.72); on the demo's training
(configs/quick.toml) a = 0.01 gives 0.53 and a = 1 0.68 (LOSS 0.69). Hence the default a = 1.

Threat model: black-box, any view whose token log-probs the attacker can read (global, upload, client),
any round.

Cost: no forward pass of its own: it reads the target statistics LOSS and the other logit scores share
(`TokenStats.logp` and `ids`); the frequency table tokenises the public pool once per run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.attacks.membership.stats import TokenStats, shared_stats
from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveFloat
from fedleak.federated.batching import IGNORE
from fedleak.federated.data import Record
from fedleak.federated.training import encode


def smoothed_frequencies(counts: np.ndarray) -> np.ndarray:
    """Laplace smoothing: (count + 1) / (total + vocabulary size), so an unseen token has a finite log."""
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + 1.0) / (counts.sum() + len(counts))


def dc_pdd_score(stats: TokenStats, frequencies: np.ndarray, *, a: float) -> np.ndarray:
    """Mean over each record's first occurrences of min(p * log(1 / f), a); NaN for a record with no token."""
    out = np.full(len(stats.logp), np.nan)
    surprise = -np.log(frequencies)
    for i, (ids, logp, keep) in enumerate(zip(stats.ids, stats.logp, stats.mask)):
        ids, logp = ids[keep], logp[keep]
        if not len(ids):
            continue
        _, first = np.unique(ids, return_index=True)  # the index of each distinct token's first occurrence
        out[i] = np.minimum(np.exp(logp[first]) * surprise[ids[first]], a).mean()
    return out


def vocabulary_size(target: Target) -> int:
    """Rows of the frequency table: the model's vocabulary (its config, which may pad the tokenizer's)."""
    config = getattr(target.model, "config", None)
    return max(len(target.tokenizer), int(getattr(config, "vocab_size", 0) or 0))


def token_counts(target: Target, size: int) -> np.ndarray:
    """Occurrences of each token among the scored tokens of the attacker's public pool, cached per run."""
    env = target.env
    if env is None:
        raise FedleakError("attack dc_pdd: the target has no AttackEnvironment: its public pool gives the token "
                           "frequencies")
    if not env.public:
        raise FedleakError("attack dc_pdd: the attacker's public pool is empty: set attack.public_records > 0 or "
                           "attack.public_file")
    key = ("dc_pdd-counts", tuple(r.record_id for r in env.public), tuple(hash(r) for r in env.public),
           target.max_length, target.response_only, size)
    if key not in env.cache:
        counts = np.zeros(size, dtype=np.int64)
        for e in encode(env.public, target.tokenizer, max_length=target.max_length, response_only=target.response_only):
            scored = [t for t in e.labels[1:] if t != IGNORE]  # the tokens a score of this record would read
            np.add.at(counts, np.asarray(scored, dtype=np.int64), 1)
        env.cache[key] = counts
    return env.cache[key]


@register_attack("dc_pdd")
class DCPDDAttack(MembershipAttack):
    """DC-PDD: token probabilities calibrated by public-pool token frequencies (Zhang et al. 2024)."""

    def __init__(self, *, a: PositiveFloat = 1.0):
        """Set the cap.

        Args:
            a: upper bound on each token's calibrated score p * log(1 / f) (the paper's a).
        """
        self.a = a

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """`dc_pdd_score` over the shared target statistics (see the module docstring)."""
        frequencies = smoothed_frequencies(token_counts(target, vocabulary_size(target)))
        stats = shared_stats(target, records)
        if stats.ids is None:
            raise FedleakError("attack dc_pdd: the target statistics carry no token ids (TokenStats.ids): compute "
                               "them with stats.compute_stats")
        return dc_pdd_score(stats, frequencies, a=self.a)
