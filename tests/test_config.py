from pathlib import Path

import pytest

from fedleak.cli import main
from fedleak.eval.config import load_config, parse_config
from fedleak.common.errors import FedleakError


# What configs/quick.toml leaves to configs/full.toml to fit `make demo` in its 10 minutes (each attack and defense
# is tested on its own): attacks whose extra forward passes cost most, views beyond the global one for the
# frontier's prefixed and self-prompted attacks, and the defenses that only the poisoning section reads.
QUICK_LEAVES_OUT = {"lowercase", "con_recall"}
QUICK_GLOBAL_ONLY = {"recall", "spv_mia"}


@pytest.mark.parametrize("name", ["quick", "full"])
def test_shipped_configs_run_every_attack_on_global_and_membership_on_every_view(name):
    from fedleak.attacks.base import ATTACKS
    from fedleak.defenses.base import DEFENSES

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{name}.toml")
    builtin = {n for n in ATTACKS.names() if ATTACKS.get(n).__module__.startswith("fedleak.attacks.")}
    poisoning = {n for n in builtin if ATTACKS.get(n).family == "poisoning"}
    observers = {}
    for spec in config.matrix.attacks:
        observers.setdefault(spec.name, set()).update(spec.observers)
    assert set(observers) == builtin - poisoning - (QUICK_LEAVES_OUT if name == "quick" else set())
    # Each attack on the global view where its threat model allows (FedMIA needs the individual uploads).
    assert all("global" in o for a, o in observers.items() if "global" in ATTACKS.get(a).observers)
    # Poisoning runs in scenarios: a backdoor and a model-poisoning one at least, against the robust rules.
    in_scenarios = {a.name for s in config.matrix.scenarios for a in s.attacks}
    assert "backdoor" in in_scenarios and in_scenarios & {"scaling", "sign_flip", "gaussian", "alie", "ipm"}
    assert in_scenarios == poisoning or name == "quick"
    defenses = {p.name for d in config.matrix.defenses for p in (d.parts or (d,))}
    if name == "full":  # Bulyan with f = 1 needs 7 clients (n >= 4f + 3); full.toml has 5
        assert defenses == {n for n in DEFENSES.names()
                            if DEFENSES.get(n).__module__.startswith("fedleak.defenses.")} - {"bulyan"}
    else:  # DP both ways, secure aggregation, sanitisation, a selecting rule and a newer robust rule
        assert {"none", "krum", "dp_sgd", "dp_fedavg", "secagg", "scrub", "fltrust"} <= defenses
    for attack, seen in observers.items():  # membership on every view its threat model allows
        if ATTACKS.get(attack).family == "membership" and not (name == "quick" and attack in QUICK_GLOBAL_ONLY):
            assert seen == set(ATTACKS.get(attack).observers), attack
    assert [a.name for a in config.matrix.algorithms][:4] == ["fedit", "fedpit", "cenit", "locit"]
    assert config.data.embedded.audit_canaries > 0
    assert config.model.name == "embedded" and config.federation.alpha == 1.0


@pytest.mark.parametrize("table, expected", [
    ({"modle": {}}, "unknown key 'modle': did you mean 'model'"),
    ({"federation": {"round": 3}}, "unknown key 'federation.round': did you mean 'rounds'"),
    ({"federation": {"rounds": "3"}}, "federation.rounds = '3' is text, expected an integer"),
    ({"federation": {"lr": True}}, "federation.lr = True is a boolean, expected a number"),
    ({"federation": {"client_fraction": 1.5}}, r"federation.client_fraction = 1.5: must be in \(0, 1\]"),
    ({"model": {"lora": {"r": 0}}}, "model.lora.r = 0: must be a positive integer"),
    ({"data": {"source": "file"}}, "data.file.path is not set"),
    ({"matrix": {"defenses": ["medain"]}}, r"matrix.defenses\[0\]: unknown defense 'medain': did you mean 'median'"),
    ({"matrix": {"attacks": [{"name": "min_k", "kk": 0.1}]}}, "min_k has no parameter 'kk': did you mean 'k'"),
    ({"matrix": {"attacks": [{"name": "min_k", "k": 0}]}}, "k = 0"),
    ({"matrix": {"attacks": [{"name": "loss", "rounds": "last"}]}}, r"matrix.attacks\[0\].rounds = 'last': use \"final\""),
    ({"matrix": {"attacks": [{"name": "loss", "rounds": [1, 99]}]}}, "round 99 is after the last round"),
    ({"matrix": {"defenses": [{"name": "none", "rounds": "all"}]}}, "only privacy attacks in matrix.attacks take rounds"),
    ({"matrix": {"attacks": ["loss", {"name": "loss", "observers": ["client", "global"]}]}},
     "loss is listed twice for the same observer"),
    ({"attack": {"confidence": 1.0}}, r"attack.confidence = 1.0: must be in \(0, 1\)"),
    ({"matrix": {"defenses": ["none", "none"]}}, "listed twice"),
    ({"model": {"name": "./no-such-model"}}, r"model.name = './no-such-model': the folder .*no-such-model does not "
                                             r"exist: give an existing model folder"),
])
def test_config_errors_name_the_key(table, expected):
    with pytest.raises(FedleakError, match=expected) as info:
        parse_config(table, "x.toml")
    assert str(info.value).startswith("x.toml: ") and "\n" not in str(info.value)


