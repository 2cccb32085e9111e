"""Silent data problems (issue 15, item 7), identifiers on user data (item 9) and hostile data files.

Duplicates, missing categories, truncation and the data file's identity each get a warning with counts, a
field of results.json's `data` and a line of the report's provenance; a bad data file is one line on
stderr, exit status 2, before any output folder or model build.
"""

import hashlib
import json
import re

import pytest

from fedleak.attacks.extraction.pii import count_own
from fedleak.cli import main
from fedleak.common.errors import FedleakError
from fedleak.eval.config import RunConfig, load_config
from fedleak.eval.identifiers import identifiers_record
from fedleak.federated.data import Record, generate_records
from fedleak.federated.dataquality import drop_overlap, text_key, truncation_counts, truncation_messages
from fedleak.federated.datasource import DataSettings, EmbeddedDataSettings, FileDataSettings, prepare_data
from fedleak.federated.loader import FieldNames, read_data_file
from fedleak.federated.partition import split_plan
from fedleak.federated.prompts import format_prompt
from fedleak.reports.provenance import data_rows
from fedleak.reports.redact import MARKER, redactor

ACCOUNT = r"\bACCT-\d{5}\b"  # an identifier format fedleak's synthetic data does not have


def _rows(n: int, *, category: bool = True, words: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"instruction": f"Summarise the account of client number {i}.",
               "output": f"Client Zeb{i} Quaid holds ACCT-{10000 + i}; " + "the balance is stable. " * words,
               "secrets": [f"Zeb{i} Quaid"]}
        if category:
            row["category"] = "loans" if i % 2 else "savings"
        rows.append(row)
    return rows


def _prepare(tmp_path, rows, *, method="dirichlet", clients=3, **file_settings):
    (tmp_path / "d.json").write_text(json.dumps(rows))
    settings = DataSettings(source="file", file=FileDataSettings(path="d.json", **file_settings))
    return prepare_data(settings, seed=0, num_clients=clients, partition_method=method, alpha=1.0, min_records=1,
                        base_dir=tmp_path)


# --- duplicates ---------------------------------------------------------------------------------------


def test_exact_duplicates_are_dropped_before_the_heldout_split_and_counted(tmp_path):
    rows = _rows(30)
    copies = [dict(r) for r in rows[:8]]
    copies[0]["output"] = "  " + copies[0]["output"].replace(" ", "   ") + "\n"  # whitespace alone differs
    copies[1]["category"] = "other"  # the text is what a model sees: still the same record
    near = dict(rows[9], output=rows[9]["output"] + " Extra.")  # a different answer: kept
    data = _prepare(tmp_path, rows + copies + [near], heldout_fraction=0.4)
    assert data.summary()["duplicates_dropped"] == 8
    assert len(data.members) + len(data.heldout) == 31
    members = {text_key(r) for r in data.members}
    assert not members & {text_key(r) for r in data.heldout}
    assert any("dropped 8 exact duplicate records" in w and "31 of 39 remain" in w for w in data.warnings)


def test_the_embedded_generator_keeps_its_records_and_no_heldout_record_equals_a_training_one():
    settings = DataSettings(embedded=EmbeddedDataSettings(canaries_per_repetition=0))
    for seed in range(3):
        data = prepare_data(settings, seed=seed, num_clients=3, partition_method="dirichlet", alpha=1.0,
                            min_records=8)
        assert data.summary()["duplicates_dropped"] == 0 and data.warnings == []
        assert not {text_key(r) for r in data.members} & {text_key(r) for r in data.heldout}
        # No duplicate: the very records the generator made (the default's numbers stay what they were).
        assert data.heldout == generate_records(150, seed=seed, purpose="heldout", private=True)
        assert sorted(data.members, key=lambda r: r.record_id) == generate_records(150, seed=seed, purpose="private",
                                                                                    private=True)
    pool = generate_records(5, seed=0, purpose="p", private=True)
    heldout = generate_records(3, seed=0, purpose="h", private=True)
    same = Record(pool[2].instruction, pool[2].input, pool[2].output + " ", "triage", "h-copy")
    assert drop_overlap(heldout + [same], pool) == (heldout, 1)


# --- categories and the split -----------------------------------------------------------------------


def test_a_file_without_categories_splits_in_equal_sizes_and_says_why(tmp_path):
    data = _prepare(tmp_path, _rows(40, category=False), heldout_fraction=0.25)
    sizes = [len(c) for c in data.clients]
    assert sum(sizes) == 30 and max(sizes) - min(sizes) <= 1
    split = data.summary()["split"]
    assert split == {"method": "iid", "requested": "dirichlet", "categories": 1,
                     "reason": "no record has the field 'category'"}
    assert any("none of the 40 records has the category field 'category'" in w and "data.file.category_field" in w
               for w in data.warnings)
    iid = _prepare(tmp_path, _rows(40, category=False), method="iid", heldout_fraction=0.25)
    assert iid.warnings == [] and iid.summary()["split"] == {"method": "iid", "requested": "iid", "categories": 1}
    assert [len(c) for c in iid.clients] == sizes  # the fallback is the documented iid split itself


