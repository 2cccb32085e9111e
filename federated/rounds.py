"""The interface a training algorithm implements, and what the round loop hands it.

An algorithm (FEDIT, FEDPIT, CENIT, LOCIT, or a user's own) says what one client does in one
round (`client_round`) and whether a server aggregates uploads into a global adapter. The loop
(`federated/loop.py`) samples clients, calls the defense hooks around training and aggregation, and
checkpoints every observer's view each round: `global`, `upload/i`, `client/i`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from fedleak.federated.adapters import DEFAULT, AdapterSettings, AdapterState
from fedleak.federated.methods import with_method_lr
from fedleak.federated.data import FederatedData, Record
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeFloat, PositiveFloat, PositiveInt, UnitInterval, check_fields
from fedleak.federated.hooks import Adversary, ClientJob, TrainingHooks
from fedleak.federated.registry import Component, Registry
from fedleak.federated.seeding import derive_seed, torch_generator
from fedleak.federated.training import Example, TrainSettings, encode

if TYPE_CHECKING:  # annotations only: transformers loads with the model, not with the round loop
    from transformers import PreTrainedTokenizerBase

GLOBAL = "<global>"  # in a client view: "the adapter the server aggregated this round"


@dataclass(frozen=True)
class FederationSettings:
    clients: PositiveInt = field(default=3, metadata={"help": "Number of clients the private records are split among."})
    rounds: PositiveInt = field(default=8, metadata={"help": "Federated rounds (each: sample, train locally, aggregate)."})
    client_fraction: UnitInterval = field(default=1.0, metadata={
        "help": "Share of the clients sampled each round: round(client_fraction * clients), at least 1; 1 = all."})
    local_epochs: PositiveInt = field(default=4, metadata={"help": "Passes over its records a client makes per round."})
    batch_size: PositiveInt = field(default=8, metadata={"help": "Examples per optimiser step in local training."})
    lr: PositiveFloat = field(default=3e-3, metadata={"help": "AdamW learning rate of local training."})
    max_grad_norm: NonNegativeFloat = field(default=1.0, metadata={
        "help": "Gradient-norm clipping in local training (not DP's per-sample clipping); 0 = no clipping."})
    partition: Literal["dirichlet", "iid"] = field(default="dirichlet", metadata={
        "help": "How records are split: \"dirichlet\" (per-category shares drawn with alpha: non-IID) or \"iid\"."})
    alpha: PositiveFloat = field(default=1.0, metadata={
        "help": "Dirichlet concentration: small = each client holds few categories, large = close to IID."})
    min_records_per_client: PositiveInt = field(default=8, metadata={
        "help": "Fewest training records a client may get; the Dirichlet split is redrawn (up to 100 times) until "
                "every client has them."})
    response_only_loss: bool = field(default=True, metadata={
        "help": "Train on the response tokens only (prompt tokens masked out of the loss); false: on the whole text."})
    max_length: PositiveInt = field(default=256, metadata={
        "help": "Tokens per training example (prompt + response + EOS); longer examples are cut at the end."})

    def __post_init__(self):
        check_fields(self, "federation.")

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.client_fraction * self.clients))

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                             max_grad_norm=self.max_grad_norm)


@dataclass
class TrainingSetup:
    base_model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: FederatedData
    federation: FederationSettings
    adapter: AdapterSettings  # the method every client trains (federated.methods)
    hooks: TrainingHooks
    seed: int
    out_dir: Path
    config_hash: str
    progress: bool = True
    label: str = ""
    adversary: Adversary = field(default_factory=Adversary)  # malicious clients (a poisoning scenario)


@dataclass
class ClientContext:
    """What a client has in one round; `memory` persists across that client's rounds."""

    client: int
    round: int
    model: torch.nn.Module
    records: list[Record]
    examples: list[Example]
    global_state: AdapterState | None  # the adapter received from the server (None without a server)
    initial_state: AdapterState  # the seeded initial adapter every training starts from
    memory: dict
    setup: TrainingSetup
    data_poisoned: bool = False  # set by poison_data: the round loop checks a malicious client's data was poisoned
    plan: tuple[tuple[str, int], ...] = ()  # the algorithm's training_plan for this client (ClientJob.plan)
    privacy: dict | None = None  # the client's cumulative accounting after its last private training

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.setup.tokenizer

    def poison_data(self, records: list[Record]) -> list[Record]:
        """The records the uploaded adapter trains on, as this client sends them: an algorithm calls this
        on its shared training data (FEDIT: the client's records; FEDPIT: its synthetic records), and a
        malicious client's come back poisoned. Honest clients get `records` itself."""
        self.data_poisoned = True
        return self.setup.adversary.poison_records(records, client=self.client, round=self.round)

    def encode(self, records: list[Record]) -> list[Example]:
        """Tokenise `records` as the round loop tokenises the clients' own (federation.max_length tokens
        at most, loss on the response only when federation.response_only_loss), one example each."""
        fed = self.setup.federation
        return encode(records, self.tokenizer, max_length=fed.max_length, response_only=fed.response_only_loss)

    def train(self, examples: list[Example], *, adapter: str = DEFAULT) -> dict:
        """Train the active `adapter` through the defense's client hook (DP-SGD swaps the loop); a
        malicious client in a round it acts does not follow the protocol and trains without it.

        Args:
            examples: encoded examples (`encode`), in the order the seeded batches draw from.
            adapter: the peft adapter being trained; the algorithm makes it the only trainable one.

        Returns:
            The hook's training metrics: `loss_last_quarter` (mean loss, nats per token, over the last
            quarter of steps), `steps`, `examples`, and what the hook adds (DP-SGD: epsilon).
        """
        # An acting malicious client trains what it shares its own way; a FEDPIT local adapter (never
        # shared) trains like anyone's.
        malicious = adapter == DEFAULT and self.setup.adversary.acts(self.client, self.round)
        settings = with_method_lr(self.setup.federation.train_settings(), self.setup.adapter)
        if malicious:
            settings = self.setup.adversary.train_settings(settings, client=self.client, round=self.round)
        job = ClientJob(client=self.client, round=self.round, model=self.model, examples=examples,
                        settings=settings, pad_id=self.tokenizer.pad_token_id,
                        generator=torch_generator(self.setup.seed, "client-batches", self.round, self.client, adapter),
                        adapter=adapter, planned_rounds=self.setup.federation.rounds, plan=self.plan)
        torch.manual_seed(derive_seed(self.setup.seed, "client-train", self.round, self.client, adapter))  # dropout
        if malicious:
            return job.run()
        metrics = self.setup.hooks.train_client(job)
        self.privacy = job.privacy or self.privacy
        return metrics


