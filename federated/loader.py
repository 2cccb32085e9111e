"""Load a user's Alpaca-style JSON (a list of objects) or JSONL (one object per line).

Every problem is reported as one line naming the file, the record, the field and the fix: a path that is
a folder or cannot be read, bytes that are not UTF-8 text, an empty file, invalid JSON, a record that is
not an object, a missing or empty required field, a field of the wrong type. Besides the records, the
file's sha256 and what its fields held (how many records name a category, which keys occur) come back,
so the run can say what it trained on and warn about what it had to assume.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fedleak.common.errors import FedleakError
from fedleak.federated.data import Record

DEFAULT_CATEGORY = "uncategorised"
SUFFIXES = (".json", ".jsonl")
LISTED, PATTERN = "listed", "pattern"  # identifier types: from the identifiers field, found by a pattern


@dataclass(frozen=True)
class FieldNames:
    """Which key of a record holds what; `identifiers` "" means the records list no secrets."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    category: str = "category"
    identifiers: str = ""


@dataclass
class DataFile:
    """A loaded data file: its records and what the run reports about the file itself."""

    path: Path
    sha256: str
    records: list[Record]
    with_category: int = 0  # records that hold the category field
    with_identifiers: int = 0  # records that hold the identifiers field
    keys: list[str] = field(default_factory=list)  # every key some record holds, in first-seen order


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _read_text(path: Path) -> tuple[str, str]:
    """The file's text (a UTF-8 byte-order mark dropped) and its bytes' sha256."""
    if path.suffix.lower() not in SUFFIXES:
        raise FedleakError(f"{path}: not a .json or .jsonl file: fix data.file.path (a JSON list of records, "
                           f"or JSONL with one record per line)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedleakError(f"{path}: file not found: fix data.file.path (relative paths start at the config's folder)") from None
    except IsADirectoryError:
        raise FedleakError(f"{path}: is a folder, not a data file: point data.file.path at the .json or .jsonl "
                           f"file inside it") from None
    except OSError as exc:
        raise FedleakError(f"{path}: cannot be read ({exc.strerror or exc}): fix the file's permissions or "
                           f"data.file.path") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FedleakError(f"{path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8 JSON") from None
    if not text.strip():
        raise FedleakError(f"{path}: the file is empty: fill it with records or fix data.file.path")
    return text, hashlib.sha256(data).hexdigest()


def _parse(text: str, path: Path, line: int | None, fix: str):
    """One JSON value: the whole file (`line` None) or one JSONL line."""
    prefix = f"line {line}: " if line else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        place = f"column {exc.colno}" if line else f"line {exc.lineno} column {exc.colno}"
        raise FedleakError(f"{path}: {prefix}invalid JSON ({exc.msg}, {place}): {fix}") from None
    except RecursionError:
        raise FedleakError(f"{path}: {prefix}JSON nested too deeply to be a record: {fix}") from None


def _read_objects(text: str, path: Path) -> list[tuple[str, object]]:
    """(where, object) pairs; `where` is 'record N' for JSON and 'line N' for JSONL."""
    if path.suffix.lower() == ".jsonl":
        objects = []
        # "\n" only: str.splitlines would also split at U+2028 and other separators a JSON string may hold.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                objects.append((f"line {lineno}", _parse(line, path, lineno,
                                                         "each line must be one JSON object")))
        return objects
    data = _parse(text, path, None, "fix the file, or use .jsonl with one object per line")
    if not isinstance(data, list):
        raise FedleakError(f"{path}: the top level is {_type_name(data)}, expected a list of records "
                           f"(or use a .jsonl file with one object per line)")
    return [(f"record {i}", obj) for i, obj in enumerate(data)]


def _text(value, path: Path, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise FedleakError(f"{path}: {where} field {key!r} is {_type_name(value)}, expected text: write it as a "
                           f"JSON string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (\ud800) decodes from JSON but is no character
        raise FedleakError(f"{path}: {where} field {key!r} holds an invalid character at position {exc.start} "
                           f"(a lone surrogate escape): fix or remove it") from None
    return value


def _listed(value, path: Path, where: str, key: str) -> tuple[str, ...]:
    """The record's own secrets: a list of non-empty strings (absent or null: none)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FedleakError(f"{path}: {where} field {key!r} is {_type_name(value)}, expected a list of the "
                           f"record's secret strings: write it as [\"...\", ...]")
    out = []
    for i, item in enumerate(value):
        item = _text(item, path, where, f"{key}[{i}]")
        if not item.strip():
            raise FedleakError(f"{path}: {where} field {key!r}[{i}] is empty: remove it from the list")
        out.append(item)
    return tuple(out)


def _identifiers(listed: tuple[str, ...], texts: Sequence[str],
                 patterns: Sequence[re.Pattern]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The record's identifiers (listed ones first, then every pattern match in its text, once each) and
    their types."""
    found = dict.fromkeys(listed, LISTED)
    for pattern in patterns:
        for text in texts:
            for match in pattern.finditer(text):
                if match.group(0):
                    found.setdefault(match.group(0), PATTERN)
    return tuple(found), tuple(found.values())


def read_data_file(path: str | Path, fields: FieldNames = FieldNames(), *, patterns: Sequence[str] = (),
                   id_prefix: str = "user") -> DataFile:
    """Read and check every record of `path`; `patterns` are regexes whose matches in a record's text are
    its identifiers (besides those its `fields.identifiers` field lists)."""
    path = Path(path)
    text, digest = _read_text(path)
    compiled = [re.compile(p) for p in patterns]
    out = DataFile(path=path, sha256=digest, records=[])
    keys: dict[str, None] = {}
    for index, (where, obj) in enumerate(_read_objects(text, path)):
        if not isinstance(obj, dict):
            raise FedleakError(f"{path}: {where} is {_type_name(obj)}, expected an object with "
                               f"{fields.instruction!r} and {fields.output!r}: make every record a JSON object")
        keys.update(dict.fromkeys(obj))
        values = {}
        for role, required in (("instruction", True), ("output", True), ("input", False), ("category", False)):
            key = getattr(fields, role)
            value = obj.get(key)
            if value is None:
                if required:
                    raise FedleakError(f"{path}: {where} has no field {key!r}: add it, or set "
                                       f"data.file.{role}_field to the field that holds the {role}")
                value = "" if role == "input" else DEFAULT_CATEGORY
            elif role == "category":
                out.with_category += 1
            value = _text(value, path, where, key)
            if required and not value.strip():
                raise FedleakError(f"{path}: {where} field {key!r} is empty: remove the record or fill it in")
            values[role] = value
        listed = _listed(obj.get(fields.identifiers), path, where, fields.identifiers) if fields.identifiers else ()
        out.with_identifiers += bool(fields.identifiers) and obj.get(fields.identifiers) is not None
        identifiers, types = _identifiers(listed, (values["instruction"], values["input"], values["output"]),
                                          compiled)
        out.records.append(Record(record_id=f"{id_prefix}-{index:06d}", identifiers=identifiers,
                                  identifier_types=types, **values))
    if not out.records:
        raise FedleakError(f"{path}: no records found: the file must hold at least one record")
    out.keys = list(keys)
    return out


def load_alpaca(path: str | Path, fields: FieldNames = FieldNames(), *, id_prefix: str = "user") -> list[Record]:
    """The file's records alone (see `read_data_file`)."""
    return read_data_file(path, fields, id_prefix=id_prefix).records
