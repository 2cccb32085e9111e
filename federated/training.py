"""Tokenising instruction records and training a LoRA adapter on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from fedleak.federated.batching import IGNORE, collate_packed, pack_rows, packing_ok, padded_segments, row_losses
from fedleak.federated.data import Record
from fedleak.federated.methods import virtual_tokens
from fedleak.federated.model import to_device
from fedleak.federated.prompts import alpaca_batch, example_ids, is_chat


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where the loss does not look (prompt tokens if response-only)


class Encoded(list):
    """`encode`'s examples (a list), with what `max_length` cut: `truncated_records` (sequences longer
    than `max_length`) and `truncated_tokens` (tokens dropped from them)."""

    truncated_records: int = 0
    truncated_tokens: int = 0


def encode(records: Sequence[Record], tokenizer, *, max_length: int, response_only: bool = True) -> Encoded:
    """Prompt + response + end of answer in the tokenizer's prompt format (`federated/prompts.py`),
    truncated to `max_length`; prompt tokens masked if `response_only`. The result counts what was cut."""
    out = Encoded()
    if not records:
        return out
    if is_chat(tokenizer):
        sequences = [example_ids(tokenizer, r.instruction, r.input, r.output) for r in records]
    else:
        sequences = alpaca_batch(tokenizer, records)  # batched: the same ids, much faster
    for full, n_prompt in sequences:
        ids = full[:max_length]
        labels = ([IGNORE] * n_prompt + full[n_prompt:])[:max_length] if response_only else list(ids)
        out.append(Example(tuple(ids), tuple(labels)))
        if len(full) > max_length:
            out.truncated_records += 1
            out.truncated_tokens += len(full) - max_length
    return out


def truncation(examples: Sequence[Example]) -> dict[str, int]:
    """What `max_length` cut from `encode`'s examples: {"records", "tokens"} (0 for a plain list)."""
    return {"records": getattr(examples, "truncated_records", 0), "tokens": getattr(examples, "truncated_tokens", 0)}


def collate(examples: Sequence[Example], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-padded batch; pads sit under a zero attention mask and IGNORE labels, so any id does (None: 0,
    for a tokenizer without a pad token)."""
    pad_id = 0 if pad_id is None else pad_id
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_indices(n: int, *, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[int]]:
    """The record indices of each batch: a shuffled order if `generator` is given, else in order."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def batches(examples: Sequence[Example], *, batch_size: int, pad_id: int,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches in a shuffled order if `generator` is given, else in order."""
    for rows in batch_indices(len(examples), batch_size=batch_size, generator=generator):
        yield collate([examples[i] for i in rows], pad_id)


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass: (log-probs of each target token [B, T-1], target mask [B, T-1], logits), on the
    model's device (the batch is moved there); no key/value cache is kept (none is reused)."""
    batch = to_device(batch, model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, virtual_tokens(model):-1]  # a soft prompt's leading positions predict nothing scored
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask, logits


def sequence_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence mean token loss [B] of a right-padded batch; a batch loss is its mean (what per-sample
    DP clipping needs). The output head runs at target positions only (`batching.scored_logits`), except
    under Opacus's wrapper (DP-SGD), where it runs at every position."""
    return row_losses(model, batch, padded_segments(batch), batch["input_ids"].shape[0])


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


def train_adapter(model, examples: Sequence[Example], settings: TrainSettings, *, pad_id: int,
                  generator: torch.Generator | None, on_step=None, pack: bool = True) -> dict[str, float]:
    """Train the trainable (LoRA) parameters of `model` in place; returns loss and step counts.

    Each step's batch (shuffled by `generator`, else in order) is packed into fewer rows when `pack`,
    the architecture passes `batching.packing_ok` and two or more records fit in one row of the batch's
    longest; else right-padded. The same records and per-record mean losses either way, so the same
    gradient up to float order."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    pack = pack and packing_ok(model, pad_id=pad_id)
    optimizer.zero_grad(set_to_none=True)  # a gradient left on the parameters must not join the first step
    model.train()
    losses, steps = [], 0
    for _ in range(settings.epochs):
        for rows in batch_indices(len(examples), batch_size=settings.batch_size, generator=generator):
            chosen = [examples[i] for i in rows]
            lengths = [len(e.input_ids) for e in chosen]
            if pack and len(pack_rows(lengths, max(lengths))) < len(chosen):
                batch, segments = collate_packed(chosen, pad_id)
            else:  # nothing shares a row: the padded batch is the same work
                batch = collate(chosen, pad_id)
                segments = padded_segments(batch)
            loss = row_losses(model, batch, segments, len(chosen)).mean()
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            steps += 1
            if on_step is not None:
                on_step()
    model.eval()
    tail = losses[-max(1, len(losses) // 4):]
    return {"loss_last_quarter": float(sum(tail) / len(tail)), "steps": steps, "examples": len(examples)}