@dataclass
class ClientResult:
    upload: AdapterState | None  # what the client sends to the server (None: nothing this round)
    num_examples: int  # the weight of the upload in FedAvg
    view: dict[str, AdapterState | str]  # the client's final model: adapter name -> tensors or GLOBAL
    metrics: dict = field(default_factory=dict)
    artifacts: dict[str, list[dict]] = field(default_factory=dict)  # saved as <name>-client-XX.jsonl


@dataclass
class TrainingRun:
    model: torch.nn.Module  # peft model holding every adapter the algorithm used
    history: list[dict]  # per round: sampled clients, losses, seconds, hook metrics
    train_seconds: float
    final_round: int
    training_dir: Path
    global_members: list[Record]  # the private records that shaped the global adapter


class Algorithm(Component):
    """A training algorithm; hyperparameters are keyword-only `__init__` arguments.

    Subclasses implement `client_round`; the other methods have the FEDIT defaults (Zhang et al.
    2024, "Towards Building the Federated GPT: Federated Instruction Tuning").
    """

    has_server: bool = True  # a server aggregates uploads into a global adapter
    federated: bool = True  # clients exchange updates, so aggregation defenses apply
    record_uploads: bool = True  # a curious server sees per-client uploads
    combines_adapters: bool = False  # clients keep several adapters on at once (FEDPIT's global + local)

    def client_data(self, data: FederatedData) -> list[list[Record]]:
        """The training records of each client, one list per client index (CENIT pools them into one).

        Args:
            data: the run's federated split (clients' records, canaries inserted, held-out records).

        Returns:
            One list of records per client, in client order; the round loop samples clients among them.
        """
        return data.clients

    def global_clients(self, data: FederatedData, contributors: set[int]) -> set[int]:
        """The clients whose private data is behind the global adapter, given those that uploaded.

        Args:
            data: the run's federated split.
            contributors: the clients whose uploads entered the global adapter in at least one round
                (refused, clipped-away and rule-excluded uploads do not count).

        Returns:
            Client indices; empty for an algorithm without a server.
        """
        return set(contributors) if self.has_server else set()

    def global_members(self, data: FederatedData, contributors: set[int]) -> list[Record]:
        """The private records behind the global adapter (canary copies excluded): the members a
        membership attack on the `global` view is scored against.

        Args:
            data: the run's federated split.
            contributors: the clients that uploaded in at least one round.

        Returns:
            The records of `global_clients(data, contributors)`.
        """
        return data.members_of(self.global_clients(data, contributors))

    def training_plan(self, records: int) -> tuple[tuple[str, int], ...]:
        """The trainings a client runs through `ctx.train` each round: a DP defense plans its budget over all.

        Args:
            records: the client's own records (`client_data`'s list for it).

        Returns:
            (adapter, planned records) per training, in the order `client_round` runs them.
        """
        return ((DEFAULT, records),)

    def prepare(self, model: torch.nn.Module, setup: TrainingSetup) -> None:
        """Add adapters beyond the default one, once before the first round (FEDPIT's local adapter).

        Args:
            model: the peft model, its `default` adapter seeded and active.
            setup: the training's settings (LoRA settings, seed).
        """

    @abstractmethod
    def client_round(self, ctx: ClientContext) -> ClientResult:
        """What one sampled client does in one round.

        Args:
            ctx: the client, round, shared model, its records and encoded examples, the adapter it
                received (`global_state`, None without a server) and its `memory` across rounds.
                Train through `ctx.train(...)` (the defense's client hook) and pass the records the
                upload trains on through `ctx.poison_data(...)` (a malicious client's come back poisoned).

        Returns:
            The upload (None: nothing this round) with its FedAvg weight, the client's view (adapter
            name -> tensors, or `GLOBAL` for the round's aggregate), its metrics (a `loss_last_quarter`
            enters the round's mean training loss) and artifacts to save beside the checkpoint.

        Raises:
            FedleakError: the round cannot run (the message names the fix).
        """


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", base=Algorithm, builtin_modules=(
    "fedleak.federated.fedit",
    "fedleak.federated.fedpit",
    "fedleak.federated.baselines",
), entry_point_group="fedleak.algorithms")
register_algorithm = ALGORITHMS.register


def __getattr__(name: str):
    """`run_rounds` lives in `federated/loop.py`; importing it from here keeps working (lazily: loop imports this)."""
    if name == "run_rounds":
        from fedleak.federated.loop import run_rounds
        return run_rounds
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
