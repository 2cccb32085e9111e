"""DP-SGD on each client (Abadi et al. 2016, "Deep Learning with Differential Privacy"), through Opacus.

Record-level privacy for each client's data: per-sample gradients of the trainable (LoRA)
parameters are clipped to `max_grad_norm` and Gaussian noise with std `noise_multiplier *
max_grad_norm` is added. Each client keeps one Opacus `PrivacyEngine(accountant="rdp")` for the
whole training, so its epsilon accumulates over rounds and over every training it runs.

Accounting is Opacus's own. `make_private(poisson_sampling=True)` samples each record with
probability 1 / ceil(n / batch_size) (`DPDataLoader.from_data_loader`), not batch_size / n, its
sampler takes int(1 / that) batches per epoch (`UniformWithReplacementSampler`; one fewer for some
sizes, 92 for 93), and the accountant is charged q = 1 / len(loader), one over those batches;
`accounted_rate` mirrors that, and each training checks it against the loader Opacus built.

The budget is planned jointly. An algorithm declares the DP trainings a client runs each round
(`Algorithm.training_plan`: adapter -> planned records, e.g. FEDPIT's global adapter on
`synthetic_per_round` synthetic records, then its local adapter on the real plus synthetic ones);
the round loop passes it on as `ClientJob.plan`. With `target_epsilon`, sigma is the smallest noise
whose RDP composition of what the client's accountant already holds, this training as it really
is (its records, rate and steps), and the rest of the plan (later trainings of this round, then
`planned_rounds - round` whole rounds) meets the target (`solve_noise`, a root search over
Opacus's RDP analysis with the accountant's orders). A client keeps its sigma while the plan still
lands on the target, and solves again when a realised training differs from the plan (fewer
synthetic records accepted, a skipped upload): the last planned training then absorbs what is left,
so the spent epsilon never exceeds the target. If it ever does (the accountant already held more
than the target), the client logs a warning, and results.json's privacy record says
`exceeded_target: true`. A client not sampled in some rounds spends less than the target.

The loss is a per-sequence token mean, then the batch mean (HF's `labels=` loss would average
tokens across the batch, which is not a per-sample loss).

What the guarantee covers: one client's accountant charges every DP training of that client, so a
record in several of its training sets (FEDPIT's synthetic records: global and local adapters) is
covered by the whole composition. The trainings' inputs are taken as given, though: FEDPIT and
LOCIT+SA generate their synthetic records with the client's real records as in-context
demonstrations, without noise, so the epsilon bounds the DP-SGD trainings on the synthetic and
real records as generated; it does not bound what a real record leaks through the synthetic data
(on FEDPIT's global adapter, trained on synthetic records only, DP-SGD bounds the synthetic
training alone).

Per-sample gradients are checked before a model's first DP training (`check_per_sample_gradients`):
Opacus's hooks take a layer's input's first dimension as the batch, so a layer that sees
[batch*tokens, hidden] (OPT's fc1/fc2) gets per-token "per-sample" gradients: clipped per token, the
record-level epsilon would be wrong; routers and fused experts of mixture-of-experts models get none or
per-token ones. A probe of three records of different lengths through Opacus's GradSampleModule (hooks
mode, as in training) must give every trainable parameter one gradient row per record, equal to that
record's own autograd gradient; otherwise the training is refused, naming the modules and LoRA targets
that pass. The result is cached per model object and trainable parameter set.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedleak.defenses.base import Defense, register_defense
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeFloat, OpenUnitInterval, PositiveFloat
from fedleak.federated.hooks import ClientJob
from fedleak.defenses.dp_probe import check_per_sample_gradients
from fedleak.federated.training import collate, sequence_losses

if TYPE_CHECKING:  # Opacus is imported when a client trains, not when the config loads
    from opacus import PrivacyEngine

log = logging.getLogger("fedleak")

MAX_SIGMA = 1e4  # no noise search goes past this (it would mean a budget already spent)
PLAN_SLACK = 1e-3  # a kept sigma may land this far (relative) under the target before it is solved again


def accounted_rate(*, records: int, batch_size: int) -> tuple[float, int]:
    """The sample rate Opacus accounts and the batches it takes per epoch, for a Poisson-sampled loader.

    Args:
        records: examples in the training set (at least 1).
        batch_size: the batch size of the DataLoader handed to `make_private`.

    Returns:
        (q, batches per epoch): the loader samples each record with probability 1 / ceil(records /
        batch_size) (`DPDataLoader.from_data_loader`) and draws int(1 / that) batches
        (`UniformWithReplacementSampler`; int(1 / (1 / 93)) is 92: the float division loses a batch for
        some sizes); `make_private` charges the accountant q = 1 / len(loader), i.e. 1 / batches, and
        that q is what the budget must be solved for.
    """
    batches = int(1 / (1 / math.ceil(records / batch_size)))
    return 1 / batches, batches


def _trainable_lora_embedding(model) -> str | None:
    """The name of a trainable LoRA embedding layer, if any: peft's LoRA `Embedding` looks rows up in its
    A matrix (`F.embedding`), a layer Opacus's hooks cannot give per-sample gradients for (its optimizer
    then fails mid-training with "Per sample gradient is not initialized")."""
    from peft.tuners.lora import Embedding

    for name, module in model.named_modules():
        if isinstance(module, Embedding) and any(p.requires_grad for p in module.parameters()):
            return name
    return None


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, sigma: float) -> tuple[float, ...]:
    """One step's RDP at the RDP accountant's orders (the costly part: cached, about 0.1 s each)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon_of(history, *, delta: float) -> float:
    """Epsilon of an RDP accountant history, as `RDPAccountant.get_epsilon` computes it.

    Args:
        history: (noise multiplier, sample rate, steps) triples, `RDPAccountant.history`'s format.
        delta: the delta of the (epsilon, delta) guarantee.

    Returns:
        Epsilon at `delta` for the composition of every entry (0 for an empty history).
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    rdp = sum([np.asarray(_rdp_per_step(q, sigma)) * steps for sigma, q, steps in history])
    return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])


@functools.lru_cache(maxsize=256)
def solve_noise(*, spent: tuple, planned: tuple, target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier that keeps a client's whole planned composition within its target.

    Args:
        spent: the client's accountant history so far, (sigma, sample rate, steps) triples.
        planned: (sample rate, steps) of every training still to run, this one first; they all get the
            returned sigma.
        target_epsilon: the epsilon the composition must not exceed.
        delta: the delta of the guarantee.

    Returns:
        Sigma with epsilon(spent + planned at sigma) <= target_epsilon, within 1e-6 (relative) of the
        smallest such; MAX_SIGMA when even that cannot meet it (`spent` is over the target already).
    """
    from scipy.optimize import brentq

    def excess(log_sigma: float) -> float:
        sigma = math.exp(log_sigma)
        return epsilon_of([*spent, *((sigma, q, k) for q, k in planned)], delta=delta) - target_epsilon

    hi = 1.0
    while excess(math.log(hi)) > 0:
        if hi >= MAX_SIGMA:
            return MAX_SIGMA
        hi = min(MAX_SIGMA, hi * 4)
    lo = hi / 4
    while excess(math.log(lo)) <= 0:
        if lo < 1e-3:  # a budget this loose needs next to no noise
            return lo
        hi, lo = lo, lo / 4
    sigma = math.exp(brentq(excess, math.log(lo), math.log(hi), xtol=1e-7))
    while excess(math.log(sigma)) > 0:  # land on the safe side of the root
        sigma *= 1 + 1e-6
    return sigma


