"""The run folder's cache: the keys that say what produced each cached file (a hash of fedleak's code,
the plug-ins, the base model, the data and the settings that matter), reading cached JSON back, and
the lock that keeps one fedleak process per output folder. A rerun (after a crash or kill -9, or with
one more attack) redoes only the files whose key changed:

    trainings/<stem>/round-XXXX/...      checkpoints (federated/checkpoint.py)
    trainings/<stem>/training.json       key, history, costs: the folder appears complete or not at all
    trainings/<stem>/evaluation.json     key, utility, poisoning trigger rates
    trainings/<stem>/attacks/<attack>.json   key, the attack's cells on that training
    shadows/lira-shadows-<key>.safetensors   LiRA's shadow statistics, shared by every training of a seed
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path

from fedleak import __version__
from fedleak.common.errors import FedleakError
from fedleak.eval.config import RunConfig, plain
from fedleak.eval.context import SeedContext
from fedleak.eval.plan import TrainingUnit

TRAINING_FILE, EVALUATION_FILE, ATTACKS_DIR, SHADOWS_DIR = "training.json", "evaluation.json", "attacks", "shadows"
LOCK_FILE = ".fedleak.lock"
CODE_FOLDERS = ("attacks", "common", "defenses", "eval", "federated")  # what trains, evaluates and attacks (not reports/)


def cache_key(*parts) -> str:
    """A short hash of JSON-able parts: what produced a cached file."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_files(module: str) -> list[Path]:
    """The Python files of a module: its file, or every .py file of a package."""
    import importlib.util
    import sys

    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None) or importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    if spec.submodule_search_locations:  # a package: an edit to any of its modules counts
        return sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.py"))
    return [Path(spec.origin)]


def _sha256_of(files: list[Path], root: Path | None = None) -> str | None:
    """sha256 of one file's bytes (what `sha256sum` prints), or of several files' names and bytes."""
    if not files:
        return None
    if len(files) == 1 and root is None:
        return hashlib.sha256(files[0].read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root) if root and path.is_relative_to(root) else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _distribution_of(module: str) -> tuple[str | None, str | None]:
    """The installed distribution (name, version) that provides a module; (None, None) for a local file."""
    from importlib import metadata

    names = metadata.packages_distributions().get(module.partition(".")[0], [])
    if not names:
        return None, None
    return names[0], metadata.version(names[0])


def plugin_records(plugins: tuple[str, ...] = ()) -> list[dict]:
    """Every plug-in a run loads, however it was loaded: the config's `plugins` modules and the modules
    of every installed entry point of a fedleak group. Each: module, how it was loaded, its
    distribution and version (None for a module beside the config) and the sha256 of its source."""
    from fedleak.federated.registry import plugin_entry_points

    records: dict[str, dict] = {}
    for module in plugins:
        distribution, version = _distribution_of(module)
        records[module] = {"module": module, "loaded_by": "plugins", "distribution": distribution,
                           "version": version}
    for ep in plugin_entry_points():
        if ep.module.startswith("fedleak.") or ep.module in records:
            continue  # fedleak's own code is fingerprinted whole; a config module is already listed
        dist = getattr(ep, "dist", None)
        records[ep.module] = {"module": ep.module, "loaded_by": f"entry point {ep.group}:{ep.name}",
                              "distribution": dist.name if dist else None, "version": dist.version if dist else None}
    for module, record in records.items():
        try:
            record["sha256"] = _sha256_of(_source_files(module))
        except (ImportError, ValueError):  # a broken entry point: its registry reports it when it loads
            record["sha256"] = None
    return [records[m] for m in sorted(records)]


@functools.cache
def code_fingerprint(plugins: tuple[str, ...] = ()) -> str:
    """sha256 of fedleak's training, evaluation and attack code and of every plug-in the run loads (the
    config's `plugins` and installed entry points, with their versions): an edited or reinstalled
    algorithm, defense or attack invalidates what it produced (results.json's git_commit would lie)."""
    root = Path(__file__).resolve().parent.parent
    own = _sha256_of(sorted(p for folder in CODE_FOLDERS for p in (root / folder).rglob("*.py")), root)
    return cache_key(own, plugin_records(plugins))


def utility_key(config: RunConfig) -> dict:
    """The utility settings that change what is measured (the fit threshold only judges it)."""
    return {k: v for k, v in plain(config.utility).items() if k != "fit_perplexity"}


def _resolved_dtype(config: RunConfig) -> str:
    from fedleak.federated.model import resolve_device, resolve_dtype

    try:
        return str(resolve_dtype(config.model.load_dtype, resolve_device(config.model.device)))
    except FedleakError:  # a device this machine lacks: the run itself says so; the key keeps the setting
        return config.model.load_dtype


def model_fingerprint(config: RunConfig) -> dict:
    """What the base model is: the embedded build's settings, or the name plus, for a local folder, its
    files' names and sizes (reading gigabytes of weights to hash them would cost more than it saves).
    A hub id is taken at its name: pin a revision by downloading it to a folder."""
    model = plain(config.model)
    # What changes the numbers beyond float order (attention kernel and checkpointing do not); "auto"
    # dtypes are resolved, as they differ between a CPU and a GPU.
    method = model["adaptation"]  # its table only: the other methods' tables do not change this training
    out = {"name": model["name"], method: model[method], "dtype": _resolved_dtype(config),
           **{k: model[k] for k in ("quantization", "prompt_format")}}
    if method != "lora":  # LoRA trainings keep the keys they had before other methods existed
        out["adaptation"] = method
    if model["name"] == "embedded":
        out["embedded"] = model["embedded"]
    elif Path(model["name"]).is_dir():
        out["files"] = sorted((p.name, p.stat().st_size) for p in Path(model["name"]).iterdir() if p.is_file())
    return out


def data_fingerprint(ctx: SeedContext) -> dict:
    """The active data source's settings and, for a user file, its content's sha256."""
    data = plain(ctx.config.data)
    return {"source": data["source"], data["source"]: data[data["source"]], "file_sha256": ctx.data_sha256}


def training_key(ctx: SeedContext, unit: TrainingUnit) -> str:
    """The key of a training's checkpoints: code, seed, model, data, federation and the unit's components."""
    cfg = ctx.config
    return cache_key("training", __version__, code_fingerprint(cfg.plugins), cfg.seed, model_fingerprint(cfg),
                     data_fingerprint(ctx), plain(cfg.federation), plain(unit.algorithm), plain(unit.defense),
                     plain(unit.scenario) if unit.scenario else None)


def evaluation_key(ctx: SeedContext, unit: TrainingUnit, train_key: str) -> str:
    """The key of a training's evaluation: its training, the utility and poisoning settings, the scenarios' attacks
    (the backdoors and safety attacks a clean training is measured for)."""
    cfg = ctx.config
    backdoors = sorted(a.label for s in cfg.matrix.scenarios for a in s.attacks)
    return cache_key("evaluation", train_key, utility_key(cfg), plain(cfg.poisoning), backdoors)


def read_json(path: Path) -> dict | None:
    """A cached file's content, or None when it is missing, half-written or corrupt (then it is redone)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) else None


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """One fedleak process per output folder: a second would train into the same cache. The kernel drops
    the lock when its holder dies, kill -9 included."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FedleakError(f"{out_dir}: another fedleak process (pid {handle.read().strip() or '?'}) is using "
                               f"this output folder: wait for it to finish or pass another --out") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
