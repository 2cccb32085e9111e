"""LiRA, the likelihood-ratio attack (Carlini, Chien, Nasr, Song, Terzis and Tramer 2022,
"Membership Inference Attacks From First Principles").

Shadow LoRA fine-tunes of the base model, each on a random half of the attacker's population,
give for every record x the statistic s(x) = mean token log-prob of x under models that trained
on x (IN) and under models that did not (OUT). Across shadows s(x) is roughly Gaussian (a mean of
many token log-probs); it plays the role of the paper's logit-scaled confidence for sequences.
With mu/sigma^2 the mean/variance of each side and obs = s(x) under the target:

    online:  score(x) = log N(obs; mu_in(x), sigma_in^2) - log N(obs; mu_out(x), sigma_out^2)
    offline: score(x) = log Phi((obs - mu_out(x)) / sigma_out)     (OUT shadows only, one-sided)

Higher = member. With few shadows the per-record variances are unreliable, so by default one
pooled variance per side is used for all records (the paper's "fixed variance").

Cost: `shadow_models` LoRA fine-tunes of the target's length, once per run (the statistics are
cached in `env.cache` for every view and, with `env.cache_dir`, on disk for every process and node;
RMIA, `rmia.py`, reads the same shadows through `shadow_statistics`). On 2 CPU cores with the embedded
model (1.24M parameters), a shadow on 90 of 180 population records takes about 16 s at 8 epochs and 1 min
at 32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
import torch
from filelock import FileLock
from scipy.special import log_ndtr

from fedleak.attacks.base import AttackEnvironment, MembershipAttack, Target, register_attack
from fedleak.attacks.membership.stats import compute_stats, shared_stats
from fedleak.federated.data import Record
from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_bytes
from fedleak.common.params import PositiveInt, Range
from fedleak.federated.seeding import derive_seed, numpy_rng, torch_generator
from fedleak.federated.training import encode, train_adapter

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
SHADOW = "lira-shadow"  # the adapter each shadow trains on the target's base weights
MIN_VARIANCE = 1e-12  # floor for a variance estimate of exactly 0 (identical statistics)


def balanced_membership(num_records: int, num_shadows: int, rng: np.random.Generator) -> np.ndarray:
    """IN mask [shadow, record]: each record IN for exactly half of the shadows, each shadow IN on
    half of the records.

    Shadows come in complementary pairs: shadow 2j trains on a seeded random half of the records,
    shadow 2j + 1 on the other half (an odd last shadow on one more random half). So every record
    has both IN and OUT observations (exactly num_shadows / 2 of each when num_shadows is even),
    which online LiRA needs for every record, and every shadow trains on half of the population,
    as large a set as a target trained on half of it.
    """
    mask = np.zeros((num_shadows, num_records), dtype=bool)
    for s in range(0, num_shadows, 2):
        chosen = np.zeros(num_records, dtype=bool)
        chosen[rng.permutation(num_records)[: (num_records + int(rng.integers(2))) // 2]] = True
        mask[s] = chosen
        if s + 1 < num_shadows:
            mask[s + 1] = ~chosen
    return mask


def _side(stats: np.ndarray, mask: np.ndarray, *, global_variance: bool, side: str):
    """Mean per record and variance (pooled over records, or per record) of the masked entries."""
    n = mask.sum(0)
    if (n < 1).any():
        raise FedleakError(f"attack lira: {int((n < 1).sum())} records have no {side} shadow statistic: "
                           f"raise shadow_models")
    mu = np.where(mask, stats, 0.0).sum(0) / n
    sq = np.where(mask, stats - mu[None, :], 0.0) ** 2
    if global_variance:
        dof = int((n - 1).sum())
        if dof > 0:
            # Pooled within-record variance: every record contributes its deviations from its own mean.
            var = np.full(len(n), sq.sum() / dof)
        else:
            # One observation per record (2 shadows): the within-record spread is not identifiable, so
            # fall back to the spread of that side's statistics over all records.
            values = stats[mask]
            var = np.full(len(n), values.var(ddof=1) if values.size > 1 else 0.0)
    else:
        if (n < 2).any():
            raise FedleakError(f"attack lira: per-record variances (global_variance = false) need at least 2 "
                               f"{side} shadows per record, but some records have {int(n.min())}: raise "
                               f"shadow_models (to at least 4) or use global_variance = true")
        var = sq.sum(0) / (n - 1)
    return mu, np.maximum(var, MIN_VARIANCE)


def _log_normal_pdf(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)


def lira_scores(obs: np.ndarray, shadow_stats: np.ndarray, in_mask: np.ndarray, *, variant: str = ONLINE,
                global_variance: bool = True, columns: np.ndarray | None = None) -> np.ndarray:
    """LiRA scores from the target's statistics `obs`, shadow statistics [S, N] and the shadows'
    IN mask [S, N]. Means per record; variances unbiased (ddof = 1), pooled over all N records if
    `global_variance`. `obs[j]` belongs to record `columns[j]` (default: obs covers all N records),
    so a record's score does not depend on which other records are scored with it."""
    obs = np.asarray(obs, dtype=np.float64)
    shadow_stats = np.asarray(shadow_stats, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    columns = np.arange(shadow_stats.shape[1]) if columns is None else np.asarray(columns, dtype=int)
    if shadow_stats.shape != in_mask.shape or shadow_stats.ndim != 2 or obs.shape != columns.shape:
        raise ValueError(f"shapes differ: obs {obs.shape}, columns {columns.shape}, shadow_stats "
                         f"{shadow_stats.shape}, in_mask {in_mask.shape}")
    mu_out, var_out = (a[columns] for a in _side(shadow_stats, ~in_mask, global_variance=global_variance,
                                                   side="OUT"))
    if variant == OFFLINE:
        return log_ndtr((obs - mu_out) / np.sqrt(var_out))
    if variant != ONLINE:
        raise ValueError(f"variant {variant!r}")
    mu_in, var_in = (a[columns] for a in _side(shadow_stats, in_mask, global_variance=global_variance, side="IN"))
    return _log_normal_pdf(obs, mu_in, var_in) - _log_normal_pdf(obs, mu_out, var_out)


@dataclass(frozen=True)
class ShadowStatistics:
    """What the shadows leave behind (run-wide, in `env.cache`): no model is kept."""

    record_ids: tuple[str, ...]
    stats: np.ndarray  # [shadow, record] mean token log-prob of each population record
    in_mask: np.ndarray  # [shadow, record] whether that shadow trained on that record
    seconds: tuple[float, ...]  # wall time of each shadow (fine-tune + population pass)


def write_shadows(path: Path, digest: str, shadows: ShadowStatistics) -> None:
    """Shadow statistics to safetensors (stats float64 [S, N], in_mask uint8 [S, N]; ids and seconds in the
    header), written whole or not at all."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({"stats": np.ascontiguousarray(shadows.stats, dtype=np.float64),
                                   "in_mask": np.ascontiguousarray(shadows.in_mask, dtype=np.uint8)},
                                  metadata={"key": digest, "record_ids": json.dumps(list(shadows.record_ids)),
                                            "seconds": json.dumps(list(shadows.seconds))}))


def read_shadows(path: Path, digest: str) -> ShadowStatistics | None:
    """The shadow statistics saved under `digest`, or None (missing, another key, unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != digest:
                return None
            return ShadowStatistics(tuple(json.loads(meta["record_ids"])), handle.get_tensor("stats"),
                                    handle.get_tensor("in_mask").astype(bool), tuple(json.loads(meta["seconds"])))
    except (OSError, ValueError, KeyError, SafetensorError):  # missing or damaged: train them again
        return None


def check_env(env: AttackEnvironment | None, attack: str = "lira") -> AttackEnvironment:
    """The environment the shadows need (population, base model, LoRA and train settings); `attack` names
    the attack in the error."""
    if env is None:
        raise FedleakError(f"attack {attack}: the target has no attack environment: it needs the population, "
                           f"base_model_ref, adapter and train settings to fine-tune LiRA's shadow models")
    missing = [name for name in ("population", "base_model_ref", "adapter", "train") if not getattr(env, name)]
    if missing:
        raise FedleakError(f"attack {attack}: the attack environment lacks {', '.join(missing)}: LiRA's shadow "
                           f"models are fine-tunes of the base model on the population")
    ids = [r.record_id for r in env.population]
    if len(set(ids)) != len(ids):
        raise FedleakError(f"attack {attack}: the population has duplicate record ids: each record must appear once")
    return env


def population_columns(env: AttackEnvironment, records: Sequence[Record], attack: str = "lira") -> np.ndarray:
    """Each record's column in the shadow statistics (its index in `env.population`).

    Raises:
        FedleakError: a record is not in the population, or differs from the population's record of that id.
    """
    index = {r.record_id: i for i, r in enumerate(env.population)}
    outside = [r.record_id for r in records if r.record_id not in index or env.population[index[r.record_id]] != r]
    if outside:
        raise FedleakError(f"attack {attack}: {len(outside)} scored records are not in the attack population "
                           f"(first: {outside[0]!r}): put every candidate record in env.population, the pool "
                           f"the shadow models are trained on")
    return np.array([index[r.record_id] for r in records], dtype=int)


def train_shadows(env: AttackEnvironment, model, tokenizer, *, shadow_models: int, epochs: int | None,
                  max_length: int, response_only: bool) -> ShadowStatistics:
    """Fine-tune `shadow_models` LoRA adapters on balanced random halves of the population and
    return each one's statistic on the whole population. Deterministic given `env.seed`.

    Args:
        env: the attack environment (population, LoRA and train settings, seed).
        model: the target's peft model. Each shadow is one more adapter on its base weights, trained
            and scored alone, then deleted: no second copy of the base is loaded (on one GPU an 8B
            base does not fit twice). The adapters active before are active again afterwards.
        tokenizer: the target's tokenizer.
    """
    from fedleak.federated.adapters import activate, add_named_adapter

    population = list(env.population)
    settings = env.train if epochs is None else dataclasses.replace(env.train, epochs=epochs)
    in_mask = balanced_membership(len(population), shadow_models, numpy_rng(env.seed, "lira", "membership"))
    active = list(model.active_adapters)
    stats = np.empty((shadow_models, len(population)))
    seconds = []
    try:
        for s in range(shadow_models):
            start = time.perf_counter()
            members = [r for r, keep in zip(population, in_mask[s]) if keep]
            add_named_adapter(model, SHADOW, env.adapter, seed=derive_seed(env.seed, "lira", "shadow-init", s))
            activate(model, [SHADOW], trainable=SHADOW)
            examples = encode(members, tokenizer, max_length=env.max_length, response_only=env.response_only)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(env.seed, "lira", "shadow-train", s))  # dropout
                train_adapter(model, examples, settings, pad_id=tokenizer.pad_token_id,
                              generator=torch_generator(env.seed, "lira", "shadow-batches", s))
            stats[s] = -compute_stats(model, tokenizer, population, max_length=max_length,
                                      response_only=response_only, batch_size=env.batch_size).loss
            activate(model, active)  # first: peft warns when the active adapter is deleted
            model.delete_adapter(SHADOW)
            seconds.append(time.perf_counter() - start)
            log.info("lira: shadow %d/%d (%d records, %d epochs) in %.1f s", s + 1, shadow_models, len(members),
                     settings.epochs, seconds[-1])
    finally:
        activate(model, active)
        if SHADOW in model.peft_config:
            model.delete_adapter(SHADOW)
        model.eval()
    return ShadowStatistics(tuple(r.record_id for r in population), stats, in_mask, tuple(seconds))


def shadow_statistics(target: Target, *, shadow_models: int, epochs: int | None,
                      attack: str = "lira") -> ShadowStatistics:
    """The run's shadow statistics for these shadow settings, trained on first use; every attack reading
    LiRA's shadows (LiRA online and offline, RMIA) and every view of the run share them.

    Looked up in `env.cache`, then in `env.cache_dir` (`lira-shadows-<digest>.safetensors`), trained only when
    neither holds them. The key holds only what changes the shadows (their count and epochs, the seed, the
    base model, LoRA and train settings, lengths, the population, the run's salt), not the attack reading them.

    Args:
        epochs: epochs of each shadow; None: the target's (`env.train.epochs`).
        attack: names the attack in errors.
    """
    env = check_env(target.env, attack)
    epochs = env.train.epochs if epochs is None else epochs
    key = ("lira-shadows", shadow_models, epochs, env.seed, str(env.base_model_ref), env.adapter, env.train,
           env.max_length, env.response_only, target.max_length, target.response_only,
           tuple(repr(r) for r in env.population), env.cache_salt)
    if key not in env.cache:
        # repr, not hash(): str hashes are salted per process, and the disk key must hold across processes.
        # The salt names the model when set; the model's path differs between nodes.
        digest = hashlib.sha256(repr(key[:4] + key[5:] if env.cache_salt else key).encode()).hexdigest()[:24]
        path = env.cache_dir / f"lira-shadows-{digest}.safetensors" if env.cache_dir else None
        # Processes attacking other trainings of the run wait for the first one's shadows, not train them again.
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock") if path else contextlib.nullcontext():
            shadows = read_shadows(path, digest) if path else None
            if shadows is None:
                shadows = train_shadows(env, target.model, target.tokenizer, shadow_models=shadow_models,
                                        epochs=epochs, max_length=target.max_length,
                                        response_only=target.response_only)
                if path:
                    write_shadows(path, digest, shadows)
        env.cache[key] = shadows
    return env.cache[key]


@register_attack("lira")
class LiRAAttack(MembershipAttack):
    """LiRA: Gaussian likelihood ratio of the target's log-prob against shadow models (Carlini et al. 2022)."""

    def __init__(self, *, shadow_models: Annotated[int, Range(ge=2)] = 4, variant: Literal["online", "offline"] = ONLINE,
                 global_variance: bool = True, epochs: PositiveInt | None = None):  # epochs unset: the target's
        """Set the shadow models and the LiRA test.

        Args:
            shadow_models: shadow LoRA fine-tunes of the base model, each on a random half of the attack
                population (in complementary pairs), trained once per run.
            variant: "online": likelihood ratio of the IN and OUT Gaussians; "offline": one-sided test against
                the OUT Gaussian alone (the paper's offline LiRA).
            global_variance: true: one variance per side pooled over all records (the paper's fixed variance);
                false: a variance per record.
            epochs: epochs of each shadow fine-tune; unset: the target's training epochs (`train.epochs`).

        Raises:
            FedleakError: shadow_models is odd with variant "online", or below 4 with global_variance = false.
        """
        if variant == ONLINE and shadow_models % 2:
            raise FedleakError(f"attack lira: shadow_models = {shadow_models}: must be even for variant "
                               f"'{ONLINE}' (each record IN for exactly half of the shadows)")
        if not global_variance and shadow_models < 4:
            raise FedleakError(f"attack lira: shadow_models = {shadow_models}: must be >= 4 with global_variance "
                               f"= false (per-record variances need 2 IN and 2 OUT shadows per record)")
        self.shadow_models = shadow_models
        self.variant = variant
        self.global_variance = global_variance
        self.epochs = epochs

    def shadows(self, target: Target) -> ShadowStatistics:
        """The run's shadow statistics, trained on first use (`shadow_statistics`)."""
        return shadow_statistics(target, shadow_models=self.shadow_models, epochs=self.epochs)

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """LiRA scores of `records` (see `MembershipAttack.score`); the shadows train on first use.

        Raises:
            FedleakError: a record is not in `target.env.population` (the shadows' pool), or the
                environment cannot train shadows (no base model, no train settings).
        """
        env = check_env(target.env)
        columns = population_columns(env, records)
        shadows = self.shadows(target)
        obs = -shared_stats(target, records).loss
        return lira_scores(obs, shadows.stats, shadows.in_mask, columns=columns, variant=self.variant,
                           global_variance=self.global_variance)
