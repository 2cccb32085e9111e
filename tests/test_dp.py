"""DP-SGD through Opacus on peft LoRA, prefix tuning and full fine-tuning: correctness guards (Opacus issue 820 reports silently
corrupted LoRA weights with some peft versions) and accounting."""

import copy

import pytest
import torch
from opacus import GradSampleModule

from fedleak.defenses.dp_sgd import DPSGD
from fedleak.federated.adapters import LoraSettings, add_peft_adapter, get_adapter_state
from fedleak.federated.full import FullModel
from fedleak.federated.methods import FullSettings, PrefixTuningSettings
from fedleak.federated.data import generate_records
from fedleak.common.errors import FedleakError
from fedleak.federated.hooks import ClientJob
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, collate, encode, sequence_losses, train_adapter


@pytest.fixture()
def lora_model(small_model_path):
    return _adapted(small_model_path, LoraSettings(r=4, alpha=8))


@pytest.fixture(params=["lora", "prefix_tuning", "full"])
def adapted(request, small_model_path):
    """LoRA, a prefix (whose embedding rows peft looks up per record: Opacus's embedding rule applies), and full
    fine-tuning (the tied embedding and output head sum two rules' rows; RMSNorm goes through functorch)."""
    return _adapted(small_model_path, {"lora": LoraSettings(r=4, alpha=8), "full": FullSettings(),
                                       "prefix_tuning": PrefixTuningSettings(num_virtual_tokens=4)}[request.param])


def _adapted(path, settings):
    base, tokenizer = load_base_model(path)
    model = add_peft_adapter(base, settings, seed=0)
    with torch.no_grad():  # B starts at zero: make every LoRA gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    examples = encode(generate_records(6, seed=0, purpose="dp", private=True), tokenizer, max_length=256)
    return model, tokenizer, examples


