"""What a run's data uses as private identifiers, recorded in results.json (`identifiers`) so a report
redacts them from the results alone, without importing the data generator (and torch) itself."""

from __future__ import annotations

from fedleak.common.names import IDENTIFIER_FORMATS
from fedleak.common.synthetic import synthetic_names
from fedleak.eval.config import RunConfig


def identifiers_record(config: RunConfig) -> dict:
    """`{"names": [...], "patterns": [...]}`: the words and regexes a report redacts besides the secrets the
    cells and trainings list. The embedded generator's names are its first and last name lists (patients'
    and clinicians' alike); a user's data file has no name list."""
    if config.data.source == "embedded":
        names = synthetic_names()
    else:
        names = []  # identifier patterns for a user's own data (names, formats) come with a later issue
    return {"names": names, "patterns": list(IDENTIFIER_FORMATS)}
