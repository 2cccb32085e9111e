import json
import subprocess
import sys

import pytest

from fedleak.cli import main
from fedleak.common.errors import FedleakError
from fedleak.federated.loader import FieldNames, load_alpaca


def test_json_and_jsonl_with_custom_field_names(tmp_path):
    rows = [{"instruction": f"q{i}", "gpt-4-answer": f"a{i}", "category": "c" if i % 2 else "d"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("d.json", "d.jsonl"):
        records = load_alpaca(tmp_path / name, FieldNames(output="gpt-4-answer"))
        assert [r.output for r in records] == ["a0", "a1", "a2", "a3"]
        assert [r.input for r in records] == [""] * 4 and records[1].category == "c"


@pytest.mark.parametrize("content, suffix, expected", [
    ('[{"instruction": "q"}]', ".json", "record 0 has no field 'output'.*data.file.output_field"),
    ('[{"instruction": "q", "output": 3}]', ".json", "record 0 field 'output' is a number, expected text"),
    ('[{"instruction": "", "output": "a"}]', ".json", "record 0 field 'instruction' is empty"),
    ('{"instruction": "q", "output": "a"}', ".json", "top level is an object, expected a list"),
    ('[["q", "a"]]', ".json", "record 0 is a list, expected an object"),
    ('[{"instruction": "q", "output": "a"},', ".json", "invalid JSON"),
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q2"', ".jsonl", "line 2: invalid JSON"),
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q2", "input": 5, "output": "b"}', ".jsonl",
     "line 2 field 'input' is a number"),
])
def test_malformed_files_name_the_record_and_field(tmp_path, content, suffix, expected):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(FedleakError, match=expected) as info:
        load_alpaca(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _file_config(tmp_path, data_file: str) -> str:
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsource = "file"\n[data.file]\npath = "{data_file}"\n')
    return str(config)


def test_cli_reports_a_bad_file_with_exit_status_2_and_no_traceback(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    rc = main(["run", _file_config(tmp_path, "bad.jsonl"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl: line 2 has no field 'output'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_subprocess_exit_status_for_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedleak", "run", _file_config(tmp_path, "nowhere.json"),
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nowhere.json: file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_a_byte_order_mark_and_a_line_separator_inside_a_jsonl_string_are_text(tmp_path):
    """Editors on Windows write a UTF-8 BOM; U+2028 is legal inside a JSON string and must not split a line."""
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "q\u2028two", "output": "a\u2029b"}, {"instruction": "q2", "output": "a2"}]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    records = load_alpaca(path)
    assert [(r.instruction, r.output) for r in records] == [("q\u2028two", "a\u2029b"), ("q2", "a2")]
