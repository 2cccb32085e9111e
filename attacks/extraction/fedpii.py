"""FedPII: cross-client PII extraction by a participating client (Hu, Zhang, Zhang, Wang, Wang, Qu and Xu
2025, "Simple Yet Effective: Extracting Private Data Across Clients in Federated Fine-Tuning of Large
Language Models", arXiv:2506.06060, IJCNLP-AACL Findings 2025).

A semi-honest client a holds its own training records D_a and, every round, the global model. It prompts
the global model with the contexts that precede private identifiers in D_a (contexts the clients share,
unlike the identifiers) and reads the other clients' identifiers out of the continuations:

    prefixes:  for each identifier occurrence in a record of D_a that the training loss looked at (the
               response, under response-only training: what the model learnt to write), the training text
               (prompt + response, in the training format) before it, back to the end of the record's
               previous identifier or the sequence start (so it holds none of a's identifiers), cut to its
               last `context_words` words. Deduplicated into templates t with their frequency f(t) in D_a.
    queries:   k = min(#templates, max_queries // samples_per_prefix) templates drawn without replacement
               with P(t) proportional to f(t) (the paper's frequency-based prefix sampling: frequent contexts
               are the shared ones), each answered samples_per_prefix times (the first greedily, the rest
               sampled at `temperature`).
    targets:   T = identifiers written in the other contributing clients' records and inserted canaries,
               minus any that also occur in D_a or a's canaries (the attacker knows those).
    coverage = |{i in T : i in some output whose prefix lacks i}| / |T|, overall and per identifier type,
               with Clopper-Pearson intervals;   efficiency = |recovered| / queries (identifiers per query,
               not a proportion: one answer can write several).
Metrics: coverage[_type] (+ _low, _high), efficiency, queries, control_coverage[_type] (+ _low, _high),
base_coverage (+ _low, _high); types name, dob, mrn, phone, secret (attacks/extraction/pii.py).

Optionally (`finetune_epochs`) the attacker first fine-tunes the global adapter on D_a as it would locally
(the paper's local fine-tuning that amplifies memorisation); the view's adapter is restored afterwards.

Controls (memorisation vs guessing): the same outputs counted against identifiers no model of the run
trained on (held-out patients' and never-inserted reference canaries'), `control_coverage`, and the same
queries on the base model with the adapters off, `base_coverage`: both sit near 0 when coverage is
memorised. Guessing is not negligible for names (60 x 57 first/last combinations in the generator).

Threat model: the `global` view of any round (a participating client receives the global model every
round; round 0 is the untrained initial adapter). Uploads are the server's, and a client's own model is the
global one plus its own local training, which `finetune_epochs` plays from the global view: other observers
raise FedleakError. The attacker's own records come from `Secrets.clients`.

Cost per view: max_queries generations of at most max_new_tokens tokens (as many again on the base model
with `base_control`), no scoring pass; with `finetune_epochs` E, E epochs of forward + backward passes over
D_a.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy.stats import binomtest
import torch

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import EXAMPLES, run_seed
from fedleak.attacks.extraction.pii import TYPES, typed_identifiers
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveFloat, PositiveInt
from fedleak.federated.adapters import DEFAULT, activate, get_adapter_state, set_adapter_state
from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.prompts import bos_prefix, is_chat, prompt_text
from fedleak.federated.seeding import derive_seed, numpy_rng, torch_generator
from fedleak.federated.training import encode, train_adapter

NAME = "fedpii"
GLOBAL = "global"


@dataclass(frozen=True)
class Prefix:
    """The training text before one identifier occurrence: its prompt part and its response part (training
    tokenised them apart), and whether it starts at the sequence start (`anchored`) or after an identifier."""

    prompt: str
    response: str
    anchored: bool

    @property
    def text(self) -> str:
        return self.prompt + self.response


def _spans(text: str, identifiers: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of the identifiers in `text`, sorted, overlaps merged."""
    spans = sorted((m, m + len(i)) for i in set(identifiers) if i for m in _find_all(text, i))
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _find_all(text: str, sub: str) -> Iterator[int]:
    at = text.find(sub)
    while at >= 0:
        yield at
        at = text.find(sub, at + 1)


