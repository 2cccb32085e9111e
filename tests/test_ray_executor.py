"""The matrix on a real two-node Ray cluster on this machine (`ray start --head` plus a second `ray start`,
one CPU each, both stopped by pid at the end): the same results as the local run with one thread per task,
resume after the driver is killed, a failing task retried and then recorded, storage "driver", and the
embedded model shipped to nodes that lack it (the nodes' FEDLEAK_CACHE starts empty)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedleak.eval.results import validate_results
from tests.processes import free_port, start, stop

pytest.importorskip("ray")

PLUGIN = '''
import logging
import os
import time
from pathlib import Path

from fedleak.federated.fedit import FedIT
from fedleak.federated.rounds import register_algorithm


@register_algorithm("slow")
class Slow(FedIT):
    """FEDIT taking two seconds per client round while a file `slow-down` lies beside this plug-in: long enough
    for a driver to be killed mid-matrix (the other runs need no wait: the same numbers without it)."""

    def client_round(self, ctx):
        if (Path(__file__).parent / "slow-down").exists():
            time.sleep(2.0)
        if ctx.client == 0:  # a warning from inside a task: the driver's log must show it
            logging.getLogger("fedleak.plugs").warning("slow: round %d took its time", ctx.round)
        return super().client_round(ctx)


@register_algorithm("flaky")
class Flaky(FedIT):
    """FEDIT whose every attempt raises; each leaves a line (the folder this plug-in was loaded from) in the
    file the nodes' FEDLEAK_TEST_ATTEMPTS names."""

    def client_round(self, ctx):
        with open(os.environ["FEDLEAK_TEST_ATTEMPTS"], "a") as f:
            f.write(f"{Path(__file__).parent}\\n")
        raise RuntimeError("flaky: this node's disk is gone")


@register_algorithm("broken")
class Broken(FedIT):
    """FEDIT with a config fault: a FedleakError, which no retry can mend."""

    def client_round(self, ctx):
        from fedleak.common.errors import FedleakError

        with open(os.environ["FEDLEAK_TEST_ATTEMPTS"], "a") as f:
            f.write("broken\\n")
        raise FedleakError("broken: set broken.fix = true")
