"""Name -> component registries (attacks, defenses, ...): duplicates refused, typos answered."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable, Generic, Iterable, TypeVar

from fedleak.common.errors import FedleakError

T = TypeVar("T")


class RegistryError(FedleakError):
    pass


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class Registry(Generic[T]):
    """Components register with `@registry.register("name")`.

    Built-in modules are imported on first lookup, so importing fedleak stays cheap and a heavy
    backend is only loaded when its component is listed or used.
    """

    def __init__(self, kind: str, builtin_modules: Iterable[str] = (), entry_point_group: str | None = None):
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._entry_point_group = entry_point_group
        self._loaded = False
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered by "
                                    f"{_where(self._items[name])}: pick another name")
            self._items[name] = obj
            obj.name = name
            return obj

        return decorator

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
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}: {did_you_mean(name, self._items)}"
                                f"available: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)


class Component:
    """What every registered component shares: its name and how it describes itself."""

    name: str = ""  # set by the registry's decorator

    def params(self) -> dict:
        """The keyword arguments it was built with (each subclass stores them as attributes)."""
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters
                if p != "self" and hasattr(self, p)}

    @classmethod
    def summary(cls) -> str:
        return (inspect.getdoc(cls) or "").splitlines()[0]


def _where(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
