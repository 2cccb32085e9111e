"""Federated averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data"), as a pure function over (adapter state, num_examples) pairs.

FEDIT averages the LoRA A and B matrices separately, as the paper and peft-based federated code
do; the average of products B_i A_i is not the product of averages, and that is part of the method.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.federated.adapters import AdapterState


def fedavg(results: Sequence[tuple[AdapterState, int]]) -> AdapterState:
    if not results:
        raise ValueError("fedavg needs at least one client update")
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    keys = results[0][0].keys()
    return {k: sum(state[k].to(torch.float64) * (n / total) for state, n in results).to(results[0][0][k].dtype)
            for k in keys}
