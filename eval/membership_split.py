"""Members and held-out non-members matched by category: the records every membership cell scores
(`eval/attacking.py`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fedleak.federated.data import Record
from fedleak.federated.seeding import numpy_rng

CATEGORY_MATCHED = "category-matched"  # how a cell's non-members were drawn (results.json: nonmember_sampling)


@dataclass(frozen=True)
class MembershipSplit:
    """The members and non-members of one client set, matched by category."""

    members: list[Record]
    nonmembers: list[Record]
    left_out: int  # members whose category has fewer held-out records than members

    def record(self) -> dict:
        """What results.json says of the draw: the method, each side's count per category and the ids of
        the records scored (so anyone can rescore exactly these records)."""
        count = lambda records: dict(sorted(Counter(r.category for r in records).items()))
        return {"nonmember_sampling": CATEGORY_MATCHED,
                "category_counts": {"members": count(self.members), "nonmembers": count(self.nonmembers)},
                "members_left_out": self.left_out,
                "record_ids": {"members": [r.record_id for r in self.members],
                               "nonmembers": [r.record_id for r in self.nonmembers]}}


def membership_split(members: list[Record], heldout: list[Record], *, seed: int,
                     clients: tuple[int, ...]) -> MembershipSplit:
    """Members and held-out non-members in equal numbers per category, drawn with the run's seed.

    For each category c, k_c = min(members in c, held-out records in c) records of each side, so both
    sides have the same category mix: a client's Dirichlet-skewed records against a uniform held-out
    draw would be told apart by topic alone. The draw depends on the seed and the client set only, so
    every view of the same clients (FEDIT's `upload/i` and `client/i`) scores the same records.
    Records keep their input order within each side.
    """
    rng = numpy_rng(seed, "membership-split", *sorted(clients))
    by_category: dict[str, tuple[list[int], list[int]]] = {}
    for side, records in enumerate((members, heldout)):
        for i, r in enumerate(records):
            by_category.setdefault(r.category, ([], []))[side].append(i)
    chosen: tuple[list[int], list[int]] = ([], [])
    for category in sorted(by_category):
        sides = by_category[category]
        k = min(len(sides[0]), len(sides[1]))
        for side, indices in enumerate(sides):
            chosen[side].extend(indices[int(j)] for j in rng.choice(len(indices), size=k, replace=False))
    picked_members = [members[i] for i in sorted(chosen[0])]
    return MembershipSplit(picked_members, [heldout[i] for i in sorted(chosen[1])],
                           len(members) - len(picked_members))
