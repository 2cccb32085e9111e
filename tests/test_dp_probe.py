"""DP-SGD refuses LoRA layers whose Opacus "per-sample" gradients are not one per record (OPT's fc1/fc2
see [batch*tokens, hidden]; Mixtral's router and fused experts get none), before any step or epsilon,
and trains where they are per record (checked against per-record autograd)."""

import json
import re

import opacus
import pytest
import torch
from opacus import GradSampleModule

from fedleak.common.errors import FedleakError
from fedleak.defenses import dp_probe
from fedleak.defenses.dp_probe import check_per_sample_gradients
from fedleak.defenses.dp_sgd import DPSGD
from fedleak.federated.adapters import LoraSettings, add_peft_adapter, get_adapter_state
from fedleak.federated.data import generate_records
from fedleak.federated.hooks import ClientJob
from fedleak.federated.model import load_base_model
from fedleak.federated.training import Example, TrainSettings, collate, encode, sequence_losses

OPT_ATTENTION = ["k_proj", "v_proj", "q_proj", "out_proj"]  # OPTAttention's projections, in model order


def _job(folder, targets, *, records=6, b_init=False):
    base, tokenizer = load_base_model(folder)
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8, target_modules=targets), seed=0)
    if b_init:  # B starts at zero: make every LoRA gradient non-trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    examples = encode(generate_records(records, seed=0, purpose="dp-probe", private=True), tokenizer, max_length=40)
    return ClientJob(client=0, round=1, model=model, examples=examples,
                     settings=TrainSettings(epochs=1, batch_size=3, lr=1e-3), pad_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))


def _refuse(job) -> str:
    defense = DPSGD(noise_multiplier=1.0)
    before = {k: v.clone() for k, v in get_adapter_state(job.model).items()}
    trainable = [n for n, p in job.model.named_parameters() if p.requires_grad]
    modes = [m.training for m in job.model.modules()]
    with pytest.raises(FedleakError) as info:
        defense.train_client(job)
    message = str(info.value)
    assert "\n" not in message and message.startswith("dp_sgd: per-sample gradients of LoRA on ")
    # Refused before any step or accounting, and the model is left as it was.
    assert defense.engines == {} and job.privacy is None
    after = get_adapter_state(job.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, p in job.model.named_parameters() if p.requires_grad] == trainable
    assert [m.training for m in job.model.modules()] == modes and all(getattr(p, "grad_sample", None) is None for p in job.model.parameters())
    return message


def _suggested(message: str) -> list[str]:
    return json.loads(re.search(r"target_modules to (\[.*?\])", message).group(1))


def test_opt_all_linear_is_refused_naming_fc1_fc2_and_the_attention_targets(tiny_model_path):
    message = _refuse(_job(tiny_model_path("opt"), "all-linear"))
    assert "model.decoder.layers.*.fc1, model.decoder.layers.*.fc2 (2 layers) are per token, not per record" in message
    assert "Opacus would clip per token and the epsilon would be wrong" in message and "dp_fedavg" in message
    assert _suggested(message) == OPT_ATTENTION  # the probed layers that passed


def test_opt_fc1_alone_is_refused_though_opacus_would_run(tiny_model_path):
    message = _refuse(_job(tiny_model_path("opt"), ["fc1"]))
    assert "model.decoder.layers.*.fc1 (2 layers) are per token" in message and "fc2" not in message
    assert _suggested(message) == OPT_ATTENTION  # nothing passed: the attention projections


def test_mixtral_all_linear_is_refused_naming_router_and_experts(tiny_model_path):
    message = _refuse(_job(tiny_model_path("mixtral"), "all-linear"))
    assert "model.layers.*.mlp.gate" in message and "model.layers.*.mlp.experts" in message
    assert "epsilon would be wrong" in message
    assert _suggested(message) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_opt_with_the_suggested_targets_trains_with_per_record_gradients(tiny_model_path):
    suggested = _suggested(_refuse(_job(tiny_model_path("opt"), "all-linear")))
    job = _job(tiny_model_path("opt"), suggested, b_init=True)
    model = job.model
    examples = [Example(e.input_ids[:n], e.input_ids[:n]) for e, n in zip(job.examples, (30, 22, 15))]
    assert len({len(e.input_ids) for e in examples}) > 1  # different lengths: padding in the batch
    # Opacus's rows equal per-record autograd (dropout off; LoRA layers in training mode for the hooks).
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = []
    for example in examples:
        model.zero_grad()
        sequence_losses(model, collate([example], job.pad_id)).mean().backward()
        expected.append({n: p.grad.clone() for n, p in params.items()})
    model.zero_grad()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        sequence_losses(wrapped, collate(examples, job.pad_id)).mean().backward()
        for name, p in params.items():
            assert p.grad_sample.shape == (len(examples), *p.shape)
            for i in range(len(examples)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    finally:
        wrapped.cleanup()
        for p in params.values():
            p.grad = p.grad_sample = None
    model.eval()
    metrics = DPSGD(noise_multiplier=1.0).train_client(job)
    assert metrics["steps"] == 2 and metrics["epsilon"] > 0 and job.privacy["epsilon"] == metrics["epsilon"]


def test_a_crash_under_opacus_is_refused_naming_the_module(tiny_model_path, monkeypatch):
    class FailsOnFc1(GradSampleModule):
        def forward(self, *args, **kwargs):
            if any(p.requires_grad for n, p in self._module.named_parameters() if ".fc1." in n):
                raise RuntimeError("stack expects each tensor to be equal size\nmore")
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(opacus, "GradSampleModule", FailsOnFc1)
    message = _refuse(_job(tiny_model_path("opt"), ["q_proj", "fc1"]))
    assert ("model.decoder.layers.*.fc1 (2 layers) make Opacus fail (RuntimeError: stack expects each tensor "
            "to be equal size)") in message
    assert "q_proj" not in message.split(" make Opacus fail")[0] and _suggested(message) == ["q_proj"]


def test_embedded_llama_passes_and_the_probe_runs_once_per_model(small_model_path, monkeypatch):
    calls = []
    probe_all = dp_probe._probe_all
    monkeypatch.setattr(dp_probe, "_probe_all", lambda *a, **k: calls.append(1) or probe_all(*a, **k))
    job = _job(small_model_path, "all-linear", b_init=True)
    check_per_sample_gradients(job.model, job.examples, job.pad_id)  # no refusal
    defense = DPSGD(noise_multiplier=1.0)
    for client in (0, 1):
        job.client = client
        assert defense.train_client(job)["steps"] == 2
    assert len(calls) == 1  # cached on the model for its trainable parameters


def test_a_trainable_output_head_keeps_per_record_gradients(small_model_path):
    """Training runs the output head at target positions only (federated/batching.py) but not under
    Opacus's wrapper: a hooked head would see one row of positions, and LoRA on the head would get one
    per-sample gradient for the whole batch. The probe passing here is that guarantee."""
    job = _job(small_model_path, ["q_proj", "lm_head"], b_init=True)
    assert any("lm_head" in n and p.requires_grad for n, p in job.model.named_parameters())
    check_per_sample_gradients(job.model, job.examples, job.pad_id)  # no refusal: one row per record, right values
    assert DPSGD(noise_multiplier=1.0).train_client(job)["steps"] == 2