def test_component_parameters_become_keyword_arguments():
    config = parse_config({"matrix": {"attacks": [{"name": "min_k", "k": 0.5, "rounds": [2, 1, 2]}]}})
    assert config.matrix.attacks[0].kwargs == {"k": 0.5}
    assert config.matrix.attacks[0].label == "min_k(k=0.5)"
    assert config.matrix.attacks[0].rounds == (1, 2) and config.matrix.attacks[0].observers == ("global",)
    assert config.to_dict()["matrix"]["attacks"][0] == {"name": "min_k", "k": 0.5, "observers": ["global"],
                                                         "rounds": [1, 2], "scenarios": ["clean"]}
    both = parse_config({"matrix": {"attacks": [{"name": "loss", "rounds": "all"}, {"name": "loss", "observers": ["client"]}]}})
    assert [(a.observers, a.rounds) for a in both.matrix.attacks] == [(("global",), "all"), (("client",), "final")]


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
    from fedleak.eval.plan import all_trainings

    config = parse_config({"matrix": {
        "algorithms": ["fedit", "fedpit", "locit"],
        "defenses": ["none", "median", {"name": "krum", "f": 0}],
        "exclude": [{"algorithm": "fedpit", "defense": "!none"}, {"defense": "krum(f=0)", "algorithm": "fedit"}]}})
    pairs = [(u.algorithm.label, u.defense.label) for u in all_trainings(config)]
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


def test_include_and_observer_rules_cut_trainings_and_cells():
    from fedleak.eval.plan import all_trainings, attacks_of

    config = parse_config({"matrix": {
        "algorithms": ["fedit", "locit"], "defenses": ["none", "median", {"name": "dp_sgd", "noise_multiplier": 1.0}],
        "attacks": [{"name": "loss", "observers": ["global", "upload", "client"]},
                    {"name": "lira", "observers": ["global", "upload", "client"]}],
        # all defenses x all MIAs, but LiRA only on the global view, and DP-SGD only with LOSS
        "include": [{"defense": "!dp_sgd"}, {"defense": "dp_sgd", "attack": "loss"}],
        "exclude": [{"attack": "lira", "observer": "!global"}]}})
    units = all_trainings(config)
    assert [(u.algorithm.name, u.defense.name) for u in units] == [
        ("fedit", "none"), ("fedit", "median"), ("fedit", "dp_sgd"), ("locit", "none")]
    cells = {u.defense.name + "/" + u.algorithm.name: {s.name: o for s, o in attacks_of(config, u)} for u in units}
    assert cells["none/fedit"] == {"loss": ("global", "upload", "client"), "lira": ("global",)}
    assert cells["dp_sgd/fedit"] == {"loss": ("global", "upload", "client")}
    with pytest.raises(FedleakError, match=r"matrix.include\[0\].observer = 'globl' matches no observer.*did you mean 'global'"):
        parse_config({"matrix": {"include": [{"observer": "globl"}]}}, "x.toml")


