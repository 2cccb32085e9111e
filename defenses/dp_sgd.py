"""DP-SGD on each client (Abadi et al. 2016, "Deep Learning with Differential Privacy"), through Opacus.

Record-level privacy for each client's data: per-sample gradients of the trainable (LoRA)
parameters are clipped to `max_grad_norm` and Gaussian noise with std `noise_multiplier *
max_grad_norm` is added; batches are Poisson samples with rate batch_size / n. Each client keeps
one Opacus `PrivacyEngine(accountant="rdp")` for the whole training, so its epsilon accumulates
over rounds; the epsilon after each round is in that round's client metrics.

The loss is a per-sequence token mean, then the batch mean (HF's `labels=` loss would average
tokens across the batch, which is not a per-sample loss). `target_epsilon` picks sigma with
Opacus's `get_noise_multiplier` for the planned steps: every round, `local_epochs` epochs of
ceil(n / batch_size) Poisson batches.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedleak.defenses.base import Defense, register_defense
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeFloat, OpenUnitInterval, PositiveFloat
from fedleak.federated.hooks import ClientJob
from fedleak.federated.training import collate, sequence_losses

if TYPE_CHECKING:  # Opacus is imported when a client trains, not when the config loads
    from opacus import PrivacyEngine


@functools.lru_cache(maxsize=64)
def _noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus's search for sigma (about a second each): the same for every round of a client."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


@register_defense("dp_sgd")
class DPSGD(Defense):
    """DP-SGD on every client via Opacus (per-sample clipping + Gaussian noise, RDP accounting; Abadi et al. 2016)."""

    def __init__(self, *, noise_multiplier: NonNegativeFloat | None = None, target_epsilon: PositiveFloat | None = None,
                 max_grad_norm: PositiveFloat = 1.0, delta: OpenUnitInterval = 1e-5):
        """Set the per-sample clipping and the noise (or privacy budget) of each client's DP-SGD.

        Args:
            noise_multiplier: std of the Gaussian noise added to each batch's summed clipped gradients, in units of
                max_grad_norm (the paper's sigma); 0 = clipping only. Unset: derived from target_epsilon.
            target_epsilon: epsilon each client should reach (at delta) after all planned rounds; the noise
                multiplier is found by Opacus's `get_noise_multiplier`. Unset: noise_multiplier is used.
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

    def sigma(self, *, sample_rate: float, steps: int) -> float:
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return _noise_for_budget(self.target_epsilon, self.delta, sample_rate, steps)

    def train_client(self, job: ClientJob) -> dict:
        from opacus import PrivacyEngine

        n, settings = len(job.examples), job.settings
        sample_rate = min(1.0, settings.batch_size / n)
        steps_per_epoch = math.ceil(1 / sample_rate)
        sigma = self.sigma(sample_rate=sample_rate, steps=job.planned_rounds * settings.epochs * steps_per_epoch)
        padded = collate(job.examples, job.pad_id)
        dataset = TensorDataset(padded["input_ids"], padded["attention_mask"], padded["labels"])
        params = [p for p in job.model.parameters() if p.requires_grad]
        engine = self.engines.setdefault(job.client, PrivacyEngine(accountant="rdp"))
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
            for _ in range(settings.epochs):
                for ids, mask, labels in loader:
                    if len(ids) == 0:  # an empty Poisson batch is still a (noise-only) private step
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    else:
                        loss = sequence_losses(module, {"input_ids": ids, "attention_mask": mask, "labels": labels}).mean()
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
        tail = losses[-max(1, len(losses) // 4):] or [float("nan")]
        return {"loss_last_quarter": float(sum(tail) / len(tail)), "steps": steps, "examples": n,
                "noise_multiplier": sigma, "sample_rate": sample_rate,
                "epsilon": float(engine.get_epsilon(self.delta)), "delta": self.delta}
