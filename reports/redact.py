"""Redaction of private identifiers in the text a report shows (model outputs, prompts, examples).

Identifiers are what results.json records under `identifiers` (eval/identifiers.py): the words the data
uses as names (for fedleak's synthetic data its first and last name lists, patients' and clinicians' alike)
and regexes for its formats (dates YYYY-MM-DD, 555-DDD-DDDD phone numbers, 8-digit record numbers and 6-digit
canary secrets, also truncated or glued to other text as a small model writes them); plus, exactly, every
identifier string the results list (PII examples, canary names); for a user's data file, the identifier
patterns it declares (`data.file.identifier_patterns`) and the secrets its records list
(`data.file.identifiers_field`, recorded under `identifiers.secrets`). Results written before `identifiers` was
recorded (schema 4) are redacted as they were then: the synthetic data's name lists and formats.
Redacting a clinician's name or a six-digit lab value too is the safe side of the trade. Five digits
stay: fedleak's record ids have five (private-00013), so a record number a model cuts that short stays.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from fedleak.common.names import IDENTIFIER_FORMATS
from fedleak.common.synthetic import synthetic_names

MARKER = "[redacted]"

# Keys under which results carry identifiers themselves (pii examples, exposure canaries).
SECRET_KEYS = frozenset({"identifier", "identifiers", "patient_name", "secret", "secrets"})
MIN_SECRET_LENGTH = 3  # shorter strings would redact ordinary words

REDACTED_NOTE = (f"Private identifiers in model outputs, prompts and examples are replaced by `{MARKER}`: names, "
                 "dates, record numbers, phone numbers and canary secrets in the formats of fedleak's synthetic "
                 "data (clinicians' names and any number of six digits or more too), the identifier patterns and "
                 "secrets a data file declares, and every identifier the results list. "
                 "`fedleak report RUN_DIR --show-secrets` writes the report with them in full.")
SHOWN_NOTE = ("This report shows private identifiers in full (written with `--show-secrets`): keep it as private "
              "as the training data; `fedleak report RUN_DIR` rewrites it redacted.")


def _name_pattern(names: list[str]) -> str:
    """The names, a first and last name together as one match so a full name gets one marker."""
    words = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))  # longest first: no shorter prefix
    return rf"\b(?:{words})(?:\s+(?:{words}))?\b"


def secrets_in(value) -> set[str]:
    """Identifier strings listed anywhere in a results structure, under SECRET_KEYS."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in SECRET_KEYS:
                found.update(s for s in _strings(item) if len(s) >= MIN_SECRET_LENGTH)
            else:
                found |= secrets_in(item)
    elif isinstance(value, list):
        for item in value:
            found |= secrets_in(item)
    return found


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from (v for v in value if isinstance(v, str))


def redaction_note(results: dict, *, show_secrets: bool) -> str:
    """The report's sentence on what it redacts (or that it does not)."""
    if show_secrets:
        return SHOWN_NOTE
    return REDACTED_NOTE


def redactor(results: dict, *, show_secrets: bool) -> Callable[[str], str]:
    """The function every displayed text goes through: identity with show_secrets, else redaction."""
    if show_secrets:
        return lambda text: text
    # A results file from before `identifiers` was recorded (schema 4) came from fedleak's synthetic data
    # or was redacted as if it had: the generator's names and formats, as its report was then.
    recorded = results.get("identifiers") or {"names": synthetic_names(), "patterns": IDENTIFIER_FORMATS}
    found = secrets_in([results.get("cells", []), results.get("trainings", [])])
    found.update(s for s in recorded.get("secrets", []) if len(s) >= MIN_SECRET_LENGTH)  # a data file's own
    listed = sorted(found, key=len, reverse=True)
    names = [_name_pattern(recorded["names"])] if recorded.get("names") else []
    # Exact secrets first: a listed full name or secret becomes one marker, not pieces.
    alternatives = [*map(re.escape, listed), *recorded.get("patterns", []), *names]
    if not alternatives:
        return lambda text: text  # an empty pattern would put a marker between every two characters
    pattern = re.compile("|".join(alternatives))
    return lambda text: pattern.sub(MARKER, text)
