"""Exposure of inserted canaries (Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing
Unintended Neural Network Memorization in Neural Networks").

A canary is the record (canary.prompt -> canary.text_with(secret)); every same-format candidate c
(all strings of len(secret) digits, the space C) is scored by the summed NLL of its response tokens
in the training template, loss(c). With rank(secret) = 1 + |{c in C, c != secret : loss(c) < loss(secret)}|,

    exposure = log2 |C| - log2 rank(secret)        (between 0 and log2 |C|).

When |C| <= enumerate_limit every candidate is scored (method "exact"). Otherwise (10^6 candidates
for the default six digits) N candidates other than the secret are sampled uniformly, a skew-normal
is fitted to their losses (the paper's extrapolation) and rank = 1 + (|C| - 1) * CDF_fit(loss(secret));
the plain sampled estimate 1 + (|C| - 1) * (fraction of samples below loss(secret)) is reported
beside it as `exposure_sampled` (coarse: it resolves ranks only in steps of |C| / N, and reads
log2 |C| whenever no sampled candidate scores below the secret). Reference canaries (same format,
never inserted) are ranked the same way as a control: their exposure is what chance gives
(about 1 / ln 2 = 1.44 bits on average).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Annotated, Sequence

import numpy as np
import torch

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import run_seed
from fedleak.federated.data import CANARY_CATEGORY, Canary, Record
from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveInt, Range
from fedleak.federated.seeding import numpy_rng
from fedleak.federated.model import model_device, to_device
from fedleak.federated.methods import is_prompt_learning, prompt_positions, virtual_tokens
from fedleak.federated.training import IGNORE, Example, collate, encode


def _canary_examples(tokenizer, canary: Canary, candidates: Sequence[str], max_length: int) -> list[Example]:
    records = [Record(instruction=canary.prompt, input="", output=canary.text_with(c), category=CANARY_CATEGORY,
                      record_id="candidate") for c in candidates]
    return encode(records, tokenizer, max_length=max_length, response_only=True)


def _common_prefix(examples: Sequence[Example]) -> int:
    """Length of the token prefix all examples share, leaving each at least one token of its own."""
    first = examples[0].input_ids
    n = min(len(e.input_ids) for e in examples) - 1
    for e in examples[1:]:
        while n > 0 and e.input_ids[:n] != first[:n]:
            n -= 1
    return max(n, 1)


@torch.no_grad()
def candidate_losses(model, tokenizer, canary: Canary, candidates: Sequence[str], *, max_length: int,
                     batch_size: int) -> np.ndarray:
    """Summed NLL of each candidate's canary response given the canary's prompt, as training scored it.

    Candidates differ only from the secret's first token on, so the shared prefix (prompt and the
    response up to the secret) runs through the model once; each batch feeds only the remaining few
    tokens on top of its key/value cache (about 7x less work than whole sequences). Under a soft prompt
    the prefix is [soft prompt; prefix tokens] through the base model (peft would insert the soft prompt
    again on every call), so the cache holds the virtual positions as training's forward does. Under a
    prefix (prefix tuning) peft's forward builds the cache with the prefix in it; the tails then go to the
    base model too (peft would put the bare prefix in place of that cache)."""
    model.eval()
    digits = len(canary.secret)
    probes = [canary.secret] + [str(d) * digits for d in range(10)]
    probe_examples = _canary_examples(tokenizer, canary, probes, max_length)
    shared = _common_prefix(probe_examples)
    prefixes: dict[int, tuple] = {}
    out = []
    for start in range(0, len(candidates), batch_size):
        examples = _canary_examples(tokenizer, canary, candidates[start:start + batch_size], max_length)
        n = min(shared, _common_prefix(examples + probe_examples[:1]))  # a tokenizer may merge digits
        if n not in prefixes:
            prefixes[n] = _run_prefix(model, examples[0], n)
        cache, last_logits, prefix_nll = prefixes[n]
        out.append(prefix_nll + _suffix_nll(model, tokenizer, examples, n, cache, last_logits))
    return np.concatenate(out) if out else np.zeros(0)


def _run_prefix(model, example: Example, n: int) -> tuple:
    """(key/value cache, logits predicting token n, summed NLL of the prefix's scored tokens)."""
    device = model_device(model)
    ids = torch.tensor([example.input_ids[:n]], device=device)
    virtual = virtual_tokens(model)
    if virtual:
        base = model.get_base_model()
        embeds = base.get_input_embeddings()(ids)
        embeds = torch.cat([model.get_prompt(batch_size=1).to(embeds.dtype), embeds], dim=1)
        result = base(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                      device=device), use_cache=True)
    else:
        result = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    logits = result.logits[0, virtual:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    labels = torch.tensor(example.labels[1:n], device=device)
    picked = logp[:-1].gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -float((picked * (labels != IGNORE)).sum())
    return result.past_key_values, logits[-1].float(), nll


def _suffix_nll(model, tokenizer, examples: Sequence[Example], n: int, cache, last_logits) -> np.ndarray:
    tails = [Example(e.input_ids[n:], e.labels[n:]) for e in examples]
    batch = to_device(collate(tails, tokenizer.pad_token_id), model)  # right-padded: causal attention never sees the pads
    rows = len(tails)
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(rows)
    mask = torch.cat([torch.ones(rows, prompt_positions(model) + n, dtype=torch.long,
                                 device=batch["attention_mask"].device), batch["attention_mask"]], dim=1)
    # The soft prompt or prefix is in the cache already (peft would put a prefix's in place of the cache).
    scorer = model.get_base_model() if is_prompt_learning(model) else model
    logits = scorer(input_ids=batch["input_ids"], attention_mask=mask, past_key_values=past, use_cache=True).logits
    # Token j of the tail is predicted by the tail's position j - 1, the first one by the prefix's last.
    logits = torch.cat([last_logits.expand(rows, 1, -1), logits[:, :-1].float()], dim=1)
    logp = torch.log_softmax(logits, dim=-1)
    labels = batch["labels"]
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * (labels != IGNORE)).sum(1).double().cpu().numpy()


