"""The run configuration: a TOML file checked up front, so nothing runs on an invalid config.

Owns the top-level settings tables ([model], [utility], [attack], [poisoning]; [data] and
[federation] are the backbone's dataclasses), `RunConfig`, loading (plug-ins first) and the checks
across tables. Each table maps onto a dataclass whose fields carry a help note and a declared type
and range (`fedleak.common.params`); `[matrix]` is parsed by `eval/matrix_config.py`. Every error
is one line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fedleak.common.errors import FedleakError, did_you_mean
from fedleak.common.names import CLEAN, OBSERVERS
from fedleak.common.params import NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt, Range, build, check_fields, checked
from fedleak.eval.execution import EngineSettings, ExecutorSettings
from fedleak.eval.matrix_config import ComponentSpec, MatrixSettings, ScenarioSpec, build_defense, component_spec
from fedleak.federated.adapters import AdapterSettings, LoraSettings
from fedleak.federated.methods import FullSettings, IA3Settings, PrefixTuningSettings, PromptTuningSettings
from fedleak.federated.datasource import DataSettings
from fedleak.federated.embedded import EmbeddedModelConfig
from fedleak.federated.model import check_device_name, missing_folder
from fedleak.federated.rounds import FederationSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Imported by eval's runners from here (they need no more of the matrix's parsing than these).
__all__ = ["RunConfig", "AttackSettings", "ComponentSpec", "build_defense", "component_spec",
           "load_config", "load_plugins", "parse_config", "plain"]


@dataclass(frozen=True)
class ModelSettings:
    name: str = field(default="embedded", metadata={
        "help": "\"embedded\" (the tiny Llama built and cached locally), a Hugging Face model id, or a local folder."})
    allow_download: bool = field(default=False, metadata={
        "help": "Let a Hugging Face id download from the hub; off: offline only (air-gapped machines fail otherwise)."})
    embedded: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig, metadata={
        "help": "How the embedded model is built (used when name = \"embedded\")."})
    adaptation: Literal["lora", "ia3", "prompt_tuning", "prefix_tuning", "full"] = field(default="lora", metadata={
        "help": "The method every algorithm trains: \"lora\", \"ia3\", \"prompt_tuning\" (a soft prompt), "
                "\"prefix_tuning\" (trained keys and values in every layer) or \"full\" (every base parameter, "
                "for small models); its settings are the table of the same name."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA's settings (model.adaptation = \"lora\")."})
    ia3: IA3Settings = field(default_factory=IA3Settings, metadata={"help": "IA3's settings (model.adaptation = \"ia3\")."})
    prompt_tuning: PromptTuningSettings = field(default_factory=PromptTuningSettings, metadata={
        "help": "Prompt tuning's settings (model.adaptation = \"prompt_tuning\")."})
    prefix_tuning: PrefixTuningSettings = field(default_factory=PrefixTuningSettings, metadata={
        "help": "Prefix tuning's settings (model.adaptation = \"prefix_tuning\")."})
    full: FullSettings = field(default_factory=FullSettings, metadata={
        "help": "Full fine-tuning's settings (model.adaptation = \"full\")."})
    device: str = field(default="auto", metadata={
        "help": "\"auto\" (the first CUDA GPU, else the CPU), \"cpu\", \"cuda\", \"cuda:N\" or \"mps\"."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "The base weights' dtype; \"auto\": bfloat16 on a GPU that supports it (else float16), float32 on "
                "the CPU. Adapters and their (per-sample) gradients stay float32."})
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(default="sdpa", metadata={
        "help": "Attention kernel: sdpa (eager for an architecture without it), eager, or flash_attention_2 "
                "(flash-attn on a GPU)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory for long sequences, about 30% slower."})
    quantization: Literal["none", "4bit", "8bit"] = field(default="none", metadata={
        "help": "Load the base quantised with bitsandbytes (CUDA only, extra fedleak[gpu]): \"4bit\" is QLoRA's "
                "NF4 with double quantisation and compute in model.dtype."})
    prompt_format: Literal["auto", "chat", "alpaca"] = field(default="auto", metadata={
        "help": "How records become prompts: \"chat\" the tokenizer's chat template, \"alpaca\" the Alpaca "
                "template, \"auto\" chat when the tokenizer has a template."})

    @property
    def adapter(self) -> AdapterSettings:
        """The settings of the method `adaptation` names."""
        return getattr(self, self.adaptation)

    @property
    def load_dtype(self) -> str:
        """`dtype` as the base loads: "auto" is float32 for full fine-tuning (see `FullSettings`)."""
        return "float32" if self.adaptation == "full" and self.dtype == "auto" else self.dtype

    def load_options(self) -> dict:
        """`federated.model.load_base_model`'s keyword arguments for this model."""
        return {"allow_download": self.allow_download, "device": self.device, "dtype": self.load_dtype,
                "attn_implementation": self.attn_implementation, "quantization": self.quantization,
                "gradient_checkpointing": self.gradient_checkpointing, "prompt_format": self.prompt_format}

    def __post_init__(self):
        check_fields(self, "model.")
        if not self.name:
            raise FedleakError("model.name is empty: use 'embedded', a Hugging Face id or a local folder")
        if (problem := check_device_name(self.device)) is not None:
            raise FedleakError(problem)
        if self.adaptation == "full" and (self.dtype in ("bfloat16", "float16") or self.quantization != "none"):
            what = (f"model.quantization = {self.quantization!r}" if self.quantization != "none"
                    else f"model.dtype = {self.dtype!r}")
            raise FedleakError(f"{what}: model.adaptation = 'full' trains the base weights themselves, which must be "
                               f"float32 (AdamW's steps on 16-bit weights are lost below their precision; quantised "
                               f"ones cannot train): set model.dtype = \"float32\" and model.quantization = \"none\", "
                               f"or use a parameter-efficient method")
        if self.name == "embedded" and self.prompt_format == "chat":
            raise FedleakError("model.prompt_format = 'chat': the embedded model's tokenizer has no chat template "
                               "(it is pretrained on the Alpaca template): use 'auto' or 'alpaca'")
        problem = missing_folder(self.name) if self.name != "embedded" else None
        if problem:  # found with the config's other errors, before any data or model work
            raise FedleakError(problem)


