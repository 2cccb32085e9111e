"""What a run's data uses as private identifiers, recorded in results.json (`identifiers`) so a report
redacts them from the results alone, without importing the data generator (and torch) itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from fedleak.common.names import IDENTIFIER_FORMATS
from fedleak.common.synthetic import synthetic_names
from fedleak.eval.config import RunConfig

if TYPE_CHECKING:
    from fedleak.federated.data import FederatedData


def identifiers_record(config: RunConfig, data: Sequence["FederatedData"] = ()) -> dict:
    """`{"names": [...], "patterns": [...], "secrets": [...]}`: the words, regexes and exact strings a report
    redacts besides the secrets the cells and trainings list. The embedded generator's names are its first
    and last name lists (patients' and clinicians' alike). A user's data file has no name list: its declared
    `identifier_patterns` come first (the same regexes that give its records their identifiers, so `pii`
    counts what the report hides), then the synthetic formats (the safe side); `secrets` are the strings its
    records list in `identifiers_field`, every one of them, whether or not a model wrote it out."""
    if config.data.source == "embedded":
        return {"names": synthetic_names(), "patterns": list(IDENTIFIER_FORMATS)}
    f = config.data.file
    recorded = {"names": [], "patterns": [*f.identifier_patterns, *IDENTIFIER_FORMATS]}
    if f.identifiers_field:
        listed = {i for d in data for r in d.members + d.heldout
                  for i, kind in zip(r.identifiers, r.identifier_types) if kind == "listed"}
        recorded["secrets"] = sorted(listed)
    return recorded
