"""[matrix.sweep] and [matrix] adaptations: one more axis over any scalar setting, checked like the setting itself."""

import json

import pytest

from fedleak.common.errors import FedleakError
from fedleak.eval.cache import model_fingerprint
from fedleak.eval.config import load_config
from fedleak.eval.plan import all_trainings, attacks_of, left_out
from fedleak.eval.sweep import settings_of, variant

BASE = """
[federation]
alpha = 1.0
[matrix]
algorithms = ["fedit", { name = "fedpit", synthetic_per_round = 2 }]
defenses = ["none", { name = "dp_sgd", noise_multiplier = 1.0 }]
attacks = ["loss", { name = "vocabulary", observers = ["upload"] }]
"""


def _config(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(path)


def test_each_setting_varies_alone_and_a_variant_leaves_out_what_its_method_cannot_run(tmp_path):
    config = _config(tmp_path, BASE + 'adaptations = ["lora", "prompt_tuning"]\n[matrix.sweep]\n'
                                      '"federation.alpha" = [0.1, 1.0, 10.0]\n')
    # The configured alpha (1.0) and method (lora) are the configured training, not a second copy of it.
    assert settings_of(config) == [None, ("model.adaptation", "prompt_tuning"), ("federation.alpha", 0.1),
                                   ("federation.alpha", 10.0)]
    soft = variant(config, ("model.adaptation", "prompt_tuning"))
    assert soft.model.adaptation == "prompt_tuning" and soft.federation.alpha == 1.0 and not soft.matrix.sweep
    assert variant(config, ("federation.alpha", 0.1)).federation.alpha == 0.1
    units = all_trainings(config)
    labels = {u.label for u in units}
    # 4 trainings per setting, but a soft prompt has no DP-SGD (no per-record gradient): 4 + 2 + 4 + 4.
    assert len(units) == 14
    assert "fedit [adaptation=prompt_tuning]/none" in labels and "fedit [alpha=0.1]/dp_sgd(noise_multiplier=1.0)" in labels
    assert "fedpit(synthetic_per_round=2) [adaptation=prompt_tuning]/none" in labels  # global and local prompts
    assert not any("prompt_tuning" in label and "dp_sgd" in label for label in labels)
    soft_unit = next(u for u in units if u.setting == ("model.adaptation", "prompt_tuning"))
    assert [spec.name for spec, _ in attacks_of(config, soft_unit)] == ["loss"]  # vocabulary reads LoRA factors
    assert soft_unit.key()["setting"] == {"path": "model.adaptation", "value": "prompt_tuning"}
    assert soft_unit.stem == "fedit-none-adaptation=prompt_tuning-seed0"
    assert len({u.stem for u in units}) == len(units)
    notes = left_out(config)
    assert "left out fedpit(synthetic_per_round=2) [adaptation=prompt_tuning]/dp_sgd(noise_multiplier=1.0): dp_sgd " \
           "cannot train model.adaptation = 'prompt_tuning': peft computes the soft prompt once per batch, so Opacus " \
           "gets no per-record gradient to clip: use dp_fedavg, or model.adaptation = 'lora' or 'prefix_tuning'" in notes
    assert "left out attack vocabulary on fedit [adaptation=prompt_tuning]/none: vocabulary cannot probe " \
           "model.adaptation = 'prompt_tuning': it reads the span of the updates of LoRA's A factors (low-rank), which " \
           "other methods do not train: drop it for this method" in notes
    assert len(notes) == 4  # fedpit/dp_sgd, fedit/dp_sgd, vocabulary on fedit/none and on fedpit/none
    # The variant's settings are in its training key; the configured training's are untouched.
    assert model_fingerprint(soft)["adaptation"] == "prompt_tuning" and "adaptation" not in model_fingerprint(config)


@pytest.mark.parametrize("sweep, expected", [
    ('"federation.alpah" = [0.1]', "unknown setting 'federation.alpah': did you mean 'alpha'"),
    ('"federation.alpha" = [-1.0]', 'matrix.sweep."federation.alpha" = -1.0: federation.alpha = -1.0'),
    ('"federation.rounds" = [2, 2]', "lists a value twice"),
    ('"federation.rounds" = []', "give a non-empty list"),
    ('"matrix.defenses" = ["none"]', "a sweep varies model.adaptation, a setting of model.lora"),
    ('"data.embedded.private_records" = [40]', "run another config for the rest"),
    ('"federation.max_length" = [128]', "(not federation.max_length)"),
    ('"federation.lr" = [0.1]\n"model.prompt_tuning.lr" = [0.1]',
     'federation.lr and model.prompt_tuning.lr would both label their trainings "lr=...": sweep one of them'),
    ('"model.lora" = [4]', "a sweep varies model.adaptation"),
    ('"model.lora.target" = [4]', "unknown setting 'model.lora.target': did you mean 'target_modules'"),
    ('"model.adaptation" = ["lora", "adapterx"]', "model.adaptation = 'adapterx'"),
])
def test_a_bad_sweep_is_one_line_naming_the_setting(tmp_path, sweep, expected):
    with pytest.raises(FedleakError) as info:
        _config(tmp_path, f"[matrix]\n[matrix.sweep]\n{sweep}\n")
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_adaptations_and_a_sweep_of_the_method_are_one_axis(tmp_path):
    with pytest.raises(FedleakError, match="both sweep the method: keep one"):
        _config(tmp_path, '[matrix]\nadaptations = ["ia3"]\n[matrix.sweep]\n"model.adaptation" = ["lora"]\n')
    with pytest.raises(FedleakError, match="lists a method twice"):
        _config(tmp_path, '[matrix]\nadaptations = ["ia3", "ia3"]\n')


def test_a_sweep_end_to_end_trains_labels_caches_and_reports_each_value(tmp_path, tiny_run_config):
    """Methods and alpha swept over FEDIT: each variant trains once with its own settings (alpha changes the
    clients' split), the results name it, a rerun trains nothing, and the report's table and plot show it."""
    (tmp_path / "run.toml").write_text(tiny_run_config + """
[model.prompt_tuning]
num_virtual_tokens = 8
[matrix]
algorithms = ["fedit"]
defenses = ["none"]
adaptations = ["lora", "ia3", "prompt_tuning"]
attacks = ["loss"]
[matrix.sweep]
"federation.alpha" = [0.05]
""")
    out = tmp_path / "out"

    def run():
        from fedleak.cli import main

        assert main(["run", str(tmp_path / "run.toml"), "--out", str(out), "--quiet"]) == 0  # in process
        return json.loads((out / "results.json").read_text())

    results = run()
    trainings = {t["algorithm"]: t for t in results["trainings"]}
    assert set(trainings) == {"fedit", "fedit [adaptation=ia3]", "fedit [adaptation=prompt_tuning]",
                              "fedit [alpha=0.05]"}
    assert trainings["fedit [alpha=0.05]"]["setting"] == {"path": "federation.alpha", "value": 0.05}
    params = {a: t["adapter_parameters"] for a, t in trainings.items()}
    assert params["fedit [adaptation=prompt_tuning]"] < params["fedit [adaptation=ia3]"] < params["fedit"]
    assert params["fedit [alpha=0.05]"] == params["fedit"]
    for label, t in trainings.items():  # a float32 upload per round is the adapter
        assert t["cost"]["upload_bytes_per_client_per_round"] == 4 * params[label]
    # alpha splits the records otherwise: the clients' training sizes differ from the configured split's.
    sizes = {a: [m["examples"] for _, m in sorted(t["rounds"][0]["client_metrics"].items())]
             for a, t in trainings.items()}
    assert sizes["fedit [alpha=0.05]"] != sizes["fedit"] and sizes["fedit [adaptation=ia3]"] == sizes["fedit"]
    assert len({t["training_key"] for t in trainings.values()}) == 4
    cells = {c["algorithm"]: c for c in results["cells"]}
    assert set(cells) == set(trainings) and all("setting" in cells[a] for a in cells if "[" in a)
    report = (out / "report.md").read_text()
    assert "## Sweeps" in report and "**model.adaptation**" in report and "**federation.alpha**" in report
    assert (out / "plots" / "sweep-federation-alpha.png").exists()
    assert "| fedit | none | prompt_tuning |" in report and "| fedit | none | lora * |" in report
    again = run()  # everything cached: the same numbers
    assert [t["training_key"] for t in again["trainings"]] == [t["training_key"] for t in results["trainings"]]
    assert "training fedit [alpha=0.05]/none seed 0: cached" in (out / "run.log").read_text()


def test_rules_match_a_variant_by_its_label_and_refuse_one_the_sweep_lacks(tmp_path):
    sweep = 'adaptations = ["lora", "ia3"]\n[matrix.sweep]\n"federation.alpha" = [0.1]\n'
    config = _config(tmp_path, BASE.replace('attacks = ["loss", ', 'exclude = [{ setting = "?*", defense = "!none" }, '
                                            '{ setting = "", algorithm = "fedpit" }]\nattacks = ["loss", ') + sweep)
    labels = sorted(u.label for u in all_trainings(config))
    # Configured: FEDIT only (fedpit excluded there); each variant: both algorithms, no defense.
    assert labels == ["fedit [adaptation=ia3]/none", "fedit [alpha=0.1]/none", "fedit/dp_sgd(noise_multiplier=1.0)",
                      "fedit/none", "fedpit(synthetic_per_round=2) [adaptation=ia3]/none",
                      "fedpit(synthetic_per_round=2) [alpha=0.1]/none"]
    with pytest.raises(FedleakError, match=r"matrix.exclude\[0\].setting = 'alpha=0.2' matches no setting of the "
                                           r"matrix: .*known: \"\", adaptation=ia3, alpha=0.1"):
        _config(tmp_path, BASE.replace('attacks = ["loss", ', 'exclude = [{ setting = "alpha=0.2" }]\n'
                                                              'attacks = ["loss", ') + sweep)


def test_a_swept_value_equal_to_the_configured_one_once_parsed_is_the_configured_training(tmp_path):
    config = _config(tmp_path, '[federation]\nalpha = 1.0\nrounds = 2\n[matrix]\n[matrix.sweep]\n'
                               '"federation.alpha" = [1, 0.5]\n"federation.rounds" = [2, 3]\n')
    assert settings_of(config) == [None, ("federation.alpha", 0.5), ("federation.rounds", 3)]
    twice = _config(tmp_path, '[matrix]\n[matrix.sweep]\n"federation.alpha" = [2, 2.0, 0.5]\n')
    assert settings_of(twice) == [None, ("federation.alpha", 2), ("federation.alpha", 0.5)]
    # The written config (results.json, a Flower client's spec) parses back to the same config.
    from fedleak.eval.config import parse_config, plain

    written = plain(twice)
    del written["seeds"]
    assert parse_config(written).hash() == twice.hash()
