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
and it is cached per (prefix, records) beside the plain one. The prefix (ReCaLL's shots, several hundred
tokens, most of a prefixed sequence) is the same in every sequence, so it runs once per pass, alone, and
keeps its key/value cache (`prefix_cache`); each batch then runs only its records, right-padded, behind a
fresh copy of that cache widened to the batch (attention mask [prefix ones; record mask], positions
continuing after the prefix): the statistics the whole prefixed sequences give, up to float summation
order (at most 1.4e-5 relative on the embedded model behind 8 shots; tests/test_recall_dcpdd.py checks
it), for a fraction of the compute (each record's tokens still attend to the prefix's keys, but the
prefix's own positions run once per pass, not once per record: 4x faster behind 8 shots on the CPU).
Where that would not be exact the prefixed sequences run whole, as before: a prefix the model's positions
cut for some record (the cut depends on the record), an active soft prompt or prefix, an attention window
shorter than prefix and record, or a model without transformers' dynamic key/value cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
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


@dataclass(frozen=True)
class PrefixCache:
    """The key/value cache of a token prefix (one row), and how to hand a batch of records behind it to the model."""

    name: str  # the forward keyword that takes a cache: "cache" (transformers 5.24) or "past_key_values"
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values) [1, heads, P, head dim]
    config: object  # the model's config: which layers slide (`DynamicCache(config=...)`)
    length: int  # P

    def behind(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """(`batch` with the prefix's positions in its attention mask and position ids after them, the keyword
        argument of a fresh cache holding the prefix once per row): forward appends to a cache, so each batch
        gets its own."""
        from transformers import DynamicCache

        rows, width = batch["input_ids"].shape
        mask = batch["attention_mask"]
        batch = {**batch, "attention_mask": torch.cat([mask.new_ones((rows, self.length)), mask], dim=1),
                 "position_ids": (self.length + torch.arange(width, device=mask.device)).expand(rows, width)}
        cache = DynamicCache([(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in self.layers],
                             config=self.config)
        return batch, {self.name: cache}


def _windows(config) -> list[int]:
    """The attention windows of `config`'s text model (sliding windows, attention chunks), none if it has none."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [w for key in ("sliding_window", "attention_chunk_size")
            if isinstance(w := getattr(text, key, None), int) and not isinstance(w, bool)]


def prefix_cache(model, prefix: Sequence[int], examples: Sequence[Example], *, context: int | None) -> PrefixCache | None:
    """The prefix's key/value cache, from one forward pass of `model` over it, where scoring `examples` behind
    that cache gives what the prefixed pass over the whole sequences gives (up to float summation order);
    None where it may not, and the caller runs the prefixed sequences whole:

    - the prefix would be cut for some example (`prefixed` under `context`): the cut depends on the example;
    - an active soft prompt or prefix (peft prompt learning, even inside `disable_adapter()`): its virtual
      positions come before the prefix and peft builds its own cache;
    - an attention window (sliding window, attention chunks) shorter than the prefix and the longest example:
      the cache would drop or the mask would treat the prefix's first tokens otherwise;
    - a model whose forward takes no cache keyword, or whose cache is not transformers' DynamicCache of
      plain (or sliding) key/value layers (quantised, static, recurrent state, shared layers).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from fedleak.federated.methods import is_prompt_learning
    from fedleak.federated.model import cache_keyword, model_device, returned_cache

    longest = max((len(e.input_ids) for e in examples), default=0)
    if not prefix or not longest or (context is not None and len(prefix) + longest > context):
        return None
    if is_prompt_learning(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or any(w < len(prefix) + longest for w in _windows(config)):
        return None
    name = cache_keyword(base)
    if name is None:
        return None
    parameters = inspect.signature(base.forward).parameters
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=model_device(model))
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}  # the head's logits are not needed
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **keep)
    cache = returned_cache(out)
    if type(cache) is not DynamicCache or not all(
            type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.is_initialized
            and layer.keys.shape[-2] == len(prefix) for layer in cache.layers):
        return None
    return PrefixCache(name=name, layers=tuple((layer.keys, layer.values) for layer in cache.layers), config=config,
                       length=len(prefix))


@torch.no_grad()
def compute_stats(model, tokenizer, records: Sequence[Record], *, max_length: int, response_only: bool,
                  batch_size: int, progress: bool = False, prefix: Sequence[int] = (),
                  context: int | None = None, _reuse_prefix: bool = True) -> TokenStats:
    """One forward pass per batch of `records`, the records batched by length (longest first, so
    batches carry little padding and the largest comes first; the output keeps the input order).

    The language-model head runs only at scored positions (`federated.batching.scored_logits`), and the softmax over the
    vocabulary in chunks of TOKEN_CHUNK positions, so a 128k-token vocabulary does not multiply the
    logits' memory.

    `prefix`: token ids put in front of every example, unscored (`prefixed`); `context` caps the prefixed
    sequence's length by shortening the prefix (None: no cap). The prefix runs once per call (`prefix_cache`)
    and each batch runs its examples only, behind a copy of the prefix's key/value cache, where that gives the
    same statistics; else (`prefix_cache`'s cases, or `_reuse_prefix=False`) each batch runs the prefixed
    sequences whole."""
    examples = encode(records, tokenizer, max_length=max_length, response_only=response_only)
    model.eval()
    reuse = prefix_cache(model, prefix, examples, context=context) if prefix and _reuse_prefix else None
    if prefix and reuse is None:
        examples = prefixed(examples, prefix, context=context)
    n = len(examples)
    counts = np.array([sum(label != IGNORE for label in e.labels[1:]) for e in examples], dtype=np.int64)
    width = int(counts.max(initial=0))
    out = [np.zeros((n, width)) for _ in range(3)]  # logp, mu, sigma
    token_ids = np.zeros((n, width), dtype=np.int64)
    order = sorted(range(n), key=lambda i: -len(examples[i].input_ids))
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        batch, past = to_device(collate([examples[i] for i in rows], tokenizer.pad_token_id), model), None
        if reuse is not None:
            batch, past = reuse.behind(batch)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        scored, wanted = scored_logits(model, batch, mask, past), targets[mask]  # [M, V], [M]
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
