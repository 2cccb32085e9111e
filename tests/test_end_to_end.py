"""One real `fedleak run` on a small config: train, checkpoint, attack, results, report."""

import csv
import hashlib
import json

import pytest

from fedleak.reports.document import fmt
from fedleak.eval.results import validate_results

CONFIG = """
seed = 1
[model.embedded]
pretrain_steps = 200
public_records = 2000
[data.embedded]
private_records = 60
heldout_records = 60
canary_repetitions = [1, 8]
canaries_per_repetition = 1
[federation]
rounds = 4
local_epochs = 4
[utility]
records = 12
max_new_tokens = 32
[matrix]
algorithms = ["fedit", {name = "fedpit", synthetic_per_round = 2, max_attempts = 8, response_max_new_tokens = 48}, "cenit"]
defenses = ["none", "scrub"]
exclude = [{algorithm = "fedpit", defense = "scrub"}]
attacks = [{name = "loss", rounds = "all"}, {name = "loss", observers = ["upload", "client"], rounds = [2, 4]},
           {name = "min_k", k = 0.5},
           "reference", {name = "exposure", samples = 200}, {name = "discoverable", max_records = 6}]
"""
FEDPIT = "fedpit(max_attempts=8,response_max_new_tokens=48,synthetic_per_round=2)"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_model_path):
    from fedleak.cli import main

    folder = tmp_path_factory.mktemp("e2e")
    (folder / "run.toml").write_text(CONFIG)
    # In process: `fedleak run`'s own main, without a new interpreter's imports (~13 s); its stderr is captured.
    assert main(["run", str(folder / "run.toml"), "--out", str(folder / "out")]) == 0
    return folder / "out"