def test_partly_missing_categories_warn_with_counts_and_one_category_falls_back(tmp_path):
    rows = _rows(20)
    for row in rows[:5]:
        del row["category"]
    data = _prepare(tmp_path, rows)
    assert data.summary()["split"]["method"] == "dirichlet"
    assert any("5 of 20 records have no 'category' field" in w for w in data.warnings)
    plan = split_plan(["x"] * 10, "dirichlet", alpha=1.0)
    assert plan["method"] == "iid" and "same category ('x')" in plan["reason"]
    assert split_plan(["x", "y"], "iid", alpha=1.0) == {"method": "iid", "requested": "iid", "categories": 2}


@pytest.mark.parametrize("setting, value, expected", [
    ("category_field", "topik", r"data.file.category_field = 'topik' is in none of the 12 records: did you mean "
                                r"'topic'\?"),
    ("identifiers_field", "secretz", r"data.file.identifiers_field = 'secretz' is in none of the 12 records"),
])
def test_a_named_field_that_no_record_holds_is_an_error(tmp_path, setting, value, expected):
    rows = [dict(r, topic=r.pop("category")) for r in _rows(12)]
    with pytest.raises(FedleakError, match=expected) as info:
        _prepare(tmp_path, rows, **{setting: value})
    assert str(tmp_path / "d.json") in str(info.value) and "\n" not in str(info.value)


# --- truncation ---------------------------------------------------------------------------------------


def test_truncation_counts_are_what_the_tokenizer_and_template_give(small_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(small_model_path))
    records = [Record("Say hi.", "", "Hi." + " and hi" * k, "c", f"r{k}") for k in (0, 5, 40, 80)]
    records.append(Record("Read this. " * 60, "", "Done.", "c", "long-prompt"))
    max_length = 60
    counts = truncation_counts(records, tokenizer, max_length=max_length)
    # Independently: prompt tokens (the template) + answer tokens + the end-of-answer token.
    prompts = [len(tokenizer(format_prompt(r.instruction, r.input), add_special_tokens=False)["input_ids"])
               for r in records]
    answers = [len(tokenizer(r.output, add_special_tokens=False)["input_ids"]) + 1 for r in records]
    cut = [p + a > max_length for p, a in zip(prompts, answers)]
    assert counts["answer_cut"] == sum(cut) == 3 and counts["records"] == 5
    assert counts["prompt_fills"] == sum(p >= max_length for p in prompts) == 1
    kept = sum(max(0, min(a, max_length - p)) for p, a in zip(prompts, answers)) / sum(answers)
    assert counts["answer_tokens_kept"] == pytest.approx(kept, abs=1e-4)
    lines = truncation_messages(counts, "d.json")
    assert lines[0] == (True, f"d.json: 3 of 5 records have their answer cut at federation.max_length = 60 tokens "
                              f"({kept:.0%} of answer tokens kept); a cut answer never trains its end-of-answer "
                              f"token: raise federation.max_length")
    assert lines[1][0] and "1 of 5 records have a prompt of federation.max_length = 60 tokens or more" in lines[1][1]
    fine = truncation_counts(records[:1], tokenizer, max_length=max_length)
    assert (fine["answer_cut"], fine["answer_tokens_kept"]) == (0, 1.0)
    assert truncation_messages(fine, "d.json") == [(False, "d.json: no answer is cut at federation.max_length = 60 "
                                                           "tokens (1 records)")]


# --- identifiers on user data -------------------------------------------------------------------------


def test_identifier_patterns_are_checked_when_the_config_loads(tmp_path):
    for pattern, expected in (("(", r"identifier_patterns\[0\] = '\(' is not a valid regex"),
                              (r"\d*", r"matches the empty text")):
        config = tmp_path / "run.toml"
        config.write_text(f"[data]\nsource = \"file\"\n[data.file]\npath = \"d.json\"\n"
                          f"identifier_patterns = ['{pattern}']\n")
        with pytest.raises(FedleakError, match=expected) as info:
            load_config(config)
        assert str(info.value).startswith(f"{config}: data.file.") and "\n" not in str(info.value)


