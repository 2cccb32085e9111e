"""The memory estimate (eval/memory.py) against peaks measured on the embedded model, the refusal of a
run that cannot fit, and the 8B Llama shape's sanity figures."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fedleak.cli import main
from fedleak.common.errors import FedleakError
from fedleak.eval import memory
from fedleak.eval.config import parse_config

B, T = 8, 256  # activations and logits dominate the 6 MB model: about 140 MiB at the peak


class LivePeak(TorchDispatchMode):
    """Live bytes of tensor storages (the given tensors', then every op's outputs) and their peak: what the
    allocator must hold, without the process RSS's noise."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        for tensor in existing:
            self._add(tensor)

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def _add(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:  # a view of a tracked storage
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        return out


def _config(**tables):
    table = {"model": {"device": "cpu"}, "federation": {"batch_size": B, "max_length": T},
             "attack": {"batch_size": B}, "utility": {"batch_size": 1},
             "matrix": {"algorithms": ["fedit"], "defenses": ["none"]}}
    for key, value in tables.items():
        table[key] = {**table.get(key, {}), **value}
    return parse_config(table)


@pytest.fixture(scope="module")
def lora_model(small_model_path):
    from transformers import AutoModelForCausalLM

    from fedleak.federated.adapters import LoraSettings, add_peft_adapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small_model_path, dtype=torch.float32)
    return add_peft_adapter(model, LoraSettings(), seed=0)


def _tensors(model):
    return list(model.parameters()) + list(model.buffers())


def test_training_step_estimate_is_within_30_percent_of_the_measured_peak(lora_model, small_model_path):
    from fedleak.federated.training import Example, TrainSettings, train_adapter

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    examples = [Example(tuple(ids), tuple(ids)) for ids in torch.randint(3, 1000, (2 * B, T), generator=gen).tolist()]
    tracker = LivePeak(_tensors(lora_model))
    with tracker:  # two steps: AdamW's moments exist from the second on
        train_adapter(lora_model, examples, TrainSettings(epochs=1, batch_size=B, lr=1e-3), pad_id=0, generator=gen)
    est = memory.estimate(_config(), small_model_path, available=1 << 40)
    predicted = est.phases["client training"]
    print(f"training: measured {tracker.peak / 2**20:.1f} MiB, estimated {predicted / 2**20:.1f} MiB")
    assert abs(predicted - tracker.peak) / tracker.peak < 0.30
    checkpointed = memory.estimate(_config(model={"gradient_checkpointing": True}), small_model_path, available=1 << 40)
    assert checkpointed.phases["client training"] < 0.7 * predicted


def test_full_fine_tuning_step_estimate_is_within_30_percent_of_the_measured_peak(small_model_path):
    """Full fine-tuning holds a copy of every weight, AdamW's moments and gradients of all of them: with one short
    record per batch these dominate the peak, and the estimate must count each (one left out is 20% of it)."""
    from transformers import AutoModelForCausalLM

    from fedleak.federated.adapters import add_peft_adapter
    from fedleak.federated.methods import FullSettings
    from fedleak.federated.training import Example, TrainSettings, train_adapter

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(small_model_path, dtype=torch.float32)
    own = list(base.parameters())
    model = add_peft_adapter(base, FullSettings(), seed=0)
    gen = torch.Generator().manual_seed(0)
    examples = [Example(tuple(ids), tuple(ids)) for ids in torch.randint(3, 1000, (2, 16), generator=gen).tolist()]
    tracker = LivePeak(own + _tensors(model))
    with tracker:  # two steps: AdamW's moments exist from the second on
        train_adapter(model, examples, TrainSettings(epochs=1, batch_size=1, lr=1e-4), pad_id=0, generator=gen)
    config = _config(model={"adaptation": "full"}, federation={"batch_size": 1, "max_length": 16})
    est = memory.estimate(config, small_model_path, available=1 << 40)
    params = sum(p.numel() for p in own)
    # The estimate also holds the round's uploads (CPU copies), which one training never makes.
    predicted = est.phases["client training"] - config.federation.clients_per_round * params * 4
    print(f"full training: measured {tracker.peak / 2**20:.1f} MiB, estimated {predicted / 2**20:.1f} MiB")
    assert tracker.peak > 5 * params * 4  # weights, their copy, two moments and a gradient: the test's premise
    assert abs(predicted - tracker.peak) / tracker.peak < 0.30


def test_scoring_pass_estimate_is_within_30_percent_of_the_measured_peak(lora_model, small_model_path):
    import dataclasses

    from transformers import AutoTokenizer

    from fedleak.attacks.membership.stats import compute_stats
    from fedleak.federated.data import generate_records

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(small_model_path)
    # Long answers: every example fills max_length, every position scored (the estimate's worst case).
    records = [dataclasses.replace(r, output=" ".join([r.output] * 30))
               for r in generate_records(B, seed=0, purpose="memory", private=False)]
    tracker = LivePeak(_tensors(lora_model))
    with tracker:
        compute_stats(lora_model, tokenizer, records, max_length=T, response_only=False, batch_size=B)
    est = memory.estimate(_config(), small_model_path, available=1 << 40)
    predicted = est.phases["scoring"]
    print(f"scoring: measured {tracker.peak / 2**20:.1f} MiB, estimated {predicted / 2**20:.1f} MiB")
    assert abs(predicted - tracker.peak) / tracker.peak < 0.30


