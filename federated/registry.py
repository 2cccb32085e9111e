"""Name -> component registries (attacks, defenses, ...): duplicates refused, typos answered.

A class is checked when it registers, not when the matrix first calls it: it must derive from the
registry's base and implement every abstract method, so a broken plug-in fails at import (the
config's `plugins = [...]` turns that into a one-line config error) rather than after training.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from abc import ABC
from typing import Callable, Generic, Iterable, TypeVar

from fedleak.common.errors import FedleakError, did_you_mean
from fedleak.common.params import validated

T = TypeVar("T")
PLUGIN_GROUP_PREFIX = "fedleak."  # every registry's entry-point group is "fedleak.<kind>s"


def plugin_entry_points() -> list:
    """Every installed entry point of a fedleak group, sorted: each registry loads all of its group's on
    first lookup, so these are the plug-ins a run loads (what the cache's code fingerprint must cover)."""
    import re
    from importlib.metadata import distributions

    found, seen = [], set()
    for dist in distributions():  # as entry_points() does: the first of a name on sys.path wins
        name = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower())
        if name in seen:
            continue
        seen.add(name)
        found += [ep for ep in dist.entry_points if ep.group.startswith(PLUGIN_GROUP_PREFIX)]
    return sorted(found, key=lambda ep: (ep.group, ep.name, ep.value))


class RegistryError(FedleakError):
    pass


