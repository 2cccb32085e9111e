"""Flower's Simulation Engine (`fedleak run --engine flower`) against fedleak's own round loop: the same
checkpoints, privacy accounting and attack cells; a crashed client recorded and the round completed; the
message records and the per-node state that carry adapters, results and client memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedleak.common.errors import FedleakError
from fedleak.eval.results import validate_results
from tests.flower_reference import MATRIX

# The matrix (tests/flower_reference.py) and its in-process run are shared with test_flower_deployment.py. The Flower
# run also trains `crashy` (below): one Simulation Engine start fewer than a run of its own.
CRASHY = '''
from fedleak.federated.fedit import FedIT
from fedleak.federated.rounds import register_algorithm


@register_algorithm("crashy")
class Crashy(FedIT):
    """FEDIT whose client 1 crashes in round 2."""

    def client_round(self, ctx):
        if ctx.client == 1 and ctx.round == 2:
            raise RuntimeError("client 1 lost its disk")
        return super().client_round(ctx)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # One torch thread in this run and in every Flower client: the same float order, so the same adapters.
    home = tmp_path_factory.mktemp("flwr-home")
    return {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(home), "RAY_DISABLE_USAGE_STATS": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1"}


def fedleak(*args, env, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "fedleak", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run_config, env, flower_inprocess):
    """(in-process run, Flower run); the Flower run's config adds `crashy` under no defense."""
    folder = tmp_path_factory.mktemp("flower")
    (folder / "crashy.py").write_text(CRASHY)
    with_crashy = folder / "crashy.toml"
    with_crashy.write_text('plugins = ["crashy"]\n' + tiny_run_config + MATRIX.replace(
        'algorithms = ["fedit",', 'algorithms = ["crashy", "fedit",').replace(
        "include = [", 'include = [\n    { algorithm = "crashy", defense = "none", scenario = "clean" },')
        # One Ray CPU: one actor per Simulation Engine start, not two, each importing torch and peft; the three
        # virtual SuperNodes take turns in it (a client's state lives in its node's Context, not in the actor).
        + "[engine]\ntotal_cpus = 1\n")
    crashed = fedleak("run", with_crashy, "--out", folder / "flower", "--quiet", "--engine", "flower", env=env)
    return flower_inprocess, folder / "flower", crashed


def without_crashy(run: dict) -> dict:
    return {**run, **{key: [x for x in run[key] if x["algorithm"] != "crashy"] for key in ("trainings", "cells")}}


def results(folder: Path) -> dict:
    """results.json without the Flower run's `crashy` training."""
    return without_crashy(json.loads((folder / "results.json").read_text()))


def checkpoints(folder: Path) -> list[Path]:
    files = [p.relative_to(folder) for p in folder.glob("trainings/*/round-*/*.safetensors")]
    return sorted(f for f in files if "secagg" not in f.parts[1] and "crashy" not in f.parts[1])


