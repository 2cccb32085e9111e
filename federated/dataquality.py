"""Data problems that silently change a run's ground truth, found and counted before anything trains.

- exact duplicates (same instruction, input and output once whitespace is normalised): one copy is kept,
  before the held-out split, so the same text can never be a member and a non-member at once;
- truncation: records whose answer (its tokens and the end-of-answer token: EOS, or a chat template's
  end-of-turn) is cut at `federation.max_length`, and records whose prompt alone fills it (they train on
  nothing), counted with the run's tokenizer and prompt format (`model.prompt_format`, set on the tokenizer by
  `federated/prompts.py`'s `set_prompt_format`) exactly as `federated/training.py`'s `encode` builds them.

Each finding becomes a warning with counts, a field of results.json's `data` and a line of the report.
"""

from __future__ import annotations

from typing import Sequence

from fedleak.federated.data import Record

# Above this share of cut answers the run is warned loudly: most records then never train their ending.
MOST = 0.5


def text_key(record: Record) -> tuple[str, str, str]:
    """What makes two records the same text: instruction, input and output with whitespace runs collapsed
    (a trailing newline or a double space does not make a copy a different record to a model)."""
    return tuple(" ".join(part.split()) for part in (record.instruction, record.input, record.output))


def drop_duplicates(records: Sequence[Record]) -> tuple[list[Record], int]:
    """The records with every exact duplicate after the first copy removed, and how many were removed."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for record in records:
        key = text_key(record)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def drop_overlap(records: Sequence[Record], others: Sequence[Record]) -> tuple[list[Record], int]:
    """`records` without those whose text is also in `others` (a held-out record that is also trained on
    would count as a non-member while being a member), and how many were removed."""
    taken = {text_key(r) for r in others}
    kept = [r for r in records if text_key(r) not in taken]
    return kept, len(records) - len(kept)


def truncation_counts(records: Sequence[Record], tokenizer, *, max_length: int) -> dict:
    """How `max_length` cuts the records' training sequences (prompt, answer, end-of-answer token).

    Returns `{"max_length", "records", "answer_cut", "prompt_fills", "answer_tokens_kept"}`: records whose
    answer loses at least its end-of-answer token, records whose prompt alone is `max_length` tokens or more
    (no answer token is left to train or score), and the share of all answer tokens (end-of-answer included)
    that fit.
    """
    from fedleak.federated.training import IGNORE, encode  # torch: only when a tokenizer is at hand anyway

    if not records:
        return {"max_length": max_length, "records": 0, "answer_cut": 0, "prompt_fills": 0,
                "answer_tokens_kept": None}
    # Untruncated sequences, tokenised as training tokenises them; the prompt is where the labels are masked.
    full = encode(records, tokenizer, max_length=1 << 62, response_only=True)  # a slice: no cut at all
    cut = fills = kept = total = 0
    for example in full:
        prompt = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
        answer = len(example.input_ids) - prompt  # answer tokens plus the end-of-answer token
        cut += len(example.input_ids) > max_length
        fills += prompt >= max_length
        kept += max(0, min(answer, max_length - prompt))
        total += answer
    return {"max_length": max_length, "records": len(records), "answer_cut": cut, "prompt_fills": fills,
            "answer_tokens_kept": round(kept / total, 4) if total else None}


def truncation_messages(counts: dict, where: str) -> list[tuple[bool, str]]:
    """(is_warning, message) lines on what `truncation_counts` found; `where` names the data."""
    n, cut, fills = counts["records"], counts["answer_cut"], counts["prompt_fills"]
    limit = f"federation.max_length = {counts['max_length']}"
    kept = counts["answer_tokens_kept"]
    share = f" ({kept:.0%} of answer tokens kept)" if kept is not None else ""
    lines = []
    if cut:
        lines.append((cut > MOST * n,
                      f"{where}: {cut} of {n} records have their answer cut at {limit} tokens{share}; a cut answer "
                      f"never trains its end-of-answer token" + (": raise federation.max_length" if cut > MOST * n
                                                                  else "")))
    else:
        lines.append((False, f"{where}: no answer is cut at {limit} tokens ({n} records)"))
    if fills:
        lines.append((True, f"{where}: {fills} of {n} records have a prompt of {limit} tokens or more: they train "
                            f"on nothing and leave every membership split: raise federation.max_length or "
                            f"shorten those prompts"))
    return lines
