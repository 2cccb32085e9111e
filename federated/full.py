"""Full fine-tuning behind the adapter interface the rest of fedleak uses (peft's).

peft has no full fine-tuning method (a config must target some layer; its `modules_to_save` copies
cannot stand alone, and its `unload` would put the trained copy into the base). `FullModel` gives
the same interface with named "adapters" that are whole copies of the base's parameters: the active
one's tensors are put into the base's modules in place of its own, so the base's forward, generation,
gradient checkpointing and Opacus's hooks run unchanged on them, and `disable_adapter()` puts the base's
own parameters back (the blind baseline). Tied parameters (an input embedding shared with the output
head) are one tensor in every copy, so they stay tied, and a state holds them once, under the name the
base's `named_parameters()` gives them.

The base is shared by every use in a process (`federated.model.shared_base_model`): `unload` puts its
own parameters back untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fedleak.common.errors import FedleakError


@dataclass(frozen=True)
class FullConfig:
    """What `FullModel.peft_config` holds per adapter: the fields fedleak reads of a peft config."""
    is_prompt_learning: bool = False
    peft_type: None = None
    num_virtual_tokens: int = 0


class FullModel(torch.nn.Module):
    """A base model whose every parameter trains, with peft's adapter interface (see the module note).

    Args:
        base: the base model (a transformers causal LM); its parameters are frozen and kept.
        adapter: the first adapter's name, active after construction.
    """

    def __init__(self, base: torch.nn.Module, adapter: str):
        super().__init__()
        self.base = base
        own = dict(base.named_parameters())  # tied parameters once, under their first name
        name_of = {id(p): n for n, p in own.items()}
        # Every place a parameter sits, tied ones included: (module, attribute, name of the tensor).
        self._slots = [(base.get_submodule(full.rpartition(".")[0]), full.rpartition(".")[2], name_of[id(p)])
                       for full, p in base.named_parameters(remove_duplicate=False)]
        self._own = own
        for p in own.values():
            p.requires_grad_(False)
        self._copies: dict[str, dict[str, torch.nn.Parameter]] = {}
        self.peft_config: dict[str, FullConfig] = {}
        self.active_adapter = adapter
        self._adapters_disabled = False
        self.add_adapter(adapter, FullConfig())
        self.set_trainable(adapter)  # as peft's first adapter
        self._place()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "_slots", "_own", "_copies"):
                raise
            return getattr(self.base, name)  # config, generation_config, device, get_input_embeddings, ...

    # -- which tensors the base's modules hold
    def _place(self) -> None:
        """Put the active copy (the base's own parameters when disabled) into the base's modules."""
        tensors = self._own if self._adapters_disabled else self._copies[self.active_adapter]
        for module, attr, name in self._slots:
            module._parameters[attr] = tensors[name]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, name: str, config: FullConfig) -> None:
        """A new copy of the base's own parameters named `name` (frozen until `activate` lets it train)."""
        self._copies[name] = {n: torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                              for n, p in self._own.items()}
        self.peft_config[name] = config

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter:
            raise FedleakError(f"full fine-tuning: adapter {name!r} is active: activate another before deleting it")
        del self._copies[name], self.peft_config[name]

    def set_adapter(self, names: str | list[str]) -> None:
        """Make one copy active.

        Raises:
            FedleakError: several names (one set of weights can be in the model at a time) or an unknown one.
        """
        names = [names] if isinstance(names, str) else list(names)
        if len(names) != 1:
            raise FedleakError(f"adapters {names}: full fine-tuning has one set of weights in the model at a time; "
                               f"an algorithm that combines adapters (fedpit) needs model.adaptation = 'lora' or 'ia3'")
        if names[0] not in self._copies:
            raise FedleakError(f"full fine-tuning: no adapter named {names[0]!r} (have {sorted(self._copies)})")
        self.active_adapter = names[0]
        self._place()

    def set_trainable(self, trainable: str | None) -> None:
        """Let exactly the copy named `trainable` learn (None: none)."""
        for name, copy in self._copies.items():
            for p in copy.values():
                p.requires_grad_(name == trainable)

    def disable_adapter(self):
        """A context with the base model's own parameters in place (peft's `disable_adapter`)."""
        return self._placed(enabled=False)

    def enabled(self):
        """A context with the active copy in place again inside `disable_adapter()` (`adapters.adapters_enabled`)."""
        return self._placed(enabled=True)

    @contextlib.contextmanager
    def _placed(self, *, enabled: bool):
        previous = not self._adapters_disabled
        self._switch(enabled)
        try:
            yield
        finally:
            self._switch(previous)

    def _switch(self, enabled: bool) -> None:
        self._adapters_disabled = not enabled
        self._place()

    # -- states
    def adapter_tensors(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The copy named `name`, by parameter name in the base (its tensors, not copies of them)."""
        return self._copies[name]

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, state: dict[str, torch.Tensor]) -> None:
        for key, p in self._copies[name].items():
            p.copy_(state[key])

    def unload(self) -> torch.nn.Module:
        """The base with its own parameters back (peft's `unload`, without merging anything)."""
        for module, attr, name in self._slots:
            module._parameters[attr] = self._own[name]
        self._copies.clear()
        return self.base

    # -- what runs
    def get_base_model(self) -> torch.nn.Module:
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)
