"""Discoverable memorisation (Carlini et al. 2022, "Quantifying Memorization Across Neural Language
Models"): prompt the model with what preceded a training example and check whether greedy decoding
reproduces the rest.

(a) Instruction prompts: for each private record x = (instruction, input, response), decode
    g = greedy(prompt(instruction, input)) and count exact = [g.strip() == response.strip()]
    and approximate = [ROUGE-L(g, response) >= tau]; rates over the records, and separately over
    the inserted canaries (canary_exact_rate).
(b) Prefix/suffix (the paper's protocol): with t = the training token sequence (prompt + response +
    end of answer, as `encode` builds it) and |t| >= p + s, x is extractable iff greedy(t[:p]) == t[p:p+s]
    token for token. Rates are over the eligible sequences (|t| >= p + s).
(c) Control: (a) on as many records of the same distribution that the view did not train on
    (`secrets.nonmembers`): on templated data part of a response is predictable from the template
    alone, so rouge_rate means memorisation only above control_rouge_rate.

The private records are the view's records plus one record per inserted canary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import EXAMPLES, canary_records, greedy_texts, run_seed, sample, view_key
from fedleak.common.params import PositiveInt, UnitInterval
from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.rouge import rouge_l
from fedleak.federated.seeding import numpy_rng
from fedleak.federated.training import encode

def private_records(secrets: Secrets, limit: int | None, rng: np.random.Generator) -> list[Record]:
    """A seeded sample of the view's records, then every inserted canary once."""
    return sample(secrets.records, limit, rng) + canary_records(secrets)


def greedy_suffixes(model, tokenizer, prefixes: Sequence[Sequence[int]], *, length: int,
                    batch_size: int) -> list[list[int]]:
    """Greedy continuations (token ids, at most `length`) of the prefixes, the stop token kept: a training
    sequence's suffix may end with it (EOS, or a chat template's end-of-turn)."""
    out = generate(model, tokenizer, prefixes, max_new_tokens=length, batch_size=batch_size)
    return [list(g.ids) + ([g.stop_id] if g.finished else []) for g in out]


