"""FEDPIT's isolation and self-generation, and the CENIT / LOCIT baselines, on the small model."""

import json

import pytest
import torch

from fedleak.defenses.base import Defense
from fedleak.federated import checkpoint, selfgen
from fedleak.federated.adapters import DEFAULT, LoraSettings, get_adapter_state
from fedleak.federated.methods import MARKERS, IA3Settings
from fedleak.federated.baselines import CenIT, LocIT, LocITSA
from fedleak.federated.data import FederatedData, generate_records
from fedleak.federated.fedpit import LOCAL, FedPIT
from fedleak.federated.model import load_base_model
from fedleak.federated.loop import run_rounds
from fedleak.federated.rounds import FederationSettings, TrainingSetup
from fedleak.federated.selfgen import SelfGenSettings, rejection
from fedleak.federated.training import encode

FED = FederationSettings(clients=3, rounds=2, local_epochs=1, batch_size=4, min_records_per_client=1)
FAST_GEN = dict(synthetic_per_round=3, max_attempts=6, response_max_new_tokens=32, instruction_max_new_tokens=40)


def _data(other_clients_seed=0):
    own = generate_records(6, seed=0, purpose="c0", private=True)
    others = generate_records(12, seed=other_clients_seed, purpose="others", private=True)
    return FederatedData(clients=[own, others[:6], others[6:]],
                         heldout=generate_records(4, seed=0, purpose="h", private=True))


class Recorder(Defense):
    """Records what every training and the server see."""

    def __init__(self):
        self.trained, self.received, self.aggregations = [], [], 0

    def train_client(self, job):
        metrics = job.run()
        self.trained.append({"round": job.round, "client": job.client, "adapter": job.adapter,
                             "examples": list(job.examples),
                             "after": get_adapter_state(job.model, job.adapter)})
        return metrics

    def before_aggregation(self, updates, *, global_state, info):
        self.received += [(info.round, u.client, u.state) for u in updates]
        return updates

    def aggregate(self, updates, *, info):
        self.aggregations += 1
        return super().aggregate(updates, info=info)


def _run(path, small_model_path, algorithm, hooks=None, data=None, seed=3, name="run", adapter=LoraSettings(r=4, alpha=8)):
    base, tokenizer = load_base_model(small_model_path)
    hooks = hooks or Recorder()
    run = run_rounds(TrainingSetup(base_model=base, tokenizer=tokenizer, data=data or _data(), federation=FED,
                                   adapter=adapter, hooks=hooks, seed=seed, out_dir=path / name,
                                   config_hash="h", progress=False), algorithm)
    return run, hooks, tokenizer


# FEDPIT's isolation with each method that can keep two adapters on (IA3's scales multiply, LoRA's updates add).
@pytest.fixture(scope="module", params=[LoraSettings(r=4, alpha=8), IA3Settings()], ids=["lora", "ia3"])
def fedpit_run(request, tmp_path_factory, small_model_path):
    return (*_run(tmp_path_factory.mktemp("fedpit"), small_model_path, FedPIT(**FAST_GEN), adapter=request.param),
            request.param)


def test_fedpit_uploads_exactly_its_global_adapter_and_never_a_local_tensor(fedpit_run):
    run, hooks, _, adapter = fedpit_run
    assert hooks.received, "no client uploaded anything"
    for rnd, client, upload in hooks.received:
        assert upload and all(MARKERS[adapter.method][0] in k for k in upload)  # the method's own tensors
        shared = [t["after"] for t in hooks.trained if (t["round"], t["client"], t["adapter"]) == (rnd, client, DEFAULT)]
        assert len(shared) == 1
        assert upload.keys() == shared[0].keys()
        assert all(torch.equal(upload[k], shared[0][k]) for k in upload)
        folder = checkpoint.round_dir(run.training_dir, rnd)
        local = checkpoint.load_view(folder, "client", client)[LOCAL]
        for tensor in upload.values():  # by value: no uploaded tensor is any local-adapter tensor
            assert not any(tensor.shape == t.shape and torch.equal(tensor, t) for t in local.values())
        assert checkpoint.load_view(folder, "upload", client)[DEFAULT].keys() == upload.keys()
    # The server side of the checkpoint has no local file: only client views reference them.
    manifest = checkpoint.read_manifest(checkpoint.round_dir(run.training_dir, 2))
    for key, adapters in manifest["views"].items():
        assert (LOCAL in adapters) == key.startswith("client/")
        if key.startswith("client/"):
            assert adapters[DEFAULT] == "global"


