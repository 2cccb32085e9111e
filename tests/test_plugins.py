"""Third-party components without editing fedleak: an entry point, and `plugins = [...]` in a config."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path


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
    # Without the plug-in on the path the same config is a clear config error.
    proc = _fedleak("run", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out2"), "--quiet")
    assert proc.returncode == 2 and "unknown defense 'freeze_half'" in proc.stderr


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