def test_records_carry_declared_identifiers_which_pii_counts_and_the_report_redacts(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(_rows(3)))
    records = read_data_file(tmp_path / "d.json", FieldNames(identifiers="secrets"), patterns=[ACCOUNT]).records
    assert records[1].identifiers == ("Zeb1 Quaid", "ACCT-10001")
    assert records[1].identifier_types == ("listed", "pattern")
    prompts = [format_prompt(r.instruction) for r in records]
    outputs = ["Client Zeb0 Quaid holds ACCT-10000.", "I do not know.", "ACCT-10002 it is."]
    counts = count_own(records, prompts, outputs, min_length=4)
    assert counts["countable"] == {"listed": 3, "pattern": 3} and counts["leaked"] == {"listed": 1, "pattern": 2}
    config = RunConfig(data=DataSettings(source="file", file=FileDataSettings(
        path="d.json", identifiers_field="secrets", identifier_patterns=(ACCOUNT,))))
    data = prepare_data(config.data, seed=0, num_clients=1, partition_method="iid", alpha=1.0, min_records=1,
                        base_dir=tmp_path)
    recorded = identifiers_record(config, [data])
    assert recorded["patterns"][0] == ACCOUNT and recorded["secrets"] == ["Zeb0 Quaid", "Zeb1 Quaid", "Zeb2 Quaid"]
    redact = redactor({"cells": [], "trainings": [], "identifiers": recorded}, show_secrets=False)
    assert redact("Zeb2 Quaid owns ACCT-55555, Zeb9 Quaid") == f"{MARKER} owns {MARKER}, Zeb9 Quaid"


def test_provenance_names_the_file_its_hash_mapping_split_duplicates_and_truncation():
    data = {"client_sizes": [5, 5], "heldout": 3, "source": "file", "duplicates_dropped": 20,
            "file": {"path": "mine.json", "sha256": "ab" * 32, "records": 236, "records_with_category": 0,
                     "fields": {"instruction": "q", "input": "input", "output": "a", "category": "category",
                                "identifiers": None}, "identifier_patterns": [], "records_with_identifiers": 0},
            "split": {"method": "iid", "requested": "dirichlet", "categories": 1, "reason": "no record has it"},
            "truncation": {"max_length": 256, "records": 216, "answer_cut": 213, "prompt_fills": 0,
                           "answer_tokens_kept": 0.34}}
    rows = dict(data_rows(data))
    assert rows["data"].startswith(f"mine.json (sha256 {'ab' * 32}, 236 records; fields: instruction = 'q', ")
    assert rows["data split"] == "iid, not the requested dirichlet: no record has it; 1 categories"
    assert rows["duplicates dropped"].startswith("20 exact duplicate records")
    assert rows["truncation"] == ("213 of 216 records have their answer cut at max_length 256 tokens (34% of answer "
                                  "tokens kept); 0 prompts fill it")
    assert dict(data_rows({"heldout": 3}))["data sizes"] == '{"heldout": 3}'  # results from before: sizes only


# --- hostile data files through the command line ------------------------------------------------------

HOSTILE = [  # (data file name, how to make it, config lines, what the error says)
    ("x.json", lambda p: p.mkdir(), "", "is a folder, not a data file: point data.file.path"),
    ("x.jsonl", lambda p: p.mkdir(), "", "is a folder, not a data file"),
    ("bin.json", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), "", "not UTF-8 text (byte 0): save the file"),
    ("empty.json", lambda p: p.write_text(""), "", "the file is empty: fill it"),
    ("blank.jsonl", lambda p: p.write_text("\n  \n"), "", "the file is empty"),
    ("list.json", lambda p: p.write_text("[]"), "", "no records found"),
    ("notobj.jsonl", lambda p: p.write_text('{"instruction": "q", "output": "a"}\n"text"\n'), "",
     "line 2 is text, expected an object"),
    ("num.json", lambda p: p.write_text('[{"instruction": 7, "output": "a"}]'), "",
     "record 0 field 'instruction' is a number, expected text: write it as a JSON string"),
    ("cat.json", lambda p: p.write_text('[{"instruction": "q", "output": "a", "category": 3}]'), "",
     "record 0 field 'category' is a number"),
    ("secrets.json", lambda p: p.write_text('[{"instruction": "q", "output": "a", "s": "Ann"}]'),
     'identifiers_field = "s"', "record 0 field 's' is text, expected a list"),
    ("deep.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "", "nested too deeply"),
    ("surrogate.json", lambda p: p.write_text('[{"instruction": "q\\ud800", "output": "a"}]'), "",
     "holds an invalid character"),
    ("data.csv", lambda p: p.write_text("instruction,output\nq,a\n"), "", "not a .json or .jsonl file"),
    ("topic.json", lambda p: p.write_text('[{"instruction": "q", "output": "a"}]'), 'category_field = "topic"',
     "data.file.category_field = 'topic' is in none of the 1 records"),
    ("d.json", lambda p: p.write_text('[{"instruction": "q", "output": "a"}]'), "identifier_patterns = ['[a-']",
     "data.file.identifier_patterns[0] = '[a-' is not a valid regex"),
]


