"""Vocabulary leakage from the LoRA A updates (attacks/extraction/vocabulary.py): the span test on hand-made
vectors, the metrics by hand, module detection on the embedded Llama and a GPT-2 refusal, an exact run on an
update built from known tokens, and the attack end to end on the frontier federation."""

import math

import numpy as np
import pytest
import torch

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Secrets, Target
from fedleak.attacks.extraction.vocabulary import (VocabularyAttack, context_free_modules, lora_modules,
                                                   module_inputs, ranking_metrics, row_basis, span_scores)
from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import Record, generate_records
from fedleak.federated.training import encode

BLOCK0 = [f"base_model.model.model.layers.0.self_attn.{p}_proj" for p in "qkv"]


# -- the span test by hand --------------------------------------------------------------------------------------

def test_span_scores_are_exact_on_orthogonal_tokens():
    """Token vectors = the standard basis of R^8 (plus one mixed token); the update's rows mix tokens 1, 3 and 5:
    those score 1, the others 0, the mixed token its share inside the span."""
    vectors = np.vstack([np.eye(8), (np.eye(8)[1] + np.eye(8)[2]) / np.sqrt(2)])
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 3)) @ vectors[[1, 3, 5]]
    scores = span_scores(vectors, rows)
    np.testing.assert_allclose(scores[:8], [0, 1, 0, 1, 0, 1, 0, 0], atol=1e-12)
    assert scores[8] == pytest.approx(1 / np.sqrt(2))
    # Removing a shared direction keeps the test exact: the rows, projected too, still span the projected tokens.
    shared = np.ones(8)
    centered = span_scores(vectors, rows, shared=shared)
    project = np.eye(8) - np.outer(shared, shared) / 8
    inside = project @ vectors[[1, 3, 5]].T  # the projected in-span tokens
    np.testing.assert_allclose(centered[[1, 3, 5]], 1, atol=1e-12)
    outside = project @ vectors[0]
    q, _ = np.linalg.qr(inside)
    assert centered[0] == pytest.approx(np.linalg.norm(q.T @ outside) / np.linalg.norm(outside))
    assert span_scores(np.zeros((1, 8)), rows)[0] == 0  # a zero vector scores 0, not NaN


def test_row_basis_keeps_the_energy_asked_and_drops_float_noise():
    rows = np.diag([3.0, 1.0, 1e-9])  # squared singular values 9, 1 and float32 noise
    assert row_basis(rows, 1.0).shape == (2, 3)  # the 1e-9 direction is below float32's numerical rank
    assert row_basis(rows, 0.9).shape == (1, 3)  # 9 / 10 of the energy in the first direction
    assert row_basis(rows, 0.95).shape == (2, 3)
    np.testing.assert_allclose(np.abs(row_basis(rows, 0.9)), [[1, 0, 0]])
    assert row_basis(np.zeros((2, 3)), 1.0).shape == (0, 3)


def test_ranking_metrics_by_hand():
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    truth = np.array([True, False, True, False])
    ident = np.array([True, False, False, False])
    m = ranking_metrics(scores, truth, ident, bootstrap=0, seed=0)
    assert m["token_auc"] == pytest.approx(0.75)  # pairs (4>3, 4>1, 2<3, 2>1)
    assert math.isnan(m["token_auc_low"])
    assert m["precision"] == m["recall"] == 0.5  # top k = 2: {4, 3}, one hit
    assert (m["precision_low"], m["precision_high"]) == pytest.approx((0.0126, 0.9874), abs=1e-4)  # Clopper-Pearson 1/2
    assert m["identifier_token_recall"] == 1.0
    assert m["identifier_token_recall_low"] == pytest.approx(0.025, abs=1e-4)
    none = ranking_metrics(scores, truth, np.zeros(4, dtype=bool), bootstrap=50, seed=0)
    assert math.isnan(none["identifier_token_recall"])
    assert none["token_auc_low"] <= 0.75 <= none["token_auc_high"]


