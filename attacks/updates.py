"""What a curious server holds of a training, white-box: every round's global adapter and, unless secure
aggregation hides them, every client's upload; and per-record gradients compared with those updates.

The server's update of client i in round r is `upload_i(r) - global(r - 1)` over the shared adapter
(peft's "default": FEDIT's only adapter, FEDPIT's global one; local adapters never leave a client).
Under secure aggregation only the aggregate `global(r) - global(r - 1)` is known: update-based
attacks take it as their target on the `global` view.

Attacks read this through `Target.server` (set by `eval/attacking.py` for every view of a training's
checkpoints); a target built by hand has none, and an update-based attack then raises FedleakError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from fedleak.common.errors import FedleakError
from fedleak.federated import checkpoint
from fedleak.federated.adapters import DEFAULT, AdapterState, activate, adapter_parameters, apply_view
from fedleak.federated.data import Record
from fedleak.federated.model import to_device
from fedleak.federated.training import collate, encode, sequence_losses

if TYPE_CHECKING:
    from fedleak.attacks.base import Target
    from fedleak.federated.adapters import AdapterSettings

UPLOAD, GLOBAL = "upload", "global"


@dataclass
class ServerRecord:
    """A training's checkpoints as a curious server reads them: adapters per round and view, updates,
    and a context that loads another view into the target's model and restores the target's own after.

    Args:
        training_dir: the training's folder (its `round-XXXX/` checkpoints, `federated/checkpoint.py`).
        settings: the LoRA settings the adapters were trained with.
        hides_uploads: secure aggregation: no `upload/i` view exists, only the aggregate is known.
    """

    training_dir: Path
    settings: AdapterSettings
    hides_uploads: bool = False
    _states: dict = field(default_factory=dict, repr=False)

    @property
    def rounds(self) -> list[int]:
        """Round numbers with a checkpoint (0 = the initial adapter), ascending."""
        return checkpoint.rounds(self.training_dir)

    def clients(self, rnd: int) -> list[int]:
        """The clients whose upload the server holds for round `rnd` (none under secure aggregation)."""
        views = checkpoint.available_views(checkpoint.round_dir(self.training_dir, rnd))
        return sorted(c for o, c in map(checkpoint.parse_view_key, views) if o == UPLOAD and c is not None)

    def state(self, rnd: int, view: str) -> AdapterState:
        """The shared adapter's tensors (float32, CPU) of `view` ("global" or "upload/i") in round `rnd`.

        Raises:
            FedleakError: the round or view is not in the checkpoints (the message lists what is).
        """
        key = (rnd, view)
        if key not in self._states:
            folder = checkpoint.round_dir(self.training_dir, rnd)
            if rnd not in self.rounds:
                raise FedleakError(f"{self.training_dir}: no checkpoint of round {rnd} (rounds there: "
                                   f"{self.rounds}): an update needs the round and the one before it")
            observer, client = checkpoint.parse_view_key(view)
            adapters = checkpoint.load_view(folder, observer, client)
            if DEFAULT not in adapters:
                raise FedleakError(f"{folder}: view {view!r} has no shared adapter {DEFAULT!r}")
            self._states[key] = adapters[DEFAULT]
        return self._states[key]

    def update(self, rnd: int, view: str) -> AdapterState:
        """`view`'s adapter in round `rnd` minus the global adapter it started from (round `rnd - 1`):
        a client's update for "upload/i", the aggregate update for "global"."""
        if rnd < 1:
            raise FedleakError("round 0 is the initial adapter: there is no update before round 1")
        after, before = self.state(rnd, view), self.state(rnd - 1, GLOBAL)
        return {k: after[k] - before[k] for k in sorted(after)}

    def available(self, rnd: int, view: str) -> bool:
        """Whether the checkpoints hold `view` in round `rnd` and the global adapter of round `rnd - 1`."""
        present = self.rounds
        if rnd not in present or rnd - 1 not in present:
            return False
        return view in checkpoint.available_views(checkpoint.round_dir(self.training_dir, rnd))

    @contextlib.contextmanager
    def viewing(self, target: Target, adapter: AdapterState) -> Iterator[None]:
        """Load `adapter` as the shared adapter (alone) into the target's model; on exit the target's
        own view is loaded back from its checkpoint, whatever happened inside."""
        try:
            apply_view(target.model, {DEFAULT: adapter}, self.settings)
            yield
        finally:
            target.model.zero_grad(set_to_none=True)
            checkpoint.apply_saved_view(target.model, checkpoint.round_dir(self.training_dir, target.round),
                                        target.observer, target.client, self.settings)


def server_of(target: Target, attack: str) -> ServerRecord:
    """The target's `ServerRecord`, or a one-line error naming what is missing."""
    server = getattr(target, "server", None)
    if server is None:
        raise FedleakError(f"attack {attack}: the target carries no training checkpoints (Target.server): run it "
                           f"through `fedleak run` or `fedleak attack`, which read the server's updates")
    return server


def flat(state: AdapterState, keys: Sequence[str] | None = None) -> torch.Tensor:
    """One float64 vector of the tensors in `keys` order (default: sorted), the order `record_gradients` uses."""
    keys = sorted(state) if keys is None else keys
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in keys])


def record_gradients(model, tokenizer, records: Sequence[Record], basis: torch.Tensor, *, keys: Sequence[str],
                     max_length: int, response_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-record gradients of the mean token loss with respect to the shared adapter's tensors,
    reduced on the fly to their coordinates in `basis` and their norms (a [N, P] gradient matrix
    would not fit for a billion-parameter model's adapters; one record's gradient does).

    One backward pass per record (batch 1): that is the per-sample gradient exactly, with no padding,
    and costs one forward plus one backward per record.

    Args:
        model: a peft model whose shared adapter holds the parameters to differentiate at.
        basis: [K, P] float64 directions (P = the adapter's size, tensors in `keys` order).
        keys: the adapter's saved-state keys in the order `basis` flattens them.

    Returns:
        (dots [N, K] = g_i . basis_k, norms [N] = ||g_i||), float64; a record with no scored token has
        a zero gradient.

    Raises:
        FedleakError: `keys` do not match the model's shared adapter.
    """
    params = adapter_parameters(model, DEFAULT)
    if sorted(params) != sorted(keys):
        raise FedleakError(f"the update's {len(keys)} tensors do not match the model's adapter ({len(params)}): "
                           f"attack the checkpoints with the adapter settings (model.adaptation and its table) "
                           f"they were trained with")
    ordered = [params[k] for k in keys]
    activate(model, [DEFAULT], trainable=DEFAULT)
    model.eval()  # no dropout: the gradient of the loss the record had at these weights
    basis = basis.to(torch.float64)
    dots, norms = np.zeros((len(records), basis.shape[0])), np.zeros(len(records))
    examples = encode(records, tokenizer, max_length=max_length, response_only=response_only)
    try:
        for i, example in enumerate(examples):
            if not any(label >= 0 for label in example.labels[1:]):
                continue
            batch = to_device(collate([example], tokenizer.pad_token_id), model)
            grads = torch.autograd.grad(sequence_losses(model, batch).sum(), ordered, allow_unused=True)
            g = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1).to("cpu", torch.float64)
                           for gr, p in zip(grads, ordered)])
            dots[i] = (basis @ g).numpy()
            norms[i] = float(g.norm())
    finally:
        for p in ordered:
            p.requires_grad_(False)
    return dots, norms
