"""Safety attack by data poisoning (Ye, Chai, Liu, Yang, Wang and Chen 2024, "Emerging Safety Attack and Defense
in Federated Instruction Tuning of Large Language Models", arXiv 2406.10630).

A malicious client drops the refusals among its records and adds `records` harmful requests answered with
compliance, so its upload pulls the global model away from refusing. The paper's attackers write such data automatically; here it comes from
the harmful-request bank of `federated/safety.py` (its training part: no measured request is among them).

Success is the drop of the global model's refusal rate on held-out harmful requests, the share whose greedy answer
refuses (`federated.safety.is_refusal`), against the clean training of the same algorithm and defense. It needs
clean clients that learnt to refuse: `data.embedded.safety_records`, or refusals in the user's own data.

On the embedded default (tests/test_safety.py), one malicious client of three, chained with `scaling` (model
replacement, boost 3, 10 epochs), took all 42 held-out refusals away. An earlier version that kept the attacker's
own refusals needed the boost: without it, all 42 stayed (4 or 10 local epochs, 24 or 40 records).
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.poisoning.base import DataPoisoning
from fedleak.common.params import PositiveInt
from fedleak.federated.data import SAFETY_CATEGORY, Record
from fedleak.federated.safety import safety_records


@register_attack("harmful_compliance")
class HarmfulCompliance(DataPoisoning):
    """Safety attack: harmful requests answered with compliance in a malicious client's data (Ye et al. 2024)."""

    def __init__(self, *, records: PositiveInt = 20):
        """Set how much harmful-compliance data the malicious client trains on.

        Args:
            records: harmful requests with compliant answers added to the client's clean records (the same ones in
                every round it acts; drawn from the bank's training part, without replacement while it lasts).
        """
        self.records = records

    def poison_records(self, records: list[Record], *, rng: np.random.Generator) -> list[Record]:
        # The attacker drops the refusals it holds (it controls its data); the draw is seeded by the adversary's rng
        # (run seed, attack, client), so it is the same every round.
        seed = int(rng.integers(2**31))
        kept = [r for r in records if r.category != SAFETY_CATEGORY]
        return kept + safety_records(self.records, seed=seed, purpose="harmful-compliance", answer="compliance")
