"""Turn data settings into a `FederatedData`: the embedded generator or a user's Alpaca file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedleak.federated.data import (FederatedData, generate_records, make_audit_canaries, make_canaries,
                                   with_canaries)
from fedleak.common.errors import FedleakError, require_positive
from fedleak.federated.loader import FieldNames, load_alpaca
from fedleak.federated.partition import partition
from fedleak.federated.seeding import numpy_rng


@dataclass(frozen=True)
class EmbeddedDataSettings:
    private_records: int = 150  # pooled across clients before partitioning
    heldout_records: int = 150  # same distribution, never trained on: the non-members
    canary_repetitions: tuple[int, ...] = (1, 4, 16)
    canaries_per_repetition: int = 2
    audit_canaries: int = 0  # one-run audit canaries, each inserted once with probability 1/2

    def __post_init__(self):
        require_positive(self, ("private_records", "heldout_records"), "data.embedded.")
        if self.audit_canaries < 0:
            raise FedleakError(f"data.embedded.audit_canaries = {self.audit_canaries}: must be >= 0")
        if self.canaries_per_repetition < 0:
            raise FedleakError(f"data.embedded.canaries_per_repetition = {self.canaries_per_repetition}: must be >= 0")
        if any(r < 1 for r in self.canary_repetitions):
            raise FedleakError(f"data.embedded.canary_repetitions = {list(self.canary_repetitions)}: "
                               f"each count must be >= 1")


@dataclass(frozen=True)
class FileDataSettings:
    path: str = ""
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    category_field: str = "category"
    heldout_fraction: float = 0.2  # of the file's records, kept out of training as non-members

    def __post_init__(self):
        if not 0 < self.heldout_fraction < 1:
            raise FedleakError(f"data.file.heldout_fraction = {self.heldout_fraction}: must be in (0, 1)")


@dataclass(frozen=True)
class DataSettings:
    source: str = "embedded"  # "embedded" or "file"
    embedded: EmbeddedDataSettings = field(default_factory=EmbeddedDataSettings)
    file: FileDataSettings = field(default_factory=FileDataSettings)

    def __post_init__(self):
        if self.source not in ("embedded", "file"):
            raise FedleakError(f"data.source = {self.source!r}: use 'embedded' or 'file' (with [data.file] path = ...)")
        if self.source == "file" and not self.file.path:
            raise FedleakError("data.source = 'file' but data.file.path is not set: give the path of an "
                               "Alpaca-style .json or .jsonl file")


def prepare_data(settings: DataSettings, *, seed: int, num_clients: int, partition_method: str,
                 alpha: float, min_records: int, base_dir: Path = Path(".")) -> FederatedData:
    if settings.source == "embedded":
        s = settings.embedded
        pool = generate_records(s.private_records, seed=seed, purpose="private", private=True)
        heldout = generate_records(s.heldout_records, seed=seed, purpose="heldout", private=True)
    else:
        f = settings.file
        path = Path(f.path) if Path(f.path).is_absolute() else base_dir / f.path
        records = load_alpaca(path, FieldNames(instruction=f.instruction_field, input=f.input_field,
                                               output=f.output_field, category=f.category_field))
        order = numpy_rng(seed, "heldout-split").permutation(len(records))
        n_heldout = max(1, round(f.heldout_fraction * len(records)))
        if n_heldout >= len(records):
            raise FedleakError(f"{path}: {len(records)} records leave none for training after the held-out "
                               f"split (data.file.heldout_fraction = {f.heldout_fraction}): add records")
        heldout = [records[int(i)] for i in order[:n_heldout]]
        pool = [records[int(i)] for i in order[n_heldout:]]
    clients = partition(pool, [r.category for r in pool], method=partition_method, num_clients=num_clients,
                        alpha=alpha, min_records=min_records, rng=numpy_rng(seed, "partition"))
    canaries, reference, audit = [], [], []
    if settings.source == "embedded":
        s = settings.embedded
        if s.canaries_per_repetition:
            canaries, reference = make_canaries(seed=seed, repetitions=s.canary_repetitions,
                                                per_repetition=s.canaries_per_repetition, num_clients=num_clients)
        audit = make_audit_canaries(s.audit_canaries, seed=seed, num_clients=num_clients,
                                    taken=canaries + reference)
        if canaries or audit:
            clients = with_canaries(clients, canaries + [c for c in audit if c.repetitions], seed=seed)
    return FederatedData(clients=clients, heldout=heldout, canaries=canaries, reference_canaries=reference,
                         audit_canaries=audit)
