"""Token statistics of one forward pass, shared by every logit-based membership score.

Each (model, text variant, record set) is passed through the model once per batch and every score
(LOSS, zlib, Min-K%, Min-K%++, reference, lowercase) is a few lines over the cached statistics. For
each scored token we keep its log-prob and the mean and standard deviation of log p(z) for z drawn
from the model's next-token distribution at that position (what Min-K%++ standardises by).

MIMIR (iamgroot42/mimir, run.py `get_mia_scores`) also shares one forward pass per document among
its attacks, at batch 1, with a log-softmax over the full vocabulary at every position and a Python
loop over the tokens. Here records are batched by length (little padding), and the language-model
head and the softmax run at scored positions only: bench/mia_scores.py times the two side by side.

Statistics of the target model live in `target.cache` (one view, or every view that loads the same
adapter files: `eval/attacking.py`); those of the reference model (by default the base model,
identical for every view of a run) in `env.cache`, so the reference pass runs once per run and record
set, not once per view.

A pass may put the same token `prefix` in front of every example (ReCaLL's context): the prefix and the
example's first token carry IGNORE labels, so the prefixed pass scores exactly the plain pass's tokens,
and it is cached per (prefix, records) beside the plain one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedleak.attacks.base import MembershipAttack, Target
from fedleak.federated.methods import prompt_positions
from fedleak.federated.data import Record
from fedleak.common.errors import FedleakError
from fedleak.federated.batching import scored_logits
from fedleak.federated.model import to_device
from fedleak.federated.training import IGNORE, Example, collate, encode

ORIGINAL, LOWERCASE = "original", "lowercase"
TARGET, REFERENCE = "target", "reference"  # the model a statistic comes from
BASE = "base"  # the default reference model: the target view with its adapters switched off


@dataclass(frozen=True)
class TokenStats:
    """Per-record arrays padded to the longest record; `mask` marks the scored tokens."""

    logp: np.ndarray  # [N, T] log-prob of each scored token
    mu: np.ndarray  # [N, T] E_z[log p(z)] under the next-token distribution
    sigma: np.ndarray  # [N, T] std of log p(z) under the same distribution
    mask: np.ndarray  # [N, T] bool
    texts: tuple[str, ...]  # the scored text of each record (the response, or the whole example)
    ids: np.ndarray | None = None  # [N, T] int64 token id of each scored token (DC-PDD's frequency lookup)

    @property
    def loss(self) -> np.ndarray:
        """Mean negative log-likelihood of each record's scored tokens."""
        return -(self.logp * self.mask).sum(1) / np.maximum(self.mask.sum(1), 1)


def lowercased(record: Record) -> Record:
    return dataclasses.replace(record, instruction=record.instruction.lower(), input=record.input.lower(),
                               output=record.output.lower())


def scorable(records: Sequence[Record], tokenizer, *, max_length: int, response_only: bool) -> list[Record]:
    """The records with at least one scored token (a prompt that fills `max_length` leaves none, and
    an empty record has no loss: scoring it would rank it as the surest member)."""
    examples = encode(records, tokenizer, max_length=max_length, response_only=response_only)
    return [r for r, e in zip(records, examples) if any(label != IGNORE for label in e.labels[1:])]


TOKEN_CHUNK = 512  # scored positions per softmax: bounds memory at TOKEN_CHUNK x vocabulary floats


def positions(model) -> int | None:
    """The positions left for the input (config.json's max_position_embeddings or n_positions, less an
    active soft prompt's or prefix's positions), None if unknown."""
    config = getattr(model, "config", None)
    limit = next((value for key in ("max_position_embeddings", "n_positions")
                  if isinstance(value := getattr(config, key, None), int)), None)
    return None if limit is None else limit - prompt_positions(model)


