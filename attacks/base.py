"""Attacks: registered components that probe one observer's view of a trained federation.

A membership attack returns one score per record, higher = more likely a training member, so
`sklearn.metrics.roc_curve(y_true, scores)` applies as is. Hyperparameters are explicit
keyword-only `__init__` arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedleak.federated.data import Record
from fedleak.federated.registry import Component, Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack", builtin_modules=(
    "fedleak.attacks.loss",
), entry_point_group="fedleak.attacks")
register_attack = ATTACKS.register


@dataclass
class Target:
    """One observer's view: the base model with that observer's adapter loaded, in eval mode."""

    model: object
    tokenizer: object
    observer: str  # "global" or "upload"
    round: int
    client: int | None = None
    max_length: int = 256
    response_only: bool = True  # score the tokens training looked at


class Attack(Component):
    family: str = ""


class MembershipAttack(Attack):
    family = "membership"

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """One score per record; higher = more likely a member."""
        raise NotImplementedError
