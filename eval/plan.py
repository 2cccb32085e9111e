"""Expand a matrix config into work: trainings (algorithm, defense, scenario, seed), each probed by
the attacks its rules allow on the observers they allow, cut by `--only` patterns; and the dry-run
description of that work."""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fedleak.common.errors import FedleakError, did_you_mean
from fedleak.common.names import CLEAN
from fedleak.eval.config import RunConfig
from fedleak.eval.matrix_config import ComponentSpec, MatrixRule, ScenarioSpec
from fedleak.eval.sweep import attack_conflict, conflict, settings_of, variant
from fedleak.eval.sweep import label as setting_label

NO_DEFENSE = ComponentSpec("none")


@dataclass(frozen=True)
class TrainingUnit:
    """One training: trained once, reused by every attack that probes it."""

    algorithm: ComponentSpec
    defense: ComponentSpec
    scenario: ScenarioSpec | None  # None: the clean federation
    seed: int
    setting: tuple[str, Any] | None = None  # a sweep's (dotted path, value); None: the configured settings

    @property
    def scenario_name(self) -> str:
        return self.scenario.name if self.scenario else CLEAN

    @property
    def algorithm_label(self) -> str:
        """The algorithm as results and reports name it: its label, and the swept setting's value if any
        ("fedit [adaptation=prompt_tuning]"), so a variant's rows never merge with another's."""
        return self.algorithm.label + (f" [{setting_label(self.setting)}]" if self.setting else "")

    @property
    def setting_text(self) -> str:
        """The variant as matrix rules match it ("adaptation=prompt_tuning"); "" for the configured settings."""
        return setting_label(self.setting) if self.setting else ""

    @property
    def label(self) -> str:
        return f"{self.algorithm_label}/{self.defense.label}" + (f"/{self.scenario.name}" if self.scenario else "")

    @property
    def stem(self) -> str:
        """The training's folder under `trainings/`: the labels, made safe as one folder name (a long or
        odd one shortened and told apart by a hash of the whole)."""
        text = (f"{self.algorithm.label}-{self.defense.label}" + (f"-{self.scenario.name}" if self.scenario else "")
                + (f"-{setting_label(self.setting)}" if self.setting else ""))
        safe = re.sub(r"[^A-Za-z0-9_.=,+()-]+", "_", text)
        if safe != text or len(safe) > 120:
            safe = f"{safe[:100]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        return f"{safe}-seed{self.seed}"

    def key(self) -> dict:
        return {"algorithm": self.algorithm_label, "defense": self.defense.label, "scenario": self.scenario_name,
                "seed": self.seed,
                **({"setting": {"path": self.setting[0], "value": self.setting[1]}} if self.setting else {})}


@dataclass
class PlannedTraining:
    unit: TrainingUnit
    attacks: list[tuple[ComponentSpec, tuple[str, ...]]] = field(default_factory=list)  # (attack, observers)


def _federated(spec: ComponentSpec) -> bool:
    from fedleak.federated.rounds import ALGORITHMS

    return ALGORITHMS.get(spec.name).federated


def _candidates(config: RunConfig) -> list[TrainingUnit]:
    """Every (algorithm, defense, scenario, seed, swept setting) the rules keep: defenses and malicious
    clients hook into a federation, so non-federated baselines (CENIT, LOCIT) train once per seed and
    setting, clean and without a defense."""
    units = []
    for setting in settings_of(config):
        for seed in config.run_seeds:
            for algorithm in config.matrix.algorithms:
                if _federated(algorithm):
                    units += [TrainingUnit(algorithm, defense, scenario, seed, setting)
                              for scenario in [None, *config.matrix.scenarios] for defense in config.matrix.defenses]
                else:
                    units.append(TrainingUnit(algorithm, NO_DEFENSE, None, seed, setting))
    include, exclude = config.matrix.include, config.matrix.exclude
    return [u for u in units
            if (not include or any(_admits(config, r, u) for r in include))
            and not any(not r.selects_cells and r.covers(u.algorithm, u.defense, u.scenario_name, u.setting_text)
                        for r in exclude)]


