"""Adapters (LoRA, IA3, soft prompts, prefixes, full fine-tuning's copies: `federated.methods`) as plain
state dicts, in peft's saved-adapter key format (full fine-tuning: the base's parameter names).

Client updates and aggregation work on `dict[str, torch.Tensor]` only, so a Flower
ClientApp/ServerApp (or any other runtime) can wrap them without change. A model may hold several
named adapters (FEDPIT's global and local ones); `activate` picks which are on and which trains.
Several adapters on at once combine the way each method allows: LoRA's updates add up, IA3's scales
multiply, soft prompts and prefixes are concatenated in the order named (`ConcatenatedPrompt`), full
fine-tuning's copies add their differences from the base (`federated/full.py`).

An adapter's state is its own tensors only. peft's default (`save_embedding_layers="auto"`) adds the
whole frozen embedding when `target_modules` names `embed_tokens` or `lm_head`; on a model with tied
embeddings that is the base weight itself, which would then be uploaded, aggregated, noised by
DP-FedAvg and checkpointed. fedleak never merges an adapter into the base model, so the LoRA on a tied
layer is well defined without peft's `ensure_weight_tying` and the base weight stays out of every state.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveInt, Range, check_fields
from fedleak.federated.full import FullModel
from fedleak.federated.model import returned_cache
from fedleak.federated.methods import (MARKERS, FullSettings, IA3Settings, PrefixTuningSettings, PromptTuningSettings,
                                      is_prompt_learning)

AdapterState = dict[str, torch.Tensor]
DEFAULT = "default"  # peft's name for the first adapter; fedleak's shared/global adapter


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (Hu et al. 2021): a low-rank update B A added to each targeted weight."""

    method: ClassVar[str] = "lora"
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


AdapterSettings = LoraSettings | IA3Settings | PromptTuningSettings | PrefixTuningSettings | FullSettings


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


def add_peft_adapter(base_model, settings: AdapterSettings, *, seed: int):
    """Wrap `base_model` with a freshly initialised adapter of `settings`' method (seeded) and return
    the peft model.

    The base is shared by every use in a process (`federated.model.shared_base_model`): the layers a
    previous call injected into it are stripped first (peft's `unload`, which puts the original layers
    back untouched), so each peft model starts from the bare base; the previous one is unusable.
    """
    from peft import get_peft_model

    strip_adapters(base_model)
    if settings.method == "full":
        model = FullModel(base_model, DEFAULT)
        base_model.__dict__[_WRAPPER] = model
        return model
    with _seeded_quietly(seed):
        model = get_peft_model(base_model, settings.peft_config())
        _init_prefix(model, DEFAULT, settings)
    base_model.__dict__[_WRAPPER] = model
    return model


@torch.no_grad()
def _init_prefix(model, adapter: str, settings: AdapterSettings) -> None:
    """A prefix initialised from real words' activations (Li and Liang 2021's initialisation): the keys and
    values the base model computes for random vocabulary tokens (the model's BOS first, where it has one),
    so the prefixed model first acts as if those tokens preceded each text. Any embedding row may be drawn
    (no tokenizer here to rule out special or reserved ones). Draws from torch's global generator (seeded by
    the caller). A no-op for other methods and inits."""
    if getattr(settings, "method", None) != "prefix_tuning" or settings.init != "sample_vocab":
        return
    base = model.get_base_model()
    weight = model.prompt_encoder[adapter].embedding.weight
    count = settings.num_virtual_tokens
    ids = torch.randint(0, base.get_input_embeddings().num_embeddings, (1, count))
    bos = getattr(base.config, "bos_token_id", None)
    if isinstance(bos, int):
        ids[0, 0] = bos
    out = base(input_ids=ids.to(weight.device), use_cache=True)
    cache = returned_cache(out)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    # peft reads row t as [layers x (key, value), heads, head dim] (PeftModel.get_prompt)
    rows = torch.stack([part[0].transpose(0, 1) for pair in layers for part in pair], dim=1)  # [T, 2L, heads, hd]
    rows = rows.reshape(count, -1)
    if rows.shape != weight.shape:
        raise FedleakError(f"model.prefix_tuning.init = 'sample_vocab': the base model's cache holds "
                           f"{rows.shape[1]} values per position where peft's prefix holds {weight.shape[1]} "
                           f"({type(base).__name__}): use init = 'random'")
    weight.copy_(rows.to(weight.dtype))


