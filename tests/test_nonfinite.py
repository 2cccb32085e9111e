"""Non-finite uploads (issue 15, item 12): the round loop refuses a client update holding NaN or inf
before any defense hook, records it in the round history and keeps the global adapter finite under
every built-in defense; each aggregation rule also leaves such an update out on its own."""

import logging
import math

import pytest
import torch

from fedleak.defenses.base import DEFENSES
from fedleak.defenses.bulyan import bulyan
from fedleak.defenses.geomedian import geometric_median
from fedleak.defenses.krum import krum_select
from fedleak.defenses.median import coordinate_median
from fedleak.defenses.norm_bound import NormBound, clip_update
from fedleak.defenses.trimmed_mean import trimmed_mean
from fedleak.federated import checkpoint
from fedleak.federated.adapters import LoraSettings
from fedleak.federated.aggregation import fedavg, finite_results, nonfinite_reason
from fedleak.federated.data import FederatedData, generate_records
from fedleak.federated.fedit import FedIT
from fedleak.federated.hooks import Adversary, ClientUpdate, RoundInfo
from fedleak.federated.model import load_base_model
from fedleak.federated.loop import run_rounds
from fedleak.federated.rounds import FederationSettings, TrainingSetup

# Parameters that let each rule run with 5 uploads of which 2 are refused (3 honest left).
PARAMS = {"krum": {"f": 0}, "multikrum": {"f": 0, "m": 2}, "bulyan": {"f": 0}, "trimmed_mean": {"beta": 0.2},
          "norm_bound": {"max_norm": 1.0}, "dp_fedavg": {"noise_multiplier": 0.5, "clip_norm": 1.0},
          "dp_sgd": {"noise_multiplier": 0.5}, "fltrust": {"root_records": 8}}


class CorruptUploads(Adversary):
    """Writes a value (NaN, inf) into one coordinate of each chosen client's upload, every round, where
    the round loop lets an adversary rewrite uploads (before any defense hook)."""

    def __init__(self, corrupt: dict[int, float]):
        self.corrupt = corrupt
        self.malicious = frozenset(corrupt)

    def poison_updates(self, updates, *, global_state, info):
        out = []
        for u in updates:
            if u.client in self.corrupt:
                state = {k: v.clone() for k, v in u.state.items()}
                key = sorted(state)[0]
                state[key].view(-1)[0] = self.corrupt[u.client]
                u = ClientUpdate(client=u.client, state=state, num_examples=u.num_examples)
            out.append(u)
        return out


def _train(tmp_path, small_model_path, defense, corrupt, *, rounds=2):
    base, tokenizer = load_base_model(small_model_path)  # fresh: add_peft_adapter wraps the model it is given
    records = generate_records(20, seed=0, purpose="pool", private=True)
    data = FederatedData(clients=[records[i * 4:(i + 1) * 4] for i in range(5)],
                         heldout=generate_records(4, seed=0, purpose="h", private=True))
    setup = TrainingSetup(base_model=base, tokenizer=tokenizer, data=data,
                          federation=FederationSettings(clients=5, rounds=rounds, local_epochs=1, batch_size=4,
                                                        min_records_per_client=1),
                          adapter=LoraSettings(r=4, alpha=8), hooks=defense, seed=0, out_dir=tmp_path / defense.name,
                          config_hash="h", progress=False, adversary=CorruptUploads(corrupt), label=defense.name)
    return run_rounds(setup, FedIT())


def _builtin_defenses() -> list[str]:
    # Plug-ins other tests register live in other modules: only fedleak's own rules are in scope here.
    return [n for n in DEFENSES.names() if DEFENSES.get(n).__module__.startswith("fedleak.defenses.")]


