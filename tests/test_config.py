from pathlib import Path

import pytest

from fedleak.cli import main
from fedleak.eval.config import load_config, parse_config
from fedleak.federated.errors import FedleakError


def test_quick_config_parses():
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "quick.toml")
    assert [d.name for d in config.matrix.defenses] == ["none", "trimmed_mean", "krum", "dp_sgd", "dp_sgd", "dp_fedavg"]
    assert [a.name for a in config.matrix.algorithms] == ["fedit", "fedpit", "cenit", "locit"]
    assert [a.name for a in config.matrix.attacks] == ["loss"]
    assert config.model.name == "embedded" and config.federation.clients == 3 and config.federation.alpha == 1.0


@pytest.mark.parametrize("table, expected", [
    ({"modle": {}}, "unknown key 'modle': did you mean 'model'"),
    ({"federation": {"round": 3}}, "unknown key 'federation.round': did you mean 'rounds'"),
    ({"federation": {"rounds": "3"}}, "federation.rounds = '3' is text, expected an integer"),
    ({"federation": {"lr": True}}, "federation.lr = True is a boolean, expected a number"),
    ({"federation": {"client_fraction": 1.5}}, r"federation.client_fraction = 1.5: must be in \(0, 1\]"),
    ({"model": {"lora": {"r": 0}}}, "model.lora.r = 0: must be a positive integer"),
    ({"data": {"source": "file"}}, "data.file.path is not set"),
    ({"matrix": {"defenses": ["medain"]}}, r"matrix.defenses\[0\]: unknown defense 'medain': did you mean 'median'"),
    ({"matrix": {"attacks": [{"name": "loss", "batchsize": 4}]}}, "loss has no parameter 'batchsize': did you mean 'batch_size'"),
    ({"matrix": {"attacks": [{"name": "loss", "batch_size": 0}]}}, "batch_size = 0"),
    ({"matrix": {"defenses": ["none", "none"]}}, "listed twice"),
])
def test_config_errors_name_the_key(table, expected):
    with pytest.raises(FedleakError, match=expected) as info:
        parse_config(table, "x.toml")
    assert str(info.value).startswith("x.toml: ") and "\n" not in str(info.value)


def test_component_parameters_become_keyword_arguments():
    config = parse_config({"matrix": {"attacks": [{"name": "loss", "batch_size": 4}]}})
    assert config.matrix.attacks[0].kwargs == {"batch_size": 4}
    assert config.matrix.attacks[0].label == "loss(batch_size=4)"


def test_cli_config_errors_exit_2_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[matrix]\ndefenses = ["none", "krumm"]\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "matrix.defenses[1]: unknown defense 'krumm'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "syntax.toml").write_text("seed = = 1\n")
    assert main(["run", str(tmp_path / "syntax.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for heading, names in (("algorithms:", ["fedit", "fedpit", "cenit", "locit", "locit_sa"]),
                           ("defenses:", ["none", "median"]), ("attacks:", ["loss"])):
        assert heading in out
        for name in names:
            assert f"  {name} " in out


def test_exclude_rules_drop_pairs_by_glob_and_negation():
    from fedleak.eval.matrix import trainings_of

    config = parse_config({"matrix": {
        "algorithms": ["fedit", "fedpit", "locit"],
        "defenses": ["none", "median", {"name": "krum", "f": 0}],
        "exclude": [{"algorithm": "fedpit", "defense": "!none"}, {"defense": "krum(f=0)", "algorithm": "fedit"}]}})
    pairs = [(a.label, d.label) for a, d in trainings_of(config)]
    assert pairs == [("fedit", "none"), ("fedit", "median"), ("fedpit", "none"), ("locit", "none")]
    with pytest.raises(FedleakError, match="unknown key 'matrix.exclude\\[0\\].algo'"):
        parse_config({"matrix": {"exclude": [{"algo": "x"}]}}, "x.toml")


def test_defense_compositions_and_preconditions_are_checked_up_front():
    config = parse_config({"matrix": {"defenses": [["norm_bound", "median"]]}})
    assert config.matrix.defenses[0].label == "norm_bound+median"
    for table, expected in [
        ({"matrix": {"defenses": [["secagg", "median"]]}}, "secagg hides individual uploads but median needs them"),
        ({"matrix": {"defenses": [["krum", "median"]]}}, "krum \\+ median both replace aggregate"),
        ({"matrix": {"defenses": ["none", {"name": "krum", "f": 1}]}}, r"defenses\[1\]: krum: f = 1 needs more than"),
        ({"federation": {"clients": 6}, "matrix": {"defenses": [{"name": "bulyan", "f": 1}]}}, "at least 4f \\+ 3 = 7"),
    ]:
        with pytest.raises(FedleakError, match=expected):
            parse_config(table, "x.toml")
    # Baselines without a federation do not run defenses, so no federation check applies.
    parse_config({"matrix": {"algorithms": ["locit"], "defenses": [{"name": "krum", "f": 1}]}})
