"""Per-round checkpoints of what each observer sees: safetensors files plus a JSON manifest.

Layout of one training folder::

    round-0001/global.safetensors          the aggregated adapter (server and every client see it)
    round-0001/upload-client-00.safetensors each sampled client's upload (a curious server's view)
    round-0001/manifest.json               round, clients, example counts, sha256 of every file

Tensor files are written first, the manifest last, each atomically: a round folder whose manifest
exists is complete. Loading checks every hash and never unpickles (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedleak.federated.adapters import AdapterState
from fedleak.federated.errors import FedleakError
from fedleak.federated.io import atomic_write_bytes, atomic_write_json, sha256_bytes

FORMAT = "fedleak-checkpoint/1"
OBSERVERS = ("global", "upload")


def round_dir(training_dir: Path, round_number: int) -> Path:
    return Path(training_dir) / f"round-{round_number:04d}"


def _file_name(observer: str, client: int | None) -> str:
    return "global.safetensors" if observer == "global" else f"{observer}-client-{client:02d}.safetensors"


def view_key(observer: str, client: int | None) -> str:
    return observer if client is None else f"{observer}/{client}"


def write_round(training_dir: Path, round_number: int, *, global_state: AdapterState,
                uploads: dict[int, AdapterState], num_examples: dict[int, int], config_hash: str,
                extra: dict | None = None) -> Path:
    folder = round_dir(training_dir, round_number)
    files = {}
    views = [("global", None, global_state)] + [("upload", c, s) for c, s in sorted(uploads.items())]
    for observer, client, state in views:
        data = save_safetensors({k: v.contiguous() for k, v in state.items()})
        name = _file_name(observer, client)
        atomic_write_bytes(folder / name, data)
        files[view_key(observer, client)] = {"path": name, "sha256": sha256_bytes(data)}
    manifest = {
        "format": FORMAT, "round": round_number, "config_hash": config_hash,
        "clients": sorted(uploads), "num_examples": {str(c): n for c, n in sorted(num_examples.items())},
        "files": files, **(extra or {}),
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
    if manifest.get("format") != FORMAT:
        raise FedleakError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}: "
                           f"write checkpoints with fedleak's documented layout")
    return manifest


def load_view(folder: Path, observer: str = "global", client: int | None = None) -> AdapterState:
    """Load one observer's adapter from a round folder after checking its sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    key = view_key(observer, client)
    entry = manifest["files"].get(key)
    if entry is None:
        raise FedleakError(f"{folder / 'manifest.json'} has no view {key!r}: available views are "
                           f"{', '.join(manifest['files'])}")
    path = folder / entry["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedleakError(f"{path} is missing although the manifest lists it: rerun the training") from None
    if sha256_bytes(data) != entry["sha256"]:
        raise FedleakError(f"{path}: sha256 does not match manifest.json (the file was changed or corrupted): "
                           f"restore it or rerun the training")
    return {k: v.to(torch.float32) for k, v in load_safetensors(data).items()}


def rounds(training_dir: Path) -> list[int]:
    """Round numbers with a complete (manifest-bearing) folder, ascending."""
    found = []
    for folder in Path(training_dir).glob("round-*"):
        if (folder / "manifest.json").exists():
            found.append(int(folder.name.split("-")[1]))
    return sorted(found)
