"""What a poisoning attack is, and the adversary a scenario builds from its attacks.

A scenario (`[matrix] scenarios` in the config) names the malicious clients and lists poisoning
attacks. Data poisoning rewrites the records behind a malicious client's upload (FEDIT: its own
records; FEDPIT: its synthetic records, since local adapters are never shared); model poisoning
rewrites the uploaded adapter after local training, before any defense sees it. Both kinds chain
in the order listed, so `backdoor` + `scaling` is the model-replacement backdoor. Malicious clients
do not follow the protocol: in the rounds they act they train without the client-side defense (no
DP-SGD), then poison; server-side defenses see their uploads like any other.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedleak.attacks.base import Attack
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.federated.data import Record
from fedleak.federated.hooks import Adversary, ClientUpdate, RoundInfo
from fedleak.federated.seeding import numpy_rng, torch_generator
from fedleak.federated.training import TrainSettings


class PoisoningAttack(Attack):
    """What both kinds of poisoning share; a plug-in derives from `DataPoisoning` or `ModelPoisoning`
    (a class derived from this one alone would act on nothing, so it does not register)."""


class DataPoisoning(PoisoningAttack):
    """Base of data poisoning: a malicious client trains its upload on records it rewrote (backdoor
    triggers: Bagdasaryan et al. 2020, "How To Backdoor Federated Learning"; label flipping: Tolpegin,
    Truex, Gursoy and Liu 2020, "Data Poisoning Attacks Against Federated Learning Systems").

    Subclasses implement `poison_records`.
    """

    family = "poisoning"

    @abstractmethod
    def poison_records(self, records: list[Record], *, rng: np.random.Generator) -> list[Record]:
        """The records a malicious client trains its upload on, given its clean ones.

        Args:
            records: the client's clean records behind its upload (FEDIT: its own records; FEDPIT:
                its synthetic ones), a fresh list the attack may reorder or extend.
            rng: seeded per (run seed, attack, client), the same every round, so a client keeps one
                poisoned dataset across rounds; draw every random choice from it.

        Returns:
            The records to train on, in training order: any length, as `Record`s of the same
            format (a poisoned copy is a new `Record`; the inputs are frozen).
        """


@dataclass
class RoundUpdates:
    """What a model-poisoning attack may read in one round. `honest` holds the honest clients' updates
    (upload minus global adapter, one row each): only the omniscient attacks (ALIE, IPM) read it."""

    honest: torch.Tensor  # (k, d) float64; the malicious clients' own trained updates if no honest one uploaded
    num_uploads: int  # uploads this round, malicious included
    num_malicious: int
    own_examples: int  # the FedAvg weight of this malicious upload
    total_examples: int  # over all uploads of the round
    generator: torch.Generator  # seeded per round and client, independent of the server's noise


class ModelPoisoning(PoisoningAttack):
    """Base of model poisoning: a malicious client rewrites its trained update before uploading it
    (model replacement: Bagdasaryan et al. 2020; ALIE: Baruch, Baruch and Goldberg 2019, "A Little
    Is Enough"; IPM: Xie, Koyejo and Gupta 2020, "Fall of Empires").

    Subclasses implement `poison_update`; one that reads the honest updates sets `omniscient = True`.
    """

    family = "poisoning"
    omniscient = False  # reads the honest clients' updates of the round

    @abstractmethod
    def poison_update(self, delta: torch.Tensor, round_updates: RoundUpdates) -> torch.Tensor:
        """The update a malicious client sends, given the one it trained.

        Args:
            delta: shape (d,), float64: the client's trained adapter minus the global adapter it
                started from, every LoRA tensor flattened in `adapters.flatten` order.
            round_updates: what the attacker may read this round (the honest updates, counts,
                FedAvg weights, a seeded generator for any randomness).

        Returns:
            Shape (d,), float64: the update to send; the upload is the global adapter plus it.
        """


class ScenarioAdversary(Adversary):
    """The malicious clients of one scenario and what they do, in the rounds they act (see `Adversary`
    for the hooks; data attacks run before model attacks, each kind in the order listed)."""

    def __init__(self, *, malicious: set[int], attacks: list[PoisoningAttack], seed: int,
                 rounds: set[int] | None = None, local_epochs: int | None = None):
        self.malicious = frozenset(malicious)
        self.data_attacks = [a for a in attacks if isinstance(a, DataPoisoning)]
        self.model_attacks = [a for a in attacks if isinstance(a, ModelPoisoning)]
        self.poisons_data = bool(self.data_attacks)
        self.rounds = rounds
        self.seed = seed
        self.local_epochs = local_epochs

    def acts(self, client: int, round: int) -> bool:
        return client in self.malicious and (self.rounds is None or round in self.rounds)

    def train_settings(self, settings: TrainSettings, *, client: int, round: int) -> TrainSettings:
        # Model replacement trains the backdoor longer than honest clients do (Bagdasaryan et al. 2020).
        return replace(settings, epochs=self.local_epochs) if self.local_epochs else settings

    def poison_records(self, records: list[Record], *, client: int, round: int) -> list[Record]:
        if not self.acts(client, round):
            return records
        for attack in self.data_attacks:
            # Not seeded by round: under FEDIT a malicious client keeps one poisoned dataset.
            records = attack.poison_records(list(records), rng=numpy_rng(self.seed, "poison", attack.name, client))
        return records

    def poison_updates(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                       info: RoundInfo) -> list[ClientUpdate]:
        acting = [u.client for u in updates if self.acts(u.client, info.round)]
        info.metrics["malicious_clients"] = acting
        if not acting or not self.model_attacks:
            return updates
        reference = flatten(global_state)
        deltas = {u.client: flatten(u.state) - reference for u in updates}
        honest = [deltas[c] for c in deltas if c not in acting] or [deltas[c] for c in acting]
        total = sum(u.num_examples for u in updates)
        out = []
        for u in updates:
            if u.client in acting:
                delta = deltas[u.client]
                view = RoundUpdates(honest=torch.stack(honest), num_uploads=len(updates), num_malicious=len(acting),
                                    own_examples=u.num_examples, total_examples=total,
                                    generator=torch_generator(self.seed, "poison-update", info.round, u.client))
                for attack in self.model_attacks:
                    delta = attack.poison_update(delta, view)
                u = replace(u, state=unflatten(reference + delta, u.state))
            out.append(u)
        return out
