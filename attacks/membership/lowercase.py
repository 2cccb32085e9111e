"""Lowercase ratio (Carlini et al. 2021, "Extracting Training Data from Large Language Models",
Section 5.1): the loss on the text relative to the loss on its lowercased copy.

score(x) = -NLL(x) / NLL(lower(x)): memorised casing makes the original much cheaper than its
lowercased copy. It needs a second input (the lowercased text), so it costs one more forward pass
of the target than the other logit scores.
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.membership.stats import LOWERCASE, ORIGINAL, TARGET, LogitAttack, TokenStats


@register_attack("lowercase")
class LowercaseAttack(LogitAttack):
    """lowercase: loss ratio of the text to its lowercased copy (Carlini et al. 2021)."""

    needs = ((TARGET, ORIGINAL), (TARGET, LOWERCASE))

    def __init__(self):
        pass

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        return -stats[TARGET, ORIGINAL].loss / np.maximum(stats[TARGET, LOWERCASE].loss, 1e-12)