def test_fedpit_global_training_never_sees_a_private_record(fedpit_run):
    run, hooks, tokenizer, _ = fedpit_run
    private = {e.input_ids for c in _data().clients for e in encode(c, tokenizer, max_length=256)}
    shared_batches = [t for t in hooks.trained if t["adapter"] == DEFAULT]
    local_batches = [t for t in hooks.trained if t["adapter"] == LOCAL]
    assert shared_batches and local_batches
    for t in shared_batches:
        assert not {e.input_ids for e in t["examples"]} & private
        saved = checkpoint.round_dir(run.training_dir, t["round"]) / f"synthetic-client-{t['client']:02d}.jsonl"
        rows = [json.loads(line) for line in saved.read_text().splitlines()]
        assert len(rows) == len(t["examples"]) and all(r["category"] == "synthetic" for r in rows)
    for t in local_batches:  # the local adapter does train on the client's own records
        own = {e.input_ids for e in encode(_data().clients[t["client"]], tokenizer, max_length=256)}
        assert own <= {e.input_ids for e in t["examples"]}


def test_fedpit_is_deterministic(fedpit_run, tmp_path, small_model_path):
    run, _, _, adapter = fedpit_run
    again, _, _ = _run(tmp_path, small_model_path, FedPIT(**FAST_GEN), adapter=adapter)
    for rnd in (1, 2):
        a, b = (checkpoint.read_manifest(checkpoint.round_dir(r.training_dir, rnd)) for r in (run, again))
        assert a["files"] == b["files"] and a["data"] == b["data"]  # same adapters, same synthetic data
        assert a["data"], "no synthetic data was saved"


def test_rouge_filter_drops_a_duplicate_and_keeps_a_distinct_instruction():
    settings = SelfGenSettings()
    existing = ["Write discharge instructions for Amara Dubois after a hernia repair."]
    assert rejection("Write discharge instructions for Amara Dubois after a hernia repair.", True, existing,
                     settings) == "near_duplicate"
    assert rejection("write discharge instructions for amara dubois after hernia repair", True, existing,
                     settings) == "near_duplicate"
    assert rejection("Which vaccines does an adult traveller need before visiting the tropics?", True, existing,
                     settings) is None
    assert rejection("", True, existing, settings) == "empty"
    assert rejection("Summarise the chart of", False, existing, settings) == "truncated"
    assert rejection("### Response: hello there you", True, existing, settings) == "malformed"
    assert rejection("Too short", True, existing, settings) == "length"


def test_repetition_penalty_and_ngram_block_reach_generation(monkeypatch, small_model_path):
    calls = []
    real = selfgen.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(selfgen, "generate", spy)
    base, tokenizer = load_base_model(small_model_path)
    settings = SelfGenSettings(per_round=2, max_attempts=4, repetition_penalty=1.3, no_repeat_ngram_size=4,
                               rouge_threshold=1.0, min_words=1)
    records, stats = selfgen.self_generate(base, tokenizer, _data().clients[0], settings, seed=0, purpose=(1, 0),
                                           id_prefix="s")
    instruction_calls = [c for c in calls if c.get("do_sample")]
    response_calls = [c for c in calls if not c.get("do_sample")]
    assert instruction_calls and all(c["repetition_penalty"] == 1.3 and c["no_repeat_ngram_size"] == 4
                                     for c in response_calls)
    assert len(response_calls) == 1 and stats["candidates"] <= 4 and len(records) == stats["accepted"] <= 2


def test_cenit_trains_on_exactly_the_union(tmp_path, small_model_path):
    run, hooks, tokenizer = _run(tmp_path, small_model_path, CenIT())
    union = sorted(e.input_ids for c in _data().clients for e in encode(c, tokenizer, max_length=256))
    assert {t["client"] for t in hooks.trained} == {0} and len(hooks.trained) == FED.rounds
    for t in hooks.trained:
        assert sorted(e.input_ids for e in t["examples"]) == union
    assert checkpoint.available_views(checkpoint.round_dir(run.training_dir, 2)) == ["global"]
    assert {r.record_id for r in run.global_members} == {r.record_id for r in _data().members}


