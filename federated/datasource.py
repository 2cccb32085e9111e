"""Turn data settings into a `FederatedData`: the embedded generator or a user's Alpaca file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedleak.federated.data import (FederatedData, generate_records, make_audit_canaries, make_canaries,
                                   with_canaries)
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, OpenUnitInterval, PositiveInt, check_fields
from fedleak.federated.loader import FieldNames, load_alpaca
from fedleak.federated.partition import partition
from fedleak.federated.seeding import numpy_rng


@dataclass(frozen=True)
class EmbeddedDataSettings:
    private_records: PositiveInt = field(default=150, metadata={
        "help": "Synthetic clinical records generated for training, pooled across clients before partitioning."})
    heldout_records: PositiveInt = field(default=150, metadata={
        "help": "Records from the same distribution never trained on: the non-members and the utility set."})
    canary_repetitions: tuple[PositiveInt, ...] = field(default=(1, 4, 16), metadata={
        "help": "How many copies of a canary are inserted, one group of canaries per count (exposure against repetition)."})
    canaries_per_repetition: NonNegativeInt = field(default=2, metadata={
        "help": "Canaries per repetition count (each also gets a never-inserted reference twin); 0 = no canaries."})
    audit_canaries: NonNegativeInt = field(default=0, metadata={
        "help": "Canaries for the one-run audit, each inserted once with probability 1/2; 0 = no one-run audit."})

    def __post_init__(self):
        check_fields(self, "data.embedded.")


@dataclass(frozen=True)
class FileDataSettings:
    path: str = field(default="", metadata={
        "help": "Alpaca-style .json or .jsonl file, relative to the config's folder; needed with source = \"file\"."})
    instruction_field: str = field(default="instruction", metadata={"help": "Key of the instruction in each record."})
    input_field: str = field(default="input", metadata={"help": "Key of the optional input (context) in each record."})
    output_field: str = field(default="output", metadata={"help": "Key of the response in each record."})
    category_field: str = field(default="category", metadata={
        "help": "Key of the category the Dirichlet partition splits on (records without one share a category)."})
    heldout_fraction: OpenUnitInterval = field(default=0.2, metadata={
        "help": "Share of the file's records kept out of training (at least 1): the non-members and the utility set."})

    def __post_init__(self):
        check_fields(self, "data.file.")


@dataclass(frozen=True)
class DataSettings:
    source: Literal["embedded", "file"] = field(default="embedded", metadata={
        "help": "\"embedded\" (synthetic clinical records with planted canaries) or \"file\" ([data.file])."})
    embedded: EmbeddedDataSettings = field(default_factory=EmbeddedDataSettings, metadata={
        "help": "The synthetic data (source = \"embedded\")."})
    file: FileDataSettings = field(default_factory=FileDataSettings, metadata={
        "help": "Your own records (source = \"file\")."})

    def __post_init__(self):
        check_fields(self, "data.")
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