def test_estimate_counts_extra_adapters_and_dp_per_sample_gradients(small_model_path):
    plain = memory.estimate(_config(), small_model_path, available=1 << 40)
    fedpit = memory.estimate(_config(matrix={"algorithms": ["fedpit"]}), small_model_path, available=1 << 40)
    dp = memory.estimate(_config(matrix={"defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}]}),
                         small_model_path, available=1 << 40)
    lora = 188_416 * 4  # all-linear r=16 on the embedded model, fp32
    assert fedpit.phases["client training"] - plain.phases["client training"] == lora
    assert dp.phases["client training"] - plain.phases["client training"] == B * lora


def test_the_embedded_estimate_needs_no_build():
    from fedleak.federated.embedded import EmbeddedModelConfig

    config = parse_config({"model": {"device": "cpu", "embedded": {"hidden_size": 96, "num_heads": 3}}})
    hf = memory.model_config(config)  # not built: from model.embedded's fields
    assert hf.hidden_size == 96 and hf.vocab_size == EmbeddedModelConfig().vocab_size
    assert memory.estimate(config, available=1 << 40).phases["client training"] > 0


LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256)


@pytest.fixture(scope="module")
def llama_8b():
    from transformers import LlamaConfig

    return memory.shape_of(LlamaConfig(**LLAMA_8B))


@pytest.mark.parametrize("batch", [1, 4])
def test_llama_8b_fits_24_gb_in_4bit_not_in_bf16(llama_8b, batch):
    assert 8.0e9 < llama_8b.params < 8.1e9

    def peak(quantization, **model):
        config = _config(model={"dtype": "bfloat16", "quantization": quantization, **model},
                         federation={"batch_size": batch, "max_length": 512},
                         attack={"batch_size": batch}, utility={"batch_size": batch})
        est = memory.estimate(config, shape=llama_8b, device=torch.device("cuda"), available=24 * 10**9)
        return est.largest[1]

    bf16 = memory.estimate(_config(model={"dtype": "bfloat16"}), shape=llama_8b, device="cuda", available=1)
    assert 16e9 < bf16.phases["generation"] < 20e9  # base weights about 16 GB, batch 8 of KV cache
    assert (peak("none") > 24e9 or batch == 1) and peak("none", gradient_checkpointing=True) > 16e9
    # fp32 adapters on a bf16 base keep fp32 copies of their inputs: without checkpointing batch 4 needs more
    assert peak("4bit", gradient_checkpointing=True) < 24e9
    if batch == 1:
        assert peak("4bit") < 24e9


def _write(tmp_path, tiny_run_config):
    path = tmp_path / "run.toml"
    path.write_text(tiny_run_config + '\n[matrix]\nalgorithms = ["fedit"]\ndefenses = ["none"]\n'
                    'attacks = [{ name = "loss", observers = ["global"] }]\n')
    return path


def test_dry_run_prints_each_phase_and_refuses_a_config_that_cannot_fit(tmp_path, tiny_run_config, capsys,
                                                                          monkeypatch):
    path = _write(tmp_path, tiny_run_config)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory on cpu (float32;" in out and "client training: about" in out and "generation: about" in out
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)  # 1 MiB free
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not captured.out
    assert "client training needs about" in err and "federation.batch_size" in err
    assert "federation.max_length" in err and "model.gradient_checkpointing = true" in err
    # A real run stops there too, before any output folder, model load or training.
    assert main(["run", str(path), "--out", str(tmp_path / "real")]) == 2
    assert "client training needs about" in capsys.readouterr().err and not (tmp_path / "real").exists()


def test_memory_advice_leaves_out_checkpointing_under_dp_sgd(monkeypatch, small_model_path):
    config = _config(matrix={"defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}]})
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)
    with pytest.raises(FedleakError) as info:
        memory.check_memory(config, small_model_path)
    assert "federation.batch_size" in str(info.value) and "gradient_checkpointing" not in str(info.value)


def test_max_length_beyond_the_model_positions_is_refused_before_a_run(tmp_path, tiny_run_config, capsys):
    path = _write(tmp_path, tiny_run_config.replace("[federation]\n", "[federation]\nmax_length = 4096\n", 1))
    for dry in (["--dry-run"], []):
        assert main(["run", str(path), "--out", str(tmp_path / "out"), *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("exceeds the 1024 positions of model.name = 'embedded' (its config.json): lower "
                            "federation.max_length to 1024 or less") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    # A soft prompt's virtual tokens take positions too (here in a sweep of the method).
    soft = tiny_run_config.replace("[federation]\n", "[federation]\nmax_length = 1010\n", 1)
    path = _write(tmp_path, soft)
    path.write_text(path.read_text() + 'adaptations = ["lora", "prompt_tuning"]\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "federation.max_length = 1010 plus a soft prompt's or prefix's 20 virtual tokens exceeds the 1024 positions of "
        "model.name = 'embedded' (its config.json): lower federation.max_length to 1004 or less")


def test_a_corrupt_config_json_gives_no_estimate_not_a_traceback(small_model_path, tmp_path):
    import json
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(small_model_path, folder)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                    "num_attention_heads": 0}))
    config = _config(model={"name": str(folder)})
    assert memory.estimate(config) is None
    assert memory.memory_lines(config)[0].startswith("memory: not estimated")


def test_the_largest_variant_stands_for_the_run(small_model_path):
    """A full fine-tuning variant of matrix.adaptations holds far more than the configured LoRA: the check
    estimates each variant and names the one that cannot fit."""
    config = _config(matrix={"adaptations": ["lora", "full"]})
    lora = memory.estimate(_config(), small_model_path, available=1 << 40).phases["client training"]
    full = memory.estimate(_config(model={"adaptation": "full"}), small_model_path, available=1 << 40)
    assert full.phases["client training"] > lora + 4 * 4 * 1_000_000  # a copy, two moments, a gradient
    between = (lora + full.phases["client training"]) // 2
    with pytest.raises(FedleakError, match=r"client training of the variant \[adaptation=full\] needs about"):
        memory.check_memory(config, small_model_path, available=between)
    assert memory.check_memory(_config(), small_model_path, available=between) is not None