def test_locit_clients_never_exchange_anything(tmp_path, small_model_path):
    run, hooks, _ = _run(tmp_path, small_model_path, LocIT())
    assert hooks.received == [] and hooks.aggregations == 0
    views = checkpoint.available_views(checkpoint.round_dir(run.training_dir, 2))
    assert views == ["client/0", "client/1", "client/2"]
    # Client 0's model is the same whatever the other clients hold.
    other, _, _ = _run(tmp_path, small_model_path, LocIT(), data=_data(other_clients_seed=9), name="other")
    a, b = (checkpoint.load_view(checkpoint.round_dir(r.training_dir, 2), "client", 0)[DEFAULT] for r in (run, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = (checkpoint.load_view(checkpoint.round_dir(r.training_dir, 2), "client", 1)[DEFAULT] for r in (run, other))
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_locit_sa_trains_on_own_plus_synthetic(tmp_path, small_model_path):
    run, hooks, tokenizer = _run(tmp_path, small_model_path, LocITSA(**FAST_GEN))
    assert hooks.received == []
    for t in hooks.trained:
        own = {e.input_ids for e in encode(_data().clients[t["client"]], tokenizer, max_length=256)}
        extra = [e for e in t["examples"] if e.input_ids not in own]
        assert own <= {e.input_ids for e in t["examples"]}
        saved = checkpoint.round_dir(run.training_dir, t["round"]) / f"synthetic-client-{t['client']:02d}.jsonl"
        assert len(extra) == len(saved.read_text().splitlines())


@pytest.mark.parametrize("name", ["fedpit", "locit_sa"])
def test_self_generating_algorithms_under_dp_sgd_spend_the_target_and_report_it(tmp_path, small_model_path, name):
    from fedleak.defenses.dp_sgd import DPSGD
    from fedleak.eval.training_runs import _privacy
    from fedleak.reports.document import epsilon_text, fmt
    from fedleak.reports.dp import dp_rows, dp_table
    from fedleak.reports.merge import merged

    target = 3.0
    algorithm = (FedPIT if name == "fedpit" else LocITSA)(**FAST_GEN)
    run, _, _ = _run(tmp_path, small_model_path, algorithm, hooks=DPSGD(target_epsilon=target))
    privacy = _privacy(run.history, self_generated=True)
    per_client = privacy["record_level_epsilon_per_client"]
    assert set(per_client) == {"0", "1", "2"}
    for epsilon in per_client.values():  # the budget is planned over every training of every round
        assert target * 0.99 <= epsilon <= target
    assert privacy["target_epsilon"] == target and privacy["exceeded_target"] is False
    both = 0
    for client, history in privacy["record_level_accounting"].items():
        metrics = [r["client_metrics"][client] for r in run.history]
        # FEDPIT charges both adapters' trainings to the client's one accountant.
        taken = [m[k]["steps"] for m in metrics for k in ("global", "local") if k in m] if name == "fedpit" \
            else [m["steps"] for m in metrics]
        assert sum(k for _, _, k in history) == privacy["record_level_steps"][client] == sum(taken) > 0
        both += sum("global" in m for m in metrics)
    assert (both > 0) == (name == "fedpit")  # some FEDPIT round trained both adapters
    assert "in-context demonstrations" in privacy["record_level_scope"]
    # The report shows the epsilon against its target, and says what it does not cover.
    training = {"algorithm": name, "defense": "dp_sgd(target_epsilon=3.0)", "scenario": "clean", "seed": 0,
                "algorithm_name": name, "defense_name": "dp_sgd", "defense_params": {"target_epsilon": target},
                "privacy": privacy, "utility": {}, "rounds": run.history}
    text = epsilon_text(privacy)
    assert text.startswith(f"record {fmt(privacy['record_level_epsilon'], 2)} of target 3 ") and "n/a" not in text
    report = merged({"seeds": [0], "trainings": [training], "cells": []})
    (row,) = dp_table(report, dp_rows(report)).rows
    assert row[3:5] == ["3.00", fmt(privacy["record_level_epsilon"], 2)] and row[-2].startswith("none")
