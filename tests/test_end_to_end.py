"""One real `fedleak run` on a small config: train, checkpoint, attack, results, report."""

import csv
import json
import os
import subprocess
import sys

import pytest

from fedleak.reports.report import fmt

CONFIG = """
seed = 1
[model.embedded]
pretrain_steps = 200
public_records = 2000
[data.embedded]
private_records = 90
heldout_records = 90
canary_repetitions = [1, 8]
canaries_per_repetition = 1
[federation]
rounds = 5
local_epochs = 5
[matrix]
defenses = ["none", "median"]
attacks = ["loss", {name = "loss", batch_size = 7}]
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_model_path):
    folder = tmp_path_factory.mktemp("e2e")
    (folder / "run.toml").write_text(CONFIG)
    proc = subprocess.run([sys.executable, "-m", "fedleak", "run", str(folder / "run.toml"), "--out",
                           str(folder / "out")], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "out"


def test_results_schema_and_memorisation(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["schema"] == "fedleak-results/1" and results["seed"] == 1
    assert results["versions"]["torch"] and results["versions"]["fedleak"] == results["fedleak_version"]
    assert "git_commit" in results and results["config"]["federation"]["rounds"] == 5
    assert [(t["defense"], t["seed"]) for t in results["trainings"]] == [("none", 1), ("median", 1)]
    cells = {(c["defense"], c["attack"]): c for c in results["cells"]}
    assert set(cells) == {(d, a) for d in ("none", "median") for a in ("loss", "loss(batch_size=7)")}
    for cell in cells.values():
        assert cell["observer"] == "global" and cell["round"] == 5
        assert cell["n_members"] == cell["n_nonmembers"] == 90
    # Memorisation is real: members have clearly lower loss than held-out records.
    assert cells[("none", "loss")]["metrics"]["auc"] > 0.6
    # Batching does not change the scores.
    assert cells[("none", "loss")]["metrics"] == pytest.approx(cells[("none", "loss(batch_size=7)")]["metrics"], abs=1e-6)
    # The report's checkpoints hold every round.
    training = run_dir / results["trainings"][0]["checkpoint_dir"]
    assert sorted(p.name for p in training.iterdir()) == [f"round-{i:04d}" for i in range(6)]


def test_csv_and_reports_carry_the_numbers_of_results_json(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == len(results["cells"])
    markdown = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    for row, cell in zip(rows, results["cells"]):
        assert float(row["auc"]) == cell["metrics"]["auc"]
        for value in (cell["metrics"]["auc"], cell["metrics"]["tpr@0.01fpr"]):
            assert fmt(value) in markdown and fmt(value) in html
    for training in results["trainings"]:
        assert fmt(training["utility"]["heldout_loss"]) in markdown
    assert html.count('src="data:image/png;base64,') == 2  # one ROC plot per attack, embedded
    assert "src=\"http" not in html and (run_dir / "plots" / "roc-loss.png").exists()


def test_report_command_rewrites_from_results_only(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((run_dir / "results.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "fedleak", "report", str(copy)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "report.md").read_text() == (run_dir / "report.md").read_text()


def test_local_model_folder_and_user_alpaca_file(tmp_path):
    """The path a GPU user takes (a model folder or hub id, their own JSONL), on a tiny model."""
    from fedleak.federated.data import generate_records
    from fedleak.federated.model import EmbeddedModelConfig, build_embedded

    model_dir = build_embedded(EmbeddedModelConfig(vocab_size=600, hidden_size=32, num_layers=1, num_heads=2,
                                                   intermediate_size=64, public_records=300, pretrain_steps=5),
                               cache_dir=tmp_path / "models")
    rows = [{"instruction": r.instruction, "input": r.input, "answer": r.output, "category": r.category}
            for r in generate_records(40, seed=0, purpose="user", private=True)]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "run.toml").write_text(f"""
[model]
name = "{model_dir}"
[model.lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]
[data]
source = "file"
[data.file]
path = "mine.jsonl"
output_field = "answer"
heldout_fraction = 0.25
[federation]
clients = 2
rounds = 1
local_epochs = 1
partition = "iid"
[matrix]
defenses = ["none"]
attacks = ["loss"]
""")
    proc = subprocess.run([sys.executable, "-m", "fedleak", "run", str(tmp_path / "run.toml"), "--out",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"] == {"name": str(model_dir)}
    assert results["data"] == {"client_sizes": [15, 15], "heldout": 10, "canaries": 0, "reference_canaries": 0}
    cell = results["cells"][0]
    assert cell["n_members"] == cell["n_nonmembers"] == 10 and 0 <= cell["metrics"]["auc"] <= 1
    upload = json.loads((tmp_path / "out" / results["trainings"][0]["checkpoint_dir"] / "round-0001" /
                         "manifest.json").read_text())
    assert set(upload["files"]) == {"global", "upload/0", "upload/1"}
