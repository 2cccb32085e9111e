"""Full fine-tuning behind the adapter interface the rest of fedleak uses (peft's).

peft has no full fine-tuning method (a config must target some layer; its `modules_to_save` copies
cannot stand alone, and its `unload` would put the trained copy into the base). `FullModel` gives
the same interface with named "adapters" that are whole copies of the base's parameters: the active
one's tensors are put into the base's modules in place of its own, so the base's forward, generation,
gradient checkpointing and Opacus's hooks run unchanged on them, and `disable_adapter()` puts the base's
own parameters back (the blind baseline). Tied parameters (an input embedding shared with the output
head) are one tensor in every copy, so they stay tied, and a state holds them once, under the name the
base's `named_parameters()` gives them.

Several copies on at once (FEDPIT's global and local weights) combine as LoRA's updates do, by adding
their differences from the base: the modules get base + sum(copy - base). The sum is a tensor of its own;
when one of the copies trains, it is that copy plus the others' differences, and what it learns is written
back into the copy (copy = sum - the others' differences) before the copy is read or the active set changes.
The gradient with respect to the sum is the copy's, so any optimizer step is the copy's own, except weight
decay, which would shrink the others' differences too (fedleak's client training uses none).

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
        self._active = [adapter]
        self._trains: str | None = None
        # Several active copies: their sum and the copy it trains for (None: none).
        self._combined: dict[str, torch.nn.Parameter] | None = None
        self._lead: str | None = None
        self._adapters_disabled = False
        self.add_adapter(adapter, FullConfig())
        self.activate([adapter], trainable=adapter)  # as peft's first adapter

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "_slots", "_own", "_copies", "_combined"):
                raise
            return getattr(self.base, name)  # config, generation_config, device, get_input_embeddings, ...

    # -- which tensors the base's modules hold
    def _place(self) -> None:
        """Put the active copy, or the active copies' sum (the base's own parameters when disabled), into the
        base's modules."""
        if self._adapters_disabled:
            tensors = self._own
        else:
            tensors = self._combined if self._combined is not None else self._copies[self._active[0]]
        for module, attr, name in self._slots:
            module._parameters[attr] = tensors[name]

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def trainable_adapter(self) -> str | None:
        """The copy that trains (alone, or through the sum), or None."""
        return self._trains if self._trains in self._active else None

    def add_adapter(self, name: str, config: FullConfig) -> None:
        """A new copy of the base's own parameters named `name` (frozen until `activate` lets it train)."""
        self._copies[name] = {n: torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                              for n, p in self._own.items()}
        self.peft_config[name] = config

    def delete_adapter(self, name: str) -> None:
        if name in self._active:
            raise FedleakError(f"full fine-tuning: adapter {name!r} is active: activate another before deleting it")
        del self._copies[name], self.peft_config[name]

    def set_adapter(self, names: str | list[str]) -> None:
        """Make `names` active (their differences from the base add up); none trains."""
        self.activate([names] if isinstance(names, str) else list(names), trainable=None)

    def activate(self, names: list[str], *, trainable: str | None) -> None:
        """Make `names` active and let exactly `trainable` learn (None: none), in one step: the sum of several
        copies is rebuilt once, for the copy that trains.

        Raises:
            FedleakError: no name, or one this model lacks.
        """
        unknown = [n for n in names if n not in self._copies]
        if not names or unknown:
            raise FedleakError(f"full fine-tuning: no adapter named {unknown[0] if unknown else None!r} "
                               f"(have {sorted(self._copies)})")
        self._sync()
        self._active, self._trains = list(dict.fromkeys(names)), trainable
        for name, copy in self._copies.items():
            for p in copy.values():  # a copy in a sum trains through the sum
                p.requires_grad_(name == trainable and len(self._active) == 1)
        self._combine()
        self._place()

    @torch.no_grad()
    def _differences(self, name: str, *, skip: str) -> torch.Tensor:
        """The sum over active copies but `skip` of (copy - base) for the parameter `name`."""
        own = self._own[name]
        total = torch.zeros_like(own)
        for other in self._active:
            if other != skip:
                total += self._copies[other][name] - own
        return total

    @torch.no_grad()
    def _combine(self) -> None:
        """The sum of the active copies (None for one), a trainable tensor when one of them trains."""
        if self._combined is not None:  # the old sum out of the modules first: never two sums in memory
            self._combined = None
            self._place()
        if len(self._active) == 1:
            self._lead = None
            return
        lead = self._trains if self._trains in self._active else None
        first = lead or self._active[0]
        # copy + differences: the order `_sync` repeats to tell an untouched sum bit for bit
        self._combined = {n: torch.nn.Parameter(self._copies[first][n] + self._differences(n, skip=first),
                                                requires_grad=lead is not None) for n in self._own}
        self._lead = lead

    @torch.no_grad()
    def _sync(self) -> None:
        """Write what the sum learned back into the copy it trains for: copy = sum - the others' differences.
        Tensors equal to the sum as built are skipped (the subtraction would only add rounding to them); any
        other is written, whatever changed it (an optimizer, fused or not, or a `.data` write)."""
        if self._combined is None or self._lead is None:
            return
        for n, p in self._combined.items():
            copy, others = self._copies[self._lead][n], self._differences(n, skip=self._lead)
            if not torch.equal(p, copy + others):
                copy.copy_(p - others)

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
        """The copy named `name`, by parameter name in the base (its tensors, not copies of them; while it
        trains inside a sum, the sum's tensors are the ones that get gradients)."""
        if name == self._lead:
            self._sync()
        return self._copies[name]

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self._sync()
        for key, p in self._copies[name].items():
            p.copy_(state[key])
        if self._combined is not None and name in self._active:
            self._combine()
            self._place()

    def unload(self) -> torch.nn.Module:
        """The base with its own parameters back (peft's `unload`, without merging anything)."""
        for module, attr, name in self._slots:
            module._parameters[attr] = self._own[name]
        self._copies.clear()
        self._combined = None
        return self.base

    # -- what runs
    def get_base_model(self) -> torch.nn.Module:
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)