@register_attack("discoverable")
class DiscoverableAttack(ExtractionAttack):
    """discoverable: greedy decoding from training prompts / prefixes reproduces the record (Carlini et al. 2022)."""

    def __init__(self, *, max_records: PositiveInt | None = None, max_new_tokens: PositiveInt = 64,
                 rouge_threshold: UnitInterval = 0.7, prefix_tokens: PositiveInt = 32, suffix_tokens: PositiveInt = 16,
                 batch_size: PositiveInt = 16):
        """Set how many records are prompted and how matches are counted.

        Args:
            max_records: at most this many of the view's records are prompted (a seeded sample; every inserted
                canary is added); unset: all of them.
            max_new_tokens: token budget of each greedy answer to a record's instruction prompt.
            rouge_threshold: an answer counts as an approximate match when its ROUGE-L with the record's response
                is >= this (rouge_rate).
            prefix_tokens: tokens of a training sequence fed as the prompt of the prefix/suffix test (the paper's
                context length k).
            suffix_tokens: the next tokens greedy decoding must reproduce exactly; sequences shorter than
                prefix_tokens + suffix_tokens are not eligible.
            batch_size: prompts per generation batch.
        """
        self.max_records = max_records
        self.max_new_tokens = max_new_tokens
        self.rouge_threshold = rouge_threshold
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.batch_size = batch_size

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        rng = numpy_rng(run_seed(target, self.name), "attack", self.name, view_key(target))
        records = private_records(secrets, self.max_records, rng)
        if not records:
            nan = float("nan")
            return ExtractionResult({k: nan for k in ("exact_rate", "rouge_rate", "mean_rouge", "canary_exact_rate",
                                                      "prefix_suffix_rate", "prefix_suffix_eligible",
                                                      "control_exact_rate", "control_rouge_rate")},
                                    {"note": "the view trained on no private records"})
        metrics, details = self._prompted(target, records)
        suffix_metrics, suffix_details = self._prefix_suffix(target, records)
        metrics.update(suffix_metrics)
        metrics.update(self._control(target, secrets, n=len(records) - details["canary_records"]))
        return ExtractionResult(metrics, {**details, **suffix_details})

    def _control(self, target: Target, secrets: Secrets, *, n: int) -> dict:
        """The same measurement on as many records the view did not train on: what the domain's templates
        alone reproduce (a matching private response only counts as memorised above this rate)."""
        rng = numpy_rng(run_seed(target, self.name), "attack", self.name, "control", view_key(target))
        records = sample(secrets.nonmembers, n, rng)
        if not records:
            return {"control_exact_rate": float("nan"), "control_rouge_rate": float("nan")}
        _, exact, rouge = self._answers(target, records)
        return {"control_exact_rate": float(exact.mean()),
                "control_rouge_rate": float((rouge >= self.rouge_threshold).mean())}

    def _answers(self, target: Target, records: list[Record]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Greedy answers to the records' training prompts, exact matches and ROUGE-L with the responses."""
        texts = greedy_texts(target, records,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        exact = np.array([t.strip() == r.output.strip() for t, r in zip(texts, records)])
        rouge = np.array([rouge_l(t, r.output) for t, r in zip(texts, records)])
        return texts, exact, rouge

    def _prompted(self, target: Target, records: list[Record]) -> tuple[dict, dict]:
        texts, exact, rouge = self._answers(target, records)
        is_canary = np.array([r.category == "canary" for r in records])
        close = rouge >= self.rouge_threshold
        order = np.argsort(-(exact * 2 + rouge), kind="stable")  # exact matches first, then by ROUGE-L
        examples = [{"record_id": records[i].record_id, "exact": bool(exact[i]), "rouge": float(rouge[i]),
                     "generated": texts[i]} for i in order[:EXAMPLES] if close[i]]
        # The record rates leave the canaries out (repeated up to dozens of times, they would dominate):
        # they have their own rate.
        private = ~is_canary
        rate = lambda values, rows: float(values[rows].mean()) if rows.any() else float("nan")
        metrics = {
            "exact_rate": rate(exact, private),
            "rouge_rate": rate(close, private),
            "mean_rouge": rate(rouge, private),
            "canary_exact_rate": rate(exact, is_canary),
        }
        details = {"records": len(records), "canary_records": int(is_canary.sum()), "exact": int(exact.sum()),
                   "rouge_matches": int(close.sum()), "canary_exact": int(exact[is_canary].sum()),
                   "examples": examples}
        if not is_canary.any():
            details["canary_note"] = "no inserted canary in this view: canary_exact_rate is undefined"
        return metrics, details

    def _prefix_suffix(self, target: Target, records: list[Record]) -> tuple[dict, dict]:
        p, s = self.prefix_tokens, self.suffix_tokens
        examples = encode(records, target.tokenizer, max_length=target.max_length, response_only=target.response_only)
        eligible = [(r, e.input_ids) for r, e in zip(records, examples) if len(e.input_ids) >= p + s]
        details: dict = {"prefix_suffix_eligible": len(eligible)}
        if not eligible:
            details["prefix_suffix_note"] = (f"no training sequence has prefix_tokens + suffix_tokens = {p + s} "
                                             f"tokens: prefix_suffix_rate is undefined")
            return {"prefix_suffix_rate": float("nan"), "prefix_suffix_eligible": 0.0}, details
        generated = greedy_suffixes(target.model, target.tokenizer, [ids[:p] for _, ids in eligible], length=s,
                                    batch_size=self.batch_size)
        hits = [list(ids[p:p + s]) == g for (_, ids), g in zip(eligible, generated)]
        details["prefix_suffix_extracted"] = int(sum(hits))
        details["prefix_suffix_examples"] = [
            {"record_id": r.record_id, "suffix": target.tokenizer.decode(g, skip_special_tokens=True)}
            for (r, _), g, hit in zip(eligible, generated, hits) if hit][:EXAMPLES]
        return {"prefix_suffix_rate": float(np.mean(hits)), "prefix_suffix_eligible": float(len(eligible))}, details
