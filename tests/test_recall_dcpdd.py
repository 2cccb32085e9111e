"""ReCaLL, Con-ReCall and DC-PDD: each formula on hand-made statistics, the prefixed pass scoring exactly
the plain pass's tokens, the prefix's key/value cache giving the whole prefixed pass, the passes they share, their parameter errors, and one end-to-end run each on the
shared FEDIT federation (tests/frontier.py)."""

import math

import numpy as np
import pytest
import torch

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Target
from fedleak.attacks.membership.dc_pdd import dc_pdd_score, smoothed_frequencies, token_counts
from fedleak.attacks.membership.recall import con_recall_score, prefix_ids, recall_score, shots
from fedleak.attacks.membership.stats import TokenStats, compute_stats, prefix_cache, prefixed
from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.batching import IGNORE
from fedleak.federated.data import generate_records
from fedleak.federated.model import load_base_model
from fedleak.federated.training import Example, encode

MASK = np.array([[True, True, True], [True, True, False]])


def _stats(logp, ids=None):
    logp = np.asarray(logp, dtype=float)
    return TokenStats(logp=logp, mu=np.zeros_like(logp), sigma=np.ones_like(logp), mask=MASK, texts=("a", "b"),
                      ids=None if ids is None else np.asarray(ids))


def test_recall_and_con_recall_follow_their_formulas():
    plain = _stats([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]])  # LL = -2, -1
    nonmember = _stats([[-2.0, -3.0, -4.0], [-1.0, -2.0, 0.0]])  # LL = -3, -1.5
    member = _stats([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])  # LL = -1, -2
    assert recall_score(plain, nonmember) == pytest.approx([-3 / -2, -1.5 / -1])
    assert con_recall_score(plain, nonmember, member, gamma=0.5) == pytest.approx(
        [(-3 - 0.5 * -1) / -2, (-1.5 - 0.5 * -2) / -1])
    assert con_recall_score(plain, nonmember, member, gamma=0.0) == pytest.approx(recall_score(plain, nonmember))
    # LL(x) = 0 (every token certain): finite, and the highest score
    certain = _stats([[0.0, 0.0, 0.0], [-0.5, -1.5, 0.0]])
    assert np.isfinite(recall_score(certain, nonmember)).all()
    assert recall_score(certain, nonmember)[0] > recall_score(plain, nonmember)[0]


def test_dc_pdd_calibrates_first_occurrences_by_smoothed_frequency_and_caps_them():
    frequencies = smoothed_frequencies([3, 1, 0, 0])  # (count + 1) / (4 + 4)
    assert frequencies == pytest.approx([0.5, 0.25, 0.125, 0.125])
    stats = _stats(np.log([[0.5, 0.2, 0.9], [1.0, 0.4, 0.3]]), ids=[[0, 1, 0], [2, 2, 3]])
    # row 0: tokens 0, 1 (the second 0 is a repeat); row 1: token 2 once (its repeat and the pad left out)
    expected = [np.mean([0.5 * math.log(2), 0.2 * math.log(4)]), min(1.0 * math.log(8), 1.0)]
    assert dc_pdd_score(stats, frequencies, a=1.0) == pytest.approx(expected)
    assert dc_pdd_score(stats, frequencies, a=0.3) == pytest.approx([np.mean([0.3, 0.2 * math.log(4)]), 0.3])


def test_prefixed_examples_score_the_same_tokens_and_cut_only_the_prefix():
    examples = [Example((7, 8, 9, 10), (7, 8, 9, 10)), Example((7, 8), (IGNORE, 8))]
    out = prefixed(examples, (1, 2, 3), context=None)
    assert out[0] == Example((1, 2, 3, 7, 8, 9, 10), (IGNORE,) * 4 + (8, 9, 10))  # the first token stays unscored
    assert out[1] == Example((1, 2, 3, 7, 8), (IGNORE,) * 4 + (8,))
    cut = prefixed(examples, (1, 2, 3), context=5)  # the prefix's last tokens, the record whole
    assert cut[0] == Example((3, 7, 8, 9, 10), (IGNORE,) * 2 + (8, 9, 10)) and cut[1] == out[1]
    assert prefixed(examples, (1, 2, 3), context=3)[0].input_ids == (7, 8, 9, 10)  # no room: never the record


