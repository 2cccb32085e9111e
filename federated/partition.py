"""Split records across clients: IID, or Dirichlet(alpha) over categories (as FEDPIT, alpha=1.0).

Dirichlet label skew follows Hsu et al. 2019 ("Measuring the effects of non-identical data
distribution"): for each category, the share of its records that each client receives is drawn
from Dir(alpha); small alpha gives each client few categories, large alpha approaches IID.

With fewer than two categories there is no label to skew: a Dirichlet split would be one draw over
the clients' sizes (e.g. [34, 110, 29] for 173 records), which is not the topic skew it claims to be.
`split_plan` then falls back to the size-balanced IID split (a random permutation cut into equal
parts) and says why, so the run records the split it actually used.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence, TypeVar

import numpy as np

from fedleak.common.errors import FedleakError

T = TypeVar("T")


def iid_partition(items: Sequence[T], *, num_clients: int, rng: np.random.Generator) -> list[list[T]]:
    order = rng.permutation(len(items))
    return [[items[int(i)] for i in chunk] for chunk in np.array_split(order, num_clients)]


def dirichlet_partition(items: Sequence[T], labels: Sequence[str], *, num_clients: int, alpha: float,
                        rng: np.random.Generator) -> list[list[T]]:
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(by_label):
        idx = np.array(by_label[label])[rng.permutation(len(by_label[label]))]
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            clients[client].extend(int(i) for i in part)
    return [[items[i] for i in sorted(c)] for c in clients]


def split_plan(labels: Sequence[str], method: str, *, alpha: float, reason: str | None = None) -> dict:
    """The split the records get, for results.json: `{"method", "requested", "categories", "alpha"?,
    "reason"?}`. Dirichlet needs two categories or more; below that (or when the caller gives a `reason`,
    e.g. no record names a category) it falls back to the size-balanced IID split."""
    categories = len(set(labels))
    plan = {"method": method, "requested": method, "categories": categories}
    if method == "dirichlet" and (reason or categories < 2):
        plan["method"] = "iid"
        plan["reason"] = reason or (f"every record has the same category ({next(iter(set(labels)), 'none')!r}): "
                                    f"Dirichlet skew needs two or more")
    if plan["method"] == "dirichlet":
        plan["alpha"] = alpha
    return plan


def partition(items: Sequence[T], labels: Sequence[str], *, method: str, num_clients: int, alpha: float,
              min_records: int, rng: np.random.Generator, max_tries: int = 100) -> list[list[T]]:
    """Partition and guarantee every client `min_records` records.

    Dirichlet draws are repeated (from the same seeded generator, so still deterministic) until
    every client meets the minimum; an impossible request fails up front with the numbers.
    """
    if num_clients < 1:
        raise FedleakError(f"federation.clients = {num_clients}: need at least 1 client")
    if len(items) < num_clients * min_records:
        raise FedleakError(
            f"{len(items)} training records cannot give {num_clients} clients {min_records} each "
            f"(federation.min_records_per_client): add data, lower the minimum or use fewer clients")
    if method == "iid":
        return iid_partition(items, num_clients=num_clients, rng=rng)
    if method != "dirichlet":
        raise FedleakError(f"federation.partition = {method!r}: use 'dirichlet' or 'iid'")
    for _ in range(max_tries):
        parts = dirichlet_partition(items, labels, num_clients=num_clients, alpha=alpha, rng=rng)
        if min(len(p) for p in parts) >= min_records:
            return parts
    raise FedleakError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {min_records} records in {max_tries} "
        f"draws: raise federation.alpha, lower federation.min_records_per_client or use partition = 'iid'")
