"""The places where a defense or a malicious client plugs into federated training.

Each hook is the identity by default, so a component overrides only what it changes. A defense
(`TrainingHooks`): client-side training (DP-SGD swaps the optimiser loop), the updates the server
receives (clipping), the aggregation rule (robust rules), and the aggregated model (server noise).
An adversary (`Adversary`, built from a poisoning scenario): the data its clients' uploads train on,
and the uploads themselves, changed before any defense sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedleak.federated.adapters import DEFAULT, AdapterState
from fedleak.federated.aggregation import fedavg
from fedleak.federated.data import Record
from fedleak.federated.training import Example, TrainSettings, train_adapter


@dataclass
class ClientJob:
    """One client's local training in one round; `run()` is the plain (non-private) loop."""

    client: int
    round: int
    model: torch.nn.Module
    examples: Sequence[Example]
    settings: TrainSettings
    pad_id: int
    generator: torch.Generator
    adapter: str = DEFAULT  # the peft adapter being trained (the only one with requires_grad)
    planned_rounds: int = 1  # rounds in the whole training (for privacy budgets planned up front)

    def run(self) -> dict:
        return train_adapter(self.model, self.examples, self.settings, pad_id=self.pad_id, generator=self.generator)


@dataclass
class ClientUpdate:
    client: int
    state: AdapterState
    num_examples: int


@dataclass
class RoundInfo:
    round: int
    clients: list[int]
    num_clients_total: int
    generator: torch.Generator  # seeded per round: server-side randomness (noise) draws from it
    metrics: dict = field(default_factory=dict)  # hooks record per-round facts here (epsilon, exclusions)


class TrainingHooks:
    hides_uploads = False  # the server never sees individual uploads (secure aggregation)

    def train_client(self, job: ClientJob) -> dict:
        return job.run()

    def before_aggregation(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                           info: RoundInfo) -> list[ClientUpdate]:
        return updates

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        return fedavg([(u.state, u.num_examples) for u in updates])

    def after_aggregation(self, state: AdapterState, *, previous: AdapterState, info: RoundInfo) -> AdapterState:
        return state


class Adversary:
    """Malicious clients; every client is honest by default.

    `poison_records` changes the records behind a malicious client's upload (the algorithm calls it
    through `ClientContext.poison_data`); `poison_updates` changes malicious uploads after local
    training and before the defense's hooks, and records in `info.metrics["malicious_clients"]`
    which uploads were malicious that round.
    """

    malicious: frozenset[int] = frozenset()
    poisons_data = False  # whether poison_records changes anything (the round loop checks the algorithm calls it)

    def acts(self, client: int, round: int) -> bool:
        return False

    def poison_records(self, records: list[Record], *, client: int, round: int) -> list[Record]:
        return records

    def train_settings(self, settings: TrainSettings, *, client: int, round: int) -> TrainSettings:
        """How an acting malicious client trains locally (it skips the defense's client hook)."""
        return settings

    def poison_updates(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                       info: RoundInfo) -> list[ClientUpdate]:
        return updates
