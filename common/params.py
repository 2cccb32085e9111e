"""The one checker for every configurable value: settings fields and components' keyword arguments.

A value's type and range are declared once, on its annotation, e.g. `Annotated[int, Range(ge=1)]`
(or the aliases below) on a settings dataclass field or a component's `__init__` parameter.
`checked` reads it: int vs float vs bool vs text, lists, unions, `Literal` choices, finite numbers,
the declared range, and nested settings tables. Config tables go through `build`, component
arguments on every construction (`validated`, which the registries put on each component's
`__init__`; `instantiate` adds the config's place to the message), settings made in
code through `check_fields`; every refusal is one line naming the key and what it must be.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from fedleak.common.errors import FedleakError, did_you_mean

__all__ = ["Range", "PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "UnitInterval",
           "OpenUnitInterval", "checked", "check_fields", "check_kwargs", "build", "instantiate", "validated",
           "expected", "range_text"]


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ge/gt from below, le/lt from above; None leaves that side open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def text(self, base: type) -> str:
        """What a value must be, as an error or the config reference says it: "in (0, 1]", ">= 2"."""
        if base is int and self.ge == 1 and self.le is None and self.lt is None:
            return "a positive integer"
        low = (f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}" if self.gt is not None
               else None)
        high = (f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})" if self.lt is not None
                else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if self.ge is not None else "> ") + low[1:]
        return ("<= " if self.le is not None else "< ") + high[:-1] if high else "any number"


# The ranges most parameters share; a parameter with its own bounds writes Annotated[..., Range(...)].
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
UnitInterval = Annotated[float, Range(gt=0, le=1)]  # a fraction or rate: (0, 1]
OpenUnitInterval = Annotated[float, Range(gt=0, lt=1)]  # a probability strictly between 0 and 1

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_PLURAL_WORDS = {bool: "booleans", int: "integers", float: "numbers", str: "text"}
_VALUE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "text", list: "a list", dict: "a table"}


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def expected(annotation, plural: bool = False) -> str:
    """The annotation in words: "an integer", "a list of integers", "'iid' or 'dirichlet'"."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return expected(typing.get_args(annotation)[0], plural)
    if _is_union(annotation):  # TOML has no null: None is only ever the default
        return " or ".join(expected(a, plural) for a in typing.get_args(annotation) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"a list of {expected(typing.get_args(annotation)[0], plural=True)}"
    if dataclasses.is_dataclass(annotation):
        return "tables" if plural else "a table"
    words = _PLURAL_WORDS if plural else _TYPE_WORDS
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def range_text(annotation) -> str:
    """The declared range in words ("" when none), for errors and the config reference."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        return "; ".join(m.text(base) for m in meta if isinstance(m, Range))
    if origin is tuple:
        item = range_text(typing.get_args(annotation)[0])
        return f"each {item}" if item else ""
    if _is_union(annotation):
        return "; ".join(filter(None, (range_text(a) for a in typing.get_args(annotation))))
    return ""


class _Mismatch(Exception):
    """The value is not of this annotation's type (a union tries its next option)."""


def _coerce(value, annotation, key: str, where: str):
    """`where` is the error prefix: "file: " or ""."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        value = _coerce(value, base, key, where)
        for bounds in (m for m in meta if isinstance(m, Range)):
            if value not in bounds:
                raise FedleakError(f"{where}{key} = {value!r}: must be {bounds.text(base)}")
        return value
    if _is_union(annotation):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value not in typing.get_args(annotation) or isinstance(value, bool):
            raise FedleakError(f"{where}{key} = {value!r}: must be {expected(annotation)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = typing.get_args(annotation)[0]
        return tuple(_checked(v, item, f"{key}[{i}]", where) for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):  # made in code: its own __post_init__ checked it
            return value
        if not isinstance(value, dict):
            raise _Mismatch
        return build(annotation, value, key, where.removesuffix(": "))
    if annotation is type(None):
        if value is None:
            return value
        raise _Mismatch
    if annotation in (int, float) and isinstance(value, bool):
        raise _Mismatch
    if annotation is float and isinstance(value, (int, float)):
        try:
            value = float(value)  # an integer past float's range overflows here
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise FedleakError(f"{where}{key} = {value!r}: must be a finite number")
        return value
    if annotation is int and isinstance(value, int) and not -2**63 <= value < 2**63:
        # numpy and torch take 64-bit integers: a larger one would fail deep inside a run
        raise FedleakError(f"{where}{key} = {value}: must be an integer of 64 bits (below 2**63 in size)")
    if not isinstance(annotation, type) or isinstance(value, annotation):
        return value
    raise _Mismatch


def checked(value, annotation, key: str, where: str = ""):
    """`value` as the annotation wants it (an int where a float is declared becomes a float), or a
    one-line FedleakError "{where}: {key} = {value}: ..."."""
    return _checked(value, annotation, key, f"{where}: " if where else "")


def _checked(value, annotation, key: str, prefix: str):
    try:
        return _coerce(value, annotation, key, prefix)
    except _Mismatch:
        raise FedleakError(f"{prefix}{key} = {value!r} is {_VALUE_WORDS.get(type(value), type(value).__name__)}, "
                           f"expected {expected(annotation)}") from None


@functools.lru_cache(maxsize=None)
def _hints(obj) -> dict:
    return typing.get_type_hints(obj, include_extras=True)


def check_fields(settings, prefix: str = "") -> None:
    """Check a settings dataclass's fields against their annotations (its `__post_init__` calls this,
    so settings made in code are checked as a config's are); `prefix` is its table, e.g. "federation."."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        if f.init:
            checked(getattr(settings, f.name), hints[f.name], prefix + f.name)


def build(cls, table: dict, prefix: str, where: str):
    """A settings dataclass from a config table: unknown keys refused, each value checked. A field
    whose metadata has a "parse" function (the matrix's component lists) is parsed by it instead."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise FedleakError(f"{where}: unknown key {full!r}: {did_you_mean(key, fields)}"
                               f"known keys{' in [' + prefix + ']' if prefix else ''}: {', '.join(fields)}")
        parse = fields[key].metadata.get("parse")
        kwargs[key] = parse(value, full, where) if parse else checked(value, hints[key], full, where)
    try:
        return cls(**kwargs)
    except FedleakError as exc:
        raise FedleakError(f"{where}: {exc}") from None


def _keywords(cls) -> list[str]:
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _label(cls) -> str:
    # Attacks (every family has one) say so: "attack lira: ...", a defense or algorithm is its name.
    return f"attack {cls.name}" if getattr(cls, "family", None) else cls.name or cls.__name__


def check_kwargs(cls, kwargs: dict, where: str = "") -> dict:
    """A component's keyword arguments checked against its `__init__` annotations (and coerced)."""
    hints = _hints(cls.__init__)
    where = f"{where}: {_label(cls)}" if where else _label(cls)
    return {k: checked(v, hints[k], k, where) if k in hints else v for k, v in kwargs.items()}


def validated(init):
    """`init` checking its keyword arguments against its annotations on every call: the registries
    wrap each registered component's `__init__` with it, so a config entry and a construction from
    Python are checked alike (and a plug-in author writes no decorator)."""
    if getattr(init, "_fedleak_validated", False):  # inherited from a registered parent: wrapped once
        return init

    @functools.wraps(init)
    def wrapper(self, **kwargs):
        return init(self, **check_kwargs(type(self), kwargs))
    wrapper._fedleak_validated = True
    return wrapper


def instantiate(cls, params: dict, where: str):
    """Build a component from a config entry: an unknown keyword lists the right ones, a wrong type
    or out-of-range value names the key, all before anything runs."""
    accepted = _keywords(cls)
    for key in params:
        if key not in accepted:
            raise FedleakError(f"{where}: {cls.name} has no parameter {key!r}: {did_you_mean(key, accepted)}"
                               f"its parameters: {', '.join(accepted) or 'none'}")
    try:
        return cls(**params)  # its registered __init__ checks the values (`validated`)
    except FedleakError as exc:
        raise FedleakError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise FedleakError(f"{where}: {cls.name}: {exc}") from None