def all_trainings(config: RunConfig) -> list[TrainingUnit]:
    """The trainings the matrix and its rules keep, less those a sweep's variant cannot train under its
    adaptation method (`left_out` says which and why)."""
    return [u for u in _candidates(config) if conflict(variant(config, u.setting), u.algorithm, u.defense) is None]


def left_out(config: RunConfig) -> list[str]:
    """What the rules would train or attack but a variant's adaptation method cannot, one line each (the
    dry run and the run log print them)."""
    lines = []
    for u in _candidates(config):
        cfg = variant(config, u.setting)
        if (problem := conflict(cfg, u.algorithm, u.defense)) is not None:
            lines.append(f"left out {u.label}: {problem}")
            continue
        for spec, _ in _ruled_attacks(config, u):
            if (problem := attack_conflict(cfg, spec)) is not None:
                lines.append(f"left out attack {spec.label} on {u.label}: {problem}")
    return lines


def _admits(config: RunConfig, rule: MatrixRule, unit: TrainingUnit) -> bool:
    """An include rule admits a training it covers; one that names attack cells, only a training that
    some such cell probes."""
    if not rule.covers(unit.algorithm, unit.defense, unit.scenario_name, unit.setting_text):
        return False
    return not rule.selects_cells or any(
        rule.covers_cell(spec, o, unit.algorithm, unit.defense, unit.scenario_name, unit.setting_text)
        for spec in config.matrix.attacks if unit.scenario_name in spec.scenarios for o in spec.observers)


def _ruled_attacks(config: RunConfig, unit: TrainingUnit) -> list[tuple[ComponentSpec, tuple[str, ...]]]:
    """The privacy attacks the rules let probe one training, each with the observers they leave it."""
    include, exclude = config.matrix.include, config.matrix.exclude
    where = (unit.algorithm, unit.defense, unit.scenario_name, unit.setting_text)
    out = []
    for spec in config.matrix.attacks:
        if unit.scenario_name not in spec.scenarios:
            continue
        observers = tuple(
            o for o in spec.observers
            if (not include or any(r.covers_cell(spec, o, *where) for r in include))
            and not any(r.selects_cells and r.covers_cell(spec, o, *where) for r in exclude))
        if observers:
            out.append((spec, observers))
    return out


def attacks_of(config: RunConfig, unit: TrainingUnit) -> list[tuple[ComponentSpec, tuple[str, ...]]]:
    """The privacy attacks that probe one training, each with the observers the rules leave it, less those
    that cannot read its adaptation method."""
    cfg = variant(config, unit.setting)
    return [(spec, o) for spec, o in _ruled_attacks(config, unit) if attack_conflict(cfg, spec) is None]


class Selection:
    """`--only` patterns. `a/b/c/d` globs (algorithm, defense, scenario, attack) in order, missing
    trailing parts match anything; a pattern without "/" matches any one of them (name or label, or a
    part of a composed defense). A pattern that selects a training selects all its attacks."""

    def __init__(self, patterns: tuple[str, ...] = ()):
        for pattern in patterns:
            if len(pattern.split("/")) > 4 or not pattern.strip("/"):
                raise FedleakError(f"--only {pattern}: give a name, or algorithm/defense/scenario/attack globs "
                                   f"(at most four parts)")
        self.patterns = tuple(patterns)

    @staticmethod
    def _hit(pattern: str, *names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)

    @staticmethod
    def _defense_names(unit: TrainingUnit) -> tuple[str, ...]:
        parts = unit.defense.parts or (unit.defense,)
        return (unit.defense.name, unit.defense.label, *(n for p in parts for n in (p.name, p.label)))

    def _decides(self, pattern: str, unit: TrainingUnit) -> bool | None:
        """True/False when the pattern decides on the training alone; None when it names an attack."""
        parts = pattern.split("/")
        if len(parts) == 1:
            if self._hit(pattern, unit.algorithm.name, unit.algorithm.label, *self._defense_names(unit),
                         unit.scenario_name, *((setting_label(unit.setting),) if unit.setting else ())):
                return True
            return None
        names = [(unit.algorithm.name, unit.algorithm.label), self._defense_names(unit), (unit.scenario_name,)]
        if not all(self._hit(p, *n) for p, n in zip(parts[:3], names)):
            return False
        return True if len(parts) <= 3 else None

    def _selects(self, pattern: str, unit: TrainingUnit, spec: ComponentSpec) -> bool:
        decided = self._decides(pattern, unit)
        return bool(decided) or (decided is None and self._hit(pattern.split("/")[-1], spec.name, spec.label))

    def selects_attack(self, unit: TrainingUnit, spec: ComponentSpec) -> bool:
        return not self.patterns or any(self._selects(p, unit, spec) for p in self.patterns)

    def selects_training(self, unit: TrainingUnit, attacks: list[ComponentSpec], pattern: str | None = None) -> bool:
        patterns = (pattern,) if pattern else self.patterns
        if not patterns:
            return True
        return any(self._decides(p, unit) or any(self._selects(p, unit, s) for s in attacks) for p in patterns)


