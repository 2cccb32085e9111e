import hashlib

import pytest
import torch

from fedleak.federated import model as model_module
from fedleak.common.errors import FedleakError
from fedleak.federated.model import EmbeddedModelConfig, build_embedded, load_base_model

TINY = EmbeddedModelConfig(vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           public_records=300, pretrain_steps=5, pretrain_batch_size=4, pretrain_seq_len=32)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "fedleak_build.json"}


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = build_embedded(TINY, cache_dir=tmp_path / "a")
    second = build_embedded(TINY, cache_dir=tmp_path / "b")
    assert first.name == second.name and _digest(first) == _digest(second)
    assert "model.safetensors" in _digest(first) and "tokenizer.json" in _digest(first)
    # A second call finds the cache and does not train again.
    monkeypatch.setattr(model_module, "_pretrain", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert build_embedded(TINY, cache_dir=tmp_path / "a") == first
    # Other settings get another folder.
    other = EmbeddedModelConfig(**{**TINY.__dict__, "pretrain_steps": 6})
    assert other.cache_key([]) != TINY.cache_key([])


def test_loaded_model_and_tokenizer(small_model_path):
    model, tokenizer = load_base_model(small_model_path)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert len(tokenizer("482913", add_special_tokens=False)["input_ids"]) == 6  # one token per digit
    text = "### Instruction:\nWrite discharge instructions for a patient after a hernia repair.\n### Response:\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000


def test_pretrained_base_predicts_the_domain_better_than_chance(small_model_path):
    import json
    import math

    build = json.loads((small_model_path / "fedleak_build.json").read_text())
    assert build["pretrain_final_loss"] < 0.5 * math.log(build["vocab"])


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(FedleakError, match="allow_download"):
        load_base_model(tmp_path / "no-such-model")


def test_bad_embedded_settings_name_the_field():
    with pytest.raises(FedleakError, match="model.embedded.hidden_size = 30 is not divisible by num_heads = 4"):
        EmbeddedModelConfig(hidden_size=30)
