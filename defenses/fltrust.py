"""FLTrust (Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021, arXiv 2012.13995).

The server holds a small clean root dataset and, each round, trains the global model on it as a client would: its
update g_0 bootstraps trust. Each client's update g_i = upload_i - start is scored by its direction and rescaled to
g_0's length, so a client can neither point away from the server's update nor win by magnitude:

    TS_i = ReLU(cos(g_i, g_0))                      (trust score: 0 for an update pointing away)
    g    = sum_i TS_i * (||g_0|| / ||g_i||) g_i / sum_i TS_i
    new global = start + g                          (start itself when every TS_i is 0)

Unweighted by example counts, as in the paper; the global learning rate is 1 (FedAvg's update semantics). The root
data is the embedded generator's public records (no patient: the public corpus's kind) or a user's Alpaca file. The
paper assumes a clean sample of the clients' own task: public records that name no patient pull the model away
from writing identifiers once it has learnt to, and honest clients' updates then point partly away from the
server's (seen in tests/test_fltrust.py, which gives the server records like the clients' instead). The server's
update costs one client training per round on the server, which needs a model there: both engines give the
server the clients' seeded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveInt
from fedleak.defenses.base import Defense, register_defense, round_start, update_rows
from fedleak.federated.adapters import AdapterState, flatten, unflatten
from fedleak.federated.data import Record, generate_records
from fedleak.federated.hooks import ClientUpdate, RoundInfo
from fedleak.federated.loader import load_alpaca
from fedleak.federated.seeding import numpy_rng

EMBEDDED_ROOT = "embedded"


def fltrust(results: Sequence[tuple[AdapterState, int]], start: AdapterState,
            server: AdapterState) -> tuple[AdapterState, torch.Tensor]:
    """The FLTrust aggregate of one round (Cao et al. 2021).

    Args:
        results: (upload, num_examples) pairs; counts are ignored, non-finite uploads left out.
        start: the global adapter the round's clients started from (each update is upload - start).
        server: the server's adapter after training from `start` on the root data (g_0 = server - start).

    Returns:
        The new global adapter (in the first upload's dtypes) and the trust scores, one per result (0 for a
        non-finite upload, an update pointing away from g_0 or a zero update).

    Raises:
        ValueError: no results, none finite, or a zero server update (no direction to trust).
    """
    kept, base, deltas = update_rows(results, start)
    g0 = flatten(server) - base
    n0 = g0.norm()
    if not torch.isfinite(n0) or n0 == 0:
        raise ValueError(f"the server's root update is {'zero' if n0 == 0 else 'not finite'}: it gives no direction "
                         f"to score uploads by")
    norms = deltas.norm(dim=1)
    moved = norms > 0  # a zero update has no direction: trust 0, and no rescaling (0 / 0)
    safe = torch.where(moved, norms, torch.ones_like(norms))
    trust = torch.where(moved, torch.relu(deltas @ g0 / (safe * n0)), torch.zeros_like(norms))
    scores = torch.zeros(len(results), dtype=torch.float64)
    scores[kept] = trust
    if trust.sum() == 0:
        return unflatten(base, results[kept[0]][0]), scores
    update = (trust[:, None] * deltas * (n0 / safe)[:, None]).sum(dim=0) / trust.sum()
    return unflatten(base + update, results[kept[0]][0]), scores


@register_defense("fltrust")
class FLTrust(Defense):
    """FLTrust: uploads weighted by their direction's agreement with the server's root update (Cao et al. 2021)."""

    needs_individual_updates = True

    def __init__(self, *, root_records: PositiveInt = 100, root_data: str = EMBEDDED_ROOT):
        """Set the server's root dataset.

        Args:
            root_records: records in the root dataset (the paper uses 100); a file with more is sampled (seeded),
                one with fewer is used whole.
            root_data: "embedded" (the embedded generator's public records, which name no patient: for the
                embedded default) or an Alpaca-style JSON/JSONL file (instruction, input, output) from the
                clients' task (a relative path is from the directory fedleak runs in).

        Raises:
            FedleakError: the root data file does not exist (it is read when the server first trains on it).
        """
        self.root_records, self.root_data = root_records, root_data
        self._file: list[Record] | None = None
        if root_data != EMBEDDED_ROOT and not Path(root_data).is_file():
            raise FedleakError(f"fltrust.root_data = {root_data!r}: no such file (a relative path is from the "
                               f"directory fedleak runs in): give an Alpaca JSON/JSONL file, or \"embedded\"")

    def _read(self) -> list[Record]:
        """The root file's records, read once, when the server first needs them (not where clients build it)."""
        if self._file is None:
            try:
                self._file = load_alpaca(self.root_data, id_prefix="fltrust-root")
            except FedleakError as e:
                raise FedleakError(f"fltrust.root_data = {self.root_data!r}: {e}") from None
            if not self._file:
                raise FedleakError(f"fltrust.root_data = {self.root_data!r} holds no record: give a file with at "
                                   f"least one")
        return self._file

    def root(self, seed: int) -> list[Record]:
        """The root dataset for a run with this seed (the same every round).

        Raises:
            FedleakError: the root file cannot be read or holds no record (the message names `fltrust.root_data`).
        """
        if self.root_data == EMBEDDED_ROOT:
            return generate_records(self.root_records, seed=seed, purpose="fltrust-root", private=False)
        records = self._read()
        if len(records) <= self.root_records:
            return list(records)
        picked = numpy_rng(seed, "fltrust-root").choice(len(records), size=self.root_records, replace=False)
        return [records[int(i)] for i in np.sort(picked)]

    def aggregate(self, updates: list[ClientUpdate], *, info: RoundInfo) -> AdapterState:
        start = round_start(info, self.name)
        if info.server is None:
            raise FedleakError("fltrust trains on the server's root data each round, and this round loop gives the "
                               "server no model: build its ServerSide with server_model=ClientSide.server_model()")
        server, metrics = info.server.train(self.root(info.server.seed), start=start, round=info.round,
                                            purpose="fltrust-root")
        try:
            state, scores = fltrust([(u.state, u.num_examples) for u in updates], start, server)
        except ValueError as e:
            fix = ("raise fltrust.root_records or federation.lr" if "zero" in str(e)
                   else "lower federation.lr or check the root data")
            raise FedleakError(f"fltrust, round {info.round}: {e}: {fix}") from None
        info.metrics["fltrust_trust"] = {str(u.client): float(s) for u, s in zip(updates, scores)}
        info.metrics["fltrust_server_loss"] = metrics["loss_last_quarter"]
        info.metrics["excluded_clients"] = [u.client for u, s in zip(updates, scores) if float(s) == 0]
        return state