def record_prefixes(prompt: str, response: str, identifiers: Sequence[str], *, response_only: bool,
                    context_words: int = 0) -> list[Prefix]:
    """The prefixes of one record whose training text is `prompt` + `response` (the prompt in the training
    format): for each identifier occurrence the loss looked at (in the response when training was
    `response_only`: what the model learnt to write), the text before it back to the previous occurrence's end
    or the sequence start, and at most its last `context_words` words (0: all); trailing spaces dropped (the
    model writes the space with the identifier's first token)."""
    text, cut = prompt + response, len(prompt)
    out, begin = [], 0
    for start, end in _spans(text, identifiers):
        stop = len(text[:start].rstrip(" "))
        if (start >= cut or not response_only) and stop > begin and text[begin:stop].strip():
            first = begin
            if context_words:
                words = [m.start() for m in re.finditer(r"\S+", text[begin:stop])]
                first = begin + words[max(0, len(words) - context_words)]
            out.append(Prefix(text[first:min(stop, cut)], text[max(first, cut):stop], first == 0))
        begin = end
    return out


def prefix_counts(tokenizer, records: Sequence[Record], *, min_length: int, response_only: bool,
                  context_words: int = 0) -> Counter:
    """Every prefix of the records (identifiers of at least `min_length` characters), with its frequency."""
    counts: Counter = Counter()
    for r in records:
        ids = [i for _, i in typed_identifiers(r) if len(i) >= min_length]
        counts.update(record_prefixes(prompt_text(tokenizer, r.instruction, r.input), r.output, ids,
                                      response_only=response_only, context_words=context_words))
    return counts


def draw_prefixes(counts: Counter, k: int, rng: np.random.Generator) -> list[Prefix]:
    """k distinct prefixes drawn without replacement with probability proportional to their frequency (all of
    them when there are k or fewer), most frequent first (ties in first-seen order)."""
    items = list(counts)
    if len(items) > k:
        weights = np.array([counts[p] for p in items], dtype=float)
        keep = rng.choice(len(items), size=k, replace=False, p=weights / weights.sum())
        items = [items[int(i)] for i in sorted(keep)]
    return sorted(items, key=lambda p: -counts[p])


def prefix_ids(tokenizer, prefix: Prefix) -> list[int]:
    """Token ids of a prefix as training tokenised the sequence: BOS (when the tokenizer adds one; a chat
    template's text writes its own), then the prompt part and the response part apart."""
    text_ids = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []
    head = [] if prefix.anchored and is_chat(tokenizer) else bos_prefix(tokenizer)
    return head + text_ids(prefix.prompt) + text_ids(prefix.response)


def recovered(identifiers: Sequence[str], prompts: Sequence[str], outputs: Sequence[str]) -> set[str]:
    """The identifiers written in some output whose prompt does not already contain them."""
    return {i for i in identifiers if any(i in o and i not in p for p, o in zip(prompts, outputs))}


def rates(types: dict[str, str], found: set[str], prefix: str, *, confidence: float = 0.95) -> dict[str, float]:
    """`{prefix}` = share of the typed identifiers in `found`, overall and per type in TYPES (`{prefix}_{type}`),
    each with its Clopper-Pearson interval (`_low`, `_high`); NaN where a type has no identifier."""
    out: dict[str, float] = {}
    for kind in (None, *TYPES):
        pool = [i for i, t in types.items() if kind is None or t == kind]
        hits = sum(i in found for i in pool)
        name = prefix if kind is None else f"{prefix}_{kind}"
        if pool:
            ci = binomtest(hits, len(pool)).proportion_ci(confidence_level=confidence, method="exact")
            low, high = float(ci.low), float(ci.high)
        else:
            low = high = np.nan
        out.update({name: hits / len(pool) if pool else np.nan, f"{name}_low": low, f"{name}_high": high})
    return out


def _typed(records: Sequence[Record], *, min_length: int) -> dict[str, str]:
    """{identifier: type} of the identifiers the records' text holds (a patient's listed identifiers need not all
    be written in its record), at least `min_length` characters long."""
    out: dict[str, str] = {}
    for r in records:
        text = f"{r.instruction}\n{r.input}\n{r.output}"
        for kind, identifier in typed_identifiers(r):
            if len(identifier) >= min_length and identifier in text:
                out.setdefault(identifier, kind)
    return out


@contextlib.contextmanager
def finetuned(target: Target, records: Sequence[Record], *, epochs: int, seed: int) -> Iterator[None]:
    """The target's shared adapter fine-tuned on `records` for `epochs` (the run's train settings otherwise),
    as the attacker would locally; on exit the view's adapter and active adapters are restored."""
    env, model = target.env, target.model
    if env is None or env.train is None or not hasattr(model, "peft_config"):
        raise FedleakError(f"attack {NAME}: finetune_epochs needs a peft view and the run's train settings "
                           f"(AttackEnvironment.train): attack through `fedleak run` or set finetune_epochs = 0")
    saved, active = get_adapter_state(model, DEFAULT), list(model.active_adapters)
    try:
        activate(model, [DEFAULT], trainable=DEFAULT)
        examples = encode(records, target.tokenizer, max_length=env.max_length, response_only=env.response_only)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "train"))  # dropout
            train_adapter(model, examples, dataclasses.replace(env.train, epochs=epochs),
                          pad_id=target.tokenizer.pad_token_id, generator=torch_generator(seed, "batches"))
        yield
    finally:
        model.zero_grad(set_to_none=True)
        set_adapter_state(model, saved, DEFAULT)
        activate(model, active)
        model.eval()


