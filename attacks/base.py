"""Attacks: registered components that probe one observer's view of a trained federation.

Three families share one registry:

- membership attacks return one score per record, higher = more likely a training member, so
  `sklearn.metrics.roc_curve(y_true, scores)` applies as is (`MembershipAttack.score`);
- extraction attacks try to recover what the view trained on and return their own metrics
  (`ExtractionAttack.run`), given the ground truth in `Secrets`;
- poisoning attacks act during training as malicious clients (`attacks/poisoning/base.py`): a
  matrix scenario lists them, and the matrix measures their effect on each trained model.

Hyperparameters are explicit keyword-only `__init__` arguments. An attack gets the view as a
`Target`; what the attacker has besides the view (the base model, a population of records,
how the target was trained) is the run-wide `AttackEnvironment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fedleak.federated.data import Canary, Record
from fedleak.federated.registry import Component, Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack", builtin_modules=(
    "fedleak.attacks.membership.loss",
    "fedleak.attacks.membership.zlib",
    "fedleak.attacks.membership.lowercase",
    "fedleak.attacks.membership.min_k",
    "fedleak.attacks.membership.reference",
    "fedleak.attacks.membership.lira",
    "fedleak.attacks.extraction.discoverable",
    "fedleak.attacks.extraction.pii",
    "fedleak.attacks.extraction.exposure",
    "fedleak.attacks.extraction.generate_rank",
    "fedleak.attacks.poisoning.backdoor",
    "fedleak.attacks.poisoning.label_flip",
    "fedleak.attacks.poisoning.scaling",
    "fedleak.attacks.poisoning.sign_flip",
    "fedleak.attacks.poisoning.gaussian",
    "fedleak.attacks.poisoning.alie",
    "fedleak.attacks.poisoning.ipm",
), entry_point_group="fedleak.attacks")
register_attack = ATTACKS.register


@dataclass
class AttackEnvironment:
    """What the attacker holds besides the target view; one per run, shared by every target.

    `population` is the pool an attacker can fine-tune shadow models on (the candidate records:
    members and held-out records alike; LiRA's setting). `train` is how each target adapter was
    fine-tuned, for shadows that mimic it. `cache` keeps run-wide results such as the reference
    model's statistics (the base model is the same for every view) and shadow-model statistics.
    """

    tokenizer: object
    seed: int
    max_length: int = 256
    response_only: bool = True
    batch_size: int = 32  # records per forward pass when scoring
    population: list[Record] = field(default_factory=list)
    base_model_ref: str = ""  # folder or id of the base model, for loading fresh copies (shadows)
    allow_download: bool = False  # for a reference model named by a hub id (model.allow_download)
    lora: object = None  # LoraSettings of the target adapters
    train: object = None  # TrainSettings of one target fine-tune (epochs = total over rounds)
    cache: dict = field(default_factory=dict)
    progress: bool = False  # progress bars over scoring batches


@dataclass
class Target:
    """One observer's view: the base model with that observer's adapters loaded, in eval mode."""

    model: object
    tokenizer: object
    observer: str  # "global", "upload" or "client"
    round: int
    client: int | None = None
    max_length: int = 256
    response_only: bool = True  # score the tokens training looked at
    env: AttackEnvironment | None = None
    cache: dict = field(default_factory=dict)  # statistics shared by the attacks on this view

    @property
    def batch_size(self) -> int:
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
    held-out split), the control that tells memorisation from what the domain's templates give.
    """

    records: list[Record]
    canaries: list[Canary] = field(default_factory=list)
    reference_canaries: list[Canary] = field(default_factory=list)
    other_records: list[Record] = field(default_factory=list)
    nonmembers: list[Record] = field(default_factory=list)

    @property
    def identifiers(self) -> list[str]:
        """Every private identifier in the view's training data, once each, in a stable order."""
        seen = dict.fromkeys(i for r in self.records for i in r.identifiers)
        seen.update(dict.fromkeys(i for c in self.canaries for i in (c.patient_name, c.secret)))
        return list(seen)


class Attack(Component):
    family: str = ""


class MembershipAttack(Attack):
    family = "membership"

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """One score per record; higher = more likely a member."""
        raise NotImplementedError


class ExtractionAttack(Attack):
    family = "extraction"

    def run(self, target: Target, secrets: Secrets) -> dict:
        """{"metrics": {name: float}, "details": {...}}: flat float metrics go into results tables;
        details (per-canary exposure, examples of extracted text) go into results.json and the report."""
        raise NotImplementedError