class Registry(Generic[T]):
    """Components register with `@registry.register("name")`.

    Built-in modules are imported on first lookup, so importing fedleak stays cheap and a heavy
    backend is only loaded when its component is listed or used.
    """

    def __init__(self, kind: str, *, base: type, builtin_modules: Iterable[str] = (),
                 entry_point_group: str | None = None, contract: Callable[[type], str | None] | None = None):
        """
        Args:
            kind: what the registry holds, as errors name it ("attack", "defense", "algorithm").
            base: the class every registered class must derive from.
            builtin_modules: fedleak's own modules that register into it, imported on first lookup.
            entry_point_group: the entry-point group third-party packages register through.
            contract: a further check of a class at registration: None when it holds, else what is
                wrong and how to fix it (e.g. the attack registry wants a family's base, not `Attack`).
        """
        self.kind = kind
        self.base = base
        self._contract = contract
        self._builtin_modules = tuple(builtin_modules)
        self._entry_point_group = entry_point_group
        self._loaded = False
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A class decorator that registers the class under `name` and sets its `name` attribute.

        Args:
            name: the name configs use (`[matrix] defenses = ["name"]`); unique within this registry.

        Returns:
            The decorator; it returns the class, its `__init__` wrapped so that every construction
            checks the keyword arguments against their annotations (`fedleak.common.params.validated`).

        Raises:
            RegistryError: when the decorator is applied: `name` is taken by another class, or the
                class does not derive from the registry's base, or it leaves an abstract method of
                the base undefined (the message names the method and where it is documented).
        """
        def decorator(obj: T) -> T:
            if getattr(obj, "__module__", None) not in self._builtin_modules:
                self._load_builtins()  # so a plug-in that takes a built-in's name is the one refused
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} ({_where(obj)}) is already registered by "
                                    f"{_where(self._items[name])}: pick another name")
            self._check(name, obj)
            if obj.__init__ is not object.__init__:
                obj.__init__ = validated(obj.__init__)  # every construction checks its arguments
            self._items[name] = obj
            obj.name = name
            return obj

        return decorator

    def _check(self, name: str, obj: T) -> None:
        label = f"{self.kind} {name!r} ({_where(obj)})"
        if not (inspect.isclass(obj) and issubclass(obj, self.base)):
            raise RegistryError(f"{label} does not subclass {self.base.__name__}: derive it from "
                                f"{_where(self.base)} (or one of its subclasses)")
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        if missing:
            owners = [_declared_by(obj, m) for m in missing]
            calls = ", ".join(m if isinstance(o.__dict__[m], property) else f"{m}()" for m, o in zip(missing, owners))
            # A misspelt override (`scores` for `score`) is the usual cause: point at it.
            own = [a for a in vars(obj) if not a.startswith("_")]
            hints = "".join(did_you_mean(m, own) for m in missing)
            raise RegistryError(f"{label} does not implement {calls}: {hints}define "
                                f"{'it' if len(missing) == 1 else 'them'} (see "
                                f"{', '.join(f'{o.__name__}.{m}' for m, o in zip(missing, owners))})")
        broken = self._contract(obj) if self._contract else None
        if broken:
            raise RegistryError(f"{label} {broken}")
        _check_init(label, obj)
        # A misspelt optional hook (`after_aggregate` for `after_aggregation`) would register and never
        # be called: a public method the base does not have, named almost like one it has, is refused.
        hooks = [m for m in dir(self.base) if not m.startswith("_") and callable(getattr(self.base, m))]
        for attr, value in vars(obj).items():
            if attr.startswith("_") or hasattr(self.base, attr) or not callable(value):
                continue
            close = difflib.get_close_matches(attr, hooks, n=1, cutoff=0.85)
            if close:
                raise RegistryError(f"{label} defines {attr}(), which {self.base.__name__} never calls: "
                                    f"did you mean {close[0]}()? rename it (or make it private: _{attr})")

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)
            if self._entry_point_group:
                self._load_entry_points(self._entry_point_group)

    def _load_entry_points(self, group: str) -> None:
        """Third-party components: `[project.entry-points."GROUP"] name = "module:Class"`."""
        from importlib.metadata import entry_points

        for entry_point in entry_points(group=group):
            try:
                obj = entry_point.load()
            except Exception as exc:  # a broken plug-in names itself instead of a traceback
                raise RegistryError(f"plug-in {entry_point.name!r} ({entry_point.value}) in entry-point group "
                                    f"{group!r} failed to load: {type(exc).__name__}: {exc}") from None
            if self._items.get(entry_point.name) is not obj:
                self.register(entry_point.name)(obj)

    def get(self, name: str) -> T:
        """The class registered as `name` (built-ins and entry-point plug-ins loaded on first use).

        Raises:
            RegistryError: no such name; the message suggests the closest and lists every name.
        """
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}: {did_you_mean(name, self._items)}"
                                f"available: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        """Every registered name, sorted (built-ins and entry-point plug-ins included)."""
        self._load_builtins()
        return sorted(self._items)


class Component(ABC):
    """What every registered component shares: its name and how it describes itself.

    An ABC, so a base declares what a plug-in must define with `@abstractmethod` and the registry
    refuses a class that leaves one undefined.
    """

    name: str = ""  # set by the registry's decorator

    def params(self) -> dict:
        """The keyword arguments it was built with (each subclass stores them as attributes).

        Returns:
            `{argument: value}` for every `__init__` argument stored under its own name; results.json
            records it beside the component's name.
        """
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters
                if p != "self" and hasattr(self, p)}

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring: what `fedleak list` prints beside the name."""
        return (inspect.getdoc(cls) or "").splitlines()[0]


def _check_init(label: str, cls: type) -> None:
    """A config can set only keyword-only arguments, and only an annotated one can be checked at load
    time: refuse anything else now, naming the argument, rather than pass it through unchecked."""
    if cls.__init__ is object.__init__:
        return
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # [0] is self
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is not p.KEYWORD_ONLY:
            raise RegistryError(f"{label}: __init__ argument {p.name!r} is not keyword-only: put it after a *, "
                                f"e.g. def __init__(self, *, {p.name}: float = 1.0)")
        if p.annotation is p.empty:
            raise RegistryError(f"{label}: __init__ argument {p.name!r} has no type annotation: annotate it "
                                f"(e.g. {p.name}: PositiveInt from fedleak.common.params) so configs are checked")


def _where(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def _declared_by(cls: type, member: str) -> type:
    """The class in `cls`'s MRO whose own `member` is still abstract: where its contract is documented."""
    return next(k for k in reversed(cls.__mro__) if getattr(k.__dict__.get(member), "__isabstractmethod__", False))