def strip_adapters(base_model) -> None:
    """Take out the layers the last `add_peft_adapter` injected into `base_model` (peft's `unload`: the
    original layers come back untouched), leaving the bare base; a no-op on a bare base, and for a soft
    prompt, which lives in the wrapper and leaves the base's layers alone. Full fine-tuning's `unload` puts
    the base's own parameters back."""
    previous = base_model.__dict__.pop(_WRAPPER, None)  # a plain attribute, not a registered submodule
    if previous is not None and not any(c.is_prompt_learning for c in previous.peft_config.values()):
        previous.unload()


def add_named_adapter(model, name: str, settings: AdapterSettings, *, seed: int) -> None:
    """Add another freshly initialised (seeded) adapter named `name` to a peft model."""
    with _seeded_quietly(seed):
        model.add_adapter(name, settings.peft_config())
        _init_prefix(model, name, settings)


@contextlib.contextmanager
def adapters_enabled(model):
    """Adapters on again inside peft's `disable_adapter()` (e.g. an attack's own reference adapter on the
    blind baseline's base model); off again afterwards. A no-op outside `disable_adapter()`.

    Layer tuners switch their layers (peft's enable/disable_adapter_layers). For a soft prompt peft's
    `disable_adapter()` swaps in the base model's `forward` and `prepare_inputs_for_generation` as
    instance attributes: they are set aside (the wrapper's own methods then act) and put back."""
    if not getattr(model, "_adapters_disabled", False):
        yield
        return
    if isinstance(model, FullModel):
        with model.enabled():
            yield
        return
    if not is_prompt_learning(model):
        model.base_model.enable_adapter_layers()
        try:
            yield
        finally:
            model.base_model.disable_adapter_layers()
        return
    swapped = {k: model.__dict__.pop(k) for k in ("forward", "prepare_inputs_for_generation") if k in model.__dict__}
    model._adapters_disabled = False
    try:
        yield
    finally:
        model.__dict__.update(swapped)
        model._adapters_disabled = True


def trainable_adapter(model) -> str | None:
    """The adapter whose parameters train now (`activate`'s `trainable`), or None."""
    if isinstance(model, FullModel):
        return model.trainable_adapter
    return next((a for a in model.peft_config for n, p in model.named_parameters() if p.requires_grad and owns(n, a)),
                None)


def owns(param_name: str, adapter: str) -> bool:
    """Whether a peft model's parameter `param_name` belongs to the adapter named `adapter` (any method)."""
    return ((f".{adapter}." in param_name or param_name.endswith(f".{adapter}"))
            and any(m in param_name for markers in MARKERS.values() for m in markers))