'''
MATRIX = """
[matrix]
algorithms = ["fedit", "slow"]
defenses = ["none"]
attacks = [{ name = "loss", observers = ["global", "upload", "client"] },
           { name = "lira", shadow_models = 2, epochs = 1, observers = ["global"] }]
"""
TIMING = {"node", "timings", "seconds"}  # what differs between two runs of the same work


def strip(value):
    """Results without timings and node names."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def same_results(a: dict, b: dict) -> None:
    for key in ("trainings", "cells", "aggregates", "training_aggregates", "model_fit", "base_utility"):
        assert strip(a[key]) == strip(b[key]), key


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_run_config):
    """(folder, config, address, env): a Ray head and one more node, one CPU each, on this machine."""
    folder = tmp_path_factory.mktemp("ray")
    (folder / "plugs.py").write_text(PLUGIN)
    config = folder / "run.toml"
    config.write_text('plugins = ["plugs"]\n' + tiny_run_config + MATRIX)
    bin_dir = Path(sys.executable).parent
    node_cache = folder / "node-cache"  # empty: every task's node gets the model from the driver
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    node_env = {**env, "FEDLEAK_CACHE": str(node_cache), "FEDLEAK_TEST_ATTEMPTS": str(folder / "attempts.txt")}
    port = free_port()
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    # Ray's sockets live under --temp-dir and a socket path may not exceed 107 bytes: pytest's (and xdist's
    # per-worker) temporary folders are too deep, so a short folder of its own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedleak-ray-"))
    processes = [start([bin_dir / "ray", "start", "--head", "--port", port, "--include-dashboard", "false",
                        "--temp-dir", ray_tmp, *common], folder / "head.log", node_env)]
    try:
        probe = ("import ray, sys, time; ray.init(address=sys.argv[1], log_to_driver=False); deadline = time.time() + 60\n"
                 "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.time() < deadline: time.sleep(0.5)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        for _ in range(60):  # the head takes a few seconds to listen
            if "Ray runtime started" in (folder / "head.log").read_text():
                break
            time.sleep(0.5)
        processes.append(start([bin_dir / "ray", "start", "--address", f"127.0.0.1:{port}", *common],
                               folder / "node.log", node_env))
        alive = subprocess.run([sys.executable, "-c", probe, f"127.0.0.1:{port}"], capture_output=True, text=True,
                               env=env, timeout=120)
        assert alive.stdout.strip().endswith("2"), (alive.stdout + alive.stderr)[-2000:]
        yield folder, config, f"127.0.0.1:{port}", env
    finally:
        for proc in reversed(processes):
            stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def fedleak(*args, env, timeout=600, status=0):
    proc = subprocess.run([sys.executable, "-m", "fedleak", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(cluster):
    """The matrix with --jobs 1 and on the cluster (shared storage)."""
    folder, config, address, env = cluster
    fedleak("run", config, "--out", folder / "local", "--quiet", env=env)
    fedleak("run", config, "--out", folder / "ray", "--executor", "ray", "--address", address, "--quiet", env=env)
    read = lambda name: json.loads((folder / name / "results.json").read_text())  # noqa: E731
    return read("local"), read("ray")


def test_the_matrix_on_a_two_node_cluster_gives_the_local_runs_results(runs, cluster):
    folder, *_ = cluster
    local, ray_run = runs
    same_results(ray_run, local)
    validate_results(ray_run)
    assert ray_run["executor"]["name"] == "ray" and ray_run["executor"]["nodes"] == 2
    assert ray_run["failures"] == []
    nodes = {t["cost"]["node"] for t in ray_run["trainings"]} | {c["cost"]["node"] for c in ray_run["cells"]}
    assert all(n.count("/") == 1 for n in nodes)
    log = (folder / "ray/run.log").read_text()
    assert "ray: trainings 2/2 done, 0 running, 0 queued; attack tasks 2/2 done" in log
    assert re.search(r"\[[0-9.]+/[0-9a-f]{8}\] slow: round 2 took its time", log)  # a task's warning, with its node
    # LiRA's shadows went to disk once, for every task of the seed; the nodes unpacked the driver's model.
    assert len(list((folder / "ray/shadows").glob("lira-shadows-*.safetensors"))) == 1
    assert list((folder / "node-cache").glob("embedded-*/fedleak_build.json"))
    assert "Ray" in (folder / "ray/report.md").read_text()


def test_a_killed_driver_resumes_without_redoing_finished_work(runs, cluster):
    folder, config, address, env = cluster
    out = folder / "resumed"
    (folder / "slow-down").touch()  # `slow` trains long enough to be killed in
    driver = subprocess.Popen([sys.executable, "-m", "fedleak", "run", str(config), "--out", str(out), "--executor",
                               "ray", "--address", address, "--quiet"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "trainings/fedit-none-seed0/evaluation.json").exists():  # FEDIT is done, slow is training
            assert time.monotonic() < deadline and driver.poll() is None, "no training finished"
            time.sleep(0.2)
        assert not (out / "trainings/slow-none-seed0/training.json").exists()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        stop(driver)
        (folder / "slow-down").unlink()
    time.sleep(5)  # Ray kills the dead driver's tasks
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trainings/*/evaluation.json")}
    assert "fedit-none-seed0" in finished and "slow-none-seed0" not in finished
    fedleak("run", config, "--out", out, "--executor", "ray", "--address", address, "--quiet", env=env)
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trainings/*/evaluation.json")}
    assert all(after[name] == mtime for name, mtime in finished.items())  # not trained or evaluated again
    log = (out / "run.log").read_text().split(": run ")[-1]  # the second run's lines
    assert "training fedit/none seed 0: cached" in log and "training slow/none seed 0: " in log
    same_results(json.loads((out / "results.json").read_text()), runs[0])


def test_a_failing_task_is_retried_then_recorded_and_driver_storage_completes_the_rest(runs, cluster, tiny_run_config):
    folder, _, address, env = cluster
    own = folder / "flaky-config"  # its own folder: storage "driver" ships the config's folder to the nodes
    own.mkdir()
    (own / "plugs.py").write_text(PLUGIN)
    config = own / "run.toml"
    config.write_text('plugins = ["plugs"]\n' + tiny_run_config
                      + MATRIX.replace('["fedit", "slow"]', '["fedit", "flaky"]')
                      + '[executor]\nname = "ray"\nstorage = "driver"\nmax_retries = 1\n')
    proc = fedleak("run", config, "--out", folder / "flaky", "--address", address, "--quiet", env=env, status=1)
    assert "Ray task(s) (training) failed after their retries" in proc.stderr
    results = json.loads((folder / "flaky/results.json").read_text())
    validate_results(results)
    failed = [{k: f[k] for k in ("algorithm", "task", "attempts")} for f in results["failures"]]
    assert failed == [{"algorithm": "flaky", "task": "training", "attempts": 2},
                      {"algorithm": "flaky", "task": "attacks", "attempts": 0}]
    assert "RuntimeError: flaky: this node's disk is gone" in results["failures"][0]["error"]
    # Two attempts, each from the config folder Ray shipped to a node (not from `own`, the driver's copy).
    attempts = [line for line in (folder / "attempts.txt").read_text().split() if line != "broken"]
    assert len(attempts) == 2 and str(own) not in attempts
    local = runs[0]
    fedit = lambda r, key: [x for x in r[key] if x["algorithm"] == "fedit"]  # noqa: E731
    assert strip(fedit(results, "trainings")) == strip(fedit(local, "trainings"))
    assert strip(fedit(results, "cells")) == strip(fedit(local, "cells")) and fedit(results, "cells")
    assert (folder / "flaky/trainings/fedit-none-seed0/attacks").is_dir()  # the driver wrote what the task sent
    assert "MISSING: its training of flaky/none" in (folder / "flaky/report.md").read_text()
    # New evaluation settings: the driver sends the checkpoints to a node to evaluate again, not to retrain,
    # and the attack files (keyed by the training) stay valid.
    fedit_dir = folder / "flaky/trainings/fedit-none-seed0"
    stamps = {name: (fedit_dir / name).stat().st_mtime_ns for name in ("training.json", "evaluation.json")}
    attack_files = {p.name: p.read_bytes() for p in (fedit_dir / "attacks").glob("*.json")}
    config.write_text(config.read_text().replace("records = 4", "records = 3"))
    fedleak("run", config, "--out", folder / "flaky", "--address", address, "--quiet", "--only", "fedit", env=env)
    assert (fedit_dir / "training.json").stat().st_mtime_ns == stamps["training.json"]
    assert (fedit_dir / "evaluation.json").stat().st_mtime_ns != stamps["evaluation.json"]
    assert json.loads((fedit_dir / "evaluation.json").read_text())["utility"]["records"] == 3
    assert {p.name: p.read_bytes() for p in (fedit_dir / "attacks").glob("*.json")} == attack_files


def test_ray_settings_and_flags_are_checked(tmp_path, tiny_run_config, capsys):
    from fedleak.cli import main  # in process: the checks come before anything starts

    config = tmp_path / "run.toml"
    config.write_text(tiny_run_config + MATRIX.replace('"fedit", "slow"', '"fedit"')
                      + '[executor]\nstorage = "nfs"\n')
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "executor.storage" in err and "Traceback" not in err
    config.write_text(tiny_run_config + MATRIX.replace('"fedit", "slow"', '"fedit"'))
    assert main(["run", str(config), "--address", "127.0.0.1:1"]) == 2
    assert "only with --executor ray" in capsys.readouterr().err
    # Nobody listens there: refused before ray.init (which would retry for minutes), so in process too.
    assert main(["run", str(config), "--executor", "ray", "--address", f"127.0.0.1:{free_port()}",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to Ray" in err and "Traceback" not in err
    assert not (tmp_path / "out/results.json").exists()


def test_a_fedleak_error_in_a_task_is_not_retried_and_stops_the_run(cluster, tmp_path):
    folder, config, address, env = cluster
    (tmp_path / "plugs.py").write_text(PLUGIN)
    own = tmp_path / "broken.toml"
    own.write_text(config.read_text().replace('["fedit", "slow"]', '["broken"]') + '[executor]\nmax_retries = 2\n')
    before = (folder / "attempts.txt").read_text().count("broken") if (folder / "attempts.txt").exists() else 0
    proc = fedleak("run", own, "--executor", "ray", "--address", address, "--out", tmp_path / "out", env=env, status=2)
    assert "training of broken/none seed 0 on " in proc.stderr and "broken: set broken.fix = true" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out/results.json").exists()
    assert (folder / "attempts.txt").read_text().count("broken") == before + 1  # one attempt: no retry


def test_a_task_no_node_can_hold_is_an_error_before_anything_runs(cluster, tmp_path):
    folder, config, address, env = cluster
    (tmp_path / "plugs.py").write_text(PLUGIN)
    own = tmp_path / "gpu.toml"
    own.write_text(config.read_text() + '[executor]\ntrain_gpus = 1\n')
    proc = fedleak("run", own, "--executor", "ray", "--address", address, "--out", tmp_path / "out", env=env, status=2)
    assert "executor.train_cpus = 1, train_gpus = 1: no node of the Ray cluster has that much" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from fedleak.common.errors import FedleakError
    from fedleak.eval.ray_executor import check_available

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as it does without the extra
    with pytest.raises(FedleakError, match=r"pip install 'fedleak\[ray\]'"):
        check_available()
