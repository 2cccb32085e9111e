"""A real Flower deployment on loopback: a SuperLink and three SuperNodes started as processes (insecure
mode), each SuperNode with its own data file and output folder; `fedleak flower` trains through them,
`fedleak attack` probes the server's checkpoints; a SuperNode killed mid-round is recorded as failed.
Every process is stopped by its process group at the end, also on failure."""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedleak.eval.results import validate_results
from tests.flower_reference import FEDPIT
from tests.processes import free_port, start, stop

MATRIX = """
[matrix]
algorithms = ["slowpoke", { name = "fedpit", synthetic_per_round = 4, max_attempts = 6 }]
defenses = ["none", { name = "dp_sgd", target_epsilon = 8.0 }]
attacks = [{ name = "loss", observers = ["global", "upload"] }]
include = [{ algorithm = "slowpoke", defense = "none" }, { algorithm = "fedpit", defense = "dp_sgd" }]
"""
# The killed node's round ends when the SuperLink declares it offline (no heartbeat for 2 x the interval the node
# declared) and answers for it. A live node's round takes about 20 s here (a fresh ClientApp process per message)
# but over 60 s on a loaded 2-core machine: this timeout is only a backstop, far above both (at 60 s it failed
# live nodes).
TIMEOUT = "[engine]\nround_timeout = 240\n"
# flwr 1.42's SuperNode heartbeats at a fixed 30 s interval (no flag), so a killed node is declared offline 40 to
# 60 s after its last beat. Our SuperNodes declare and keep HEARTBEAT s instead: the SuperLink's lowest allowed
# interval is 10; at 12 a node beats every 5 to 6 s and is offline 24 s after its last beat (live nodes beat from
# a thread of the SuperNode process, not the ClientApp that trains). The names are checked: a flwr that moved
# them fails here, not silently at 30 s.
HEARTBEAT = 12
SUPERNODE = ("import sys; import flwr.supercore.heartbeat as beat, flwr.supernode.fleet_http_connection as fleet; "
             "assert beat.HEARTBEAT_DEFAULT_INTERVAL == fleet.HEARTBEAT_DEFAULT_INTERVAL == 30, 'flwr moved it'; "
             f"beat.HEARTBEAT_DEFAULT_INTERVAL = fleet.HEARTBEAT_DEFAULT_INTERVAL = {HEARTBEAT}; "
             "from flwr.supernode.cli import flower_supernode; sys.argv[0] = 'flower-supernode'; flower_supernode()")