@register_attack(NAME)
class FedPiiAttack(ExtractionAttack):
    """fedpii: a participating client completes its own identifiers' contexts on the global model to read the
    other clients' identifiers (Hu et al. 2025)."""

    observers = (GLOBAL,)
    observers_why = ("the attacker is a participating client, which receives the global model every round; uploads "
                     "are the server's view, and a client's own model is reproduced by finetune_epochs")

    def __init__(self, *, attacker: NonNegativeInt = 0, max_queries: PositiveInt = 256,
                 samples_per_prefix: PositiveInt = 8, temperature: PositiveFloat = 0.7, top_k: NonNegativeInt = 0,
                 max_new_tokens: PositiveInt = 48, batch_size: PositiveInt = 32, finetune_epochs: NonNegativeInt = 0,
                 context_words: NonNegativeInt = 4, base_control: bool = True,
                 min_identifier_length: PositiveInt = 4):
        """Set who attacks, how many queries it asks and how.

        Args:
            attacker: index of the attacking client; it must be a contributing client of the view.
            max_queries: generations in all: min(templates, max_queries // samples_per_prefix) prefixes are
                drawn by frequency, each answered samples_per_prefix times.
            samples_per_prefix: answers per prefix: the first greedy, the others sampled (1: greedy only).
            temperature: sampling temperature of the answers after the first.
            top_k: sample among the k most likely tokens only (0: the whole vocabulary).
            max_new_tokens: token budget of each answer.
            batch_size: prompts per generation batch.
            finetune_epochs: epochs of local fine-tuning of the global adapter on the attacker's own records before
                the queries (0: query the global model as received); the other train settings are the run's.
            context_words: a prefix keeps at most this many words before the identifier (0: back to the previous
                identifier or the sequence start). A long context points at the attacker's own record, whose
                identifier the model then writes; a short one is what the clients share (measured on a model
                trained to memorise: 4 words found another client's canary, the full context its phones).
            base_control: also ask the same queries of the base model (adapters off): `base_coverage`.
            min_identifier_length: identifiers shorter than this many characters are neither targets nor controls
                (short strings occur by chance).
        """
        if samples_per_prefix > max_queries:
            raise FedleakError(f"attack {NAME}: samples_per_prefix = {samples_per_prefix} exceeds max_queries = "
                               f"{max_queries}: raise max_queries or lower samples_per_prefix")
        self.attacker = attacker
        self.max_queries = max_queries
        self.samples_per_prefix = samples_per_prefix
        self.temperature = temperature
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.finetune_epochs = finetune_epochs
        self.context_words = context_words
        self.base_control = base_control
        self.min_identifier_length = min_identifier_length

    def _check(self, target: Target, secrets: Secrets) -> list[Record]:
        """The attacker's own records; a one-line error where the view or the attacker does not fit."""
        if target.observer != GLOBAL:
            raise FedleakError(f"attack {NAME}: observer {target.observer!r}: {self.observers_why}: use observers = "
                               f"[\"global\"]")
        if self.attacker not in secrets.clients:
            raise FedleakError(f"attack {NAME}: attacker = {self.attacker} is not a contributing client of this view "
                               f"(clients: {sorted(secrets.clients)}): set attacker to one of them")
        if self.base_control and not hasattr(target.model, "disable_adapter"):
            raise FedleakError(f"attack {NAME}: base_control needs a peft model whose adapters can be switched off: "
                               f"attack a peft-wrapped view or set base_control = false")
        return list(secrets.clients[self.attacker])

    def targets(self, secrets: Secrets, own: Sequence[Record]) -> tuple[dict[str, str], dict[str, str]]:
        """({target identifier: type}, {control identifier: type}): the other clients' identifiers (records and
        inserted canaries) less the attacker's own; held-out and reference-canary identifiers no model trained on."""
        m = self.min_identifier_length
        own_canaries = [c.record(0) for c in secrets.canaries if c.client == self.attacker]
        known = set(_typed(list(own) + own_canaries, min_length=m))
        others = [r for c, rs in sorted(secrets.clients.items()) if c != self.attacker for r in rs]
        others += [c.record(0) for c in secrets.canaries if c.client != self.attacker and c.repetitions > 0]
        targets = {i: t for i, t in _typed(others, min_length=m).items() if i not in known}
        trained = known | set(_typed(list(secrets.records) + [c.record(0) for c in secrets.canaries], min_length=m))
        unseen = list(secrets.nonmembers) + [c.record(0) for c in secrets.reference_canaries]
        control = {i: t for i, t in _typed(unseen, min_length=m).items() if i not in trained and i not in targets}
        return targets, control

    def answers(self, target: Target, prefixes: Sequence[Prefix], seed: int) -> list[str]:
        """samples_per_prefix answers per prefix, in prefix order: one greedy, the rest sampled (seeded)."""
        ids = [prefix_ids(target.tokenizer, p) for p in prefixes]
        options = dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        greedy = [g.text for g in generate(target.model, target.tokenizer, ids, **options)]
        extra = self.samples_per_prefix - 1
        sampled: list[str] = []
        if extra:
            with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
                torch.manual_seed(derive_seed(seed, "sampling"))
                sampled = [g.text for g in generate(target.model, target.tokenizer, [i for i in ids for _ in range(extra)],
                                                    do_sample=True, temperature=self.temperature, top_k=self.top_k,
                                                    **options)]
        return [text for k, g in enumerate(greedy) for text in [g, *sampled[k * extra:(k + 1) * extra]]]

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        seed = derive_seed(run_seed(target, self.name), "attack", NAME, self.attacker)
        own = self._check(target, secrets)
        targets, control = self.targets(secrets, own)
        counts = prefix_counts(target.tokenizer, own, min_length=self.min_identifier_length,
                               response_only=target.response_only, context_words=self.context_words)
        names = ["coverage", "control_coverage"]
        nan_metrics = {f"{n}{t}{e}": np.nan for n in names for t in ("", *(f"_{k}" for k in TYPES))
                       for e in ("", "_low", "_high")}
        nan_metrics.update({"base_coverage": np.nan, "base_coverage_low": np.nan, "base_coverage_high": np.nan,
                            "efficiency": np.nan, "queries": 0.0})
        if not targets or not counts:
            why = ("no other contributing client holds an identifier the attacker lacks" if not targets else
                   f"the attacker's records hold no identifier of at least {self.min_identifier_length} characters "
                   f"to take prefixes from")
            return ExtractionResult(nan_metrics, {"note": f"{why}: coverage is undefined"})
        prefixes = draw_prefixes(counts, max(1, self.max_queries // self.samples_per_prefix),
                                 numpy_rng(seed, "prefixes"))
        prompts = [p.text for p in prefixes for _ in range(self.samples_per_prefix)]
        start = time.perf_counter()
        with (finetuned(target, own, epochs=self.finetune_epochs, seed=derive_seed(seed, "finetune"))
              if self.finetune_epochs else contextlib.nullcontext()):
            tuning = time.perf_counter() - start
            outputs = self.answers(target, prefixes, seed)
        found = recovered(list(targets), prompts, outputs)
        metrics = rates(targets, found, "coverage")
        metrics["efficiency"] = len(found) / len(outputs)
        metrics["queries"] = float(len(outputs))
        metrics.update(rates(control, recovered(list(control), prompts, outputs), "control_coverage"))
        base_found: set[str] = set()
        if self.base_control:
            with target.model.disable_adapter():
                base_found = recovered(list(targets), prompts, self.answers(target, prefixes, seed))
            base = rates(targets, base_found, "base_coverage")
            metrics.update({k: base[k] for k in ("base_coverage", "base_coverage_low", "base_coverage_high")})
        else:
            metrics.update({k: np.nan for k in ("base_coverage", "base_coverage_low", "base_coverage_high")})
        examples = []
        for p, o in zip(prompts, outputs):
            hits = sorted(i for i in found if i in o and i not in p)
            if hits and len(examples) < EXAMPLES:
                examples.append({"prefix": p, "output": o, "recovered": [[targets[i], i] for i in hits]})
        details = {
            "attacker": self.attacker, "templates": len(counts), "prefixes": len(prefixes),
            "queries": len(outputs), "finetune_seconds": tuning if self.finetune_epochs else 0.0,
            "targets": dict(Counter(targets.values())), "recovered": dict(Counter(targets[i] for i in found)),
            "controls": dict(Counter(control.values())), "base_recovered": len(base_found),
            "top_prefixes": [{"prefix": p.text, "count": counts[p]} for p in prefixes[:EXAMPLES]],
            "examples": examples, "min_identifier_length": self.min_identifier_length,
        }
        return ExtractionResult(metrics, details)
