"""Flower's Simulation Engine against fedleak's in-process round loop, side by side on one machine.

The demo's model and data (configs/quick.toml; 6 private records per client), FEDIT without a defense,
4 rounds of 1 local epoch, 10 clients training per round. Each case runs in a fresh process (so its memory is its own), one after the
other; a sampling thread records the peak resident memory of the process and every process it started
(Ray's GCS, raylet and workers included). Printed:

- a round after start-up (rounds 2-4), Flower against in-process, with 10 clients: the ratio to read;
- Flower's start-up: Ray, the virtual nodes and the partition query, until round 1 starts, plus each
  worker's one-off model load (round 1 minus a later round);
- Flower with 10, 100 and 1000 virtual clients (client_fraction = 10 / clients): time per round and peak
  memory, which must not grow with the number of clients.

    .venv/bin/python bench/flower.py [--clients 10 100 1000] [--num-cpus 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quick.toml"
PER_ROUND = 10


class PeakMemory:
    """Peak resident memory (MiB) of this process and all its descendants, sampled every 0.1 s."""

    def __init__(self):
        import psutil

        self.root, self.peak, self.stop = psutil.Process(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import psutil

        while not self.stop.is_set():
            total = 0
            for proc in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a process that just ended
                    pass
            self.peak = max(self.peak, total / 2**20)
            self.stop.wait(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def case(engine: str, clients: int, num_cpus: float) -> dict:
    """One training in this process; its round times, start-up and peak memory."""
    import dataclasses

    from fedleak.common.logs import quiet_libraries
    from fedleak.common.params import instantiate
    from fedleak.eval.config import build_defense, load_config
    from fedleak.eval.context import seed_context
    from fedleak.eval.plan import all_trainings
    from fedleak.federated.loop import run_rounds
    from fedleak.federated.model import shared_base_model
    from fedleak.federated.rounds import ALGORITHMS, TrainingSetup

    quiet_libraries()
    config = load_config(CONFIG)
    data = config.data
    embedded = dataclasses.replace(data.embedded, private_records=6 * clients)
    config = dataclasses.replace(
        config, data=dataclasses.replace(data, embedded=embedded),
        federation=dataclasses.replace(config.federation, clients=clients, client_fraction=PER_ROUND / clients,
                                       rounds=4, local_epochs=1, partition="iid", min_records_per_client=2),
        matrix=dataclasses.replace(config.matrix, algorithms=config.matrix.algorithms[:1],
                                   defenses=config.matrix.defenses[:1], scenarios=(), include=(), exclude=()),
        engine=dataclasses.replace(config.engine, name=engine, num_cpus=num_cpus))
    unit = all_trainings(config)[0]
    ctx = seed_context(config, unit.seed, CONFIG.parent)
    base_model, tokenizer = shared_base_model(ctx.model_ref, **config.model.load_options())
    with tempfile.TemporaryDirectory() as out, PeakMemory() as memory:
        setup = TrainingSetup(base_model=base_model, tokenizer=tokenizer, data=ctx.data, federation=config.federation,
                              adapter=config.model.adapter, hooks=build_defense(unit.defense, "bench"), seed=0,
                              out_dir=Path(out), config_hash=f"bench-{engine}-{clients}", progress=False)
        algorithm = instantiate(ALGORITHMS.get(unit.algorithm.name), unit.algorithm.kwargs, "bench")
        start = time.perf_counter()
        if engine == "flower":
            from fedleak.eval.flower_engine import flower_rounds

            run = flower_rounds(setup, algorithm, ctx.config, unit, base_dir=CONFIG.parent, model_ref=ctx.model_ref)
        else:
            run = run_rounds(setup, algorithm)
        total = time.perf_counter() - start
    rounds = [r["seconds"] for r in run.history]
    return {"engine": engine, "clients": clients, "per_round": len(run.history[0]["clients"]), "rounds": rounds,
            "startup": total - sum(rounds), "total": total, "peak_mib": memory.peak}


def run_case(engine: str, clients: int, num_cpus: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", engine, "--clients", str(clients),
                           "--num-cpus", str(num_cpus)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{engine} with {clients} clients failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Flower client (Ray)")
    parser.add_argument("--case", choices=("inprocess", "flower"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.clients[0], args.num_cpus)))
        return
    inprocess = run_case("inprocess", PER_ROUND, args.num_cpus)
    flower = {n: run_case("flower", n, args.num_cpus) for n in args.clients}
    first = flower[min(flower)]
    steady = lambda r: sum(r["rounds"][1:]) / len(r["rounds"][1:])  # noqa: E731 (rounds after start-up)
    print(f"{PER_ROUND} clients per round, 4 rounds of 1 local epoch, FEDIT on the demo's model; "
          f"Flower: {args.num_cpus:g} CPU per client")
    print(f"round after start-up: in-process {steady(inprocess):.2f} s, Flower {steady(first):.2f} s "
          f"-> Flower / in-process {steady(first) / steady(inprocess):.2f}x (goal <= 1.3x)")
    print(f"Flower start-up: {first['startup']:.1f} s before round 1, plus {first['rounds'][0] - steady(first):.1f} s "
          f"of one-off worker set-up in round 1; in-process start-up {inprocess['startup']:.1f} s")
    print(f"{'clients':>8} {'per round':>9} {'s/round':>8} {'start-up s':>10} {'peak MiB':>9}")
    print(f"{'in-proc':>8} {inprocess['per_round']:>9} {steady(inprocess):>8.2f} {inprocess['startup']:>10.1f} "
          f"{inprocess['peak_mib']:>9.0f}")
    for n, r in flower.items():
        print(f"{n:>8} {r['per_round']:>9} {steady(r):>8.2f} {r['startup']:>10.1f} {r['peak_mib']:>9.0f}")
    if len(flower) > 1:
        print(f"peak memory, {max(flower)} against {min(flower)} clients: "
              f"{flower[max(flower)]['peak_mib'] / first['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
