"""The `[matrix]` table: which components train and attack, and the rules that cut the matrix.

Owns the parsed forms (`ComponentSpec`, `ScenarioSpec`, `MatrixRule`, `MatrixSettings`) and their
parsing from the config: registered names or `{name = "...", param = value}` tables, defense
compositions, poisoning scenarios, attack placement (observers, rounds, scenarios). Every
component's keyword arguments are checked against its `__init__` annotations (`instantiate`).
"""

from __future__ import annotations

import fnmatch
import functools
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from fedleak.common.errors import FedleakError, did_you_mean
from fedleak.common.names import CLEAN, OBSERVERS
from fedleak.common.params import NonNegativeInt, OpenUnitInterval, PositiveInt, checked, instantiate
from fedleak.eval.sweep import parse_sweep


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component and its keyword arguments, as written in the matrix."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    observers: tuple[str, ...] = ()  # attacks only: which views to probe
    rounds: str | tuple[int, ...] = "final"  # attacks only: "final", "all" (0 = before training) or round numbers
    parts: tuple["ComponentSpec", ...] = ()  # defenses only: a composition of several
    scenarios: tuple[str, ...] = (CLEAN,)  # privacy attacks only: the trainings (by scenario) they probe

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        if self.parts:
            return "+".join(p.label for p in self.parts)
        if not self.params:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in self.params) + ")"


# The config reference's type of the component lists (the annotation says only what they parse into).
NAMES_OR_TABLES = "a list of names or tables"


@dataclass(frozen=True)
class ScenarioSpec:
    """Malicious clients and what they do: `clients` (ids) or `fraction` (of the clients, chosen with
    the run's seed), the poisoning `attacks` in the order they apply, the `rounds` they act in, and
    their `local_epochs` when they act (an attacker trains as long as it likes; default: the federation's)."""

    name: str = field(metadata={"help": "The scenario's name: letters, digits, '_', '-', '.' (it names the "
                                        "training's folder); not \"clean\"."})
    attacks: tuple[ComponentSpec, ...] = field(metadata={
        "help": "Poisoning attacks (names or {name = ..., param = value} tables) in the order they apply; "
                "at most one backdoor.", "type": NAMES_OR_TABLES})
    clients: tuple[NonNegativeInt, ...] = field(default=(), metadata={
        "help": "Ids of the malicious clients (0 to federation.clients - 1); give this or fraction."})
    fraction: OpenUnitInterval | None = field(default=None, metadata={
        "help": "Share of the clients that are malicious, rounded (at least 1), chosen with the run's seed; "
                "give this or clients."})
    rounds: str | tuple[int, ...] = field(default="all", metadata={
        "help": "Rounds the malicious clients act in: \"all\" or a list of round numbers from 1."})
    local_epochs: PositiveInt | None = field(default=None, metadata={
        "help": "Local epochs of a malicious client in the rounds it acts in; unset: the federation's."})

    @property
    def label(self) -> str:
        return self.name

    def malicious(self, *, num_clients: int, seed: int) -> list[int]:
        from fedleak.federated.seeding import numpy_rng

        if self.clients:
            return sorted(self.clients)
        count = max(1, round(self.fraction * num_clients))
        # One seeded order for every scenario: equal fractions pick the same clients and a larger
        # fraction adds to a smaller one's, so scenarios compare like with like.
        return sorted(int(c) for c in numpy_rng(seed, "malicious").permutation(num_clients)[:count])


@dataclass(frozen=True)
class MatrixRule:
    """One `include` or `exclude` rule: glob patterns (on name or label; "a|b" matches either, a leading "!"
    negates the whole) on the axes of a cell, (algorithm, defense, scenario, setting, attack, observer). A rule naming only trainings
    (no `attack`, no `observer`) selects whole trainings: as an exclude rule,
    {algorithm = "fedpit", defense = "!none"} keeps FEDPIT with no defense only. A rule with `attack`
    or `observer` selects attack cells and leaves the trainings alone: {defense = "krum", attack = "*"}
    trains Krum (for its poisoning scenarios) without privacy attacks, {attack = "lira", observer =
    "!global"} runs LiRA on the global view only."""

    algorithm: str = field(default="*", metadata={"help": "Pattern on the algorithm's name."})
    defense: str = field(default="*", metadata={"help": "Pattern on the defense's name or label, e.g. \"krum(f=1)\"."})
    scenario: str = field(default="*", metadata={"help": "Pattern on the scenario's name (\"clean\": no malicious client)."})
    attack: str | None = field(default=None, metadata={
        "help": "Pattern on the attack's name or label; set (or observer set): the rule selects attack cells."})
    observer: str | None = field(default=None, metadata={"help": "Pattern on the observer: global, upload or client."})
    setting: str = field(default="*", metadata={
        "help": "Pattern on a sweep's variant, as its label shows it (e.g. \"adaptation=prompt_tuning\", "
                "\"alpha=*\"); \"\" is the configured settings."})

    @property
    def selects_cells(self) -> bool:
        return self.attack is not None or self.observer is not None

    def covers(self, algorithm: "ComponentSpec", defense: "ComponentSpec", scenario: str = CLEAN,
               setting: str = "") -> bool:
        """Whether the training part of the rule matches (`setting`: the variant's label, "" when configured)."""
        return (_glob(self.algorithm, algorithm) and _glob(self.defense, defense) and _glob_name(self.scenario, scenario)
                and _glob_name(self.setting, setting))

    def covers_cell(self, attack: "ComponentSpec", observer: str, algorithm: "ComponentSpec",
                    defense: "ComponentSpec", scenario: str = CLEAN, setting: str = "") -> bool:
        return (self.covers(algorithm, defense, scenario, setting) and _glob(self.attack or "*", attack)
                and _glob_name(self.observer or "*", observer))


