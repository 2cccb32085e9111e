"""Membership ground truth: category-matched members and non-members, the same for every view of the
same clients, a blind baseline (the base model, adapters off) at chance on every view, and numeric
failures of one cell recorded instead of ending the run."""

import contextlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fedleak.attacks.base import MembershipAttack, Target
from fedleak.eval.attacking import _failed_cell, _is_cell_failure
from fedleak.eval.membership_cell import run_membership
from fedleak.eval.membership_split import CATEGORY_MATCHED, membership_split
from fedleak.eval.config import AttackSettings
from fedleak.eval.results import validate_results
from fedleak.federated.data import Record
from fedleak.common.errors import FedleakError


def records(prefix: str, counts: dict[str, int]) -> list[Record]:
    return [Record(f"q{prefix}{c}{i}", "", f"a{prefix}{c}{i}", c, f"{prefix}-{c}-{i}")
            for c, n in counts.items() for i in range(n)]


def test_matched_split_draws_the_same_number_per_category():
    members = records("m", {"triage": 7, "lab_results": 1, "discharge": 4})  # skewed, like a Dirichlet client
    heldout = records("h", {"triage": 3, "lab_results": 5, "discharge": 5, "appointment": 9})  # another mix
    split = membership_split(members, heldout, seed=3, clients=(1,))
    assert Counter(r.category for r in split.members) == Counter(r.category for r in split.nonmembers) == \
        Counter({"triage": 3, "lab_results": 1, "discharge": 4})
    assert split.left_out == 4 and len(set(split.members)) == len(split.members)
    assert set(split.members) <= set(members) and set(split.nonmembers) <= set(heldout)
    # input order is kept on each side
    assert split.members == [r for r in members if r in split.members]
    assert split.record() == {"nonmember_sampling": CATEGORY_MATCHED, "members_left_out": 4, "category_counts": {
        "members": {"discharge": 4, "lab_results": 1, "triage": 3},
        "nonmembers": {"discharge": 4, "lab_results": 1, "triage": 3}},
        "record_ids": {"members": [r.record_id for r in split.members],
                       "nonmembers": [r.record_id for r in split.nonmembers]}}


def test_matched_split_depends_on_the_seed_and_client_set_only():
    members = records("m", {"triage": 10, "medication": 10})
    heldout = records("h", {"triage": 20, "medication": 20})
    draw = lambda seed, clients: membership_split(members, heldout, seed=seed, clients=clients)
    assert draw(0, (0, 2)) == draw(0, (2, 0))  # a set: the order clients are named in does not matter
    assert draw(0, (0,)).nonmembers != draw(1, (0,)).nonmembers
    assert draw(0, (0,)).nonmembers != draw(0, (1,)).nonmembers
    # no held-out record of a member's category: that member is left out, never matched across categories
    lonely = membership_split(records("m", {"canary_like": 3}), heldout, seed=0, clients=(0,))
    assert lonely.members == lonely.nonmembers == [] and lonely.left_out == 3


class _Fixed(MembershipAttack):
    """Scores looked up by record id: one table for the view, one for the base model."""

    def __init__(self, view: dict, base: dict):
        self.view, self.base = view, base

    def score(self, target, records):
        table = self.base if target.model.disabled else self.view
        return np.array([table[r.record_id] for r in records], dtype=float)


