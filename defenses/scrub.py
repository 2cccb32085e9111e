"""Data sanitisation before training: each client replaces the identifiers it can detect in its own records with
placeholders, so its training data carry `[NAME]`, `[DATE]`, ... where the names and numbers were.

The classic defense the federated-LLM literature names beside robust aggregation (and the HIPAA Safe Harbor
method's list of identifiers: names, dates, phone numbers, e-mail addresses, record numbers, other unique
numbers). It is pattern matching, so it is exactly as good as its patterns: an identifier of a format it does not
know (a secret made of words, a misspelt name) passes through, and fedleak's extraction attacks, which look for
the original identifiers and secrets, show what leaks anyway. The membership attacks score each candidate as this
defense rewrites it (an attacker who knows the defense scrubs its candidates and its shadow pool too), so what
they measure is the membership of the scrubbed record.

Patterns (each an entity in `entities`, applied in this order so an e-mail's digits are not a phone number):
  email          user@host.tld                                  -> [EMAIL]
  phone          555-123-4567, (555) 123-4567, +1 555 123 4567  -> [PHONE]
  date           2024-03-01, 03/01/2024, March 1, 1 March 2024  -> [DATE]
  record_number  4+ digits after MRN / record / account / ID   -> [MRN]
  digits         any other run of at least `min_digits` digits  -> [NUMBER] (not after a decimal point)
  name           a word from the name list (case-sensitive)     -> [NAME] (a full name on one line: one [NAME])

The hook runs for every client, a poisoning scenario's malicious ones too (the shipped configs train scrub clean
only). Not covered: social security numbers and other short dash-separated numbers, street addresses, ages.

With `presidio_model` set, Microsoft Presidio's analyzer (pip install 'fedleak[presidio]') runs after the patterns:
every entity it finds at `presidio_threshold` or above becomes `[<ENTITY TYPE>]` (`[PERSON]`, `[LOCATION]`,
`[URL]`, `[CREDIT_CARD]`, ...). Its named-entity recognizers need a trained spaCy model (Presidio's default:
"en_core_web_lg", installed with `python -m spacy download en_core_web_lg`); "blank:en" runs its pattern and
checksum recognizers only, offline.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveInt, Range
from fedleak.common.synthetic import synthetic_names
from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.data import Record

Entity = Literal["email", "phone", "date", "record_number", "digits", "name"]
ENTITIES: tuple[str, ...] = ("email", "phone", "date", "record_number", "digits", "name")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "date": "[DATE]", "record_number": "[MRN]",
                "digits": "[NUMBER]", "name": "[NAME]"}
EMBEDDED_NAMES = "embedded"

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
          r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_PATTERNS = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "phone": re.compile(r"(?<![\w-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])"),
    "date": re.compile(rf"\b(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}|{_MONTH}\.? \d{{1,2}}"
                       rf"(?:st|nd|rd|th)?(?:,? \d{{4}})?|\d{{1,2}} {_MONTH}(?: \d{{4}})?)\b"),
    # Keep the keyword, replace what follows it: at least 4 digits ("record 3 times" is not a record number).
    "record_number": re.compile(r"\b(?P<key>(?i:MRN|medical record(?: number)?|record(?: number| no\.?)?|"
                                r"account(?: number)?)|ID)(?P<sep>[\s:#-]*)[A-Z]{0,3}-?\d[\d-]{3,}\b"),
}


def _digit_pattern(min_digits: int) -> re.Pattern:
    return re.compile(rf"(?<![\d.])\d{{{min_digits},}}(?!\d)")  # inside a token too; not a decimal's fraction


def _name_pattern(names: Sequence[str]) -> re.Pattern | None:
    """A run of listed name words ("Ada", "Ada Lovelace") as one match: a full name becomes one [NAME]."""
    words = sorted({w for name in names for w in name.split()}, key=len, reverse=True)
    if not words:
        return None
    word = r"(?:" + "|".join(map(re.escape, words)) + r")"
    return re.compile(rf"\b{word}(?:[ \t]+{word})*\b")  # within a line: a line break stays


def scrub_text(text: str, *, patterns: dict[str, re.Pattern]) -> tuple[str, Counter]:
    """`text` with every match of `patterns` replaced by its entity's placeholder.

    Args:
        text: one field of a record.
        patterns: entity -> compiled pattern, applied in the dict's order (`Scrub.patterns` builds it).

    Returns:
        The scrubbed text and the number of replacements per entity (a full name counts once).
    """
    counts: Counter = Counter()
    for entity, pattern in patterns.items():
        if entity == "record_number":
            text, n = pattern.subn(lambda m: f"{m['key']}{m['sep']}{PLACEHOLDERS[entity]}", text)
        else:
            text, n = pattern.subn(PLACEHOLDERS[entity], text)
        counts[entity] += n
    return text, +counts


def scrub_records(records: Sequence[Record], *, patterns: dict[str, re.Pattern],
                  presidio: Callable[[str], tuple[str, Counter]] | None = None) -> tuple[list[Record], dict]:
    """Each record with its instruction, input and output scrubbed (`scrub_text`, then `presidio`).

    Args:
        records: one client's records.
        patterns: entity -> compiled pattern, in the order they apply.
        presidio: a second pass over each scrubbed field (`presidio_text` with its analyzer), or None.

    Returns:
        The scrubbed records (a record nothing matched in is returned as it was; a changed one keeps its id and
        lists as identifiers only those still in its text) and what was replaced: `{"records": n, "changed": n,
        "replaced": {entity: count}, "identifiers_left": n}`, the last being the record's declared identifiers
        (the data's own labels, e.g. the generator's names, numbers and canary secrets) still in the scrubbed
        text: what the patterns missed.
    """
    out, total, changed, left = [], Counter(), 0, 0
    for record in records:
        fields, counts = {}, Counter()
        for name in ("instruction", "input", "output"):
            fields[name], c = scrub_text(getattr(record, name), patterns=patterns)
            counts += c
            if presidio is not None and fields[name]:
                fields[name], c = presidio(fields[name])
                counts += c
        text = " ".join(fields.values())
        if counts:
            changed += 1
            total += counts
            types = record.identifier_types or ("",) * len(record.identifiers)
            kept = [(i, t) for i, t in zip(record.identifiers, types) if i in text]
            record = replace(record, **fields, identifiers=tuple(i for i, _ in kept),
                             identifier_types=tuple(t for _, t in kept) if record.identifier_types else ())
        left += sum(i in text for i in record.identifiers)
        out.append(record)
    return out, {"records": len(records), "changed": changed, "replaced": dict(sorted(total.items())),
                 "identifiers_left": left}


def read_names(path: str) -> list[str]:
    """The names in a UTF-8 text file, one per line (blank lines and lines starting with # skipped).

    Raises:
        FedleakError: the file cannot be read or holds no name (the message names it).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FedleakError(f"scrub.names = {path!r}: cannot read it ({e.__class__.__name__}): give a UTF-8 text file "
                           f"with one name per line, or \"embedded\" for the embedded data's name list") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise FedleakError(f"scrub.names = {path!r}: the file lists no name: put one name per line")
    return names


@register_defense("scrub")
class Scrub(Defense):
    """Client-side data sanitisation: identifiers replaced with placeholders before any training (see the module)."""

    def __init__(self, *, entities: tuple[Entity, ...] = ENTITIES, min_digits: PositiveInt = 6,
                 names: str = EMBEDDED_NAMES, presidio_model: str = "",
                 presidio_threshold: Annotated[float, Range(ge=0, le=1)] = 0.5):
        """Set what is scrubbed.

        Args:
            entities: the patterns to apply (any of "email", "phone", "date", "record_number", "digits", "name");
                they run in the module's fixed order whatever the order here.
            min_digits: the shortest run of digits `digits` replaces (6 catches six-digit codes; 5 also ZIP codes).
            names: the name list for `name`: "embedded" (the embedded generator's first and last names, as a
                hospital's patient and staff register would list them) or a UTF-8 file, one name per line (a
                relative path is from the directory fedleak runs in).
            presidio_model: the spaCy model Microsoft Presidio's analyzer runs on after the patterns (e.g.
                "en_core_web_lg"; "blank:en" for its pattern recognizers only); empty: no Presidio.
            presidio_threshold: the lowest Presidio confidence score that is replaced.

        Raises:
            FedleakError: an entity is listed twice, the name file cannot be read or is empty, or Presidio or its
                spaCy model is not installed (the message says what to install).
        """
        if len(set(entities)) != len(entities):
            raise FedleakError(f"scrub.entities = {list(entities)} lists an entity twice: list each once")
        if not entities:
            raise FedleakError(f"scrub.entities is empty: list at least one of {', '.join(ENTITIES)}")
        # The order they apply in, whatever the config's: equal settings give equal params and cache keys.
        self.entities, self.min_digits, self.names = tuple(e for e in ENTITIES if e in entities), min_digits, names
        word_list = synthetic_names() if names == EMBEDDED_NAMES else read_names(names) if "name" in entities else []
        self.patterns = self.build_patterns(word_list)
        self.presidio_model, self.presidio_threshold = presidio_model, presidio_threshold
        if presidio_model:  # installed? (cheap); the analyzer itself is built on first use, in the process that trains
            presidio_modules(presidio_model)

    @functools.cached_property
    def analyzer(self):
        """Presidio's analyzer, or None without `presidio_model`."""
        return presidio_analyzer(self.presidio_model) if self.presidio_model else None

    def build_patterns(self, names: Sequence[str]) -> dict[str, re.Pattern]:
        """entity -> compiled pattern, in the order they apply, for the chosen entities."""
        patterns = {**_PATTERNS, "digits": _digit_pattern(self.min_digits)}
        name = _name_pattern(names)
        if name is not None:
            patterns["name"] = name
        return {e: patterns[e] for e in ENTITIES if e in self.entities and e in patterns}

    def client_records(self, records: list[Record], *, client: int) -> tuple[list[Record], dict]:
        presidio = ((lambda text: presidio_text(text, analyzer=self.analyzer, threshold=self.presidio_threshold))
                    if self.analyzer is not None else None)
        scrubbed, facts = scrub_records(records, patterns=self.patterns, presidio=presidio)
        return scrubbed, {self.name or "scrub": facts}


def presidio_modules(model: str):
    """(spacy, AnalyzerEngine, SpacyNlpEngine), checking that Presidio and the spaCy model `model` are installed.

    Raises:
        FedleakError: presidio-analyzer or the spaCy model is not installed.
    """
    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
    except ImportError:
        raise FedleakError(f"scrub.presidio_model = {model!r} needs Microsoft Presidio: pip install "
                           f"'fedleak[presidio]', or leave presidio_model empty") from None
    if not (model.startswith("blank:") or spacy.util.is_package(model) or Path(model).exists()):
        raise FedleakError(f"scrub.presidio_model = {model!r}: spaCy has no such model installed: install it (python "
                           f"-m spacy download {model}) or use \"blank:en\" for Presidio's pattern recognizers only")
    return spacy, AnalyzerEngine, SpacyNlpEngine


def presidio_analyzer(model: str):
    """Presidio's AnalyzerEngine on the spaCy model `model`, loaded here, never downloaded (Presidio itself would
    fetch a missing model at run time).

    Raises:
        FedleakError: presidio-analyzer or the spaCy model is not installed.
    """
    spacy, AnalyzerEngine, SpacyNlpEngine = presidio_modules(model)
    nlp = spacy.blank(model.split(":", 1)[1]) if model.startswith("blank:") else spacy.load(model)
    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
    engine.nlp = {"en": nlp}  # loaded: the engine's own load() would download a missing model
    return AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])


def presidio_text(text: str, *, analyzer, threshold: float) -> tuple[str, Counter]:
    """`text` with every entity Presidio finds at `threshold` or above replaced by `[<ENTITY TYPE>]`; overlapping
    findings keep the higher-scoring (then the longer) one. Returns the text and the replacements per type
    (`presidio_<type>`, lower case)."""
    found = sorted(analyzer.analyze(text=text, language="en", score_threshold=threshold),
                   key=lambda r: (-r.score, -(r.end - r.start), r.start))
    kept: list = []
    for result in found:
        if all(result.end <= k.start or result.start >= k.end for k in kept):
            kept.append(result)
    counts: Counter = Counter()
    for result in sorted(kept, key=lambda r: r.start, reverse=True):  # from the end: earlier offsets stay valid
        text = text[:result.start] + f"[{result.entity_type}]" + text[result.end:]
        counts[f"presidio_{result.entity_type.lower()}"] += 1
    return text, counts