def _glob_name(pattern: str, *names: str) -> bool:
    """Whether a name matches: "a|b" is either pattern, a leading "!" negates the whole ("!loss|lira": neither)."""
    negate = pattern.startswith("!")
    pattern = pattern[1:] if negate else pattern
    return any(fnmatch.fnmatchcase(n, p) for p in pattern.split("|") for n in names) != negate


def _glob(pattern: str, spec: "ComponentSpec") -> bool:
    return _glob_name(pattern, spec.name, spec.label)


def _components(value, key: str, where: str, *, kind: str) -> tuple[ComponentSpec, ...]:
    from fedleak.attacks.base import ATTACKS
    from fedleak.defenses.base import DEFENSES
    from fedleak.federated.rounds import ALGORITHMS

    registry = {"algorithms": ALGORITHMS, "defenses": DEFENSES, "attacks": ATTACKS, "scenario attacks": ATTACKS}[kind]
    if not isinstance(value, list) or not value:
        raise FedleakError(f"{where}: {key} must be a non-empty list of names or {{name = ...}} tables")
    specs = []
    for i, entry in enumerate(value):
        item = f"{key}[{i}]"
        if kind == "defenses" and isinstance(entry, list):
            spec = _composition(entry, item, where)
            if spec in specs:
                raise FedleakError(f"{where}: {item}: {spec.label} is listed twice: remove one")
            specs.append(spec)
            continue
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FedleakError(f"{where}: {item} = {entry!r}: give a name or a table with a 'name' key")
        placement = ("observers", "rounds", "scenarios")
        params = {k: v for k, v in entry.items() if k != "name" and k not in placement}
        observers, rounds, scenarios = (), "final", (CLEAN,)
        try:
            cls = registry.get(entry["name"])
        except FedleakError as exc:
            raise FedleakError(f"{where}: {item}: {exc}") from None
        if kind == "attacks" and cls.family == "poisoning":
            raise FedleakError(f"{where}: {item}: {entry['name']} is a poisoning attack: it acts during training, "
                               f"so list it in a scenario: matrix.scenarios = [{{name = ..., fraction = ..., "
                               f"attacks = [\"{entry['name']}\"]}}]")
        if kind == "attacks":
            observers = _observers(entry.get("observers", ["global"]), f"{item}.observers", where)
            outside = [o for o in observers if o not in cls.observers]
            if outside:  # the attack's threat model does not hold on that view
                raise FedleakError(f"{where}: {item}.observers: {entry['name']} cannot probe the {outside[0]!r} view "
                                   f"({cls.observers_why}): use observers among {list(cls.observers)}")
            rounds = _rounds(entry.get("rounds", "final"), f"{item}.rounds", where)
            scenarios = _names(entry.get("scenarios", [CLEAN]), f"{item}.scenarios", where)
        else:
            for key_ in placement:
                if key_ in entry:
                    raise FedleakError(f"{where}: {item}.{key_}: only privacy attacks in matrix.attacks take {key_}")
        instantiate(cls, params, f"{where}: {item}")
        spec = ComponentSpec(entry["name"], tuple(sorted(params.items())), observers, rounds, scenarios=scenarios)
        # The same attack may be listed twice for disjoint observers (e.g. every round on `global` only).
        if any((s.name, s.params) == (spec.name, spec.params) and (not observers or set(s.observers) & set(observers))
               for s in specs):
            raise FedleakError(f"{where}: {item}: {spec.label} is listed twice"
                               f"{' for the same observer' if observers else ''}: remove one")
        specs.append(spec)
    return tuple(specs)


