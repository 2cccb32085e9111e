"""DP-SGD's privacy budget: sigma is solved for the sample rate and steps Opacus accounts, planned
jointly over every DP training a client runs each round, and the spent epsilon never exceeds the
target (or the run says so)."""

import logging

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedleak.common.errors import FedleakError
from fedleak.defenses.dp_sgd import DPSGD, MAX_SIGMA, accounted_rate, epsilon_of, solve_noise
from fedleak.eval.training_runs import _privacy
from fedleak.federated.adapters import DEFAULT, LoraSettings, add_peft_adapter
from fedleak.federated.data import generate_records
from fedleak.federated.hooks import ClientJob
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, encode
from fedleak.reports.document import epsilon_text, fmt

DELTA = 1e-5


@pytest.fixture(scope="module")
def lora(small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8), seed=0)
    examples = encode(generate_records(186, seed=0, purpose="dp-budget", private=True), tokenizer, max_length=64)
    return model, tokenizer, examples


def _train(defense, lora, records, *, round, rounds, batch, epochs=1, client=0, adapter=DEFAULT, plan=()):
    model, tokenizer, examples = lora
    job = ClientJob(client=client, round=round, model=model, examples=examples[:records],
                    settings=TrainSettings(epochs=epochs, batch_size=batch, lr=1e-3), pad_id=tokenizer.pad_token_id,
                    generator=torch.Generator().manual_seed(round), adapter=adapter, planned_rounds=rounds, plan=plan)
    torch.manual_seed(round)
    return defense.train_client(job), job


@pytest.mark.parametrize("records,batch", [(20, 8), (7, 3), (8, 8), (1, 4), (30, 7), (186, 2)])
def test_accounted_rate_is_what_opacus_samples_and_accounts(records, batch):
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(records)), batch_size=batch))
    assert accounted_rate(records=records, batch_size=batch) == (1 / len(loader), len(loader))  # make_private's q
    # 93 batches planned, 92 drawn (int(1 / (1 / 93))), and the accountant is charged 1/92, not 1/93
    assert accounted_rate(records=186, batch_size=2) == (1 / 92, 92)


def test_epsilon_of_is_the_rdp_accountants():
    accountant = RDPAccountant()
    accountant.history = [(1.1, 1 / 3, 6), (0.9, 0.25, 4), (1.1, 1 / 3, 2)]
    assert epsilon_of(accountant.history, delta=DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)
    assert epsilon_of([], delta=DELTA) == 0.0


def test_solved_noise_lands_on_the_target_from_below():
    planned = ((1 / 3, 12), (0.25, 8))
    sigma = solve_noise(spent=(), planned=planned, target_epsilon=3.0, delta=DELTA)
    spent = epsilon_of([(sigma, q, k) for q, k in planned], delta=DELTA)
    assert 3.0 * (1 - 1e-4) <= spent <= 3.0
    assert epsilon_of([(sigma * 0.999, q, k) for q, k in planned], delta=DELTA) > 3.0  # the smallest such sigma
    # An accountant already over the target: no noise can bring it back.
    assert solve_noise(spent=((0.3, 1.0, 20),), planned=planned, target_epsilon=3.0, delta=DELTA) == MAX_SIGMA


@pytest.mark.parametrize("records,batch,epochs,rounds,target", [
    (6, 4, 1, 2, 8.0), (7, 3, 1, 2, 3.0), (10, 8, 2, 1, 8.0), (12, 5, 1, 3, 1.0), (14, 4, 1, 1, 2.0),
    (186, 2, 1, 1, 8.0)])  # 186 / 2: Opacus draws and accounts 92 batches, not 93
def test_final_epsilon_of_a_real_training_is_the_target(lora, records, batch, epochs, rounds, target):
    defense = DPSGD(target_epsilon=target, delta=DELTA)
    rate, per_epoch = accounted_rate(records=records, batch_size=batch)
    for rnd in range(1, rounds + 1):
        metrics, job = _train(defense, lora, records, round=rnd, rounds=rounds, batch=batch, epochs=epochs)
        assert metrics["sample_rate"] == rate == 1 / per_epoch  # the accounted rate
        assert metrics["steps"] == epochs * per_epoch
    spent = defense.engines[0].get_epsilon(DELTA)
    assert target * 0.99 <= spent <= target
    assert job.privacy["epsilon"] == spent and job.privacy["target_epsilon"] == target
    assert job.privacy["accounting"] == [[metrics["noise_multiplier"], rate, rounds * epochs * per_epoch]]


def test_two_trainings_a_round_share_one_planned_budget(lora):
    # FEDPIT's shape: the global adapter on 4 synthetic records, the local one on 10 real + synthetic.
    plan = ((DEFAULT, 4), ("local", 10))
    defense = DPSGD(target_epsilon=4.0, delta=DELTA)
    sigmas = []
    for rnd in (1, 2):
        for adapter, records in plan:
            metrics, _ = _train(defense, lora, records, round=rnd, rounds=2, batch=4, adapter=adapter, plan=plan)
            sigmas.append(metrics["noise_multiplier"])
    assert len(set(sigmas)) == 1  # on plan: one sigma for every training
    assert 4.0 * 0.99 <= defense.engines[0].get_epsilon(DELTA) <= 4.0
    # Each training planned for the whole target on its own (the old fault) spends it twice over.
    alone = []
    for _, records in plan:
        rate, per_epoch = accounted_rate(records=records, batch_size=4)
        sigma = solve_noise(spent=(), planned=((rate, 2 * per_epoch),), target_epsilon=4.0, delta=DELTA)
        alone.append((sigma, rate, 2 * per_epoch))
    old = epsilon_of(alone, delta=DELTA)
    assert old > 4.0 * 1.2 and sigmas[0] > max(sigma for sigma, _, _ in alone)


