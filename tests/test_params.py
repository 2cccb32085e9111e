"""Every numeric parameter of every registered component, and every numeric settings field, refuses a
wrong type and an out-of-range value at load time, in one line naming the key. The cases are read
from the annotations, so a new component or field is covered without editing this file."""

import dataclasses
import inspect
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fedleak.attacks.base import ATTACKS
from fedleak.common.errors import FedleakError
from fedleak.common.params import Range
from fedleak.defenses.base import DEFENSES
from fedleak.eval.config import load_config, parse_config
from fedleak.eval.configdoc import settings_tables
from fedleak.federated.rounds import ALGORITHMS, FederationSettings

BUILTIN = ("fedleak.attacks.", "fedleak.defenses.", "fedleak.federated.")


def _numeric(annotation) -> tuple[type, Range | None] | None:
    """(int or float, its declared Range) for a numeric annotation, optional or not; else None."""
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _numeric(options[0]) if len(options) == 1 else None
    bounds = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *meta = typing.get_args(annotation)
        bounds = next((m for m in meta if isinstance(m, Range)), None)
    return (annotation, bounds) if annotation in (int, float) else None


def _bad_values(base: type, bounds: Range | None) -> list:
    """A string, a boolean, a non-integer or non-finite number, an integer too large for a float or for
    64 bits, and a value past each declared bound."""
    step = 1 if base is int else 0.5
    bad = ["1", True, 1.5 if base is int else math.nan, 2**63 if base is int else 10**400]
    if base is float:
        bad.append(math.inf)
    if bounds is not None:
        bad += [v for v in (None if bounds.ge is None else bounds.ge - step, bounds.gt,
                            None if bounds.le is None else bounds.le + step, bounds.lt) if v is not None]
    return [base(v) if isinstance(v, float) and base is int and v == int(v) else v for v in bad]


def _component_cases():
    for kind, registry in (("algorithms", ALGORITHMS), ("defenses", DEFENSES), ("attacks", ATTACKS)):
        for name in registry.names():
            cls = registry.get(name)
            if not cls.__module__.startswith(BUILTIN):
                continue
            hints = typing.get_type_hints(cls.__init__, include_extras=True)
            for p in inspect.signature(cls.__init__).parameters.values():
                numeric = p.kind is inspect.Parameter.KEYWORD_ONLY and _numeric(hints.get(p.name))
                for value in _bad_values(*numeric) if numeric else ():
                    kind_ = "scenarios" if kind == "attacks" and cls.family == "poisoning" else kind
                    yield pytest.param(kind_, name, p.name, value, id=f"{name}.{p.name}={value!r:.24}")


def _settings_cases():
    for table, cls in settings_tables():
        if table.startswith(("matrix", "[[")):
            continue  # matrix lists are parsed by their own code (tests/test_config.py, test_poisoning.py)
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            numeric = _numeric(hints[f.name])
            for value in _bad_values(*numeric) if numeric else ():
                prefix = "" if table == "top level" else table + "."
                yield pytest.param(prefix + f.name, value, id=f"{prefix}{f.name}={value!r:.24}")


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _component_config(kind: str, name: str, param: str, value) -> str:
    entry = f'{{name = "{name}", {param} = {_toml(value)}}}'
    if kind == "scenarios":
        return f'[matrix]\nscenarios = [{{name = "s", clients = [0], attacks = [{entry}]}}]\n'
    return f"[matrix]\n{kind} = [{entry}]\n"


def _refused(tmp_path: Path, text: str, key: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(FedleakError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and f"{key} = " in message, message
    assert "expected" in message or "must be" in message, message  # says what would be right
    return message


@pytest.mark.parametrize("kind, name, param, value", list(_component_cases()))
def test_every_component_refuses_a_wrong_numeric_parameter_at_load(tmp_path, kind, name, param, value):
    _refused(tmp_path, _component_config(kind, name, param, value), param)


@pytest.mark.parametrize("key, value", list(_settings_cases()))
def test_every_numeric_settings_field_refuses_a_wrong_value_at_load(tmp_path, key, value):
    table, _, field = key.rpartition(".")
    _refused(tmp_path, (f"[{table}]\n" if table else "") + f"{field} = {_toml(value)}\n", key)


def test_every_component_is_covered():
    """Each registry has numeric parameters to test (a broken annotation walk would test nothing)."""
    covered = {c.values[1] for c in _component_cases()}
    assert {"krum", "multikrum", "geomedian", "fedpit", "lira", "scaling"} <= covered


def test_the_issue_cases_are_one_line_errors_naming_the_key(tmp_path):
    clients = "[federation]\nclients = 10\n"
    assert _refused(tmp_path, clients + _component_config("defenses", "krum", "f", 1.5), "f").endswith(
        "matrix.defenses[0]: krum: f = 1.5 is a number, expected an integer")
    assert "multikrum: m = 2.5 is a number" in _refused(
        tmp_path, clients + '[matrix]\ndefenses = [{name = "multikrum", f = 1, m = 2.5}]\n', "m")
    assert "geomedian: max_iter = 2.5" in _refused(tmp_path, _component_config("defenses", "geomedian", "max_iter", 2.5),
                                                   "max_iter")


def test_valid_numbers_are_coerced_and_python_construction_is_checked_too():
    from fedleak.defenses.krum import Krum

    config = parse_config({"matrix": {"defenses": [{"name": "dp_fedavg", "clip_norm": 1}]}}, "run.toml")
    assert config.matrix.defenses[0].label == "dp_fedavg(clip_norm=1)"  # labels keep what was written
    with pytest.raises(FedleakError, match=r"^krum: f = -1: must be >= 0$"):
        Krum(f=-1)
    with pytest.raises(FedleakError, match="federation.clients = 0: must be a positive integer"):
        FederationSettings(clients=0)


@pytest.mark.parametrize("text, key", [
    ('[federation]\nclients = 10\n[matrix]\ndefenses = [{name = "krum", f = 1.5}]\n', "krum: f = 1.5"),
    ('[matrix]\nattacks = [{name = "min_k", k = nan}]\n', "min_k: k = nan: must be a finite number"),
])
def test_the_cli_refuses_with_exit_status_2_and_one_line(tmp_path, text, key):
    (tmp_path / "run.toml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "fedleak", "run", str(tmp_path / "run.toml"), "--dry-run",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
