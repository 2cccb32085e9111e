"""Device, dtype, attention and quantisation options of the loader, and the process's one shared base
copy (federated/model.py). CPU only: CUDA paths are checked for their refusals here and run by
bench/gpu.py on a GPU."""

from __future__ import annotations

import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.eval.config import parse_config
from fedleak.federated.adapters import LoraSettings, add_peft_adapter, get_adapter_state
from fedleak.federated.model import (load_base_model, release_shared_model, resolve_device, resolve_dtype,
                                     shared_base_model)
from fedleak.federated.training import TrainSettings, encode, train_adapter
from fedleak.federated.data import generate_records

CUDA = torch.cuda.is_available()


def test_device_names_resolve_or_refuse_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    if not CUDA:
        with pytest.raises(FedleakError, match=r"^model.device = 'cuda:1': this machine has no CUDA GPU.*\"cpu\"$"):
            resolve_device("cuda:1")
    with pytest.raises(FedleakError, match=r"^model.device = 'gpu0': use \"auto\""):
        resolve_device("gpu0")


def test_a_malformed_device_is_a_config_error():
    with pytest.raises(FedleakError, match=r"model.device = 'cuda-0'"):
        parse_config({"model": {"device": "cuda-0"}}, "c.toml")
    with pytest.raises(FedleakError, match=r"model.dtype"):
        parse_config({"model": {"dtype": "fp8"}}, "c.toml")


def test_dtype_auto_is_float32_on_the_cpu_and_explicit_otherwise():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16 and resolve_dtype("float16", cpu) == torch.float16


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantisation_without_a_gpu_is_refused(small_model_path, quantization):
    with pytest.raises(FedleakError, match=rf"^model.quantization = '{quantization}' needs a CUDA GPU.*\"none\""):
        load_base_model(small_model_path, device="cpu", quantization=quantization)


def test_flash_attention_without_a_gpu_is_refused(small_model_path):
    with pytest.raises(FedleakError, match=r"^model.attn_implementation = 'flash_attention_2' needs a CUDA GPU"):
        load_base_model(small_model_path, device="cpu", attn_implementation="flash_attention_2")


def test_a_bf16_base_trains_float32_adapters(small_model_path):
    """A low-precision base with fp32 adapters (peft's autocast): the base stays bf16, the adapters,
    their gradients and the uploaded state are fp32, and training lowers the loss."""
    base, tokenizer = load_base_model(small_model_path, dtype="bfloat16")
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8), seed=0)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen if p.is_floating_point())
    records = generate_records(8, seed=0, purpose="bf16", private=True)
    examples = encode(records, tokenizer, max_length=48)
    first = train_adapter(model, examples, TrainSettings(epochs=1, batch_size=4, lr=1e-2), pad_id=tokenizer.pad_token_id,
                          generator=torch.Generator().manual_seed(0))
    last = train_adapter(model, examples, TrainSettings(epochs=6, batch_size=4, lr=1e-2), pad_id=tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(0))
    assert last["loss_last_quarter"] < first["loss_last_quarter"]
    state = get_adapter_state(model)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())


def test_gradient_checkpointing_gives_the_same_gradients(small_model_path):
    records = generate_records(4, seed=1, purpose="ckpt", private=True)
    grads = []
    for checkpointing in (False, True):
        base, tokenizer = load_base_model(small_model_path, gradient_checkpointing=checkpointing)
        model = add_peft_adapter(base, LoraSettings(r=4, alpha=8), seed=0)
        model.train()
        from fedleak.federated.training import collate, sequence_losses

        sequence_losses(model, collate(encode(records, tokenizer, max_length=48), tokenizer.pad_token_id)).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert base.is_gradient_checkpointing and base.training
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_one_shared_base_copy_with_adapters_swapped(small_model_path):
    """Every use in a process gets the same base weights, bare: adapters a previous use injected are
    taken out, never copied; another model or other options replace the copy."""
    release_shared_model()
    base, tokenizer = shared_base_model(small_model_path)
    weights = {n: p.data_ptr() for n, p in base.named_parameters()}
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # a trained-looking adapter that changes the outputs
    ids = torch.tensor([tokenizer("### Instruction:\nhello")["input_ids"]])
    again, same_tokenizer = shared_base_model(small_model_path)
    assert again is base and same_tokenizer is tokenizer
    assert not any("lora_" in n for n, _ in again.named_parameters())  # bare again
    assert {n: p.data_ptr() for n, p in again.named_parameters()} == weights  # not a copy
    fresh, _ = load_base_model(small_model_path)
    torch.testing.assert_close(again(ids).logits, fresh(ids).logits)
    other, _ = shared_base_model(small_model_path, dtype="bfloat16")
    assert other is not base and other.get_input_embeddings().weight.dtype == torch.bfloat16
    release_shared_model()


def test_dp_sgd_with_gradient_checkpointing_is_a_config_error():
    table = {"model": {"gradient_checkpointing": True},
             "matrix": {"algorithms": ["fedit"], "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}], "attacks": ["loss"]}}
    with pytest.raises(FedleakError, match=r"^c.toml: matrix.defenses\[0\]: dp_sgd cannot run with "
                                           r"model.gradient_checkpointing = true"):
        parse_config(table, "c.toml")


def test_chat_with_the_embedded_model_is_a_config_error():
    with pytest.raises(FedleakError, match=r"model.prompt_format = 'chat': the embedded model's tokenizer has no chat"):
        parse_config({"model": {"prompt_format": "chat"}}, "c.toml")


def _broken_copy(small_model_path, tmp_path, edit):
    import json
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(small_model_path, folder)
    for name, change in edit.items():
        data = json.loads((folder / name).read_text())
        data.update(change)
        (folder / name).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("edit, says", [
    ({"config.json": {"num_attention_heads": 0}}, "holds no loadable model"),
    ({"config.json": {"hidden_size": -128}}, "holds no loadable model"),
    ({"tokenizer_config.json": {"eos_token": None}}, "its tokenizer has no eos_token"),
])
def test_a_broken_model_folder_is_one_line(small_model_path, tmp_path, edit, says):
    folder = _broken_copy(small_model_path, tmp_path, edit)
    with pytest.raises(FedleakError, match=rf"^model.name = '{folder}'.*{says}") as info:
        load_base_model(folder)
    assert "\n" not in str(info.value)