SLOWPOKE = '''
import time
from pathlib import Path

from fedleak.federated.fedit import FedIT
from fedleak.federated.rounds import register_algorithm


@register_algorithm("slowpoke")
class Slowpoke(FedIT):
    """FEDIT whose client 2 says it is training in round 2, then takes minutes (long enough to be killed)."""

    def client_round(self, ctx):
        if ctx.client == 2 and ctx.round == 2:
            (Path(__file__).parent / "client2-training").touch()
            time.sleep(300)
        return super().client_round(ctx)
'''
CLIENTS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_run_config):
    """(folder, config, superlink address, env, {client: SuperNode process}); the SuperLink and nodes run
    until the module's tests end."""
    folder = tmp_path_factory.mktemp("deployment")
    (folder / "slowpoke.py").write_text(SLOWPOKE)
    config = folder / "run.toml"
    config.write_text('plugins = ["slowpoke"]\n' + tiny_run_config + MATRIX)
    (folder / "timeout.toml").write_text('plugins = ["slowpoke"]\n' + tiny_run_config + MATRIX + TIMEOUT)
    bin_dir = Path(sys.executable).parent  # the SuperLink and SuperNodes start Flower's other commands by name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(folder / "flwr-home"),
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Each organisation's own file: the records the run's split gives its client. In process (no interpreter to
    # start), from the config without its matrix: the split reads [data], [federation] and the seed, and loading
    # the plug-in here would register `slowpoke` in this process.
    from fedleak.eval.config import parse_config
    from fedleak.eval.context import seed_context

    data_only = parse_config(tomllib.loads(tiny_run_config), str(config))
    for i, records in enumerate(seed_context(data_only, data_only.seed, folder).data.clients):
        (folder / f"client{i}.jsonl").write_text("".join(json.dumps(r.to_alpaca()) + "\n" for r in records))
    port = free_port()
    processes = [start([bin_dir / "flower-superlink", "--insecure", "--port", str(port),
                        "--disable-runtime-dependency-installation"], folder / "superlink.log", env)]
    nodes = {}
    try:
        time.sleep(3)
        for i in range(CLIENTS):
            node_config = f'partition-id={i} data-file="{folder}/client{i}.jsonl" out-dir="{folder}/node{i}"'
            nodes[i] = start([sys.executable, "-c", SUPERNODE, "--insecure", "--superlink", f"127.0.0.1:{port}",
                              "--port", str(free_port()), "--node-config", node_config], folder / f"node{i}.log", env)
            processes.append(nodes[i])
        yield folder, config, f"127.0.0.1:{port}", env, nodes
    finally:
        for proc in reversed(processes):
            stop(proc)


def fedleak(*args, env, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "fedleak", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def deployed(federation, flower_inprocess):
    """(folder, training, in-process run): FEDPIT under DP-SGD trained through the SuperNodes (the most a node
    keeps: a local adapter, synthetic records, an accountant); its in-process reference is the same training in
    test_flower.py's in-process run (tests/flower_reference.py), trained once for both modules."""
    folder, config, superlink, env, _ = federation
    proc = fedleak("flower", config, "--superlink", superlink, "--out", folder / "server", "--training", FEDPIT,
                   "--quiet", env=env)
    training = Path(proc.stdout.strip().splitlines()[-1])
    return folder, training, flower_inprocess


def test_a_deployed_federation_trains_what_the_inprocess_loop_trains_and_keeps_client_state_on_the_nodes(deployed):
    folder, training, inprocess_run = deployed
    assert training == folder / "server/trainings" / (FEDPIT.replace("/", "-") + "-seed0")
    reference = inprocess_run / "trainings" / training.name
    server, inprocess = (json.loads((f / "training.json").read_text()) for f in (training, reference))
    assert server["engine"] == "flower-deployment"
    assert server["privacy"] == inprocess["privacy"]  # each node's accountant went on across its fresh processes
    assert server["views"] == ["global", "upload/0", "upload/1", "upload/2"]  # the clients' models stayed home
    assert not list(training.glob("round-*/synthetic-*")) and server["synthetic_examples"] == []
    for rnd in (1, 2):
        for stem in ["global", *(f"upload-client-{i:02d}" for i in range(CLIENTS))]:
            a, b = (load_file(f / f"round-{rnd:04d}/{stem}.safetensors") for f in (training, reference))
            assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a), (rnd, stem)
        for i in range(CLIENTS):  # the local adapter, trained on the real records, stayed on its node
            node = folder / f"node{i}" / training.name / f"round-{rnd:04d}"
            mine = load_file(node / f"local-client-{i:02d}.safetensors")
            theirs = load_file(reference / f"round-{rnd:04d}/local-client-{i:02d}.safetensors")
            assert all(torch.allclose(mine[k], theirs[k], rtol=0, atol=1e-6) for k in mine)
            assert (node / f"synthetic-client-{i:02d}.jsonl").read_text() == \
                (reference / f"round-{rnd:04d}/synthetic-client-{i:02d}.jsonl").read_text()
    start = load_file(training / "round-0000/global.safetensors")
    end = load_file(training / "round-0002/global.safetensors")
    assert max((end[k] - start[k]).abs().max().item() for k in end) > 1e-3


def test_fedleak_attack_probes_the_servers_checkpoints(deployed, federation):
    folder, training, inprocess_run = deployed
    _, config, _, env, _ = federation
    fedleak("attack", training, "--config", config, "--out", folder / "attacked", "--quiet", env=env)
    attacked = json.loads((folder / "attacked/results.json").read_text())
    reference = json.loads((inprocess_run / "results.json").read_text())
    # This config's attack (loss on the global and upload views of the final round) among the reference's cells
    # (loss on every view and round).
    cells = lambda r: {(c["observer"], c["client"]): c["metrics"]["auc"] for c in r["cells"]  # noqa: E731
                       if c["algorithm"].startswith("fedpit") and c["observer"] in ("global", "upload")
                       and c["round"] == 2}
    assert cells(attacked) == cells(reference) and len(cells(attacked)) == 1 + CLIENTS
    validate_results(attacked)


def test_a_supernode_killed_mid_round_is_recorded_and_the_run_completes(deployed, federation):
    folder, config, superlink, env, nodes = federation
    proc = subprocess.Popen([sys.executable, "-m", "fedleak", "flower", folder / "timeout.toml", "--superlink",
                             superlink, "--out",
                             folder / "server", "--training", "slowpoke/none", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (folder / "client2-training").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "client 2 never started round 2"
            time.sleep(0.5)
        stop(nodes[2])  # its SuperNode and the ClientApp it runs, mid-training
        out, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:] + "\nSuperLink log: " + (folder / "superlink.log").read_text()[-3000:]
    rounds = json.loads((folder / "server/trainings/slowpoke-none-seed0/training.json").read_text())["rounds"]
    assert "failed" not in rounds[0] and rounds[0]["aggregated"] == [0, 1, 2]
    assert set(rounds[1]["failed"]) == {"2"} and rounds[1]["aggregated"] == [0, 1]
    assert "Node Unavailable" in rounds[1]["failed"]["2"]  # Flower noticed the dead node, not our timeout
    assert (folder / "server/trainings/slowpoke-none-seed0/round-0002/global.safetensors").exists()
    # FEDIT's client model is its upload: each node kept its own copy of round 1 in its own folder.
    for i in range(CLIENTS):
        mine = load_file(folder / f"node{i}/slowpoke-none-seed0/round-0001/default-client-{i:02d}.safetensors")
        theirs = load_file(folder / "server/trainings/slowpoke-none-seed0/round-0001" /
                           f"upload-client-{i:02d}.safetensors")
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
