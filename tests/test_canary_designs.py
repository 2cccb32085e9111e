"""Designed audit canaries (federated/canary_designs.py, Panda et al. 2025): the generator, the default that
leaves today's data untouched, the per-design one-run audit (eval/audit.py, eval/attacking.py), a small
end-to-end run and the report's table."""

from __future__ import annotations

import hashlib
import html
import itertools
import json
import re
import typing
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest

from fedleak.attacks.base import Target
from fedleak.common.errors import FedleakError
from fedleak.eval.membership_cell import run_membership
from fedleak.eval.audit import one_run_by_design, one_run_epsilon
from fedleak.eval.config import AttackSettings
from fedleak.federated.canary_designs import (COMMON_WORDS, DESIGNS, RANDOM, RARE_ALPHABET, RARE_TOKENS, UNSEEN_BIGRAMS,
                                              DesignedCanary, design_of, make_designed_audit_canaries)
from fedleak.federated.data import Canary, make_audit_canaries, make_canaries
from fedleak.federated.datasource import DataSettings, EmbeddedDataSettings, prepare_data
from fedleak.reports.render import render_markdown
from fedleak.reports.report import build_document
from tests.test_membership_truth import _Fixed, _FakePeft, records

BOTH = (RANDOM, RARE_TOKENS)


def _exposure():
    inserted, reference = make_canaries(seed=0, repetitions=(1, 4), per_repetition=2, num_clients=3)
    return inserted + reference


def _data(designs=None, n=16, seed=0):
    extra = {} if designs is None else {"audit_canary_designs": designs}
    settings = DataSettings(embedded=EmbeddedDataSettings(audit_canaries=n, **extra))
    return prepare_data(settings, seed=seed, num_clients=3, partition_method="dirichlet", alpha=1.0, min_records=2)


def _digest(data) -> str:
    return hashlib.sha256(json.dumps([[r.to_alpaca() | {"id": r.record_id} for r in c] for c in data.clients]
                                     ).encode()).hexdigest()


def test_designs_are_deterministic_distinct_and_of_their_format():
    taken = _exposure()
    made = make_designed_audit_canaries(16, [RARE_TOKENS, RANDOM], seed=0, num_clients=3, taken=taken)
    assert made == make_designed_audit_canaries(16, [RARE_TOKENS, RANDOM], seed=0, num_clients=3, taken=taken)
    assert made != make_designed_audit_canaries(16, [RARE_TOKENS, RANDOM], seed=1, num_clients=3, taken=taken)
    assert [design_of(c) for c in made] == [RARE_TOKENS] * 16 + [RANDOM] * 16  # listed in the order asked
    names, secrets = [c.patient_name for c in made + taken], [c.secret for c in made + taken]
    assert len(set(names)) == len(names) and len(set(secrets)) == len(secrets)
    # the random design is today's set, whichever designs run beside it
    assert made[16:] == make_audit_canaries(16, seed=0, num_clients=3, taken=taken)
    rare = made[:16]
    assert all(isinstance(c, DesignedCanary) and len(c.secret) == Canary.SECRET_DIGITS
               and set(c.secret) <= set(RARE_ALPHABET) for c in rare)
    assert {c.repetitions for c in rare} == {0, 1} and {c.client for c in rare} <= {0, 1, 2}
    record = rare[0].record(0)
    assert re.fullmatch(r"The access code of patient [A-Z][a-z]+ [A-Z][a-z]+ is \S{6}\.", record.output)
    assert record.instruction == rare[0].prompt and record.identifiers == (rare[0].patient_name, rare[0].secret)
    bigrams = make_designed_audit_canaries(16, [UNSEEN_BIGRAMS, RARE_TOKENS], seed=0, num_clients=3, taken=taken)
    assert len({c.patient_name for c in bigrams + taken}) == len(bigrams + taken)
    assert all(len(c.secret.split(" ")) == Canary.SECRET_DIGITS and set(c.secret.split(" ")) <= set(COMMON_WORDS)
               for c in bigrams[:16])
    assert bigrams[0].record(1).record_id == f"canary-unseen_bigrams-{bigrams[0].secret.replace(' ', '-')}-1"
    for run in (made, bigrams):  # ids unique within a run, plain ASCII whatever the secret
        ids = [c.record(0).record_id for c in run]
        assert len(set(ids)) == len(ids) and all(re.fullmatch(r"canary-([a-z_]+-[0-9a-z-]+|\d{6})-0", i) for i in ids)
    with pytest.raises(FedleakError, match="unknown"):
        make_designed_audit_canaries(4, ["bigram"], seed=0, num_clients=3)
    with pytest.raises(FedleakError, match="audit_canaries = 2000"):
        make_designed_audit_canaries(2000, [RARE_TOKENS], seed=0, num_clients=3)


