"""fedleak's round messages as Flower records (`flwr.app`): adapters as `ArrayRecord`s, the rest as JSON.

Adapters travel as numpy arrays (Flower's wire format, and what its secure-aggregation mods work on);
numpy has no bfloat16, so a bf16 tensor travels as float32 (exact) and its dtype is named beside it.
A client's memory across rounds (FEDPIT's local adapter and synthetic records) and its defense's state
(DP-SGD's accountant) never leave the node: on a simulation they are kept in the node's `Context.state`
(a Ray worker serves many nodes, and a node may be served by another worker next round), on a deployment
in files on the node's disk (`save_client_files`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import AdapterState
from fedleak.federated.data import Record
from fedleak.federated.rounds import GLOBAL, ClientResult

_NUMPY = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool}


def to_arrays(state: AdapterState) -> tuple[ArrayRecord, dict[str, str]]:
    """An adapter state as an ArrayRecord, and the torch dtype of each tensor numpy cannot hold."""
    arrays, dtypes = {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype not in _NUMPY:
            dtypes[name] = str(tensor.dtype).removeprefix("torch.")
            tensor = tensor.float()
        arrays[name] = Array(np.ascontiguousarray(tensor.numpy()))
    return ArrayRecord(array_dict=arrays), dtypes


def from_arrays(record: ArrayRecord, dtypes: dict[str, str] | None = None) -> AdapterState:
    """The adapter state `to_arrays` encoded (tensors own their memory: the record can be dropped)."""
    dtypes = dtypes or {}
    out = {}
    for name in record:
        tensor = torch.from_numpy(np.array(record[name].numpy(), copy=True))
        out[name] = tensor.to(getattr(torch, dtypes[name])) if name in dtypes else tensor
    return out


def _json_default(value):
    if isinstance(value, Record):
        return {"__record__": dataclasses.asdict(value)}
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(type(value).__name__)


def _json_hook(obj: dict):
    if "__record__" in obj:
        fields = obj["__record__"]
        return Record(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    return obj


def dumps(value, what: str) -> str:
    """JSON text of `value` (Records included); FedleakError naming `what` when it cannot travel."""
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise FedleakError(f"{what} holds a value that cannot travel in a Flower message ({exc}): keep it to "
                           f"tensors dicts, Records and JSON values") from None


def loads(text: str):
    return json.loads(text, object_hook=_json_hook)


def _is_state(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _put_states(content: RecordDict, prefix: str, states: dict[str, AdapterState]) -> dict[str, dict]:
    dtypes = {}
    for name, state in states.items():
        content[f"{prefix}{name}"], dtypes[name] = to_arrays(state)
    return dtypes


def result_content(result: ClientResult, privacy: dict | None) -> RecordDict:
    """A client's reply: its upload and view adapters as ArrayRecords, everything else as JSON."""
    content = RecordDict()
    states = {"upload": result.upload} if result.upload is not None else {}
    # A view adapter that is the upload itself (FEDIT) travels once and stays one object: one checkpoint file.
    same = [a for a, s in result.view.items() if s is not GLOBAL and result.upload is not None and s is result.upload]
    states |= {f"view.{a}": s for a, s in result.view.items() if s is not GLOBAL and a not in same}
    dtypes = _put_states(content, "state.", states)
    content["result"] = ConfigRecord({"json": dumps({
        "num_examples": result.num_examples, "metrics": result.metrics, "artifacts": result.artifacts,
        "privacy": privacy, "dtypes": dtypes, "view": list(result.view), "view_upload": same,
        "view_global": [a for a, s in result.view.items() if s is GLOBAL]}, "the client's result")})
    return content


def read_result(content: RecordDict) -> tuple[ClientResult, dict | None]:
    """The (ClientResult, privacy) a `result_content` reply carries."""
    meta = loads(content["result"]["json"])
    dtypes = meta["dtypes"]

    def state(name: str) -> AdapterState:
        return from_arrays(content[f"state.{name}"], dtypes.get(name))

    upload = state("upload") if "state.upload" in content else None
    view = {a: GLOBAL if a in meta["view_global"] else upload if a in meta["view_upload"] else state(f"view.{a}")
            for a in meta["view"]}
    return ClientResult(upload=upload, num_examples=meta["num_examples"], view=view, metrics=meta["metrics"],
                        artifacts=meta["artifacts"]), meta["privacy"]


def store_client_state(state: RecordDict, memory: dict, hooks_state: dict, *, key: str) -> None:
    """Put a client's memory and its defense's state into the node's `Context.state` (replacing the last)."""
    for name in [n for n in state if n.startswith("fedleak.")]:
        del state[name]
    tensors = {k: v for k, v in memory.items() if _is_state(v)}
    dtypes = _put_states(state, "fedleak.memory.", tensors)
    rest = {k: v for k, v in memory.items() if k not in tensors}
    state["fedleak.client"] = ConfigRecord({"json": dumps({
        "key": key, "memory": rest, "tensors": list(tensors), "dtypes": dtypes, "hooks": hooks_state},
        "the algorithm's client memory")})


def load_client_state(state: RecordDict, *, key: str) -> tuple[dict, dict]:
    """(memory, defense state) stored for training `key` on this node; empty before the client's first round."""
    if "fedleak.client" not in state:
        return {}, {}
    meta = loads(state["fedleak.client"]["json"])
    if meta["key"] != key:  # another training's leftovers on a long-lived node
        return {}, {}
    memory = dict(meta["memory"])
    for name in meta["tensors"]:
        memory[name] = from_arrays(state[f"fedleak.memory.{name}"], meta["dtypes"].get(name))
    return memory, meta["hooks"]


def save_client_files(folder: Path, memory: dict, hooks_state: dict, *, key: str) -> None:
    """A client's memory and defense state on the node's own disk (safetensors + JSON, each file replaced
    whole): a deployed SuperNode pushes its ClientApp's `Context` only after the reply, so the next round's
    message can arrive first and find the previous round's state there."""
    from safetensors.torch import save_file

    from fedleak.common.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in memory.items() if _is_state(v)}
    for name, state in tensors.items():
        scratch = folder / f".memory-{name}.safetensors.partial"
        save_file({n: t.detach().cpu().contiguous() for n, t in state.items()}, str(scratch))
        scratch.replace(folder / f"memory-{name}.safetensors")
    rest = {k: v for k, v in memory.items() if k not in tensors}
    atomic_write_text(folder / "state.json", dumps({"key": key, "memory": rest, "tensors": list(tensors),
                                                    "hooks": hooks_state}, "the algorithm's client memory"))


def load_client_files(folder: Path, *, key: str) -> tuple[dict, dict]:
    """What `save_client_files` wrote for training `key` ({}, {} before the client's first round)."""
    from safetensors.torch import load_file

    path = folder / "state.json"
    if not path.is_file():
        return {}, {}
    meta = loads(path.read_text(encoding="utf-8"))
    if meta.get("key") != key:
        return {}, {}
    memory = dict(meta["memory"])
    for name in meta["tensors"]:
        memory[name] = load_file(str(folder / f"memory-{name}.safetensors"))
    return memory, meta["hooks"]
