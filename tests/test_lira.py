import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Target
from fedleak.attacks.membership import lira
from fedleak.attacks.membership.lira import LiRAAttack, balanced_membership, lira_scores
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import generate_records
from fedleak.common.errors import FedleakError
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, encode, train_adapter

# One thread: tiny matrices gain little from a second, and lose a lot when another process holds the other core.
pytestmark = pytest.mark.usefixtures("one_thread")

# Hand-made shadow statistics: 4 shadows x 3 records, each record IN for 2 shadows.
STATS = np.array([[-2.0, -3.1, -1.0],
                  [-2.6, -2.2, -1.9],
                  [-1.5, -2.9, -1.2],
                  [-2.8, -2.0, -2.1]])
IN = np.array([[1, 0, 1],
               [0, 1, 0],
               [1, 0, 1],
               [0, 1, 0]], dtype=bool)
OBS = np.array([-1.6, -2.5, -2.3])


def _by_hand(side_mask, *, pooled, mask=IN, stats=STATS):
    """Per-record (mean, std) of one side, written out record by record."""
    values = [[stats[s, i] for s in range(len(stats)) if side_mask[s, i]] for i in range(stats.shape[1])]
    means = [sum(v) / len(v) for v in values]
    if pooled:
        ss = sum((x - m) ** 2 for v, m in zip(values, means) for x in v)
        dof = sum(len(v) - 1 for v in values)
        return np.array(means), np.full(len(values), np.sqrt(ss / dof))
    return np.array(means), np.array([np.std(v, ddof=1) for v in values])


@pytest.mark.parametrize("pooled", [True, False])
def test_online_score_is_the_gaussian_likelihood_ratio(pooled):
    mu_in, sd_in = _by_hand(IN, pooled=pooled)
    mu_out, sd_out = _by_hand(~IN, pooled=pooled)
    expected = norm.logpdf(OBS, mu_in, sd_in) - norm.logpdf(OBS, mu_out, sd_out)
    got = lira_scores(OBS, STATS, IN, variant="online", global_variance=pooled)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    if pooled:  # one variance per side for every record, not per record
        _, sd_in_rec = _by_hand(IN, pooled=False)
        assert not np.allclose(got, norm.logpdf(OBS, mu_in, sd_in_rec) - norm.logpdf(OBS, mu_out, sd_out))


@pytest.mark.parametrize("pooled", [True, False])
def test_offline_score_is_the_one_sided_out_tail(pooled):
    mu_out, sd_out = _by_hand(~IN, pooled=pooled)
    expected = norm.logcdf((OBS - mu_out) / sd_out)
    np.testing.assert_allclose(lira_scores(OBS, STATS, IN, variant="offline", global_variance=pooled), expected,
                               rtol=1e-10)
    # Only OUT shadows count: changing IN statistics leaves offline scores as they are.
    moved = np.where(IN, STATS + 5.0, STATS)
    np.testing.assert_allclose(lira_scores(OBS, moved, IN, variant="offline", global_variance=pooled), expected,
                               rtol=1e-10)
    # Higher above the OUT distribution = higher score.
    assert lira_scores(OBS + 0.5, STATS, IN, variant="offline")[0] > lira_scores(OBS, STATS, IN, variant="offline")[0]


def test_two_shadows_pool_the_spread_of_all_records():
    stats, mask = STATS[:2], IN[:2]  # one IN and one OUT observation per record
    expected = (norm.logpdf(OBS, stats[0] * mask[0] + stats[1] * mask[1], np.std(stats[mask], ddof=1))
                - norm.logpdf(OBS, stats[0] * ~mask[0] + stats[1] * ~mask[1], np.std(stats[~mask], ddof=1)))
    np.testing.assert_allclose(lira_scores(OBS, stats, mask), expected, rtol=1e-10)
    with pytest.raises(FedleakError, match="shadow_models"):
        lira_scores(OBS, stats, mask, global_variance=False)


@pytest.mark.parametrize("variant", ["online", "offline"])
def test_a_record_scores_the_same_whoever_is_scored_with_it(variant):
    full = lira_scores(OBS, STATS, IN, variant=variant)
    part = lira_scores(OBS[[2, 0]], STATS, IN, variant=variant, columns=[2, 0])
    np.testing.assert_allclose(part, full[[2, 0]], rtol=1e-12)  # the pooled variance uses every record


