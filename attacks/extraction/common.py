"""What the extraction attacks share: seeding per view, record sampling and batched
greedy decoding of prompts in the training format."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedleak.attacks.base import Secrets, Target
from fedleak.federated.data import Record
from fedleak.common.errors import FedleakError
from fedleak.federated.generation import generate
from fedleak.federated.prompts import prompt_ids

EXAMPLES = 5  # cap on example lists in details


def run_seed(target: Target, attack: str) -> int:
    if target.env is None:
        raise FedleakError(f"attack {attack}: the target has no AttackEnvironment: its seed drives the sampling")
    return target.env.seed


def view_key(target: Target) -> str:
    """Observer (and client), not the round: every round of one view draws the same samples, so rounds
    compare on the same records."""
    return f"{target.observer}/{target.client}"


def sample(items: Sequence, limit: int | None, rng: np.random.Generator) -> list:
    """At most `limit` items drawn without replacement, kept in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = np.sort(rng.choice(len(items), size=limit, replace=False))
    return [items[int(i)] for i in keep]


def canary_records(secrets: Secrets) -> list[Record]:
    """One record per inserted canary (its copies are identical)."""
    return [c.record(0) for c in secrets.canaries if c.repetitions > 0]


def greedy_texts(target: Target, records: Sequence[Record], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to the records' prompts in the training format (`prompts.prompt_ids`), cut at a stop
    token. Prompts are batched by length so left padding stays short; results come back in the input order."""
    if not records:
        return []
    ids = [prompt_ids(target.tokenizer, r.instruction, r.input) for r in records]  # as `encode` tokenises
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = generate(target.model, target.tokenizer, [ids[i] for i in order], max_new_tokens=max_new_tokens,
                   batch_size=batch_size)
    texts = [""] * len(ids)
    for i, g in zip(order, out):
        texts[i] = g.text
    return texts