def prefixed(examples: Sequence[Example], prefix: Sequence[int], *, context: int | None) -> list[Example]:
    """Each example behind `prefix`, which is scored nowhere: the prefix and the example's first token (never
    scored in a plain pass, whose labels start at the second token) carry IGNORE labels, so exactly the plain
    pass's tokens are scored. A sequence longer than `context` keeps the prefix's last tokens (those next to
    the example): the example itself, as `encode` cut it to max_length, is never cut."""
    out = []
    for e in examples:
        room = len(prefix) if context is None else max(0, min(len(prefix), context - len(e.input_ids)))
        head = tuple(prefix[len(prefix) - room:])
        out.append(Example(head + e.input_ids, (IGNORE,) * (room + 1) + e.labels[1:]))
    return out


@torch.no_grad()
def compute_stats(model, tokenizer, records: Sequence[Record], *, max_length: int, response_only: bool,
                  batch_size: int, progress: bool = False, prefix: Sequence[int] = (),
                  context: int | None = None) -> TokenStats:
    """One forward pass per batch of `records`, the records batched by length (longest first, so
    batches carry little padding and the largest comes first; the output keeps the input order).

    The language-model head runs only at scored positions (`federated.batching.scored_logits`), and the softmax over the
    vocabulary in chunks of TOKEN_CHUNK positions, so a 128k-token vocabulary does not multiply the
    logits' memory.

    `prefix`: token ids put in front of every example, unscored (`prefixed`); `context` caps the prefixed
    sequence's length by shortening the prefix (None: no cap)."""
    examples = encode(records, tokenizer, max_length=max_length, response_only=response_only)
    if prefix:
        examples = prefixed(examples, prefix, context=context)
    n = len(examples)
    counts = np.array([sum(label != IGNORE for label in e.labels[1:]) for e in examples], dtype=np.int64)
    width = int(counts.max(initial=0))
    out = [np.zeros((n, width)) for _ in range(3)]  # logp, mu, sigma
    token_ids = np.zeros((n, width), dtype=np.int64)
    order = sorted(range(n), key=lambda i: -len(examples[i].input_ids))
    model.eval()
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        batch = to_device(collate([examples[i] for i in rows], tokenizer.pad_token_id), model)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        scored, wanted = scored_logits(model, batch, mask), targets[mask]  # [M, V], [M]
        columns: list[list[torch.Tensor]] = [[], [], []]
        for chunk, ids in zip(scored.split(TOKEN_CHUNK), wanted.split(TOKEN_CHUNK)):
            logp = torch.log_softmax(chunk.float(), dim=-1)
            p = logp.exp()
            mean = (p * logp).sum(-1)
            # Centred: E[l^2] - E[l]^2 cancels catastrophically in fp32 for flat distributions
            # (a relative error of 4e-4 in sigma on a random GPT-2).
            variance = (p * (logp - mean.unsqueeze(-1)).square()).sum(-1)
            columns[0].append(logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
            columns[1].append(mean)
            columns[2].append(variance.sqrt())
        batch_counts = counts[rows]  # scatter the batch's flat values back to each record's row
        record = np.repeat(np.asarray(rows), batch_counts)
        column = np.arange(int(batch_counts.sum())) - np.repeat(np.cumsum(batch_counts) - batch_counts,
                                                                batch_counts)
        for target, values in zip(out, columns):
            if values:
                target[record, column] = torch.cat(values).double().cpu().numpy()
        token_ids[record, column] = wanted.cpu().numpy()
    mask = np.arange(width)[None, :] < counts[:, None]
    texts = tuple(r.output if response_only else f"{r.instruction}\n{r.input}\n{r.output}" for r in records)
    return TokenStats(logp=out[0], mu=out[1], sigma=out[2], mask=mask, texts=texts, ids=token_ids)


def reference_model(target, reference: str):
    """(model, tokenizer, context to enter) of the reference: the base model is the target with its
    adapters switched off (no second copy in memory); any other name is loaded once per run, with its
    own tokenizer (records are tokenised by the model that scores them)."""
    if reference == BASE:
        if not hasattr(target.model, "disable_adapter"):
            raise FedleakError("the reference model 'base' needs a peft model whose adapters can be switched off "
                               "(disable_adapter): pass the peft-wrapped view as the target")
        return target.model, target.tokenizer, target.model.disable_adapter()
    from fedleak.federated.model import DTYPES, load_base_model, model_device
    from fedleak.federated.prompts import prompt_format

    cache = target.env.cache if target.env is not None else target.cache
    models = cache.setdefault("reference-models", {})
    if reference not in models:
        allow = target.env.allow_download if target.env is not None else False
        # On the target's device and in its weights' dtype; the run's Alpaca format is kept, a chat
        # format becomes the reference's own template if it has one.
        weights = target.model.get_input_embeddings().weight.dtype
        dtype = next((name for name, d in DTYPES.items() if d == weights), "auto")
        fmt = "alpaca" if prompt_format(target.tokenizer) == "alpaca" else "auto"
        try:
            models[reference] = load_base_model(reference, allow_download=allow, device=str(model_device(target.model)),
                                                dtype=dtype, prompt_format=fmt)
        except FedleakError as exc:
            raise FedleakError(f"attack reference: model = {reference!r}: {exc}") from None
    net, tokenizer = models[reference]
    return net, tokenizer, contextlib.nullcontext()


def reference_cache(target, reference: str = BASE) -> dict:
    """The run-wide cache of a reference model's statistics (`env.cache`; the view's without an
    environment). The base model's is also where the blind baseline's target statistics go
    (`eval/membership_cell.py`): a view with its adapters off is the base model, so the two share passes."""
    home = target.env.cache if target.env is not None else target.cache
    return home.setdefault(("reference", reference), {})


def shared_stats(target, records: Sequence[Record], *, model: str = TARGET, variant: str = ORIGINAL,
                 reference: str = BASE, prefix: Sequence[int] = ()) -> TokenStats:
    """Statistics of `records` under the target view (`model="target"`) or the reference model,
    computed on first use and cached: the target's per view, the reference's per run.

    `prefix`: token ids (of that model's tokenizer) in front of every record, unscored (`compute_stats`);
    cached per prefix beside the plain pass, the prefixed sequence capped at the model's positions."""
    key = (variant, tuple(r.record_id for r in records), tuple(hash(r) for r in records))
    if prefix:  # the plain pass keeps its key: the blind baseline and every other score share it
        key += (("prefix", tuple(int(t) for t in prefix)),)
    if model == TARGET:
        cache, net, tokenizer, context = target.cache, target.model, target.tokenizer, contextlib.nullcontext()
    else:
        cache = reference_cache(target, reference)
        net, tokenizer, context = reference_model(target, reference)
    if key not in cache:
        texts = [lowercased(r) for r in records] if variant == LOWERCASE else list(records)
        with context:
            cache[key] = compute_stats(net, tokenizer, texts, max_length=target.max_length,
                                       response_only=target.response_only, batch_size=target.batch_size,
                                       progress=target.env is not None and target.env.progress,
                                       prefix=prefix, context=positions(net) if prefix else None)
    return cache[key]


class LogitAttack(MembershipAttack):
    """A score computed from shared token statistics. `needs` lists the (model, variant) passes the
    score reads; `from_stats` is the formula, a pure function of those statistics.

    Subclasses implement `from_stats` (and set `needs` when they read more than the target's pass
    over the original text).
    """

    needs: tuple[tuple[str, str], ...] = ((TARGET, ORIGINAL),)
    reference: str = BASE

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """`from_stats` over the cached statistics `needs` lists (see `MembershipAttack.score`)."""
        stats = {need: shared_stats(target, records, model=need[0], variant=need[1], reference=self.reference)
                 for need in self.needs}
        return np.asarray(self.from_stats(stats), dtype=np.float64)

    @abstractmethod
    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        """The membership score of each record, from its token statistics.

        Args:
            stats: `{(model, variant): TokenStats}` for every pair in `needs`, over the same N records
                in the same order; `TokenStats` arrays are (N, T), log-probs in nats.

        Returns:
            Shape (N,), higher = more likely a member (cast to float64 by `score`).
        """