class _FakePeft:
    """What the blind baseline needs of a peft model: a context that switches the adapters off."""

    disabled = False

    @contextlib.contextmanager
    def disable_adapter(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False


def _run(view_scores, base_scores, members, nonmembers):
    ids = [r.record_id for r in members + nonmembers]
    attack = _Fixed(dict(zip(ids, view_scores)), dict(zip(ids, base_scores)))
    target = Target(model=_FakePeft(), tokenizer=None, observer="client", round=1, client=0)
    return run_membership(attack, target, members, nonmembers, settings=AttackSettings(bootstrap=200), delta=1e-5,
                          seed=0)


def test_blind_baseline_scores_the_base_model_and_nan_scores_give_a_failed_cell_not_a_crash():
    members, nonmembers = records("m", {"triage": 10}), records("h", {"triage": 10})
    separated = np.r_[np.arange(10.0) + 100, np.arange(10.0)]
    outcome = _run(separated, -separated, members, nonmembers)
    metrics = outcome["metrics"]
    assert metrics["auc"] == 1.0 and metrics["blind_auc"] == 0.0  # the blind pass really saw the base scores
    assert metrics["blind_auc_low"] <= metrics["blind_auc"] <= metrics["blind_auc_high"]
    assert metrics["min_resolvable_fpr"] == 0.1 and np.isnan(metrics["tpr@0.01fpr"]) and "error" not in outcome
    broken = separated.copy()
    broken[[0, 13]] = np.nan  # a diverged model
    outcome = _run(broken, separated, members, nonmembers)
    assert np.isnan(outcome["metrics"]["auc"]) and np.isnan(outcome["metrics"]["epsilon_lb"])
    assert outcome["metrics"]["blind_auc"] == 1.0
    assert outcome["error"].startswith("2 of 20 member and non-member scores are NaN or infinite")


def test_numeric_failures_are_recorded_but_configuration_and_plug_in_errors_surface():
    assert _is_cell_failure(ValueError("Input contains NaN")) and _is_cell_failure(FloatingPointError("overflow"))
    assert not _is_cell_failure(FedleakError("attack x: fix the plug-in"))
    assert _is_cell_failure(RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"))
    assert not _is_cell_failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not _is_cell_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x8)"))
    assert not _is_cell_failure(NotImplementedError("score"))
    # The same types also report programming errors: those stop the run.
    assert not _is_cell_failure(ValueError("too many values to unpack (expected 2)"))
    assert not _is_cell_failure(ValueError("operands could not be broadcast together with shapes (3,) (4,)"))
    assert not _is_cell_failure(ZeroDivisionError("division by zero"))
    cell = _failed_cell(ValueError("Input contains\nNaN."), membership=True)
    assert cell["error"] == "ValueError: Input contains NaN." and np.isnan(cell["metrics"]["auc"])

    class WrongShape(_Fixed):
        def score(self, target, records):
            return np.zeros(len(records) + 1)

    members, nonmembers = records("m", {"triage": 3}), records("h", {"triage": 3})
    target = Target(model=_FakePeft(), tokenizer=None, observer="global", round=1)
    with pytest.raises(FedleakError, match="returned shape"):
        run_membership(WrongShape({}, {}), target, members, nonmembers, settings=AttackSettings(bootstrap=10),
                       delta=1e-5, seed=0)

    class Ragged(_Fixed):
        def score(self, target, records):
            return [[0.0], [1.0, 2.0]] + [[0.0]] * (len(records) - 2)

    with pytest.raises(FedleakError, match="not an array of numbers"):
        run_membership(Ragged({}, {}), target, members, nonmembers, settings=AttackSettings(bootstrap=10),
                       delta=1e-5, seed=0)


MATRIX = """
[matrix]
algorithms = ["fedit"]
defenses = ["none"]
attacks = [{ name = "loss", observers = ["global", "upload", "client"] },
           { name = "flaky", observers = ["upload", "client"] }]
"""
FLAKY = """
import numpy as np
from fedleak.attacks.base import MembershipAttack, register_attack


@register_attack("flaky")
class Flaky(MembershipAttack):
    \"\"\"Fails on two views as a diverged model would: a NaN score on client/1, sklearn's error on upload/2.\"\"\"

    def __init__(self):
        pass

    def score(self, target, records):
        if (target.observer, target.client) == ("upload", 2):
            raise ValueError("Input contains NaN.")
        scores = np.arange(len(records), dtype=float)
        if (target.observer, target.client) == ("client", 1):
            scores[0] = np.nan
        return scores
"""


def demo_head(small_model_path) -> str:
    """configs/quick.toml (the demo) up to its matrix: its data, canaries, federation, LoRA and attack
    settings, and its embedded model, which is the tests' small one (cached once for the suite)."""
    from conftest import REPO, SMALL_MODEL

    text = (REPO / "configs" / "quick.toml").read_text().split("\n[matrix]")[0]
    model = "[model.embedded]\n" + "".join(f"{k} = {v}\n" for k, v in SMALL_MODEL.items())
    head = re.sub(r'^out = .*$', "", text, flags=re.M)
    assert model in head and "private_records = 60" in head and "rounds = 3" in head
    return head


def test_blind_baseline_is_at_chance_and_views_of_one_file_agree_on_the_demos_fedit(tmp_path, small_model_path):
    (tmp_path / "run.toml").write_text('plugins = ["flaky_attack"]\n' + demo_head(small_model_path) + MATRIX)
    (tmp_path / "flaky_attack.py").write_text(FLAKY)
    proc = subprocess.run([sys.executable, "-m", "fedleak", "run", "run.toml", "--out", "out", "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    validate_results(results)  # the new cell fields, failed cells included, follow the schema
    cells = results["cells"]
    final = max(c["round"] for c in cells)
    # The plug-in's failures are recorded in their cells, the run went on: results.json and the other cells exist.
    flaky = {(c["observer"], c["client"]): c for c in cells if c["attack"] == "flaky" and c["round"] == final}
    assert flaky[("upload", 2)]["error"] == "ValueError: Input contains NaN." and flaky[("upload", 2)]["metrics"][
        "auc"] is None
    assert flaky[("client", 1)]["error"].startswith("1 of ") and flaky[("client", 1)]["metrics"]["auc"] is None
    assert "error" not in flaky[("upload", 0)] and flaky[("upload", 0)]["metrics"]["auc"] is not None
    views = {(c["observer"], c["client"]): c for c in cells if c["round"] == final and c["attack"] == "loss"}
    assert sorted(views, key=str) == sorted([("global", None)] + [(o, i) for o in ("upload", "client")
                                                                  for i in range(3)], key=str)
    for (observer, client), cell in views.items():
        m = cell["metrics"]
        assert m["blind_auc_low"] <= 0.5 <= m["blind_auc_high"], (observer, client, m)
        assert cell["nonmember_sampling"] == CATEGORY_MATCHED and "error" not in cell
        counts = cell["category_counts"]
        assert counts["members"] == counts["nonmembers"] and sum(counts["members"].values()) == cell["n_members"] > 5
    for i in range(3):  # FEDIT's upload/i and client/i are the same file: the same records, the same numbers
        upload, client = views[("upload", i)], views[("client", i)]
        assert upload["metrics"]["auc"] == client["metrics"]["auc"]
        assert upload["metrics"]["auc_low"] == client["metrics"]["auc_low"]
        assert upload["category_counts"] == client["category_counts"]
        assert upload["record_ids"] == client["record_ids"]
    # An independent LOSS attack written from the README alone (plain transformers, peft, safetensors and
    # sklearn; fedleak only regenerates the records by id) scores the listed records the same.
    checkpoints = tmp_path / "out" / results["trainings"][0]["checkpoint_dir"] / f"round-{final:04d}"
    for view in (("global", None), ("upload", 1)):
        cell = views[view]
        manifest = json.loads((checkpoints / "manifest.json").read_text())
        stem = manifest["views"]["global" if view[0] == "global" else f"upload/{view[1]}"]["default"]
        auc = independent_loss_auc(small_model_path, checkpoints / manifest["files"][stem]["path"],
                                   cell["record_ids"])
        n1, n0 = cell["n_members"], cell["n_nonmembers"]
        # Equal up to one swapped pair of near-tied losses (batched padding vs one record at a time).
        assert abs(auc - cell["metrics"]["auc"]) <= 1 / (n1 * n0) + 1e-12, (view, auc, cell["metrics"]["auc"])


def independent_loss_auc(model_dir, adapter_file, record_ids: dict) -> float:
    """LOSS as the README's plug-in section defines it: Alpaca prompt, response + EOS scored, mean NLL."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedleak.federated.data import generate_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    set_peft_model_state_dict(model, load_file(adapter_file))
    model.eval()
    # configs/quick.toml's embedded data: 60 private and 60 held-out records of seed 0.
    by_id = {r.record_id: r for purpose in ("private", "heldout")
             for r in generate_records(60, seed=0, purpose=purpose, private=True)}
    scores, labels = [], []
    for label, side in ((1, "members"), (0, "nonmembers")):
        for record_id in record_ids[side]:
            r = by_id[record_id]
            prompt = (f"### Instruction:\n{r.instruction}\n### Input:\n{r.input}\n### Response:\n" if r.input
                      else f"### Instruction:\n{r.instruction}\n### Response:\n")
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(r.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([(p + a)[:256]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(p) - 1:]  # answer and EOS tokens
            scores.append(-nll.mean().item())
            labels.append(label)
    return float(roc_auc_score(labels, scores))


def test_one_run_audit_with_nan_canary_scores_warns_and_gives_nan():
    from fedleak.eval.audit import one_run_epsilon
    from fedleak.eval.metrics import UndefinedMetricWarning

    with pytest.warns(UndefinedMetricWarning, match="1 of 4 canary scores"):
        result = one_run_epsilon([1, 0, 1, 0], [0.9, np.nan, 0.8, 0.1], delta=1e-5)
    assert np.isnan(result["epsilon_lb"]) and result["canaries"] == 4


def test_global_members_are_the_clients_whose_uploads_were_aggregated():
    """A refused (non-finite) or rule-excluded upload never reached the global adapter: its client's
    records are not the global view's members; a history without `aggregated` falls back to the sampled."""
    from fedleak.eval.attacking import _view_truth
    from fedleak.federated.data import FederatedData
    from fedleak.federated.fedit import FedIT

    data = FederatedData(clients=[records(f"c{i}", {"triage": 2}) for i in range(3)],
                         heldout=records("h", {"triage": 6}))
    history = [{"round": 1, "clients": [0, 1, 2], "aggregated": [0, 2], "refused": {"1": "non-finite upload"}},
               {"round": 2, "clients": [0, 1, 2], "aggregated": [0]}]
    truth = _view_truth(FedIT(), history, data, "global", None, 2)
    assert truth.clients == (0, 2)
    assert {r.record_id for r in truth.members} == {r.record_id for c in (0, 2) for r in data.clients[c]}
    assert _view_truth(FedIT(), history[:1], data, "global", None, 1).clients == (0, 2)
    old = [{k: v for k, v in entry.items() if k != "aggregated"} for entry in history]
    assert _view_truth(FedIT(), old, data, "global", None, 2).clients == (0, 1, 2)