def plan(config: RunConfig, only: tuple[str, ...] = ()) -> list[PlannedTraining]:
    selection = Selection(only)
    candidates = [(unit, attacks_of(config, unit)) for unit in all_trainings(config)]
    for pattern in only:  # each pattern must select something: a typo would silently run less
        if not any(selection.selects_training(u, [s for s, _ in a], pattern) for u, a in candidates):
            known = list(dict.fromkeys(n for spec in (*config.matrix.algorithms, *config.matrix.defenses,
                                                      *config.matrix.attacks) for n in (spec.name, spec.label)))
            known += [CLEAN, *(s.name for s in config.matrix.scenarios)]
            raise FedleakError(f"--only {pattern}: matches no training or attack of the matrix: "
                               f"{did_you_mean(pattern.split('/')[-1], known)}use names such as "
                               f"{', '.join(known[:8])}, or algorithm/defense/scenario/attack globs")
    return [PlannedTraining(unit, [(s, o) for s, o in attacks if selection.selects_attack(unit, s)])
            for unit, attacks in candidates if selection.selects_training(unit, [s for s, _ in attacks])]


def views_per_round(config: RunConfig, unit: TrainingUnit, observer: str) -> int:
    """How many views of `observer` one round writes (an estimate for the dry run)."""
    from fedleak.defenses.base import DEFENSES
    from fedleak.federated.rounds import ALGORITHMS

    algorithm = ALGORITHMS.get(unit.algorithm.name)
    per_round = config.federation.clients_per_round if algorithm.federated else config.federation.clients
    if observer == "global":
        return int(algorithm.has_server)
    if observer == "upload":
        hidden = any(getattr(DEFENSES.get(p.name), "hides_uploads", False) for p in (unit.defense.parts or (unit.defense,)))
        return per_round if algorithm.has_server and algorithm.record_uploads and not hidden else 0
    return per_round


def attack_cells(config: RunConfig, unit: TrainingUnit, spec: ComponentSpec, observers: tuple[str, ...]) -> int:
    rounds = config.federation.rounds
    probed = {"final": 1, "all": rounds + 1}.get(spec.rounds) if isinstance(spec.rounds, str) else len(spec.rounds)
    return probed * sum(views_per_round(config, unit, o) for o in observers)


def training_steps(config: RunConfig, unit: TrainingUnit, client_records: list[int]) -> int:
    """Optimizer steps of one training: rounds x sampled clients x local epochs x batches (a malicious
    client's own epochs counted for its share)."""
    fed = config.federation
    per_round = fed.clients_per_round if _federated(unit.algorithm) else len(client_records)
    epochs = float(fed.local_epochs)
    if unit.scenario and unit.scenario.local_epochs:
        share = len(unit.scenario.malicious(num_clients=fed.clients, seed=unit.seed)) / fed.clients
        epochs = (1 - share) * fed.local_epochs + share * unit.scenario.local_epochs
    mean_batches = sum(math.ceil(n / fed.batch_size) for n in client_records) / max(1, len(client_records))
    return int(round(fed.rounds * per_round * epochs * mean_batches))
