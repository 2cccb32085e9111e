"""Defenses: registered components that hook into federated training.

A defense subclasses `Defense` and overrides only the hooks it needs (see
`fedleak.federated.hooks.TrainingHooks`; each hook is the identity by default). Hyperparameters
are explicit keyword-only `__init__` arguments, checked there with an error that names the field.
"""

from __future__ import annotations

import inspect

from fedleak.federated.hooks import TrainingHooks
from fedleak.federated.registry import Registry

DEFENSES: Registry[type["Defense"]] = Registry("defense", builtin_modules=(
    "fedleak.defenses.none",
    "fedleak.defenses.median",
))
register_defense = DEFENSES.register


class Defense(TrainingHooks):
    name: str = ""  # set by @register_defense

    def params(self) -> dict:
        """The constructor's arguments, for results files (each subclass stores them as attributes)."""
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters
                if p != "self" and hasattr(self, p)}

    @classmethod
    def summary(cls) -> str:
        return (inspect.getdoc(cls) or "").splitlines()[0]
