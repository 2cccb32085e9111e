"""The run configuration: a TOML file checked up front, so nothing runs on an invalid config.

Every error is one line naming the file, the key and the fix. Tables map onto the settings
dataclasses of the backbone (whose `__post_init__` checks values); `[matrix]` lists defenses and
attacks, each a registered name or an inline table `{name = "...", param = value}`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedleak.federated.adapters import LoraSettings
from fedleak.federated.checkpoint import OBSERVERS
from fedleak.federated.datasource import DataSettings
from fedleak.common.errors import FedleakError, require_positive
from fedleak.common.names import CLEAN
from fedleak.federated.rounds import FederationSettings
from fedleak.federated.model import EmbeddedModelConfig
from fedleak.federated.registry import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ModelSettings:
    name: str = "embedded"  # "embedded", a Hugging Face model id, or a local folder
    allow_download: bool = False  # offline unless asked: hub downloads fail on air-gapped machines
    embedded: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        if not self.name:
            raise FedleakError("model.name is empty: use 'embedded', a Hugging Face id or a local folder")




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


@dataclass(frozen=True)
class ScenarioSpec:
    """Malicious clients and what they do: `clients` (ids) or `fraction` (of the clients, chosen with
    the run's seed), the poisoning `attacks` in the order they apply, the `rounds` they act in, and
    their `local_epochs` when they act (an attacker trains as long as it likes; default: the federation's)."""

    name: str
    attacks: tuple[ComponentSpec, ...]
    clients: tuple[int, ...] = ()
    fraction: float | None = None
    rounds: str | tuple[int, ...] = "all"
    local_epochs: int | None = None

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
    """One `include` or `exclude` rule: glob patterns (on name or label; a leading "!" negates) on the
    axes of a cell, (algorithm, defense, scenario, attack, observer). A rule naming only trainings
    (no `attack`, no `observer`) selects whole trainings: as an exclude rule,
    {algorithm = "fedpit", defense = "!none"} keeps FEDPIT with no defense only. A rule with `attack`
    or `observer` selects attack cells and leaves the trainings alone: {defense = "krum", attack = "*"}
    trains Krum (for its poisoning scenarios) without privacy attacks, {attack = "lira", observer =
    "!global"} runs LiRA on the global view only."""

    algorithm: str = "*"
    defense: str = "*"
    scenario: str = "*"
    attack: str | None = None
    observer: str | None = None

    @property
    def selects_cells(self) -> bool:
        return self.attack is not None or self.observer is not None

    def covers(self, algorithm: "ComponentSpec", defense: "ComponentSpec", scenario: str = CLEAN) -> bool:
        """Whether the training part of the rule matches."""
        return _glob(self.algorithm, algorithm) and _glob(self.defense, defense) and _glob_name(self.scenario, scenario)

    def covers_cell(self, attack: "ComponentSpec", observer: str, algorithm: "ComponentSpec",
                    defense: "ComponentSpec", scenario: str = CLEAN) -> bool:
        return (self.covers(algorithm, defense, scenario) and _glob(self.attack or "*", attack)
                and _glob_name(self.observer or "*", observer))


def _glob_name(pattern: str, *names: str) -> bool:
    negate = pattern.startswith("!")
    pattern = pattern[1:] if negate else pattern
    return any(fnmatch.fnmatchcase(n, pattern) for n in names) != negate


def _glob(pattern: str, spec: "ComponentSpec") -> bool:
    return _glob_name(pattern, spec.name, spec.label)


@dataclass(frozen=True)
class MatrixSettings:
    """The axes and the rules that cut cells from their product: with `include` rules, a training or
    cell must match one of them; it must match no `exclude` rule."""

    include: tuple[MatrixRule, ...] = ()
    exclude: tuple[MatrixRule, ...] = ()
    algorithms: tuple[ComponentSpec, ...] = (ComponentSpec("fedit"),)
    defenses: tuple[ComponentSpec, ...] = (ComponentSpec("none"),)
    attacks: tuple[ComponentSpec, ...] = (ComponentSpec("loss", observers=("global",)),)
    scenarios: tuple[ScenarioSpec, ...] = ()  # poisoning scenarios, trained besides the clean one


@dataclass(frozen=True)
class PoisoningSettings:
    """How the poisoned models are measured: backdoor prompts (held-out records, with and without
    the trigger) answered greedily."""

    prompts: int = 32  # held-out records turned into triggered and clean prompts
    batch_size: int = 16

    def __post_init__(self):
        require_positive(self, ("prompts", "batch_size"), "poisoning.")


@dataclass(frozen=True)
class UtilitySettings:
    records: int = 40  # held-out records each view is evaluated on
    max_new_tokens: int = 64  # greedy answer length for ROUGE-L
    batch_size: int = 16

    def __post_init__(self):
        require_positive(self, ("records", "max_new_tokens", "batch_size"), "utility.")


@dataclass(frozen=True)
class AttackSettings:
    """Settings every attack cell shares: scoring batches, bootstrap and audit."""

    batch_size: int = 32  # records per forward pass when scoring
    bootstrap: int = 1000  # resamples for the AUC confidence interval (0 = none)
    confidence: float = 0.95  # of the AUC interval and of the audit's Clopper-Pearson bounds
    delta: float = 1e-5  # of the empirical epsilon when the training has no accountant

    def __post_init__(self):
        require_positive(self, ("batch_size",), "attack.")
        if self.bootstrap < 0:
            raise FedleakError(f"attack.bootstrap = {self.bootstrap}: must be >= 0 (0 skips the interval)")
        if not 0 < self.confidence < 1:
            raise FedleakError(f"attack.confidence = {self.confidence}: must be in (0, 1), e.g. 0.95")
        if not 0 <= self.delta < 1:
            raise FedleakError(f"attack.delta = {self.delta}: must be in [0, 1), e.g. 1e-5")


@dataclass(frozen=True)
class RunConfig:
    plugins: tuple[str, ...] = ()  # modules imported first; they register components with the decorators
    seed: int = 0
    seeds: tuple[int, ...] = ()  # several seeds: every training repeats per seed (`seed` is then unused)
    out: str = ""  # output folder; `fedleak run --out` overrides; relative to the working directory
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    matrix: MatrixSettings = field(default_factory=MatrixSettings)
    utility: UtilitySettings = field(default_factory=UtilitySettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    poisoning: PoisoningSettings = field(default_factory=PoisoningSettings)

    def __post_init__(self):
        if self.seed < 0 or any(s < 0 for s in self.seeds):
            raise FedleakError("seeds must be integers >= 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise FedleakError(f"seeds = {list(self.seeds)} repeats a seed: list each once")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    def for_seed(self, seed: int) -> "RunConfig":
        """The config of one seed's trainings (everything seeded reads `seed`)."""
        return dataclasses.replace(self, seed=seed, seeds=())

    def to_dict(self) -> dict:
        return plain(self)

    def hash(self) -> str:
        """sha256 of the whole config (the training and attack caches key only the parts that matter)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plain(obj):
    if isinstance(obj, ComponentSpec) and obj.parts:
        return [plain(p) for p in obj.parts]
    if isinstance(obj, ComponentSpec):
        extra = {"observers": list(obj.observers)} if obj.observers else {}
        if obj.observers:
            extra["rounds"] = obj.rounds if isinstance(obj.rounds, str) else list(obj.rounds)
            extra["scenarios"] = list(obj.scenarios)
        return {"name": obj.name, **obj.kwargs, **extra}
    if isinstance(obj, ScenarioSpec):
        return {"name": obj.name, "attacks": [plain(a) for a in obj.attacks],
                **({"clients": list(obj.clients)} if obj.clients else {"fraction": obj.fraction}),
                "rounds": obj.rounds if isinstance(obj.rounds, str) else list(obj.rounds),
                **({"local_epochs": obj.local_epochs} if obj.local_epochs else {})}
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [plain(v) for v in obj]
    return obj


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _describe(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "text", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _expected(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(annotation) if a is not type(None))  # TOML has no null
    if origin is tuple:
        return f"a list of {_expected(typing.get_args(annotation)[0])}"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


class _Mismatch(Exception):
    pass


def _coerce(value, annotation, key: str, where: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch
        item = typing.get_args(annotation)[0]
        return tuple(_checked(v, item, f"{key}[{i}]", where) for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(annotation, value, key, where)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, annotation):
        return value
    raise _Mismatch


def _checked(value, annotation, key: str, where: str):
    try:
        return _coerce(value, annotation, key, where)
    except _Mismatch:
        raise FedleakError(f"{where}: {key} = {value!r} is {_describe(value)}, expected {_expected(annotation)}") from None


def _build(cls, table: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise FedleakError(f"{where}: unknown key {full!r}: {did_you_mean(key, known)}"
                               f"known keys{' in [' + prefix + ']' if prefix else ''}: {', '.join(known)}")
        if cls is MatrixSettings and key == "scenarios":
            kwargs[key] = _scenarios(value, full, where)
        elif cls is MatrixSettings and key not in ("include", "exclude"):
            kwargs[key] = _components(value, full, where, kind=key)
        else:
            kwargs[key] = _checked(value, hints[key], full, where)
    try:
        return cls(**kwargs)
    except FedleakError as exc:
        raise FedleakError(f"{where}: {exc}") from None


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
            clients = entry["clients"]
            if (not isinstance(clients, list) or not clients
                    or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in clients)):
                raise FedleakError(f"{where}: {item}.clients = {clients!r}: give a non-empty list of client ids (0, 1, ...)")
            clients = tuple(sorted(set(clients)))
        else:
            fraction = entry["fraction"]
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
                raise FedleakError(f"{where}: {item}.fraction = {fraction!r}: must be a number in (0, 1)")
            fraction = float(fraction)
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
        local_epochs = entry.get("local_epochs")
        if local_epochs is not None and (isinstance(local_epochs, bool) or not isinstance(local_epochs, int)
                                         or local_epochs < 1):
            raise FedleakError(f"{where}: {item}.local_epochs = {local_epochs!r}: must be a positive integer "
                               f"(the malicious clients' local epochs; leave it out for the federation's)")
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


def instantiate(cls, params: dict, where: str):
    """Build a component, turning a wrong keyword into a one-line error that lists the right ones."""
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in params:
        if key not in accepted:
            raise FedleakError(f"{where}: {cls.name} has no parameter {key!r}: {did_you_mean(key, accepted)}"
                               f"its parameters: {', '.join(accepted) or 'none'}")
    try:
        return cls(**params)
    except FedleakError as exc:
        raise FedleakError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise FedleakError(f"{where}: {cls.name}: {exc}") from None


def parse_config(table: dict, where: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    plugins = table.get("plugins", [])
    load_plugins(_checked(plugins, tuple[str, ...], "plugins", where), where, base_dir)
    if "seed" in table and "seeds" in table:
        raise FedleakError(f"{where}: both seed and seeds are set: keep seeds = [...] (one seed: seed = N)")
    config = _build(RunConfig, table, "", where)
    _check_combinations(config, where)
    return config


def _check_rule_names(config: RunConfig, where: str) -> None:
    """A plain name (no glob character) in an include or exclude rule must name something on its axis:
    a typo would otherwise match nothing and silently keep (or drop) what the user meant."""
    from fedleak.federated.checkpoint import OBSERVERS

    axes = {"algorithm": config.matrix.algorithms, "defense": config.matrix.defenses,
            "attack": config.matrix.attacks}
    for kind in ("include", "exclude"):
        for i, rule in enumerate(getattr(config.matrix, kind)):
            for field_name in ("algorithm", "defense", "scenario", "attack", "observer"):
                pattern = getattr(rule, field_name)
                name = (pattern or "*").removeprefix("!")
                if any(ch in name for ch in "*?["):
                    continue
                if field_name == "scenario":
                    known = [CLEAN, *(s.name for s in config.matrix.scenarios)]
                elif field_name == "observer":
                    known = list(OBSERVERS)
                else:
                    known = list(dict.fromkeys(n for spec in axes[field_name] for n in (spec.name, spec.label)))
                if name not in known:
                    raise FedleakError(f"{where}: matrix.{kind}[{i}].{field_name} = {pattern!r} matches no "
                                       f"{field_name} of the matrix: {did_you_mean(name, known)}"
                                       f"known: {', '.join(known)}")


def _check_not_late(rounds: str | tuple[int, ...], config: RunConfig, key: str) -> None:
    """Listed rounds (attacks probe them, malicious clients act in them) must exist in the federation."""
    late = [r for r in (() if isinstance(rounds, str) else rounds) if r > config.federation.rounds]
    if late:
        raise FedleakError(f"{key}: round {late[0]} is after the last round "
                           f"(federation.rounds = {config.federation.rounds}): remove it")


def _check_combinations(config: RunConfig, where: str) -> None:
    """Checks across tables: each defense against the federation it would run in."""
    from fedleak.federated.rounds import ALGORITHMS

    for i, spec in enumerate(config.matrix.attacks):
        _check_not_late(spec.rounds, config, f"{where}: matrix.attacks[{i}].rounds")
    _check_rule_names(config, where)
    known = [CLEAN, *(s.name for s in config.matrix.scenarios)]
    for i, spec in enumerate(config.matrix.attacks):
        for name in spec.scenarios:
            if name not in known:
                raise FedleakError(f"{where}: matrix.attacks[{i}].scenarios: unknown scenario {name!r}: "
                                   f"{did_you_mean(name, known)}known: {', '.join(known)}")
    clients = config.federation.clients
    for i, scenario in enumerate(config.matrix.scenarios):
        item = f"{where}: matrix.scenarios[{i}] ({scenario.name})"
        if any(c >= clients for c in scenario.clients):
            raise FedleakError(f"{item}.clients = {list(scenario.clients)}: ids go from 0 to {clients - 1} "
                               f"(federation.clients = {clients})")
        if len(scenario.malicious(num_clients=clients, seed=config.seed)) >= clients:
            raise FedleakError(f"{item}: every one of the {clients} clients would be malicious: "
                               f"lower the fraction or list fewer clients")
        _check_not_late(scenario.rounds, config, f"{item}.rounds")
    if not any(ALGORITHMS.get(a.name).federated for a in config.matrix.algorithms):
        if config.matrix.scenarios:
            raise FedleakError(f"{where}: matrix.scenarios need a federated algorithm (fedit, fedpit): "
                               f"non-federated baselines have no malicious clients")
        return
    for i, spec in enumerate(config.matrix.defenses):
        item = f"{where}: matrix.defenses[{i}]"
        try:
            build_defense(spec, item).check(clients_per_round=config.federation.clients_per_round)
        except FedleakError as exc:
            raise FedleakError(exc if str(exc).startswith(item) else f"{item}: {exc}") from None


def load_plugins(modules: tuple[str, ...], where: str, base_dir: Path | None = None) -> None:
    """Import plug-in modules (the config's folder first on the path, so a my_defense.py beside it works)."""
    import importlib

    if base_dir is not None and str(base_dir.resolve()) not in sys.path:
        sys.path.insert(0, str(base_dir.resolve()))
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise FedleakError(f"{where}: plugins[{i}] = {module!r}: no module named {exc.name!r}: install the "
                               f"plug-in or put {module}.py beside the config") from None
        except FedleakError as exc:
            raise FedleakError(f"{where}: plugins[{i}] = {module!r}: {exc}") from None
        except Exception as exc:  # the plug-in's own bug: name it in one line, not a traceback
            raise FedleakError(f"{where}: plugins[{i}] = {module!r} failed to import: "
                               f"{type(exc).__name__}: {exc}: fix the plug-in") from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedleakError(f"{path}: config file not found: give the path of a TOML file such as configs/quick.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise FedleakError(f"{path}: invalid TOML ({exc}): fix the syntax") from None
    return parse_config(table, str(path), base_dir=path.parent)