@dataclass(frozen=True)
class PoisoningSettings:
    """How the poisoned models are measured: backdoor prompts (held-out records, with and without
    the trigger) answered greedily."""

    prompts: PositiveInt = field(default=32, metadata={
        "help": "Held-out records turned into triggered and clean prompts (the ASR's denominator)."})
    batch_size: PositiveInt = field(default=32, metadata={"help": "Prompts answered per generation batch."})

    def __post_init__(self):
        check_fields(self, "poisoning.")


@dataclass(frozen=True)
class UtilitySettings:
    records: PositiveInt = field(default=40, metadata={"help": "Held-out records each view's utility is measured on."})
    max_new_tokens: PositiveInt = field(default=64, metadata={
        "help": "Length (tokens) of the greedy answers scored with ROUGE-L."})
    batch_size: PositiveInt = field(default=16, metadata={"help": "Records per batch (loss and generation)."})
    fit_perplexity: PositiveFloat = field(default=100.0, metadata={
        "help": "Held-out perplexity above which the model does not fit the data: when the base model and every "
                "clean training's views stay above it, the report warns that chance-level numbers show no privacy."})

    def __post_init__(self):
        check_fields(self, "utility.")


@dataclass(frozen=True)
class AttackSettings:
    """Settings every attack cell shares: scoring batches, bootstrap and audit."""

    batch_size: PositiveInt = field(default=32, metadata={"help": "Records per forward pass when scoring."})
    bootstrap: NonNegativeInt = field(default=1000, metadata={
        "help": "Resamples for the AUC's confidence interval; 0 = no interval."})
    confidence: OpenUnitInterval = field(default=0.95, metadata={
        "help": "Level of the AUC intervals, the audit's Clopper-Pearson bounds and the poisoning rates' Clopper-Pearson intervals."})
    delta: Annotated[float, Range(ge=0, lt=1)] = field(default=1e-5, metadata={
        "help": "Delta of the empirical epsilon when the training has no accountant (with one: the accountant's)."})
    public_file: str = field(default="", metadata={
        "help": "Alpaca-style JSON or JSONL file of records the attacker holds and no client trained on, relative to the "
                "config's folder: ReCaLL's prefixes, DC-PDD's token frequencies, SPV-MIA's self-prompts. \"\": the "
                "embedded generator's public records (synthetic clinical text naming no patient)."})
    public_records: PositiveInt = field(default=400, metadata={
        "help": "Records of the attacker's public pool: the first of public_file's, or this many generated ones."})

    def __post_init__(self):
        check_fields(self, "attack.")


