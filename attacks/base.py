"""Attacks: registered components that probe one observer's view of a trained federation.

Three families share one registry, and an attack derives from its family's base:

- membership attacks return one score per record, higher = more likely a training member, so
  `sklearn.metrics.roc_curve(y_true, scores)` applies as is (`MembershipAttack.score`);
- extraction attacks try to recover what the view trained on and return their own metrics
  (`ExtractionAttack.run` -> `ExtractionResult`), given the ground truth in `Secrets`;
- poisoning attacks act during training as malicious clients (`DataPoisoning`, `ModelPoisoning` in
  `attacks/poisoning/base.py`): a matrix scenario lists them, and the matrix measures their effect
  on each trained model.

Hyperparameters are explicit keyword-only `__init__` arguments. An attack gets the view as a
`Target`; what the attacker has besides the view (the base model, a population of records,
how the target was trained) is the run-wide `AttackEnvironment`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fedleak.federated.data import Canary, Record
from fedleak.federated.registry import Component, Registry

if TYPE_CHECKING:  # annotations only: importing torch and transformers here would make every import pay for them
    import torch
    from transformers import PreTrainedTokenizerBase

    from fedleak.attacks.updates import ServerRecord
    from fedleak.federated.adapters import AdapterSettings
    from fedleak.federated.training import TrainSettings


@dataclass
class AttackEnvironment:
    """What the attacker holds besides the target view; one per run, shared by every target.

    `population` is the pool an attacker can fine-tune shadow models on (the candidate records:
    members and held-out records alike; LiRA's setting). `train` is how each target adapter was
    fine-tuned, for shadows that mimic it. `cache` keeps run-wide results such as the reference
    model's statistics (the base model is the same for every view) and shadow-model statistics.
    """

    tokenizer: PreTrainedTokenizerBase
    seed: int
    max_length: int = 256
    response_only: bool = True
    batch_size: int = 32  # records per forward pass when scoring
    population: list[Record] = field(default_factory=list)
    base_model_ref: str = ""  # folder or id of the base model, for loading fresh copies (shadows)
    allow_download: bool = False  # for a reference model named by a hub id (model.allow_download)
    adapter: AdapterSettings | None = None  # of the target adapters (its method and settings)
    train: TrainSettings | None = None  # how one target was fine-tuned (epochs = total over rounds)
    cache: dict = field(default_factory=dict)
    progress: bool = False  # progress bars over scoring batches
    # Run-wide results worth keeping across processes and machines (LiRA's shadow statistics), keyed by
    # what produced them plus `cache_salt` (the caller's model, data and code fingerprints); None: memory only.
    cache_dir: Path | None = None
    cache_salt: str = ""
    # Records the attacker holds that no model of the run trained on, from the targets' domain where the run
    # knows one (`attack.public_file`, else the embedded generator's public records): ReCaLL's prefixes,
    # DC-PDD's token frequencies, SPV-MIA's self-prompts. Never a target.
    public: list[Record] = field(default_factory=list)


@dataclass
class Target:
    """One observer's view: the base model with that observer's adapters loaded, in eval mode.

    `cache` holds statistics shared by the attacks on this view; key its entries by the records they
    describe: the blind baseline (the same attack with the adapters switched off, `eval/membership_cell.py`)
    scores through a target whose cache is shared by every view of the run, the base model being one.
    """

    model: torch.nn.Module  # a peft model (its adapters can be switched off) or any causal LM
    tokenizer: PreTrainedTokenizerBase
    observer: str  # "global", "upload" or "client"
    round: int
    client: int | None = None
    max_length: int = 256
    response_only: bool = True  # score the tokens training looked at
    env: AttackEnvironment | None = None
    cache: dict = field(default_factory=dict)  # statistics shared by the attacks on this view
    # The training's checkpoints as a curious server holds them (every round's global adapter and uploads,
    # `attacks/updates.py`); None for a target built by hand. Update-based attacks read it.
    server: ServerRecord | None = None

    @property
    def batch_size(self) -> int:
        """Records per forward pass when scoring: the environment's, 32 without one."""
        return self.env.batch_size if self.env is not None else 32


@dataclass
class Secrets:
    """Ground truth of one view for extraction attacks (the embedded generator knows it exactly).

    `records`: the private records the view trained on (canary copies excluded); `canaries`: the
    canaries inserted into that training data, `reference_canaries` same-format secrets never
    inserted; `other_records`: records that are not the view's own (other clients' records, or
    held-out ones), for prompts an attacker builds from others' templates (under FEDIT a client's
    model has seen other clients' records through the global adapter: they are not non-members);
    `nonmembers`: records of the same distribution that no model of the run trained on (the
    held-out split), the control that tells memorisation from what the domain's templates give;
    `clients`: each contributing client's own records (canary copies excluded) by client index, for an
    attacker who is one of them (`fedpii`); empty for a target built by hand.
    """

    records: list[Record]
    canaries: list[Canary] = field(default_factory=list)
    reference_canaries: list[Canary] = field(default_factory=list)
    other_records: list[Record] = field(default_factory=list)
    nonmembers: list[Record] = field(default_factory=list)
    clients: dict[int, list[Record]] = field(default_factory=dict)

    @property
    def identifiers(self) -> list[str]:
        """Every private identifier in the view's training data, once each, in a stable order."""
        seen = dict.fromkeys(i for r in self.records for i in r.identifiers)
        seen.update(dict.fromkeys(i for c in self.canaries for i in (c.patient_name, c.secret)))
        return list(seen)


@dataclass
class ExtractionResult:
    """What an extraction attack found in one view.

    Attributes:
        metrics: flat `{name: value}`, each a float (a rate in [0, 1], an exposure in bits, a count as
            a float): they become the cell's columns in results.json, results.csv and the report
            tables, and are averaged across seeds. NaN where a metric is undefined for this view
            (no canary inserted, no private record): it is written as null.
        details: JSON-serialisable facts behind the metrics (counts, per-canary ranks, a few
            examples of extracted text, a `note` saying why a metric is undefined); written to the
            cell's `details` in results.json and read by the report.
    """

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """`{"metrics": ..., "details": ...}`, the cell fields results.json holds (the same objects, not copies)."""
        return {"metrics": self.metrics, "details": self.details}


class Attack(Component):
    """Base of every attack; a plug-in derives from a family's base instead: `MembershipAttack`,
    `ExtractionAttack`, `DataPoisoning` or `ModelPoisoning` (the last two in `attacks/poisoning/base.py`)."""

    # What the attack reads: "black-box" (the view's model: its outputs or logits), or "updates" (the server's
    # record of the training, white-box: `Target.server`); the report's curious-server section compares the two.
    access: str = "black-box"
    # The views its threat model holds on (the matrix refuses others at config time), and why not the rest.
    observers: tuple[str, ...] = ("global", "upload", "client")
    observers_why: str = ""
    # The adaptation methods (model.adaptation) whose adapters it can read; the matrix refuses others at config time.
    adaptations: tuple[str, ...] = ("lora", "ia3", "prompt_tuning", "prefix_tuning", "full")
    adaptations_why: str = ""

    @property
    @abstractmethod
    def family(self) -> str:
        """The attack's family, "membership", "extraction" or "poisoning": where the matrix runs it and
        how it reports it. Each family's base sets it as a class attribute; derive from one of those."""


class MembershipAttack(Attack):
    """Base of membership inference: one score per record saying how likely it trained the view.

    Subclasses implement `score`. Membership inference against machine-learning models: Shokri,
    Stronati, Song and Shmatikov 2017, "Membership Inference Attacks Against Machine Learning Models";
    the language-model attacks here are those MIMIR benchmarks (Duan et al. 2024, "Do Membership
    Inference Attacks Work on Large Language Models?").
    """

    family = "membership"

    @abstractmethod
    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """Score each record against one observer's view.

        Args:
            target: the view (model in eval mode, tokenizer, observer, round, client) and the
                run's `AttackEnvironment` (`target.env`: seed, population, reference model).
            records: the N records to score, members and non-members mixed; the attack must not
                learn which is which.

        Returns:
            float64 array of shape (N,), in the order of `records`: higher = more likely a training
            member (the unit is the attack's own: a negative loss in nats per token, a log
            likelihood ratio, ...), so `sklearn.metrics.roc_curve(y_true, scores)` applies as is.

        Raises:
            FedleakError: the view or the environment lacks what the attack needs (a reference
                model, shadow statistics of these records); the message names the fix.
        """


class ExtractionAttack(Attack):
    """Base of training-data extraction: recover what the view trained on, measured against the ground
    truth (Carlini, Tramer, Wallace et al. 2021, "Extracting Training Data from Large Language Models";
    canaries and exposure: Carlini, Liu, Erlingsson, Kos and Song 2019, "The Secret Sharer").

    Subclasses implement `run`.
    """

    family = "extraction"

    @abstractmethod
    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        """Attack one observer's view and measure what leaked.

        Args:
            target: the view (model in eval mode, tokenizer, observer, round, client) and the run's
                `AttackEnvironment` (`target.env.seed` seeds any sampling, so reruns agree).
            secrets: the ground truth of this view: its private records and canaries, reference
                canaries never inserted, other clients' and held-out records. The attacker's prompts
                may use only what the attack's threat model grants; the rest scores the outputs.

        Returns:
            The metrics (floats; NaN where undefined for this view) and the JSON-serialisable
            details behind them.

        Raises:
            FedleakError: the target lacks what the attack needs (an `AttackEnvironment`); the
                message names the fix.
        """


def _family_contract(cls: type) -> str | None:
    """An attack derives from a family's base: one derived from `Attack` alone that sets `family`
    itself would register and then lack what the matrix calls (`score`, `run`, the poisoning hooks)."""
    from fedleak.attacks.poisoning.base import DataPoisoning, ModelPoisoning  # that module imports this one

    if issubclass(cls, (MembershipAttack, ExtractionAttack, DataPoisoning, ModelPoisoning)):
        return None
    return ("derives from no attack family's base: derive it from MembershipAttack or ExtractionAttack "
            "(fedleak.attacks.base), DataPoisoning or ModelPoisoning (fedleak.attacks.poisoning.base)")


ATTACKS: Registry[type[Attack]] = Registry("attack", base=Attack, contract=_family_contract, builtin_modules=(
    "fedleak.attacks.membership.loss",
    "fedleak.attacks.membership.zlib",
    "fedleak.attacks.membership.lowercase",
    "fedleak.attacks.membership.min_k",
    "fedleak.attacks.membership.reference",
    "fedleak.attacks.membership.lira",
    "fedleak.attacks.membership.recall",
    "fedleak.attacks.membership.dc_pdd",
    "fedleak.attacks.membership.rmia",
    "fedleak.attacks.membership.spv_mia",
    "fedleak.attacks.membership.update_gradient",
    "fedleak.attacks.membership.fedmia",
    "fedleak.attacks.extraction.discoverable",
    "fedleak.attacks.extraction.pii",
    "fedleak.attacks.extraction.exposure",
    "fedleak.attacks.extraction.generate_rank",
    "fedleak.attacks.extraction.vocabulary",
    "fedleak.attacks.extraction.fedpii",
    "fedleak.attacks.extraction.adversarial_prompt",
    "fedleak.attacks.extraction.adversarial_trigger",
    "fedleak.attacks.poisoning.backdoor",
    "fedleak.attacks.poisoning.label_flip",
    "fedleak.attacks.poisoning.scaling",
    "fedleak.attacks.poisoning.sign_flip",
    "fedleak.attacks.poisoning.gaussian",
    "fedleak.attacks.poisoning.alie",
    "fedleak.attacks.poisoning.ipm",
    "fedleak.attacks.poisoning.harmful_compliance",
), entry_point_group="fedleak.attacks")
register_attack = ATTACKS.register