@pytest.mark.parametrize("realised", [[(DEFAULT, 3), ("local", 9), (DEFAULT, 8), ("local", 14)],
                                      [(DEFAULT, 8), ("local", 14), ("local", 9)],  # no synthetic record in round 2
                                      [(DEFAULT, 1), ("local", 7), (DEFAULT, 2), ("local", 8)]])
def test_trainings_off_plan_still_spend_the_target_and_never_more(lora, realised):
    plan = ((DEFAULT, 8), ("local", 14))
    defense = DPSGD(target_epsilon=2.0, delta=DELTA)
    for index, (adapter, records) in enumerate(realised):
        rnd = 1 if index < 2 else 2
        _train(defense, lora, records, round=rnd, rounds=2, batch=4, adapter=adapter, plan=plan)
    assert 2.0 * 0.99 <= defense.engines[0].get_epsilon(DELTA) <= 2.0


def test_an_adapter_outside_the_plan_is_refused(lora):
    with pytest.raises(FedleakError, match="list every adapter it trains through ctx.train in training_plan"):
        _train(DPSGD(target_epsilon=2.0), lora, 4, round=1, rounds=1, batch=4, adapter="local", plan=((DEFAULT, 4),))


def test_an_exceeded_target_is_logged_recorded_and_reported(lora, caplog):
    defense = DPSGD(target_epsilon=1.0, delta=DELTA)
    _train(defense, lora, 4, round=1, rounds=1, batch=4)
    defense.engines[0].accountant.history.append((0.5, 1.0, 10))  # charged outside the plan
    with caplog.at_level(logging.WARNING, logger="fedleak"):
        metrics, job = _train(defense, lora, 4, round=1, rounds=1, batch=4)
    assert metrics["noise_multiplier"] == MAX_SIGMA
    assert "client 0 spent epsilon" in caplog.text and "above its target 1" in caplog.text
    privacy = _privacy([{"round": 1, "client_metrics": {"0": metrics}, "client_privacy": {"0": job.privacy}}])
    assert privacy["exceeded_target"] is True and privacy["record_level_epsilon"] > privacy["target_epsilon"] == 1.0
    assert f"record {fmt(privacy['record_level_epsilon'], 2)} EXCEEDS target 1" in epsilon_text(privacy)


def test_privacy_reads_every_clients_accounting_whatever_the_metrics_nesting():
    accounting = {"0": {"epsilon": 1.9, "delta": DELTA, "target_epsilon": 2.0, "accounting": [[1.2, 0.5, 4]]},
                  "10": {"epsilon": 1.99, "delta": DELTA, "target_epsilon": 2.0,
                         "accounting": [[1.3, 0.25, 4], [1.3, 0.5, 2], [1.4, 0.25, 4]]}}
    history = [{"round": 1, "client_metrics": {"0": {"global": {"epsilon": 9.0}}}, "client_privacy": accounting}]
    privacy = _privacy(history, self_generated=True)
    assert privacy["record_level_epsilon"] == 1.99 and privacy["exceeded_target"] is False
    assert privacy["record_level_epsilon_per_client"] == {"0": 1.9, "10": 1.99}
    assert privacy["record_level_sample_rate"] == {"0": [0.5], "10": [0.25, 0.5]}
    assert privacy["record_level_steps"] == {"0": 4, "10": 10}
    assert "in-context demonstrations" in privacy["record_level_scope"]
    assert _privacy([{"round": 1, "client_metrics": {"0": {"loss_last_quarter": 1.0}}}]) is None


def test_lora_on_an_embedding_layer_is_refused_before_dp_sgd_trains(small_model_path):
    """Opacus has no per-sample gradients for peft's LoRA Embedding: without the check its optimizer
    fails mid-training with "Per sample gradient is not initialized"."""
    from fedleak.eval.config import parse_config

    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "embed_tokens")), seed=0)
    examples = encode(generate_records(6, seed=0, purpose="embedding", private=True), tokenizer, max_length=64)
    job = ClientJob(client=0, round=1, model=model, examples=examples, pad_id=tokenizer.pad_token_id,
                    settings=TrainSettings(epochs=1, batch_size=4, lr=1e-3), generator=torch.Generator(),
                    planned_rounds=1)
    with pytest.raises(FedleakError, match=r"embedding layer base_model\.model\.model\.embed_tokens .*remove it "
                                           r"from model\.lora\.target_modules"):
        DPSGD(noise_multiplier=1.0).train_client(job)
    # The config names the layer before anything runs; a composition with dp_sgd is caught too.
    table = {"model": {"lora": {"target_modules": ["q_proj", "embed_tokens"]}},
             "matrix": {"defenses": ["none", [{"name": "dp_sgd", "noise_multiplier": 1.0}, "median"]]}}
    with pytest.raises(FedleakError, match=r"matrix\.defenses\[1\]: dp_sgd cannot train LoRA on the embedding "
                                           r"layer 'embed_tokens'"):
        parse_config(table, "run.toml")
    table["model"]["lora"]["target_modules"] = ["q_proj", "lm_head"]  # a linear head: Opacus handles it
    parse_config(table, "run.toml")
