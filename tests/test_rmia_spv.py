"""RMIA (over LiRA's shadows) and SPV-MIA's self-prompt reference: the formulas by hand, the shadows reused
without training, the reference pipeline on a tiny model, parameter errors, and both attacks end to end."""

import numpy as np
import pytest
import torch

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Target
from fedleak.attacks.membership import lira, spv_mia
from fedleak.attacks.membership.lira import LiRAAttack
from fedleak.attacks.membership.rmia import RMIAAttack, reference_log_likelihood, rmia_scores
from fedleak.attacks.membership.spv_mia import SPVMIAAttack, self_generated_records, view_fingerprint
from fedleak.attacks.membership.stats import compute_stats
from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import generate_records
from fedleak.federated.generation import Generation
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, encode, train_adapter

# One thread: tiny matrices gain little from a second, and lose a lot when another process holds the other core.
pytestmark = pytest.mark.usefixtures("one_thread")

# Hand-made shadow statistics (mean token log-probs): 4 shadows x 5 population records, each IN for 2.
STATS = np.array([[-2.0, -3.1, -1.0, -2.5, -1.7],
                  [-2.6, -2.2, -1.9, -2.4, -1.2],
                  [-1.5, -2.9, -1.2, -2.0, -1.6],
                  [-2.8, -2.0, -2.1, -2.2, -1.1]])
IN = np.array([[1, 0, 1, 0, 1],
               [0, 1, 0, 1, 0],
               [1, 0, 1, 1, 0],
               [0, 1, 0, 0, 1]], dtype=bool)
OBS = np.array([-1.6, -2.5, -2.3, -1.9, -1.0])  # the target's statistic of each population record


def _by_hand(obs, *, online, a=0.3, gamma=1.0, columns=range(5)):
    """RMIA written out record by record in probabilities, not logs: p(x) averaged over the reference
    models, LR(x, z) as the paper's ratio of ratios, the count over z != x."""
    p_target = np.exp(obs)
    p_ref = []
    for i in range(STATS.shape[1]):
        if online:
            p_ref.append(sum(np.exp(STATS[s, i]) for s in range(len(STATS))) / len(STATS))
        else:
            out = [np.exp(STATS[s, i]) for s in range(len(STATS)) if not IN[s, i]]
            p_ref.append((1 + a) / 2 * (sum(out) / len(out)) + (1 - a) / 2)
    scores = []
    for x in columns:
        wins = [(p_target[x] / p_ref[x]) / (p_target[z] / p_ref[z]) >= gamma for z in range(len(obs)) if z != x]
        scores.append(sum(wins) / len(wins))
    return np.array(scores)


@pytest.mark.parametrize("gamma", [1.0, 0.8, 1.3])
def test_online_rmia_is_the_share_of_population_records_it_beats(gamma):
    got = rmia_scores(OBS, STATS, IN, columns=np.arange(5), variant="online", gamma=gamma)
    np.testing.assert_array_equal(got, _by_hand(OBS, online=True, gamma=gamma))
    assert len(set(got)) > 2  # the hand case is not degenerate
    if gamma != 1.0:  # the threshold matters
        assert not np.array_equal(got, rmia_scores(OBS, STATS, IN, columns=np.arange(5), variant="online"))


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_offline_rmia_uses_out_shadows_with_the_linear_correction(a):
    got = rmia_scores(OBS, STATS, IN, columns=np.arange(5), variant="offline", offline_a=a)
    np.testing.assert_array_equal(got, _by_hand(OBS, online=False, a=a))
    p_out = np.array([np.exp(STATS[~IN[:, i], i]).mean() for i in range(5)])
    np.testing.assert_allclose(reference_log_likelihood(STATS, IN, variant="offline", offline_a=a),
                               np.log((1 + a) / 2 * p_out + (1 - a) / 2), rtol=1e-12)
    moved = np.where(IN, STATS + 3.0, STATS)  # IN statistics: offline ignores them, online does not
    np.testing.assert_array_equal(
        rmia_scores(OBS, moved, IN, columns=np.arange(5), variant="offline", offline_a=a), got)
    assert not np.array_equal(rmia_scores(OBS, moved, IN, columns=np.arange(5)), rmia_scores(OBS, STATS, IN,
                                                                                               columns=np.arange(5)))


