"""fedleak's round loop on Flower (Beutel et al. 2020, "Flower: A Friendly Federated Learning Framework"):
a ClientApp and a ServerApp over the same `ClientSide` and `ServerSide` the in-process loop drives, so
no algorithm, defense or poisoning code exists twice.

The ServerApp asks each node which fedleak client it holds (a `query` answered with its `partition-id`),
then runs the rounds through `FedleakStrategy` (`strategy.py`: the server's seeded sampling and
`ServerSide.finish_round`) under Flower's own `Strategy.start`, or, with secure aggregation, through
Flower's SecAgg+ workflow (`secagg.py`).

The ClientApp rebuilds a training's `ClientSide` from the message's spec through a `build` function the
caller gives (eval builds it from the run's config), once per training per process, and keeps a client's
memory and defense state between rounds in the node's `Context.state` (simulation) or on the node's disk
(deployment: `records.save_client_files`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from fedleak.common.errors import FedleakError
from fedleak.federated.loop import ClientSide, ServerSide
from fedleak.federated.rounds import Algorithm, ClientResult, TrainingRun, TrainingSetup

log = logging.getLogger("fedleak.federated.flower")

PARTITION = "partition-id"  # the node-config key naming the fedleak client a node holds (Flower's simulation sets it)
DATA_FILE = "data-file"  # node config: the node's own Alpaca-style records (a deployment); unset: the run's split
OUT_DIR = "out-dir"  # node config: where the node writes its client view; set: the view never leaves the node
_SIDES: dict[str, ClientSide] = {}  # per process: the latest training's client side


def client_app(build: Callable[[dict], ClientSide]):
    """A Flower ClientApp training fedleak clients.

    Args:
        build: (spec, node config) -> that training's `ClientSide`; spec is the JSON the server sends in every
            message, the node config holds `partition-id` and, on a deployment, `data-file` (the node's own
            records, which `build` puts in place of the split's). Called once per training and process; must
            be a module-level function (Ray pickles it by name).

    Returns:
        A `flwr.clientapp.ClientApp` answering `query` (its partition id) and `train` (one client round).
    """
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from fedleak.federated.flower.records import (from_arrays, load_client_files, load_client_state, loads,
                                                  result_content, save_client_files, store_client_state)

    from fedleak.federated.flower.secagg import fitres_content, is_fitins, read_fitins, secagg_mod

    app = ClientApp()

    @app.query()
    def query(msg, context):
        return Message(RecordDict({"node": ConfigRecord({PARTITION: partition_of(context.node_config),
                                                        "pid": os.getpid()})}), reply_to=msg)

    @app.train(mods=[secagg_mod])
    def train(msg, context):
        secure = is_fitins(msg.content)  # SecAgg+: the workflow forwards a legacy FitIns, the mod masks the reply
        if secure:
            config, received = read_fitins(msg.content)
        else:
            config = msg.content["config"]
            received = from_arrays(msg.content["global"], loads(config["dtypes"])) if "global" in msg.content else None
        spec, client, rnd = loads(config["spec"]), int(config["client"]), int(config["round"])
        key = spec["key"]
        try:
            if key not in _SIDES:
                if spec.get("deployment"):  # a real node: never the server's data, never its model sent
                    _check_node(context.node_config)
                _SIDES.clear()  # one training at a time per process: drop the last one's model
                _SIDES[key] = build(spec, dict(context.node_config))
            side = _SIDES[key]
            # A deployed node keeps the client's state on its disk (see save_client_files); a simulated one in
            # its Context.state, which the engine keeps in memory.
            folder = (Path(str(context.node_config[OUT_DIR])) / str(spec.get("unit", key))
                      if OUT_DIR in context.node_config else None)
            memory, hooks_state = (load_client_files(folder / "client-state", key=key) if folder
                                   else load_client_state(context.state, key=key))
            side.memory[client] = memory
            side.setup.hooks.load_client_state(client, hooks_state)
            result, privacy = side.update(client, rnd, received)
            if folder:  # a deployment: the client's model, data and state stay on its machine
                save_client_files(folder / "client-state", side.memory[client],
                                  side.setup.hooks.client_state(client), key=key)
                write_client_view(folder, rnd, client, result, key=key)
                result.view, result.artifacts = {}, {}
            else:
                store_client_state(context.state, side.memory[client], side.setup.hooks.client_state(client),
                                   key=key)
            if secure:  # the upload leaves masked; no adapter travels in the clear
                return Message(fitres_content(result, privacy, json.loads(config["names"])), reply_to=msg)
            return Message(result_content(result, privacy), reply_to=msg)
        except FedleakError as exc:  # the run's own error (a config the client cannot train): the server stops
            if secure:  # SecAgg+ needs a FitRes: the node fails, and the protocol goes on without it
                raise
            return Message(RecordDict({"fedleak_error": ConfigRecord({"message": str(exc)})}), reply_to=msg)
        except Exception as exc:  # this client crashed: the server records it and the round goes on
            log.exception("client %d, round %d", client, rnd)
            if secure:
                raise
            return Message(RecordDict({"client_error": ConfigRecord({"message": _one_line(exc)})}), reply_to=msg)

    return app


def partition_of(node_config) -> int:
    """The fedleak client a node holds (its node config's partition-id); FedleakError naming the fix."""
    value = node_config.get(PARTITION)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FedleakError(f"node config {PARTITION}={value!r}: start the SuperNode with --node-config "
                           f"\"{PARTITION}=<client index, 0 to clients - 1>\"") from None


def _check_node(node_config) -> None:
    missing = [k for k in (DATA_FILE, OUT_DIR) if k not in node_config]
    if missing:
        raise FedleakError(f"node config lacks {' and '.join(missing)}: on a deployment each SuperNode trains on its own "
                           f"records and keeps its model: --node-config \"{PARTITION}=I {DATA_FILE}=FILE {OUT_DIR}=DIR\"")


def write_client_view(folder: Path, rnd: int, client: int, result: ClientResult, *, key: str) -> None:
    """The client's own adapters of round `rnd` as a `client/i` view in `folder`'s checkpoint layout, and its
    artifacts (FEDPIT's synthetic records). An adapter the client's model shares with the round's aggregate
    (FEDPIT's global one) is in the server's `global` checkpoint of that round: the manifest's
    `global_adapters` names it, and the full model is this view plus that one."""
    from fedleak.federated import checkpoint
    from fedleak.federated.rounds import GLOBAL

    from fedleak.common.io import atomic_write_text

    own = {adapter: state for adapter, state in result.view.items() if state is not GLOBAL}
    files = {f"{adapter}-client-{client:02d}": state for adapter, state in own.items()}
    views = {checkpoint.view_key("client", client): {a: f"{a}-client-{client:02d}" for a in own}} if own else {}
    checkpoint.write_round(folder, rnd, files=files, views=views, num_examples={}, config_hash=key,
                           extra={"global_adapters": [a for a, s in result.view.items() if s is GLOBAL]})
    for name, rows in result.artifacts.items():  # FEDPIT's synthetic records: generated from the real ones
        atomic_write_text(checkpoint.round_dir(folder, rnd) / f"{name}-client-{client:02d}.jsonl",
                          "".join(json.dumps(row) + "\n" for row in rows))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _wait_for_nodes(grid, count: int, timeout: float) -> list[int]:
    start = time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() - start > timeout:
            raise FedleakError(f"only {len(nodes)} of {count} Flower nodes connected within {timeout:.0f} s: "
                               f"start one SuperNode per client (federation.clients), or raise engine.connect_timeout")
        time.sleep(0.1)
    return sorted(nodes)


def _partitions(grid, nodes: list[int], count: int, timeout: float) -> dict[int, int]:
    """{fedleak client: node id}, from each node's answer to a query."""
    from flwr.app import Message, RecordDict

    from fedleak.federated.flower.strategy import error_reason, replying_node

    queries = [Message(RecordDict(), message_type="query", dst_node_id=n) for n in nodes]
    replies = grid.send_and_receive(queries, timeout=timeout)
    node_of: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            raise FedleakError(f"Flower node {replying_node(reply, queries)} did not say which client it holds: "
                               f"{error_reason(reply.error.reason)}")
        client = int(reply.content["node"][PARTITION])
        if client in node_of or not 0 <= client < count:
            raise FedleakError(f"Flower node {reply.metadata.src_node_id} holds client {client}: each of clients "
                               f"0..{count - 1} must be held by exactly one node (node config {PARTITION!r})")
        node_of[client] = reply.metadata.src_node_id
    if missing := sorted(set(range(count)) - set(node_of)):
        raise FedleakError(f"no Flower node holds client(s) {missing}: start a SuperNode for each")
    return node_of


def serve(grid, server: ServerSide, *, spec: dict, rounds: int, round_timeout: float | None,
          connect_timeout: float, secagg: dict | None = None) -> None:
    """The ServerApp's main loop: `rounds` rounds through `server`, clients reached through `grid`; with
    `secagg` (SecAgg+'s clipping_range, quantization_range, max_weight), each round through SecAgg+."""
    from flwr.app import ArrayRecord

    from fedleak.federated.flower.records import dumps, to_arrays
    from fedleak.federated.flower.strategy import FedleakStrategy

    spec_text = dumps(spec, "the training spec")
    if hasattr(grid, "pull_interval"):  # the simulation's in-memory grid polls for replies every 0.1 s by default
        grid.pull_interval = min(grid.pull_interval, 0.01)
    nodes = _wait_for_nodes(grid, server.num_clients, connect_timeout)
    node_of = _partitions(grid, nodes, server.num_clients, connect_timeout)
    if secagg is not None:  # Flower ships SecAgg+ as a workflow of its legacy strategies: fedleak drives it
        from fedleak.federated.flower.secagg import secagg_round

        for rnd in range(1, rounds + 1):
            secagg_round(grid, server, rnd, node_of, spec_text, timeout=round_timeout, **secagg)
        return
    initial = to_arrays(server.global_state)[0] if server.global_state is not None else ArrayRecord()
    FedleakStrategy(server, node_of, spec_text, round_timeout).start(grid, initial, num_rounds=rounds,
                                                                     timeout=round_timeout)


class _DropDeprecation(logging.Filter):
    """Flower 1.42 deprecates the `run_simulation` Python entry in favour of `flwr run`; fedleak keeps it
    because the ServerApp must share this process's training setup (`flwr run` starts it in another)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def run_simulation_rounds(setup: TrainingSetup, algorithm: Algorithm, *, app, spec: dict, num_cpus: float,
                          num_gpus: float, total_cpus: int | None = None, round_timeout: float | None = None,
                          connect_timeout: float = 300.0, secagg: dict | None = None) -> TrainingRun:
    """Train on Flower's Simulation Engine (Ray backend), one virtual SuperNode per client.

    Args:
        setup: the training (the server's side runs in this process, with this setup).
        algorithm: the training algorithm.
        app: the ClientApp (`client_app(build)`, `build` turning `spec` into this training's client side).
        spec: JSON-serialisable; sent to every client; must hold `key`, unique per training.
        num_cpus: CPUs each ClientApp reserves (Ray), so total_cpus // num_cpus clients train at once.
        num_gpus: GPU fraction each ClientApp reserves (0.25: four clients share a GPU).
        total_cpus: CPUs Ray may use (None: all).
        round_timeout: seconds a round waits for replies (None: until all reply); late clients are failed.
        connect_timeout: seconds to wait for the virtual nodes to register.
        secagg: SecAgg+'s settings (clipping_range, quantization_range, max_weight) to aggregate every round
            through Flower's SecAgg+ workflow; None: the uploads travel in the clear.

    Returns:
        The training run, as `run_rounds` returns it (its model holds the initial adapters).

    Raises:
        FedleakError: a client's own FedleakError, every client of a round failing, or the engine failing.
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    runs: list[TrainingRun] = []
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        try:
            runs.append(grid_rounds(grid, setup, algorithm, spec=spec, round_timeout=round_timeout,
                                    connect_timeout=connect_timeout, secagg=secagg))
        except BaseException as exc:  # Flower logs and swallows the ServerApp's exceptions: re-raised below
            failure.append(exc)

    init_args = {"include_dashboard": False, "log_to_driver": False}
    quiet = _DropDeprecation()
    if total_cpus is not None:
        init_args["num_cpus"] = total_cpus
    start = time.perf_counter()
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    flower_log.setLevel(logging.WARNING)
    flower_log.addFilter(quiet)
    try:
        run_simulation(server_app=server_app, client_app=app, num_supernodes=len(algorithm.client_data(setup.data)),
                       backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                                       "init_args": init_args})
    finally:
        flower_log.setLevel(level)
        flower_log.removeFilter(quiet)
    if failure:
        raise failure[0]
    if not runs:
        raise FedleakError("the Flower simulation ended before its ServerApp finished: see Flower's log above")
    runs[0].train_seconds = time.perf_counter() - start  # Ray's start-up included
    return runs[0]


def grid_rounds(grid, setup: TrainingSetup, algorithm: Algorithm, *, spec: dict, round_timeout: float | None = None,
                connect_timeout: float = 300.0, secagg: dict | None = None) -> TrainingRun:
    """Train through a Flower `Grid` (a ServerApp's, on either engine): this process is the server.

    Args:
        grid: the ServerApp's grid; one node per client must connect, each answering its partition id.
        setup, algorithm, spec, round_timeout, connect_timeout, secagg: as `run_simulation_rounds`.

    Returns:
        The training run (its model holds the initial adapters; the clients trained elsewhere).
    """
    clients = ClientSide(setup, algorithm, clients=[])  # the seeded initial adapter; the clients train on the nodes
    server = ServerSide(setup, algorithm, num_clients=clients.num_clients, initial=clients.initial,
                        server_model=clients.server_model())
    start = time.perf_counter()
    serve(grid, server, spec=spec, rounds=setup.federation.rounds, round_timeout=round_timeout,
          connect_timeout=connect_timeout, secagg=secagg)
    return TrainingRun(model=clients.model, history=server.history, train_seconds=time.perf_counter() - start,
                       final_round=setup.federation.rounds, training_dir=Path(setup.out_dir),
                       global_members=algorithm.global_members(setup.data, server.contributors))
