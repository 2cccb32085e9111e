"""Load a user's Alpaca-style JSON (a list of objects) or JSONL (one object per line).

Every problem is reported as one line naming the file, the record, the field and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedleak.federated.data import Record
from fedleak.common.errors import FedleakError

DEFAULT_CATEGORY = "uncategorised"


@dataclass(frozen=True)
class FieldNames:
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    category: str = "category"


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _read_objects(path: Path) -> list[tuple[str, object]]:
    """(where, object) pairs; `where` is 'record N' for JSON and 'line N' for JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedleakError(f"{path}: file not found: fix data.file.path (relative paths start at the config's folder)") from None
    except UnicodeDecodeError as exc:
        raise FedleakError(f"{path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8") from None
    if path.suffix.lower() == ".jsonl":
        objects = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                objects.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FedleakError(f"{path}: line {lineno}: invalid JSON ({exc.msg}, column {exc.colno}): "
                                   f"each line must be one JSON object") from None
        return objects
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FedleakError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}): "
                           f"fix the file, or use .jsonl with one object per line") from None
    if not isinstance(data, list):
        raise FedleakError(f"{path}: the top level is {_type_name(data)}, expected a list of records "
                           f"(or use a .jsonl file with one object per line)")
    return [(f"record {i}", obj) for i, obj in enumerate(data)]


def load_alpaca(path: str | Path, fields: FieldNames = FieldNames(), *, id_prefix: str = "user") -> list[Record]:
    path = Path(path)
    records = []
    for index, (where, obj) in enumerate(_read_objects(path)):
        if not isinstance(obj, dict):
            raise FedleakError(f"{path}: {where} is {_type_name(obj)}, expected an object with "
                               f"{fields.instruction!r} and {fields.output!r}")
        values = {}
        for role, required in (("instruction", True), ("output", True), ("input", False), ("category", False)):
            key = getattr(fields, role)
            value = obj.get(key)
            if value is None:
                if required:
                    raise FedleakError(f"{path}: {where} has no field {key!r}: add it, or set "
                                       f"data.file.{role}_field to the field that holds the {role}")
                value = "" if role == "input" else DEFAULT_CATEGORY
            if not isinstance(value, str):
                raise FedleakError(f"{path}: {where} field {key!r} is {_type_name(value)}, expected text")
            if required and not value.strip():
                raise FedleakError(f"{path}: {where} field {key!r} is empty: remove the record or fill it in")
            values[role] = value
        records.append(Record(record_id=f"{id_prefix}-{index:06d}", **values))
    if not records:
        raise FedleakError(f"{path}: no records found: the file must hold at least one record")
    return records