def test_the_default_leaves_the_data_as_it_was():
    default = _data()
    assert _data([RANDOM]) == default
    assert default.audit_canaries == make_audit_canaries(16, seed=0, num_clients=3,
                                                         taken=default.canaries + default.reference_canaries)
    # The generator's output before designs existed (git 1b91383's prepare_data, numpy's PCG64): pinned so a
    # change to the default path shows here.
    assert [(c.patient_name, c.secret, c.repetitions, c.client) for c in default.audit_canaries[:3]] == [
        ("Yara Abernathy", "888678", 1, 1), ("Ximena Eriksen", "258197", 0, 2), ("Amara Szabo", "066961", 0, 0)]
    assert _digest(default) == "2eb8f1464b703a10bf03b33ffbfbb416c789f7c09ae83f988a36fb69a7daa32a"
    both = _data(list(BOTH))
    assert both.audit_canaries[:16] == default.audit_canaries and len(both.audit_canaries) == 32
    assert both.heldout == default.heldout and both.canaries == default.canaries
    inserted = sum(c.repetitions for c in both.audit_canaries)
    assert sum(map(len, both.clients)) == sum(map(len, default.clients)) + inserted - \
        sum(c.repetitions for c in default.audit_canaries)


def test_the_setting_lists_each_known_design_once():
    hint = typing.get_type_hints(EmbeddedDataSettings, include_extras=True)["audit_canary_designs"]
    assert typing.get_args(typing.get_args(hint)[0]) == tuple(DESIGNS)  # the Literal and the generator agree
    assert next(f for f in fields(EmbeddedDataSettings) if f.name == "audit_canary_designs").default == (RANDOM,)
    for bad in ((), (RANDOM, RANDOM)):
        with pytest.raises(FedleakError, match="audit_canary_designs"):
            EmbeddedDataSettings(audit_canary_designs=bad)
    with pytest.raises(FedleakError, match="audit_canary_designs"):
        EmbeddedDataSettings(audit_canary_designs=("bigram",))


def test_the_designs_tokens_are_what_they_claim_for_the_embedded_model(small_model_path):
    from transformers import AutoTokenizer

    from fedleak.federated.data import generate_records
    from fedleak.federated.embedded import EmbeddedModelConfig, _pretrain_texts

    texts = _pretrain_texts(EmbeddedModelConfig())  # the default build's corpus, and the private data's
    texts += [r.instruction + r.input + r.output for r in generate_records(500, seed=0, purpose="private", private=True)]
    assert not set().union(*map(set, texts)) & set(RARE_ALPHABET)  # rare_tokens: symbols the corpus never has
    tokenizer = AutoTokenizer.from_pretrained(small_model_path)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [encode(ch) for ch in RARE_ALPHABET]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(RARE_ALPHABET)
    secret = RARE_ALPHABET[:3] + RARE_ALPHABET[-3:]
    assert encode(f" is {secret}.")[-7:-1] == [i[0] for i in ids[:3] + ids[-3:]]  # no merges: one token a symbol
    # unseen_bigrams: every word frequent in the corpus and one token, few of their pairs ever side by side
    words = Counter(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))
    pairs = Counter(p for t in texts for p in itertools.pairwise(re.findall(r"[a-z]+", t.lower())))
    assert min(words[w] for w in COMMON_WORDS) >= 100 and all(len(encode(" " + w)) == 1 for w in COMMON_WORDS)
    assert sum(pairs[p] > 0 for p in itertools.product(COMMON_WORDS, repeat=2)) / len(COMMON_WORDS) ** 2 < 0.01


