"""RMIA, the relative membership inference attack (Zarifzadeh, Liu and Shokri 2024, "Low-Cost High-Power
Membership Inference Attacks", ICML 2024, arXiv 2312.03262).

A likelihood ratio of x against the population: x is a member when the target raises x's likelihood,
relative to reference models, more than it raises that of most population records z:

    LR(x, z) = (p(x|θ) / p(x)) / (p(z|θ) / p(z)),        score(x) = Pr_{z in Z, z != x}[ LR(x, z) >= gamma ]

with p(x) = the mean of p(x|θ') over the reference models θ'. Online (`variant = "online"`): over every
reference model, IN and OUT of x. Offline: over the OUT ones only, with the paper's linear correction for the
missing IN half, p(x) = ((1 + a) / 2) p_OUT(x) + (1 - a) / 2 (`offline_a`; a = 1 trusts p_OUT as is).

Sequences: p(x|θ) = exp(mean log-prob of x's scored tokens) (the per-token geometric mean), as the authors'
implementation does for language models (privacytrustlab/ml_privacy_meter, `get_signals.get_softmax`). The
product of token probabilities would underflow (hundreds of tokens at ~1e-2 each) and rank records by length
rather than fit: a long record is "less likely" than a short one under every model. The ratios are taken in
log space. gamma = 1 is the authors' implementation's threshold (`modules/mia/attacks/rmia.py`); per-token
likelihood ratios stay close to 1, so a gamma far from it saturates: on the frontier federation
(tests/frontier.py, 4 shadows) gamma = 2 or 0.5 gave every record of the global view the same score (AUC
0.50) where gamma = 1 gave 0.70.

Reference models: LiRA's shadows (`lira.py`), with NO training of its own: the same `shadow_models` and
`epochs` give the same shadow statistics (`lira.shadow_statistics`: `env.cache`, else the on-disk
`lira-shadows-<digest>.safetensors`), each shadow's mean token log-prob of every population record, and
which shadows trained on which record (each record IN for half of them: online RMIA needs IN references).

Z: the attack population `env.population` (members and held-out records mixed, as LiRA's pool; the shadows
scored all of it), each scored x excluded from its own Z by record id (its LR against itself is 1).

Threat model: black-box likelihoods of any view (global, upload, client), plus LiRA's: the population and
the target's training recipe for the shadows. Cost per view: one forward pass of the view over Z (the
population; it holds the scored records, so their statistics come from the same pass). Per run: LiRA's
shadows (`shadow_models` fine-tunes), once, shared with LiRA, or none when LiRA's already exist.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import numpy as np
from scipy.special import logsumexp

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.attacks.membership.lira import check_env, population_columns, shadow_statistics
from fedleak.attacks.membership.stats import shared_stats
from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveFloat, PositiveInt, Range
from fedleak.federated.data import Record

ONLINE, OFFLINE = "online", "offline"


def reference_log_likelihood(shadow_stats: np.ndarray, in_mask: np.ndarray, *, variant: str = ONLINE,
                             offline_a: float = 0.3) -> np.ndarray:
    """log p(x) of every population record from the shadows' mean token log-probs [S, N]: log of the mean
    of exp(statistic) over every shadow (online), or over the OUT shadows with the linear correction
    ((1 + a) / 2) p_OUT + (1 - a) / 2 (offline)."""
    stats = np.asarray(shadow_stats, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    if variant == ONLINE:
        return logsumexp(stats, axis=0) - np.log(len(stats))
    if variant != OFFLINE:
        raise ValueError(f"variant {variant!r}")
    out = ~in_mask
    n = out.sum(0)
    if (n < 1).any():
        raise FedleakError(f"attack rmia: {int((n < 1).sum())} records have no OUT shadow: raise shadow_models")
    p_out = np.where(out, np.exp(stats), 0.0).sum(0) / n
    return np.log((1 + offline_a) / 2 * p_out + (1 - offline_a) / 2)


def rmia_scores(obs: np.ndarray, shadow_stats: np.ndarray, in_mask: np.ndarray, *, columns: np.ndarray,
                variant: str = ONLINE, gamma: float = 1.0, offline_a: float = 0.3) -> np.ndarray:
    """RMIA scores of the records at `columns` of the population.

    Args:
        obs: [N] the target's mean token log-prob of every population record (log p(.|θ); Z is the population).
        shadow_stats, in_mask: [S, N] the reference models' statistics of the same records and their IN mask.
        columns: [n] the scored records' indices in the population; each is left out of its own Z.

    Returns:
        [n] the fraction of z in Z minus x with LR(x, z) >= gamma, in [0, 1].
    """
    obs = np.asarray(obs, dtype=np.float64)
    columns = np.asarray(columns, dtype=int)
    if obs.ndim != 1 or np.shape(shadow_stats) != np.shape(in_mask) or np.shape(shadow_stats)[1:] != obs.shape:
        raise ValueError(f"shapes differ: obs {obs.shape}, shadow_stats {np.shape(shadow_stats)}, "
                         f"in_mask {np.shape(in_mask)}")
    if len(obs) < 2:
        raise FedleakError("attack rmia: the population holds fewer than 2 records: Z would be empty")
    ratio = obs - reference_log_likelihood(shadow_stats, in_mask, variant=variant, offline_a=offline_a)
    wins = ratio[columns, None] - ratio[None, :] >= np.log(gamma)  # [n, N]: log LR(x, z) >= log gamma
    wins[np.arange(len(columns)), columns] = False  # z = x is not a population sample for x
    return wins.sum(1) / (len(obs) - 1)


@register_attack("rmia")
class RMIAAttack(MembershipAttack):
    """RMIA: the target's likelihood ratio of x against population records z, over LiRA's shadows (Zarifzadeh
    et al. 2024)."""

    def __init__(self, *, shadow_models: Annotated[int, Range(ge=2)] = 4,
                 variant: Literal["online", "offline"] = ONLINE, gamma: PositiveFloat = 1.0,
                 offline_a: Annotated[float, Range(ge=0, le=1)] = 0.3, epochs: PositiveInt | None = None):
        """Set the reference models (LiRA's shadows) and the test.

        Args:
            shadow_models: LiRA's shadow models read as reference models; the same value (and `epochs`) as a
                `lira` entry of the run reuses its shadows: no model is trained then.
            variant: "online": p(x) over every shadow (IN and OUT of x); "offline": over the OUT shadows with
                the linear correction `offline_a`.
            gamma: the threshold on LR(x, z) (1: x's likelihood gained more than z's); keep it near 1: ratios of
                per-token probabilities are, and a gamma far from 1 scores every record alike.
            offline_a: a in p(x) = ((1 + a) / 2) p_OUT(x) + (1 - a) / 2 (offline only): how much of p_OUT the
                missing IN models keep (1: all; the authors' implementation tunes it on a pair of reference models).
            epochs: epochs of each shadow fine-tune, as in `lira`; unset: the target's training epochs.
        """
        self.shadow_models = shadow_models
        self.variant = variant
        self.gamma = gamma
        self.offline_a = offline_a
        self.epochs = epochs

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """RMIA scores of `records` (see `MembershipAttack.score`), in [0, 1].

        Raises:
            FedleakError: a record is not in `target.env.population`, or the environment cannot provide
                LiRA's shadows (no population, base model or train settings).
        """
        env = check_env(target.env, "rmia")
        columns = population_columns(env, records, "rmia")
        shadows = shadow_statistics(target, shadow_models=self.shadow_models, epochs=self.epochs, attack="rmia")
        obs = -shared_stats(target, env.population).loss  # Z's pass; it holds the scored records too
        return rmia_scores(obs, shadows.stats, shadows.in_mask, columns=columns, variant=self.variant,
                           gamma=self.gamma, offline_a=self.offline_a)
