"""How poisoning is measured: detection and false-exclusion rates of the selecting rules, binomial
(Clopper-Pearson) intervals of every rate, the backdoor prompts, the poisoning cells and the report's
comparisons made only between intervals that do not overlap."""

import pytest
from scipy.stats import binomtest

from fedleak.eval.poisoning import detection
from fedleak.federated.data import generate_records


def test_detection_rates_from_excluded_clients():
    history = [{"round": 1, "clients": [0, 1, 2], "uploads": [0, 1, 2], "malicious_clients": [1],
                "excluded_clients": [1, 2]},
               {"round": 2, "clients": [0, 1, 2], "uploads": [0, 1, 2], "malicious_clients": [1],
                "excluded_clients": [0, 2]},
               {"round": 3, "clients": [0, 2], "uploads": [0, 2], "malicious_clients": [], "excluded_clients": [2]}]
    out = detection(history, confidence=0.9)
    assert [r["detection_rate"] for r in out["rounds"]] == [1.0, 0.0, None]
    assert [r["false_exclusion_rate"] for r in out["rounds"]] == [0.5, 1.0, 0.5]
    assert out["detection_rate"] == 0.5 and out["false_exclusion_rate"] == pytest.approx(4 / 6)
    # Pooled over rounds: 1 of 2 malicious and 4 of 6 honest uploads, with exact binomial intervals.
    for name, k, n in (("detection_rate", 1, 2), ("false_exclusion_rate", 4, 6)):
        expected = binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
        assert (out[f"{name}_ci_low"], out[f"{name}_ci_high"]) == pytest.approx((expected.low, expected.high))
    assert detection([{"round": 1, "clients": [0], "malicious_clients": [0]}], confidence=0.95) is None
    # A refused (non-finite) upload never reached the rule: it counts neither as detected nor as missed.
    refused = [{"round": 1, "clients": [0, 1, 2], "uploads": [0, 1, 2], "malicious_clients": [1, 2],
                "refused": {"2": "non-finite upload (NaN in x)"}, "excluded_clients": [1]}]
    out = detection(refused, confidence=0.95)
    assert out["rounds"][0]["malicious"] == 1 and out["detection_rate"] == 1.0 and out["false_exclusion_rate"] == 0.0


def test_rates_get_clopper_pearson_intervals_at_the_runs_confidence():
    from fedleak.eval.poisoning import rate_with_interval

    for k, n, confidence in ((0, 60, 0.95), (7, 24, 0.95), (50, 60, 0.99), (60, 60, 0.8)):
        out = rate_with_interval("asr", k, n, confidence=confidence)
        expected = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
        assert out["asr"] == k / n
        assert (out["asr_ci_low"], out["asr_ci_high"]) == pytest.approx((expected.low, expected.high), abs=1e-12)
    # 3 hits of 24 (the demo's old 0.12) cannot be told from 0 of 24 on a clean model: the intervals overlap.
    assert rate_with_interval("asr", 3, 24, confidence=0.95)["asr_ci_low"] < rate_with_interval(
        "asr", 0, 24, confidence=0.95)["asr_ci_high"]
    assert rate_with_interval("asr", 0, 0, confidence=0.95) == {"asr": None, "asr_ci_low": None, "asr_ci_high": None}


def test_backdoor_prompts_never_reuse_a_record_and_warn_when_short(caplog):
    from fedleak.eval.poisoning import backdoor_prompts

    heldout = generate_records(5, seed=0, purpose="h", private=True)
    assert backdoor_prompts(heldout, 3) == heldout[:3] and not caplog.records
    assert backdoor_prompts(heldout, 8) == heldout
    assert "poisoning.prompts = 8 but only 5 held-out records" in caplog.text and "heldout_records" in caplog.text


