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
[utility]
records = 12
max_new_tokens = 32
[matrix]
algorithms = ["fedit", {name = "fedpit", synthetic_per_round = 4, max_attempts = 8, response_max_new_tokens = 48}, "cenit", "locit"]
defenses = ["none", "median"]
attacks = [{name = "loss", observers = ["global", "upload", "client"]}, {name = "loss", batch_size = 7}]
"""
FEDPIT = "fedpit(max_attempts=8,response_max_new_tokens=48,synthetic_per_round=4)"


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
    utility_of = lambda algorithm: next(t["utility"] for t in results["trainings"]
                                        if (t["algorithm"], t["defense"]) == (algorithm, "none"))
    assert results["schema"] == "fedleak-results/1" and results["seed"] == 1
    assert results["versions"]["torch"] and results["versions"]["fedleak"] == results["fedleak_version"]
    assert "git_commit" in results and results["config"]["federation"]["rounds"] == 5
    # Defenses apply to federations; the baselines without one train once.
    assert [(t["algorithm"], t["defense"]) for t in results["trainings"]] == [
        ("fedit", "none"), ("fedit", "median"), (FEDPIT, "none"), (FEDPIT, "median"), ("cenit", "none"),
        ("locit", "none")]
    cells = {(c["algorithm"], c["defense"], c["attack"], c["observer"], c["client"]): c for c in results["cells"]}
    views = {"fedit": ["global", "upload", "client"], FEDPIT: ["global", "upload", "client"], "cenit": ["global"],
             "locit": ["client"]}
    for (algorithm, defense), observers in ((k, v) for t in results["trainings"]
                                            for k, v in [((t["algorithm"], t["defense"]), views[t["algorithm"]])]):
        got = sorted({(o, c) for (a, d, attack, o, c) in cells if (a, d, attack) == (algorithm, defense, "loss")},
                     key=str)
        assert got == sorted({(o, None if o == "global" else i) for o in observers for i in range(3)}, key=str)
        # the batch_size=7 variant probes the default observer only: the global view, where there is one
        variant = [o for (a, d, attack, o, _) in cells if (a, d, attack) == (algorithm, defense, "loss(batch_size=7)")]
        assert variant == (["global"] if "global" in observers else [])
    for cell in results["cells"]:
        assert cell["round"] == 5 and cell["n_members"] == cell["n_nonmembers"] > 0
    auc = lambda algorithm, observer, client=None: cells[(algorithm, "none", "loss", observer, client)]["metrics"]["auc"]
    # Memorisation is real: members have clearly lower loss than held-out records.
    assert auc("fedit", "global") > 0.6 and auc("cenit", "global") > 0.6
    assert min(auc("locit", "client", i) for i in range(3)) > 0.6
    # FEDPIT's shared views see only synthetic data: they leak less than FEDIT's.
    assert auc(FEDPIT, "global") < auc("fedit", "global")
    assert sum(auc(FEDPIT, "upload", i) for i in range(3)) < sum(auc("fedit", "upload", i) for i in range(3))
    # Batching does not change the scores.
    assert cells[("fedit", "none", "loss", "global", None)]["metrics"] == pytest.approx(
        cells[("fedit", "none", "loss(batch_size=7)", "global", None)]["metrics"], abs=1e-6)
    for training in results["trainings"]:
        utility = training["utility"]
        assert utility["records"] == 12
        assert ("global" in utility) == (training["algorithm"] != "locit")
        assert ("client_mean" in utility) == (training["algorithm"] != "cenit")
        for scores in [utility.get("global"), *utility["clients"].values()]:
            if scores:
                assert scores["loss"] > 0 and 0 <= scores["rouge_l"] <= 1
    base = results["base_utility"]
    assert base["loss"] > utility_of("fedit")["global"]["loss"]  # fine-tuning helps on the domain's records
    fedpit = next(t for t in results["trainings"] if t["algorithm"] == FEDPIT)
    assert fedpit["synthetic"]["candidates"] >= fedpit["synthetic"]["accepted"] > 0
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
    for training in [*results["trainings"], {"utility": {"global": results["base_utility"]}}]:
        for scores in [training["utility"].get("global"), training["utility"].get("client_mean")]:
            if scores:
                assert fmt(scores["loss"]) in markdown and fmt(scores["rouge_l"]) in html
    # one ROC plot per (attack, observer), embedded in the HTML and saved beside the Markdown
    assert html.count('src="data:image/png;base64,') == 4
    assert "src=\"http" not in html and (run_dir / "plots" / "roc-loss-client.png").exists()
    assert "Self-generated data" in markdown and "synthetic" in markdown.lower()


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
    assert set(upload["views"]) == {"global", "upload/0", "upload/1", "client/0", "client/1"}
