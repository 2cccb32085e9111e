"""Self-generated synthetic instructions by in-context learning (FEDPIT, Zhang et al. 2024, after
Self-Instruct, Wang et al. 2023).

A client shows the shared model k of its own records as demonstrations and lets it continue with
a new instruction; candidates are filtered (empty, truncated, malformed, out of length bounds,
ROUGE-L >= threshold to any existing or already-accepted instruction), and the model then answers
the accepted instructions greedily with a repetition penalty to curb repetitive low-quality text.

Our choices where the paper is silent, by prompt format (`federated/prompts.py`):
- alpaca: the demonstrations are whole records in the training template, separated by EOS (one BOS
  first when the tokenizer adds one), followed by an open `### Instruction:` header (a base model
  continues that without any meta-prompt); a candidate ends at its first newline or a stop token;
- chat: an instruct model answers questions rather than continuing documents, so the demonstrations'
  instructions (with their inputs) are a numbered list in one user message that asks for one new
  instruction of the same kind, and the candidate is the assistant's answer up to its end of turn
  (a leading list number such as "4." stripped); the demonstrations' responses are not shown;
- both: "existing" instructions are the client's own plus those accepted this round; the accepted
  instructions are then asked as ordinary prompts of the format.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from fedleak.federated.methods import prompt_positions
from fedleak.federated.data import Record
from fedleak.common.errors import FedleakError
from fedleak.federated.generation import generate
from fedleak.federated.prompts import (PROMPT_NO_INPUT, bos_prefix, format_prompt, is_chat, prompt_ids, stop_ids,
                                      user_message, user_turn_ids)
from fedleak.federated.rouge import rouge_l, tokens
from fedleak.federated.seeding import derive_seed, numpy_rng

SYNTHETIC_CATEGORY = "synthetic"
INSTRUCTION_HEADER = PROMPT_NO_INPUT.split("{instruction}")[0]  # "### Instruction:\n"
CHAT_REQUEST = ("Here are examples of instructions:\n\n{examples}\n\nWrite one new instruction of the same kind, "
                "different from these. Answer with the instruction only.")
_NUMBER = re.compile(r"^\s*\d+[.)]\s*")


@dataclass(frozen=True)
class SelfGenSettings:
    """The self-generation knobs; their types and ranges are declared on the keyword arguments of the
    algorithms that set them (`SelfGenerating`), which check them."""

    demos: int = 3
    per_round: int = 8  # accepted synthetic records wanted per client per round
    max_attempts: int = 24  # candidate instructions generated at most per client per round
    rouge_threshold: float = 0.7
    min_words: int = 4
    max_words: int = 60
    instruction_max_new_tokens: int = 48
    response_max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 3

    def __post_init__(self):
        if self.max_words < self.min_words:
            raise FedleakError(f"max_words = {self.max_words} is below min_words = {self.min_words}: raise max_words")


def _demo_prompt(tokenizer, demos: list[Record], budget: int) -> list[int]:
    """Demonstrations then an open instruction header (alpaca), or one user turn asking for a new
    instruction (chat); demos that would overflow `budget` are left out."""
    if is_chat(tokenizer):
        return _chat_demo_prompt(tokenizer, demos, budget)
    header = tokenizer(INSTRUCTION_HEADER, add_special_tokens=False)["input_ids"]
    ids: list[int] = bos_prefix(tokenizer)
    start = len(ids)
    for record in demos:
        demo = tokenizer(format_prompt(record.instruction, record.input) + record.output,
                         add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > start and len(ids) + len(demo) + len(header) > budget:
            break
        ids += demo
    return ids + header


def _chat_demo_prompt(tokenizer, demos: list[Record], budget: int) -> list[int]:
    items: list[str] = []
    ids: list[int] = []
    for record in demos:
        numbered = items + [f"{len(items) + 1}. {user_message(record.instruction, record.input)}"]
        candidate = user_turn_ids(tokenizer, CHAT_REQUEST.format(examples="\n".join(numbered)))
        if items and len(candidate) > budget:
            break
        items, ids = numbered, candidate
    return ids


def candidate_text(tokenizer, text: str) -> str:
    """The instruction a candidate holds: chat answers lose a leading list number ("4. ")."""
    return _NUMBER.sub("", text.strip(), count=1) if is_chat(tokenizer) else text


def context_length(model, default: int = 2048) -> int:
    """Positions left for prompt and generation: the model's, less an active soft prompt's or prefix's."""
    return int(getattr(model.config, "max_position_embeddings", None) or default) - prompt_positions(model)