def test_each_record_leaves_itself_out_of_z_and_ties_count():
    # Equal statistics everywhere: every LR is exactly 1 >= gamma = 1, so every z counts, but not x itself
    # (which would be z = x); with gamma above 1 none counts.
    flat_stats, flat_obs = np.full_like(STATS, -2.0), np.full(5, -1.0)
    np.testing.assert_array_equal(rmia_scores(flat_obs, flat_stats, IN, columns=np.arange(5)), np.ones(5))
    np.testing.assert_array_equal(rmia_scores(flat_obs, flat_stats, IN, columns=np.arange(5), gamma=1.01), np.zeros(5))
    # The record with the lowest ratio beats nobody: 0, not 1/5 (itself) or 1/4.
    full = rmia_scores(OBS, STATS, IN, columns=np.arange(5))
    assert full.min() == 0.0 and set(full * 4) <= {0, 1, 2, 3, 4}
    # A record scores the same whoever is scored with it; Z stays the whole population.
    np.testing.assert_array_equal(rmia_scores(OBS, STATS, IN, columns=np.array([3, 0])), full[[3, 0]])
    np.testing.assert_array_equal(full[[3, 0]], _by_hand(OBS, online=True, columns=[3, 0]))


@pytest.mark.parametrize("params, field", [
    ({"shadow_models": 1}, "shadow_models"),
    ({"gamma": 0}, "gamma"),
    ({"offline_a": 1.5}, "offline_a"),
    ({"offline_a": -0.1}, "offline_a"),
    ({"variant": "both"}, "variant"),
    ({"epochs": 0}, "epochs"),
])
def test_bad_rmia_params_are_refused(params, field):
    with pytest.raises(FedleakError, match=rf"^attack rmia: {field} = "):
        RMIAAttack(**params)


@pytest.mark.parametrize("params, field", [
    ({"prompts": 0}, "prompts"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0}, "temperature"),
    ({"prefix_tokens": -1}, "prefix_tokens"),
    ({"epochs": 0}, "epochs"),
])
def test_bad_spv_params_are_refused(params, field):
    with pytest.raises(FedleakError, match=rf"^attack spv_mia: {field} = "):
        SPVMIAAttack(**params)


def test_registered_with_their_params():
    assert ATTACKS.get("rmia") is RMIAAttack and ATTACKS.get("spv_mia") is SPVMIAAttack
    assert RMIAAttack().params() == {"shadow_models": 4, "variant": "online", "gamma": 1.0, "offline_a": 0.3,
                                     "epochs": None}
    assert SPVMIAAttack().params() == {"prompts": 64, "max_new_tokens": 64, "epochs": 2, "temperature": 1.0,
                                       "prefix_tokens": 0}


