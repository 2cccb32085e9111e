"""The run machinery on a matrix that trains in seconds: cache, resume after kill -9, --jobs, --only,
--dry-run, seeds, the results schema, `fedleak train` and `fedleak attack`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedleak.eval.results import validate_results

MATRIX = """
[matrix]
algorithms = ["fedit", "locit"]
defenses = ["none", "median"]
attacks = [{ name = "loss", observers = ["global"], rounds = "all" }, { name = "loss", observers = ["upload", "client"] },
           { name = "zlib", observers = ["global"] }]
exclude = [{ defense = "median", observer = "!global" }]
"""
TIMING_KEYS = {"started_at", "finished_at", "machine", "timings", "cost", "seconds", "train_seconds",
               "utility_seconds", "config_path"}


@pytest.fixture(scope="module")
def env():
    # One thread per run: numbers depend on torch's thread count, and these runs must agree exactly.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_run_config):
    path = tmp_path_factory.mktemp("matrix") / "run.toml"
    path.write_text("seeds = [0, 1]\n" + tiny_run_config + MATRIX)
    return path


def fedleak(*args, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "fedleak", *map(str, args)], capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cli(capsys, *args):
    """`fedleak ARGS` in this process: the same `main` the command runs, without a new interpreter's ~12 s of
    imports (the tests that need a process of their own, a kill or a lock held by this one, use `fedleak`)."""
    from types import SimpleNamespace

    from fedleak.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(config_path, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    fedleak("run", config_path, "--out", out, "--quiet", env=env)
    return out


def test_results_follow_the_schema_with_seeds_and_costs(reference):
    results = results_of(reference)
    validate_results(results)
    assert results["seeds"] == [0, 1] and results["machine"]["torch_threads"] == 1
    assert [(t["algorithm"], t["defense"], t["seed"]) for t in results["trainings"]] == [
        (a, d, s) for s in (0, 1) for a, d in (("fedit", "none"), ("fedit", "median"), ("locit", "none"))]
    # The observer rule: median trainings are attacked on the global view only; LocIT has no global view.
    views = {(c["algorithm"], c["defense"], c["observer"]) for c in results["cells"] if c["attack"] == "loss"}
    assert views == {("fedit", "none", "global"), ("fedit", "none", "upload"), ("fedit", "none", "client"),
                     ("fedit", "median", "global"), ("locit", "none", "client")}
    keys = [tuple(c[k] for k in ("algorithm", "defense", "seed", "attack", "observer", "client", "round"))
            for c in results["cells"]]
    assert len(keys) == len(set(keys))  # loss is listed twice (disjoint observers): each cell once
    assert sorted(r for a, d, s, at, o, c, r in keys if (a, d, s, at, o) == ("fedit", "none", 0, "loss", "global")) \
        == [0, 1, 2]
    # Across seeds: each aggregate's mean is the mean of its per-seed cells.
    for agg in results["aggregates"]:
        per_seed = [c["metrics"]["auc"] for c in results["cells"]
                    if all(c[k] == agg[k] for k in ("algorithm", "defense", "attack", "observer", "client", "round"))]
        assert agg["seeds"] == [0, 1] and len(per_seed) == 2
        assert agg["metrics"]["auc"]["mean"] == pytest.approx(sum(per_seed) / 2)
        assert agg["metrics"]["auc"]["ci_low"] <= agg["metrics"]["auc"]["mean"] <= agg["metrics"]["auc"]["ci_high"]
    fedit = results["trainings"][0]
    assert fedit["cost"]["upload_bytes_per_client_per_round"] > 0
    assert results["trainings"][2]["cost"]["upload_bytes_per_client_per_round"] is None  # LocIT uploads nothing
    assert (reference / "run.log").read_text().count("training fedit/none seed 0") == 1
    bad = json.loads(json.dumps(results))
    bad["cells"][0]["observer"] = "spy"
    with pytest.raises(ValueError, match="observer"):
        validate_results(bad)


def test_fedleak_validate_accepts_a_run_and_refuses_a_broken_results_file(reference, capsys, tmp_path):
    ok = cli(capsys, "validate", reference)
    assert f"{reference}: valid fedleak-results/" in ok.stdout
    bad = results_of(reference)
    bad["cells"][0]["observer"] = "spy"
    (tmp_path / "results.json").write_text(json.dumps(bad))
    (tmp_path / "broken.json").write_text('{"schema": ')
    for path, why in ((tmp_path / "results.json", "observer"), (tmp_path / "broken.json", "not JSON"),
                      (tmp_path / "missing.json", "not found")):
        proc = cli(capsys, "validate", path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert str(path) in proc.stderr and why in proc.stderr and "Traceback" not in proc.stderr


def test_kill_9_then_rerun_gives_the_uninterrupted_results(reference, config_path, env, tmp_path, capsys, one_thread):
    # The median's two trainings: the first finishes, the second is killed in its first rounds.
    only = ("--only", "median")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedleak", "run", str(config_path), "--out", str(out), "--quiet",
                             *only], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill in the middle of a training, after an earlier one finished.
    while time.time() < deadline and proc.poll() is None:
        done = list(out.glob("trainings/*/training.json"))
        if done and list(out.glob("trainings/.*.partial-*/round-0001")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    finished = {p.parent.name for p in out.glob("trainings/*/training.json")}
    assert len(finished) == 1
    again = cli(capsys, "run", config_path, "--out", out, "--quiet", *only)  # in process: only the kill needs one
    assert again.returncode == 0, again.stderr[-3000:]
    log = (out / "run.log").read_text()
    labels = [name.rsplit("-seed", 1)[0].replace("-", "/") + " seed " + name.rsplit("-seed", 1)[1] for name in finished]
    assert all(f"training {label}: cached" in log for label in labels)
    rerun, ref = results_of(out), results_of(reference)
    for key in ("trainings", "cells"):
        assert without_timings(rerun[key]) == without_timings([x for x in ref[key] if x["defense"] == "median"])
    assert not list(out.glob("trainings/.*"))  # the killed training's scratch folder was replaced


def test_a_new_attack_runs_alone_and_jobs_2_gives_the_same_numbers(reference, config_path, env, tmp_path, capsys,
                                                                   one_thread):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("trainings/*/*.json")}
    extended = tmp_path / "run.toml"
    extended.write_text(config_path.read_text().replace('{ name = "zlib"', '{ name = "min_k" }, { name = "zlib"'))
    assert cli(capsys, "run", extended, "--out", out, "--quiet").returncode == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no training or evaluation redone
    log = (out / "run.log").read_text()
    log = log[log.rindex(": run "):]  # the second run's lines
    assert "attacks on fedit/none seed 0: 1 run, 3 cached" in log and log.count(": cached") == 6
    new, old = results_of(out), results_of(reference)
    assert [without_timings(c) for c in new["cells"] if c["attack"] != "min_k"] == without_timings(old["cells"])
    assert {c["algorithm"] for c in new["cells"] if c["attack"] == "min_k"} == {"fedit"}

    # Two processes on the median's two seeds (the worker pool and its merge are the same for more).
    parallel = tmp_path / "parallel"
    fedleak("run", config_path, "--out", parallel, "--quiet", "--jobs", "2", "--only", "median", env=env)
    par = results_of(parallel)
    assert par["machine"]["jobs"] == 2 and {t["seed"] for t in par["trainings"]} == {0, 1}
    for key in ("trainings", "cells"):
        assert without_timings(par[key]) == without_timings([x for x in old[key] if x["defense"] == "median"])


def test_dry_run_and_only(reference, config_path, capsys):
    dry = cli(capsys, "run", config_path, "--out", reference, "--dry-run").stdout
    assert "training fedit/median seed 1: cached" in dry and "6 trainings (0 to train" in dry
    assert "(0 to run)" in dry
    only = cli(capsys, "run", config_path, "--out", reference.parent / "nothing", "--dry-run", "--only",
               "median").stdout
    assert [line.split(":")[0] for line in only.splitlines() if line.startswith("training")] == [
        "training fedit/median seed 0", "training fedit/median seed 1"]
    assert "2 trainings (2 to train" in only and not (reference.parent / "nothing").exists()
    zlib = cli(capsys, "run", config_path, "--out", reference, "--dry-run", "--only", "fedit/none/clean/zlib").stdout
    assert "attack zlib" in zlib and "attack loss" not in zlib and "seed 1" in zlib
    bad = cli(capsys, "run", config_path, "--out", reference, "--dry-run", "--only", "medain")
    assert bad.returncode == 2 and "did you mean 'median'" in bad.stderr and "Traceback" not in bad.stderr


def test_only_runs_a_subset(config_path, capsys, one_thread, tmp_path):
    assert cli(capsys, "run", config_path, "--out", tmp_path, "--quiet", "--only", "locit").returncode == 0
    results = results_of(tmp_path)
    assert {t["algorithm"] for t in results["trainings"]} == {"locit"} and results["only"] == ["locit"]
    assert results["cells"] and {c["algorithm"] for c in results["cells"]} == {"locit"}
    # LOCIT has no global model: its clients' views only, and utility per client
    assert {c["observer"] for c in results["cells"]} == {"client"}
    assert all("global" not in t["utility"] and t["utility"]["clients"] for t in results["trainings"])


def test_train_then_attack_its_checkpoints_and_a_foreign_copy(reference, config_path, capsys, one_thread,
                                                              tmp_path):
    out = tmp_path / "trained"
    printed = cli(capsys, "train", config_path, "--out", out, "--defense", "none", "--seed", "1",
                  "--quiet").stdout.strip()
    training = Path(printed)
    assert training == out / "trainings" / "fedit-none-seed1" and (training / "training.json").exists()
    ref_cells = [c for c in results_of(reference)["cells"]
                 if (c["algorithm"], c["defense"], c["seed"]) == ("fedit", "none", 1)]
    attacked = cli(capsys, "attack", training, "--config", config_path, "--out", tmp_path / "a", "--quiet")
    assert attacked.returncode == 0
    cells = results_of(tmp_path / "a")["cells"]
    validate_results(results_of(tmp_path / "a"))
    assert without_timings(cells) == without_timings(ref_cells)
    # `attack` counts the answers cut at max_length as `run` does (the same data, the same tokenizer).
    assert results_of(tmp_path / "a")["data"]["truncation"] == results_of(reference)["data_per_seed"]["1"]["truncation"]
    # Another tool's checkpoints: the round folders alone (no training.json), the algorithm named.
    foreign = tmp_path / "foreign"
    for folder in training.glob("round-*"):
        shutil.copytree(folder, foreign / folder.name)
    assert cli(capsys, "attack", foreign, "--config", config_path, "--algorithm", "fedit", "--seed", "1", "--out",
               tmp_path / "b", "--quiet").returncode == 0
    metrics = {(c["attack"], c["observer"], c["client"]): c["metrics"] for c in results_of(tmp_path / "b")["cells"]}
    assert metrics == {(c["attack"], c["observer"], c["client"]): c["metrics"] for c in ref_cells}
    assert (tmp_path / "b" / "report.html").exists()
    # Another seed says other clients trained on other records: nothing cached under the first is reused.
    assert cli(capsys, "attack", foreign, "--config", config_path, "--algorithm", "fedit", "--seed", "0", "--out",
               tmp_path / "b", "--quiet").returncode == 0
    reseeded = results_of(tmp_path / "b")["cells"]
    assert {c["seed"] for c in reseeded} == {0} and [c["metrics"] for c in reseeded] != [c["metrics"] for c in ref_cells]
    missing = cli(capsys, "attack", tmp_path, "--config", config_path)
    assert missing.returncode == 2 and "no round-XXXX/manifest.json" in missing.stderr


def test_one_process_per_output_folder_and_clear_train_errors(config_path, env, capsys, tmp_path):
    from fedleak.eval.cache import run_lock

    out = tmp_path / "busy"
    with run_lock(out):  # held as a running `fedleak run` would hold it
        busy = fedleak("run", config_path, "--out", out, "--quiet", env=env, check=False)
    assert busy.returncode == 2 and "another fedleak process" in busy.stderr and "Traceback" not in busy.stderr
    assert not (out / "trainings").exists()
    bad = cli(capsys, "train", config_path, "--out", tmp_path / "t", "--algorithm", "locit", "--defense",
              "median")
    assert bad.returncode == 2 and "locit is not federated" in bad.stderr and not (tmp_path / "t").exists()
    typo = cli(capsys, "train", config_path, "--out", tmp_path / "t", "--defense", "mediam")
    assert typo.returncode == 2 and "did you mean 'median'" in typo.stderr


def test_the_cache_key_follows_the_code_of_plug_ins(tmp_path, monkeypatch):
    from fedleak.eval.cache import code_fingerprint

    (tmp_path / "my_plugin.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code_fingerprint.cache_clear()
    before = code_fingerprint(("my_plugin",))
    assert before != code_fingerprint()
    (tmp_path / "my_plugin.py").write_text("X = 2\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(("my_plugin",)) != before
