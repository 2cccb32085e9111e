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
exists is complete. Loading checks every hash and never unpickles (safetensors only).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedleak.federated.adapters import AdapterState, LoraSettings, apply_view
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
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FedleakError(f"{path} is missing: the round was not finished; rerun the training") from None
    except json.JSONDecodeError as exc:
        raise FedleakError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): rerun the training") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise FedleakError(f"{path}: field 'format' is {found!r}, expected {FORMAT!r}: "
                           f"write checkpoints with fedleak's documented layout")
    for field_name in ("files", "views"):
        if not isinstance(manifest.get(field_name), dict):
            raise FedleakError(f"{path}: field {field_name!r} is missing or not an object: see README "
                               f"'Checkpoint format'")
    for key in manifest["views"]:
        observer, _, client = key.partition("/")
        if observer not in OBSERVERS or (client and not client.isdigit()) or (observer != "global") != bool(client):
            raise FedleakError(f"{path}: view {key!r}: use 'global', 'upload/N' or 'client/N' (N a client index)")
    return manifest


def available_views(folder: Path) -> list[str]:
    return list(read_manifest(folder)["views"])


def load_file(folder: Path, stem: str, manifest: dict | None = None) -> AdapterState:
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    entry = manifest["files"].get(stem)
    if entry is None:
        raise FedleakError(f"{folder / 'manifest.json'} lists no file {stem!r}")
    path = folder / entry["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedleakError(f"{path} is missing although the manifest lists it: rerun the training") from None
    if sha256_bytes(data) != entry["sha256"]:
        raise FedleakError(f"{path}: sha256 does not match manifest.json (the file was changed or corrupted): "
                           f"restore it or rerun the training")
    return {k: v.to(torch.float32) for k, v in load_safetensors(data).items()}


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


def apply_saved_view(model, folder: Path, observer: str, client: int | None, settings: LoraSettings) -> None:
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
