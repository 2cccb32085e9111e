"""Generate-then-rank extraction (Carlini et al. 2021, "Extracting Training Data from Large Language
Models"): sample many generations, then rank them by how much more likely the target finds them than
it should, and check the top of each ranking for training data.

For a generation x of n tokens (continuation of the prompt), log-perplexity L(x) = -(1/n) sum_t log p(x_t | x_<t).
Three rankings, lowest first (low = suspicious):
    perplexity:  L_target(x)
    zlib:        L_target(x) / zlib_bytes(x)
    reference:   L_target(x) / L_reference(x)   (reference = the base model: the adapters switched off)
A generation is a hit if it contains a private identifier of at least `min_identifier_length`
characters that is not in the prompt, or a run of `ngram` words of a private text (each private
record's response and whole training text, each inserted canary's text) that no held-out record
(`secrets.nonmembers`) contains: on templated data generic text shares long runs with every record,
so only runs specific to the training data count (Carlini et al. count verbatim training text).
precision@k = hits among the k lowest-ranked distinct generations / k; hit_rate = hits among all samples.

Sampling is top-k (k = top_k) at temperature T, as in the paper, under a seeded fork of torch's RNG.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import EXAMPLES, canary_records, run_seed, view_key
from fedleak.attacks.membership.stats import BASE, reference_model
from fedleak.attacks.membership.zlib import zlib_bytes
from fedleak.common.params import NonNegativeInt, PositiveFloat, PositiveInt
from fedleak.federated.generation import generate
from fedleak.federated.prompts import bos_prefix, format_prompt, instruction_header, instruction_header_ids, pad_id
from fedleak.federated.rouge import tokens
from fedleak.federated.seeding import derive_seed
from fedleak.federated.training import IGNORE, Example, collate, token_logprobs

UNCONDITIONED, TEMPLATE = "", "template"
RANKINGS = ("perplexity", "zlib", "reference")


def start_text(prompt: str, tokenizer=None) -> str:
    """The text a generation continues: "" (nothing), the training format's instruction header
    ("### Instruction:\n", or the chat template's opening of a user turn: the model writes the rest), or `prompt`."""
    if prompt == TEMPLATE:
        return instruction_header(tokenizer) if tokenizer is not None else format_prompt("\x00").split("\x00")[0]
    return prompt


def start_ids(tokenizer, prompt: str) -> list[int]:
    if prompt == TEMPLATE:
        return instruction_header_ids(tokenizer)  # as training tokenised prompts (BOS included where it adds one)
    if prompt:
        return bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # Unconditioned: the token a document starts after. BOS where the tokenizer prepends one, else EOS
    # (the separator of packed pretraining documents, and the end of every fine-tuning example).
    return bos_prefix(tokenizer) or [tokenizer.eos_token_id]


def rankings(log_ppl: np.ndarray, reference_log_ppl: np.ndarray, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The three scores of each generation, lower = more suspicious."""
    log_ppl = np.asarray(log_ppl, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "perplexity": log_ppl,
            "zlib": log_ppl / np.array([max(zlib_bytes(t), 1) for t in texts], dtype=np.float64),
            "reference": log_ppl / np.asarray(reference_log_ppl, dtype=np.float64),
        }


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest scores (NaN last, ties in input order)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), np.nan_to_num(scores, nan=np.inf), np.isnan(scores)))
    return order[:k]


def precision_at(scores: np.ndarray, hits: np.ndarray, k: int) -> float:
    """Fraction of hits among the k lowest-scored items (k capped at their number)."""
    top = top_indices(scores, min(k, len(scores)))
    return float(np.asarray(hits, dtype=bool)[top].mean()) if len(top) else float("nan")


def word_runs(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Every run of n consecutive words, in text order."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def hit_flags(texts: Sequence[str], references: Sequence[tuple[str, str]], identifiers: Sequence[str], *,
              prompt: str, ngram: int, min_identifier_length: int,
              controls: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """For each generation: {"hit": bool, "why": ...}. `references` are (source id, private text) pairs,
    `controls` texts of the same distribution that no model trained on. A generation contains a private
    record when it shares a run of `ngram` words with a private text that no control contains: runs the
    domain's templates produce for anyone (which a model learns from public data) never count."""
    control_grams: set[tuple[str, ...]] = set()
    for _, text in controls:
        control_grams.update(word_runs(tokens(text), ngram))
    private: dict[tuple[str, ...], str] = {}
    for source, text in references:
        for gram in word_runs(tokens(text), ngram):
            if gram not in control_grams:
                private.setdefault(gram, source)
    ids = [i for i in identifiers if len(i) >= min_identifier_length and i not in prompt]
    out = []
    for text in texts:
        found = next((i for i in ids if i in text), None)
        if found is not None:
            out.append({"hit": True, "why": f"identifier {found}"})
            continue
        # In text order, so the run reported is the first one (a set's order varies between processes).
        shared = next((g for g in word_runs(tokens(text), ngram) if g in private), None)
        out.append({"hit": shared is not None,
                    "why": f"{ngram} words of {private[shared]}: {' '.join(shared)}" if shared else ""})
    return out


def private_texts(secrets: Secrets) -> list[tuple[str, str]]:
    return record_texts(list(secrets.records) + canary_records(secrets))


def record_texts(records) -> list[tuple[str, str]]:
    """(record id, text) for each record's response and its whole training text."""
    out = []
    for record in records:
        out.append((record.record_id, record.output))
        out.append((record.record_id, format_prompt(record.instruction, record.input) + record.output))
    return out


def sample_generations(model, tokenizer, prompt_ids: list[int], *, samples: int, max_new_tokens: int, top_k: int,
                       temperature: float, batch_size: int, seed: int) -> list[list[int]]:
    """`samples` top-k samples (token ids, cut before EOS), reproducible from `seed`."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        out = generate(model, tokenizer, [prompt_ids] * samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       do_sample=True, temperature=temperature, top_k=top_k)
    return [list(g.ids) for g in out]


@torch.no_grad()
def log_perplexities(model, tokenizer, prompt_ids: list[int], generations: Sequence[list[int]], *,
                     batch_size: int) -> np.ndarray:
    """Mean NLL of each generation's tokens given the prompt (NaN for an empty generation)."""
    examples = [Example(tuple(prompt_ids) + tuple(g), (IGNORE,) * len(prompt_ids) + tuple(g)) for g in generations]
    out = []
    for start in range(0, len(examples), batch_size):
        picked, mask, _ = token_logprobs(model, collate(examples[start:start + batch_size], pad_id(tokenizer)))
        n = mask.sum(1)
        out.append(torch.where(n > 0, -picked.sum(1) / n.clamp(min=1), torch.nan).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@register_attack("generate_rank")
class GenerateRankAttack(ExtractionAttack):
    """generate_rank: sample, rank by perplexity, zlib and reference ratio, count private hits (Carlini et al. 2021)."""

    def __init__(self, *, samples: PositiveInt = 64, prompt: str = UNCONDITIONED,
                 top_k: NonNegativeInt = 40,  # 0 = no top-k cut
                 temperature: PositiveFloat = 1.0, max_new_tokens: PositiveInt = 64, ngram: PositiveInt = 8,
                 precision_at: PositiveInt = 10, min_identifier_length: PositiveInt = 4, batch_size: PositiveInt = 16):
        """Set the sampling, the hit test and the ranking cut-off.

        Args:
            samples: generations sampled from the view.
            prompt: what generations continue: "" = nothing (unconditioned, after BOS or EOS), "template" = the
                training template's instruction header, any other text = that text.
            top_k: top-k sampling cut (the paper samples top-40); 0 = no cut.
            temperature: sampling temperature.
            max_new_tokens: token budget of each generation.
            ngram: a generation is a hit when it shares a run of this many words with a private text that no
                held-out record contains.
            precision_at: k of precision@k: hits among the k lowest-ranked distinct generations.
            min_identifier_length: a private identifier counts as a hit only if it has at least this many
                characters (short strings occur by chance).
            batch_size: generations sampled per batch.
        """
        self.samples = samples
        self.prompt = prompt
        self.top_k = top_k
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.ngram = ngram
        self.precision_at = precision_at
        self.min_identifier_length = min_identifier_length
        self.batch_size = batch_size

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        tokenizer = target.tokenizer
        prompt_ids = start_ids(tokenizer, self.prompt)
        seed = derive_seed(run_seed(target, self.name), "attack", self.name, view_key(target))
        generations = sample_generations(target.model, tokenizer, prompt_ids, samples=self.samples,
                                         max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                                         temperature=self.temperature, batch_size=self.batch_size, seed=seed)
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generations]
        log_ppl = log_perplexities(target.model, tokenizer, prompt_ids, generations, batch_size=target.batch_size)
        reference_net, _, context = reference_model(target, BASE)  # the base: same tokenizer as the target
        with context:
            ref_log_ppl = log_perplexities(reference_net, tokenizer, prompt_ids, generations,
                                           batch_size=target.batch_size)
        start = start_text(self.prompt, tokenizer)
        flags = hit_flags(texts, private_texts(secrets), secrets.identifiers, prompt=start,
                          ngram=self.ngram, min_identifier_length=self.min_identifier_length,
                          controls=record_texts(secrets.nonmembers))
        hits = np.array([f["hit"] for f in flags], dtype=bool)
        # Rank distinct generations: a memorised text sampled many times would otherwise fill the top k alone.
        first = list({t.strip(): i for i, t in reversed(list(enumerate(texts)))}.values())
        distinct = np.array(sorted(first))
        scores = rankings(log_ppl[distinct], ref_log_ppl[distinct], [texts[i] for i in distinct])
        metrics = {f"precision@k_{name}": precision_at(scores[name], hits[distinct], self.precision_at)
                   for name in RANKINGS}
        metrics["hit_rate"] = float(hits.mean())
        top = {name: [{"text": texts[distinct[j]], "score": float(scores[name][j]), "hit": bool(hits[distinct[j]]),
                       "why": flags[distinct[j]]["why"]}
                      for j in top_indices(scores[name], min(EXAMPLES, len(distinct)))]
               for name in RANKINGS}
        details = {"samples": len(texts), "distinct": len(distinct), "hits": int(hits.sum()),
                   "k": min(self.precision_at, len(distinct)), "start": start, "top": top}
        if not secrets.records and not secrets.canaries:
            details["note"] = "the view trained on no private records: every generation is a miss"
        return ExtractionResult(metrics, details)