def test_flower_writes_the_same_checkpoints_as_the_inprocess_loop(runs):
    inprocess, flower, _ = runs
    files = checkpoints(inprocess)
    assert len({f.parts[1] for f in files}) == 2 and any("upload" in f.name for f in files)
    assert files == checkpoints(flower)
    worst, moved = 0.0, 0.0
    for name in files:
        a, b = load_file(inprocess / name), load_file(flower / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (name, key)
            worst = max(worst, (a[key] - b[key]).abs().max().item())
        if name.name == "global.safetensors" and name.parent.name == "round-0002":
            start = load_file(inprocess / name.parent.with_name("round-0000") / name.name)
            moved = max(moved, *((a[k] - start[k]).abs().max().item() for k in a))
    assert moved > 1e-3  # the adapters trained: equal checkpoints are not two untouched initialisations
    print(f"largest difference between the engines: {worst:.2e} (adapters moved up to {moved:.2e})")


def test_flower_gives_the_same_cells_privacy_and_history(runs):
    inprocess, flower = (results(f) for f in runs[:2])
    cells = lambda r: [c["metrics"] for c in r["cells"] if c["defense"] != "secagg"]  # noqa: E731
    # FEDPIT's 15 (every view, every round) and the backdoored FEDIT's global one (a scenario's trainings are attacked
    # on the global view)
    assert cells(inprocess) == cells(flower) and len(cells(flower)) == 16
    assert len(inprocess["trainings"]) == len(flower["trainings"]) == 3
    for a, b in zip(inprocess["trainings"], flower["trainings"]):
        if a["defense"] == "secagg":
            continue
        assert (a["cost"]["engine"], b["cost"]["engine"]) == ("inprocess", "flower")
        assert a["privacy"] == b["privacy"] and a["utility"] == b["utility"] and a["synthetic"] == b["synthetic"]
        assert a["poisoning"]["backdoors"] == b["poisoning"]["backdoors"]
        assert a["synthetic_examples"] == b["synthetic_examples"] and a["views"] == b["views"]
        assert len(a["rounds"]) == len(b["rounds"]) == 2
        for ra, rb in zip(a["rounds"], b["rounds"]):  # every entry of the history but its timing
            assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    fedpit = next(t for t in flower["trainings"] if t["algorithm"].startswith("fedpit"))
    # The accountant continued across rounds in each node's state: both rounds charged, the budget met.
    assert all(len(h) >= 2 for h in fedpit["privacy"]["record_level_accounting"].values())
    assert 7.0 < fedpit["privacy"]["record_level_epsilon"] <= 8.0
    backdoor = next(t for t in flower["trainings"] if t["scenario"] == "backdoor")
    assert all(r["malicious_clients"] == [1] for r in backdoor["rounds"])
    validate_results(flower)


def test_secure_aggregation_on_flower_is_secagg_plus_and_hides_every_upload(runs):
    inprocess, flower, _ = runs
    name = "trainings/fedit-secagg-seed0"
    assert not list((flower / name).glob("round-*/upload-*")) and not list((flower / name).glob("round-*/*client*"))
    trained = json.loads((flower / name / "training.json").read_text())
    assert trained["views"] == ["global"] and trained["engine"] == "flower"
    assert [r["aggregated"] for r in trained["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    # Round 1 starts from the same adapter on both engines: the secure mean is FedAvg's up to SecAgg+'s
    # quantisation (2 x 8 / 2**22 per level, over weights scaled by the largest client's records).
    a, b = (load_file(f / name / "round-0001/global.safetensors") for f in (inprocess, flower))
    error = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < error < 2e-5, error
    a, b = (load_file(f / name / "round-0002/global.safetensors") for f in (inprocess, flower))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2  # then two trainings from near-equal starts
    observers = {c["observer"] for c in results(flower)["cells"] if c["defense"] == "secagg"}
    assert observers == {"global"}  # nothing else exists to attack


def test_what_secagg_plus_cannot_run_is_a_config_error(tiny_run_config, tmp_path):
    from fedleak.eval.config import load_config
    from fedleak.eval.flower_engine import check_unit
    from fedleak.eval.plan import all_trainings

    path = tmp_path / "run.toml"
    path.write_text(tiny_run_config + """
[matrix]
algorithms = ["fedit"]
defenses = [["secagg", { name = "norm_bound", max_norm = 1.0 }], "secagg"]
attacks = [{ name = "loss", observers = ["global"] }]
scenarios = [{ name = "boost", clients = [1], attacks = [{ name = "scaling", boost = 2.0 }] }]
""")
    config = load_config(path)
    units = {u.label: u for u in all_trainings(config)}
    with pytest.raises(FedleakError, match="norm_bound runs before_aggregation on individual uploads"):
        check_unit(config, units["fedit/secagg+norm_bound(max_norm=1.0)"])
    with pytest.raises(FedleakError, match="boost rewrites uploads on the server"):
        check_unit(config, units["fedit/secagg/boost"])
    assert check_unit(config, units["fedit/secagg"])["clipping_range"] == 8.0


def test_a_crashed_client_is_recorded_and_its_round_completes(runs):
    _, out, proc = runs
    run = json.loads((out / "results.json").read_text())
    rounds = next(t for t in run["trainings"] if t["algorithm"] == "crashy")["rounds"]
    assert "failed" not in rounds[0] and rounds[0]["aggregated"] == [0, 1, 2]
    assert rounds[1]["failed"] == {"1": "RuntimeError: client 1 lost its disk"}
    assert rounds[1]["uploads"] == [0, 2] and rounds[1]["aggregated"] == [0, 2]
    assert (out / "trainings/crashy-none-seed0/round-0002/manifest.json").exists()
    assert "client 1 failed (RuntimeError: client 1 lost its disk)" in proc.stderr
    report = (out / "report.md").read_text()
    assert "Client 1 failed in round 2 of crashy/none/clean seed 0 (RuntimeError: client 1 lost its disk)" in report
    assert "ran on Flower's Simulation Engine" in report
    validate_results(run)


def test_secagg_refuses_an_adapter_its_clipping_would_change():
    from fedleak.federated.flower.secagg import check_clipping

    check_clipping({"a": torch.tensor([-8.0, 3.0])}, clipping_range=8.0, rnd=1)
    with pytest.raises(FedleakError, match=r"round 2: the global adapter holds values up to 12.5, beyond "
                                           r"engine.secagg_clipping_range = 8.*raise engine.secagg_clipping_range to 25"):
        check_clipping({"a": torch.tensor([1.0]), "prompt_embeddings": torch.tensor([[-12.5, 0.0]])},
                       clipping_range=8.0, rnd=2)


def test_flower_engine_without_the_extra_names_the_install(monkeypatch):
    import importlib.util

    from fedleak.eval import flower_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(FedleakError, match=r"needs ray: pip install 'fedleak\[flower\]'"):
        flower_engine.check_available()


def test_engine_settings_are_checked(tmp_path):
    from fedleak.eval.config import load_config

    path = tmp_path / "bad.toml"
    path.write_text('[engine]\nname = "ray"\n')
    with pytest.raises(FedleakError, match="engine.name"):
        load_config(path)
    path.write_text('[engine]\nnum_gpus = -1\n')
    with pytest.raises(FedleakError, match="engine.num_gpus"):
        load_config(path)


def test_records_carry_adapters_results_and_client_memory_exactly():
    from flwr.app import RecordDict

    from fedleak.federated.data import Record
    from fedleak.federated.flower import records
    from fedleak.federated.rounds import GLOBAL, ClientResult

    state = {"a.lora_A.weight": torch.randn(4, 3), "b.lora_B.weight": torch.randn(3, 4).to(torch.bfloat16)}
    arrays, dtypes = records.to_arrays(state)
    back = records.from_arrays(arrays, dtypes)
    assert all(back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]) for k in state)

    record = Record("Do it.", "", "Done.", "notes", "r-1", identifiers=("Ann Lee",), identifier_types=("name",))
    result = ClientResult(upload=state, num_examples=7, view={"default": GLOBAL, "local": state},
                          metrics={"loss_last_quarter": 1.5, "selfgen": {"accepted": 2}},
                          artifacts={"synthetic": [{"instruction": "x"}]})
    got, privacy = records.read_result(records.result_content(result, {"epsilon": 1.0}))
    assert privacy == {"epsilon": 1.0} and got.num_examples == 7 and got.view["default"] is GLOBAL
    assert got.view["local"] is got.upload  # sent once, one object: the server writes one file for both views
    assert torch.equal(got.view["local"]["b.lora_B.weight"], state["b.lora_B.weight"])
    assert got.metrics == result.metrics and got.artifacts == result.artifacts

    node = RecordDict()
    records.store_client_state(node, {"local": state, "synthetic": [record]}, {"sigma": 1.2}, key="t1")
    memory, hooks = records.load_client_state(node, key="t1")
    assert memory["synthetic"] == [record] and hooks == {"sigma": 1.2}
    assert torch.equal(memory["local"]["a.lora_A.weight"], state["a.lora_A.weight"])
    assert records.load_client_state(node, key="another training") == ({}, {})
    with pytest.raises(FedleakError, match="client memory holds a value that cannot travel"):
        records.store_client_state(node, {"handle": object()}, {}, key="t1")


def test_a_deployed_node_keeps_client_state_in_files(tmp_path):
    from fedleak.federated.data import Record
    from fedleak.federated.flower import records

    state = {"x.lora_A.weight": torch.randn(2, 3).to(torch.bfloat16)}
    record = Record("Do it.", "", "Done.", "notes", "r-1")
    assert records.load_client_files(tmp_path / "s", key="t1") == ({}, {})
    records.save_client_files(tmp_path / "s", {"local": state, "synthetic": [record]}, {"history": [[1.0, 0.5, 3]]},
                              key="t1")
    memory, hooks = records.load_client_files(tmp_path / "s", key="t1")
    assert memory["synthetic"] == [record] and hooks == {"history": [[1.0, 0.5, 3]]}
    assert torch.equal(memory["local"]["x.lora_A.weight"], state["x.lora_A.weight"])
    assert records.load_client_files(tmp_path / "s", key="another training") == ({}, {})
    assert not list((tmp_path / "s").glob("*.partial"))


def test_dp_sgd_state_restores_the_accountant():
    from fedleak.defenses.dp_sgd import DPSGD

    a = DPSGD(target_epsilon=4.0)
    assert a.client_state(3) == {"history": [], "sigma": None}
    b = DPSGD(target_epsilon=4.0)
    b.load_client_state(3, {"history": [[1.1, 0.25, 12], [1.1, 0.5, 4]], "sigma": 1.1})
    assert b.client_state(3) == {"history": [[1.1, 0.25, 12], [1.1, 0.5, 4]], "sigma": 1.1}
    assert b.engines[3].get_epsilon(1e-5) > 0


def test_a_failed_deployment_run_says_why_even_when_its_log_was_cut():
    """`fedleak flower`'s error: the ServerApp's FedleakError line when the stream has it, else the SuperLink's
    status details (they hold the exception: Flower's log stream can end before the last lines arrive)."""
    from fedleak.eval.flower_app import _why

    lines = ["INFO: round 2\n", "ERROR: ServerApp raised an exception\n",
             "fedleak.common.errors.FedleakError: round 2: every client failed\n"]
    assert _why(lines, "ServerApp failed with exception: x") == ": round 2: every client failed"
    assert _why(["INFO: round 2\n"], "ServerApp failed with exception: boom") == \
        ": ServerApp failed with exception: boom"
    assert _why(["ERROR: Failed to push task output: timeout\n"], "") == \
        ": ERROR: Failed to push task output: timeout"
    assert _why(["INFO: fine\n"], "") == ""


def test_an_offline_nodes_error_reply_is_matched_to_its_node_by_message_id():
    """The SuperLink answers for a node it declared offline with an error from node 1 (itself); the reply is
    the node's by the message it answers (it once raised KeyError: 1 and failed the whole run)."""
    from types import SimpleNamespace as NS

    from fedleak.federated.flower.strategy import replying_node

    sent = [NS(metadata=NS(message_id="m-a", dst_node_id=7001)), NS(metadata=NS(message_id="m-b", dst_node_id=7002))]
    assert replying_node(NS(metadata=NS(src_node_id=7001, reply_to_message_id="m-a")), sent) == 7001
    assert replying_node(NS(metadata=NS(src_node_id=1, reply_to_message_id="m-b")), sent) == 7002
    assert replying_node(NS(metadata=NS(src_node_id=1, reply_to_message_id="m-x")), sent) == 1
