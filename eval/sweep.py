"""Sweeps: one more matrix axis over any scalar setting.

`[matrix.sweep]` maps a setting's dotted path to values, e.g. `"federation.alpha" = [0.1, 1.0, 10.0]`;
`[matrix] adaptations = ["lora", "prompt_tuning"]` is the sweep of `model.adaptation`. Each swept
setting varies alone, the others at their configured values (one factor at a time: a plot of leakage
against alpha reads off one line). A value equal to the configured one is the configured training
itself. Every value is checked by parsing the whole config with it (as if written in the file), enters
the training's cache key through that config, and labels the training: "fedit [alpha=0.1]".

A variant can make a component impossible (DP-SGD has no per-record gradient of a soft prompt; the
vocabulary attack reads LoRA factors): those trainings and cells are left out of that variant, and the dry run says so.
"""

from __future__ import annotations

from typing import Any

from fedleak.common.errors import FedleakError, did_you_mean

Setting = tuple[str, Any]  # (dotted path, value)
# What a variant may change: the trained method and its settings, and the federation. The data, the base
# model and the measurement settings are the run's own (its data checks, base-model utility, memory and
# position checks are made once, on the configured settings).
SWEEPABLE = ("model.adaptation", "model.lora.", "model.ia3.", "model.prompt_tuning.", "model.prefix_tuning.",
             "federation.")
NOT_SWEEPABLE = ("federation.max_length",)  # the run's position and memory checks read it


def parse_sweep(value, key: str, where: str) -> tuple[Setting, ...]:
    """`{"federation.alpha": [0.1, 1.0]}` -> ((path, (values...)), ...); shapes only (values are checked
    against the whole config by `variants`)."""
    if not isinstance(value, dict):
        raise FedleakError(f"{where}: {key} must be a table of \"table.setting\" = [values], e.g. "
                           f"\"federation.alpha\" = [0.1, 1.0, 10.0]")
    out = []
    for path, values in value.items():
        item = f"{key}.\"{path}\""
        if not path.startswith(SWEEPABLE) or path in NOT_SWEEPABLE:
            raise FedleakError(f"{where}: {item}: a sweep varies model.adaptation, a setting of model.lora, "
                               f"model.ia3, model.prompt_tuning, model.prefix_tuning or federation (not "
                               f"federation.max_length), e.g. \"federation.alpha\"; run another config for the rest")
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (bool, int, float, str)) for v in values)):
            raise FedleakError(f"{where}: {item} = {values!r}: give a non-empty list of numbers, texts or booleans")
        if len({repr(v) for v in values}) != len(values):
            raise FedleakError(f"{where}: {item} lists a value twice: list each once")
        out.append((path, tuple(values)))
    return tuple(out)


def label(setting: Setting) -> str:
    """The setting as the training's label shows it: "alpha=0.1", "adaptation=prompt_tuning"."""
    path, value = setting
    return f"{path.rsplit('.', 1)[-1]}={value}"


def _set(table: dict, path: str, value, where: str) -> None:
    node, parts = table, path.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = list(node) if isinstance(node, dict) else []
            raise FedleakError(f"{where}: unknown setting {'.'.join(parts[:depth + 1])!r}: "
                               f"{did_you_mean(part, known)}see docs/config.md")
        if depth == len(parts) - 1:
            if isinstance(node[part], (dict, list)):
                raise FedleakError(f"{where}: {path} is a table or list: sweep one of its scalar settings")
            node[part] = value
        else:
            node = node[part]


_VARIANTS: dict[tuple, Any] = {}


def variant(config, setting: Setting | None, where: str = "matrix.sweep"):
    """The config of one variant: `config` with the setting changed and no sweep of its own; `config`
    itself for None.

    Raises:
        FedleakError: the path names no setting, or the value is not one the setting accepts (the
            setting's own one-line error, prefixed with where the sweep lists it).
    """
    if setting is None:
        return config
    key = (config.hash(), setting[0], repr(setting[1]))
    if key not in _VARIANTS:
        from fedleak.eval.config import parse_config, plain

        table = plain(config)
        for key_ in ("sweep", "adaptations"):  # a variant sweeps nothing itself
            table["matrix"].pop(key_)
        if not table["seeds"]:  # plain() writes both; the file gives one
            del table["seeds"]
        else:
            del table["seed"]
        path, value = setting
        item = f"{where}.\"{path}\" = {value!r}"
        _set(table, path, value, item)
        try:
            _VARIANTS[key] = parse_config(table, item, methods_checked=False)
        except FedleakError as exc:
            text = str(exc)
            raise FedleakError(text if text.startswith(item) else f"{item}: {text}") from None
    return _VARIANTS[key]


def sweep_of(config) -> tuple[Setting, ...]:
    """Every swept (path, values): `matrix.adaptations` as model.adaptation's, then `matrix.sweep`."""
    out = (("model.adaptation", config.matrix.adaptations),) if config.matrix.adaptations else ()
    return out + tuple(config.matrix.sweep)


def methods_of(config) -> set[str]:
    """Every adaptation method a run trains: model.adaptation and each swept one (`matrix.adaptations`, or
    model.adaptation in `matrix.sweep`)."""
    return {config.model.adaptation,
            *(v for path, values in sweep_of(config) if path == "model.adaptation" for v in values)}


def configured(config, path: str):
    """The value `config` gives the setting at `path` (as its results record it)."""
    from fedleak.eval.config import plain

    node = plain(config)
    for part in path.split("."):
        node = node[part]
    return node


def settings_of(config, where: str = "matrix.sweep") -> list[Setting | None]:
    """The variants to train: None (the configured settings) and each swept value that differs from
    the configured one once parsed (alpha 1 is alpha 1.0), in the order written.

    Raises:
        FedleakError: a swept value the setting refuses (`variant`).
    """
    out: list[Setting | None] = [None]
    for path, values in sweep_of(config):
        seen: list = []  # values as parsed (alpha 1 is alpha 1.0), the configured one first
        for v in values:
            parsed = configured(variant(config, (path, v), where), path)  # a bad path or value raises here
            seen = seen or [configured(config, path)]
            if parsed not in seen:
                seen.append(parsed)
                out.append((path, v))
    return out


def conflict(config, algorithm, defense) -> str | None:
    """Why a training cannot run under `config`'s adaptation method, or None."""
    found = conflict_field(config, algorithm, defense)
    return found[1] if found else None


def conflict_field(config, algorithm, defense) -> tuple[str, str] | None:
    """(the matrix field at fault, "algorithms" or "defenses"; why) a training cannot run under `config`'s
    adaptation method, or None."""
    method = config.model.adaptation
    # Opacus's embedding rule gives a prefix's per-record gradients (peft looks its rows up per record)
    if method in ("ia3", "prompt_tuning") and "dp_sgd" in {p.name for p in (defense.parts or (defense,))}:
        why = {"prompt_tuning": "peft computes the soft prompt once per batch, so Opacus gets no per-record "
                                "gradient to clip",
               "ia3": "Opacus has no per-sample gradient rule for peft's IA3 layers"}[method]
        return "defenses", (f"dp_sgd cannot train model.adaptation = '{method}': {why}: use dp_fedavg, or "
                            f"model.adaptation = 'lora' or 'prefix_tuning'")
    return None


def attack_conflict(config, spec) -> str | None:
    """Why an attack cannot probe `config`'s adaptation method, or None."""
    from fedleak.attacks.base import ATTACKS

    cls = ATTACKS.get(spec.name)
    method = config.model.adaptation
    if method not in cls.adaptations:
        return f"{spec.name} cannot probe model.adaptation = '{method}': {cls.adaptations_why}"
    return None