def test_one_run_by_design_audits_each_design_on_its_own_canaries():
    included = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 1])
    scores = np.array([9, 1, 8, 2, 7, 3, 6, 4, 0.5, 0.2, 0.9, 0.1, 0.3])
    designs = np.array(["a"] * 8 + ["b"] * 4 + ["c"])  # c: one canary, all included: no bound
    out = one_run_by_design(included, scores, designs, ["b", "a", "c", "d"], delta=0.0, n_bootstrap=50, seed=1)
    assert list(out) == ["b", "a"]
    assert out["a"]["auc"] == 1.0 and out["b"]["auc"] == 0.5  # b: (0.5 > 0.1, 0.5 < 0.9, 0.2 > 0.1, 0.2 < 0.9)
    for name, mask in (("a", designs == "a"), ("b", designs == "b")):
        assert {k: v for k, v in out[name].items() if not k.startswith("auc")} == \
            one_run_epsilon(included[mask], scores[mask], delta=0.0)
        assert out[name]["auc_low"] <= out[name]["auc"] <= out[name]["auc_high"]
    assert out["a"]["canaries"] == 8 and out["a"]["epsilon_lb"] > 0 == out["b"]["epsilon_lb"]
    assert np.isnan(one_run_by_design(included, scores, designs, ["a"], n_bootstrap=0)["a"]["auc_low"])
    with pytest.raises(ValueError, match="one entry per canary"):
        one_run_by_design(included, scores, designs[:-1], ["a"])


def _audit_run(audit, scores, designs):
    members, nonmembers = records("m", {"triage": 10}), records("h", {"triage": 10})
    ids = [r.record_id for r in members + nonmembers] + [c.record(0).record_id for c in audit]
    view = dict(zip(ids, [*range(20, 10, -1), *range(10), *scores]))
    target = Target(model=_FakePeft(), tokenizer=None, observer="global", round=1, client=None)
    return run_membership(_Fixed(view, view), target, members, nonmembers, settings=AttackSettings(bootstrap=100),
                          delta=0.0, seed=0, audit=audit, audit_designs=designs, blind=False)


def test_run_membership_keeps_todays_fields_and_adds_each_designs_bound():
    audit = make_designed_audit_canaries(32, BOTH, seed=0, num_clients=3)
    included = np.array([c.repetitions for c in audit])
    # random: scores that ignore membership; rare_tokens: the included canaries score higher
    scores = np.r_[np.arange(32.0), included[32:] * 10.0 + np.arange(32) / 100]
    today = _audit_run(audit[:32], scores[:32], (RANDOM,))
    assert "one_run_designs" not in today["audit"] and not any(k.endswith(RANDOM) for k in today["metrics"])
    assert today["audit"]["one_run"] == one_run_epsilon(included[:32], scores[:32])
    both = _audit_run(audit, scores, BOTH)
    m, per = both["metrics"], both["audit"]["one_run_designs"]
    assert both["audit"]["one_run"] == today["audit"]["one_run"] and m["one_run_epsilon_lb"] == m["one_run_epsilon_lb_random"]
    assert per[RARE_TOKENS]["epsilon_lb"] == m["one_run_epsilon_lb_rare_tokens"] > m["one_run_epsilon_lb_random"]
    assert m["canary_auc_rare_tokens"] == 1.0 and m["canary_auc_rare_tokens_low"] == 1.0
    assert per[RANDOM]["canaries"] == per[RARE_TOKENS]["canaries"] == 32
    # the first design listed gives the headline bound
    swapped = _audit_run(audit, scores, BOTH[::-1])
    assert swapped["metrics"]["one_run_epsilon_lb"] == m["one_run_epsilon_lb_rare_tokens"]
    assert swapped["audit"]["one_run"]["epsilon_lb"] == per[RARE_TOKENS]["epsilon_lb"]


