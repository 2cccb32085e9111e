"""Redaction of private identifiers in the text a report shows (model outputs, prompts, examples).

Identifiers are recognised by the formats of fedleak's synthetic data (federated/data.py): first and last
names from its name lists (patients' and clinicians' alike), dates YYYY-MM-DD, 8-digit record numbers,
555-DDD-DDDD phone numbers and 6-digit canary secrets, also truncated or glued to other text as a small
model writes them; plus, exactly, every identifier string the results list (PII examples, canary names).
Redacting a clinician's name or a six-digit lab value too is the safe side of the trade. Five digits
stay: fedleak's record ids have five (private-00013), so a record number a model cuts that short stays.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable

MARKER = "[redacted]"

# Keys under which results carry identifiers themselves (pii examples, exposure canaries).
SECRET_KEYS = frozenset({"identifier", "identifiers", "patient_name", "secret", "secrets"})
MIN_SECRET_LENGTH = 3  # shorter strings would redact ordinary words

FORMATS = (
    r"\d{4}-\d{2}-\d{2}",  # date of birth
    r"\d{3}-\d{3}(?:-\d+)*",  # phone number 555-DDD-DDDD, also cut short or run on in model output
    r"\d{6,}",  # record number (8 digits), canary secret (6 digits), also glued to letters
)


@functools.cache
def _name_pattern() -> str:
    """Generator names, a first and last name together as one match so a full name gets one marker."""
    from fedleak.federated.data import FIRST_NAMES, LAST_NAMES  # imports torch: only when redacting

    words = "|".join(sorted(set(FIRST_NAMES) | set(LAST_NAMES), key=len, reverse=True))
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


def redactor(results: dict, *, show_secrets: bool) -> Callable[[str], str]:
    """The function every displayed text goes through: identity with show_secrets, else redaction."""
    if show_secrets:
        return lambda text: text
    listed = sorted(secrets_in([results.get("cells", []), results.get("trainings", [])]), key=len, reverse=True)
    # Exact secrets first: a listed full name or secret becomes one marker, not pieces.
    pattern = re.compile("|".join([*map(re.escape, listed), *FORMATS, _name_pattern()]))
    return lambda text: pattern.sub(MARKER, text)
