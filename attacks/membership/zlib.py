"""zlib-calibrated loss (Carlini et al. 2021, "Extracting Training Data from Large Language
Models", Section 5.1): the model's loss relative to the text's zlib entropy.

score(x) = -NLL(x) / len(zlib.compress(x)): text that is cheap for the model but not for a generic
compressor is more likely memorised than merely simple.
"""

from __future__ import annotations

import zlib

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.membership.stats import ORIGINAL, TARGET, LogitAttack, TokenStats


def zlib_bytes(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


@register_attack("zlib")
class ZlibAttack(LogitAttack):
    """zlib: loss over the zlib-compressed byte length of the text (Carlini et al. 2021)."""

    def __init__(self):
        pass

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        s = stats[TARGET, ORIGINAL]
        return -s.loss / np.array([zlib_bytes(t) for t in s.texts], dtype=np.float64)
