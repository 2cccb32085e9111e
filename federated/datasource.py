"""Turn data settings into a `FederatedData`: the embedded generator or a user's Alpaca file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from fedleak.federated.canary_designs import DESIGNS, RANDOM, design_of, make_designed_audit_canaries
from fedleak.federated.data import FederatedData, generate_records, make_canaries, with_canaries
from fedleak.common.errors import FedleakError, did_you_mean
from fedleak.common.params import NonNegativeInt, OpenUnitInterval, PositiveInt, check_fields
from fedleak.federated.dataquality import drop_duplicates, drop_overlap
from fedleak.federated.loader import DEFAULT_CATEGORY, DataFile, FieldNames, read_data_file
from fedleak.federated.partition import partition, split_plan
from fedleak.federated.safety import safety_records
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
    audit_canary_designs: tuple[Literal["random", "rare_tokens", "unseen_bigrams"], ...] = field(
        default=(RANDOM,), metadata={
            "help": "Kinds of audit canary, each with its own audit_canaries canaries and its own one-run bound "
                    "(Panda et al. 2025): \"random\" (six digits), \"rare_tokens\" (six symbols the pretraining "
                    "corpus never has) and \"unseen_bigrams\" (six everyday corpus words in random order). The "
                    "first gives one_run_epsilon_lb."})

    safety_records: NonNegativeInt = field(default=0, metadata={
        "help": "Harmful requests answered with a refusal added to each client's records (safety-alignment data, "
                "`federated/safety.py`): what a safety attack (`harmful_compliance`) works against; 0 = none. Never "
                "membership candidates."})

    def __post_init__(self):
        check_fields(self, "data.embedded.")
        designs = self.audit_canary_designs
        if not designs or len(set(designs)) < len(designs):
            raise FedleakError(f"data.embedded.audit_canary_designs = {list(designs)}: list each design once, at "
                               f"least one, among {list(DESIGNS)}")


@dataclass(frozen=True)
class FileDataSettings:
    path: str = field(default="", metadata={
        "help": "Alpaca-style .json or .jsonl file, relative to the config's folder; needed with source = \"file\"."})
    instruction_field: str = field(default="instruction", metadata={"help": "Key of the instruction in each record."})
    input_field: str = field(default="input", metadata={"help": "Key of the optional input (context) in each record."})
    output_field: str = field(default="output", metadata={"help": "Key of the response in each record."})
    category_field: str = field(default="category", metadata={
        "help": "Key of the category the Dirichlet partition splits on (records without one share a category). "
                "A name other than the default must occur in some record; with fewer than two categories the "
                "split falls back to iid in equal sizes, and results.json's data.split says so."})
    heldout_fraction: OpenUnitInterval = field(default=0.2, metadata={
        "help": "Share of the file's records kept out of training (at least 1): the non-members and the utility set."})
    identifiers_field: str = field(default="", metadata={
        "help": "Key of a list of the record's secret strings (names, account numbers): the `pii` attack counts "
                "them and the report redacts them; \"\": none. It must occur in some record."})
    identifier_patterns: tuple[str, ...] = field(default=(), metadata={
        "help": "Regexes (Python syntax) whose matches in a record's text are its identifiers: `pii` counts them "
                "and the report redacts them, e.g. ['\\b\\d{3}-\\d{2}-\\d{4}\\b'] (TOML '...' strings keep "
                "backslashes as written)."})

    def __post_init__(self):
        check_fields(self, "data.file.")
        for i, pattern in enumerate(self.identifier_patterns):
            key = f"data.file.identifier_patterns[{i}] = {pattern!r}"
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise FedleakError(f"{key} is not a valid regex ({exc}): fix the pattern (in TOML write it "
                                   f"in single quotes so backslashes stay as written)") from None
            if compiled.search(""):
                raise FedleakError(f"{key} matches the empty text, so it would mark every position: make it "
                                   f"match at least one character")


FIELD_DEFAULTS = {f.name: f.default for f in fields(FileDataSettings)}


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


def _file_records(f: FileDataSettings, path: Path, method: str,
                  warnings: list[str]) -> tuple[DataFile, list, int, str | None]:
    """The file's records with exact duplicates dropped, the count dropped, and why a Dirichlet split has
    no category to skew on (None when it has one); problems found go to `warnings` (missing categories
    only under the `method` "dirichlet": an iid split never reads them)."""
    loaded = read_data_file(path, FieldNames(instruction=f.instruction_field, input=f.input_field,
                                             output=f.output_field, category=f.category_field,
                                             identifiers=f.identifiers_field), patterns=f.identifier_patterns)
    n = len(loaded.records)
    for name, found, default in (("category_field", loaded.with_category, FIELD_DEFAULTS["category_field"]),
                                 ("identifiers_field", loaded.with_identifiers, "")):
        value = getattr(f, name)
        if value and value != default and not found:  # a name the user gave that no record holds: a typo
            raise FedleakError(f"{path}: data.file.{name} = {value!r} is in none of the {n} records: "
                               f"{did_you_mean(value, loaded.keys)}use one of the records' keys: "
                               f"{', '.join(loaded.keys)}")
    no_category = None
    if method == "dirichlet" and not loaded.with_category:
        no_category = f"no record has the field {f.category_field!r}"
        warnings.append(f"{path}: none of the {n} records has the category field {f.category_field!r}: a Dirichlet "
                        f"split would only draw the clients' sizes, so a Dirichlet partition falls back to iid "
                        f"(equal sizes): set data.file.category_field to the field that holds each record's topic")
    elif method == "dirichlet" and loaded.with_category < n:
        warnings.append(f"{path}: {n - loaded.with_category} of {n} records have no {f.category_field!r} field: they "
                        f"share the category {DEFAULT_CATEGORY!r} in the split")
    records, dropped = drop_duplicates(loaded.records)
    if dropped:
        warnings.append(f"{path}: dropped {dropped} exact duplicate records (same instruction, input and output "
                        f"after whitespace normalisation) before the held-out split, so no text is both a member "
                        f"and a non-member; {len(records)} of {n} remain")
    return loaded, records, dropped, no_category


def prepare_data(settings: DataSettings, *, seed: int, num_clients: int, partition_method: str,
                 alpha: float, min_records: int, base_dir: Path = Path(".")) -> FederatedData:
    """The seed's data: exact duplicates dropped, held-out split, partition (with the fallback of
    `split_plan`), canaries; `quality` and `warnings` say what was found and done."""
    warnings: list[str] = []
    no_category = None
    if settings.source == "embedded":
        s = settings.embedded
        pool, dropped = drop_duplicates(generate_records(s.private_records, seed=seed, purpose="private", private=True))
        heldout, dropped_heldout = drop_duplicates(generate_records(s.heldout_records, seed=seed, purpose="heldout",
                                                                    private=True))
        heldout, overlap = drop_overlap(heldout, pool)  # a held-out text that is also trained on is no non-member
        dropped += dropped_heldout + overlap
        if dropped:
            warnings.append(f"data.embedded: dropped {dropped} generated records whose text repeats another's "
                            f"({overlap} held-out records equal to training records)")
        quality = {"source": "embedded"}
    else:
        f = settings.file
        path = Path(f.path) if Path(f.path).is_absolute() else base_dir / f.path
        loaded, records, dropped, no_category = _file_records(f, path, partition_method, warnings)
        order = numpy_rng(seed, "heldout-split").permutation(len(records))
        n_heldout = max(1, round(f.heldout_fraction * len(records)))
        if n_heldout >= len(records):
            raise FedleakError(f"{path}: {len(records)} distinct records leave none for training after the held-out "
                               f"split (data.file.heldout_fraction = {f.heldout_fraction}): add records")
        heldout = [records[int(i)] for i in order[:n_heldout]]
        pool = [records[int(i)] for i in order[n_heldout:]]
        quality = {"source": "file", "file": {
            "path": f.path, "sha256": loaded.sha256, "records": len(loaded.records),
            "fields": {"instruction": f.instruction_field, "input": f.input_field, "output": f.output_field,
                       "category": f.category_field, "identifiers": f.identifiers_field or None},
            "records_with_category": loaded.with_category,
            "identifier_patterns": list(f.identifier_patterns),
            "records_with_identifiers": sum(bool(r.identifiers) for r in records)}}
    labels = [r.category for r in pool]
    plan = split_plan(labels, partition_method, alpha=alpha, reason=no_category)
    if plan["method"] != plan["requested"] and no_category is None:
        warnings.append(f"federation.partition = 'dirichlet' has no category to skew on ({plan['reason']}): the "
                        f"records are split iid in equal sizes instead")
    clients = partition(pool, labels, method=plan["method"], num_clients=num_clients,
                        alpha=alpha, min_records=min_records, rng=numpy_rng(seed, "partition"))
    canaries, reference, audit = [], [], []
    if settings.source == "embedded":
        s = settings.embedded
        if s.safety_records:  # each client its own draw of aligned data
            clients = [c + safety_records(s.safety_records, seed=seed, purpose=f"client-{i}", answer="refusal")
                       for i, c in enumerate(clients)]
            quality["safety_records_per_client"] = s.safety_records
        if s.canaries_per_repetition:
            canaries, reference = make_canaries(seed=seed, repetitions=s.canary_repetitions,
                                                per_repetition=s.canaries_per_repetition, num_clients=num_clients)
        audit = make_designed_audit_canaries(s.audit_canaries, s.audit_canary_designs, seed=seed,
                                             num_clients=num_clients, taken=canaries + reference)
        if audit and list(s.audit_canary_designs) != [RANDOM]:  # the summary's audit_canaries counts them all
            quality["audit_canary_designs"] = {d: {"canaries": sum(design_of(c) == d for c in audit),
                                                   "inserted": sum(c.repetitions for c in audit if design_of(c) == d),
                                                   "design": DESIGNS[d]}
                                               for d in s.audit_canary_designs}
        if canaries or audit:
            clients = with_canaries(clients, canaries + [c for c in audit if c.repetitions], seed=seed)
    quality.update({"duplicates_dropped": dropped, "split": plan})
    return FederatedData(clients=clients, heldout=heldout, canaries=canaries, reference_canaries=reference,
                         audit_canaries=audit, quality=quality, warnings=warnings)