def test_bad_parameters_are_refused():
    for kwargs in ({"energy": 0.0}, {"energy": 1.5}, {"probe_length": 0}, {"tolerance": 2.0}, {"batch_size": 0},
                   {"bootstrap": -1}):
        with pytest.raises(FedleakError, match=next(iter(kwargs))):
            VocabularyAttack(**kwargs)
    assert ATTACKS.get("vocabulary") is VocabularyAttack
    assert VocabularyAttack.access == "updates" and "client" not in VocabularyAttack.observers


# -- on real architectures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(embedded):
    model, tokenizer = embedded
    return add_peft_adapter(model, LoraSettings(r=16), seed=0), tokenizer


def _target(model, tokenizer, *, observer="upload", client=1, rnd=2, server=None, public=()):
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, public=list(public))
    return Target(model=model, tokenizer=tokenizer, observer=observer, client=client, round=rnd, env=env,
                  server=server)


def test_block0_qkv_are_the_context_free_modules_of_the_embedded_llama(llama):
    model, tokenizer = llama
    names = list(lora_modules(model))
    assert len(names) == 7 * model.config.num_hidden_layers  # all-linear: q k v o gate up down per block
    assert context_free_modules(model, [5, 900, 17, 300, 42, 5], tolerance=1e-3) == [BLOCK0]
    # Module detection and the token vectors: each id's vector is input_layernorm(embedding(id)).
    attack = VocabularyAttack(batch_size=500)  # several batches
    target = _target(model, tokenizer)
    groups = attack.groups(target)
    assert groups == [BLOCK0]
    (vectors,) = attack.token_vectors(target, groups)
    base = model.get_base_model().model
    with torch.no_grad():
        expected = base.layers[0].input_layernorm(base.embed_tokens.weight[:len(tokenizer)])
    assert vectors.shape == (len(tokenizer), model.config.hidden_size)
    np.testing.assert_allclose(vectors, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_vocabulary_pass_stops_at_the_last_wanted_module(llama):
    model, _ = llama
    calls = []
    later = model.get_base_model().model.layers[1]
    handle = later.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        seen = module_inputs(model, {BLOCK0[0]: lora_modules(model)[BLOCK0[0]]}, torch.tensor([[3], [4]]), stop=True)
    finally:
        handle.remove()
    assert list(seen) == [BLOCK0[0]] and seen[BLOCK0[0]].shape == (2, 1, model.config.hidden_size)
    assert not calls


def test_gpt2_is_refused_in_one_line(tiny):
    model, tokenizer = tiny("gpt2")
    peft = add_peft_adapter(model, LoraSettings(r=4, target_modules=("c_attn", "c_proj")), seed=0)
    with pytest.raises(FedleakError, match=r"attack vocabulary: no LoRA module of .* reads a token alone") as err:
        VocabularyAttack().groups(_target(peft, tokenizer))
    assert "\n" not in str(err.value)


class _Server:
    """The one thing the attack reads of a `ServerRecord`: `update(round, view)`."""

    def __init__(self, update, others=None):
        self.asked, self._update, self._others = [], update, others or {}

    def clients(self, rnd):
        return sorted([1, *self._others])

    def update(self, rnd, view):
        self.asked.append((rnd, view))
        client = int(view.split("/")[1]) if "/" in view else None
        return self._others.get(client, self._update)


def test_an_update_built_from_known_tokens_gives_them_all_back(llama):
    """An update whose stacked A rows mix exactly the input vectors of one short record's tokens (fewer than the
    48 rows): the span test is exact, so the top k = |bag| tokens are the bag, identifiers included."""
    model, tokenizer = llama
    record = Record(instruction="Call Varga.", input="", output="Varga: ok.", category="triage",
                    record_id="r0", identifiers=("Varga",))
    attack = VocabularyAttack(bootstrap=0)
    target = _target(model, tokenizer, public=generate_records(12, seed=0, purpose="public", private=False))
    (vectors,) = attack.token_vectors(target, attack.groups(target))
    bag = sorted(set(encode([record], tokenizer, max_length=256)[0].input_ids))
    assert len(bag) < 48
    rng = np.random.default_rng(0)
    update = {f"{name}.lora_A.weight": torch.tensor(rng.standard_normal((16, len(bag))) @ vectors[bag])
              for name in BLOCK0}
    # Another client's upload, built from other tokens, is the control: it misses this record's bag.
    rest = [i for i in range(len(vectors)) if i not in bag][:len(bag)]
    other = {k: torch.tensor(rng.standard_normal((16, len(rest))) @ vectors[rest]) for k in update}
    target.server = _Server(update, {0: other})
    found = attack.run(target, Secrets(records=[record]))
    assert target.server.asked == [(2, "upload/1"), (2, "upload/0")]
    m = found.metrics
    assert m["precision"] == m["recall"] == m["token_auc"] == 1.0
    assert m["identifier_token_recall"] == 1.0 and found.details["identifier_tokens"] >= 1
    control = found.details["other_uploads"]
    assert control["clients"] == [0] and control["precision"] < 0.5 and control["token_auc"] < 0.9
    assert found.details["bag"] < len(bag)  # the template tokens every public record holds are left out
    assert all(t["in_bag"] for t in found.details["top_tokens"][:found.details["bag"]])
    # The global view reads the aggregate update.
    target.observer, target.client = "global", None
    assert "other_uploads" not in attack.run(target, Secrets(records=[record])).details
    assert target.server.asked[-1] == (2, "global")


def test_round_zero_has_no_update_and_the_client_view_is_refused(llama):
    model, tokenizer = llama
    found = VocabularyAttack().run(_target(model, tokenizer, rnd=0, server=_Server({})), Secrets(records=[]))
    assert all(math.isnan(v) for v in found.metrics.values()) and "prior_precision" in found.metrics
    assert "no update" in found.details["note"]
    with pytest.raises(FedleakError, match="observer 'client'"):
        VocabularyAttack().run(_target(model, tokenizer, observer="client"), Secrets(records=[]))
    with pytest.raises(FedleakError, match="Target.server"):
        VocabularyAttack().run(_target(model, tokenizer), Secrets(records=[]))


# -- end to end ----------------------------------------------------------------------------------------------------

def test_vocabulary_on_the_frontier_federation(frontier):
    """FEDIT, round 3. Uploads without defense: the token AUC's interval clears chance and precision clears the
    base rate (|bag| / |vocabulary|); the identifier tokens reach the top k more often than at random and than
    under the public-frequency prior, which ranks them last (names are absent from the public pool). Measured
    (token AUC, precision, identifier share; prior): 0.78/0.54/0.43 (0.89/0.69/0.27), 0.76/0.52/0.48
    (0.87/0.62/0.20), 0.73/0.47/0.40 (0.85/0.62/0.17): the token AUC and precision stay below the prior's on this
    128-dimensional model, and the other clients' uploads rank a client's bag about as well (details.other_uploads):
    most of what the update shows is the domain's vocabulary. Secure aggregation: the attack runs on the aggregate
    update of the global view."""
    cells = frontier.cells('{ name = "vocabulary", observers = ["global", "upload"] }')
    final = [c for c in cells if c["round"] == 3 and "error" not in c]
    uploads = [c for c in final if c["defense"] == "none" and c["observer"] == "upload"]
    assert len(uploads) == 3
    for cell in uploads:
        m, d = cell["metrics"], cell["details"]
        assert m["token_auc_low"] > 0.6, (cell["client"], m["token_auc"])
        assert m["precision_low"] > 1.5 * d["bag"] / d["vocabulary"], (cell["client"], m["precision"])
        assert sorted(d["other_uploads"]["clients"]) == sorted({0, 1, 2} - {cell["client"]})
    share = np.mean([c["metrics"]["identifier_token_recall"] for c in uploads])
    assert share > 1.5 * np.mean([c["details"]["bag"] / c["details"]["vocabulary"] for c in uploads]), share
    assert share > np.mean([c["metrics"]["prior_identifier_token_recall"] for c in uploads]) + 0.1, share
    secagg = [c for c in final if c["defense"] == "secagg"]
    assert [c["observer"] for c in secagg] == ["global"]
    assert secagg[0]["metrics"]["token_auc_low"] > 0.5 and secagg[0]["access"] == "updates"
