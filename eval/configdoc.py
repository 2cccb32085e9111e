"""The config reference, docs/config.md, written from the settings dataclasses and the registries.

Every TOML table gets one table of key, type, default, allowed range and help, read from the
fields' annotations and `help` metadata (the checker reads the same annotations, so the reference
says exactly what a config may hold; a field whose metadata has a "type" text shows that instead);
then every built-in component's keyword arguments, the same way, their help read from the `Args:`
section of the component's `__init__` docstring and its `Raises:` section noted under the table. Run
`python -m fedleak.eval.configdoc` after changing a field or a component; a test fails while
docs/config.md is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

from fedleak.common.params import expected, range_text
from fedleak.eval.config import RunConfig
from fedleak.eval.matrix_config import MatrixRule, ScenarioSpec

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
# The matrix's parsed forms that are written as tables inside a list (no [table] header of their own).
LIST_ITEMS = {MatrixRule: "matrix.include / matrix.exclude items", ScenarioSpec: "[[matrix.scenarios]]"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    """A default as TOML writes it (None: unset, as TOML has no null)."""
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "`[" + ", ".join(_value(getattr(v, "label", v)).strip("`") for v in value) + "]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`".replace("'", '"')


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "see its table" if dataclasses.is_dataclass(value) else _value(value)


HEADER = ["| key | type | default | allowed | help |", "|---|---|---|---|---|"]


def _row(key: str, annotation, default: str, help: str, type_text: str | None = None) -> str:
    return (f"| `{key}` | {_cell(type_text or expected(annotation))} | {_cell(default)} | "
            f"{_cell(range_text(annotation))} | {_cell(help)} |")


def _rows(cls) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return HEADER + [_row(f.name, hints[f.name], _default(f), f.metadata["help"], f.metadata.get("type"))
                     for f in dataclasses.fields(cls) if f.init]


def settings_tables(cls=RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """(TOML table, dataclass) for the run config and every table nested in it, in file order."""
    tables = [(prefix or "top level", cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            tables += settings_tables(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return tables + ([(LIST_ITEMS[c], c) for c in LIST_ITEMS] if cls is RunConfig else [])


def docstring_sections(obj) -> dict[str, dict[str, str]]:
    """The Google-style sections of `obj`'s docstring ("Args", "Raises", ...), each as {name: text}:
    a section starts at an unindented `Title:` line, an entry at `    name: text`, and more-indented
    lines continue the entry (joined with single spaces)."""
    sections: dict[str, dict[str, str]] = {}
    entries: dict[str, str] | None = None
    name = None
    for line in (inspect.getdoc(obj) or "").splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            title = re.fullmatch(r"(\w[\w ]*):", line.strip())
            entries = sections.setdefault(title.group(1), {}) if title else None
            name = None
        elif entries is not None:
            entry = re.fullmatch(r"    (\w+): ?(.*)", line)
            if entry:
                name = entry.group(1)
                entries[name] = entry.group(2).strip()
            elif name is not None and line.startswith("     "):
                entries[name] = f"{entries[name]} {line.strip()}".strip()
    return sections


def builtin_components() -> list[tuple[str, str, type]]:
    """(section title, registered name, class) of every built-in component, plug-ins left out."""
    from fedleak.attacks.base import ATTACKS
    from fedleak.defenses.base import DEFENSES
    from fedleak.federated.rounds import ALGORITHMS

    out = []
    for title, registry in (("Algorithms", ALGORITHMS), ("Defenses", DEFENSES), ("Attacks", ATTACKS)):
        for name in registry.names():
            cls = registry.get(name)
            if cls.__module__.startswith("fedleak.") and not cls.__module__.startswith("fedleak.tests"):
                out.append((title, name, cls))
    return out


def keyword_parameters(cls) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _components() -> list[str]:
    components = builtin_components()
    lines: list[str] = []
    for title in dict.fromkeys(title for title, _, _ in components):
        lines += ["", f"### {title}"]
        bare = []
        for _, name, cls in (c for c in components if c[0] == title):
            params = keyword_parameters(cls)
            if not params:
                bare.append(f"`{name}`")
                continue
            hints = typing.get_type_hints(cls.__init__, include_extras=True)
            doc = docstring_sections(cls.__init__)
            lines += ["", f"#### `{name}`", "", *HEADER]
            lines += [_row(p.name, hints[p.name], _value(p.default), doc.get("Args", {}).get(p.name, "")) for p in params]
            # No summary line: `fedleak list` prints those, and this page changes only with the parameters.
            for error, text in doc.get("Raises", {}).items():
                lines += ["", f"Refused ({error}): {text}"]
        if bare:
            lines += ["", "No parameters: " + ", ".join(bare) + "."]
    return lines


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated by `python -m fedleak.eval.configdoc` from the settings dataclasses; do not edit by hand.",
             "A config is a TOML file; every key is optional. \"allowed\" is the declared range, checked when the "
             "config loads (numbers must also be finite; an integer where a number is expected is fine).", ""]
    for table, cls in settings_tables():
        heading = table if table.startswith(("top", "[", "matrix.")) else f"[{table}]"
        lines += [f"## {heading}", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # dataclass's generated doc: skip
            lines += [" ".join(inspect.cleandoc(cls.__doc__).split()), ""]
        lines += _rows(cls) + [""]
    lines += ["## Components", "",
              "Keyword arguments of the built-in components, written `{name = \"krum\", f = 1}` in the matrix "
              "(`fedleak list` shows plug-ins too); each is checked like a settings field."]
    return "\n".join(lines + _components()) + "\n"


def main() -> int:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
