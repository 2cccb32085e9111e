"""Logit-based membership scores: each formula on hand-made statistics, and one shared forward pass."""

import math
import zlib

import numpy as np
import pytest
import torch

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Target
from fedleak.attacks.membership.stats import LOWERCASE, ORIGINAL, TARGET, TokenStats, compute_stats, lowercased
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import generate_records
from fedleak.common.errors import FedleakError
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, encode, sequence_losses, batches, train_adapter

LOGIT_ATTACKS = ("loss", "zlib", "lowercase", "min_k", "min_k_pp", "reference")

# Two records: the first has 4 scored tokens, the second 2 (padded).
LOGP = np.array([[-0.1, -2.0, -0.5, -4.0], [-1.0, -3.0, 0.0, 0.0]])
MU = np.array([[-1.0, -1.0, -2.0, -1.5], [-0.5, -2.0, 0.0, 0.0]])
SIGMA = np.array([[0.5, 1.0, 2.0, 0.5], [1.0, 0.5, 1.0, 1.0]])
MASK = np.array([[True, True, True, True], [True, True, False, False]])
TEXTS = ("Anna Smith is due at nine", "a b")


def _stats(logp=LOGP, texts=TEXTS):
    return TokenStats(logp=logp, mu=MU, sigma=SIGMA, mask=MASK, texts=texts)


def _attack(name, **params):
    return ATTACKS.get(name)(**params)


def test_loss_and_zlib_follow_their_formulas():
    loss = np.array([(0.1 + 2.0 + 0.5 + 4.0) / 4, (1.0 + 3.0) / 2])
    stats = {(TARGET, ORIGINAL): _stats()}
    assert _attack("loss").from_stats(stats) == pytest.approx(-loss)
    zlib_len = np.array([len(zlib.compress(t.encode())) for t in TEXTS])
    assert _attack("zlib").from_stats(stats) == pytest.approx(-loss / zlib_len)


def test_lowercase_and_reference_compare_two_passes():
    lower = _stats(logp=LOGP * 2)  # the lowercased copy costs twice as much
    ref = _stats(logp=LOGP * 3)
    original = _stats()
    loss = original.loss
    assert _attack("lowercase").from_stats({(TARGET, ORIGINAL): original, (TARGET, LOWERCASE): lower}) == \
        pytest.approx(-loss / (2 * loss))
    assert _attack("reference").from_stats({(TARGET, ORIGINAL): original, ("reference", ORIGINAL): ref}) == \
        pytest.approx(3 * loss - loss)


def test_min_k_averages_the_lowest_fraction_of_tokens():
    stats = {(TARGET, ORIGINAL): _stats()}
    # k = 0.5: ceil(2) lowest of 4 tokens, and ceil(1) of 2 tokens
    assert _attack("min_k", k=0.5).from_stats(stats) == pytest.approx([(-4.0 - 2.0) / 2, -3.0])
    assert _attack("min_k", k=1.0).from_stats(stats) == pytest.approx(-_stats().loss)
    assert _attack("min_k", k=0.01).from_stats(stats) == pytest.approx([-4.0, -3.0])


def test_min_k_pp_standardises_by_the_next_token_distribution():
    z = (LOGP - MU) / SIGMA  # row 0: 1.8, -1.0, 0.75, -5.0; row 1: -0.5, -2.0
    assert z[0] == pytest.approx([1.8, -1.0, 0.75, -5.0])
    stats = {(TARGET, ORIGINAL): _stats()}
    assert _attack("min_k_pp", k=0.5).from_stats(stats) == pytest.approx([(-5.0 - 1.0) / 2, -2.0])


@pytest.mark.parametrize("name, params, message", [
    ("min_k", {"k": 0}, "attack min_k: k = 0"),
    ("min_k_pp", {"k": 1.5}, "attack min_k_pp: k = 1.5"),
    ("reference", {"model": ""}, "attack reference: model is empty"),
])
def test_bad_parameters_name_the_attack_and_field(name, params, message):
    with pytest.raises(FedleakError, match=message):
        _attack(name, **params)


def test_statistics_match_a_direct_computation(small_model_path):
    model, tokenizer = load_base_model(small_model_path)
    records = generate_records(5, seed=0, purpose="stats", private=True)
    stats = compute_stats(model, tokenizer, records, max_length=128, response_only=True, batch_size=2)
    examples = encode(records, tokenizer, max_length=128)
    with torch.no_grad():
        direct = torch.cat([sequence_losses(model, b) for b in batches(examples, batch_size=5,
                                                                        pad_id=tokenizer.pad_token_id)])
    assert stats.loss == pytest.approx(direct.numpy(), rel=1e-4)
    # mu and sigma of the first scored token of record 0, from the full next-token distribution
    batch = next(batches(examples[:1], batch_size=1, pad_id=tokenizer.pad_token_id))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[0, :-1].float(), -1)
    first = int((batch["labels"][0, 1:] != -100).nonzero()[0])
    p = logp[first].exp()
    assert stats.mu[0, 0] == pytest.approx(float((p * logp[first]).sum()), rel=1e-4)
    assert stats.sigma[0, 0] == pytest.approx(float(((p * (logp[first] - (p * logp[first]).sum()) ** 2).sum()).sqrt()),
                                              rel=1e-3)
    assert lowercased(records[0]).output == records[0].output.lower()


