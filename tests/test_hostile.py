"""Hostile inputs, one table: every bad config, data file, checkpoint, results file or output folder is a
one-line error naming the file and the fix, exit status 2, no traceback, and nothing written.

The CLI runs in-process (`fedleak.cli.main`, what the console script calls); two cases also run through
the real entry point in a subprocess, which must print the same line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save as save_safetensors

from fedleak.cli import main
from fedleak.common.io import sha256_bytes

# What a fix says, in the messages' own style: an imperative, the value expected, or the names to choose from.
FIX = re.compile(r"\b(give|use|fix|remove|add|set|write|pass|make|save|point|rerun|restore|convert|rename|fill|"
                 r"list|put|install|free|check|pick|expected|must|did you mean|known|available)\b")
# Valid data for the data cases; most fields stay small so every case runs in well under a second.
RECORD = {"instruction": "Summarise the note.", "input": "Patient seen today.", "output": "Seen today.",
          "category": "summary"}


@dataclass
class Sandbox:
    """One case's folder: a valid config, a valid checkpoint, a valid data file; a case breaks one of them."""

    root: Path
    config_text: str

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def round(self) -> Path:
        return self.ckpt / "round-0001"

    def config(self, extra: str = "", name: str = "run.toml") -> Path:
        """Write the config: `extra` first, so its top-level keys stay outside the base's tables."""
        path = self.root / name
        path.write_text(extra + self.config_text)
        return path

    def run(self, extra: str = "") -> list[str]:
        return ["run", str(self.config(extra)), "--out", str(self.out)]

    def data(self, name: str, content: bytes | str | None) -> Path:
        """Write the data file (None: leave it absent) and return it."""
        path = self.root / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_bytes(content)
        return path

    def run_data(self, name: str, content: bytes | str | None) -> tuple[list[str], Path]:
        path = self.data(name, content)
        return self.run(f'[data]\nsource = "file"\n[data.file]\npath = "{path.name}"\n'), path

    def attack(self) -> list[str]:
        return ["attack", str(self.ckpt), "--config", str(self.config()), "--out", str(self.out)]

    def manifest(self) -> dict:
        return json.loads((self.round / "manifest.json").read_text())

    def write_manifest(self, manifest: dict) -> Path:
        path = self.round / "manifest.json"
        path.write_text(json.dumps(manifest))
        return path

    def replace_file(self, data: bytes, name: str = "global.safetensors") -> Path:
        """Put `data` in the checkpoint under `name`, the manifest's global entry pointing at it with a
        matching sha256: only the content itself is wrong."""
        manifest = self.manifest()
        (self.round / manifest["files"]["global"]["path"]).unlink()
        (self.round / name).write_bytes(data)
        manifest["files"]["global"] = {"path": name, "sha256": sha256_bytes(data)}
        self.write_manifest(manifest)
        return self.round / name

    def results(self, content: bytes | str, folder: str = "done") -> Path:
        (self.root / folder).mkdir(exist_ok=True)
        path = self.root / folder / "results.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


Case = Callable[[Sandbox], tuple[list[str], Path | str]]  # -> argv, what the message must name


def _config(extra: str) -> Case:
    def case(s: Sandbox):
        return s.run(extra), s.root / "run.toml"
    return case


def _raw_config(content: bytes) -> Case:
    def case(s: Sandbox):
        (s.root / "raw.toml").write_bytes(content)
        return ["run", str(s.root / "raw.toml"), "--out", str(s.out)], s.root / "raw.toml"
    return case


def _data(name: str, content) -> Case:
    def case(s: Sandbox):
        return s.run_data(name, content)
    return case


def _manifest(edit: Callable[[dict], None]) -> Case:
    def case(s: Sandbox):
        manifest = s.manifest()
        edit(manifest)
        return s.attack(), s.write_manifest(manifest)
    return case