@pytest.mark.parametrize("response_only", [True, False])
def test_the_prefixed_pass_scores_exactly_the_plain_pass_tokens(embedded, response_only):
    model, tokenizer = embedded
    records = generate_records(5, seed=0, purpose="prefix", private=True)
    kwargs = dict(max_length=64, response_only=response_only, batch_size=2)  # 64 cuts some records
    plain = compute_stats(model, tokenizer, records, **kwargs)
    prefix = encode(generate_records(2, seed=0, purpose="attacker-public", private=False), tokenizer, max_length=64)
    prefix = sum((e.input_ids for e in prefix), ())
    behind = compute_stats(model, tokenizer, records, prefix=prefix, context=None, **kwargs)
    np.testing.assert_array_equal(behind.mask, plain.mask)
    np.testing.assert_array_equal(behind.ids, plain.ids)
    assert not np.allclose(behind.loss, plain.loss)  # the context changes the likelihoods
    # a prefix cut away entirely (no room in the context) is the plain pass, log-prob for log-prob
    none = compute_stats(model, tokenizer, records, prefix=prefix, context=1, **kwargs)
    np.testing.assert_allclose(none.logp, plain.logp, rtol=1e-5, atol=1e-6)


def _view(small_model_path, *, public=20, batch_size=3):
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    with torch.no_grad():  # a visible adapter: the view is not the base model
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.02)
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, max_length=128, batch_size=batch_size,
                            public=generate_records(public, seed=0, purpose="attacker-public", private=False))
    return Target(model=model, tokenizer=tokenizer, observer="global", round=1, max_length=128, env=env)


def test_the_prefix_cache_gives_the_whole_prefixed_pass(small_model_path):
    """Records scored behind the prefix's key/value cache (the prefix run once) get the statistics the
    prefixed sequences run whole give, on a LoRA view with padded batches; where the cache would not be
    exact (a prefix cut by the context, an attention window shorter than prefix and record) the sequences
    run whole."""
    target = _view(small_model_path)
    records = generate_records(7, seed=3, purpose="cache", private=True)
    prefix = prefix_ids(target, records, shots(target, 4, "recall"), "recall")
    kwargs = dict(max_length=128, response_only=False, batch_size=3, prefix=prefix)
    examples = encode(records, target.tokenizer, max_length=128, response_only=False)
    lengths = sorted((len(e.input_ids) for e in examples), reverse=True)
    assert any(len(set(lengths[i:i + 3])) > 1 for i in range(0, len(lengths), 3))  # a batch carries padding
    assert prefix_cache(target.model, prefix, examples, context=None) is not None
    cached = compute_stats(target.model, target.tokenizer, records, **kwargs)
    whole = compute_stats(target.model, target.tokenizer, records, _reuse_prefix=False, **kwargs)
    np.testing.assert_array_equal(cached.mask, whole.mask)
    np.testing.assert_array_equal(cached.ids, whole.ids)
    for name in ("logp", "mu", "sigma"):  # measured: at most 8e-6 relative (logp), 3e-6 (mu), 1e-6 (sigma)
        np.testing.assert_allclose(getattr(cached, name), getattr(whole, name), rtol=1e-4, atol=1e-6, err_msg=name)
    plain = compute_stats(target.model, target.tokenizer, records, max_length=128, response_only=False, batch_size=3)
    assert not np.allclose(cached.loss, plain.loss)  # the prefix was seen
    longest = max(lengths)
    assert prefix_cache(target.model, prefix, examples, context=len(prefix) + longest) is not None
    assert prefix_cache(target.model, prefix, examples, context=len(prefix) + longest - 1) is None  # one cut
    config = target.model.get_base_model().config
    config.sliding_window = len(prefix) + longest - 1
    try:
        assert prefix_cache(target.model, prefix, examples, context=None) is None
    finally:
        del config.sliding_window


def test_passes_are_shared_and_counted(small_model_path):
    target = _view(small_model_path)
    calls = []
    target.model.register_forward_pre_hook(lambda *_: calls.append(1))  # scoring passes (generation bypasses it)
    records = generate_records(6, seed=2, purpose="share", private=True)
    batches = math.ceil(len(records) / target.env.batch_size)
    ATTACKS.get("loss")().score(target, records)
    assert len(calls) == batches
    recall = ATTACKS.get("recall")(num_shots=2).score(target, records)
    # the prefixed pass: the prefix once (its key/value cache), then the records behind it; LL(x) is LOSS's pass
    assert len(calls) == 2 * batches + 1
    assert np.array_equal(ATTACKS.get("recall")(num_shots=2).score(target, records), recall)
    ATTACKS.get("con_recall")(num_shots=2, max_new_tokens=8).score(target, records)
    assert len(calls) == 3 * batches + 2  # the member-prefixed pass; the non-member one is recall's
    ATTACKS.get("con_recall")(num_shots=2, max_new_tokens=8, gamma=1.0).score(target, records)
    dc = ATTACKS.get("dc_pdd")().score(target, records)
    assert len(calls) == 3 * batches + 2  # another gamma and DC-PDD: no pass; the answers are cached too
    assert np.isfinite(recall).all() and np.isfinite(dc).all()
    assert ATTACKS.get("recall")(num_shots=1).score(target, records).shape == (6,)
    assert len(calls) == 4 * batches + 3  # another prefix, another pass