def test_every_builtin_defense_keeps_the_global_adapter_finite_and_refuses_the_corrupt_uploads(
        tmp_path, small_model_path, caplog):
    names = _builtin_defenses()
    assert {"none", "median", "krum", "multikrum", "bulyan", "trimmed_mean", "geomedian", "norm_bound",
            "dp_fedavg", "secagg", "dp_sgd", "robust_lr", "centered_clip", "foolsgold", "fltrust",
            "scrub"} <= set(names)
    for name in names:
        defense = DEFENSES.get(name)(**PARAMS.get(name, {}))
        with caplog.at_level(logging.WARNING, logger="fedleak.federated.rounds"):
            caplog.clear()
            run = _train(tmp_path, small_model_path, defense, {1: math.nan, 3: math.inf})
        for entry in run.history:
            assert set(entry["refused"]) == {"1", "3"}, (name, entry)
            assert entry["refused"]["1"].startswith("non-finite upload (NaN in ")
            assert entry["refused"]["3"].startswith("non-finite upload (inf in ")
            assert "global_unchanged" not in entry, name
            assert entry["mean_train_loss"] is not None and math.isfinite(entry["mean_train_loss"]), name
        warned = [r.getMessage() for r in caplog.records if "refused client" in r.getMessage()]
        assert len(warned) == 4 and "round 2: refused client 3's non-finite upload (inf in " in warned[-1], warned
        final = checkpoint.load_file(checkpoint.round_dir(run.training_dir, 2), "global")
        assert nonfinite_reason(final) is None, name
        # The refused clients' records did not shape the global adapter: they are not its members. A
        # selecting rule (Krum, Bulyan) also leaves honest uploads out: only what it aggregated counts.
        aggregated = {c for entry in run.history for c in entry["aggregated"]}
        assert aggregated <= {0, 2, 4} and aggregated, (name, aggregated)
        # FoolsGold weights alike histories 0; FLTrust an update pointing away from its root update.
        if name not in ("krum", "multikrum", "bulyan", "foolsgold", "fltrust"):
            assert aggregated == {0, 2, 4}, name
        assert {r.record_id for r in run.global_members} == {
            r.record_id for c in aggregated for r in generate_records(20, seed=0, purpose="pool",
                                                                      private=True)[c * 4:(c + 1) * 4]}, name


def test_when_every_upload_is_refused_the_global_adapter_stays_as_it_was(tmp_path, small_model_path):
    run = _train(tmp_path, small_model_path, DEFENSES.get("none")(), {c: math.nan for c in range(5)}, rounds=1)
    assert run.history[0]["global_unchanged"] is True and len(run.history[0]["refused"]) == 5
    before = checkpoint.load_file(checkpoint.round_dir(run.training_dir, 0), "global")
    after = checkpoint.load_file(checkpoint.round_dir(run.training_dir, 1), "global")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert run.global_members == []


KEY = "layer.lora_A.weight"


def _state(*values):
    return {KEY: torch.tensor(values, dtype=torch.float64)}


def _results():
    """Three honest uploads around (1, 1), one NaN and one inf."""
    return [(_state(1.0, 1.0), 1), (_state(math.nan, 0.0), 1), (_state(1.1, 0.9), 1), (_state(0.0, math.inf), 1),
            (_state(0.9, 1.1), 1)]


def test_nonfinite_reason_names_the_tensor_and_the_kind():
    assert nonfinite_reason(_state(1.0, 2.0)) is None
    assert nonfinite_reason({"a": torch.zeros(2), "b": torch.tensor([math.nan, math.nan])}) == "NaN in b (2 non-finite values)"
    assert nonfinite_reason(_state(-math.inf, 0.0)) == f"inf in {KEY} (1 non-finite value)"
    assert finite_results(_results()) == [0, 2, 4]
    with pytest.raises(ValueError, match="every one of the 2 client updates has a non-finite value"):
        finite_results(_results()[1:4:2])


def test_each_rule_leaves_a_nonfinite_update_out_and_fedavg_refuses_it():
    results, honest = _results(), [_results()[i] for i in (0, 2, 4)]
    torch.testing.assert_close(coordinate_median(results)[KEY], coordinate_median(honest)[KEY])
    torch.testing.assert_close(trimmed_mean(results, beta=0.2)[KEY], trimmed_mean(honest, beta=0.0)[KEY])
    torch.testing.assert_close(geometric_median(results)[0][KEY], geometric_median(honest)[0][KEY])
    assert set(krum_select(results, f=0, m=5)) == {0, 2, 4}
    state, selected = bulyan(results, f=0)
    assert sorted(selected) == [0, 2, 4] and nonfinite_reason(state) is None
    with pytest.raises(ValueError, match="client update 1 has NaN in .*refuse non-finite uploads"):
        fedavg(results)


def test_norm_bound_never_passes_a_nonfinite_update_and_dp_clipping_zeroes_it():
    reference = _state(0.0, 0.0)
    for bad in (_state(math.nan, 0.0), _state(math.inf, 0.0)):
        clipped, norm = clip_update(bad, reference, max_norm=1.0)
        assert not math.isfinite(norm) and torch.equal(clipped[KEY], reference[KEY])  # the zero update
    info = RoundInfo(round=1, clients=[0, 1, 2], num_clients_total=3, generator=torch.Generator())
    updates = [ClientUpdate(0, _state(3.0, 4.0), 1), ClientUpdate(1, _state(math.nan, 0.0), 1),
               ClientUpdate(2, _state(0.0, -math.inf), 1)]
    out = NormBound(max_norm=1.0).before_aggregation(updates, global_state=reference, info=info)
    assert [u.client for u in out] == [0] and info.metrics["norm_bound_refused"] == [1, 2]
    torch.testing.assert_close(out[0].state[KEY], torch.tensor([0.6, 0.8], dtype=torch.float64))
