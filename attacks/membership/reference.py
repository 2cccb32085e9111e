"""Reference-model calibration (Carlini et al. 2021, "Extracting Training Data from Large Language
Models", Section 5.1; Mireshghallah et al. 2022, "Quantifying Privacy Risks of Masked Language
Models Using Membership Inference Attacks").

score(x) = NLL_ref(x) - NLL_target(x): fine-tuning lowers the loss of what it trained on relative to
a model that never saw it. The reference is the base model the adapters sit on (default), or
any model id or folder (for example a model fine-tuned on public data).
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import register_attack
from fedleak.attacks.membership.stats import BASE, ORIGINAL, REFERENCE, TARGET, LogitAttack, TokenStats
from fedleak.common.errors import FedleakError


@register_attack("reference")
class ReferenceAttack(LogitAttack):
    """reference: loss drop from a reference model (the base model by default) to the target."""

    needs = ((TARGET, ORIGINAL), (REFERENCE, ORIGINAL))

    def __init__(self, *, model: str = BASE):
        """Set the reference model.

        Args:
            model: the reference model: "base" (the target's base model, its adapters switched off) or a model id
                or folder, loaded once per run and scored with its own tokenizer.

        Raises:
            FedleakError: model is empty.
        """
        if not model:
            raise FedleakError(f"attack reference: model is empty: use '{BASE}' or a model id or folder")
        self.model = model

    @property
    def reference(self) -> str:  # what LogitAttack loads the reference statistics from
        return self.model

    def from_stats(self, stats: dict[tuple[str, str], TokenStats]) -> np.ndarray:
        return stats[REFERENCE, ORIGINAL].loss - stats[TARGET, ORIGINAL].loss