@functools.lru_cache(maxsize=4)
def _newline_ids(tokenizer) -> list[int]:
    """Tokens that contain a newline: an instruction candidate ends at the first one."""
    return [i for tok, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([tok])]


def rejection(text: str, finished: bool, existing: list[str], settings: SelfGenSettings) -> str | None:
    """Why a candidate instruction is dropped (a stats key), or None if it is kept."""
    text = text.strip()
    if not text:
        return "empty"
    if not finished:
        return "truncated"
    if "###" in text or not any(ch.isalpha() for ch in text):
        return "malformed"
    if not settings.min_words <= len(tokens(text)) <= settings.max_words:
        return "length"
    if any(rouge_l(text, other) >= settings.rouge_threshold for other in existing):
        return "near_duplicate"
    return None


def self_generate(model, tokenizer, local: list[Record], settings: SelfGenSettings, *, seed: int,
                  purpose: tuple, id_prefix: str) -> tuple[list[Record], dict]:
    """Accepted synthetic records and counts of what the filters dropped."""
    rng = numpy_rng(seed, "selfgen-demos", *purpose)
    torch.manual_seed(derive_seed(seed, "selfgen-sampling", *purpose))
    stats = {"candidates": 0, "empty": 0, "truncated": 0, "malformed": 0, "length": 0, "near_duplicate": 0,
             "response_dropped": 0, "accepted": 0}
    existing = [r.instruction for r in local]
    accepted: list[str] = []
    # Alpaca: a candidate is one line; chat: the assistant's whole turn.
    stop = stop_ids(model, tokenizer) if is_chat(tokenizer) else _newline_ids(tokenizer) + stop_ids(model, tokenizer)
    k = min(settings.demos, len(local))
    while len(accepted) < settings.per_round and stats["candidates"] < settings.max_attempts:
        n = min(settings.per_round, settings.max_attempts - stats["candidates"])
        budget = context_length(model) - settings.instruction_max_new_tokens
        prompts = [_demo_prompt(tokenizer, [local[int(i)] for i in rng.choice(len(local), size=k, replace=False)],
                                budget) for _ in range(n)]
        candidates = generate(model, tokenizer, prompts, max_new_tokens=settings.instruction_max_new_tokens,
                              stop_ids=stop, do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        stats["candidates"] += n
        for candidate in candidates:
            text = candidate_text(tokenizer, candidate.text)
            reason = rejection(text, candidate.finished, existing + accepted, settings)
            if reason:
                stats[reason] += 1
            elif len(accepted) < settings.per_round:
                accepted.append(text.strip())
    prompts = [prompt_ids(tokenizer, instruction) for instruction in accepted]
    responses = generate(model, tokenizer, prompts, max_new_tokens=settings.response_max_new_tokens,
                         stop_ids=stop_ids(model, tokenizer),
                         repetition_penalty=settings.repetition_penalty,
                         no_repeat_ngram_size=settings.no_repeat_ngram_size)
    records = []
    for instruction, response in zip(accepted, responses):
        text = response.text.strip()
        if not text or not response.finished or "###" in text:
            stats["response_dropped"] += 1
            continue
        records.append(Record(instruction=instruction, input="", output=text, category=SYNTHETIC_CATEGORY,
                              record_id=f"{id_prefix}-{len(records):03d}"))
    stats["accepted"] = len(records)
    return records, stats
