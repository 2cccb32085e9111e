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
    # The trainings the client runs each round, (adapter, planned records) in order (`Algorithm.training_plan`):
    # a privacy budget is planned over all of them. Empty: this job alone, on its examples.
    plan: tuple[tuple[str, int], ...] = ()
    privacy: dict | None = None  # set by a private train_client: the client's cumulative accounting after it

    def run(self) -> dict:
        """Train `adapter` in place with plain AdamW on `examples`, batches drawn from `generator`.

        Returns:
            The training metrics of `train_adapter` (per-step losses, `loss_last_quarter`), which
            become the client's metrics in the round history.
        """
        return train_adapter(self.model, self.examples, self.settings, pad_id=self.pad_id, generator=self.generator)


@dataclass
class ClientUpdate:
    """One upload as the server receives it."""

    client: int
    state: AdapterState  # the client's adapter after local training: LoRA tensor name -> tensor
    num_examples: int  # its FedAvg weight


class ServerModel:
    """The model the server holds beside the round loop, for a defense that trains on the server's own data
    (FLTrust's root update, a server-side fine-tune): the engine builds it from the clients' seeded model."""

    seed: int  # the run's seed: a server-side data draw derives its stream from it

    def train(self, records: Sequence[Record], *, start: AdapterState, round: int, purpose: str) -> tuple[AdapterState,
                                                                                                           dict]:
        """Train the shared (default) adapter from `start` on `records` as an honest client trains its upload
        (the federation's local epochs, batch size, learning rate and clipping; plain AdamW; seeded batches).

        Args:
            records: the server's records.
            start: the adapter to start from (the round's starting global adapter).
            round: the round (1-based); seeds the batch order with `purpose`.
            purpose: names the training in its seed (one stream per defense and use).

        Returns:
            The trained adapter and the training metrics (`loss_last_quarter`, `steps`, `examples`).
        """
        raise NotImplementedError


@dataclass
class RoundInfo:
    """The server's side of one round, shared by every hook of the round."""

    round: int  # 1-based
    clients: list[int]  # sampled this round, ascending
    num_clients_total: int
    generator: torch.Generator  # seeded per round: server-side randomness (noise) draws from it
    metrics: dict = field(default_factory=dict)  # hooks record per-round facts here (epsilon, exclusions)
    # The global adapter the round's clients started from: rules over updates (upload - start) read it.
    start: AdapterState | None = None
    # The server's model, where the engine gives the server one (rules that train server-side read it).
    server: ServerModel | None = None


