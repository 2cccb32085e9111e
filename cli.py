"""Command line: `fedleak run CONFIG`, `fedleak train CONFIG`, `fedleak attack CHECKPOINT_DIR`,
`fedleak report RUN_DIR`, `fedleak list`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

from fedleak import __version__
from fedleak.common.errors import FedleakError
from fedleak.common.logs import LOG_FORMAT, quiet_libraries

log = logging.getLogger("fedleak")


class _LogFile:
    """While a command runs, its log lines also go to `run.log` in the output folder (appended, so a
    resumed run's log follows the interrupted one). A command that fails before writing anything
    leaves the folder as it found it: one it created is removed, a `run.log` or lock file it added
    to an existing folder too."""

    def __init__(self, out: Path):
        self.path = Path(out) / "run.log"

    def __enter__(self):
        from fedleak.common.io import ensure_writable_dir, unwritable

        folder = self.path.parent
        # The topmost folder this command creates (--out a/b/c with no a: a), so a failure removes it all.
        self.created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
        ensure_writable_dir(folder)  # one line, not a traceback, for a folder under a file or read-only
        self.before = {p.name for p in folder.iterdir()}
        try:
            self.handler = logging.FileHandler(self.path, encoding="utf-8")
        except OSError as exc:  # e.g. run.log is a folder or read-only
            self._clean()
            raise unwritable(folder, exc) from None
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        log.addHandler(self.handler)
        return self

    def _clean(self) -> None:
        """Undo what entering did when the command wrote nothing else."""
        from fedleak.eval.cache import LOCK_FILE

        folder = self.path.parent
        added = {p.name for p in folder.iterdir()} - self.before
        if not added <= {self.path.name, LOCK_FILE}:
            return  # the command wrote results or a cache: they stay for a resume
        if self.created is not None:
            shutil.rmtree(self.created)
            return
        for name in added:
            (folder / name).unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:  # the one-line error (or the interruption) ends the log file too
            self.handler.handle(logging.makeLogRecord({"name": log.name, "levelno": logging.ERROR, "levelname": "ERROR",
                                                       "msg": f"stopped: {type(exc).__name__}: {exc}"}))
        log.removeHandler(self.handler)
        self.handler.close()
        if exc is not None:
            self._clean()


def _out(args, config) -> Path:
    out = args.out or config.out
    if not out:
        raise FedleakError(f"{args.config}: no output folder: set out = \"runs/NAME\" in the config or pass --out")
    return Path(out)


def _report(out: Path, *, show_secrets: bool) -> None:
    """Write the report, log the headline tables (from the file: NaN is null there) and what was written."""
    from fedleak.reports.merge import merged
    from fedleak.reports.poisoning import poisoning_table
    from fedleak.reports.report import load_results, write_report
    from fedleak.reports.summary import leakage_table

    md, html = write_report(out, show_secrets=show_secrets)
    run = merged(load_results(out))
    for table in (leakage_table(run), poisoning_table(run)):
        for row in table.rows:
            log.info("%s", "; ".join(f"{h}: {v}" for h, v in zip(table.header, row) if v != "n/a"))
    log.info("wrote %s, %s, %s and %s", out / "results.json", out / "results.csv", md, html)


def _check_data(config, config_path: str, seeds) -> None:
    """Load and split the data of each seed now (cached for the run): a bad data file is a one-line
    error before any output folder, log line or model build."""
    from fedleak.eval.context import check_data

    check_data(config, Path(config_path).parent, seeds)


def cmd_run(args) -> int:
    from fedleak.eval.config import load_config
    from fedleak.eval.matrix import describe, run_matrix
    from fedleak.eval.memory import check_memory
    from fedleak.eval.plan import plan

    config = load_config(args.config)
    if args.engine:
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, name=args.engine))
    if args.executor or args.address is not None:
        executor = dataclasses.replace(config.executor, name=args.executor or config.executor.name)
        if args.address is not None:
            if executor.name != "ray":
                raise FedleakError(f"--address {args.address}: only with --executor ray (or executor.name = \"ray\")")
            executor = dataclasses.replace(executor, address=args.address)
        config = dataclasses.replace(config, executor=executor)
    out = _out(args, config)
    only = tuple(args.only or ())
    if args.dry_run:
        print(describe(config, plan(config, only), out, base_dir=Path(args.config).parent, use_cache=not args.fresh,
                       jobs=args.jobs))
        return 0
    _check_data(config, args.config, config.run_seeds)
    check_memory(config, jobs=args.jobs)  # from the model's config alone: a run that cannot fit stops here
    quiet_libraries()
    with _LogFile(out):
        log.info("fedleak %s: run %s into %s", __version__, args.config, out)
        results = run_matrix(config, out, config_path=str(args.config), progress=not args.quiet, jobs=args.jobs,
                             only=only, use_cache=not args.fresh)
        _report(out, show_secrets=args.show_secrets)
        if results.get("failures"):
            from fedleak.eval.ray_executor import describe_failures

            log.error("%s", describe_failures(results["failures"]))
            return 1
    return 0


def _pick(specs, label: str | None, axis: str):
    from fedleak.federated.registry import did_you_mean

    if label is None:
        return specs[0]
    for spec in specs:
        if label in (spec.label, spec.name):
            return spec
    known = [s.label for s in specs]
    raise FedleakError(f"--{axis} {label}: not in the config's matrix.{axis}s: {did_you_mean(label, known)}"
                       f"known: {', '.join(known)}")


def cmd_train(args) -> int:
    from fedleak.eval.config import load_config
    from fedleak.eval.context import report_data_quality, resolve_model
    from fedleak.eval.plan import NO_DEFENSE, TrainingUnit, _federated
    from fedleak.eval.training_runs import train_unit

    config = load_config(args.config)
    out = _out(args, config)
    algorithm = _pick(config.matrix.algorithms, args.algorithm, "algorithm")
    federated = _federated(algorithm)
    if not federated and (args.defense or args.scenario not in (None, "clean")):
        raise FedleakError(f"--algorithm {algorithm.label} is not federated: it trains without a defense or a "
                           f"poisoning scenario; drop --defense and --scenario")
    defense = _pick(config.matrix.defenses, args.defense, "defense") if federated else NO_DEFENSE
    scenario = None
    if args.scenario not in (None, "clean"):
        if not config.matrix.scenarios:
            raise FedleakError(f"--scenario {args.scenario}: {args.config} declares no matrix.scenarios")
        scenario = _pick(config.matrix.scenarios, args.scenario, "scenario")
    seed = config.run_seeds[0] if args.seed is None else args.seed
    _check_data(config, args.config, [seed])
    quiet_libraries()
    with _LogFile(out):
        model_ref, _ = resolve_model(config)
        report_data_quality(config, Path(args.config).parent, model_ref)  # warnings and truncation, as `run` logs them
        unit = TrainingUnit(algorithm, defense, scenario, seed)
        record, cached = train_unit(config, unit, out, base_dir=Path(args.config).parent, progress=not args.quiet)
        utility = record["utility"].get("global") or record["utility"].get("client_mean") or {}
        log.info("training %s seed %d %s: %s; held-out loss %s", unit.label, seed,
                 "was cached" if cached else f"took {record['train_seconds']:.1f} s", out / record["checkpoint_dir"],
                 f"{utility['loss']:.3f}" if "loss" in utility else "n/a")
    print(out / record["checkpoint_dir"])
    return 0


def cmd_attack(args) -> int:
    from fedleak.eval.config import load_config
    from fedleak.eval.external import attack_checkpoint, checkpoint_rounds

    config = load_config(args.config)
    checkpoint_dir = Path(args.checkpoint_dir)
    checkpoint_rounds(checkpoint_dir)  # a wrong folder or a bad file fails before any output folder exists
    out = Path(args.out) if args.out else checkpoint_dir.parent / f"{checkpoint_dir.name}-attacks"
    _check_data(config, args.config, [config.run_seeds[0] if args.seed is None else args.seed])
    quiet_libraries()
    with _LogFile(out):
        attack_checkpoint(config, checkpoint_dir, out, config_path=str(args.config), algorithm=args.algorithm,
                          seed=args.seed, only=tuple(args.only or ()), progress=not args.quiet,
                          use_cache=not args.fresh)
        _report(out, show_secrets=args.show_secrets)
    return 0


def cmd_flower(args) -> int:
    from fedleak.eval.config import load_config
    from fedleak.eval.flower_engine import check_available

    out = _out(args, load_config(args.config))
    check_available(("flwr",))
    from fedleak.eval.flower_app import submit

    print(submit(args.config, superlink=args.superlink, out=out, training=args.training or "",
                 root_certificates=args.root_certificates, quiet=args.quiet))
    return 0


def cmd_report(args) -> int:
    from fedleak.reports.report import write_report

    md, html = write_report(Path(args.run_dir), show_secrets=args.show_secrets)
    log.info("wrote %s and %s", md, html)
    return 0


def cmd_validate(args) -> int:
    from fedleak.eval.results import validate_file

    results = validate_file(Path(args.results))
    print(f"{args.results}: valid {results.get('schema')} ({len(results.get('trainings', []))} trainings, "
          f"{len(results.get('cells', []))} cells)")
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedleak", description="Privacy attacks and defenses for federated instruction tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"fedleak {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    secrets = argparse.ArgumentParser(add_help=False)
    secrets.add_argument("--show-secrets", action="store_true",
                         help="show patient identifiers and canary secrets in the report (redacted by default)")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars or log lines (warnings and errors only)")
    only = argparse.ArgumentParser(add_help=False)
    only.add_argument("--only", action="append", metavar="PATTERN",
                      help="run a subset: a name (algorithm, defense, scenario or attack) or "
                           "algorithm/defense/scenario/attack globs; repeat to add more")
    run = sub.add_parser("run", parents=[quiet, only, secrets],
                         help="train every training of a config, attack, write results and report",
                         description="Train each (algorithm, defense, scenario, seed) of the matrix once, evaluate "
                                     "utility, run each attack on its observers' views, and write results.json, "
                                     "results.csv, report.md, report.html and run.log. Finished work is cached in the "
                                     "output folder: rerunning resumes, and a new attack runs alone.")
    run.add_argument("config", help="TOML matrix config, e.g. configs/quick.toml")
    run.add_argument("--out", help="output folder (default: the config's `out`)")
    run.add_argument("--jobs", type=_positive, default=1, help="trainings run at once, in processes (default 1)")
    run.add_argument("--dry-run", action="store_true", help="print the trainings, attack cells and work left; run nothing")
    run.add_argument("--fresh", action="store_true", help="ignore cached trainings and attacks (recompute everything)")
    run.add_argument("--engine", choices=("inprocess", "flower"),
                     help="where federated trainings run (default: the config's engine.name): fedleak's own loop, or "
                          "Flower's Simulation Engine (needs fedleak[flower])")
    run.add_argument("--executor", choices=("local", "ray"),
                     help="where trainings and attack cells run (default: the config's executor.name): this machine's "
                          "processes (--jobs), or tasks on Ray (needs fedleak[ray])")
    run.add_argument("--address", help="with --executor ray: the cluster, HOST:PORT of `ray start --head`, "
                                       "ray://HOST:PORT or auto (default: the config's executor.address; \"\": a Ray "
                                       "instance started for the run)")
    run.set_defaults(func=cmd_run)
    train = sub.add_parser("train", parents=[quiet], help="one training of a config: checkpoints only",
                           description="Train one (algorithm, defense, scenario, seed) of the config (the first of "
                                       "each by default) and print its checkpoint folder.")
    train.add_argument("config", help="TOML matrix config")
    train.add_argument("--out", help="output folder (default: the config's `out`)")
    train.add_argument("--algorithm", help="algorithm label or name from matrix.algorithms (default: the first)")
    train.add_argument("--defense", help="defense label or name from matrix.defenses (default: the first)")
    train.add_argument("--scenario", help="poisoning scenario from matrix.scenarios (default: clean)")
    train.add_argument("--seed", type=int, help="seed (default: the config's first)")
    train.set_defaults(func=cmd_train)
    attack = sub.add_parser("attack", parents=[quiet, only, secrets], help="run a config's attacks on existing checkpoints",
                            description="Run the config's privacy attacks on one training's checkpoints (a "
                                        "trainings/<name> folder of a run, or another tool's checkpoints in the "
                                        "documented layout) and write results and a report.")
    attack.add_argument("checkpoint_dir", help="folder holding round-XXXX/manifest.json")
    attack.add_argument("--config", required=True, help="TOML config: model, data, federation and attacks")
    attack.add_argument("--out", help="output folder (default: CHECKPOINT_DIR-attacks beside it)")
    attack.add_argument("--algorithm", help="for checkpoints without training.json: the algorithm (default fedit)")
    attack.add_argument("--seed", type=int, help="for checkpoints without training.json: the data seed")
    attack.add_argument("--fresh", action="store_true", help="ignore cached attack results in the output folder")
    attack.set_defaults(func=cmd_attack)
    flower = sub.add_parser("flower", parents=[quiet], help="train one training on a deployed Flower federation",
                            description="Submit one training of the config to a running Flower SuperLink (one "
                                        "SuperNode per client, each started with --node-config \"partition-id=I "
                                        "data-file=F out-dir=D\"): the server's views are written under "
                                        "OUT/trainings/<name>, each client's view in its node's out-dir.")
    flower.add_argument("config", help="TOML matrix config, as the SuperLink's machine sees it")
    flower.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT (flower-superlink --port)")
    flower.add_argument("--out", help="the server's output folder (default: the config's `out`)")
    flower.add_argument("--training", help="algorithm/defense[/scenario] label (default: the first federated one)")
    flower.add_argument("--root-certificates", help="CA certificate of a TLS SuperLink (default: insecure, "
                                                     "for loopback tests only)")
    flower.set_defaults(func=cmd_flower)
    report = sub.add_parser("report", parents=[secrets], help="(re)write report.md and report.html from results.json")
    report.add_argument("run_dir", help="output folder of a finished run")
    report.set_defaults(func=cmd_report)
    validate = sub.add_parser("validate", help="check a results.json against fedleak's results schema",
                              description="Check a results.json (or the run folder holding one) against "
                                          "results.schema.json, e.g. one written by another tool or edited by hand.")
    validate.add_argument("results", help="results.json or the run folder holding it")
    validate.set_defaults(func=cmd_validate)
    lst = sub.add_parser("list", help="list registered algorithms, defenses and attacks")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for old in list(log.handlers):  # main() may run more than once in a process (tests, notebooks)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # today's stderr, not the one of an earlier call
    handler.setFormatter(logging.Formatter("fedleak: %(message)s"))
    handler.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    log.addHandler(handler)
    log.propagate = False  # Opacus configures the root logger on import: our lines would print twice
    log.setLevel(logging.INFO)  # the log file gets every line, also with --quiet
    try:
        return args.func(args)
    except FedleakError as exc:
        # One line, whatever a plug-in's or a library's message carried along.
        print(f"fedleak: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not exc.filename:
            raise  # not about a file the user named: a bug, keep its traceback
        # Last resort for a file no check above caught (permissions, a folder where a file belongs).
        print(f"fedleak: error: {exc.filename}: {exc.strerror or type(exc).__name__}: check that the path exists, "
              f"is the right kind (file or folder) and that you may read and write it", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return 130
    finally:  # a later in-process call (tests, notebooks) must not write to this call's stderr
        log.removeHandler(handler)
        log.propagate = True


if __name__ == "__main__":
    sys.exit(main())