@dataclass(frozen=True)
class RunConfig:
    plugins: tuple[str, ...] = field(default=(), metadata={
        "help": "Modules imported first (a my_defense.py beside the config works); they register components."})
    seed: NonNegativeInt = field(default=0, metadata={"help": "Seeds data, partition, training and attacks."})
    seeds: tuple[NonNegativeInt, ...] = field(default=(), metadata={
        "help": "Several seeds: every training repeats per seed and the report shows means with intervals "
                "(seed is then unused)."})
    out: str = field(default="", metadata={
        "help": "Output folder, relative to the working directory; `fedleak run --out` overrides; \"\": runs/<config name>."})
    model: ModelSettings = field(default_factory=ModelSettings, metadata={"help": "The base model and its adapter."})
    data: DataSettings = field(default_factory=DataSettings, metadata={"help": "The records the federation trains on."})
    federation: FederationSettings = field(default_factory=FederationSettings, metadata={
        "help": "Clients, rounds and local training."})
    matrix: MatrixSettings = field(default_factory=MatrixSettings, metadata={
        "help": "What trains and what attacks it."})
    utility: UtilitySettings = field(default_factory=UtilitySettings, metadata={"help": "How utility is measured."})
    attack: AttackSettings = field(default_factory=AttackSettings, metadata={"help": "What every attack cell shares."})
    poisoning: PoisoningSettings = field(default_factory=PoisoningSettings, metadata={
        "help": "How poisoned models are measured."})
    engine: EngineSettings = field(default_factory=EngineSettings, metadata={
        "help": "Where the federated trainings run (in process or on Flower)."})
    executor: ExecutorSettings = field(default_factory=ExecutorSettings, metadata={
        "help": "Where the matrix's trainings and attack cells run (this machine's processes or a Ray cluster)."})

    def __post_init__(self):
        check_fields(self)
        if len(set(self.seeds)) != len(self.seeds):
            raise FedleakError(f"seeds = {list(self.seeds)} repeats a seed: list each once")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    def for_seed(self, seed: int) -> "RunConfig":
        """The config of one seed's trainings (everything seeded reads `seed`)."""
        return dataclasses.replace(self, seed=seed, seeds=())

    def to_dict(self) -> dict:
        return plain(self)

    def hash(self) -> str:
        """sha256 of the whole config (the training and attack caches key only the parts that matter)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plain(obj):
    if isinstance(obj, ComponentSpec) and obj.parts:
        return [plain(p) for p in obj.parts]
    if isinstance(obj, ComponentSpec):
        extra = {"observers": list(obj.observers)} if obj.observers else {}
        if obj.observers:
            extra["rounds"] = obj.rounds if isinstance(obj.rounds, str) else list(obj.rounds)
            extra["scenarios"] = list(obj.scenarios)
        return {"name": obj.name, **obj.kwargs, **extra}
    if isinstance(obj, ScenarioSpec):
        return {"name": obj.name, "attacks": [plain(a) for a in obj.attacks],
                **({"clients": list(obj.clients)} if obj.clients else {"fraction": obj.fraction}),
                "rounds": obj.rounds if isinstance(obj.rounds, str) else list(obj.rounds),
                **({"local_epochs": obj.local_epochs} if obj.local_epochs else {})}
    if dataclasses.is_dataclass(obj):  # a field may say how it is written back ("plain": the sweep's table)
        return {f.name: (f.metadata["plain"] if "plain" in f.metadata else plain)(getattr(obj, f.name))
                for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [plain(v) for v in obj]
    return obj


def parse_config(table: dict, where: str = "<config>", base_dir: Path | None = None, *,
                 methods_checked: bool = True) -> RunConfig:
    """The config a TOML table describes, checked (`methods_checked=False`: a sweep's variant, whose
    components that its adaptation method cannot run are left out rather than refused; `eval.sweep`)."""
    plugins = table.get("plugins", [])
    load_plugins(checked(plugins, tuple[str, ...], "plugins", where), where, base_dir)
    if "seed" in table and "seeds" in table:
        raise FedleakError(f"{where}: both seed and seeds are set: keep seeds = [...] (one seed: seed = N)")
    config = build(RunConfig, table, "", where)
    _check_combinations(config, where, methods=methods_checked)
    return config


def _check_rule_names(config: RunConfig, where: str, *, settings: bool = True) -> None:
    """A plain name (no glob character) in an include or exclude rule must name something on its axis:
    a typo would otherwise match nothing and silently keep (or drop) what the user meant."""
    axes = {"algorithm": config.matrix.algorithms, "defense": config.matrix.defenses,
            "attack": config.matrix.attacks}
    for kind in ("include", "exclude"):
        for i, rule in enumerate(getattr(config.matrix, kind)):
            for field_name in ("algorithm", "defense", "scenario", "setting", "attack", "observer"):
                pattern = getattr(rule, field_name)
                if field_name == "setting":
                    if not settings:  # a sweep's variant: the rules name the sweep's values, checked above it
                        continue
                    from fedleak.eval.sweep import label, settings_of

                    known = ['""', *(label(s) for s in settings_of(config)[1:])]  # "" is the configured one
                elif field_name == "scenario":
                    known = [CLEAN, *(s.name for s in config.matrix.scenarios)]
                elif field_name == "observer":
                    known = list(OBSERVERS)
                else:
                    known = list(dict.fromkeys(n for spec in axes[field_name] for n in (spec.name, spec.label)))
                for name in (pattern or "*").removeprefix("!").split("|"):  # each alternative of "a|b"
                    if not any(ch in name for ch in "*?[") and name not in known:
                        raise FedleakError(f"{where}: matrix.{kind}[{i}].{field_name} = {pattern!r} matches no "
                                           f"{field_name} of the matrix: {did_you_mean(name, known)}"
                                           f"known: {', '.join(known)}")


def _ruled_in(config: RunConfig, algorithm: ComponentSpec, defense: ComponentSpec, scenario: str) -> bool:
    """Whether the matrix's rules keep the configured settings' training (algorithm, defense, scenario)."""
    include, exclude = config.matrix.include, config.matrix.exclude
    return ((not include or any(r.covers(algorithm, defense, scenario) for r in include))
            and not any(not r.selects_cells and r.covers(algorithm, defense, scenario) for r in exclude))


def _check_not_late(rounds: str | tuple[int, ...], config: RunConfig, key: str) -> None:
    """Listed rounds (attacks probe them, malicious clients act in them) must exist in the federation."""
    late = [r for r in (() if isinstance(rounds, str) else rounds) if r > config.federation.rounds]
    if late:
        raise FedleakError(f"{key}: round {late[0]} is after the last round "
                           f"(federation.rounds = {config.federation.rounds}): remove it")


EMBEDDING_NAME = re.compile(r"embed|^wte$|^word_embeddings$|^shared$")  # input embeddings in common architectures


def _check_combinations(config: RunConfig, where: str, *, methods: bool = True) -> None:
    """Checks across tables: each defense against the federation it would run in, each attack and
    algorithm against the adaptation method (`methods`), each swept value against the whole config."""
    from fedleak.attacks.base import ATTACKS
    from fedleak.attacks.poisoning.harmful_compliance import HarmfulCompliance
    from fedleak.eval.sweep import attack_conflict, conflict_field, methods_of, settings_of
    from fedleak.federated.rounds import ALGORITHMS

    for i, spec in enumerate(config.matrix.attacks):
        _check_not_late(spec.rounds, config, f"{where}: matrix.attacks[{i}].rounds")
        if methods and (problem := attack_conflict(config, spec)):
            raise FedleakError(f"{where}: matrix.attacks[{i}]: {problem}")
    scenarios = [CLEAN, *(s.name for s in config.matrix.scenarios)]
    for i, algorithm in enumerate(config.matrix.algorithms):
        for j, defense in enumerate(config.matrix.defenses):
            found = conflict_field(config, algorithm, defense) if methods else None
            # Refused only where the rules would train it (the cut-out ones never run).
            if found and any(_ruled_in(config, algorithm, defense, name) for name in scenarios):
                field_name, problem = found
                raise FedleakError(f"{where}: matrix.{field_name}[{i if field_name == 'algorithms' else j}]: {problem}")
    settings_of(config, f"{where}: matrix.sweep")  # each swept value parsed with the whole config
    if config.model.gradient_checkpointing and "prefix_tuning" in methods_of(config):
        # transformers drops the cache in checkpointed layers while training, and a prefix lives in the cache
        raise FedleakError(f"{where}: model.adaptation = 'prefix_tuning' cannot train with model.gradient_checkpointing "
                           f"= true (transformers drops the key/value cache, which holds the prefix, in checkpointed "
                           f"layers): set it to false and lower federation.batch_size or federation.max_length if "
                           f"memory is short")
    _check_rule_names(config, where, settings=methods)
    known = [CLEAN, *(s.name for s in config.matrix.scenarios)]
    for i, spec in enumerate(config.matrix.attacks):
        for name in spec.scenarios:
            if name not in known:
                raise FedleakError(f"{where}: matrix.attacks[{i}].scenarios: unknown scenario {name!r}: "
                                   f"{did_you_mean(name, known)}known: {', '.join(known)}")
    clients = config.federation.clients
    for i, scenario in enumerate(config.matrix.scenarios):
        item = f"{where}: matrix.scenarios[{i}] ({scenario.name})"
        if any(c >= clients for c in scenario.clients):
            raise FedleakError(f"{item}.clients = {list(scenario.clients)}: ids go from 0 to {clients - 1} "
                               f"(federation.clients = {clients})")
        if len(scenario.malicious(num_clients=clients, seed=config.seed)) >= clients:
            raise FedleakError(f"{item}: every one of the {clients} clients would be malicious: "
                               f"lower the fraction or list fewer clients")
        _check_not_late(scenario.rounds, config, f"{item}.rounds")
        safety = [a.name for a in scenario.attacks if issubclass(ATTACKS.get(a.name), HarmfulCompliance)]
        if safety and config.data.source == "embedded" and not config.data.embedded.safety_records:
            raise FedleakError(f"{item}: {safety[0]} works against clients that learnt to refuse harmful requests, "
                               f"and data.embedded.safety_records = 0 gives them none: set it (e.g. 8 per client)")
    if not any(ALGORITHMS.get(a.name).federated for a in config.matrix.algorithms):
        if config.matrix.scenarios:
            raise FedleakError(f"{where}: matrix.scenarios need a federated algorithm (fedit, fedpit): "
                               f"non-federated baselines have no malicious clients")
        return
    targets = config.model.lora.target_modules if config.model.adaptation == "lora" else ()
    embeddings = [t for t in ((targets,) if isinstance(targets, str) else targets) if EMBEDDING_NAME.search(t)]
    for i, spec in enumerate(config.matrix.defenses):
        item = f"{where}: matrix.defenses[{i}]"
        dp_sgd = "dp_sgd" in {p.name for p in (spec.parts or (spec,))}
        if config.model.gradient_checkpointing and dp_sgd:
            # Opacus's hooks record no per-sample gradient through a recomputed forward pass.
            raise FedleakError(f"{item}: dp_sgd cannot run with model.gradient_checkpointing = true (Opacus gets no "
                               f"per-sample gradients through recomputed activations): set it to false and lower "
                               f"federation.batch_size or federation.max_length if memory is short")
        if embeddings and dp_sgd:
            # Caught before training by name; DPSGD.train_client checks the layers themselves.
            raise FedleakError(f"{item}: dp_sgd cannot train LoRA on the embedding layer {embeddings[0]!r} "
                               f"(Opacus has no per-sample gradients for it): remove it from "
                               f"model.lora.target_modules, or use dp_fedavg")
        try:
            build_defense(spec, item).check(clients_per_round=config.federation.clients_per_round)
        except FedleakError as exc:
            raise FedleakError(exc if str(exc).startswith(item) else f"{item}: {exc}") from None


def load_plugins(modules: tuple[str, ...], where: str, base_dir: Path | None = None) -> None:
    """Import plug-in modules (the config's folder first on the path, so a my_defense.py beside it works)."""
    import importlib

    if base_dir is not None and str(base_dir.resolve()) not in sys.path:
        sys.path.insert(0, str(base_dir.resolve()))
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise FedleakError(f"{where}: plugins[{i}] = {module!r}: no module named {exc.name!r}: install the "
                               f"plug-in or put {module}.py beside the config") from None
        except FedleakError as exc:
            raise FedleakError(f"{where}: plugins[{i}] = {module!r}: {exc}") from None
        except Exception as exc:  # the plug-in's own bug: name it in one line, not a traceback
            raise FedleakError(f"{where}: plugins[{i}] = {module!r} failed to import: "
                               f"{type(exc).__name__}: {exc}: fix the plug-in") from None


def load_config(path: str | Path) -> RunConfig:
    """Read, parse and check the TOML config at `path` (its plug-ins imported first).

    Raises:
        FedleakError: one line naming the file and the fix: not found, a folder, unreadable, not UTF-8
            text, invalid TOML, or any setting out of place.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedleakError(f"{path}: config file not found: give the path of a TOML file such as configs/quick.toml") from None
    except IsADirectoryError:
        raise FedleakError(f"{path}: is a folder, not a config file: give the path of a TOML file inside it, "
                           f"such as configs/quick.toml") from None
    except UnicodeDecodeError as exc:
        raise FedleakError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}): give a TOML "
                           f"text file, not a binary one") from None
    except OSError as exc:
        raise FedleakError(f"{path}: cannot be read ({exc.strerror or exc}): fix its permissions or give another "
                           f"config file") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FedleakError(f"{path}: invalid TOML ({exc}): fix the syntax") from None
    return parse_config(table, str(path), base_dir=path.parent)