class TrainingHooks:
    """A defense's hooks, called in this order each round; each defaults to plain FedAvg training
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").

    An adapter state is `{LoRA tensor name: tensor}` as peft names them; a hook returns new tensors
    rather than changing its inputs in place (the round loop checkpoints them).
    """

    hides_uploads = False  # the server never sees individual uploads (secure aggregation)

    def train_client(self, job: ClientJob) -> dict:
        """One honest client's local training (DP-SGD replaces the loop; malicious clients skip this hook).

        Args:
            job: the client, round, model (its `job.adapter` trainable), encoded examples, settings
                and seeded batch generator; `job.run()` is the plain loop. A private training plans
                its budget over `job.plan` and `job.planned_rounds`, and sets `job.privacy` to the
                client's cumulative accounting (`epsilon`, `delta`, `target_epsilon`, `accounting`:
                the accountant's (sigma, sample rate, steps) history): the round loop records it
                in the round history's `client_privacy`, however the algorithm nests its metrics.

        Returns:
            Training metrics, JSON-serialisable, with at least `loss_last_quarter` (mean training
            loss in nats per token over the last quarter of steps) as `job.run()` returns them.

        Raises:
            FedleakError: the job cannot be trained this way (the message names the fix).
        """
        return job.run()

    def client_records(self, records: list[Record], *, client: int) -> tuple[list[Record], dict]:
        """The records a client trains on, given its own, before any training or encoding (data sanitisation).

        Called once per client and training, on what `Algorithm.client_data` gives the client; every use of the
        client's data in the rounds (its examples, FEDPIT's self-generation demonstrations) sees the result, while
        the attacks keep scoring the original records.

        Args:
            records: the client's records (canary copies included).
            client: the client's id.

        Returns:
            The records to use (the same list when nothing changes) and facts about the change, JSON values (they
            go to each of the client's rounds in the history as its metrics' `sanitisation`); empty when nothing changes.
        """
        return records, {}

    def client_state(self, client: int) -> dict:
        """What `train_client` keeps about `client` between rounds, as JSON values (DP-SGD: its accountant's
        history and sigma); an engine whose clients run in other processes carries it across rounds.

        Args:
            client: the client's id.

        Returns:
            A JSON-serialisable dict; empty when the hook keeps nothing (the default).
        """
        return {}

    def load_client_state(self, client: int, state: dict) -> None:
        """Restore what `client_state(client)` returned, before the client's next training in this process.

        Args:
            client: the client's id.
            state: `client_state(client)`'s value from the client's last round (empty before its first).
        """

    def before_aggregation(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                           info: RoundInfo) -> list[ClientUpdate]:
        """Transform the uploads the server received (norm clipping); called after the adversary's.

        Args:
            updates: one per uploading client, in client order, malicious uploads already poisoned;
                uploads with a NaN or inf value were refused before this hook (`info.metrics["refused"]`),
                so at least one and every value finite.
            global_state: the global adapter the clients started from this round.
            info: the round; record per-round facts in `info.metrics` (they go to the round history).

        Returns:
            The updates to aggregate: usually one per input, same clients and weights.
        """
        return updates

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        """The aggregation rule (robust rules: median, Krum, ...); FedAvg weighted by `num_examples`.

        Args:
            updates: what `before_aggregation` returned, at least one.
            info: the round; a rule that excludes uploads lists them in `info.metrics["excluded_clients"]`.

        Returns:
            The new global adapter, with the same tensor names and shapes as the uploads.

        Raises:
            FedleakError: too few updates for the rule (the message names the fix).
        """
        return fedavg([(u.state, u.num_examples) for u in updates])

    def after_aggregation(self, state: AdapterState, *, previous: AdapterState, info: RoundInfo) -> AdapterState:
        """Transform the aggregated adapter before it is checkpointed and sent out (server-side DP noise).

        Args:
            state: what `aggregate` returned.
            previous: the global adapter of the previous round (the round's starting point).
            info: the round; `info.generator` is seeded per round for server-side randomness, and
                `info.metrics` takes per-round facts (epsilon spent).

        Returns:
            The global adapter of this round, with `state`'s tensor names and shapes.
        """
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
        """Whether a client attacks in a round (the default adversary never does).

        Args:
            client: the client's id, 0 to clients - 1.
            round: the round, from 1.

        Returns:
            True when `client` is malicious and acts in `round`: the round loop then routes its
            records through `poison_records` and its update through `poison_update`.
        """
        return False

    def poison_records(self, records: list[Record], *, client: int, round: int) -> list[Record]:
        """The records behind `client`'s upload in `round`, given its clean ones.

        Args:
            records: what the algorithm shares the training of (FEDIT: the client's records;
                FEDPIT: its synthetic records).
            client, round: who trains, when (1-based round).

        Returns:
            `records` itself for an honest client or a round it does not act in, else the poisoned
            records (a new list).
        """
        return records

    def train_settings(self, settings: TrainSettings, *, client: int, round: int) -> TrainSettings:
        """How an acting malicious client trains locally (it skips the defense's client hook).

        Args:
            settings: the federation's local training settings.
            client, round: the acting client and the round (1-based).

        Returns:
            The settings it trains its upload with (more epochs for model replacement).
        """
        return settings

    def poison_updates(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                       info: RoundInfo) -> list[ClientUpdate]:
        """The uploads after the malicious clients rewrote theirs, before any defense hook sees them.

        Args:
            updates: every upload of the round, in client order.
            global_state: the global adapter the clients started from.
            info: the round; the adversary lists the acting clients in `info.metrics["malicious_clients"]`.

        Returns:
            One update per input, same clients and weights; honest uploads unchanged.
        """
        return updates
