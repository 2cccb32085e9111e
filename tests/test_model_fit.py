"""The model-fit checks (eval/fit.py) and their report warning: a model that learned nothing must not
pass its chance-level numbers off as privacy."""

from __future__ import annotations

import pytest

from fedleak.eval.fit import model_fit
from fedleak.reports.fit import fit_section


def _training(perplexity, *, synthetic=None, domain=None, scenario="clean"):  # as eval/plan.py labels them
    return {"algorithm": "fedpit" if synthetic else "fedit", "defense": "none", "scenario": scenario,
            "utility": {"global": {"loss": 1.0, "perplexity": perplexity, "rouge_l": 0.1},
                        "clients": {"0": {"loss": 1.0, "perplexity": perplexity * 2, "rouge_l": 0.1}}},
            "synthetic": synthetic, "synthetic_domain_rouge_l": domain}


def _fit(trainings, base=50.0, cut=0, records=100):
    return model_fit(base_utility={"loss": 1.0, "perplexity": base, "rouge_l": 0.1}, trainings=trainings,
                     data_summary={"truncation": {"records": records, "answer_cut": cut, "answer_tokens_kept": 0.9}},
                     fit_perplexity=100.0, max_length=256)


class _Run:
    def __init__(self, fit):
        self.results = {"model_fit": fit}


def test_a_model_that_fits_passes_with_one_sentence():
    fit = _fit([_training(4.5, synthetic={"candidates": 24, "accepted": 8}, domain=0.4)])
    assert fit["fits"] and fit["problems"] == [] and fit["best_trained_perplexity"] == 4.5
    section = fit_section(_Run(fit))
    assert section.title == "Model fit" and "fits the data" in section.blocks[0]


def test_the_real_data_dead_end_is_named():
    """The issue's case: base perplexity ~64k, FEDIT's global ~800, FEDPIT accepted nothing."""
    fit = _fit([_training(800.0), _training(900.0, synthetic={"candidates": 24, "accepted": 0}),
                _training(2.0, scenario="backdoor")], base=64000.0, cut=213, records=216)
    checks = [p["check"] for p in fit["problems"]]
    assert not fit["fits"] and checks == ["perplexity", "truncation", "no_synthetic"]
    # A poisoned training's perplexity does not make the clean ones fit.
    assert fit["best_trained_perplexity"] == 800.0 and fit["best_trained_view"] == "fedit/none global"
    assert "213 of 216" in fit["problems"][1]["message"]
    section = fit_section(_Run(fit))
    assert section.title.startswith("Warning") and any("utility.fit_perplexity = 100" in b for b in section.blocks)


@pytest.mark.parametrize("domain, flagged", [(0.05, True), (0.3, False), (None, False)])
def test_off_domain_self_generation(domain, flagged):
    fit = _fit([_training(4.0, synthetic={"candidates": 24, "accepted": 5}, domain=domain)])
    assert ([p["check"] for p in fit["problems"]] == ["off_domain"]) is flagged


def test_a_base_that_fits_but_trainings_that_drift_still_fit():
    # The lowest of base and trained views decides: the base model itself fitting is enough.
    assert _fit([_training(1500.0)], base=50.0)["fits"]


def test_results_without_a_scenario_label_count_as_clean():
    assert _fit([_training(4.0, scenario=None)], base=500.0)["best_trained_perplexity"] == 4.0


def test_every_seed_is_judged_and_each_problem_names_its_seed():
    """A second seed whose FEDPIT accepted nothing fails the run, though the first seed fits."""
    from fedleak.eval.fit import seeds_model_fit

    good = _fit([_training(4.5, synthetic={"candidates": 24, "accepted": 8}, domain=0.4)])
    bad = _fit([_training(4.6, synthetic={"candidates": 24, "accepted": 0}, domain=None)])
    assert seeds_model_fit({0: good}) is good  # one seed: its record unchanged
    fit = seeds_model_fit({0: good, 1: bad})
    assert not fit["fits"] and fit["seeds"] == [0, 1] and fit["best_trained_perplexity"] == 4.5
    assert [(p["check"], p["seed"]) for p in fit["problems"]] == [("no_synthetic", 1)]
    assert fit["problems"][0]["message"].startswith("seed 1: fedpit/none accepted none")
    section = fit_section(_Run(fit))
    assert section.title.startswith("Warning") and any(b.startswith("Seed 1: fedpit/none") for b in section.blocks)
    assert seeds_model_fit({0: good, 1: good})["fits"]