class _CountingModel(torch.nn.Module):
    """Forwards to a peft model and counts forward calls (with and without adapters)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.inner(**kwargs)

    def disable_adapter(self):
        return self.inner.disable_adapter()


def test_all_logit_scores_share_one_forward_pass_per_batch_and_model(small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    records = generate_records(10, seed=0, purpose="share", private=True)
    counting = _CountingModel(model)
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, max_length=128, batch_size=4)
    target = Target(model=counting, tokenizer=tokenizer, observer="global", round=1, max_length=128, env=env)
    scores = {name: ATTACKS.get(name)().score(target, records) for name in LOGIT_ATTACKS}
    batches_per_pass = math.ceil(len(records) / env.batch_size)
    # target on the text, target on the lowercased text, the reference (adapters off): one pass each
    assert counting.calls == 3 * batches_per_pass
    for name in LOGIT_ATTACKS:  # scoring again costs nothing
        assert np.array_equal(ATTACKS.get(name)().score(target, records), scores[name])
    assert counting.calls == 3 * batches_per_pass
    # the reference pass is cached for the whole run: a second view reuses it
    other = Target(model=counting, tokenizer=tokenizer, observer="client", client=0, round=1, max_length=128, env=env)
    ATTACKS.get("reference")().score(other, records)
    assert counting.calls == 4 * batches_per_pass
    assert all(np.isfinite(s).all() and s.shape == (len(records),) for s in scores.values())


def test_the_blind_baseline_is_the_base_model_and_shares_its_passes_across_views(small_model_path):
    from fedleak.eval.membership_cell import blind_scores

    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    with torch.no_grad():  # a visible adapter: the view's scores differ from the base model's
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.05)
    records = generate_records(8, seed=1, purpose="blind", private=True)
    counting = _CountingModel(model)
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, max_length=128, batch_size=4)
    view = lambda client: Target(model=counting, tokenizer=tokenizer, observer="upload", client=client, round=1,
                                 max_length=128, env=env)
    loss = ATTACKS.get("loss")()
    ATTACKS.get("reference")().score(view(0), records)  # the view's pass and the base model's: 2 per batch
    batches_per_pass = math.ceil(len(records) / env.batch_size)
    assert counting.calls == 2 * batches_per_pass
    blind = blind_scores(loss, view(0), records)
    assert counting.calls == 2 * batches_per_pass  # the reference attack's base pass serves the blind baseline
    blind_other_view = blind_scores(loss, view(1), records)  # another view, the same base model: no pass
    assert counting.calls == 2 * batches_per_pass and np.array_equal(blind, blind_other_view)
    fresh, _ = load_base_model(small_model_path)  # `base` now carries the LoRA layers: a clean copy
    expected = -compute_stats(fresh, tokenizer, records, max_length=128, response_only=True, batch_size=4).loss
    np.testing.assert_allclose(blind, expected, rtol=1e-6)  # the base model with the adapters off
    assert not np.allclose(loss.score(view(0), records), blind)  # ... and the view itself with them on
    assert model.get_model_status().enabled is True  # switched back on afterwards


def test_scores_separate_members_after_memorisation(small_model_path):
    from fedleak.eval.metrics import roc_auc

    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    members = generate_records(12, seed=1, purpose="m", private=True)
    nonmembers = generate_records(12, seed=1, purpose="n", private=True)
    train_adapter(model, encode(members, tokenizer, max_length=128), TrainSettings(epochs=15, batch_size=4, lr=3e-3),
                  pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, max_length=128)
    target = Target(model=model, tokenizer=tokenizer, observer="global", round=1, max_length=128, env=env)
    y = np.r_[np.ones(12), np.zeros(12)]
    for name in LOGIT_ATTACKS:
        assert roc_auc(y, ATTACKS.get(name)().score(target, members + nonmembers)) > 0.7, name


def test_records_without_scored_tokens_are_left_out(small_model_path):
    from fedleak.attacks.membership.stats import scorable

    _, tokenizer = load_base_model(small_model_path)
    records = generate_records(3, seed=0, purpose="s", private=True)
    long_prompt = records[0].__class__(instruction="word " * 400, input="", output="answer", category="triage",
                                       record_id="long")
    kept = scorable(records + [long_prompt], tokenizer, max_length=200, response_only=True)
    assert [r.record_id for r in kept] == [r.record_id for r in records]
    assert len(scorable([long_prompt], tokenizer, max_length=200, response_only=False)) == 1


def test_a_named_reference_model_uses_its_own_tokenizer_and_refuses_a_plain_target(small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    records = generate_records(4, seed=0, purpose="r", private=True)
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, max_length=128)
    plain = Target(model=base, tokenizer=tokenizer, observer="global", round=1, max_length=128, env=env)
    with pytest.raises(FedleakError, match="disable_adapter"):
        ATTACKS.get("reference")().score(plain, records)
    # The same model named by its folder: loaded once per run, scores equal the base model's (no adapter).
    peft = add_peft_adapter(base, LoraSettings(), seed=0)  # LoRA B starts at zero: the view equals the base
    target = Target(model=peft, tokenizer=tokenizer, observer="global", round=1, max_length=128, env=env)
    named = ATTACKS.get("reference")(model=str(small_model_path)).score(target, records)
    assert named == pytest.approx(np.zeros(len(records)), abs=1e-5)
    assert len(env.cache["reference-models"]) == 1