@pytest.mark.parametrize("name, make, extra, expected", HOSTILE, ids=[h[0] + (":" + h[2] if h[2] else "")
                                                                       for h in HOSTILE])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_hostile_data_file_is_one_line_exit_2_before_any_model_or_output(tmp_path, capsys, monkeypatch, name,
                                                                          make, extra, expected, dry_run):
    def no_build(*args, **kwargs):
        raise AssertionError("the base model was resolved before the data was checked")

    monkeypatch.setattr("fedleak.eval.context.build_embedded", no_build)
    make(tmp_path / name)
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsource = "file"\n[data.file]\npath = "{name}"\n{extra}\n')
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty output folder stays empty
    rc = main(["run", str(config), "--out", str(out), "--quiet", *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert expected in lines[0] and lines[0].startswith("fedleak: error: ")
    assert str(config) in lines[0] if "identifier_patterns" in expected else str(tmp_path / name) in lines[0]
    assert list(out.iterdir()) == [] and captured.out == ""


# --- a whole run on a user's file ----------------------------------------------------------------------


def test_a_user_file_run_reports_its_data_and_pii_and_redacts_declared_identifiers(tmp_path, small_model_path,
                                                                                  capsys):
    rows = _rows(30, category=False, words=12)
    rows += [dict(r) for r in rows[:4]]  # 4 exact duplicates
    (tmp_path / "mine.json").write_text(json.dumps(rows))
    (tmp_path / "run.toml").write_text(f"""
[model]
name = "{small_model_path}"
[data]
source = "file"
[data.file]
path = "mine.json"
identifiers_field = "secrets"
identifier_patterns = ['{ACCOUNT}']
heldout_fraction = 0.2
[federation]
clients = 2
rounds = 1
local_epochs = 1
min_records_per_client = 2
max_length = 48
[utility]
records = 2
max_new_tokens = 4
[matrix]
algorithms = ["fedit"]
defenses = ["none"]
attacks = ["loss", {{ name = "pii", max_new_tokens = 16 }}]
""")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "run.toml"), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "dropped 4 exact duplicate records" in err and "none of the 34 records has the category field" in err
    assert re.search(r"30 of 30 records have their answer cut at federation.max_length = 48 tokens .*: raise "
                     r"federation.max_length", err)
    results = json.loads((out / "results.json").read_text())
    data = results["data"]
    assert data["file"]["path"] == "mine.json" and data["file"]["records"] == 34
    assert data["file"]["sha256"] == hashlib.sha256((tmp_path / "mine.json").read_bytes()).hexdigest()
    assert data["file"]["fields"]["identifiers"] == "secrets" and data["file"]["records_with_identifiers"] == 30
    assert data["duplicates_dropped"] == 4 and data["split"]["method"] == "iid" and data["client_sizes"] == [12, 12]
    assert data["truncation"]["answer_cut"] == 30 and data["truncation"]["max_length"] == 48
    pii = next(c for c in results["cells"] if c["attack_name"] == "pii")
    assert isinstance(pii["metrics"]["own_fraction"], float) and 0 <= pii["metrics"]["own_fraction"] <= 1
    assert isinstance(pii["metrics"]["cross_fraction"], float)
    assert pii["details"]["own_countable"]["pattern"] > 0 and pii["details"]["own_countable"]["listed"] > 0
    report = (out / "report.md").read_text()
    for line in (f"sha256 {data['file']['sha256']}", "| duplicates dropped | 4 exact duplicate records",
                 "| data split | iid, not the requested dirichlet: no record has the field 'category'",
                 "| truncation | 30 of 30 records have their answer cut at max_length 48 tokens"):
        assert line in report, line
    assert re.search(r"\| pii\(max_new_tokens=16\): own identifiers leaked \| \d\.\d+ \|", report)  # not n/a
    # A model output naming other clients' identifiers (in no cell's identifier list): the declared pattern and
    # the file's secrets redact it, and only those (the synthetic formats would not match either).
    pii["details"]["own_examples"] = [{"record_id": "user-000000", "type": "pattern", "identifier": "ACCT-10000",
                                       "output": "Zeb7 Quaid has ACCT-10007 and Zeb8 Quaid ACCT-10008."}]
    (out / "results.json").write_text(json.dumps(results))
    assert main(["report", str(out)]) == 0
    redacted = (out / "report.md").read_text()
    assert f"{MARKER} has {MARKER} and {MARKER} {MARKER}." in redacted
    assert not any(s in redacted for s in ("Zeb7 Quaid", "ACCT-10007", "Zeb8 Quaid", "ACCT-10008", "ACCT-10000"))
    assert main(["report", str(out), "--show-secrets"]) == 0
    assert "Zeb7 Quaid has ACCT-10007 and Zeb8 Quaid ACCT-10008." in (out / "report.md").read_text()