def test_poisoning_cells_pair_each_poisoned_training_with_its_clean_twin():
    from fedleak.eval.matrix_config import ComponentSpec, ScenarioSpec
    from fedleak.eval.poisoning import poisoning_cells, rate_with_interval

    scenario = ScenarioSpec("bd", (ComponentSpec("backdoor"), ComponentSpec("scaling")), clients=(1,))
    rates = lambda asr: {"backdoor": {**rate_with_interval("asr", int(asr * 4), 4, confidence=0.95),
                                      **rate_with_interval("false_trigger_rate", 0, 4, confidence=0.95),
                                      "hits": int(asr * 4), "false_triggers": 0, "confidence": 0.95,
                                      "target_recall": asr, "target_recall_untriggered": 0.0, "prompts": 4,
                                      "examples": []}}
    training = lambda defense, name, loss, asr, detection=None: {
        "algorithm": "fedit", "defense": defense, "scenario": name, "seed": 0, "rounds": [{}, {}],
        "train_seconds": 1.0, "utility": {"global": {"loss": loss, "rouge_l": 0.5 - loss / 10}},
        "poisoning": {"malicious_clients": [1] if name != "clean" else [], "attacks": ["backdoor", "scaling"],
                      "backdoors": rates(asr), "detection": detection, "seconds": 0.1}}
    detection = {**rate_with_interval("detection_rate", 1, 1, confidence=0.95),
                 **rate_with_interval("false_exclusion_rate", 1, 2, confidence=0.95), "rounds": [{"round": 1}]}
    cells = poisoning_cells([training("none", "clean", 1.0, 0.0), training("krum", "clean", 1.2, 0.25),
                             training("none", "bd", 1.5, 0.75), training("krum", "bd", 1.2, 0.0, detection),
                             training("median", "bd", 1.1, 0.0)], [scenario])
    by = {c["defense"]: c for c in cells}
    assert set(by) == {"none", "krum", "median"} and all(c["family"] == "poisoning" for c in cells)
    assert by["none"]["metrics"]["loss_increase"] == 0.5 and by["none"]["metrics"]["clean_model_asr"] == 0.0
    assert by["none"]["metrics"]["asr"] == 0.75 and by["none"]["attack_name"] == "backdoor+scaling"
    assert by["krum"]["metrics"]["clean_model_asr"] == 0.25 and by["krum"]["metrics"]["detection_rate"] == 1.0
    assert by["median"]["metrics"]["loss_increase"] is None and by["median"]["metrics"]["clean_model_asr"] is None
    assert by["median"]["round"] == 2 and "detection_rate" not in by["median"]["metrics"]
    # Every rate carries its Clopper-Pearson interval: the poisoned model's, and the clean twin's beside it.
    none = by["none"]["metrics"]
    assert (none["asr_ci_low"], none["asr_ci_high"]) == pytest.approx(
        tuple(binomtest(3, 4).proportion_ci(confidence_level=0.95, method="exact")))
    assert none["false_trigger_rate_ci_low"] == 0.0 and none["false_trigger_rate_ci_high"] == pytest.approx(
        1 - 0.025 ** (1 / 4))
    assert none["clean_model_asr_ci_low"] == 0.0 and by["krum"]["metrics"]["clean_model_asr_ci_low"] > 0
    assert by["median"]["metrics"]["clean_model_asr_ci_high"] is None  # no clean twin, no interval
    assert by["krum"]["metrics"]["false_exclusion_rate_ci_low"] < 0.5 < by["krum"]["metrics"]["false_exclusion_rate_ci_high"]
    assert by["none"]["details"]["hits"] == 3 and by["none"]["details"]["confidence"] == 0.95


def test_report_compares_asrs_only_when_their_intervals_do_not_overlap():
    from fedleak.eval.poisoning import rate_with_interval
    from fedleak.reports.poisoning import asr_comparisons, distinguishable

    assert distinguishable((0.6, 0.9), (0.0, 0.1)) == "higher" and distinguishable((0.0, 0.1), (0.6, 0.9)) == "lower"
    assert distinguishable((0.0, 0.35), (0.0, 0.14)) == "not distinguishable"
    assert distinguishable((0.1, 0.2), None) == "n/a" and distinguishable((0.1, None), (0.3, 0.4)) == "n/a"

    def cell(defense, hits, clean_hits, prompts=24, false_triggers=0):
        metrics = {**rate_with_interval("asr", hits, prompts, confidence=0.95),
                   **rate_with_interval("false_trigger_rate", false_triggers, prompts, confidence=0.95),
                   **rate_with_interval("clean_model_asr", clean_hits, prompts, confidence=0.95)}
        return {"algorithm": "fedit", "defense": defense, "scenario": "backdoor", "metrics": metrics}

    # The demo's old figure, 3 of 24 against 0 of 24, is not an effect; 20 of 24 is, and beats the median's 0.
    fedavg, median, weak = cell("none", 20, 0, false_triggers=2), cell("median", 0, 0), cell("krum", 3, 0)
    cells = [fedavg, median, weak]
    assert asr_comparisons(fedavg, cells) == ("higher", "higher", "(FedAvg)")
    assert asr_comparisons(median, cells) == ("not distinguishable", "not distinguishable", "lower")
    assert asr_comparisons(weak, cells) == ("not distinguishable", "not distinguishable", "lower")
    # A target that comes with or without the trigger is not a backdoor proper.
    assert asr_comparisons(cell("none", 20, 0, false_triggers=17), cells)[0] == "not distinguishable"
    assert asr_comparisons(cell("none", 3, 0), [cell("none", 3, 0), cell("median", 0, 0)])[1] == "not distinguishable"


def test_shipped_configs_ask_no_more_backdoor_prompts_than_held_out_records():
    from pathlib import Path

    from fedleak.eval.config import load_config

    for name in ("quick", "full"):
        config = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{name}.toml")
        # More would be cut to the held-out count with a warning.
        assert config.poisoning.prompts <= config.data.embedded.heldout_records, name
        if name == "quick":  # the demo's ASR must resolve: at 24 prompts its interval was about +-0.2 wide
            assert config.poisoning.prompts >= 48