def exposure_from_rank(rank: float, size: int) -> float:
    return math.log2(size) - math.log2(rank)


def skewnorm_rank(losses: np.ndarray, loss: float, size: int) -> float | None:
    """1 + (size - 1) * CDF(loss) under a skew-normal fitted to `losses`; None if the fit fails."""
    from scipy.stats import skewnorm

    if np.ptp(losses) <= 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimiser's overflow warnings on far tails
        try:
            a, loc, scale = skewnorm.fit(losses)
            cdf = float(skewnorm.cdf(loss, a, loc, scale))
        except (ValueError, RuntimeError, FloatingPointError):
            return None
    return 1.0 + (size - 1) * cdf if np.isfinite(cdf) else None


@register_attack("exposure")
class ExposureAttack(ExtractionAttack):
    """exposure: log2|candidates| - log2 rank of each canary's secret by the model's loss (Carlini et al. 2019)."""

    def __init__(self, *, enumerate_limit: PositiveInt = 10_000,
                 samples: Annotated[int, Range(ge=10)] = 1000,  # a skew-normal fit needs a sample
                 batch_size: PositiveInt = 256):
        """Set when the rank is exact and how it is extrapolated otherwise.

        Args:
            enumerate_limit: a canary with at most this many candidate secrets (10 ** digits) has every candidate
                scored (exact rank); above it, the rank is extrapolated from a sample.
            samples: candidates other than the secret sampled for the skew-normal fit (the paper's extrapolation)
                when there are more than enumerate_limit.
            batch_size: candidates scored per forward pass.
        """
        self.enumerate_limit = enumerate_limit
        self.samples = samples
        self.batch_size = batch_size

    def _losses(self, target: Target, canary: Canary, candidates: Sequence[str]) -> np.ndarray:
        return candidate_losses(target.model, target.tokenizer, canary, candidates, max_length=target.max_length,
                                batch_size=self.batch_size)

    def rank_canary(self, target: Target, canary: Canary) -> dict:
        digits = len(canary.secret)
        if not canary.secret.isdigit():
            raise FedleakError(f"attack {self.name}: canary of {canary.patient_name!r} has secret "
                               f"{canary.secret!r}: exposure needs a secret of digits only")
        size, secret = 10 ** digits, int(canary.secret)
        row = {"patient_name": canary.patient_name, "repetitions": canary.repetitions, "candidates": size}
        if size <= self.enumerate_limit:
            losses = self._losses(target, canary, [f"{i:0{digits}d}" for i in range(size)])
            rank = 1.0 + float((losses < losses[secret]).sum())  # the secret is never below itself
            exposure = exposure_from_rank(rank, size)
            return {**row, "rank": rank, "exposure": exposure, "exposure_sampled": exposure, "method": "exact"}
        # Uniform sample of the other candidates; seeded per canary, not per view, so every view of a
        # run ranks a canary against the same candidates.
        rng = numpy_rng(run_seed(target, self.name), "attack", self.name, canary.patient_name, canary.secret)
        n = min(self.samples, size - 1)
        drawn = rng.choice(size - 1, size=n, replace=False)
        drawn = drawn + (drawn >= secret)  # skip the secret itself
        losses = self._losses(target, canary, [f"{int(i):0{digits}d}" for i in drawn])
        loss = float(self._losses(target, canary, [canary.secret])[0])
        sampled_rank = 1.0 + (size - 1) * float((losses < loss).mean())
        fitted_rank = skewnorm_rank(losses, loss, size)
        if fitted_rank is None:
            rank, method = sampled_rank, f"empirical over {n} sampled candidates (the skew-normal fit failed)"
        else:
            rank, method = fitted_rank, f"skew-normal fit to {n} sampled candidates"
        return {**row, "rank": rank, "exposure": exposure_from_rank(rank, size),
                "exposure_sampled": exposure_from_rank(sampled_rank, size), "method": method}

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        inserted = [c for c in secrets.canaries if c.repetitions > 0]
        nan = float("nan")
        if not inserted:
            return ExtractionResult({"exposure_mean": nan, "exposure_max": nan, "exposure_sampled_mean": nan,
                                     "exposure_reference_mean": nan},
                                    {"note": "no canary was inserted into this view's data: exposure is undefined"})
        rows = [self.rank_canary(target, c) for c in inserted]
        references = [self.rank_canary(target, c) for c in secrets.reference_canaries]
        exposures = np.array([r["exposure"] for r in rows])
        metrics = {
            "exposure_mean": float(exposures.mean()),
            "exposure_max": float(exposures.max()),
            "exposure_sampled_mean": float(np.mean([r["exposure_sampled"] for r in rows])),
            "exposure_reference_mean": float(np.mean([r["exposure"] for r in references])) if references else nan,
        }
        for reps in sorted({r["repetitions"] for r in rows}):
            metrics[f"exposure_rep{reps}"] = float(np.mean([r["exposure"] for r in rows if r["repetitions"] == reps]))
        details = {"canaries": rows, "reference_canaries": references,
                   "max_exposure": [math.log2(s) for s in sorted({r["candidates"] for r in rows})]}
        if not references:
            details["note"] = "no reference canaries: exposure_reference_mean is undefined"
        return ExtractionResult(metrics, details)