def test_a_run_audits_each_design_and_the_results_follow_the_schema(small_model_path, tmp_path):
    from fedleak.eval.config import load_config
    from fedleak.eval.matrix import run_matrix
    from fedleak.eval.results import validate_results
    from tests.frontier import BASE

    # The frontier federation's settings (tests/frontier.py) with every design. The designs change the training
    # data, so this cannot reuse the frontier's trainings (and its extra= lands in [attack]): it trains its own.
    designs = list(DESIGNS)
    text = BASE.replace("audit_canaries = 16", f"audit_canaries = 16\naudit_canary_designs = {json.dumps(designs)}")
    (tmp_path / "run.toml").write_text(text + '\n[matrix]\nalgorithms = ["fedit"]\ndefenses = ["none"]\n'
                                       'attacks = [{ name = "loss", observers = ["global", "upload"] }]\n')
    results = run_matrix(load_config(tmp_path / "run.toml"), tmp_path / "out", progress=False)
    validate_results(results)
    assert results["data"]["audit_canaries"] == 48 and set(results["data"]["audit_canary_designs"]) == set(designs)
    cell = next(c for c in results["cells"] if c["observer"] == "global" and c["round"] == 3)
    metrics, per = cell["metrics"], cell["audit"]["one_run_designs"]
    assert list(per) == designs and all(per[d]["canaries"] == 16 for d in designs)
    assert metrics["one_run_epsilon_lb"] == metrics["one_run_epsilon_lb_random"] == per[RANDOM]["epsilon_lb"]
    assert cell["audit"]["one_run"] == {k: v for k, v in per[RANDOM].items() if not k.startswith("auc")}
    assert all(metrics[f"one_run_epsilon_lb_{d}"] == per[d]["epsilon_lb"] for d in designs)
    # the bigram design separates its inserted canaries from the left-out ones (measured: see the report)
    assert metrics["canary_auc_unseen_bigrams_low"] > 0.5
    text = render_markdown(build_document(results))
    assert "One-run audit by canary design" in text and "one-run eps: unseen_bigrams" in text


def _report_cell(observer, client, eps, auc):
    metrics = {"auc": 0.6, "auc_low": 0.5, "auc_high": 0.7, "one_run_epsilon_lb": eps[0]}
    for design, e, a in zip(BOTH, eps, auc):
        metrics |= {f"one_run_epsilon_lb_{design}": e, f"canary_auc_{design}": a, f"canary_auc_{design}_low": a - 0.1,
                    f"canary_auc_{design}_high": min(1.0, a + 0.1)}
    return {"algorithm": "fedit", "defense": "none", "scenario": "clean", "seed": 0, "attack": "loss",
            "attack_name": "loss", "family": "membership", "observer": observer, "client": client, "round": 3,
            "metrics": metrics, "n_members": 40, "n_nonmembers": 40, "cost": {"wall_seconds": 1.0}}


def test_the_report_compares_the_designs_bounds():
    cells = [_report_cell("global", None, (0.0, 1.25), (0.55, 0.92)), _report_cell("upload", 1, (0.0, 0.5), (0.5, 0.8))]
    results = {"schema": "fedleak-results/4", "seed": 0, "cells": cells,
               "data": {"audit_canary_designs": {d: {"canaries": 16, "inserted": 8, "design": DESIGNS[d]} for d in BOTH}},
               "trainings": [{"algorithm": "fedit", "defense": "none", "scenario": "clean", "seed": 0,
                              "rounds": [{"round": r} for r in (1, 2, 3)]}]}
    text = render_markdown(build_document(results))
    # says what each design is, as the results describe it (the renderer escapes & < > as HTML does)
    assert "One-run audit by canary design" in text and html.escape(RARE_ALPHABET, quote=False) in text
    header = next(line for line in text.splitlines() if "one-run eps: random" in line)
    assert header.index("one-run eps: random") < header.index("one-run eps: rare_tokens")
    row = next(line for line in text.splitlines() if "| loss" in line and "| global" in line and "1.25" in line)
    assert "0.00" in row and "0.920 [0.820, 1.000]" in row and "0.550 [0.450, 0.650]" in row
    for c in cells:  # without per-design bounds: no table
        c["metrics"] = {k: v for k, v in c["metrics"].items() if not k.endswith(BOTH) and "canary_auc" not in k}
    assert "One-run audit by canary design" not in render_markdown(build_document(results))