def component_spec(entry: dict | str | list, kind: str) -> ComponentSpec:
    """One algorithm or defense from its written form (as in the config or in a training.json)."""
    if kind == "defenses" and isinstance(entry, list):
        return _composition(entry, kind, "training.json")
    return _components([entry], kind, "training.json", kind=kind)[0]


def _names(value, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise FedleakError(f"{where}: {key} = {value!r}: give a non-empty list of scenario names "
                           f"(\"{CLEAN}\" is the training without malicious clients)")
    return tuple(dict.fromkeys(value))


SCENARIO_KEYS = ("name", "attacks", "clients", "fraction", "rounds", "local_epochs")
_SCENARIO_HINTS = typing.get_type_hints(ScenarioSpec, include_extras=True)


def _scenarios(value, key: str, where: str) -> tuple[ScenarioSpec, ...]:
    """Poisoning scenarios: tables with a name, the malicious clients and a list of poisoning attacks."""
    from fedleak.attacks.base import ATTACKS

    if not isinstance(value, list):
        raise FedleakError(f"{where}: {key} must be a list of {{name = ..., fraction = ..., attacks = [...]}} tables")
    specs: list[ScenarioSpec] = []
    for i, entry in enumerate(value):
        item = f"{key}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise FedleakError(f"{where}: {item} = {entry!r}: give a table with a 'name', the malicious 'clients' "
                               f"or 'fraction', and 'attacks'")
        name = entry["name"]
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise FedleakError(f"{where}: {item}.name = {name!r}: use letters, digits, '_', '-' and '.' "
                               f"(it names the training's folder)")
        for k in entry:
            if k not in SCENARIO_KEYS:
                raise FedleakError(f"{where}: {item}: unknown key {k!r}: {did_you_mean(k, SCENARIO_KEYS)}"
                                   f"scenario keys: {', '.join(SCENARIO_KEYS)}")
        if name == CLEAN or any(s.name == name for s in specs):
            raise FedleakError(f"{where}: {item}.name = {name!r}: "
                               + (f"\"{CLEAN}\" is the training without malicious clients: choose another name"
                                  if name == CLEAN else "listed twice: give each scenario its own name"))
        if ("clients" in entry) == ("fraction" in entry):
            raise FedleakError(f"{where}: {item}: give the malicious clients as either clients = [ids] or "
                               f"fraction = 0.2 (chosen with the run's seed), not {'both' if 'clients' in entry else 'neither'}")
        clients, fraction = (), None
        if "clients" in entry:
            clients = checked(entry["clients"], _SCENARIO_HINTS["clients"], f"{item}.clients", where)
            if not clients:
                raise FedleakError(f"{where}: {item}.clients = []: give a non-empty list of client ids (0, 1, ...)")
            clients = tuple(sorted(set(clients)))
        else:
            fraction = checked(entry["fraction"], OpenUnitInterval, f"{item}.fraction", where)
        rounds = entry.get("rounds", "all")
        if rounds != "all":
            if not isinstance(rounds, list) or not rounds:
                raise FedleakError(f"{where}: {item}.rounds = {rounds!r}: use \"all\" or a list of round numbers from 1")
            rounds = _rounds(rounds, f"{item}.rounds", where)
            if rounds == "final" or 0 in rounds:
                raise FedleakError(f"{where}: {item}.rounds = {entry['rounds']!r}: use \"all\" or a list of "
                                   f"round numbers from 1")
        attacks = _components(entry.get("attacks"), f"{item}.attacks", where, kind="scenario attacks")
        for j, attack in enumerate(attacks):
            if ATTACKS.get(attack.name).family != "poisoning":
                raise FedleakError(f"{where}: {item}.attacks[{j}]: {attack.name} is not a poisoning attack: "
                                   f"privacy attacks go in matrix.attacks")
        from fedleak.attacks.poisoning.backdoor import Backdoor

        if sum(issubclass(ATTACKS.get(a.name), Backdoor) for a in attacks) > 1:
            raise FedleakError(f"{where}: {item}.attacks: one backdoor per scenario (its success rate is the "
                               f"scenario's ASR): put a second backdoor in a scenario of its own")
        local_epochs = checked(entry.get("local_epochs"), PositiveInt | None, f"{item}.local_epochs", where)
        specs.append(ScenarioSpec(name, attacks, clients, fraction, rounds, local_epochs))
    return tuple(specs)


def _composition(entries: list, key: str, where: str) -> ComponentSpec:
    """A list inside the defenses list: defenses applied together (e.g. ["dp_sgd", "median"])."""
    if len(entries) < 2 or any(isinstance(e, list) for e in entries):
        raise FedleakError(f"{where}: {key}: a composition lists two or more defenses (names or tables), not nested lists")
    parts = _components(entries, key, where, kind="defenses")
    spec = ComponentSpec("+".join(p.name for p in parts), parts=parts)
    build_defense(spec, f"{where}: {key}")
    return spec


