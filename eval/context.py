"""What every training and attack of one seed shares, built once per process: the seed's federated
data, the resolved base model and the attacker's environment (`SeedContext`, `seed_context`), and the
base model's resolution itself (`resolve_model`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fedleak.attacks.base import AttackEnvironment
from fedleak.attacks.membership.stats import scorable
from fedleak.eval.config import RunConfig
from fedleak.federated.data import FederatedData, Record, generate_records
from fedleak.federated.dataquality import truncation_counts, truncation_messages
from fedleak.federated.datasource import prepare_data
from fedleak.federated.embedded import build_embedded
from fedleak.federated.methods import with_method_lr

log = logging.getLogger("fedleak")


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
    base_dir: Path = Path(".")  # the config's folder: relative files are read from there

    @functools.cached_property
    def public(self) -> list[Record]:
        """The attacker's public pool (`attack.public_file`, else generated public records): records no client
        trained on, never scored as targets."""
        settings = self.config.attack
        if settings.public_file:
            from fedleak.federated.loader import load_alpaca

            path = Path(settings.public_file)
            return load_alpaca(path if path.is_absolute() else self.base_dir / path, id_prefix="public")[
                :settings.public_records]
        return generate_records(settings.public_records, seed=self.config.seed, purpose="attacker-public",
                                private=False)

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
                batch_size=cfg.attack.batch_size, base_model_ref=self.model_ref, adapter=cfg.model.adapter,
                allow_download=cfg.model.allow_download,
                # The attacker's pool: every candidate it scores (members, held-out records, audit canaries).
                population=data.members + data.heldout + [c.record(0) for c in data.audit_canaries],
                public=self.public,
                train=dataclasses.replace(with_method_lr(fed.train_settings(), cfg.model.adapter),
                                          epochs=fed.rounds * fed.local_epochs))
        return self.env


_CONTEXTS: dict[tuple, SeedContext] = {}  # per process: a worker keeps its seed's data between trainings


def seed_context(config: RunConfig, seed: int, base_dir: Path) -> SeedContext:
    """The seed's shared context (built on first use; `base_dir` resolves a relative data file)."""
    key = (config.hash(), seed, str(base_dir))
    if key not in _CONTEXTS:
        cfg = config.for_seed(seed)
        fed = cfg.federation
        data = prepare_data(cfg.data, seed=seed, num_clients=fed.clients, partition_method=fed.partition,
                            alpha=fed.alpha, min_records=fed.min_records_per_client, base_dir=base_dir)
        # The loader hashed the bytes it parsed: the cache keys name exactly the file that was read.
        _CONTEXTS[key] = SeedContext(cfg, data, (data.quality.get("file") or {}).get("sha256"), base_dir=Path(base_dir))
    return _CONTEXTS[key]


def unit_context(config: RunConfig, unit, base_dir: Path) -> SeedContext:
    """The context of one training: its seed's, under its swept setting's config (`eval.sweep.variant`),
    so data, federation and model settings, and every cache key read from them, are the variant's."""
    from fedleak.eval.sweep import variant

    return seed_context(variant(config, unit.setting), unit.seed, base_dir)


def check_data(config: RunConfig, base_dir: Path, seeds=None) -> list[SeedContext]:
    """Every seed's data (`seeds`, default the run's), loaded and checked before anything else (model
    build, output folder): a bad data file is one line in seconds, not after minutes of model build, and
    leaves nothing behind."""
    contexts = [seed_context(config, seed, base_dir) for seed in (config.run_seeds if seeds is None else seeds)]
    for ctx in contexts if config.attack.public_file else ():
        ctx.public  # a bad attack.public_file fails here, before anything is written
    return contexts


def load_tokenizer(config: RunConfig, model_ref: str):
    """The base model's tokenizer alone (no weights), as `load_base_model` sets it up; None when it cannot
    be loaded here (the training then reports why)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_ref, local_files_only=not config.model.allow_download)
    except (OSError, ValueError):
        return None
    from fedleak.federated.model import prepare_tokenizer

    # Truncation is counted in the run's prompt format, with the tokenizer set up as the loader does.
    return prepare_tokenizer(tokenizer, model_ref, config.model.prompt_format)


def built_model_ref(config: RunConfig) -> str | None:
    """The base model's folder when it exists without building anything (the dry run's view), else None."""
    if config.model.name != "embedded":
        return config.model.name if Path(config.model.name).is_dir() else None
    from fedleak.federated.embedded import cache_root

    cfg = config.model.embedded
    path = cache_root() / f"embedded-{cfg.cache_key()}"
    return str(path) if (path / "fedleak_build.json").exists() else None


def _where(config: RunConfig, base_dir: Path) -> str:
    """The data as messages name it: the data file's path as opened, or the embedded generator."""
    if config.data.source != "file":
        return "data.embedded"
    path = Path(config.data.file.path)
    return str(path if path.is_absolute() else base_dir / path)


def count_truncation(ctx: SeedContext, tokenizer, where: str) -> list[tuple[bool, str]]:
    """Count how federation.max_length cuts the seed's records (members and held-out, canaries aside),
    record it in the data summary (`truncation`) and return the (is_warning, message) lines."""
    fed = ctx.config.federation
    counts = truncation_counts(ctx.data.members + ctx.data.heldout, tokenizer, max_length=fed.max_length)
    ctx.data.quality["truncation"] = counts
    return truncation_messages(counts, where)


def report_data_quality(config: RunConfig, base_dir: Path, model_ref: str) -> None:
    """Log what preparing each seed's data found (once per message) and the truncation counts, with the
    resolved model's tokenizer; the counts enter results.json's `data`."""
    tokenizer = load_tokenizer(config, model_ref)
    said: set[str] = set()
    for ctx in check_data(config, base_dir):
        lines = [(True, w) for w in ctx.data.warnings]
        lines += count_truncation(ctx, tokenizer, _where(config, base_dir)) if tokenizer is not None else []
        for warn, message in lines:
            if message not in said:
                said.add(message)
                log.log(logging.WARNING if warn else logging.INFO, "%s", message)


def describe_data(config: RunConfig, base_dir: Path) -> list[str]:
    """The dry run's lines on the data: source, file hash, duplicates, split, warnings and truncation (when
    the base model's tokenizer is at hand without building the model)."""
    ref = built_model_ref(config)
    tokenizer = load_tokenizer(config, ref) if ref else None
    lines = []
    for ctx in check_data(config, base_dir):
        q = ctx.data.quality
        file = q.get("file")
        source = (f"{file['path']} (sha256 {file['sha256'][:16]}, {file['records']} records)" if file
                  else "data.embedded (synthetic)")
        split = q["split"]
        lines.append(f"data seed {ctx.config.seed}: {source}; {q['duplicates_dropped']} duplicates dropped; split "
                     f"{split['method']}" + (f" (not {split['requested']}: {split['reason']})" if "reason" in split
                                             else "") + f"; client sizes {[len(c) for c in ctx.data.clients]}, "
                     f"{len(ctx.data.heldout)} held out")
        lines += [f"  warning: {w}" for w in ctx.data.warnings]
        if tokenizer is None:
            lines.append("  truncation: not counted (the base model is not built or found yet: its tokenizer counts)")
        else:
            found = count_truncation(ctx, tokenizer, _where(config, base_dir))
            lines += [f"  {'warning: ' if warn else ''}{message}" for warn, message in found]
    return lines
