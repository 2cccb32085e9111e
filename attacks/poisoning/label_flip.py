"""Label flipping for instructions: untargeted data poisoning (the label-flipping attack of Tolpegin,
Truex, Gursoy and Liu 2020, "Data Poisoning Attacks Against Federated Learning Systems", carried
over to instruction tuning: the "label" is the response, flipped to one of another category).

A malicious client replaces the response of `round(flip_rate * n)` of its records by the response
of a randomly chosen record of another category (any other record if it holds one category only),
so its upload teaches wrong answers to its own instructions.
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import DataPoisoning
from fedleak.federated.data import Record
from fedleak.common.params import UnitInterval


@register_attack("label_flip")
class LabelFlip(DataPoisoning):
    """Label flip: responses swapped across categories (untargeted; Tolpegin et al. 2020)."""

    def __init__(self, *, flip_rate: UnitInterval = 1.0):
        """Set the share of records flipped.

        Args:
            flip_rate: fraction of the client's records (round(flip_rate * n)) whose response is replaced by the
                response of a record of another category.
        """
        self.flip_rate = flip_rate

    def poison_records(self, records: list[Record], *, rng: np.random.Generator) -> list[Record]:
        if len(records) < 2:
            return records
        out = list(records)
        for i in sorted(int(j) for j in rng.choice(len(records), size=round(self.flip_rate * len(records)),
                                                   replace=False)):
            donors = [j for j, r in enumerate(records) if r.category != records[i].category] or \
                     [j for j in range(len(records)) if j != i]
            donor = records[donors[int(rng.integers(len(donors)))]]
            out[i] = Record(instruction=records[i].instruction, input=records[i].input, output=donor.output,
                            category=records[i].category, record_id=f"flipped-{records[i].record_id}")
        return out