# A tiny setting: the small embedded model, a LoRA trained on half of 32 records.
LORA = LoraSettings(r=8, alpha=16)
TRAIN = TrainSettings(epochs=8, batch_size=4, lr=3e-3)
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def trained(small_model_path):
    population = generate_records(32, seed=0, purpose="lira-test", private=True)
    members = np.zeros(len(population), dtype=bool)
    members[np.random.default_rng(1).permutation(len(population))[: len(population) // 2]] = True
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LORA, seed=7)
    train_adapter(model, encode([r for r, m in zip(population, members) if m], tokenizer, max_length=MAX_LENGTH),
                  TRAIN, pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    public = generate_records(12, seed=0, purpose="spv-test-public", private=False)
    return model, tokenizer, population, members, str(small_model_path), public


def _env(trained, seed=3, **changes):
    _, tokenizer, population, _, path, public = trained
    fields = {"tokenizer": tokenizer, "seed": seed, "max_length": MAX_LENGTH, "population": population,
              "base_model_ref": path, "adapter": LORA, "train": TRAIN, "public": public}
    return AttackEnvironment(**{**fields, **changes})


def _target(trained, env, cache=None):
    return Target(model=trained[0], tokenizer=trained[1], observer="global", round=1, max_length=MAX_LENGTH, env=env,
                  cache={} if cache is None else cache)


def test_rmia_reads_lira_shadows_and_trains_none(trained, tmp_path, monkeypatch):
    """Same shadow settings: RMIA reads the shadows LiRA left in env.cache, or on disk for a fresh process,
    and fine-tunes nothing; other settings are other shadows (trained, not silently mixed up)."""
    population = trained[2]
    quick = {"shadow_models": 2, "epochs": 1}
    env = _env(trained, cache_dir=tmp_path, cache_salt="s")
    LiRAAttack(**quick).score(_target(trained, env), population)
    assert len(list(tmp_path.glob("lira-shadows-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a shadow was trained")

    monkeypatch.setattr(lira, "train_adapter", refuse)
    online = RMIAAttack(**quick).score(_target(trained, env), population)
    fresh = _env(trained, cache_dir=tmp_path, cache_salt="s")  # another process: only the disk cache
    np.testing.assert_array_equal(RMIAAttack(**quick).score(_target(trained, fresh), population), online)
    offline = RMIAAttack(**quick, variant="offline").score(_target(trained, fresh), population)
    assert online.shape == offline.shape == (len(population),) and ((0 <= online) & (online <= 1)).all()
    # The scores are the formula over those shadows and the target's pass over the population.
    shadows = next(v for v in fresh.cache.values() if isinstance(v, lira.ShadowStatistics))
    obs = -compute_stats(trained[0], trained[1], population, max_length=MAX_LENGTH, response_only=True,
                         batch_size=32).loss
    np.testing.assert_allclose(online, rmia_scores(obs, shadows.stats, shadows.in_mask, columns=np.arange(32)))
    with pytest.raises(AssertionError, match="a shadow was trained"):
        RMIAAttack(shadow_models=2, epochs=2).score(_target(trained, fresh), population)
    assert len(list(tmp_path.glob("lira-shadows-*.safetensors"))) == 1


def test_rmia_refuses_records_outside_the_population(trained):
    population = trained[2]
    env = _env(trained, population=population[:20])
    with pytest.raises(FedleakError, match="attack rmia: 12 scored records are not in the attack population"):
        RMIAAttack().score(_target(trained, env), population)
    with pytest.raises(FedleakError, match="attack rmia: the target has no attack environment"):
        RMIAAttack().score(Target(model=trained[0], tokenizer=trained[1], observer="global", round=1), population)
    assert not env.cache  # refused before any shadow was trained


def _fake_generate(answers):
    """A stand-in for the view's sampler: answers in turn, recording the prompts it was given."""
    seen = []

    def fake(model, tokenizer, prompts, **kwargs):
        seen.extend(list(p) for p in prompts)
        return [Generation(text="", finished=True, ids=tuple(answers[i % len(answers)])) for i in range(len(prompts))]

    return fake, seen


def test_self_prompts_cycle_the_public_pool_and_keep_the_answer_prefix(trained, monkeypatch):
    from fedleak.federated.prompts import prompt_ids

    _, tokenizer, _, _, _, public = trained
    answer = tokenizer("the patient should rest", add_special_tokens=False)["input_ids"]
    fake, seen = _fake_generate([answer, []])  # every second answer is empty: dropped
    monkeypatch.setattr(spv_mia, "generate", fake)
    records = self_generated_records(None, tokenizer, public, count=30, prefix_tokens=3, max_new_tokens=8,
                                     temperature=1.0, batch_size=8, seed=5)
    assert len(seen) == 30 and len(records) == 15
    prompts = spv_mia.self_prompts(public, tokenizer, count=30, prefix_tokens=3, seed=5)
    for i, (source, prompt, prefix) in enumerate(prompts):
        assert prefix == tokenizer(source.output, add_special_tokens=False)["input_ids"][:3]
        assert seen[i] == prompt_ids(tokenizer, source.instruction, source.input) + prefix == prompt + prefix
        if i % 2 == 0:  # answered: the record is the prompt's, its answer the prefix and the continuation
            record = records[i // 2]
            assert (record.instruction, record.input) == (source.instruction, source.input)
            assert record.output == tokenizer.decode(prefix + answer, skip_special_tokens=True).strip()
    # 30 prompts from a pool of 12: each record used 2 or 3 times.
    used = [source.record_id for source, _, _ in prompts]
    assert {used.count(u) for u in set(used)} == {2, 3} and len(set(used)) == 12
    again, _ = _fake_generate([answer])
    monkeypatch.setattr(spv_mia, "generate", again)
    assert [r.instruction for r in records] == [r.instruction for r in self_generated_records(
        None, tokenizer, public, count=30, prefix_tokens=3, max_new_tokens=8, temperature=1.0, batch_size=8,
        seed=5)][::2]  # seeded: the same order


def test_spv_reference_pipeline_on_a_tiny_model(trained, monkeypatch):
    model, tokenizer, population, _, _, _ = trained
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return train_adapter(*args, **kwargs)

    monkeypatch.setattr(spv_mia, "train_adapter", counting)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quick = {"prompts": 8, "max_new_tokens": 16, "epochs": 2}
    env = _env(trained)
    view = _target(trained, env)
    scores = SPVMIAAttack(**quick).score(view, population)
    assert len(calls) == 1 and 0 < calls[0] <= 8 and scores.shape == (32,) and np.isfinite(scores).all()
    # The reference went: the view's adapters, weights and active set are as they were.
    assert set(model.peft_config) == {"default"} and model.active_adapters == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Score = NLL_reference - NLL_target, the reference being the cached adapter on the base weights.
    state = next(iter(view.cache[("spv-mia", "adapter")].values()))
    with spv_mia.reference_adapter(model, env, seed=0, state=state):
        reference = compute_stats(model, tokenizer, population, max_length=MAX_LENGTH, response_only=True,
                                  batch_size=32)
    target = compute_stats(model, tokenizer, population, max_length=MAX_LENGTH, response_only=True, batch_size=32)
    np.testing.assert_allclose(scores, reference.loss - target.loss, rtol=1e-6, atol=1e-9)
    # Another record set of the view, and another view loading the same adapter, train nothing.
    np.testing.assert_allclose(SPVMIAAttack(**quick).score(view, population[::3]), scores[::3], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(SPVMIAAttack(**quick).score(_target(trained, env), population), scores)
    assert len(calls) == 1
    # The base model (the blind baseline's view, adapters off) is another model: its own reference, after
    # which the adapters are still off inside the context and on after it.
    with model.disable_adapter():
        blind = SPVMIAAttack(**quick).score(_target(trained, env), population)
        assert model._adapters_disabled and view_fingerprint(model) == spv_mia.ADAPTERS_OFF
    assert len(calls) == 2 and not np.array_equal(blind, scores) and not model._adapters_disabled
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Seeded: a fresh run agrees to the bit; another seed samples other self-prompts.
    np.testing.assert_array_equal(SPVMIAAttack(**quick).score(_target(trained, _env(trained)), population), scores)
    assert not np.array_equal(SPVMIAAttack(**quick).score(_target(trained, _env(trained, seed=4)), population), scores)


def test_spv_refuses_what_it_cannot_use(trained, monkeypatch):
    model, tokenizer, population, _, _, _ = trained
    with pytest.raises(FedleakError, match="attack spv_mia: the attack environment lacks public"):
        SPVMIAAttack().score(_target(trained, _env(trained, public=[])), population)
    with pytest.raises(FedleakError, match="attack spv_mia: the target has no attack environment"):
        SPVMIAAttack().score(Target(model=model, tokenizer=tokenizer, observer="global", round=1), population)
    plain = Target(model=model.get_base_model(), tokenizer=tokenizer, observer="global", round=1, env=_env(trained))
    with pytest.raises(FedleakError, match="attack spv_mia: the target is not a peft model"):
        SPVMIAAttack().score(plain, population)
    fake, _ = _fake_generate([[]])
    monkeypatch.setattr(spv_mia, "generate", fake)
    with pytest.raises(FedleakError, match="answered all 4 self-prompts with empty text"):
        SPVMIAAttack(prompts=4).score(_target(trained, _env(trained)), population)
    assert set(model.peft_config) == {"default"}


def test_rmia_and_spv_beat_chance_on_fedit(frontier):
    """FEDIT without defense, round 3: the global view and each client's upload (21 or fewer members a side:
    wide intervals). Measured (transformers 5.24): RMIA (2 shadows of 2 epochs) global 0.78 [0.70, 0.87], uploads
    1.00, 0.84, 0.94 (each interval above 0.65); SPV global 0.60 [0.51, 0.68] (blind 0.55), uploads 0.77, 0.69,
    0.79 (blind 0.70, 0.51, 0.50). With transformers 5.23 SPV's upload/0 was 0.86: one upload's AUC moves by
    0.1 with the library's float order, so SPV's claim is tested on the three uploads together."""
    cells = frontier.cells(FRONTIER_ATTACKS, defenses='["none"]')
    by = {(c["attack_name"], c["observer"], c["client"]): c["metrics"] for c in cells if c["round"] == 3}
    views = [("global", None)] + [("upload", i) for i in range(3)]
    for view in views:
        rmia = by[("rmia", *view)]
        assert rmia["auc_low"] > 0.55, (view, rmia["auc"], rmia["auc_low"])
    spv = by[("spv_mia", "global", None)]
    assert spv["auc"] > 0.55 and spv["auc"] > spv["blind_auc"], (spv["auc"], spv["blind_auc"])
    # SPV over its blind baseline, the uploads' mean gap against its standard error (each AUC's 95% interval
    # read as +-1.96 se; target and blind scores share records, so treating them as independent overstates it).
    gaps, variances = [], []
    for view in views[1:]:
        m = by[("spv_mia", *view)]
        assert m["auc"] > 0.6, (view, m["auc"])
        gaps.append(m["auc"] - m["blind_auc"])
        variances += [((m[f"{k}_high"] - m[f"{k}_low"]) / 3.92) ** 2 for k in ("auc", "blind_auc")]
    z = np.mean(gaps) / (np.sqrt(np.sum(variances)) / len(gaps))
    assert z > 2, (gaps, z)


FRONTIER_ATTACKS = ('{ name = "rmia", shadow_models = 2, epochs = 2, observers = ["global", "upload"] }, '
                    '{ name = "spv_mia", observers = ["global", "upload"] }')
