"""Token statistics of one forward pass, shared by every logit-based membership score.

MIMIR runs one forward pass per attack; here each (model, text variant, record set) is passed
through the model once per batch and every score (LOSS, zlib, Min-K%, Min-K%++, reference,
lowercase) is a few lines over the cached statistics. For each scored token we keep its log-prob
and the mean and standard deviation of log p(z) for z drawn from the model's next-token
distribution at that position (what Min-K%++ standardises by).

Statistics of the target model live in `target.cache` (one view); those of the reference model
(by default the base model, identical for every view of a run) in `env.cache`, so the reference
pass runs once per run and record set, not once per view.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedleak.federated.data import Record
from fedleak.federated.training import IGNORE, batches, encode

ORIGINAL, LOWERCASE = "original", "lowercase"
TARGET, BASE = "target", "base"


@dataclass(frozen=True)
class TokenStats:
    """Per-record arrays padded to the longest record; `mask` marks the scored tokens."""

    logp: np.ndarray  # [N, T] log-prob of each scored token
    mu: np.ndarray  # [N, T] E_z[log p(z)] under the next-token distribution
    sigma: np.ndarray  # [N, T] std of log p(z) under the same distribution
    mask: np.ndarray  # [N, T] bool
    texts: tuple[str, ...]  # the scored text of each record (the response, or the whole example)

    @property
    def loss(self) -> np.ndarray:
        """Mean negative log-likelihood of each record's scored tokens."""
        return -(self.logp * self.mask).sum(1) / np.maximum(self.mask.sum(1), 1)


def lowercased(record: Record) -> Record:
    return dataclasses.replace(record, instruction=record.instruction.lower(), input=record.input.lower(),
                               output=record.output.lower())


@torch.no_grad()
def compute_stats(model, tokenizer, records: Sequence[Record], *, max_length: int, response_only: bool,
                  batch_size: int) -> TokenStats:
    """One forward pass per batch of `records`."""
    examples = encode(records, tokenizer, max_length=max_length, response_only=response_only)
    rows: list[tuple[np.ndarray, ...]] = []
    model.eval()
    for batch in batches(examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        p_all = logp_all.exp()
        mu = (p_all * logp_all).sum(-1)
        second = (p_all * logp_all.square()).sum(-1)
        sigma = (second - mu.square()).clamp(min=0).sqrt()
        picked = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for i in range(len(targets)):
            keep = mask[i]
            rows.append(tuple(t[i][keep].numpy().astype(np.float64) for t in (picked, mu, sigma)))
    width = max((len(r[0]) for r in rows), default=0)

    def padded(k: int) -> np.ndarray:
        out = np.zeros((len(rows), width))
        for i, r in enumerate(rows):
            out[i, : len(r[k])] = r[k]
        return out

    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        mask[i, : len(r[0])] = True
    texts = tuple(r.output if response_only else f"{r.instruction}\n{r.input}\n{r.output}" for r in records)
    return TokenStats(logp=padded(0), mu=padded(1), sigma=padded(2), mask=mask, texts=texts)


def _reference_context(target, reference: str):
    """The reference model and how to enter it: the base model is the target with its adapters
    switched off (no second copy in memory); any other name is loaded once per run."""
    if reference == BASE:
        return target.model, (target.model.disable_adapter() if hasattr(target.model, "disable_adapter")
                              else contextlib.nullcontext())
    from fedleak.federated.model import load_base_model

    models = target.env.cache.setdefault("reference-models", {})
    if reference not in models:
        models[reference], _ = load_base_model(reference)
    return models[reference], contextlib.nullcontext()


def shared_stats(target, records: Sequence[Record], *, model: str = TARGET, variant: str = ORIGINAL,
                 reference: str = BASE) -> TokenStats:
    """Statistics of `records` under the target view (`model="target"`) or the reference model,
    computed on first use and cached: the target's per view, the reference's per run."""
    key = (variant, tuple(r.record_id for r in records), tuple(hash(r) for r in records))
    if model == TARGET:
        cache, net, context = target.cache, target.model, contextlib.nullcontext()
    else:
        cache = target.env.cache.setdefault(("reference", reference), {}) if target.env else target.cache.setdefault(
            ("reference", reference), {})
        net, context = _reference_context(target, reference)
    if key not in cache:
        texts = [lowercased(r) for r in records] if variant == LOWERCASE else list(records)
        with context:
            cache[key] = compute_stats(net, target.tokenizer, texts, max_length=target.max_length,
                                       response_only=target.response_only, batch_size=target.batch_size)
    return cache[key]


from fedleak.attacks.base import MembershipAttack  # noqa: E402  (after the helpers it builds on)


class LogitAttack(MembershipAttack):
    """A score computed from shared token statistics. `needs` lists the (model, variant) passes the
    score reads; `from_stats` is the formula, a pure function of those statistics."""

    needs: tuple[tuple[str, str], ...] = ((TARGET, ORIGINAL),)
    reference: str = BASE

    def score(self, target, records: Sequence[Record]) -> np.ndarray:
        stats = {need: shared_stats(target, records, model=need[0], variant=need[1], reference=self.reference)
                 for need in self.needs}
        return np.asarray(self.from_stats(stats), dtype=np.float64)

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        raise NotImplementedError
