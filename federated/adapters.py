"""LoRA adapters as plain state dicts, in peft's saved-adapter key format.

Client updates and aggregation work on `dict[str, torch.Tensor]` only, so a Flower
ClientApp/ServerApp (or any other runtime) can wrap them without change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.federated.errors import FedleakError

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" is peft's shorthand for every linear layer except the output head.
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self):
        if self.r < 1:
            raise FedleakError(f"model.lora.r = {self.r}: must be a positive integer")
        if self.alpha <= 0:
            raise FedleakError(f"model.lora.alpha = {self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise FedleakError(f"model.lora.dropout = {self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise FedleakError("model.lora.target_modules is empty: give module names or 'all-linear'")


def add_lora(base_model, settings: LoraSettings, *, seed: int):
    """Wrap `base_model` with a freshly initialised LoRA adapter (seeded) and return the peft model."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base_model, config)


def get_adapter_state(model) -> AdapterState:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model, state: AdapterState) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise FedleakError(f"adapter has {len(unexpected)} tensors this model lacks (first: {unexpected[0]}): "
                           f"it was trained for another base model or LoRA target_modules")