def test_shots_come_from_the_public_pool_nest_and_fit_the_positions(small_model_path):
    target = _view(small_model_path)
    four, two = shots(target, 4, "recall"), shots(target, 2, "recall")
    assert two == four[:2] and all(r in target.env.public for r in four)
    records = generate_records(3, seed=0, purpose="fit", private=True)
    full = prefix_ids(target, records, four, "recall")
    longest = max(len(e.input_ids) for e in encode(records, target.tokenizer, max_length=128))
    target.model.config.max_position_embeddings = longest + len(full) - 1  # one token short of all four
    fitted = prefix_ids(target, records, four, "recall")
    assert 0 < len(fitted) < len(full) and full[:len(fitted)] == fitted  # whole shots dropped from the end


def test_dc_pdd_counts_the_public_pool_once_per_run(small_model_path):
    target = _view(small_model_path)
    counts = token_counts(target, 2000)
    scored = sum(sum(t != IGNORE for t in e.labels[1:])
                 for e in encode(target.env.public, target.tokenizer, max_length=128))
    assert counts.sum() == scored and counts.shape == (2000,)
    assert token_counts(target, 2000) is counts  # cached in env.cache


@pytest.mark.parametrize("name, params, message", [
    ("recall", {"num_shots": 0}, "attack recall: num_shots = 0"),
    ("con_recall", {"gamma": -0.1}, "attack con_recall: gamma = -0.1"),
    ("con_recall", {"max_new_tokens": 0}, "attack con_recall: max_new_tokens = 0"),
    ("dc_pdd", {"a": 0}, "attack dc_pdd: a = 0"),
    ("dc_pdd", {"a": "big"}, "attack dc_pdd: a = 'big'"),
])
def test_bad_parameters_name_the_attack_and_field(name, params, message):
    with pytest.raises(FedleakError, match=message):
        ATTACKS.get(name)(**params)


def test_a_missing_public_pool_is_refused(small_model_path):
    target = _view(small_model_path, public=2)
    records = generate_records(2, seed=0, purpose="r", private=True)
    with pytest.raises(FedleakError, match="attack recall: num_shots = 8 but the attacker's public pool holds 2"):
        ATTACKS.get("recall")().score(target, records)
    target.env.public = []
    with pytest.raises(FedleakError, match="attack dc_pdd: the attacker's public pool is empty"):
        ATTACKS.get("dc_pdd")().score(target, records)
    target.env = None
    with pytest.raises(FedleakError, match="attack con_recall: the target has no AttackEnvironment"):
        ATTACKS.get("con_recall")().score(target, records)


FRONTIER_ATTACKS = ", ".join(f'{{ name = "{name}", observers = ["global", "upload"] }}'
                             for name in ("recall", "con_recall", "dc_pdd"))


def test_each_beats_chance_and_its_blind_baseline_on_fedit(frontier):
    """FEDIT without defense, round 3, the global view and each client's upload, default parameters.

    Measured (AUC global / uploads 0, 1, 2; LOSS 0.64 / 0.82, 0.68, 0.75): recall 0.59 / 0.74, 0.62, 0.69
    (blind mean 0.48), con_recall 0.57 / 0.72, 0.60, 0.69 (blind 0.47), dc_pdd 0.62 / 0.77, 0.72, 0.78
    (blind 0.50). With 21 members an upload's interval is about +-0.17 wide, so the views are pooled: the
    mean AUC, its margin over the blind baseline's mean, and the best view's interval."""
    cells = frontier.cells(FRONTIER_ATTACKS, defenses='["none"]')
    by = {(c["attack_name"], c["observer"], c["client"]): c["metrics"] for c in cells if c["round"] == 3}
    views = [("global", None)] + [("upload", i) for i in range(3)]
    for name in ("recall", "con_recall", "dc_pdd"):
        metrics = [by[(name, *view)] for view in views]
        auc = np.mean([m["auc"] for m in metrics])
        blind = np.mean([m["blind_auc"] for m in metrics])
        assert auc > 0.6 and auc - blind > 0.1, (name, [m["auc"] for m in metrics], blind)
        assert max(m["auc_low"] for m in metrics) > 0.5, (name, [m["auc_low"] for m in metrics])