def test_opacus_per_sample_gradients_equal_per_example_autograd(adapted):
    model, tokenizer, examples = adapted
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = []
    for example in examples:
        model.zero_grad()
        sequence_losses(model, collate([example], tokenizer.pad_token_id)).mean().backward()
        expected.append({n: p.grad.clone() for n, p in params.items()})
    model.zero_grad()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    sequence_losses(wrapped, collate(examples, tokenizer.pad_token_id)).mean().backward()
    try:
        assert len(params) > 0
        for name, p in params.items():
            assert p.grad_sample.shape == (len(examples), *p.shape)
            for i in range(len(examples)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    finally:
        wrapped.cleanup()


def test_dp_step_without_noise_or_clipping_equals_the_plain_step(adapted):
    model, tokenizer, examples = adapted
    settings = TrainSettings(epochs=2, batch_size=len(examples), lr=1e-3, max_grad_norm=None)
    twin, start = copy.deepcopy(model), get_adapter_state(model)
    train_adapter(twin, examples, settings, pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    # batch_size = n gives Poisson rate 1: every example in every batch, as in the plain full-batch step.
    job = ClientJob(client=0, round=1, model=model, examples=examples, settings=settings,
                    pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    metrics = DPSGD(noise_multiplier=0.0, max_grad_norm=1e9).train_client(job)
    assert metrics["steps"] == 2 and metrics["sample_rate"] == 1.0
    dp, plain = get_adapter_state(model), get_adapter_state(twin)
    for key in plain:
        if isinstance(model, FullModel):
            # AdamW's first steps are about lr wide whatever the gradient's size: where a weight's gradient is
            # near zero, float order alone flips its step, so the whole update is compared, not each entry.
            step = plain[key] - start[key]
            assert (dp[key] - plain[key]).norm() <= 1e-3 * step.norm() + 1e-7, key
        else:
            torch.testing.assert_close(dp[key], plain[key], rtol=1e-4, atol=1e-6)
    assert not any(len(m._forward_hooks) or len(m._backward_hooks) for m in model.modules())  # hooks removed


def test_epsilon_accumulates_per_client_and_target_epsilon_is_met(lora_model):
    model, tokenizer, examples = lora_model
    defense = DPSGD(target_epsilon=3.0, max_grad_norm=1.0, delta=1e-5)
    settings = TrainSettings(epochs=1, batch_size=2, lr=1e-3)
    epsilons = []
    for rnd in (1, 2):
        job = ClientJob(client=0, round=rnd, model=model, examples=examples, settings=settings,
                        pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(rnd), planned_rounds=2)
        torch.manual_seed(rnd)
        epsilons.append(DPSGD.train_client(defense, job)["epsilon"])
    assert 0 < epsilons[0] < epsilons[1] <= 3.0  # the budget is spent over the planned rounds
    assert epsilons[1] >= 3.0 * 0.99
    other = ClientJob(client=1, round=1, model=model, examples=examples, settings=settings,
                      pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(5), planned_rounds=2)
    assert defense.train_client(other)["epsilon"] == pytest.approx(epsilons[0])  # its own accountant


def test_dp_sgd_parameters_are_checked():
    with pytest.raises(FedleakError, match="exactly one of noise_multiplier and target_epsilon"):
        DPSGD()
    with pytest.raises(FedleakError, match="max_grad_norm"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=0)


def _state(values):
    return {"w": torch.tensor(values, dtype=torch.float64)}


def test_dp_fedavg_clips_adds_seeded_noise_and_accounts_per_round():
    from fedleak.defenses.dp_fedavg import DPFedAvg
    from fedleak.federated.hooks import ClientUpdate, RoundInfo

    reference = _state([0.0, 0.0])
    updates = [ClientUpdate(0, _state([3.0, 4.0]), 10), ClientUpdate(1, _state([0.3, 0.4]), 1)]

    def round_of(defense, number, seed=0):
        info = RoundInfo(round=number, clients=[0, 1], num_clients_total=4,
                         generator=torch.Generator().manual_seed(seed))
        received = defense.before_aggregation(updates, global_state=reference, info=info)
        return defense.aggregate(received, info=info), info

    # No noise: the unweighted mean of the clipped updates ([0.6, 0.8] and [0.3, 0.4]).
    out, info = round_of(DPFedAvg(noise_multiplier=0.0, clip_norm=1.0), 1)
    torch.testing.assert_close(out["w"], torch.tensor([0.45, 0.6], dtype=torch.float64))
    # With noise: std sigma * C / expected clients around that mean, the same for the same seed.
    defense = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0)
    a, info1 = round_of(defense, 1)
    b, _ = round_of(DPFedAvg(noise_multiplier=1.0, clip_norm=1.0), 1)
    torch.testing.assert_close(a["w"], b["w"])
    assert not torch.allclose(a["w"], out["w"])
    _, info2 = round_of(defense, 2, seed=1)
    assert 0 < info1.metrics["epsilon"] < info2.metrics["epsilon"]
    from opacus.accountants import RDPAccountant

    reference_accountant = RDPAccountant()
    for _ in range(2):
        reference_accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    assert info2.metrics["epsilon"] == pytest.approx(reference_accountant.get_epsilon(1e-5))


def test_epsilons_reach_results_and_report(tmp_path, tiny_run_config):
    import json
    import os
    import subprocess
    import sys

    from fedleak.reports.document import fmt

    config = tiny_run_config.replace("canaries_per_repetition = 0", "canaries_per_repetition = 0\naudit_canaries = 24")
    (tmp_path / "run.toml").write_text(config + """
[matrix]
defenses = [{ name = "dp_sgd", target_epsilon = 4.0 }, [{ name = "dp_fedavg", noise_multiplier = 1.0 }, "norm_bound"]]
attacks = [{ name = "loss", observers = ["global", "upload", "client"] }, "reference"]
""")
    proc = subprocess.run([sys.executable, "-m", "fedleak", "run", str(tmp_path / "run.toml"), "--out",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr  # library notices are silenced, not dumped on the user
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    dp_sgd, dp_fedavg = results["trainings"]
    per_client = dp_sgd["privacy"]["record_level_epsilon_per_client"]
    assert set(per_client) == {"0", "1", "2"} and all(4.0 * 0.99 <= e <= 4.0 for e in per_client.values())
    assert dp_sgd["privacy"]["target_epsilon"] == 4.0 and dp_sgd["privacy"]["exceeded_target"] is False
    rounds = [r["client_metrics"]["0"]["epsilon"] for r in dp_sgd["rounds"]]
    assert rounds[0] < rounds[1] == per_client["0"]
    for client, rates in dp_sgd["privacy"]["record_level_sample_rate"].items():  # the rate Opacus accounts
        metrics = dp_sgd["rounds"][0]["client_metrics"][client]
        assert rates == [metrics["sample_rate"]] == [1 / -(-metrics["examples"] // 8)]
        assert dp_sgd["privacy"]["record_level_steps"][client] == 2 * metrics["steps"]
    assert (dp_fedavg["privacy"]["user_level_sample_rate"], dp_fedavg["privacy"]["user_level_steps"]) == (1.0, 2)
    assert dp_fedavg["defense"] == "dp_fedavg(noise_multiplier=1.0)+norm_bound"
    assert [r["epsilon"] for r in dp_fedavg["rounds"]][-1] == dp_fedavg["privacy"]["user_level_epsilon"]
    # The audit's lower bounds never exceed the accountant's epsilon (that would mean a broken DP).
    assert results["data"]["audit_canaries"] == 24
    for training, epsilon in ((dp_sgd, dp_sgd["privacy"]["record_level_epsilon"]),
                              (dp_fedavg, dp_fedavg["privacy"]["user_level_epsilon"])):
        cells = [c for c in results["cells"] if c["defense"] == training["defense"]]
        assert len(cells) == 1 + 3 + 3 + 1  # loss on global, 3 uploads, 3 clients; reference on global
        # DP-FedAvg's user-level guarantee covers the released global model only
        covered = cells if training is dp_sgd else [c for c in cells if c["observer"] == "global"]
        assert len(covered) == (8 if training is dp_sgd else 2)
        for cell in covered:
            assert 0 <= cell["metrics"]["epsilon_lb"] <= epsilon
            assert cell["audit"]["empirical"]["delta"] == training["privacy"].get("record_level_delta", 1e-5)
            if "one_run" in cell["audit"]:
                assert 0 <= cell["metrics"]["one_run_epsilon_lb"] <= epsilon
        assert "one_run" in next(c for c in cells if c["observer"] == "global")["audit"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"record {fmt(dp_sgd['privacy']['record_level_epsilon'], 2)} of target 4 " in report
    assert fmt(dp_fedavg["privacy"]["user_level_epsilon"], 2) in report
