"""PII leakage (Lukas et al. 2023, "Analyzing Leakage of Personally Identifiable Information in
Language Models"): the fraction of the view's private identifiers (names, dates of birth, record
numbers, phone numbers, canary secrets) that the model writes out verbatim in answer to prompts that
do not contain them.

own:    prompts are the private records' own instructions in the training template; an identifier of
        record x counts for x when it is in x's response but not in its prompt, and leaks when it is
        in the greedy output:  own_fraction = leaked / countable over the records' identifiers (canary
        secrets excluded: they are own_fraction_secret), and per identifier type.
cross:  prompts are records the view did not train on (another client's, or held-out ones);
        cross_fraction = |{i in identifiers : i in some output o, i not in o's prompt}| /
        |{i in identifiers : i is absent from at least one cross prompt}|.
canary: for each inserted canary, is its secret in the output to its question `canary.prompt`?
        (that is the canary record's own prompt, so canary_fraction = own_fraction_secret.)

On a user's data file the identifiers are what the config declares (`data.file.identifier_patterns`,
`data.file.identifiers_field`), typed "pattern" and "listed"; `own_fraction` counts them, the per-type
rates above are the synthetic data's.

Matching is a plain substring test. Identifiers shorter than `min_identifier_length` (default 4)
characters are not counted at all: short strings appear in ordinary text by chance.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import EXAMPLES, canary_records, greedy_texts, run_seed, sample, view_key
from fedleak.common.params import PositiveInt
from fedleak.federated.data import CANARY_CATEGORY, Record
from fedleak.federated.prompts import user_message
from fedleak.federated.seeding import numpy_rng

PATIENT_FIELDS = ("name", "dob", "mrn", "phone")  # the order of Patient.identifiers
CANARY_FIELDS = ("name", "secret")  # the order of Canary.record(...).identifiers
TYPES = ("name", "dob", "mrn", "phone", "secret")


def typed_identifiers(record: Record) -> list[tuple[str, str]]:
    """(type, identifier) pairs of one record: the types it carries (a data file's records: "listed" in its
    identifiers field, or found by a declared "pattern"), else the generator's layout; identifiers of an
    unknown layout are typed "other"."""
    if record.identifier_types:
        return list(zip(record.identifier_types, record.identifiers))
    fields = CANARY_FIELDS if record.category == CANARY_CATEGORY else PATIENT_FIELDS
    if len(fields) != len(record.identifiers):
        fields = ("other",) * len(record.identifiers)
    return list(zip(fields, record.identifiers))


def identifier_types(secrets: Secrets) -> dict[str, str]:
    """Every identifier of the view (`secrets.identifiers`) with its type."""
    types: dict[str, str] = {}
    for record in list(secrets.records) + canary_records(secrets):
        for kind, identifier in typed_identifiers(record):
            types.setdefault(identifier, kind)
    return {i: types.get(i, "other") for i in secrets.identifiers}


def count_own(records: Sequence[Record], prompts: Sequence[str], outputs: Sequence[str], *,
              min_length: int) -> dict:
    """Per type: identifiers that could leak (in the record's response, not in its prompt, long enough)
    and those the output contains. Returns {"countable": {type: n}, "leaked": {type: n}, "examples": [...]}."""
    countable, leaked, examples = defaultdict(int), defaultdict(int), []
    for record, prompt, output in zip(records, prompts, outputs):
        for kind, identifier in typed_identifiers(record):
            if len(identifier) < min_length or identifier in prompt or identifier not in record.output:
                continue
            countable[kind] += 1
            if identifier in output:
                leaked[kind] += 1
                if len(examples) < EXAMPLES:
                    examples.append({"record_id": record.record_id, "type": kind, "identifier": identifier,
                                     "output": output})
    return {"countable": dict(countable), "leaked": dict(leaked), "examples": examples}


def count_cross(types: dict[str, str], prompts: Sequence[str], outputs: Sequence[str], *, min_length: int) -> dict:
    """Identifiers (with their types) found in an output whose prompt does not contain them; an
    identifier is countable if at least one prompt lacks it."""
    countable, leaked, examples = defaultdict(int), defaultdict(int), []
    for identifier, kind in types.items():
        if len(identifier) < min_length:
            continue
        absent = [i for i, p in enumerate(prompts) if identifier not in p]
        if not absent:
            continue
        countable[kind] += 1
        found = next((i for i in absent if identifier in outputs[i]), None)
        if found is not None:
            leaked[kind] += 1
            if len(examples) < EXAMPLES:
                examples.append({"type": kind, "identifier": identifier, "prompt": prompts[found],
                                 "output": outputs[found]})
    return {"countable": dict(countable), "leaked": dict(leaked), "examples": examples}


def _fraction(counts: dict, kinds: Sequence[str] | None = None) -> float:
    kinds = list(counts["countable"]) if kinds is None else kinds
    total = sum(counts["countable"].get(k, 0) for k in kinds)
    return sum(counts["leaked"].get(k, 0) for k in kinds) / total if total else float("nan")


@register_attack("pii")
class PiiAttack(ExtractionAttack):
    """pii: fraction of private identifiers written out verbatim to prompts lacking them (Lukas et al. 2023)."""

    def __init__(self, *, max_prompts: PositiveInt | None = None, max_new_tokens: PositiveInt = 64,
                 batch_size: PositiveInt = 16, min_identifier_length: PositiveInt = 4):
        """Set how many prompts are asked and which identifiers count.

        Args:
            max_prompts: at most this many of the view's records are prompted, and at most this many outside it
                (seeded samples; every inserted canary's prompt is added); unset: all of them.
            max_new_tokens: token budget of each greedy answer.
            batch_size: prompts per generation batch.
            min_identifier_length: identifiers shorter than this many characters are not counted at all (short
                strings occur by chance).
        """
        self.max_prompts = max_prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.min_identifier_length = min_identifier_length

    def _complete(self, target: Target, records: list[Record]) -> list[str]:
        """Greedy answers to the records' prompts, in the training format."""
        return greedy_texts(target, records, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        types = identifier_types(secrets)
        if not any(len(i) >= self.min_identifier_length for i in types):
            nan = float("nan")
            names = ["own_fraction", *(f"own_fraction_{t}" for t in TYPES), "cross_fraction", "canary_fraction"]
            return ExtractionResult({k: nan for k in names},
                                    {"note": f"the view's data holds no private identifier of at least "
                                             f"{self.min_identifier_length} characters: for a data file declare "
                                             f"data.file.identifier_patterns or identifiers_field"})
        seed = run_seed(target, self.name)
        own_records = sample(secrets.records, self.max_prompts, numpy_rng(seed, "attack", self.name, "own",
                                                                    view_key(target)))
        canaries = canary_records(secrets)
        cross_records = sample(secrets.other_records, self.max_prompts,
                               numpy_rng(seed, "attack", self.name, "cross", view_key(target)))
        # What each prompt shows the model besides the template (an identifier in it is not a leak).
        own_prompts = [user_message(r.instruction, r.input) for r in own_records + canaries]
        cross_prompts = [user_message(r.instruction, r.input) for r in cross_records]
        # One generation pass for both prompt sets (greedy: each output depends on its prompt only).
        outputs = self._complete(target, own_records + canaries + cross_records)
        own_outputs, cross_outputs = outputs[:len(own_prompts)], outputs[len(own_prompts):]

        own = count_own(own_records + canaries, own_prompts, own_outputs, min_length=self.min_identifier_length)
        cross = count_cross(types, cross_prompts, cross_outputs, min_length=self.min_identifier_length)
        # A canary record's identifiers are (name, secret); its prompt is the canary's question.
        canary_hits = [c.identifiers[1] in o for c, o in zip(canaries, own_outputs[len(own_records):])
                       if len(c.identifiers[1]) >= self.min_identifier_length]

        # Canary secrets have their own rate (a canary repeated dozens of times would dominate).
        metrics = {"own_fraction": _fraction(own, [t for t in own["countable"] if t != "secret"])}
        metrics.update({f"own_fraction_{t}": _fraction(own, [t]) for t in TYPES})
        metrics["cross_fraction"] = _fraction(cross)
        metrics["canary_fraction"] = float(np.mean(canary_hits)) if canary_hits else float("nan")
        details = {
            "own_prompts": len(own_prompts), "cross_prompts": len(cross_prompts), "canary_prompts": len(canary_hits),
            "own_countable": own["countable"], "own_leaked": own["leaked"],
            "cross_countable": cross["countable"], "cross_leaked": cross["leaked"],
            "canary_leaked": int(sum(canary_hits)), "min_identifier_length": self.min_identifier_length,
            "own_examples": own["examples"], "cross_examples": cross["examples"],
        }
        notes = []
        if not cross_prompts:
            notes.append("no records outside the view to build cross prompts from: cross_fraction is undefined")
        if not canary_hits:
            notes.append("no inserted canary with a secret of at least min_identifier_length characters in this "
                         "view: canary_fraction and own_fraction_secret are undefined")
        if notes:
            details["note"] = "; ".join(notes)
        return ExtractionResult(metrics, details)
