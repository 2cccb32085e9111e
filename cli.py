"""Command line: `fedleak run CONFIG`, `fedleak report RUN_DIR`, `fedleak list`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from fedleak import __version__
from fedleak.federated.errors import FedleakError

log = logging.getLogger("fedleak")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*only one class.*")
    # Opacus's hooks on a frozen base trip torch's full-backward-hook notice; RDP order hints are advice.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the")
    # fedleak measures leakage; reproducible (seeded) noise is the point, not a secure RNG.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_run(args) -> int:
    from fedleak.eval.config import load_config
    from fedleak.eval.matrix import run_matrix
    from fedleak.reports.report import leakage_table, load_results, poisoning_table, write_report

    config = load_config(args.config)
    out = args.out or config.out
    if not out:
        raise FedleakError(f"{args.config}: no output folder: set out = \"runs/NAME\" in the config or pass --out")
    _quiet_libraries()
    run_matrix(config, Path(out), config_path=str(args.config), progress=not args.quiet)
    md, html = write_report(Path(out))
    results = load_results(Path(out))  # the headline tables, from the file (NaN is null there)
    for table in (leakage_table(results), poisoning_table(results)):
        for row in table.rows:
            log.info("%s", "; ".join(f"{h}: {v}" for h, v in zip(table.header, row) if v != "n/a"))
    log.info("wrote %s, %s, %s and %s", Path(out) / "results.json", Path(out) / "results.csv", md, html)
    return 0


def cmd_report(args) -> int:
    from fedleak.reports.report import write_report

    md, html = write_report(Path(args.run_dir))
    log.info("wrote %s and %s", md, html)
    return 0


def cmd_list(args) -> int:
    from fedleak.attacks.base import ATTACKS
    from fedleak.defenses.base import DEFENSES
    from fedleak.federated.rounds import ALGORITHMS

    for title, registry in (("algorithms", ALGORITHMS), ("defenses", DEFENSES), ("attacks", ATTACKS)):
        print(f"{title}:")
        for name in registry.names():
            print(f"  {name:<14} {registry.get(name).summary()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedleak", description="Privacy attacks and defenses for federated instruction tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"fedleak {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="train every (algorithm, defense) of a config, attack, write results and report",
                         description="Train each (algorithm, defense) of the matrix once, evaluate utility, run "
                                     "each attack on the observers' views of the final round, and write "
                                     "results.json, results.csv, report.md and report.html.")
    run.add_argument("config", help="TOML matrix config, e.g. configs/quick.toml")
    run.add_argument("--out", help="output folder (default: the config's `out`)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    run.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="(re)write report.md and report.html from a run's results.json")
    report.add_argument("run_dir", help="output folder of a finished run")
    report.set_defaults(func=cmd_report)
    lst = sub.add_parser("list", help="list registered algorithms, defenses and attacks")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for old in list(log.handlers):  # main() may run more than once in a process (tests, notebooks)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # today's stderr, not the one of an earlier call
    handler.setFormatter(logging.Formatter("fedleak: %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # Opacus configures the root logger on import: our lines would print twice
    log.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return args.func(args)
    except FedleakError as exc:
        print(f"fedleak: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