def _content(make: Callable[[bytes], bytes], name: str = "global.safetensors") -> Case:
    """A checkpoint file whose content is bad but whose sha256 in the manifest matches."""
    def case(s: Sandbox):
        good = (s.round / "global.safetensors").read_bytes()
        return s.attack(), s.replace_file(make(good), name)
    return case


def _tensors(edit: Callable[[dict], dict]) -> Case:
    """A valid safetensors file (sha256 matching) whose tensors do not fit the config's adapter."""
    def case(s: Sandbox):
        from safetensors.torch import load

        good = load((s.round / "global.safetensors").read_bytes())
        return s.attack(), s.replace_file(save_safetensors(edit(good)))
    return case


def _folder_named(name: str) -> Case:
    def case(s: Sandbox):
        (s.root / name).mkdir()
        (s.root / name / "records.json").write_text(json.dumps([RECORD]))
        return s.run_data(name, None)
    return case


def _pickle_file(name: str) -> Case:
    """A manifest pointing at a pickle whose sha256 matches: refused for its suffix (the message names
    the manifest's field), never opened."""
    def case(s: Sandbox):
        argv, _ = _content(_pickle, name)(s)
        return argv, s.round / "manifest.json"
    return case


def _corrupt_header(data: bytes) -> bytes:
    return (10 ** 12).to_bytes(8, "little") + data[8:]  # the header length: far beyond the file


def _pickle(_: bytes) -> bytes:
    import pickle

    return pickle.dumps({"default": [1.0, 2.0]})  # never unpickled: its sha256 matches, its suffix does not


def _sys_out(s: Sandbox):
    if not Path("/sys").is_dir():
        pytest.skip("no /sys: not Linux")
    return ["run", str(s.config()), "--out", "/sys/fedleak-hostile-test"], "/sys/fedleak-hostile-test"


def _read_only_out(s: Sandbox):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the /sys case covers a folder nobody can write)")
    s.out.mkdir()
    s.out.chmod(0o555)
    return s.run(), s.out


def _under_file(command: str) -> Case:
    def case(s: Sandbox):
        (s.root / "a-file").write_text("not a folder\n")
        argv = s.run() if command == "run" else s.attack()
        argv[argv.index("--out") + 1] = str(s.root / "a-file" / "out")
        return argv, s.root / "a-file"
    return case


def _run_log_is_a_folder(s: Sandbox):
    (s.out / "run.log").mkdir(parents=True)
    return s.run(), s.out


def _checkpoint_dir(make: Callable[[Sandbox], Path]) -> Case:
    def case(s: Sandbox):
        folder = make(s)
        return ["attack", str(folder), "--config", str(s.config()), "--out", str(s.out)], folder
    return case


def _misnamed_round(s: Sandbox):
    s.round.rename(s.ckpt / "round-1")
    return s.attack(), s.ckpt / "round-1"