class ConcatenatedPrompt(torch.nn.Module):
    """Several soft prompts (or prefixes) as one: each part's rows, in order, the first part's first.

    peft runs one prompt-learning adapter at a time; fedleak registers the concatenation of several as one
    more adapter, named by joining theirs with "+" (`combined_prompt`), whose `num_virtual_tokens` is the sum.
    The parts' modules are shared, not copied, and not registered as children: their embeddings train in
    place, are listed under their own adapter's name only, and are what each adapter's state holds (a second
    registration would also put Opacus's hooks on them twice, doubling each per-record gradient).

    Args:
        parts: the adapters' prompt encoders (peft's PromptEmbedding or PrefixEncoder without projection).
        lengths: their `num_virtual_tokens`, in the same order.
    """

    def __init__(self, parts: list[torch.nn.Module], lengths: list[int]):
        super().__init__()
        self.__dict__["parts"] = tuple(parts)  # plain references, outside the module tree (see above)
        self.lengths = list(lengths)

    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.parts[0].embedding  # peft reads the device from it

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: [batch, sum(lengths)] virtual token ids (peft's arange); returns [batch, sum(lengths), width]."""
        out, start = [], 0
        for part, n in zip(self.parts, self.lengths):
            out.append(part(indices[:, start:start + n] - start))
            start += n
        return torch.cat(out, dim=1)


def combined_prompt(model, names: list[str]) -> str:
    """The adapter that runs the soft prompts (or prefixes) `names` concatenated, registered on first use.

    Raises:
        FedleakError: the adapters are not all of one prompt-learning method.
    """
    import dataclasses

    name = "+".join(names)
    configs = [model.peft_config[n] for n in names]
    if len({c.peft_type for c in configs}) != 1 or not all(c.is_prompt_learning for c in configs):
        raise FedleakError(f"adapters {list(names)}: only adapters of one method combine (got "
                           f"{[str(c.peft_type.value) for c in configs]})")
    known = model.prompt_encoder[name] if name in model.peft_config else None
    if known is None or any(a is not b for a, b in zip(known.parts, (model.prompt_encoder[n] for n in names))):
        lengths = [c.num_virtual_tokens for c in configs]  # (again when a part was deleted and added anew)
        config = dataclasses.replace(configs[0], num_virtual_tokens=sum(lengths), inference_mode=False)
        model.peft_config[name] = config
        model.prompt_encoder[name] = ConcatenatedPrompt([model.prompt_encoder[n] for n in names], lengths)
        model.prompt_tokens[name] = torch.arange(sum(lengths) * config.num_transformer_submodules).long()
    return name


def activate(model, names: list[str], *, trainable: str | None = None) -> None:
    """Turn on exactly `names` (their effects combine, see the module note; a name given twice counts once)
    and let only `trainable` learn."""
    names = list(dict.fromkeys(names))
    if isinstance(model, FullModel):
        model.activate(names, trainable=trainable)
        return
    if is_prompt_learning(model) or any(model.peft_config[n].is_prompt_learning for n in names):
        model.set_adapter(names[0] if len(names) == 1 else combined_prompt(model, names))
    else:
        model.base_model.set_adapter(list(names))
    for param_name, param in model.named_parameters():
        param.requires_grad = trainable is not None and owns(param_name, trainable)


def _peft_state(model, adapter: str) -> AdapterState:
    """peft's saved-adapter tensors of `adapter`, never the base model's embedding (see the module note)."""
    if isinstance(model, FullModel):
        return dict(model.adapter_tensors(adapter))
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)


def adapter_parameters(model, adapter: str = DEFAULT) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by their saved-state key (`get_adapter_state`'s keys): what a
    gradient with respect to the upload is taken of."""
    if isinstance(model, FullModel):
        return dict(model.adapter_tensors(adapter))
    if model.peft_config[adapter].is_prompt_learning:  # a soft prompt or prefix is saved as its embedding's rows
        return {"prompt_embeddings": model.prompt_encoder[adapter].embedding.weight}
    by_storage = {p.data_ptr(): p for name, p in model.named_parameters() if owns(name, adapter)}
    return {k: by_storage[v.data_ptr()] for k, v in _peft_state(model, adapter).items() if v.data_ptr() in by_storage}


def get_adapter_state(model, adapter: str = DEFAULT) -> AdapterState:
    """A detached CPU copy of the adapter's trainable tensors: what a client uploads and a checkpoint
    holds (uploads and aggregation live in host memory, whatever device the model is on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _peft_state(model, adapter).items()}


def set_adapter_state(model, state: AdapterState, adapter: str = DEFAULT, *, source: str = "adapter") -> None:
    """Load `state` into the adapter named `adapter`, every one of its tensors.

    Raises:
        FedleakError: `state` lacks a tensor of the adapter (loading the rest would keep the previous
            state's values for it: a silent mix of two views) or has one the model lacks; `source`
            (e.g. the safetensors file) starts the message.
    """
    from peft import set_peft_model_state_dict

    expected = _peft_state(model, adapter)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise FedleakError(f"{source} lacks {len(missing)} of the adapter's {len(expected)} tensors (first: "
                           f"{missing[0]}): restore the file or rerun the training")
    wrong = next((k for k in expected if k in state and state[k].shape != expected[k].shape), None)
    if wrong is not None:
        raise FedleakError(f"{source}: tensor {wrong} has shape {list(state[wrong].shape)}, the model's adapter "
                           f"{list(expected[wrong].shape)}: it was trained with other adapter settings (model.adaptation "
                           f"and its table) or another base model; use the config it was trained with")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise FedleakError(f"{source} has {len(extra)} tensors this model lacks (first: {extra[0]}): it was trained "
                           f"for another base model, adaptation method or target_modules")
    if isinstance(model, FullModel):
        model.load_adapter_tensors(adapter, state)
    else:
        set_peft_model_state_dict(model, state, adapter_name=adapter)


def apply_view(model, view: dict[str, AdapterState], settings: AdapterSettings, *,
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
