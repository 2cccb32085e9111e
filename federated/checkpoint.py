"""Per-round checkpoints of what each observer sees: safetensors files plus a JSON manifest.

A *view* is the set of adapters stacked on the base model that one observer holds:

    global      the aggregated adapter (the server and every client see it)
    upload/i    client i's upload that round (a curious server's view)
    client/i    client i's final model that round (only the client sees it)

Each view maps peft adapter names to files; a file is stored once and shared by views (FEDPIT's
client view is the global file plus the client's local adapter). Layout of one round::

    round-0001/global.safetensors
    round-0001/upload-client-00.safetensors
    round-0001/local-client-00.safetensors
    round-0001/manifest.json   round, clients, example counts, views, sha256 of every file

Tensor files are written first, the manifest last, each atomically: a round folder whose manifest
exists is complete. Loading checks every hash and never unpickles (safetensors only): a manifest
that points at anything but a `.safetensors` file in its own round folder is refused, and so is a
file whose safetensors header does not parse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedleak.federated.adapters import AdapterSettings, AdapterState, apply_view
from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_bytes, atomic_write_json, sha256_bytes
from fedleak.common.names import OBSERVERS

FORMAT = "fedleak-checkpoint/2"

View = dict[str, AdapterState]  # peft adapter name -> its tensors


def round_dir(training_dir: Path, round_number: int) -> Path:
    return Path(training_dir) / f"round-{round_number:04d}"


def view_key(observer: str, client: int | None = None) -> str:
    return observer if client is None else f"{observer}/{client}"


def parse_view_key(key: str) -> tuple[str, int | None]:
    observer, _, client = key.partition("/")
    return observer, int(client) if client else None


def write_round(training_dir: Path, round_number: int, *, files: dict[str, AdapterState],
                views: dict[str, dict[str, str]], num_examples: dict[int, int], config_hash: str,
                extra: dict | None = None) -> Path:
    """`files`: file stem -> tensors; `views`: view key -> {adapter name: file stem}."""
    folder = round_dir(training_dir, round_number)
    for key, adapters in views.items():
        missing = [stem for stem in adapters.values() if stem not in files]
        if missing:
            raise ValueError(f"view {key!r} refers to unknown files {missing}")
    entries = {}
    for stem, state in files.items():
        data = save_safetensors({k: v.contiguous() for k, v in state.items()})
        atomic_write_bytes(folder / f"{stem}.safetensors", data)
        entries[stem] = {"path": f"{stem}.safetensors", "sha256": sha256_bytes(data)}
    manifest = {
        "format": FORMAT, "round": round_number, "config_hash": config_hash,
        "num_examples": {str(c): n for c, n in sorted(num_examples.items())},
        "files": entries, "views": views, **(extra or {}),
    }
    atomic_write_json(folder / "manifest.json", manifest)
    return folder


def read_manifest(folder: Path) -> dict:
    """A round folder's manifest.json, checked: format, files (each a .safetensors file name in the
    folder with a sha256) and views (each naming listed files).

    Raises:
        FedleakError: one line naming manifest.json, the field and the fix.
    """
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedleakError(f"{path} is missing: the round was not finished; rerun the training") from None
    except json.JSONDecodeError as exc:
        raise FedleakError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): rerun the training") from None
    except UnicodeDecodeError:
        raise FedleakError(f"{path} is not UTF-8 JSON text (binary content): restore it or rerun the training") from None
    except OSError as exc:  # a folder named manifest.json, no permission
        raise FedleakError(f"{path} cannot be read ({exc.strerror or exc}): make it a readable JSON file or rerun "
                           f"the training") from None
    if not isinstance(manifest, dict):
        raise FedleakError(f"{path}: holds a JSON {type(manifest).__name__}, not an object: write the manifest "
                           f"of README 'Checkpoint format'")
    if manifest.get("format") != FORMAT:
        found = manifest.get("format")
        raise FedleakError(f"{path}: field 'format' is {found!r}, expected {FORMAT!r}: "
                           f"write checkpoints with fedleak's documented layout")
    for field_name in ("files", "views"):
        if not isinstance(manifest.get(field_name), dict):
            raise FedleakError(f"{path}: field {field_name!r} is missing or not an object: see README "
                               f"'Checkpoint format'")
    for stem, entry in manifest["files"].items():
        _check_entry(path, stem, entry)
    clients = manifest.get("clients", [])
    if not isinstance(clients, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                for c in clients):
        raise FedleakError(f"{path}: field 'clients' = {str(clients)[:80]} is not a list of client indices: write "
                           f"e.g. [0, 1, 2] or leave it out (every client)")
    for key, adapters in manifest["views"].items():
        observer, _, client = key.partition("/")
        if observer not in OBSERVERS or (client and not client.isdigit()) or (observer != "global") != bool(client):
            raise FedleakError(f"{path}: view {key!r}: use 'global', 'upload/N' or 'client/N' (N a client index)")
        if not isinstance(adapters, dict) or not adapters:
            raise FedleakError(f"{path}: views.{key} is not an object of adapter name -> file: write e.g. "
                               f'{{"default": "global"}}')
        for name, stem in adapters.items():
            if not isinstance(stem, str) or stem not in manifest["files"]:
                raise FedleakError(f"{path}: views.{key}.{name} = {stem!r} is not in files: list it under 'files' "
                                   f"or name one of {', '.join(manifest['files']) or 'none'}")
    return manifest


def _check_entry(path: Path, stem: str, entry) -> None:
    """One `files` entry: {"path": "<name>.safetensors", "sha256": 64 hex digits}. A pickle (.bin, .pt,
    .pkl) could run code when loaded, and a path outside the round folder could read any file: both
    are refused before anything is opened."""
    field_name = f"files.{stem}"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
        raise FedleakError(f"{path}: {field_name} must be {{\"path\": \"{stem}.safetensors\", \"sha256\": \"...\"}}: "
                           f"see README 'Checkpoint format'")
    name = entry["path"]
    if not name.endswith(".safetensors"):
        raise FedleakError(f"{path}: {field_name}.path = {name!r} is not a .safetensors file: fedleak never loads "
                           f"pickle files (.bin, .pt, .pkl); convert it with safetensors.torch.save_file")
    if Path(name).name != name or name in (".", ".."):
        raise FedleakError(f"{path}: {field_name}.path = {name!r} leaves the round folder: use a file name inside "
                           f"{path.parent}")
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise FedleakError(f"{path}: {field_name}.sha256 = {entry['sha256'][:80]!r} is not a sha256 hex digest: "
                           f"write the file's sha256 (64 lowercase hex digits)")


def available_views(folder: Path) -> list[str]:
    return list(read_manifest(folder)["views"])


def load_file(folder: Path, stem: str, manifest: dict | None = None) -> AdapterState:
    """The tensors of one listed file (float32), after checking its sha256 and its safetensors layout.

    Raises:
        FedleakError: one line naming the file: missing, unreadable, changed (sha256), not a valid
            safetensors file, or holding a tensor that is not a floating-point number array.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    entry = manifest["files"].get(stem)
    if entry is None:
        raise FedleakError(f"{folder / 'manifest.json'} lists no file {stem!r}: add it under 'files' or fix the view")
    path = folder / entry["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedleakError(f"{path} is missing although the manifest lists it: rerun the training") from None
    except OSError as exc:
        raise FedleakError(f"{path} cannot be read ({exc.strerror or exc}): restore the file or rerun the "
                           f"training") from None
    if sha256_bytes(data) != entry["sha256"]:
        raise FedleakError(f"{path}: sha256 does not match manifest.json (the file was changed or corrupted): "
                           f"restore it or rerun the training")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type (and others) for a corrupt header
        raise FedleakError(f"{path}: not a valid safetensors file ({' '.join(str(exc).split())[:200]}): restore "
                           f"it or rerun the training") from None
    bad = next((k for k, v in tensors.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise FedleakError(f"{path}: tensor {bad!r} has dtype {tensors[bad].dtype}, not floating point: write "
                           f"the adapter's LoRA weights as they were trained")
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def verify_round(folder: Path) -> dict:
    """Check every file a round's manifest lists (present, sha256, safetensors layout) without a model:
    `fedleak attack` runs it on every round before any output, data or model work.

    Returns:
        the manifest.
    """
    manifest = read_manifest(folder)
    for stem in manifest["files"]:
        load_file(folder, stem, manifest)
    return manifest


def _view_files(folder: Path, manifest: dict, observer: str, client: int | None) -> dict[str, str]:
    """peft adapter name -> file stem of one view, or a one-line error listing the views there are."""
    key = view_key(observer, client)
    adapters = manifest["views"].get(key)
    if adapters is None:
        raise FedleakError(f"{folder / 'manifest.json'} has no view {key!r}: available views are "
                           f"{', '.join(manifest['views']) or 'none'}")
    return adapters


def load_view(folder: Path, observer: str = "global", client: int | None = None) -> View:
    """Load one observer's adapters from a round folder after checking every file's sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return {name: load_file(folder, stem, manifest)
            for name, stem in _view_files(folder, manifest, observer, client).items()}


def apply_saved_view(model, folder: Path, observer: str, client: int | None, settings: AdapterSettings) -> None:
    """Load one observer's adapters from a round folder into `model` and turn on exactly those.

    Raises:
        FedleakError: a file is missing, changed (sha256) or holds other tensors than the model's
            adapter (a missing tensor is never left at the previous view's value); the message names
            the file.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = _view_files(folder, manifest, observer, client)
    apply_view(model, {name: load_file(folder, stem, manifest) for name, stem in files.items()}, settings,
               sources={name: str(folder / manifest["files"][stem]["path"]) for name, stem in files.items()})


def rounds(training_dir: Path) -> list[int]:
    """Round numbers with a complete (manifest-bearing) folder, ascending."""
    found = []
    for folder in Path(training_dir).glob("round-*"):
        if not (folder / "manifest.json").exists():
            continue
        if not re.fullmatch(r"round-\d{4}", folder.name):
            raise FedleakError(f"{folder}: round folders are named round-NNNN with four digits (round-0001): rename it")
        found.append(int(folder.name.split("-")[1]))
    return sorted(found)
