"""The matrix's federated trainings on Flower's Simulation Engine (`[engine] name = "flower"`).

The driver (this process) runs the ServerApp with the training's own setup; each Ray actor rebuilds the
client side from a spec (the run's config for the unit's seed, its base folder, the resolved model and
the unit), once per training, and trains the clients its virtual SuperNodes are asked to. Needs the
`fedleak[flower]` extra; the in-process engine does without it.
"""

from __future__ import annotations

import dataclasses

import importlib.util
from pathlib import Path

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import instantiate
from fedleak.eval.config import RunConfig, build_defense, parse_config, plain
from fedleak.eval.plan import TrainingUnit, all_trainings
from fedleak.federated.flower.engine import DATA_FILE, PARTITION, partition_of

INSTALL = "pip install 'fedleak[flower]' (or -c .ci/constraints.txt -e '.[flower]' in a clone)"


def check_available(modules: tuple[str, ...] = ("flwr", "ray")) -> None:
    """FedleakError naming the extra when Flower (or, for the Simulation Engine, Ray) is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FedleakError(f"engine \"flower\" needs {' and '.join(missing)}: {INSTALL}")


def spec_of(config: RunConfig, unit: TrainingUnit, *, base_dir: Path, model_ref: str, key: str,
            deployment: bool = False) -> dict:
    """What a Flower client needs to rebuild `unit`'s client side (JSON; sent in every train message); on a
    deployment each node must train on its own `data-file` and keep its model in its `out-dir`."""
    table = plain(config.for_seed(unit.seed))
    table.pop("seeds")
    # `config` is the training's own (a sweep's variant has its setting in place and no sweep): the unit
    # as that config lists it.
    return {"key": key, "config": table, "base_dir": str(Path(base_dir).resolve()), "model_ref": model_ref,
            "unit": dataclasses.replace(unit, setting=None).stem, "threads": max(1, int(config.engine.num_cpus)), "deployment": deployment}


def build_client_side(spec: dict, node_config: dict | None = None):
    """The `ClientSide` of the training `spec` names, as the driver would build it (same seed, data, model);
    on a node whose config names a `data-file`, that client's records are the file's."""
    from fedleak.eval.context import seed_context
    from fedleak.eval.poisoning import build_adversary
    from fedleak.federated.loop import ClientSide
    from fedleak.federated.data import FederatedData
    from fedleak.federated.model import shared_base_model
    from fedleak.federated.rounds import ALGORITHMS, TrainingSetup

    torch.set_num_threads(spec["threads"])
    base_dir = Path(spec["base_dir"])
    # The training's own config (a sweep's variant in place): its matrix may list what its method leaves out.
    config = parse_config(spec["config"], "<flower spec>", base_dir=base_dir, methods_checked=False)
    unit = next((u for u in all_trainings(config) if u.stem == spec["unit"] and u.seed == config.seed), None)
    if unit is None:
        raise FedleakError(f"the Flower client found no training {spec['unit']!r} in the spec's config: "
                           f"the server and the clients run different fedleak versions")
    node_config = node_config or {}
    if DATA_FILE in node_config:  # a deployed node: its own records, nothing of the server's data
        client = partition_of(node_config)
        clients: list[list] = [[] for _ in range(config.federation.clients)]
        if not 0 <= client < len(clients):
            raise FedleakError(f"node config {PARTITION}={client}: the run has clients 0..{len(clients) - 1}")
        clients[client] = node_records(Path(str(node_config[DATA_FILE])), config, client)
        data = FederatedData(clients=clients, heldout=[])
    else:
        data = seed_context(config, config.seed, base_dir).data
    model_ref = spec["model_ref"]
    if config.model.name == "embedded" and not Path(model_ref).is_dir():  # another machine: build it here
        from fedleak.eval.context import resolve_model

        model_ref = resolve_model(config)[0]
    base_model, tokenizer = shared_base_model(model_ref, **config.model.load_options())
    algorithm = instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs,
                            f"matrix.algorithms: {unit.algorithm.label}")
    setup = TrainingSetup(base_model=base_model, tokenizer=tokenizer, data=data, federation=config.federation,
                          adapter=config.model.adapter, hooks=build_defense(unit.defense, f"matrix.defenses: {unit.defense.label}"),
                          seed=config.seed, out_dir=Path("."), config_hash=spec["key"], progress=False, label=unit.label)
    if unit.scenario:
        setup.adversary = build_adversary(unit.scenario, config)
    return ClientSide(setup, algorithm, clients=[])


def node_records(path: Path, config: RunConfig, client: int):
    """A SuperNode's own records: its Alpaca-style file, read with the config's [data.file] field names."""
    from fedleak.federated.loader import FieldNames, read_data_file

    if not path.is_file():
        raise FedleakError(f"node config {DATA_FILE}={str(path)!r} of client {client}: no such file on this node: "
                           f"give the SuperNode's own Alpaca-style .json or .jsonl file")
    f = config.data.file
    return read_data_file(path, FieldNames(instruction=f.instruction_field, input=f.input_field, output=f.output_field,
                                           category=f.category_field, identifiers=f.identifiers_field),
                          patterns=f.identifier_patterns, id_prefix=f"node{client}").records


def _client_app():
    from fedleak.federated.flower.engine import client_app

    return client_app(build_client_side)


def check_unit(config: RunConfig, unit: TrainingUnit) -> dict | None:
    """SecAgg+'s settings when `unit` trains under secure aggregation on Flower (None without it); FedleakError
    for what SecAgg+ cannot run: a server-side rule or transform over individual uploads, model poisoning
    (the server never holds an upload to rewrite), fewer than 2 clients per round."""
    defense = build_defense(unit.defense, f"matrix.defenses: {unit.defense.label}")
    if not defense.hides_uploads:
        return None
    from fedleak.defenses.base import Composition, Defense

    parts = defense.parts if isinstance(defense, Composition) else [defense]
    for part in parts:
        for hook in ("before_aggregation", "aggregate"):
            if getattr(type(part), hook) is not getattr(Defense, hook):
                raise FedleakError(f"matrix.defenses: {unit.defense.label}: {part.name} runs {hook} on individual "
                                   f"uploads, which SecAgg+ on Flower hides from the server: drop it, or run this "
                                   f"training in process (engine.name = \"inprocess\") for the simulated view")
    from fedleak.attacks.base import ATTACKS
    from fedleak.attacks.poisoning.base import ModelPoisoning

    scenario = unit.scenario
    if scenario and any(issubclass(ATTACKS.get(a.name), ModelPoisoning) for a in scenario.attacks):
        raise FedleakError(f"matrix.scenarios: {scenario.name} rewrites uploads on the server, which SecAgg+ on Flower "
                           f"never sees: use data poisoning only with secure aggregation on Flower")
    if config.federation.clients_per_round < 2:
        raise FedleakError("federation.client_fraction: SecAgg+ needs at least 2 clients per round: raise it")
    return config.engine.secagg()


def _secagg(config: RunConfig, unit: TrainingUnit, setup, algorithm) -> dict | None:
    secagg = check_unit(config, unit)
    if secagg is not None and not secagg["max_weight"]:
        secagg["max_weight"] = max(len(records) for records in algorithm.client_data(setup.data))
    return secagg


def flower_rounds(setup, algorithm, config: RunConfig, unit: TrainingUnit, *, base_dir: Path, model_ref: str):
    """Train `setup` on Flower's Simulation Engine with the config's `[engine]` resources."""
    check_available()
    from fedleak.federated.flower.engine import run_simulation_rounds

    engine = config.engine
    return run_simulation_rounds(
        setup, algorithm, app=_client_app(),
        spec=spec_of(config, unit, base_dir=base_dir, model_ref=model_ref, key=setup.config_hash),
        num_cpus=engine.num_cpus, num_gpus=engine.num_gpus, total_cpus=engine.total_cpus or None,
        round_timeout=engine.round_timeout or None, connect_timeout=engine.connect_timeout,
        secagg=_secagg(config, unit, setup, algorithm))


def deployment_rounds(grid, setup, algorithm, config: RunConfig, unit: TrainingUnit, *, base_dir: Path, model_ref: str):
    """Train `setup` through a deployed federation's `grid`: one SuperNode per client, this process the server."""
    from fedleak.federated.flower.engine import grid_rounds

    return grid_rounds(grid, setup, algorithm,
                       spec=spec_of(config, unit, base_dir=base_dir, model_ref=model_ref, key=setup.config_hash,
                                    deployment=True),
                       round_timeout=config.engine.round_timeout or None, connect_timeout=config.engine.connect_timeout,
                       secagg=_secagg(config, unit, setup, algorithm))
