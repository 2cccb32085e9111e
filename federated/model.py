"""Loading a base model: a local folder or a Hugging Face id, on the chosen device and dtype.

The embedded tiny Llama is built by `federated/embedded.py`; it then loads like any other folder.
`load_base_model` places the model (`device`, `dtype`, `attn_implementation`, bitsandbytes
`quantization` after QLoRA, Dettmers et al. 2023: NF4, double quantisation, bf16 compute) and sets
up its tokenizer (a pad token when it has none; the prompt format). `shared_base_model` keeps one
loaded copy per process, so every training, client, view, attack and evaluation of a run swaps
adapters on the same weights instead of loading or copying the base again.

Adapters stay fp32 whatever the base's dtype (peft's `autocast_adapter_dtype`), and so do Opacus's
per-sample gradients, which are taken of the adapters.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from fedleak.common.errors import FedleakError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "4bit", "8bit")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(device: str) -> str | None:
    """Why `model.device` is malformed (a fix for the config check), or None."""
    if _DEVICE.fullmatch(device):
        return None
    return f"model.device = {device!r}: use \"auto\", \"cpu\", \"cuda\", \"cuda:N\" (N a GPU index) or \"mps\""


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `model.device` names on this machine.

    Args:
        device: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda", "cuda:N" or "mps".

    Raises:
        FedleakError: a malformed name, or a device this machine lacks (the message says what it has).
    """
    problem = check_device_name(device)
    if problem:
        raise FedleakError(problem)
    if device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            have = f"{count} CUDA GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU (or a CPU-only torch)"
            raise FedleakError(f"model.device = {device!r}: this machine has {have}: set model.device = \"auto\" "
                               f"or \"cpu\"" + (f", or an index below {count}" if count else ""))
        return torch.device("cuda", index)
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FedleakError("model.device = 'mps': this machine has no Apple GPU (MPS): set model.device = \"auto\" "
                           "or \"cpu\"")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype: `model.dtype`, or for "auto" bf16 on a CUDA GPU that supports it, fp32
    elsewhere: on the CPU and MPS (bf16 matmuls are ~400x slower than fp32 on common CPUs), and on GPUs
    without bf16, where fp16 would need loss scaling that fedleak's training does not do."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(quantization: str, device: torch.device, compute_dtype: torch.dtype):
    """bitsandbytes' config for `model.quantization` (None for "none"): QLoRA's NF4 with double
    quantisation and `compute_dtype` matmuls for "4bit", LLM.int8() for "8bit".

    Raises:
        FedleakError: quantisation off a CUDA GPU, or bitsandbytes not installed.
    """
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise FedleakError(f"model.quantization = {quantization!r} needs a CUDA GPU (bitsandbytes), and the model "
                           f"is on {device}: set model.quantization = \"none\", or model.device = \"auto\" on a "
                           f"machine with a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FedleakError(f"model.quantization = {quantization!r} needs bitsandbytes, which is not installed: "
                           f"pip install 'fedleak[gpu]', or set model.quantization = \"none\"") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def check_load_options(*, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
                       quantization: str = "none"):
    """What these options mean on this machine, (device, weights dtype, bitsandbytes config or None),
    checked before any file is read (the dry run and `fedleak run` call it first, `load_base_model` uses
    it). Raises FedleakError as `load_base_model` does."""
    place = resolve_device(device)
    weights_dtype = resolve_dtype(dtype, place)
    quant = quantization_config(quantization, place, weights_dtype)
    if attn_implementation == "flash_attention_2":
        _check_flash_attention(place)
    return place, weights_dtype, quant


