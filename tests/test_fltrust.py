"""FLTrust (Cao et al. 2021), issue 21: the rule against hand cases and a transcription of the paper's
aggregation, its refusals, and a real federation where the server trains its root update on the clients' model
and gives a client reversing the honest updates no trust."""

import json
import math

import numpy as np
import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.defenses.base import DEFENSES
from fedleak.defenses.fltrust import FLTrust, fltrust
from fedleak.federated.adapters import LoraSettings
from fedleak.federated.data import FederatedData, generate_records
from fedleak.federated.fedit import FedIT
from fedleak.federated.hooks import Adversary, ClientUpdate, RoundInfo
from fedleak.federated.loop import run_rounds
from fedleak.federated.model import load_base_model
from fedleak.federated.rounds import FederationSettings, TrainingSetup

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "layer.lora_A.weight"
ZERO = {KEY: torch.zeros(2, dtype=torch.float64)}


def _s(*values):
    return {KEY: torch.tensor(values, dtype=torch.float64)}


def test_trust_is_the_cosine_to_the_server_update_and_lengths_are_the_servers():
    server = _s(2.0, 0.0)  # g_0 = (2, 0)
    results = [(_s(5.0, 0.0), 1), (_s(1.0, 1.0), 7), (_s(0.0, 3.0), 1), (_s(-1.0, 0.0), 1)]
    state, scores = fltrust(results, ZERO, server)
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(scores, torch.tensor([1.0, c, 0.0, 0.0], dtype=torch.float64))
    # (1 * (2, 0) + c * 2 (c, c)) / (1 + c): each update rescaled to ||g_0|| = 2, counts ignored
    expected = torch.tensor([(2 + 2 * c * c) / (1 + c), 2 * c * c / (1 + c)], dtype=torch.float64)
    torch.testing.assert_close(state[KEY], expected)
    # Updates are upload - start.
    shifted, _ = fltrust([(_s(v[KEY][0].item() + 1, v[KEY][1].item() - 1), n) for v, n in results], _s(1.0, -1.0),
                         _s(3.0, -1.0))
    torch.testing.assert_close(shifted[KEY], expected + torch.tensor([1.0, -1.0], dtype=torch.float64))


def _paper(deltas: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """Algorithm 1's aggregation (Cao et al. 2021), one client at a time."""
    num, den = np.zeros_like(g0), 0.0
    for g in deltas:
        ts = max(0.0, float(g @ g0) / (np.linalg.norm(g) * np.linalg.norm(g0)))
        num += ts * np.linalg.norm(g0) / np.linalg.norm(g) * g
        den += ts
    return num / den


@pytest.mark.parametrize("seed", range(4))
def test_the_aggregate_matches_the_papers_algorithm(seed):
    rng = np.random.default_rng(seed)
    g0 = rng.normal(size=12)
    deltas = rng.normal(size=(6, 12)) + 0.8 * g0 * rng.uniform(-1, 2, size=(6, 1))
    start = rng.normal(size=12)
    state, scores = fltrust([(_s(*(start + d)), 1) for d in deltas], _s(*start), _s(*(start + g0)))
    np.testing.assert_allclose(state[KEY].numpy() - start, _paper(deltas, g0), rtol=1e-10, atol=1e-12)
    assert (scores.numpy() >= 0).all() and (scores.numpy() <= 1).all()


def test_no_trust_keeps_the_start_and_a_nonfinite_or_zero_update_scores_zero():
    state, scores = fltrust([(_s(-1.0, 0.0), 1), (_s(0.0, -2.0), 1)], ZERO, _s(1.0, 1.0))
    torch.testing.assert_close(state[KEY], ZERO[KEY])
    torch.testing.assert_close(scores, torch.zeros(2, dtype=torch.float64))
    state, scores = fltrust([(_s(math.nan, 1.0), 1), (_s(0.0, 0.0), 1), (_s(2.0, 0.0), 1)], ZERO, _s(1.0, 0.0))
    assert scores.tolist() == [0.0, 0.0, 1.0] and state[KEY].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="root update is zero"):
        fltrust([(_s(1.0, 0.0), 1)], ZERO, ZERO)
    # A client that uploads the start unchanged has no direction: trust 0, and no 0/0 in the rescaling, however
    # long the server's update.
    state, scores = fltrust([(_s(0.0, 0.0), 1), (_s(20.0, 0.0), 1)], ZERO, _s(10.0, 0.0))
    assert scores.tolist() == [0.0, 1.0] and state[KEY].tolist() == [10.0, 0.0]


class _Server:
    """A server model whose root update is fixed (the rule's arithmetic without a training)."""

    seed = 0

    def __init__(self, state):
        self.state, self.calls = state, []

    def train(self, records, *, start, round, purpose):
        self.calls.append((len(records), round, purpose))
        return self.state, {"loss_last_quarter": 1.0}