@register_defense("dp_sgd")
class DPSGD(Defense):
    """DP-SGD on every client via Opacus (per-sample clipping + Gaussian noise, RDP accounting; Abadi et al. 2016)."""

    def __init__(self, *, noise_multiplier: NonNegativeFloat | None = None, target_epsilon: PositiveFloat | None = None,
                 max_grad_norm: PositiveFloat = 1.0, delta: OpenUnitInterval = 1e-5):
        """Set the per-sample clipping and the noise (or privacy budget) of each client's DP-SGD.

        Args:
            noise_multiplier: std of the Gaussian noise added to each batch's summed clipped gradients, in units of
                max_grad_norm (the paper's sigma); 0 = clipping only. Unset: derived from target_epsilon.
            target_epsilon: epsilon each client should reach (at delta) after all planned rounds and every DP
                training the algorithm runs per round; sigma is solved on Opacus's RDP accountant for the
                sample rates and steps Opacus accounts. Unset: noise_multiplier is used.
            max_grad_norm: L2 bound each per-sample gradient is clipped to (the paper's clipping bound C).
            delta: the delta of the (epsilon, delta) guarantee: target_epsilon's target, and where epsilon is reported.

        Raises:
            FedleakError: neither or both of noise_multiplier and target_epsilon are given.
        """
        if (noise_multiplier is None) == (target_epsilon is None):
            raise FedleakError("dp_sgd: give exactly one of noise_multiplier and target_epsilon")
        self.noise_multiplier, self.target_epsilon = noise_multiplier, target_epsilon
        self.max_grad_norm, self.delta = max_grad_norm, delta
        self.engines: dict[int, PrivacyEngine] = {}  # one Opacus PrivacyEngine (and accountant) per client
        self.sigmas: dict[int, float] = {}  # each client's current sigma, kept while its plan holds

    def client_state(self, client: int) -> dict:
        """The client's accountant history ([sigma, sample rate, steps] per training) and kept sigma."""
        engine = self.engines.get(client)
        return {"history": [[float(s), float(q), int(k)] for s, q, k in engine.accountant.history] if engine else [],
                "sigma": self.sigmas.get(client)}

    def load_client_state(self, client: int, state: dict) -> None:
        """A fresh engine whose accountant continues from `state["history"]`, and the kept sigma."""
        from opacus import PrivacyEngine

        engine = self.engines[client] = PrivacyEngine(accountant="rdp")
        engine.accountant.history = [tuple(h) for h in state.get("history", ())]
        self.sigmas.pop(client, None)
        if state.get("sigma") is not None:
            self.sigmas[client] = float(state["sigma"])

    def planned(self, job: ClientJob, *, sample_rate: float, steps: int) -> list[tuple[float, int]]:
        """(sample rate, steps) of this training and of every DP training the client's plan has after it.

        Args:
            job: the training; `job.plan` lists the algorithm's DP trainings per round (empty: this one alone).
            sample_rate, steps: this training's accounted rate and steps, as it really runs.

        Returns:
            This training first, then the plan's later trainings merged by sample rate (RDP adds over steps).

        Raises:
            FedleakError: the job's adapter is not in the plan (the algorithm's training_plan must list it).
        """
        plan = job.plan or ((job.adapter, len(job.examples)),)
        adapters = [adapter for adapter, _ in plan]
        if job.adapter not in adapters:
            raise FedleakError(f"dp_sgd: the algorithm trains adapter {job.adapter!r} outside its training_plan "
                               f"{adapters}: list every adapter it trains through ctx.train in training_plan")
        rounds_left = max(0, job.planned_rounds - job.round)
        later: dict[float, int] = {}
        for index, (_, records) in enumerate(plan):
            repeats = rounds_left + (index > adapters.index(job.adapter))  # later this round, then whole rounds
            if records > 0 and repeats:
                rate, per_epoch = accounted_rate(records=records, batch_size=job.settings.batch_size)
                later[rate] = later.get(rate, 0) + repeats * job.settings.epochs * per_epoch
        return [(sample_rate, steps), *later.items()]

    def sigma(self, job: ClientJob, *, spent: list, sample_rate: float, steps: int) -> float:
        """This training's noise multiplier: the fixed one, or the budget's (kept while the plan holds).

        Args:
            job: the training (client, round, plan).
            spent: the client's accountant history so far.
            sample_rate, steps: this training's accounted rate and steps.

        Returns:
            Sigma for this training.
        """
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        planned = self.planned(job, sample_rate=sample_rate, steps=steps)
        kept = self.sigmas.get(job.client)
        if kept is not None:
            epsilon = epsilon_of([*spent, *((kept, q, k) for q, k in planned)], delta=self.delta)
            if self.target_epsilon * (1 - PLAN_SLACK) <= epsilon <= self.target_epsilon:
                return kept
        self.sigmas[job.client] = solve_noise(spent=tuple(map(tuple, spent)), planned=tuple(planned),
                                              target_epsilon=self.target_epsilon, delta=self.delta)
        return self.sigmas[job.client]

    def train_client(self, job: ClientJob) -> dict:
        """Train `job.adapter` with DP-SGD on Poisson batches, charging the client's accountant.

        Args:
            job: the training; its plan, round and planned_rounds size the budget (with target_epsilon).
                Sets `job.privacy` to the client's cumulative accounting.

        Returns:
            `loss_last_quarter`, `steps`, `examples`, `noise_multiplier`, `sample_rate` (the accounted
            one), and the client's cumulative `epsilon` at `delta`.

        Raises:
            FedleakError: no examples, an adapter outside the plan, LoRA on an embedding layer or on layers
                without per-record gradients (`check_per_sample_gradients`), or an Opacus whose accounting differs.
        """
        from opacus import PrivacyEngine

        n, settings = len(job.examples), job.settings
        if n == 0:
            raise FedleakError(f"dp_sgd: client {job.client} has no examples to train on in round {job.round}: "
                               f"the algorithm must skip an empty training")
        if (embedding := _trainable_lora_embedding(job.model)) is not None:
            raise FedleakError(f"dp_sgd: LoRA on the embedding layer {embedding} has no per-sample gradients in "
                               f"Opacus: remove it from model.lora.target_modules, or use dp_fedavg")
        check_per_sample_gradients(job.model, job.examples, job.pad_id)  # before any step or accounting
        sample_rate, per_epoch = accounted_rate(records=n, batch_size=settings.batch_size)
        engine = self.engines.setdefault(job.client, PrivacyEngine(accountant="rdp"))
        sigma = self.sigma(job, spent=list(engine.accountant.history), sample_rate=sample_rate,
                           steps=settings.epochs * per_epoch)
        padded = collate(job.examples, job.pad_id)
        dataset = TensorDataset(padded["input_ids"], padded["attention_mask"], padded["labels"])
        params = [p for p in job.model.parameters() if p.requires_grad]
        job.model.train()  # Opacus sees no activations in eval mode
        with warnings.catch_warnings():
            # Each round wraps the client's same records anew; the engine's accountant rightly continues.
            warnings.filterwarnings("ignore", message="PrivacyEngine detected new dataset object")
            module, optimizer, loader = engine.make_private(
                module=job.model, optimizer=torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay),
                data_loader=DataLoader(dataset, batch_size=settings.batch_size), noise_multiplier=sigma,
                max_grad_norm=self.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks")
        losses, steps = [], 0
        try:
            if (1 / len(loader), len(loader)) != (sample_rate, per_epoch):
                raise FedleakError(f"dp_sgd: Opacus accounts sample rate {1 / len(loader)} over {len(loader)} "
                                   f"batches, the budget was planned for {sample_rate} over {per_epoch}: install "
                                   f"opacus 1.6 or update accounted_rate to this version's DPDataLoader")
            for _ in range(settings.epochs):
                for ids, mask, labels in loader:
                    if len(ids) == 0:  # an empty Poisson batch is still a (noise-only) private step
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        width = int(mask.sum(1).max())  # right padding beyond the batch's longest record is dead weight
                        batch = {"input_ids": ids[:, :width], "attention_mask": mask[:, :width], "labels": labels[:, :width]}
                        loss = sequence_losses(module, batch).mean()
                        loss.backward()
                        losses.append(loss.item())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
        finally:
            module.cleanup()  # remove Opacus's hooks and attributes: the same model serves the next client
            for p in params:
                p.grad_sample = None
        job.model.eval()
        epsilon = float(engine.get_epsilon(self.delta))
        # The client's cumulative accounting, whatever the algorithm does with these metrics.
        job.privacy = {"epsilon": epsilon, "delta": self.delta, "target_epsilon": self.target_epsilon,
                       "accounting": [[float(s), float(q), int(k)] for s, q, k in engine.accountant.history]}
        if self.target_epsilon is not None and epsilon > self.target_epsilon:
            log.warning("dp_sgd: client %d spent epsilon %.3f, above its target %g, in round %d", job.client,
                        epsilon, self.target_epsilon, job.round)
        tail = losses[-max(1, len(losses) // 4):] or [float("nan")]
        return {"loss_last_quarter": float(sum(tail) / len(tail)), "steps": steps, "examples": n,
                "noise_multiplier": sigma, "sample_rate": sample_rate, "epsilon": epsilon, "delta": self.delta}
