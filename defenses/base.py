"""Defenses: registered components that hook into federated training.

A defense subclasses `Defense` and overrides only the hooks it needs (see
`fedleak.federated.hooks.TrainingHooks`; each hook is the identity by default). Hyperparameters
are keyword-only `__init__` arguments whose annotations declare type and range
(`fedleak.common.params`): the registry makes every construction check them, so a config's values
are refused when it loads and a construction from Python the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import AdapterState, flatten
from fedleak.federated.aggregation import finite_results
from fedleak.federated.data import Record
from fedleak.federated.hooks import ClientJob, ClientUpdate, RoundInfo, TrainingHooks
from fedleak.federated.registry import Component, Registry


class Defense(TrainingHooks, Component):
    """Base class: override the hooks the defense changes (none is required: `none` overrides none)."""

    needs_individual_updates = False  # a rule over individual uploads (cannot run under secure aggregation)

    def check(self, *, clients_per_round: int) -> None:
        """Refuse a federation this defense cannot run in; called when the config is checked, before training.

        Args:
            clients_per_round: uploads the server receives each round (federation.clients x
                client_fraction, at least 1); a robust rule that discards f uploads needs enough.

        Raises:
            FedleakError: the defense cannot run with this many uploads; the message names the fix.
        """


def round_start(info: RoundInfo, rule: str) -> AdapterState:
    """The global adapter the round's clients started from (`info.start`, set by the round loop), which a rule
    over updates (upload - start) needs; FedleakError naming the fix when a caller did not set it."""
    if info.start is None:
        raise FedleakError(f"{rule}: RoundInfo.start is not set, and the rule reads updates (upload - start): "
                           f"pass the round's starting global adapter as RoundInfo(start=...)")
    return info.start


def update_rows(results: Sequence[tuple[AdapterState, int]], start: AdapterState) -> tuple[list[int], torch.Tensor,
                                                                                          torch.Tensor]:
    """The finite uploads' updates (upload - start) as rows, for the rules over updates.

    Args:
        results: (upload, num_examples) pairs; non-finite uploads are left out.
        start: the global adapter the round's clients started from.

    Returns:
        The kept indices into `results`, `start` flattened (float64, `federated.adapters.flatten` order) and the
        [len(kept), P] float64 updates.

    Raises:
        ValueError: no results, or none finite.
    """
    if not results:
        raise ValueError("a rule over updates needs at least one client update")
    kept = finite_results(results)
    base = flatten(start)
    return kept, base, torch.stack([flatten(results[i][0]) - base for i in kept])


DEFENSES: Registry[type[Defense]] = Registry("defense", base=Defense, builtin_modules=(
    "fedleak.defenses.none",
    "fedleak.defenses.median",
    "fedleak.defenses.trimmed_mean",
    "fedleak.defenses.krum",
    "fedleak.defenses.bulyan",
    "fedleak.defenses.norm_bound",
    "fedleak.defenses.geomedian",
    "fedleak.defenses.robust_lr",
    "fedleak.defenses.centered_clip",
    "fedleak.defenses.foolsgold",
    "fedleak.defenses.fltrust",
    "fedleak.defenses.server_align",
    "fedleak.defenses.scrub",
    "fedleak.defenses.secagg",
    "fedleak.defenses.dp_sgd",
    "fedleak.defenses.dp_fedavg",
), entry_point_group="fedleak.defenses")
register_defense = DEFENSES.register


def _overrides(part: Defense, hook: str) -> bool:
    return getattr(type(part), hook) is not getattr(Defense, hook)


class Composition(Defense):
    """Several defenses at once: update transforms chain in order; at most one replaces the client
    training loop and at most one the aggregation rule."""

    def __init__(self, parts: list[Defense]):
        self.parts = list(parts)
        names = [p.name for p in self.parts]
        for hook in ("train_client", "aggregate"):
            owners = [p.name for p in self.parts if _overrides(p, hook)]
            if len(owners) > 1:
                raise FedleakError(f"defenses {' + '.join(owners)} both replace {hook.replace('_', ' ')}: "
                                   f"keep one of them")
        hidden = [p.name for p in self.parts if p.hides_uploads]
        individual = [p.name for p in self.parts if p.needs_individual_updates]
        if hidden and individual:
            raise FedleakError(f"{hidden[0]} hides individual uploads but {individual[0]} needs them: "
                               f"they cannot be combined")
        self.hides_uploads = bool(hidden)
        self.needs_individual_updates = bool(individual)
        self.name = "+".join(names)

    def params(self) -> dict:
        """`{part name: its params()}`, in the order the parts compose."""
        return {p.name: p.params() for p in self.parts}

    def _owner(self, hook: str) -> Defense:
        return next((p for p in self.parts if _overrides(p, hook)), Defense())

    def check(self, *, clients_per_round: int) -> None:
        for part in self.parts:
            part.check(clients_per_round=clients_per_round)

    def train_client(self, job: ClientJob) -> dict:
        return self._owner("train_client").train_client(job)

    def client_records(self, records: list[Record], *, client: int) -> tuple[list[Record], dict]:
        facts: dict = {}
        for part in self.parts:
            records, more = part.client_records(records, client=client)
            facts.update(more)
        return records, facts

    def client_state(self, client: int) -> dict:
        return self._owner("train_client").client_state(client)

    def load_client_state(self, client: int, state: dict) -> None:
        self._owner("train_client").load_client_state(client, state)

    def before_aggregation(self, updates: list[ClientUpdate], *, global_state: AdapterState,
                           info: RoundInfo) -> list[ClientUpdate]:
        for part in self.parts:
            updates = part.before_aggregation(updates, global_state=global_state, info=info)
        return updates

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        return self._owner("aggregate").aggregate(updates, info=info)

    def after_aggregation(self, state: AdapterState, *, previous: AdapterState, info: RoundInfo) -> AdapterState:
        for part in self.parts:
            state = part.after_aggregation(state, previous=previous, info=info)
        return state