def test_the_defense_trains_the_root_data_each_round_and_names_the_fix(tmp_path):
    defense = FLTrust(root_records=5)
    server = _Server(_s(1.0, 0.0))
    info = RoundInfo(round=2, clients=[0, 1], num_clients_total=2, generator=torch.Generator(), start=ZERO,
                     server=server)
    updates = [ClientUpdate(0, _s(3.0, 0.0), 1), ClientUpdate(1, _s(-1.0, 0.5), 1)]
    assert defense.aggregate(updates, info=info)[KEY].tolist() == [1.0, 0.0]
    assert server.calls == [(5, 2, "fltrust-root")]
    assert info.metrics["fltrust_trust"] == {"0": 1.0, "1": 0.0} and info.metrics["excluded_clients"] == [1]
    # The embedded root data: public records (no patient), the same for a seed, other records for another.
    root = defense.root(0)
    assert len(root) == 5 and all(not r.identifiers for r in root) and root == defense.root(0) != defense.root(1)
    with pytest.raises(FedleakError, match="gives the server no model: build its ServerSide"):
        defense.aggregate(updates, info=RoundInfo(round=1, clients=[0, 1], num_clients_total=2,
                                                  generator=torch.Generator(), start=ZERO))
    with pytest.raises(FedleakError, match="fltrust, round 2: the server's root update is zero.*fltrust.root_records"):
        FLTrust().aggregate(updates, info=RoundInfo(round=2, clients=[0, 1], num_clients_total=2,
                                                    generator=torch.Generator(), start=ZERO, server=_Server(ZERO)))
    (tmp_path / "root.jsonl").write_text("".join(
        f'{{"instruction": "q{i}", "input": "", "output": "a{i}"}}\n' for i in range(9)))
    from_file = FLTrust(root_records=4, root_data=str(tmp_path / "root.jsonl"))
    assert len(from_file.root(0)) == 4 and {r.instruction for r in from_file.root(0)} < {f"q{i}" for i in range(9)}
    assert len(FLTrust(root_records=20, root_data=str(tmp_path / "root.jsonl")).root(0)) == 9
    with pytest.raises(FedleakError, match="fltrust.root_data = '.*missing.jsonl': no such file"):
        FLTrust(root_data=str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": 3}\n')
    with pytest.raises(FedleakError, match="fltrust.root_data = '.*bad.jsonl': "):
        FLTrust(root_data=str(tmp_path / "bad.jsonl")).root(0)  # read where the server needs it
    assert DEFENSES.get("fltrust").needs_individual_updates


class InnerProduct(Adversary):
    """Client 2 uploads start - 2 * (the honest updates' mean): inner product manipulation (Xie et al. 2020)."""

    malicious = frozenset({2})

    def poison_updates(self, updates, *, global_state, info):
        honest = [u for u in updates if u.client != 2]
        return [u if u.client != 2 else ClientUpdate(2, {k: global_state[k] - 2 * sum(h.state[k] - global_state[k]
                                                                                       for h in honest) / len(honest)
                                                         for k in u.state}, u.num_examples)
                for u in updates]


def test_in_a_real_federation_the_server_trusts_the_honest_clients_and_not_the_manipulating_one(tmp_path,
                                                                                               small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    records = generate_records(18, seed=0, purpose="pool", private=True)
    data = FederatedData(clients=[records[i * 6:(i + 1) * 6] for i in range(3)],
                         heldout=generate_records(4, seed=0, purpose="h", private=True))
    # A root sample of the clients' own task (FLTrust's assumption): records like theirs, of other patients.
    root = tmp_path / "root.jsonl"
    root.write_text("".join(json.dumps(r.to_alpaca()) + "\n" for r in generate_records(8, seed=1, purpose="root",
                                                                                        private=True)))
    setup = TrainingSetup(base_model=base, tokenizer=tokenizer, data=data,
                          federation=FederationSettings(clients=3, rounds=2, local_epochs=1, batch_size=4,
                                                        min_records_per_client=1),
                          adapter=LoraSettings(r=4, alpha=8), hooks=FLTrust(root_records=8, root_data=str(root)), seed=0,
                          out_dir=tmp_path / "run",
                          config_hash="h", progress=False, adversary=InnerProduct())
    run = run_rounds(setup, FedIT())
    for entry in run.history:
        trust = entry["fltrust_trust"]
        assert trust["2"] == 0 and trust["0"] > 0 and trust["1"] > 0, entry
        assert entry["aggregated"] == [0, 1] and math.isfinite(entry["fltrust_server_loss"])
    assert {r.record_id for r in run.global_members} == {r.record_id for r in records[:12]}


def test_the_server_training_leaves_the_clients_model_as_it_found_it(embedded, tmp_path):
    """FEDPIT's rest state (both adapters on, the local one trainable) comes back after a server training, the local
    adapter untouched, and the trained state starts from `start`."""
    from fedleak.federated.adapters import DEFAULT, activate, add_peft_adapter, add_named_adapter, get_adapter_state
    from fedleak.federated.loop import ServerTraining
    from fedleak.federated.rounds import TrainingSetup

    base, tokenizer = embedded
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8), seed=0)
    add_named_adapter(model, "local", LoraSettings(r=4, alpha=8), seed=1)
    activate(model, [DEFAULT, "local"], trainable="local")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    local, start = get_adapter_state(model, "local"), get_adapter_state(model)
    setup = TrainingSetup(base_model=base, tokenizer=tokenizer, data=None, federation=FederationSettings(local_epochs=1),
                          adapter=LoraSettings(r=4, alpha=8), hooks=None, seed=0, out_dir=tmp_path, config_hash="h")
    torch.manual_seed(7)
    expected_draw = torch.rand(1)
    torch.manual_seed(7)
    state, metrics = ServerTraining(model, setup).train(generate_records(8, seed=0, purpose="r", private=False),
                                                        start=start, round=1, purpose="test")
    assert torch.rand(1) == expected_draw  # the global RNG is where it was
    assert metrics["steps"] > 0 and any(not torch.equal(state[k], start[k]) for k in start)
    assert list(model.active_adapters) == [DEFAULT, "local"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(v, local[k]) for k, v in get_adapter_state(model, "local").items())
