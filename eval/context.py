"""What every training and attack of one seed shares, built once per process: the seed's federated
data, the resolved base model and the attacker's environment (`SeedContext`, `seed_context`), and the
base model's resolution itself (`resolve_model`)."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from fedleak.attacks.base import AttackEnvironment
from fedleak.attacks.membership.stats import scorable
from fedleak.common.io import sha256_file
from fedleak.eval.config import RunConfig
from fedleak.federated.data import FederatedData, Record
from fedleak.federated.datasource import prepare_data
from fedleak.federated.model import build_embedded


def resolve_model(config: RunConfig) -> tuple[str, dict]:
    """The base model's folder or id, and facts about it for the results file."""
    if config.model.name != "embedded":
        return config.model.name, {"name": config.model.name}
    path = build_embedded(config.model.embedded)
    build = json.loads((path / "fedleak_build.json").read_text())
    return str(path), {"name": "embedded", "path": str(path), "parameters": build["parameters"],
                       "vocab": build["vocab"], "build_seconds": round(build["build_seconds"], 1),
                       "pretrain_final_loss": build["pretrain_final_loss"]}


@dataclass
class SeedContext:
    """What every training and attack of one seed shares: the data, the model, the attack environment."""

    config: RunConfig  # config.for_seed(seed)
    data: FederatedData
    data_sha256: str | None  # a user data file's content
    env: AttackEnvironment | None = None
    scorable_cache: dict = field(default_factory=dict)

    @functools.cached_property
    def model_ref(self) -> str:
        """Resolved on first use: a dry run never builds the embedded model."""
        return resolve_model(self.config)[0]

    def scorable(self, records: list[Record], tokenizer) -> list[Record]:
        """Records with a scored token (a prompt filling max_length has no loss): the others leave every split."""
        key = tuple(r.record_id for r in records)
        if key not in self.scorable_cache:
            fed = self.config.federation
            self.scorable_cache[key] = scorable(records, tokenizer, max_length=fed.max_length,
                                                response_only=fed.response_only_loss)
        return self.scorable_cache[key]

    def environment(self, tokenizer) -> AttackEnvironment:
        if self.env is None:
            cfg, fed, data = self.config, self.config.federation, self.data
            self.env = AttackEnvironment(
                tokenizer=tokenizer, seed=cfg.seed, max_length=fed.max_length, response_only=fed.response_only_loss,
                batch_size=cfg.attack.batch_size, base_model_ref=self.model_ref, lora=cfg.model.lora,
                allow_download=cfg.model.allow_download,
                # The attacker's pool: every candidate it scores (members, held-out records, audit canaries).
                population=data.members + data.heldout + [c.record(0) for c in data.audit_canaries],
                train=dataclasses.replace(fed.train_settings(), epochs=fed.rounds * fed.local_epochs))
        return self.env


def _data_path(config: RunConfig, base_dir: Path) -> Path | None:
    if config.data.source != "file":
        return None
    path = Path(config.data.file.path)
    return path if path.is_absolute() else base_dir / path


_CONTEXTS: dict[tuple, SeedContext] = {}  # per process: a worker keeps its seed's data between trainings


def seed_context(config: RunConfig, seed: int, base_dir: Path) -> SeedContext:
    """The seed's shared context (built on first use; `base_dir` resolves a relative data file)."""
    key = (config.hash(), seed, str(base_dir))
    if key not in _CONTEXTS:
        cfg = config.for_seed(seed)
        fed = cfg.federation
        data = prepare_data(cfg.data, seed=seed, num_clients=fed.clients, partition_method=fed.partition,
                            alpha=fed.alpha, min_records=fed.min_records_per_client, base_dir=base_dir)
        path = _data_path(cfg, base_dir)
        _CONTEXTS[key] = SeedContext(cfg, data, sha256_file(path) if path else None)
    return _CONTEXTS[key]
