"""Third-party components without editing fedleak: an entry point, and `plugins = [...]` in a config."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedleak.attacks.base import ATTACKS, Attack, ExtractionAttack, MembershipAttack, register_attack
from fedleak.attacks.membership.stats import LogitAttack
from fedleak.attacks.poisoning.base import DataPoisoning, ModelPoisoning, PoisoningAttack
from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.registry import RegistryError
from fedleak.federated.rounds import Algorithm, register_algorithm

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "plugin_pkg"



def _fedleak(*args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fedleak", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_entry_point_plugin_is_listed_and_runs_in_a_matrix(tmp_path, tiny_run_config):
    env = {"PYTHONPATH": os.pathsep.join([str(FIXTURE), os.environ.get("PYTHONPATH", "")])}
    listed = _fedleak("list", env_extra=env)
    assert listed.returncode == 0 and re.search(r"^  freeze_half +Freeze half", listed.stdout, re.M)
    (tmp_path / "run.toml").write_text(tiny_run_config + '[matrix]\ndefenses = ["none", {name = "freeze_half", keep = "lora_A"}]\n')
    proc = _fedleak("run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out"), "--quiet", env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    plugin = next(t for t in results["trainings"] if t["defense"] == "freeze_half(keep=lora_A)")
    assert plugin["defense_params"] == {"keep": "lora_A"} and plugin["rounds"][0]["frozen"] == "lora_A"
    assert _example_record(FIXTURE) in results["plugins"]  # which plug-in, from which distribution and version
    # Without the plug-in on the path the same config is a clear config error.
    proc = _fedleak("run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out2"), "--quiet")
    assert proc.returncode == 2 and "unknown defense 'freeze_half'" in proc.stderr


def _example_record(folder: Path) -> dict:
    import hashlib

    source = (folder / "fedleak_plugin_example.py").read_bytes()
    return {"module": "fedleak_plugin_example", "loaded_by": "entry point fedleak.defenses:freeze_half",
            "distribution": "fedleak-plugin-example", "version": "0.1",
            "sha256": hashlib.sha256(source).hexdigest()}


def test_editing_an_entry_point_plugin_changes_the_training_key(tmp_path, monkeypatch):
    """Installed by entry point only (no `plugins = [...]`), edited and reinstalled: never served from
    the cache. A reinstall under another version changes the key too."""
    from fedleak.eval.cache import code_fingerprint, plugin_records, training_key
    from fedleak.eval.config import parse_config
    from fedleak.eval.context import seed_context
    from fedleak.eval.plan import plan

    site = tmp_path / "site"
    shutil.copytree(FIXTURE, site)
    monkeypatch.syspath_prepend(str(site))
    config = parse_config({"data": {"embedded": {"private_records": 24, "heldout_records": 4,
                                                 "canaries_per_repetition": 0}},
                           "federation": {"min_records_per_client": 2}}, "run.toml")
    unit = plan(config, ())[0].unit
    ctx = seed_context(config, unit.seed, tmp_path)

    def key() -> str:
        code_fingerprint.cache_clear()  # a new process in real use
        return training_key(ctx, unit)

    before = key()
    assert _example_record(site) in plugin_records(())
    source = site / "fedleak_plugin_example.py"
    source.write_text(source.read_text().replace('info.metrics["frozen"] = self.keep',
                                                 'info.metrics["frozen"] = self.keep.upper()'))
    edited = key()
    assert edited != before and _example_record(site) in plugin_records(())
    metadata = site / "fedleak_plugin_example-0.1.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.1", "Version: 0.2"))
    assert key() != edited
    assert next(r for r in plugin_records(()) if r["module"] == "fedleak_plugin_example")["version"] == "0.2"
    monkeypatch.undo()  # uninstalled: the key of a run without it comes back
    assert key() not in (before, edited)
    assert not any(r["module"] == "fedleak_plugin_example" for r in plugin_records(()))


def test_readme_plugin_example_runs_from_the_config(tmp_path, tiny_run_config):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) < 40
    (tmp_path / "my_defenses.py").write_text(code)
    (tmp_path / "run.toml").write_text('plugins = ["my_defenses"]\n' + tiny_run_config
                                       + '[matrix]\ndefenses = [{ name = "server_lr", rate = 0.5 }]\n')
    proc = _fedleak("run", "run.toml", "--out", "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["server_lr"] for r in results["trainings"][0]["rounds"]] == [0.5, 0.5]


def test_missing_plugin_module_is_a_config_error(tmp_path):
    (tmp_path / "run.toml").write_text('plugins = ["no_such_plugin_module"]\n')
    proc = _fedleak("run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "plugins[0] = 'no_such_plugin_module': no module named" in proc.stderr


def test_broken_plugin_module_is_a_one_line_error(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "run.toml").write_text('plugins = ["broken_plugin"]\n')
    proc = _fedleak("run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "plugins[0] = 'broken_plugin' failed to import: RuntimeError: boom" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_extraction_plugin_returning_a_plain_dict_is_a_one_line_error(tmp_path, tiny_run_config):
    (tmp_path / "dict_attack.py").write_text(
        "from fedleak.attacks.base import ExtractionAttack, register_attack\n\n\n"
        "@register_attack('dict_extraction')\nclass DictExtraction(ExtractionAttack):\n"
        "    \"\"\"Returns the dict that came before ExtractionResult.\"\"\"\n\n"
        "    def run(self, target, secrets):\n        return {'metrics': {}, 'details': {}}\n")
    (tmp_path / "run.toml").write_text('plugins = ["dict_attack"]\n' + tiny_run_config + '[matrix]\n'
                                       'attacks = [{ name = "dict_extraction", observers = ["global"] }]\n')
    proc = _fedleak("run", "run.toml", "--out", "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "attack dict_extraction: run() returned dict, not an ExtractionResult" in proc.stderr


# Contracts are checked when a class registers, not when the matrix first calls it after training.

class Scorer(MembershipAttack):
    """A complete membership attack (never registered under its own name)."""

    def score(self, target, records):
        return records


def _refusal(register, name, cls) -> str:
    with pytest.raises(RegistryError) as raised:
        register(name)(cls)
    return str(raised.value)


def test_a_class_not_derived_from_the_base_is_refused():
    class NotAnAttack:
        def score(self, target, records):
            return records

    message = _refusal(register_attack, "plain_mia_test", NotAnAttack)
    assert message == (f"attack 'plain_mia_test' ({__name__}.{NotAnAttack.__qualname__}) does not subclass Attack: "
                       f"derive it from fedleak.attacks.base.Attack (or one of its subclasses)")
    assert "does not subclass Defense" in _refusal(register_defense, "mia_as_defense_test", Scorer)
    assert "does not subclass Attack" in _refusal(register_attack, "function_test", lambda target, records: records)


@pytest.mark.parametrize("register, base, member, doc", [
    (register_attack, MembershipAttack, "score()", "MembershipAttack.score"),
    (register_attack, LogitAttack, "from_stats()", "LogitAttack.from_stats"),
    (register_attack, ExtractionAttack, "run()", "ExtractionAttack.run"),
    (register_attack, DataPoisoning, "poison_records()", "DataPoisoning.poison_records"),
    (register_attack, ModelPoisoning, "poison_update()", "ModelPoisoning.poison_update"),
    # Derived from no family: nothing would ever call it.
    (register_attack, Attack, "family", "Attack.family"),
    (register_attack, PoisoningAttack, "family", "Attack.family"),
    (register_algorithm, Algorithm, "client_round()", "Algorithm.client_round"),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_subclass_missing_a_required_method_is_refused_naming_it(register, base, member, doc):
    kind = "algorithm" if base is Algorithm else "attack"
    cls = type("Incomplete", (base,), {"__module__": "my_plugin"})
    assert _refusal(register, "incomplete_test", cls) == (
        f"{kind} 'incomplete_test' (my_plugin.Incomplete) does not implement {member}: define it (see {doc})")


def test_a_misspelt_method_is_pointed_at():
    class MyMIA(MembershipAttack):
        def scores(self, target, records):
            return records

    assert _refusal(register_attack, "my_mia", MyMIA).endswith(
        "does not implement score(): did you mean 'scores'? define it (see MembershipAttack.score)")


def test_a_misspelt_optional_hook_is_refused_and_a_private_helper_is_not():
    class ServerLR(Defense):
        def after_aggregate(self, state, *, previous, info):
            return state

    assert _refusal(register_defense, "server_lr_test", ServerLR).endswith(
        "defines after_aggregate(), which Defense never calls: did you mean after_aggregation()? rename it "
        "(or make it private: _after_aggregate)")

    class Helper(Defense):
        def _after_aggregate(self, state):
            return state

        def clip_updates(self, updates):  # a public helper named unlike any hook is fine
            return updates

    register_defense("helper_defense_test")(Helper)


def test_an_attack_must_derive_from_a_family_base_even_when_it_sets_the_family():
    for parent, family in ((Attack, "membership"), (PoisoningAttack, "poisoning")):
        cls = type("Familyless", (parent,), {"__module__": "my_plugin", "family": family})
        assert _refusal(register_attack, "familyless_test", cls) == (
            "attack 'familyless_test' (my_plugin.Familyless) derives from no attack family's base: derive it from "
            "MembershipAttack or ExtractionAttack (fedleak.attacks.base), DataPoisoning or ModelPoisoning "
            "(fedleak.attacks.poisoning.base)")


def test_init_arguments_must_be_keyword_only_and_annotated_so_configs_can_be_checked():
    class Positional(Defense):
        def __init__(self, rate: float = 0.5):
            self.rate = rate

    class Unannotated(Defense):
        def __init__(self, *, rate=0.5):
            self.rate = rate

    assert "__init__ argument 'rate' is not keyword-only: put it after a *" in _refusal(
        register_defense, "positional_test", Positional)
    assert "__init__ argument 'rate' has no type annotation: annotate it" in _refusal(
        register_defense, "unannotated_test", Unannotated)


def test_a_name_taken_by_a_builtin_is_refused_naming_both():
    message = _refusal(register_attack, "loss", Scorer)
    assert message == (f"attack 'loss' ({__name__}.Scorer) is already registered by "
                       f"fedleak.attacks.membership.loss.LossAttack: pick another name")
    assert ATTACKS.get("loss") is not Scorer


def test_a_plugin_breaking_a_contract_is_a_one_line_config_error(tmp_path):
    (tmp_path / "bad_mia.py").write_text(
        "from fedleak.attacks.base import MembershipAttack, register_attack\n\n\n"
        "@register_attack('my_mia')\nclass MyMIA(MembershipAttack):\n    pass\n")
    (tmp_path / "run.toml").write_text('plugins = ["bad_mia"]\n')
    proc = _fedleak("run", "run.toml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.strip().endswith(
        "plugins[0] = 'bad_mia': attack 'my_mia' (bad_mia.MyMIA) does not implement score(): define it "
        "(see MembershipAttack.score)")


def test_registering_makes_construction_from_python_check_the_arguments():
    from fedleak.common.errors import FedleakError
    from fedleak.common.params import UnitInterval

    class ServerRate(Defense):
        def __init__(self, *, rate: UnitInterval = 0.5):
            self.rate = rate

    assert ServerRate(rate=2.0).rate == 2.0  # a plain class: nothing checks it yet
    register_defense("server_rate_test")(ServerRate)
    with pytest.raises(FedleakError, match=r"^server_rate_test: rate = 2.0: must be in \(0, 1\]$"):
        ServerRate(rate=2.0)
    assert ServerRate(rate=1).rate == 1.0 and isinstance(ServerRate(rate=1).rate, float)