def prepare_tokenizer(tokenizer, name_or_path, prompt_format: str = "auto"):
    """Set up a loaded tokenizer as every fedleak run uses it (the loader, and the dry run's truncation
    counts): an EOS is required, a missing pad token becomes the EOS (fedleak masks padding itself),
    and `prompt_format` is resolved onto it (`prompts.set_prompt_format`). Returns the tokenizer.

    Raises:
        FedleakError: no eos_token, or a prompt format the tokenizer cannot serve.
    """
    from fedleak.federated.prompts import set_prompt_format

    if tokenizer.eos_token_id is None:  # every answer ends with it, and stops and pads fall back to it
        raise FedleakError(f"model.name = {str(name_or_path)!r}: its tokenizer has no eos_token: set one in the "
                           f"folder's tokenizer_config.json (the token that ends an answer)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_prompt_format(tokenizer, prompt_format)
    return tokenizer


def cache_keyword(model) -> str | None:
    """The keyword `model.forward` takes a key/value cache under: "cache" (transformers 5.24 renamed it) or
    "past_key_values"; None when it takes neither (or has no readable signature)."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((key for key in ("cache", "past_key_values") if key in parameters), None)


def returned_cache(output):
    """The key/value cache a forward pass with `use_cache=True` returned, under either name (see `cache_keyword`)."""
    return output.cache if "cache" in output else output.get("past_key_values")


def model_device(model) -> torch.device:
    """Where `model`'s weights are (its first parameter's device; the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """`batch` moved to `model`'s device (a no-op on the CPU)."""
    device = model_device(model)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name", as the hub spells ids


def looks_like_path(name: str | os.PathLike) -> bool:
    """Whether `model.name` can only be a folder: absolute, starting with . or ~, or not shaped like a
    hub id ("org/name"). A relative "models/llama" is both: it is a folder when one exists."""
    text = str(name)
    return (os.path.isabs(text) or text.startswith((".", "~")) or os.sep in text.replace("/", "")
            or not _HUB_ID.fullmatch(text))


def missing_folder(name: str | os.PathLike) -> str | None:
    """The one-line fix for a `model.name` that names a folder that does not exist; None otherwise."""
    path = Path(name).expanduser()
    if not looks_like_path(name) or path.is_dir():
        return None
    what = "is a file, not a folder" if path.exists() else "does not exist"
    return (f"model.name = {str(name)!r}: the folder {path.absolute()} {what}: give an existing model folder "
            f"(relative paths start from the working directory), \"embedded\", or a Hugging Face id (org/name)")


def load_base_model(name_or_path: str | os.PathLike, *, allow_download: bool = False, device: str = "auto",
                    dtype: str = "auto", attn_implementation: str = "sdpa", quantization: str = "none",
                    gradient_checkpointing: bool = False, prompt_format: str = "auto"):
    """Load (model, tokenizer) in eval mode from a local folder or, if allowed, the Hub.

    Args:
        name_or_path: a model folder (save_pretrained's files) or a hub id ("org/name").
        allow_download: let a hub id download; off: local files only.
        device: see `resolve_device`.
        dtype: "auto" (see `resolve_dtype`), "float32", "bfloat16" or "float16": the base weights'
            dtype (the compute dtype under quantisation).
        attn_implementation: "sdpa" (falls back to "eager" for an architecture without it), "eager" or
            "flash_attention_2" (needs flash-attn and a GPU).
        quantization: "none", "4bit" (NF4, double quantisation) or "8bit": bitsandbytes on a CUDA GPU.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        prompt_format: "auto", "chat" or "alpaca" (`federated.prompts.set_prompt_format`).

    Raises:
        FedleakError: one line naming the setting: a folder that does not exist or holds no model, a hub
            id not available offline (or not found online), a device this machine lacks, quantisation
            without a GPU or bitsandbytes, flash attention without flash-attn, a chat format without a
            chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problem = missing_folder(name_or_path)
    if problem:  # the hub library would answer with its repo-id rules, which confuse a user who gave a path
        raise FedleakError(problem)
    place, weights_dtype, quant = check_load_options(device=device, dtype=dtype,
                                                     attn_implementation=attn_implementation,
                                                     quantization=quantization)
    if weights_dtype != torch.float32 and place.type == "cpu":
        log.warning("model.dtype = %s on the CPU: most CPUs run half-precision matmuls far slower than float32",
                    dtype)
    local = Path(name_or_path).expanduser()
    ref = str(local) if local.is_dir() else str(name_or_path)
    local_only = not allow_download
    options = {"local_files_only": local_only, "dtype": weights_dtype, "attn_implementation": attn_implementation}
    if quant is not None:  # bitsandbytes places the weights as it quantises them
        options.update(quantization_config=quant, device_map={"": place.index or 0})
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
        try:
            model = AutoModelForCausalLM.from_pretrained(ref, **options)
        except ValueError as exc:
            message = str(exc).lower()
            if attn_implementation != "sdpa" or not ("sdpa" in message or "scaled_dot_product_attention" in message):
                raise
            log.info("%s has no sdpa attention; using eager attention", ref)
            model = AutoModelForCausalLM.from_pretrained(ref, **{**options, "attn_implementation": "eager"})
    # transformers raises any of these for a folder or id it cannot use (a config.json with impossible
    # sizes gives ZeroDivisionError or RuntimeError); running out of memory is not the folder's fault.
    except (OSError, ValueError, TypeError, KeyError, ZeroDivisionError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local.is_dir():
            raise FedleakError(f"model.name = {str(name_or_path)!r}: the folder {local} holds no loadable model "
                               f"({first}): give a folder written by save_pretrained (config.json, weights, "
                               f"tokenizer files)") from None
        hint = ("no folder of that name exists here and the hub is off: give a local model folder or set "
                "model.allow_download = true to fetch it" if local_only
                else f"{first}: check the model id and your network")
        raise FedleakError(f"model.name = {str(name_or_path)!r}: {hint}") from None
    if quant is None:
        model.to(place)
    else:
        from peft import prepare_model_for_kbit_training

        # QLoRA's recipe: norms and the output head in fp32, input gradients on for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # enabled below
    if gradient_checkpointing:
        # Non-reentrant: the frozen base needs no input gradients, and it recomputes through peft's layers.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepare_tokenizer(tokenizer, name_or_path, prompt_format)
    model.eval()
    return model, tokenizer


def _check_flash_attention(device: torch.device) -> None:
    if device.type != "cuda":
        raise FedleakError(f"model.attn_implementation = 'flash_attention_2' needs a CUDA GPU and the model is on "
                           f"{device}: use \"sdpa\"")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise FedleakError("model.attn_implementation = 'flash_attention_2' needs the flash-attn package, which is "
                           "not installed: pip install flash-attn, or use \"sdpa\"") from None


_SHARED: dict = {}  # at most one entry: (key, (model, tokenizer))


def shared_base_model(name_or_path: str | os.PathLike, **options):
    """The process's one loaded copy of the base model: `load_base_model(name_or_path, **options)` on the
    first call, the same (model, tokenizer) afterwards. Asking for another model or other options frees
    the previous copy first, so two bases are never held at once.

    Each call returns the bare base: the adapters a previous user's `adapters.add_peft_adapter` injected are
    taken out (that user's peft model is then unusable), so calls must not overlap.
    """
    from fedleak.federated.adapters import strip_adapters

    key = (str(name_or_path), tuple(sorted(options.items())))
    if _SHARED.get("key") != key:
        release_shared_model()  # drop the old copy before loading the new one
        _SHARED.update(key=key, value=load_base_model(name_or_path, **options))
    model, tokenizer = _SHARED["value"]
    strip_adapters(model)  # the previous user's adapters out: the caller gets the bare base
    model.eval()
    return model, tokenizer


def release_shared_model() -> None:
    """Free the shared copy (before another model loads; before worker processes load their own)."""
    import gc

    from fedleak.federated.adapters import strip_adapters

    if "value" in _SHARED:
        strip_adapters(_SHARED["value"][0])  # the wrapper and the base refer to each other
    _SHARED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
