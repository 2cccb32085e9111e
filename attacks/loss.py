"""LOSS membership inference (Yeom, Giacomelli, Fredrikson and Jha 2018, "Privacy Risk in
Machine Learning: Analyzing the Connection to Overfitting").

score(x) = -mean token loss of x under the target model: training members tend to have lower loss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.federated.data import Record
from fedleak.federated.errors import FedleakError
from fedleak.federated.training import batches, encode, sequence_losses


@register_attack("loss")
class LossAttack(MembershipAttack):
    """LOSS membership inference: a lower loss on a record means member (Yeom et al. 2018)."""

    def __init__(self, *, batch_size: int = 32):
        if batch_size < 1:
            raise FedleakError(f"attack loss: batch_size = {batch_size}: must be a positive integer")
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        examples = encode(records, target.tokenizer, max_length=target.max_length,
                          response_only=target.response_only)
        target.model.eval()
        losses = [sequence_losses(target.model, b) for b in
                  batches(examples, batch_size=self.batch_size, pad_id=target.tokenizer.pad_token_id)]
        return -torch.cat(losses).numpy().astype(np.float64)
