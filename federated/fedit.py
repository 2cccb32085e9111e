"""FEDIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction Tuning"):
each sampled client trains a LoRA adapter on its own instructions, starting from the global
adapter; the server aggregates the uploads (FedAvg unless a defense changes it).

Everything a client and the server do is a plain function of adapter state dicts, and every
round's views (global adapter, each upload) are checkpointed for the attacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedleak.federated import checkpoint
from fedleak.federated.adapters import LoraSettings, add_lora, get_adapter_state, set_adapter_state
from fedleak.federated.data import FederatedData
from fedleak.federated.errors import FedleakError
from fedleak.federated.hooks import ClientJob, ClientUpdate, RoundInfo, TrainingHooks
from fedleak.federated.seeding import derive_seed, numpy_rng, torch_generator
from fedleak.federated.training import TrainSettings, encode


@dataclass(frozen=True)
class FederationSettings:
    clients: int = 3
    rounds: int = 8
    client_fraction: float = 1.0
    local_epochs: int = 4
    batch_size: int = 8
    lr: float = 3e-3
    max_grad_norm: float = 1.0
    partition: str = "dirichlet"
    alpha: float = 1.0
    min_records_per_client: int = 8
    response_only_loss: bool = True
    max_length: int = 256

    def __post_init__(self):
        for name in ("clients", "rounds", "local_epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise FedleakError(f"federation.{name} = {getattr(self, name)}: must be a positive integer")
        if self.min_records_per_client < 1:
            raise FedleakError(f"federation.min_records_per_client = {self.min_records_per_client}: must be >= 1")
        if not 0 < self.client_fraction <= 1:
            raise FedleakError(f"federation.client_fraction = {self.client_fraction}: must be in (0, 1]")
        if not self.lr > 0:
            raise FedleakError(f"federation.lr = {self.lr}: must be > 0")
        if not self.alpha > 0:
            raise FedleakError(f"federation.alpha = {self.alpha}: must be > 0")
        if self.partition not in ("dirichlet", "iid"):
            raise FedleakError(f"federation.partition = {self.partition!r}: use 'dirichlet' or 'iid'")

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.client_fraction * self.clients))

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                             max_grad_norm=self.max_grad_norm)


@dataclass
class TrainingRun:
    model: torch.nn.Module  # base + final global adapter, eval mode
    history: list[dict]  # one entry per round: sampled clients, losses, seconds, hook metrics
    train_seconds: float
    final_round: int
    training_dir: Path


def run_fedit(*, base_model, tokenizer, data: FederatedData, federation: FederationSettings,
              lora: LoraSettings, hooks: TrainingHooks, seed: int, out_dir: Path, config_hash: str,
              progress: bool = True, label: str = "") -> "TrainingRun":
    """Train, write one checkpoint folder per round (round 0 = initial adapter), return a summary."""
    model = add_lora(base_model, lora, seed=derive_seed(seed, "lora-init"))
    pad_id = tokenizer.pad_token_id
    examples = [encode(records, tokenizer, max_length=federation.max_length,
                       response_only=federation.response_only_loss) for records in data.clients]
    global_state = get_adapter_state(model)
    checkpoint.write_round(out_dir, 0, global_state=global_state, uploads={}, num_examples={},
                           config_hash=config_hash)
    sampler = numpy_rng(seed, "client-sampling")
    history = []
    start = time.perf_counter()
    rounds_bar = tqdm(range(1, federation.rounds + 1), desc=f"{label} rounds".strip(), unit="round",
                      disable=not progress, leave=False)
    for rnd in rounds_bar:
        round_start = time.perf_counter()
        sampled = sorted(int(c) for c in sampler.choice(federation.clients, size=federation.clients_per_round,
                                                        replace=False))
        info = RoundInfo(round=rnd, clients=sampled, num_clients_total=federation.clients,
                         generator=torch_generator(seed, "server", rnd))
        updates, client_metrics = [], {}
        for client in tqdm(sampled, desc="clients", unit="client", disable=not progress, leave=False):
            set_adapter_state(model, global_state)
            torch.manual_seed(derive_seed(seed, "client-train", rnd, client))  # LoRA dropout draws
            job = ClientJob(client=client, round=rnd, model=model, examples=examples[client],
                            settings=federation.train_settings(), pad_id=pad_id,
                            generator=torch_generator(seed, "client-batches", rnd, client))
            client_metrics[client] = hooks.train_client(job)
            updates.append(ClientUpdate(client=client, state=get_adapter_state(model),
                                        num_examples=len(examples[client])))
        uploads = {u.client: u.state for u in updates}  # what a curious server receives
        received = hooks.before_aggregation(updates, global_state=global_state, info=info)
        new_state = hooks.aggregate(received, info=info)
        global_state = hooks.after_aggregation(new_state, previous=global_state, info=info)
        checkpoint.write_round(out_dir, rnd, global_state=global_state, uploads=uploads,
                               num_examples={u.client: u.num_examples for u in updates}, config_hash=config_hash)
        losses = [m["loss_last_quarter"] for m in client_metrics.values()]
        history.append({"round": rnd, "clients": sampled, "seconds": time.perf_counter() - round_start,
                        "client_metrics": {str(c): m for c, m in client_metrics.items()},
                        "mean_train_loss": sum(losses) / len(losses), **info.metrics})
        rounds_bar.set_postfix(loss=f"{history[-1]['mean_train_loss']:.3f}")
    set_adapter_state(model, global_state)
    model.eval()
    return TrainingRun(model=model, history=history, train_seconds=time.perf_counter() - start,
                       final_round=federation.rounds, training_dir=Path(out_dir))