@pytest.mark.parametrize("shadows", [2, 3, 4, 8])
@pytest.mark.parametrize("records", [7, 30])
def test_each_record_is_in_for_half_of_the_shadows(shadows, records):
    mask = balanced_membership(records, shadows, np.random.default_rng(0))
    assert mask.shape == (shadows, records)
    per_record = mask.sum(0)
    if shadows % 2 == 0:
        assert (per_record == shadows // 2).all()
    else:
        assert set(per_record) <= {shadows // 2, shadows // 2 + 1}
    assert set(mask.sum(1)) <= {records // 2, (records + 1) // 2}  # every shadow trains on half
    assert len({tuple(col) for col in mask.T}) > 1  # random: records differ in which shadows hold them
    np.testing.assert_array_equal(mask, balanced_membership(records, shadows, np.random.default_rng(0)))


@pytest.mark.parametrize("kwargs, param", [
    ({"shadow_models": 1}, "shadow_models"),
    ({"shadow_models": 3}, "shadow_models"),  # odd: online needs each record IN for exactly half
    ({"shadow_models": "4"}, "shadow_models"),
    ({"shadow_models": 2, "global_variance": False}, "shadow_models"),
    ({"variant": "both"}, "variant"),
    ({"epochs": 0}, "epochs"),
    ({"global_variance": "yes"}, "global_variance"),
])
def test_bad_params_are_refused(kwargs, param):
    with pytest.raises(FedleakError, match=rf"^attack lira: {param} = .*(: must be|, expected)"):
        LiRAAttack(**kwargs)


def test_registered_and_valid_params_accepted():
    assert ATTACKS.get("lira") is LiRAAttack
    assert LiRAAttack(shadow_models=3, variant="offline").params() == {
        "shadow_models": 3, "variant": "offline", "global_variance": True, "epochs": None}


# End to end on the small model: a target LoRA trained on half of a small population.
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
    return model, tokenizer, population, members, str(small_model_path)


def _env(trained, seed=3, **changes):
    _, tokenizer, population, _, path = trained
    fields = {"tokenizer": tokenizer, "seed": seed, "max_length": MAX_LENGTH, "population": population,
              "base_model_ref": path, "adapter": LORA, "train": TRAIN}
    return AttackEnvironment(**{**fields, **changes})


def _target(trained, env, observer="global"):
    return Target(model=trained[0], tokenizer=trained[1], observer=observer, round=1, max_length=MAX_LENGTH, env=env)


def test_lira_beats_chance_and_loss_and_reuses_its_shadows(trained, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return train_adapter(*args, **kwargs)

    monkeypatch.setattr(lira, "train_adapter", counting)
    _, _, population, members, _ = trained
    env = _env(trained)
    target = _target(trained, env)
    model = trained[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = LiRAAttack().score(target, population)
    # The shadows trained as adapters on the target's own base weights (no second copy), then went:
    # the target's adapters, weights and active set are as they were.
    assert set(model.peft_config) == {"default"} and model.active_adapters == ["default"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(calls) == 4 and scores.shape == (len(population),) and np.isfinite(scores).all()
    auc = {"lira": roc_auc_score(members, scores), "loss": roc_auc_score(members, ATTACKS.get("loss")().score(
        target, population))}
    # Another view of the run and the offline variant reuse the shadows: no new fine-tune.
    other = _target(trained, env, observer="upload")
    np.testing.assert_array_equal(LiRAAttack().score(other, population), scores)
    auc["lira_offline"] = roc_auc_score(members, LiRAAttack(variant="offline").score(other, population))
    subset = population[::3]
    np.testing.assert_array_equal(LiRAAttack().score(other, subset), scores[::3])  # statistics per record
    assert len(calls) == 4
    print("AUC", {k: round(v, 3) for k, v in auc.items()},
          "seconds per shadow", [round(s, 2) for s in next(v for v in env.cache.values()
                                                          if isinstance(v, lira.ShadowStatistics)).seconds])
    assert auc["lira"] > 0.8 and auc["lira"] >= auc["loss"] - 0.05
    assert auc["lira_offline"] > 0.65


def test_same_seed_same_scores(trained):
    population = trained[2]
    quick = {"shadow_models": 2, "epochs": 1}
    a = LiRAAttack(**quick).score(_target(trained, _env(trained, seed=11)), population)
    b = LiRAAttack(**quick).score(_target(trained, _env(trained, seed=11)), population)
    c = LiRAAttack(**quick).score(_target(trained, _env(trained, seed=12)), population)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_records_outside_the_population_are_refused(trained):
    population = trained[2]
    env = _env(trained, population=population[:20])
    attack = LiRAAttack()
    with pytest.raises(FedleakError, match="not in the attack population.*lira-test-00025"):
        attack.score(_target(trained, env), population[25:])
    changed = dataclasses.replace(population[0], output=population[0].output + " extra")
    with pytest.raises(FedleakError, match="not in the attack population"):
        attack.score(_target(trained, env), [changed])
    with pytest.raises(FedleakError, match="lacks base_model_ref"):
        attack.score(_target(trained, _env(trained, base_model_ref="")), population)
    with pytest.raises(FedleakError, match="no attack environment"):
        attack.score(Target(model=trained[0], tokenizer=trained[1], observer="global", round=1), population)
    assert not env.cache  # refused before any shadow was trained


def test_shadows_kept_on_disk_serve_another_process_and_a_new_key_retrains(trained, tmp_path, monkeypatch):
    """With env.cache_dir the shadow statistics outlive the process (a fresh environment, as a Ray task on
    another node has, reads them back bit for bit); another salt (model, data or code) trains anew, and a
    damaged file is trained over."""
    population = trained[2]
    quick = {"shadow_models": 2, "epochs": 1}
    first = LiRAAttack(**quick).score(_target(trained, _env(trained, cache_dir=tmp_path, cache_salt="a")), population)
    files = list(tmp_path.glob("lira-shadows-*.safetensors"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(lira, "train_adapter", lambda *a, **k: calls.append(1))
    again = LiRAAttack(**quick).score(_target(trained, _env(trained, cache_dir=tmp_path, cache_salt="a")), population)
    np.testing.assert_array_equal(again, first)
    assert calls == []  # read from disk, no fine-tune
    LiRAAttack(**quick).score(_target(trained, _env(trained, cache_dir=tmp_path, cache_salt="b")), population)
    assert len(calls) == 2 and len(list(tmp_path.glob("lira-shadows-*.safetensors"))) == 2
    files[0].write_bytes(b"not a safetensors file")
    LiRAAttack(**quick).score(_target(trained, _env(trained, cache_dir=tmp_path, cache_salt="a")), population)
    assert len(calls) == 4