def build_defense(spec: ComponentSpec, where: str):
    """The defense a spec names: one registered defense, or a Composition of several."""
    from fedleak.defenses.base import DEFENSES, Composition

    if not spec.parts:
        return instantiate(DEFENSES.get(spec.name), spec.kwargs, where)
    parts = [build_defense(p, where) for p in spec.parts]
    try:
        return Composition(parts)
    except FedleakError as exc:
        raise FedleakError(f"{where}: {exc}") from None


def _observers(value, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise FedleakError(f"{where}: {key} = {value!r}: give a non-empty list of {', '.join(OBSERVERS)}")
    for v in value:
        if v not in OBSERVERS:
            raise FedleakError(f"{where}: {key}: unknown observer {v!r}: {did_you_mean(v, OBSERVERS)}"
                               f"use {', '.join(OBSERVERS)}")
    return tuple(dict.fromkeys(value))


def _rounds(value, key: str, where: str) -> str | tuple[int, ...]:
    if value in ("final", "all"):
        return value
    if (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                   for v in value)):
        return tuple(sorted(set(value)))
    raise FedleakError(f"{where}: {key} = {value!r}: use \"final\", \"all\" or a list of round numbers "
                       f"(0 = before training)")


@dataclass(frozen=True)
class MatrixSettings:
    """The axes and the rules that cut cells from their product: with `include` rules, a training or
    cell must match one of them; it must match no `exclude` rule."""

    include: tuple[MatrixRule, ...] = field(default=(), metadata={
        "help": "Rules a training or attack cell must match one of (none: everything is in)."})
    exclude: tuple[MatrixRule, ...] = field(default=(), metadata={"help": "Rules a training or attack cell must not match."})
    algorithms: tuple[ComponentSpec, ...] = field(default=(ComponentSpec("fedit"),), metadata={
        "help": "Training algorithms: names or {name = ..., param = value} tables (`fedleak list`).",
        "type": NAMES_OR_TABLES,
        "parse": functools.partial(_components, kind="algorithms")})
    defenses: tuple[ComponentSpec, ...] = field(default=(ComponentSpec("none"),), metadata={
        "help": "Defenses, each trained with every algorithm: names, tables, or lists of them (a composition).",
        "type": NAMES_OR_TABLES + " (or lists of them)",
        "parse": functools.partial(_components, kind="defenses")})
    attacks: tuple[ComponentSpec, ...] = field(default=(ComponentSpec("loss", observers=("global",)),), metadata={
        "help": "Privacy attacks: names or tables, with observers (default [\"global\"]), rounds (\"final\", "
                "\"all\" or round numbers, 0 = before training) and scenarios (default [\"clean\"]).",
        "type": NAMES_OR_TABLES,
        "parse": functools.partial(_components, kind="attacks")})
    scenarios: tuple[ScenarioSpec, ...] = field(default=(), metadata={
        "help": "Poisoning scenarios, each trained with every algorithm and defense besides the clean training.",
        "parse": _scenarios})


    adaptations: tuple[Literal["lora", "ia3", "prompt_tuning", "prefix_tuning", "full"], ...] = field(default=(), metadata={
        "help": "Adaptation methods each training repeats with (a sweep of model.adaptation; each method's settings "
                "are its [model.<method>] table); empty: model.adaptation alone."})
    sweep: tuple[tuple[str, tuple], ...] = field(default=(), metadata={
        "help": "Settings to sweep one at a time, the others as configured: \"table.setting\" = [values], e.g. "
                "\"federation.alpha\" = [0.1, 1.0, 10.0]; each value is one more training of every cell.",
        "type": "a table of \"table.setting\" = [values]",
        "parse": parse_sweep, "plain": lambda sweep: {path: list(values) for path, values in sweep}})

    def __post_init__(self):
        if self.adaptations and any(path == "model.adaptation" for path, _ in self.sweep):
            raise FedleakError("matrix.adaptations and matrix.sweep.\"model.adaptation\" both sweep the method: keep one")
        leaves: dict[str, str] = {"adaptation": "model.adaptation"} if self.adaptations else {}
        for path, _ in self.sweep:  # a variant is labelled by its setting's last name: two must not share one
            leaf = path.rsplit(".", 1)[-1]
            if leaf in leaves:
                raise FedleakError(f"matrix.sweep: {leaves[leaf]} and {path} would both label their trainings "
                                   f"\"{leaf}=...\": sweep one of them in this run")
            leaves[leaf] = path
        if len(set(self.adaptations)) != len(self.adaptations):
            raise FedleakError(f"matrix.adaptations = {list(self.adaptations)} lists a method twice: list each once")