def test_seeds_and_only_patterns():
    from fedleak.eval.plan import plan

    config = parse_config({"seeds": [3, 1], "matrix": {
        "algorithms": ["fedit", "cenit"], "defenses": ["none", "median"], "attacks": ["loss", "zlib"]}})
    assert config.run_seeds == (3, 1)
    assert [(p.unit.label, p.unit.seed) for p in plan(config)][:3] == [("fedit/none", 3), ("fedit/median", 3),
                                                                       ("cenit/none", 3)]
    picked = lambda *only: [(p.unit.label, p.unit.seed, [s.name for s, _ in p.attacks]) for p in plan(config, only)]
    assert picked("median") == [("fedit/median", 3, ["loss", "zlib"]), ("fedit/median", 1, ["loss", "zlib"])]
    assert picked("zlib", "cenit/*")[2] == ("cenit/none", 3, ["loss", "zlib"])
    assert picked("zlib")[0] == ("fedit/none", 3, ["zlib"])
    assert picked("fed*/none/clean/l*") == [("fedit/none", 3, ["loss"]), ("fedit/none", 1, ["loss"])]
    with pytest.raises(FedleakError, match="--only zlb: matches no training or attack.*did you mean 'zlib'"):
        plan(config, ("zlb",))
    with pytest.raises(FedleakError, match="both seed and seeds"):
        parse_config({"seed": 1, "seeds": [1, 2]}, "x.toml")
    with pytest.raises(FedleakError, match="repeats a seed"):
        parse_config({"seeds": [1, 1]}, "x.toml")
    assert config.for_seed(1).seed == 1 and config.for_seed(1).run_seeds == (1,)


def test_a_cell_include_rule_admits_only_the_trainings_its_cells_probe():
    from fedleak.eval.plan import all_trainings

    config = parse_config({"matrix": {
        "defenses": ["none", "median"], "attacks": [{"name": "lira", "observers": ["global"]}],
        "scenarios": [{"name": "b", "clients": [0], "attacks": ["backdoor"]}],
        "include": [{"attack": "lira", "observer": "global"}, {"defense": "median", "scenario": "b"}]}})
    # LiRA probes clean trainings only: the poisoned FedAvg training is not pulled in by the LiRA rule.
    assert [u.label for u in all_trainings(config)] == ["fedit/none", "fedit/median", "fedit/median/b"]


def test_only_patterns_each_must_match_and_see_composed_defenses():
    from fedleak.eval.plan import plan

    config = parse_config({"matrix": {"defenses": ["none", [{"name": "dp_sgd", "noise_multiplier": 1.0}, "secagg"]],
                                      "attacks": ["loss"]}})
    assert [p.unit.defense.label for p in plan(config, ("secagg",))] == ["dp_sgd(noise_multiplier=1.0)+secagg"]
    with pytest.raises(FedleakError, match="--only typo: matches no training"):
        plan(config, ("fedit", "typo"))
    with pytest.raises(FedleakError, match="at most four parts"):
        plan(config, ("fedit/none/clean/loss/x",))


def test_training_folder_names_are_safe_and_distinct():
    from fedleak.eval.matrix_config import ComponentSpec
    from fedleak.eval.plan import TrainingUnit

    unit = lambda **params: TrainingUnit(ComponentSpec("fedit"), ComponentSpec("norm_bound", tuple(params.items())),
                                         None, 0)
    assert unit(max_norm=4.0).stem == "fedit-norm_bound(max_norm=4.0)-seed0"
    odd, other = unit(path="a/b c").stem, unit(path="a/b_c").stem
    assert "/" not in odd and " " not in odd and odd != other and odd.endswith("-seed0")
    assert len(unit(path="x" * 300).stem) < 130


def test_a_config_path_that_is_no_text_file_is_one_line(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "binary.toml").write_bytes(b"seed = 1\n\xff\xfe")
    for name, expected in (("folder.toml", "is a folder, not a config file: give the path of a TOML file"),
                           ("binary.toml", "not UTF-8 text (byte 9 is 0xff): give a TOML text file")):
        with pytest.raises(FedleakError) as raised:
            load_config(tmp_path / name)
        assert str(raised.value).startswith(f"{tmp_path / name}: {expected}")


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.toml")))
def test_every_shipped_config_loads(name):
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / name)
    assert config.matrix.algorithms and config.matrix.attacks
