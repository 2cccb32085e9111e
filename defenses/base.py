"""Defenses: registered components that hook into federated training.

A defense subclasses `Defense` and overrides only the hooks it needs (see
`fedleak.federated.hooks.TrainingHooks`; each hook is the identity by default). Hyperparameters
are explicit keyword-only `__init__` arguments, checked there with an error that names the field.
"""

from __future__ import annotations

from fedleak.federated.hooks import TrainingHooks
from fedleak.federated.registry import Component, Registry

DEFENSES: Registry[type["Defense"]] = Registry("defense", builtin_modules=(
    "fedleak.defenses.none",
    "fedleak.defenses.median",
))
register_defense = DEFENSES.register


class Defense(TrainingHooks, Component):
    """Base class: override the hooks the defense changes."""