CASES: dict[str, Case] = {
    # Config: syntax, types, keys, values, the file itself, plug-ins.
    "config-toml-syntax": _config("seed = = 1\n"),
    "config-toml-unclosed-table": _config("[model\n"),
    "config-toml-duplicate-key": _config("[utility]\nrecords = 4\n"),
    "config-wrong-type-text": _config("[attack]\nbootstrap = \"ten\"\n"),
    "config-wrong-type-boolean": _config("[attack]\nbatch_size = true\n"),
    "config-wrong-type-table": _config("seeds = 3\n"),
    "config-unknown-top-key": _config("[modle]\nname = \"x\"\n"),
    "config-unknown-nested-key": _config("[attack]\nbatchsize = 8\n"),
    "config-bad-enum": _config("[data]\nsource = \"csv\"\n"),
    "config-out-of-range": _config("[attack]\nconfidence = 1.5\n"),
    "config-lora-rank-zero": _config("[model.lora]\nr = 0\n"),
    "config-unknown-defense": _config("[matrix]\ndefenses = [\"medain\"]\n"),
    "config-unknown-attack-parameter": _config("[matrix]\nattacks = [{ name = \"min_k\", kk = 0.1 }]\n"),
    "config-bad-rounds-word": _config("[matrix]\nattacks = [{ name = \"loss\", rounds = \"last\" }]\n"),
    "config-round-after-the-last": _config("[matrix]\nattacks = [{ name = \"loss\", rounds = [9] }]\n"),
    "config-rule-matches-nothing": _config("[matrix]\ninclude = [{ algorithm = \"fedi\" }]\n"),
    "config-seed-and-seeds": _config("seeds = [1, 2]\nseed = 3\n"),
    "config-repeated-seed": _config("seeds = [1, 1]\n"),
    "config-file-source-without-path": _config("[data]\nsource = \"file\"\n"),
    "config-model-folder-missing": _config("[model]\nname = \"./no-such-model-folder\"\n"),
    "config-plugin-missing": _config("plugins = [\"no_such_fedleak_plugin\"]\n"),
    "config-plugin-not-a-list": _config("plugins = \"no_such_fedleak_plugin\"\n"),
    "config-plugin-broken": lambda s: ((s.root / "broken_plugin.py").write_text("raise RuntimeError('boom')\n"),
                                       _config("plugins = [\"broken_plugin\"]\n")(s))[1],
    "config-is-a-directory": lambda s: ((s.root / "dir.toml").mkdir(),
                                        (["run", str(s.root / "dir.toml"), "--out", str(s.out)], s.root / "dir.toml"))[1],
    "config-binary": _raw_config(b"\x00\x9f\x92\x96\xff\xfe binary"),
    "config-utf16": _raw_config("seed = 1\n".encode("utf-16")),
    "config-missing": lambda s: (["run", str(s.root / "none.toml"), "--out", str(s.out)], s.root / "none.toml"),
    # Data files (federated/loader.py): found before any model is resolved or built.
    "data-directory-named-json": _folder_named("records.json"),
    "data-directory-named-jsonl": _folder_named("records.jsonl"),
    "data-binary": _data("records.json", b"\x00\xff\xfe\x9f binary"),
    "data-empty": _data("records.json", ""),
    "data-invalid-json": _data("records.json", "[{\"instruction\": \"x\",]"),
    "data-not-a-list": _data("records.json", json.dumps({"records": [RECORD]})),
    "data-record-not-an-object": _data("records.json", json.dumps([RECORD, "just text"])),
    "data-missing-field": _data("records.json", json.dumps([RECORD, {"instruction": "No answer."}])),
    "data-wrong-field-type": _data("records.json", json.dumps([RECORD, {**RECORD, "instruction": 5}])),
    "data-empty-field": _data("records.json", json.dumps([RECORD, {**RECORD, "output": "  "}])),
    "data-jsonl-bad-line": _data("records.jsonl", json.dumps(RECORD) + "\n{not json}\n"),
    "data-missing-file": _data("records.json", None),
    "data-wrong-suffix": _data("records.csv", "instruction,output\nx,y\n"),
    # Checkpoints for `fedleak attack`: every file is checked before any output, data or model work.
    "ckpt-corrupt-header-length": _content(_corrupt_header),
    "ckpt-truncated-file": _content(lambda data: data[: len(data) // 2]),
    "ckpt-empty-file": _content(lambda data: b""),
    "ckpt-sha-mismatch": lambda s: (s.attack(), ((s.round / "global.safetensors").write_bytes(
        _corrupt_header((s.round / "global.safetensors").read_bytes())), s.round / "global.safetensors")[1]),
    "ckpt-manifest-not-json": lambda s: (s.attack(), ((s.round / "manifest.json").write_text("{\"format\": "),
                                                      s.round / "manifest.json")[1]),
    "ckpt-manifest-binary": lambda s: (s.attack(), ((s.round / "manifest.json").write_bytes(b"\xff\xfe\x00{"),
                                                    s.round / "manifest.json")[1]),
    "ckpt-manifest-not-an-object": lambda s: (s.attack(), ((s.round / "manifest.json").write_text("[1, 2]"),
                                                           s.round / "manifest.json")[1]),
    "ckpt-manifest-wrong-format": _manifest(lambda m: m.update(format="other-tool/1")),
    "ckpt-view-points-at-bin": _pickle_file("adapter_model.bin"),
    "ckpt-view-points-at-pt": _pickle_file("adapter.pt"),
    "ckpt-view-points-at-pkl": _pickle_file("adapter.pkl"),
    "ckpt-path-leaves-the-round": _manifest(lambda m: m["files"]["global"].update(path="../../run.toml.safetensors")),
    "ckpt-file-entry-not-an-object": _manifest(lambda m: m["files"].update(global_="global.safetensors")),
    "ckpt-bad-sha256-field": _manifest(lambda m: m["files"]["global"].update(sha256="abc")),
    "ckpt-view-names-unlisted-file": _manifest(lambda m: m["views"].update({"upload/0": {"default": "nope"}})),
    "ckpt-bad-view-key": _manifest(lambda m: m["views"].update({"server": {"default": "global"}})),
    "ckpt-bad-clients": _manifest(lambda m: m.update(clients="all")),
    "ckpt-listed-file-missing": lambda s: (s.attack(), ((s.round / "global.safetensors").unlink(),
                                                        s.round / "global.safetensors")[1]),
    "ckpt-integer-tensor": _tensors(lambda t: {k: v.to(torch.int64) for k, v in t.items()}),
    "ckpt-missing-tensor": _tensors(lambda t: dict(sorted(t.items())[1:])),
    "ckpt-other-lora-rank": _tensors(lambda t: {k: torch.zeros(*(d * 2 for d in v.shape)) for k, v in t.items()}),
    "ckpt-training-json-binary": lambda s: (s.attack(), ((s.ckpt / "training.json").write_bytes(b"\xff\x00"),
                                                         s.ckpt / "training.json")[1]),
    "ckpt-training-json-not-fedleak": lambda s: (s.attack(), ((s.ckpt / "training.json").write_text("{\"unit\": 1}"),
                                                              s.ckpt / "training.json")[1]),
    "ckpt-folder-missing": _checkpoint_dir(lambda s: s.root / "no-such-training"),
    "ckpt-folder-without-rounds": _checkpoint_dir(lambda s: (s.root / "empty").mkdir() or s.root / "empty"),
    "ckpt-misnamed-round": _misnamed_round,
    # Output folders.
    "out-run-under-a-file": _under_file("run"),
    "out-attack-under-a-file": _under_file("attack"),
    "out-not-writable": _sys_out,
    "out-read-only": _read_only_out,
    "out-run-log-is-a-folder": _run_log_is_a_folder,
    # Results files for `fedleak report` and `fedleak validate`.
    "report-folder-missing": lambda s: (["report", str(s.root / "nothing")], s.root / "nothing"),
    "report-results-not-json": lambda s: (["report", str(s.root / "done")], s.results("{\"schema\": ")),
    "report-results-binary": lambda s: (["report", str(s.root / "done")], s.results(b"\xff\xfe\x00\x9f")),
    "report-not-fedleak-results": lambda s: (["report", str(s.root / "done")], s.results("{\"schema\": \"x/1\"}")),
    "validate-folder-without-results": lambda s: (["validate", str(s.ckpt)], s.ckpt / "results.json"),
    "validate-results-not-an-object": lambda s: (["validate", str(s.results("[1, 2]"))], s.root / "done"),
    "validate-results-binary": lambda s: (["validate", str(s.results(b"\x00\xff"))], s.root / "done"),
    "validate-results-breaks-schema": lambda s: (["validate", str(s.results("{\"schema\": \"fedleak-results/7\"}"))],
                                                 s.root / "done"),
    "validate-results-is-a-folder": lambda s: ((s.root / "run" / "results.json").mkdir(parents=True),
                                               (["validate", str(s.root / "run")], s.root / "run"))[1],
}


@pytest.fixture(scope="module")
def adapter_state(small_model_path) -> dict[str, torch.Tensor]:
    """The default [model.lora] adapter's tensors on the small model: a checkpoint the config accepts."""
    from fedleak.federated.adapters import LoraSettings, add_peft_adapter, get_adapter_state
    from fedleak.federated.model import load_base_model

    return get_adapter_state(add_peft_adapter(load_base_model(small_model_path)[0], LoraSettings(), seed=0))


@pytest.fixture
def sandbox(tmp_path, tiny_run_config, adapter_state) -> Sandbox:
    from fedleak.federated import checkpoint

    s = Sandbox(tmp_path, tiny_run_config)
    s.config()
    checkpoint.write_round(s.ckpt, 1, files={"global": adapter_state}, views={"global": {"default": "global"}},
                           num_examples={}, config_hash="h")
    return s


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _check(argv, named, sandbox: Sandbox, run) -> str:
    before = _snapshot(sandbox.root)
    code, err = run(argv)
    line = err.strip()
    assert code == 2, f"exit status {code}: {err[-3000:]}"
    assert "Traceback" not in err and len(line.splitlines()) == 1, err[-3000:]
    assert line.startswith("fedleak: error: ") and str(named) in line, line
    assert FIX.search(line.split(str(named), 1)[1]), f"no fix after the file name: {line}"
    assert _snapshot(sandbox.root) == before  # nothing written, nothing left half-done
    assert not Path("/sys/fedleak-hostile-test").exists()
    return line


def _in_process(capsys):
    def run(argv):
        capsys.readouterr()
        code = main(argv)
        return code, capsys.readouterr().err
    return run


def _entry_point(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).with_name("fedleak")), *argv], capture_output=True, text=True,
                          env=env)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_input_is_one_line_exit_2_and_writes_nothing(name, sandbox, capsys, monkeypatch):
    argv, named = CASES[name](sandbox)
    if name not in ("ckpt-missing-tensor", "ckpt-other-lora-rank"):  # found by loading into the model
        # Everything else is found before the base model is resolved (a build takes minutes).
        monkeypatch.setattr("fedleak.eval.context.build_embedded", lambda *a, **k: pytest.fail("model resolved"))
    _check(argv, named, sandbox, _in_process(capsys))


