"""Less wasted work per forward pass: the output head at scored positions only, and packed batches.

Both leave every record's loss what a right-padded batch gives (up to float summation order), so
training, DP-SGD's per-record clipping and scoring compute what they did; a test checks per-record
losses and gradients against the padded batch.

- `scored_logits`: the language-model head (a [H, V] matmul, the largest single layer of a small
  model) runs on the hidden states of the M positions whose next token is scored, not on all B x T.
  Prompt tokens (about half of an instruction record) and padding need no logits.
- Packing (`pack_rows`, `collate_packed`): a batch's sequences are laid side by side into as few rows
  as fit the batch's longest sequence (first-fit decreasing), each sequence with its own positions
  from 0. Transformers reads restarting `position_ids` without an attention mask as packed sequences
  and masks attention block-diagonally (`masking_utils.find_packed_sequence_indices`), so no token
  sees another record. The batch is the same records; only the padding goes. Architectures that do
  not honour this (positions derived from the attention mask, as OPT's) are found by `packing_ok`, a
  one-time probe, and keep padded batches. Opacus clips per row, so DP-SGD never packs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.common.errors import FedleakError
from fedleak.federated.methods import prompt_positions, virtual_tokens
from fedleak.federated.model import to_device

IGNORE = -100


def scored_logits(model, batch: dict[str, torch.Tensor], mask: torch.Tensor, past: dict | None = None) -> torch.Tensor:
    """The logits at the scored positions of `batch`, [M, V] in row-major (row, position) order.

    Args:
        model: a causal LM (transformers, or peft's wrapper of one).
        batch: `input_ids` [B, T] and either `attention_mask` [B, T] (padded) or `position_ids` [B, T]
            (packed), on the model's device.
        mask: [B, T - 1] bool, True where the token at t + 1 is scored (position t predicts it).
        past: the model's key/value cache of positions before `batch`'s, as the keyword argument that passes
            it (`{"cache": ...}` in transformers 5.24, `{"past_key_values": ...}` before); the model appends to
            it. `batch`'s `attention_mask` then covers the cached positions too and its `position_ids` continue
            after them; `mask` still covers `batch`'s tokens only (`stats.compute_stats`' prefix cache). Not
            with an active soft prompt.

    A forward pre-hook on the output embeddings (`get_output_embeddings()`; every transformers CausalLM
    has one) hands the head the hidden states of those M positions, [1, M, H], instead of all B x T;
    whatever the CausalLM does after its head (Gemma 2's soft-capping) still applies. A model without
    that method gets the full logits, then indexed: so does Opacus's GradSampleModule (it forwards
    submodules, not methods), which is what DP-SGD needs, since a hooked head sees one row of M
    positions and a trainable head's per-sample gradients would then have one row, not one per record.

    An active soft prompt (`methods.virtual_tokens`) adds leading positions that are never scored.

    Raises:
        FedleakError: the head ran more than once or returned another shape (not a plain causal LM head).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    skip = virtual_tokens(model)
    if past is not None and skip:
        raise FedleakError("scored_logits: a key/value cache of earlier positions cannot follow a soft prompt")
    inputs.update(past or {}, use_cache=past is not None)
    if head is None:
        return model(**inputs).logits[:, skip:-1][mask]
    rows, width = batch["input_ids"].shape
    where = torch.zeros((rows, skip + width), dtype=torch.bool, device=mask.device)
    where[:, skip:-1] = mask
    applied = []

    def keep_scored(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != where.shape:
            return None
        applied.append(True)
        picked = hidden[where].unsqueeze(0)
        return ((picked, *args[1:]), kwargs) if args else (args, {**kwargs, "input": picked})

    handle = head.register_forward_pre_hook(keep_scored, with_kwargs=True)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    if len(applied) == 1 and logits.shape[:2] == (1, int(mask.sum())):
        return logits[0]
    if applied:
        raise FedleakError(f"the output head of {type(model).__name__} was called {len(applied)} times or returned "
                           f"logits of shape {tuple(logits.shape)} when handed the scored positions only: not a plain "
                           f"causal LM head, which fedleak's training and scoring need")
    return logits[:, skip:-1][mask]


def row_losses(model, batch: dict[str, torch.Tensor], segments: torch.Tensor, count: int) -> torch.Tensor:
    """Mean token loss of each of `count` sequences [count], from one forward pass over `batch`.

    `segments` [B, T] gives the sequence index of each token (-1 for padding); a target at t + 1 belongs
    to its own sequence. A sequence without targets gets 0 (as a padded batch's clamp gives)."""
    batch = to_device(batch, model)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(scored_logits(model, batch, mask).float(), dim=-1)
    picked = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    owner = segments[:, 1:].to(picked.device)[mask]
    totals = torch.zeros(count, dtype=picked.dtype, device=picked.device).index_add(0, owner, picked)
    counts = torch.zeros(count, dtype=picked.dtype, device=picked.device).index_add(0, owner, torch.ones_like(picked))
    return -(totals / counts.clamp(min=1))


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows whose lengths sum to at most `width`
    (every length must be at most `width`); deterministic (ties keep input order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def collate_packed(examples, pad_id: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(batch with `input_ids`, `position_ids`, `labels` [R, W], segments [R, W]) for `examples` packed
    into R rows of the longest example's width W. Positions restart at 0 for each example (and for the
    padding after the last one, which so forms its own block); the first token of each example carries
    no label, so the previous example's last position predicts nothing across the boundary."""
    pad_id = 0 if pad_id is None else pad_id
    lengths = [len(e.input_ids) for e in examples]
    width = max(lengths)
    rows = pack_rows(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids)
            labels[r, at + 1:at + n] = torch.tensor(examples[i].labels[1:])
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = i
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}, segments


def padded_segments(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The segments of a right-padded batch: row i is sequence i, padding -1."""
    rows = torch.arange(batch["input_ids"].shape[0]).unsqueeze(1).expand_as(batch["input_ids"])
    return torch.where(batch["attention_mask"].bool(), rows, torch.full_like(rows, -1))


_PACKING: dict[tuple[str, str], bool] = {}  # (architecture, attention implementation) -> verdict


@torch.no_grad()
def packing_ok(model, *, pad_id: int | None, atol: float = 1e-4) -> bool:
    """Whether `model` gives packed sequences the losses it gives them padded: random sequences of 9, 5
    and 3 tokens (the 5 and the 3 sharing a row, then a padding token) against the same padded. Probed once per
    architecture and attention implementation; any error in the packed pass means no."""
    from fedleak.federated.training import Example, collate  # training imports this module

    if prompt_positions(model):
        return False  # peft ignores position_ids under a soft prompt, which packing needs; a prefix sits at 0..P-1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (type(base).__name__, str(getattr(base.config, "_attn_implementation", None)))
    if key not in _PACKING:
        training = model.training
        model.eval()
        try:
            embeddings = model.get_input_embeddings()
            vocab = getattr(embeddings, "base_layer", embeddings).num_embeddings  # peft wraps a LoRA'd embedding
            ids = torch.randint(3, vocab, (17,), generator=torch.Generator().manual_seed(0)).tolist()
            examples = [Example(tuple(part), tuple(part)) for part in (ids[:9], ids[9:14], ids[14:])]
            padded = collate(examples, pad_id)
            expected = row_losses(model, padded, padded_segments(padded), len(examples))
            packed, segments = collate_packed(examples, pad_id)
            if packed["input_ids"].shape[0] != 2:
                raise AssertionError("the probe's 5 and 3 tokens must share a row beside the 9")
            got = row_losses(model, packed, segments, len(examples))
            _PACKING[key] = bool(torch.allclose(got.cpu(), expected.cpu(), atol=atol, rtol=1e-4))
        except Exception:  # an architecture that rejects position_ids without a mask: keep padding
            _PACKING[key] = False
        finally:
            model.train(training)
    return _PACKING[key]