def test_results_schema_and_memorisation(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    utility_of = lambda algorithm: next(t["utility"] for t in results["trainings"]
                                        if (t["algorithm"], t["defense"]) == (algorithm, "none"))
    assert results["schema"] == "fedleak-results/7" and results["seed"] == 1 and results["seeds"] == [1]
    validate_results(results)
    assert results["versions"]["torch"] and results["versions"]["fedleak"] == results["fedleak_version"]
    assert "git_commit" in results and results["config"]["federation"]["rounds"] == 4
    # Defenses apply to federations; the baselines without one train once.
    assert [(t["algorithm"], t["defense"]) for t in results["trainings"]] == [
        ("fedit", "none"), ("fedit", "scrub"), (FEDPIT, "none"), ("cenit", "none")]
    cells = {(c["algorithm"], c["defense"], c["attack"], c["observer"], c["client"]): c for c in results["cells"]}
    views = {"fedit": ["global", "upload", "client"], FEDPIT: ["global", "upload", "client"], "cenit": ["global"]}
    for (algorithm, defense), observers in ((k, v) for t in results["trainings"]
                                            for k, v in [((t["algorithm"], t["defense"]), views[t["algorithm"]])]):
        got = sorted({(o, c) for (a, d, attack, o, c) in cells if (a, d, attack) == (algorithm, defense, "loss")},
                     key=str)
        assert got == sorted({(o, None if o == "global" else i) for o in observers for i in range(3)}, key=str)
        # min_k probes the default observer only: the global view, where there is one
        variant = [o for (a, d, attack, o, _) in cells if (a, d, attack) == (algorithm, defense, "min_k(k=0.5)")]
        assert variant == (["global"] if "global" in observers else [])
    for cell in results["cells"]:
        assert cell["round"] == 4 or cell["attack"] == "loss"
        assert cell.get("n_members", 1) == cell.get("n_nonmembers", 1)
        if cell["family"] == "membership":
            assert cell["n_members"] > 0 and cell["metrics"]["auc_low"] <= cell["metrics"]["auc"] <= cell["metrics"]["auc_high"]
            assert cell["metrics"]["epsilon_lb"] >= 0 and "empirical" in cell["audit"]
    # loss runs on every recorded round of the global view (round 0: the initial adapter), on rounds 2
    # and 4 of the others
    rounds = lambda algorithm, observer, client=None: sorted(
        c["round"] for c in results["cells"] if (c["algorithm"], c["defense"], c["attack"], c["observer"], c["client"])
        == (algorithm, "none", "loss", observer, client))
    assert rounds("fedit", "global") == [0, 1, 2, 3, 4] and rounds("fedit", "client", 1) == [2, 4]
    cells = {k: v for k, v in cells.items() if v["round"] == 4}
    auc = lambda algorithm, observer, client=None: cells[(algorithm, "none", "loss", observer, client)]["metrics"]["auc"]
    # Memorisation is real: members have clearly lower loss than held-out records.
    assert auc("fedit", "global") > 0.6 and auc("cenit", "global") > 0.6
    # FEDPIT's local adapters train on the real records and never leave the client: its client views leak.
    assert min(auc(FEDPIT, "client", i) for i in range(3)) > 0.6
    # FEDPIT's shared views see only synthetic data: they leak less than FEDIT's.
    assert auc(FEDPIT, "global") < auc("fedit", "global")
    assert sum(auc(FEDPIT, "upload", i) for i in range(3)) < sum(auc("fedit", "upload", i) for i in range(3))
    # The sanity checks of extraction on the embedded default with no defense: a canary repeated 8 times
    # is more exposed than one seen once, and greedy decoding of its prompt reproduces it.
    exposure = cells[("fedit", "none", "exposure(samples=200)", "global", None)]["metrics"]
    assert exposure["exposure_rep8"] > exposure["exposure_rep1"] and exposure["exposure_rep8"] > 5
    assert cells[("cenit", "none", "exposure(samples=200)", "global", None)]["metrics"]["exposure_rep8"] > 5
    discoverable = [cells[(a, "none", "discoverable(max_records=6)", "global", None)]["metrics"]
                    for a in ("fedit", "cenit")]
    assert max(d["canary_exact_rate"] for d in discoverable) > 0
    # Scrubbing (issue 21): the canaries' access codes become [NUMBER] before training, so none is exposed; the
    # identifiers carried most of the membership signal, even for an attacker who scrubs its candidates alike.
    scrubbed = cells[("fedit", "scrub", "exposure(samples=200)", "global", None)]["metrics"]
    assert scrubbed["exposure_rep8"] < 3 < exposure["exposure_rep8"] - 2
    assert cells[("fedit", "scrub", "loss", "global", None)]["metrics"]["auc"] < auc("fedit", "global") - 0.05
    facts = next(t["sanitisation"] for t in results["trainings"] if t["defense"] == "scrub")["scrub"]
    assert facts["records"] == facts["changed"] == 60 + 1 + 8 and facts["clients"] == 3
    assert facts["identifiers_left"] == 0 and facts["replaced"]["digits"] >= 9
    assert all(t["sanitisation"] is None for t in results["trainings"] if t["defense"] != "scrub")
    # FEDPIT's global adapter never trains on the canaries
    assert cells[(FEDPIT, "none", "exposure(samples=200)", "global", None)]["metrics"]["exposure_rep8"] < exposure["exposure_rep8"]
    for training in results["trainings"]:
        utility = training["utility"]
        assert utility["records"] == 12
        assert "global" in utility
        assert ("client_mean" in utility) == (training["algorithm"] != "cenit")
        for scores in [utility.get("global"), *utility["clients"].values()]:
            if scores:
                assert scores["loss"] > 0 and 0 <= scores["rouge_l"] <= 1
    base = results["base_utility"]
    assert base["loss"] > utility_of("fedit")["global"]["loss"]  # fine-tuning helps on the domain's records
    fedpit = next(t for t in results["trainings"] if t["algorithm"] == FEDPIT)
    assert fedpit["synthetic"]["candidates"] >= fedpit["synthetic"]["accepted"] > 0
    training = run_dir / results["trainings"][0]["checkpoint_dir"]
    assert sorted(p.name for p in training.iterdir()) == [
        "attacks", "evaluation.json", *[f"round-{i:04d}" for i in range(5)], "training.json"]
    # Cost: the LoRA upload of each client each round (float32 tensors), the same every round.
    cost = results["trainings"][0]["cost"]
    assert cost["upload_bytes_per_client_per_round"] > 0 and cost["upload_bytes_total"] == 12 * cost[
        "upload_bytes_per_client_per_round"]


def test_csv_and_reports_carry_the_numbers_of_results_json(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == len(results["cells"])
    markdown = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    final = [c for c in results["cells"] if c["round"] == 4]
    for row, cell in zip(rows, results["cells"]):
        assert (row["auc"] == "") if cell["family"] == "extraction" else float(row["auc"]) == cell["metrics"]["auc"]
    for cell in final:
        keys = ("auc", "tpr@0.01fpr", "balanced_accuracy") if cell["family"] == "membership" else list(cell["metrics"])
        for value in (cell["metrics"][k] for k in keys):
            assert fmt(value) in markdown and fmt(value) in html
    for training in [*results["trainings"], {"utility": {"global": results["base_utility"]}}]:
        for scores in [training["utility"].get("global"), training["utility"].get("client_mean")]:
            if scores:
                assert fmt(scores["loss"]) in markdown and fmt(scores["rouge_l"]) in html
    # ROC plots per (attack, observer) of the final round: loss on 3 observers, min_k and reference on
    # global; loss over rounds on 3 observers; exposure against repetitions. Embedded and saved.
    assert html.count('src="data:image/png;base64,') == 5 + 3 + 1 + 2  # + summary heatmap, frontier
    assert "src=\"http" not in html
    for name in ("roc-loss-client", "rounds-loss-global", "exposure-vs-repetitions"):
        assert (run_dir / "plots" / f"{name}.png").exists()
    assert "Training-data extraction" in markdown and "Leakage over rounds" in markdown
    assert "Self-generated data" in markdown and "synthetic" in markdown.lower()
    assert "Data sanitisation" in markdown and "declared identifiers left" in html


def test_report_command_rewrites_from_results_only(run_dir, tmp_path, capsys):
    from fedleak.cli import main

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((run_dir / "results.json").read_text())
    assert main(["report", str(copy)]) == 0, capsys.readouterr().err  # in process, as `fedleak report` runs it
    assert (copy / "report.md").read_text() == (run_dir / "report.md").read_text()


def test_local_model_folder_and_user_alpaca_file(tmp_path):
    """The path a GPU user takes (a model folder or hub id, their own JSONL), on a tiny model."""
    from fedleak.federated.data import generate_records
    from fedleak.federated.embedded import EmbeddedModelConfig, build_embedded

    model_dir = build_embedded(EmbeddedModelConfig(vocab_size=600, hidden_size=32, num_layers=1, num_heads=2,
                                                   intermediate_size=64, public_records=300, pretrain_steps=5),
                               cache_dir=tmp_path / "models")
    rows = [{"instruction": r.instruction, "input": r.input, "answer": r.output, "category": r.category}
            for r in generate_records(40, seed=0, purpose="user", private=True)]
    data_path = tmp_path / "mine.jsonl"
    data_path.write_text("\n".join(json.dumps(r) for r in rows))
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
attacks = ["loss", "pii", "exposure"]
""")
    from fedleak.cli import main

    assert main(["run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0  # in process
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"] == {"name": str(model_dir)}
    counts = ("client_sizes", "heldout", "canaries", "reference_canaries", "audit_canaries", "audit_canaries_inserted")
    assert {k: results["data"][k] for k in counts} == {"client_sizes": [15, 15], "heldout": 10, "canaries": 0,
                                                       "reference_canaries": 0, "audit_canaries": 0,
                                                       "audit_canaries_inserted": 0}
    # The report can name the file the numbers came from: its sha256 is the bytes the run read.
    assert results["data"]["file"]["sha256"] == hashlib.sha256(data_path.read_bytes()).hexdigest()
    assert results["data"]["duplicates_dropped"] == 0
    cell, pii, exposure = results["cells"]
    assert cell["n_members"] == cell["n_nonmembers"] == 10 and 0 <= cell["metrics"]["auc"] <= 1
    # User data has no planted identifiers or canaries: those attacks say so instead of reporting 0.
    assert pii["details"]["note"] and exposure["details"]["note"]
    assert all(v is None for v in exposure["metrics"].values())
    upload = json.loads((tmp_path / "out" / results["trainings"][0]["checkpoint_dir"] / "round-0001" /
                         "manifest.json").read_text())
    assert set(upload["views"]) == {"global", "upload/0", "upload/1", "client/0", "client/1"}