def test_the_table_is_large_and_covers_every_kind():
    kinds = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 40 and kinds == {"config", "data", "ckpt", "out", "report", "validate"}


@pytest.mark.parametrize("name", ["config-binary", "ckpt-corrupt-header-length"])
def test_the_console_script_prints_the_same_line(name, sandbox, capsys):
    argv, named = CASES[name](sandbox)
    assert Path(sys.executable).with_name("fedleak").exists(), "the fedleak console script is not installed"
    line = _check(argv, named, sandbox, _entry_point)
    assert _check(argv, named, sandbox, _in_process(capsys)) == line


def test_a_failure_removes_every_folder_it_created(sandbox, capsys):
    """The missing tensor is found after the output folder and run.log exist: all of it goes."""
    argv, named = CASES["ckpt-missing-tensor"](sandbox)
    argv[argv.index("--out") + 1] = str(sandbox.root / "a" / "b" / "out")
    _check(argv, named, sandbox, _in_process(capsys))
    assert not (sandbox.root / "a").exists()


def test_an_output_folder_that_existed_keeps_what_it_had(sandbox, capsys):
    """A failed command on an existing output folder adds no run.log and keeps the previous files."""
    sandbox.out.mkdir()
    (sandbox.out / "notes.txt").write_text("mine\n")
    argv, named = CASES["data-missing-field"](sandbox)
    _check(argv, named, sandbox, _in_process(capsys))
    argv, named = CASES["ckpt-missing-tensor"](sandbox)
    _check(argv, named, sandbox, _in_process(capsys))
    assert sorted(p.name for p in sandbox.out.iterdir()) == ["notes.txt"]
