"""The matrix on Ray (`executor.name = "ray"`) against this machine's processes (`--jobs`), side by side.

Six clean trainings of configs/quick.toml (FEDIT under none, median, krum, norm_bound, dp_fedavg and
secagg) with the loss attack on every observer, each run in a fresh output folder, one after the other:

- `--jobs 1` and `--jobs N` (the local executor);
- Ray with one node of `--cpus-per-node` CPUs, then two such nodes (a head and one more `ray start` on this
  machine, as a cluster of two machines would be joined), one CPU per task.

Printed: each run's wall time, the speed-up over `--jobs 1`, Ray on two nodes against `--jobs N` (the ratio
to read), and what Ray adds. Ray on one one-CPU node does the same work as `--jobs 1`, one task at a time;
Ray adds = (its wall - jobs 1's wall) - (its work's own seconds - jobs 1's), the work's own seconds being
each training's and each cell's from results.json (summed per cell they exceed the wall, cells of one view
sharing forward passes, but the same way in both runs). What is left: connecting, the dtype probe, the
progress actor, scheduling, the workers' start-up (imports, model load) and argument and result transfer.
That over the tasks is Ray's overhead per task; the goal is under 1 s per training.

    .venv/bin/python bench/ray_executor.py [--jobs 2] [--cpus-per-node 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quick.toml"
ONLY = tuple(f"fedit/{d}/clean" for d in ("none", "median", "krum*", "norm_bound*", "dp_fedavg*", "secagg"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """A Ray head and `extra` more nodes on this machine, `cpus` CPUs each, stopped (by process group) on exit."""

    def __init__(self, folder: Path, cpus: int, extra: int):
        self.folder, self.cpus, self.extra, self.procs = folder, cpus, extra, []
        self.address = f"127.0.0.1:{free_port()}"

    def _start(self, *args: str) -> None:
        ray = Path(sys.executable).with_name("ray")
        self.procs.append(subprocess.Popen([str(ray), "start", "--block", "--num-cpus", str(self.cpus),
                                            "--disable-usage-stats", *args], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))

    def __enter__(self) -> "RayNodes":
        import ray

        self._start("--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                    "--temp-dir", str(self.folder))
        time.sleep(8)
        for _ in range(self.extra):
            self._start("--address", self.address)
        ray.init(address=self.address, log_to_driver=False)
        deadline = time.time() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 1 + self.extra and time.time() < deadline:
            time.sleep(0.5)
        ray.shutdown()
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # gone already
                pass


def work_seconds(results: dict) -> float:
    """The seconds of the work itself: each training's (train, utility, poisoning) and each cell's."""
    return (sum(t["cost"]["wall_seconds"] for t in results["trainings"])
            + sum(c["cost"]["wall_seconds"] for c in results["cells"]))


def timed(config, out: Path, *, jobs: int = 1) -> tuple[float, dict]:
    """Wall seconds of one fresh run into `out`, and its results."""
    from fedleak.eval.matrix import run_matrix

    start = time.perf_counter()
    results = run_matrix(config, out, config_path=str(CONFIG), progress=False, jobs=jobs, only=ONLY, use_cache=False)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="processes of the local comparison run")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each Ray node")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per task, as Ray gives a one-CPU task

    from fedleak.common.logs import quiet_libraries
    from fedleak.eval.config import load_config
    from fedleak.eval.context import check_data, resolve_model

    quiet_libraries()
    import torch

    torch.set_num_threads(1)
    base = load_config(CONFIG)
    attacks = tuple(dataclasses.replace(a, observers=("global", "upload", "client"))
                    for a in base.matrix.attacks if a.name == "loss")
    config = dataclasses.replace(base, matrix=dataclasses.replace(base.matrix, attacks=attacks))
    resolve_model(config)  # built (or found) before any timing
    check_data(config, CONFIG.parent)
    ray_config = dataclasses.replace(config, executor=dataclasses.replace(config.executor, name="ray"))
    walls, tasks = {}, 0
    with tempfile.TemporaryDirectory(prefix="fedleak-bench-ray-") as tmp:
        folder = Path(tmp)
        walls["jobs 1"], results = timed(config, folder / "j1")
        outside = {"jobs 1": walls["jobs 1"] - work_seconds(results)}
        attacked = {(c["algorithm"], c["defense"], c["scenario"], c["seed"]) for c in results["cells"]}
        tasks = len(results["trainings"]) + len(attacked)
        walls[f"jobs {args.jobs}"], _ = timed(config, folder / "jn", jobs=args.jobs)
        for nodes in (1, 2):
            temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
            with RayNodes(temp, args.cpus_per_node, nodes - 1) as cluster:
                settings = dataclasses.replace(ray_config.executor, address=cluster.address,
                                               train_cpus=1.0, attack_cpus=1.0)
                on_ray = dataclasses.replace(ray_config, executor=settings)
                walls[f"ray {nodes} node(s)"], on_ray_results = timed(on_ray, folder / f"r{nodes}")
                if nodes == 1:
                    outside["ray"] = walls["ray 1 node(s)"] - work_seconds(on_ray_results)
            shutil.rmtree(temp, ignore_errors=True)
    print(f"{len(results['trainings'])} trainings and their loss cells ({len(results['cells'])} cells), "
          f"{tasks} Ray tasks; {os.cpu_count()} CPUs, {args.cpus_per_node} per Ray node")
    for name, wall in walls.items():
        print(f"  {name:<14} {wall:7.1f} s   speed-up over jobs 1: {walls['jobs 1'] / wall:.2f}x")
    print(f"ray on 2 nodes / jobs {args.jobs}: {walls['ray 2 node(s)'] / walls[f'jobs {args.jobs}']:.2f}x (wall)")
    added = outside["ray"] - outside["jobs 1"]
    wall = walls["ray 1 node(s)"] - walls["jobs 1"]
    print(f"ray on 1 node - jobs 1: wall {wall:+.1f} s, the work's own seconds {wall - added:+.1f} s: "
          f"Ray adds {added:.1f} s")
    if args.cpus_per_node == 1:
        print(f"Ray's overhead per task (one task at a time, everything included): {added / tasks:.2f} s "
              f"({added / len(results['trainings']):.2f} s per training with its attack task)")


if __name__ == "__main__":
    main()
