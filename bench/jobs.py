"""`fedleak run --jobs N` against `--jobs 1`, and a rerun from the cache against the first run, side by side.

The same trainings of configs/quick.toml (FEDIT clean and under both poisoning scenarios, no attacks),
each in a fresh output folder, one run after the other in this process; the ratios are what to read.
On a machine with few cores, parallel trainings contend for memory bandwidth and may be slower.

    .venv/bin/python bench/jobs.py [--jobs 2] [--only 'fedit/none/*' --only 'fedit/median/*']
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from fedleak.common.logs import quiet_libraries
from fedleak.eval.config import load_config
from fedleak.eval.context import resolve_model
from fedleak.eval.matrix import run_matrix

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quick.toml"


def timed_run(config, out: Path, *, jobs: int, only: tuple[str, ...]) -> float:
    start = time.perf_counter()
    run_matrix(config, out, config_path=str(CONFIG), progress=False, jobs=jobs, only=only)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", action="append", help="training patterns (default: FEDIT under none and median)")
    args = parser.parse_args()
    quiet_libraries()
    config = load_config(CONFIG)
    config = dataclasses.replace(config, matrix=dataclasses.replace(config.matrix, attacks=()))  # trainings only
    only = tuple(args.only or ("fedit/none/*", "fedit/median/*"))
    resolve_model(config)  # the model build is not what is timed
    with tempfile.TemporaryDirectory() as tmp:
        serial = timed_run(config, Path(tmp) / "serial", jobs=1, only=only)
        cached = timed_run(config, Path(tmp) / "serial", jobs=1, only=only)
        parallel = timed_run(config, Path(tmp) / "parallel", jobs=args.jobs, only=only)
    print(f"trainings {only}: --jobs 1 {serial:.1f} s, --jobs {args.jobs} {parallel:.1f} s "
          f"(ratio {parallel / serial:.2f}x), rerun from the cache {cached:.1f} s ({cached / serial:.3f}x)")


if __name__ == "__main__":
    main()
