"""Federated averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data"), as a pure function over (adapter state, num_examples) pairs, and the
finiteness checks the server applies to uploads before any aggregation rule sees them.

FEDIT averages the LoRA A and B matrices separately, as the paper and peft-based federated code
do; the average of products B_i A_i is not the product of averages, and that is part of the method.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedleak.federated.adapters import AdapterState


def nonfinite_reason(state: AdapterState) -> str | None:
    """Why an adapter state cannot be aggregated: the first tensor holding NaN or an infinity.

    Args:
        state: LoRA tensor name -> tensor (an upload, or an aggregate).

    Returns:
        None when every value is finite, else e.g. "NaN in base_model...lora_A.default.weight (3 values)".
    """
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            values = tensor[bad]
            kind = "NaN" if bool(values.isnan().any()) else "inf"
            return f"{kind} in {key} ({int(bad.sum())} non-finite value{'s' if int(bad.sum()) > 1 else ''})"
    return None


def finite_results(results: Sequence[tuple[AdapterState, int]]) -> list[int]:
    """Indices of the results whose every tensor is finite (what a robust rule aggregates).

    Args:
        results: (adapter state, num_examples) pairs, in client order.

    Returns:
        The indices, ascending.

    Raises:
        ValueError: no result is finite (the round loop refuses non-finite uploads before any rule).
    """
    kept = [i for i, (state, _) in enumerate(results) if nonfinite_reason(state) is None]
    if results and not kept:
        raise ValueError(f"every one of the {len(results)} client updates has a non-finite value: "
                         f"refuse non-finite uploads before aggregating (the round loop does)")
    return kept


def fedavg(results: Sequence[tuple[AdapterState, int]]) -> AdapterState:
    """The example-weighted mean of client adapters, tensor by tensor (McMahan et al. 2017).

    Args:
        results: (adapter state, num_examples) pairs; every state has the same tensor names and shapes.

    Returns:
        The weighted mean, each tensor in the dtype of the first state's.

    Raises:
        ValueError: no results, a non-positive total weight, or a non-finite value (a mean has no
            robustness to offer: refuse non-finite uploads before averaging, as the round loop does).
    """
    if not results:
        raise ValueError("fedavg needs at least one client update")
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    for i, (state, _) in enumerate(results):
        if (reason := nonfinite_reason(state)) is not None:
            raise ValueError(f"fedavg: client update {i} has {reason}: refuse non-finite uploads before averaging")
    keys = results[0][0].keys()
    return {k: sum(state[k].to(torch.float64) * (n / total) for state, n in results).to(results[0][0][k].dtype)
            for k in keys}
