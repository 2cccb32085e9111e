"""LoRA adapters as plain state dicts, in peft's saved-adapter key format.

Client updates and aggregation work on `dict[str, torch.Tensor]` only, so a Flower
ClientApp/ServerApp (or any other runtime) can wrap them without change. A model may hold several
named adapters (FEDPIT's global and local ones); `activate` picks which are on and which trains.

An adapter's state is its LoRA tensors only. peft's default (`save_embedding_layers="auto"`) adds the
whole frozen embedding when `target_modules` names `embed_tokens` or `lm_head`; on a model with tied
embeddings that is the base weight itself, which would then be uploaded, aggregated, noised by
DP-FedAvg and checkpointed. fedleak never merges an adapter into the base model, so the LoRA on a tied
layer is well defined without peft's `ensure_weight_tying` and the base weight stays out of every state.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Annotated

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveInt, Range, check_fields

AdapterState = dict[str, torch.Tensor]
DEFAULT = "default"  # peft's name for the first adapter; fedleak's shared/global adapter


@dataclass(frozen=True)
class LoraSettings:
    r: PositiveInt = field(default=16, metadata={"help": "Rank of the LoRA update matrices."})
    alpha: PositiveInt = field(default=32, metadata={
        "help": "LoRA scaling: the update is multiplied by alpha / r."})
    dropout: Annotated[float, Range(ge=0, lt=1)] = field(default=0.0, metadata={
        "help": "Dropout on the LoRA input during training; 0 = none."})
    target_modules: str | tuple[str, ...] = field(default="all-linear", metadata={
        "help": "Module names the adapter wraps, or \"all-linear\" (peft: every linear layer but the output head)."})

    def __post_init__(self):
        check_fields(self, "model.lora.")
        if not self.target_modules:
            raise FedleakError("model.lora.target_modules is empty: give module names or 'all-linear'")

    def peft_config(self):
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          task_type="CAUSAL_LM")


@contextlib.contextmanager
def _seeded_quietly(seed: int):
    """Seeded adapter initialisation without peft's warning that an adapter on a tied layer complicates
    merging: fedleak never merges (see the module note)."""
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*ensure_weight_tying",
                                category=UserWarning)
        torch.manual_seed(seed)
        yield


_WRAPPER = "_fedleak_peft_model"  # the base's attribute naming the peft model that wraps it now


def add_lora(base_model, settings: LoraSettings, *, seed: int):
    """Wrap `base_model` with a freshly initialised LoRA adapter (seeded) and return the peft model.

    The base is shared by every use in a process (`federated.model.shared_base_model`): the adapters a
    previous `add_lora` injected into it are stripped first (peft's `unload`, which puts the original
    layers back untouched), so each peft model starts from the bare base; the previous one is unusable.
    """
    from peft import get_peft_model

    strip_adapters(base_model)
    with _seeded_quietly(seed):
        model = get_peft_model(base_model, settings.peft_config())
    base_model.__dict__[_WRAPPER] = model
    return model


def strip_adapters(base_model) -> None:
    """Take out the LoRA layers the last `add_lora` injected into `base_model` (peft's `unload`: the
    original layers come back untouched), leaving the bare base; a no-op on a bare base."""
    previous = base_model.__dict__.pop(_WRAPPER, None)  # a plain attribute, not a registered submodule
    if previous is not None:
        previous.unload()


def add_named_adapter(model, name: str, settings: LoraSettings, *, seed: int) -> None:
    """Add another freshly initialised (seeded) LoRA adapter named `name` to a peft model."""
    with _seeded_quietly(seed):
        model.add_adapter(name, settings.peft_config())


def activate(model, names: list[str], *, trainable: str | None = None) -> None:
    """Turn on exactly `names` (their outputs add up) and let only `trainable` learn."""
    model.base_model.set_adapter(list(names))
    for param_name, param in model.named_parameters():
        param.requires_grad = trainable is not None and f".{trainable}." in param_name and "lora_" in param_name


def _lora_state(model, adapter: str) -> AdapterState:
    """peft's saved-adapter tensors of `adapter`, never the base model's embedding (see the module note)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)


def get_adapter_state(model, adapter: str = DEFAULT) -> AdapterState:
    """A detached CPU copy of the adapter's trainable LoRA tensors: what a client uploads and a checkpoint
    holds (uploads and aggregation live in host memory, whatever device the model is on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _lora_state(model, adapter).items()}


def set_adapter_state(model, state: AdapterState, adapter: str = DEFAULT, *, source: str = "adapter") -> None:
    """Load `state` into the adapter named `adapter`, every one of its tensors.

    Raises:
        FedleakError: `state` lacks a tensor of the adapter (loading the rest would keep the previous
            state's values for it: a silent mix of two views) or has one the model lacks; `source`
            (e.g. the safetensors file) starts the message.
    """
    from peft import set_peft_model_state_dict

    expected = _lora_state(model, adapter)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise FedleakError(f"{source} lacks {len(missing)} of the adapter's {len(expected)} tensors (first: "
                           f"{missing[0]}): restore the file or rerun the training")
    wrong = next((k for k in expected if k in state and state[k].shape != expected[k].shape), None)
    if wrong is not None:
        raise FedleakError(f"{source}: tensor {wrong} has shape {list(state[wrong].shape)}, the model's adapter "
                           f"{list(expected[wrong].shape)}: it was trained with another LoRA r or base model; use "
                           f"the config it was trained with")
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise FedleakError(f"{source} has {len(unexpected)} tensors this model lacks (first: {unexpected[0]}): "
                           f"it was trained for another base model or LoRA target_modules")


def apply_view(model, view: dict[str, AdapterState], settings: LoraSettings, *,
               sources: dict[str, str] | None = None) -> None:
    """Load an observer's adapters into `model` (adding any it lacks) and turn on exactly those;
    `sources` names where each adapter came from, for errors."""
    for name, state in view.items():
        if name not in model.peft_config:
            add_named_adapter(model, name, settings, seed=0)  # overwritten by `state` right away
        set_adapter_state(model, state, name, source=(sources or {}).get(name, f"adapter {name!r}"))
    activate(model, list(view))
    model.eval()


def flatten(state: AdapterState) -> torch.Tensor:
    """One float64 vector of every tensor, in sorted key order (what distance-based rules compare)."""
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in sorted(state)])


def unflatten(vector: torch.Tensor, like: AdapterState) -> AdapterState:
    out, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[offset:offset + n].view(like[k].shape).to(like[k].dtype)
        offset += n
    return out
