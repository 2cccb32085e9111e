"""Prefix tuning (Li and Liang 2021): the real-word initialisation against its definition, scoring, exposure, GCG
and generation against the prefixed model's whole forward, the config's checks, and one federation end to end."""

import json

import numpy as np
import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.eval.config import load_config
from fedleak.federated.adapters import add_peft_adapter, adapter_parameters
from fedleak.federated.batching import packing_ok
from fedleak.federated.data import generate_records
from fedleak.federated.methods import PrefixTuningSettings, is_prefix, prompt_positions, virtual_tokens
from fedleak.federated.model import load_base_model
from fedleak.federated.training import IGNORE, collate, encode, sequence_losses, token_logprobs
from tests.adaptation_checks import check_exposure_and_gcg, check_greedy_generation, check_prefix_init

pytestmark = pytest.mark.usefixtures("one_thread")
P = 5  # prefix positions


@pytest.fixture(scope="module")
def prefixed(small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, PrefixTuningSettings(num_virtual_tokens=P), seed=0)
    model.eval()
    return model, tokenizer


def test_the_prefix_starts_as_the_base_models_keys_and_values_of_real_tokens(prefixed):
    """init = "sample_vocab" against its definition (tests/adaptation_checks.py); the text starts at position P."""
    model, tokenizer = prefixed
    assert is_prefix(model) and prompt_positions(model) == P and virtual_tokens(model) == 0
    assert not packing_ok(model, pad_id=tokenizer.pad_token_id)  # the text starts at position P, not 0
    check_prefix_init(model, tokenizer, PrefixTuningSettings(num_virtual_tokens=P))


def _perturbed(model):
    with torch.no_grad():
        weight = adapter_parameters(model)["prompt_embeddings"]
        weight.add_(0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))


def test_scoring_exposure_and_gcg_under_a_prefix_are_the_whole_sequences_forward(prefixed):
    model, tokenizer = prefixed
    _perturbed(model)
    examples = encode(generate_records(5, seed=2, purpose="t", private=True), tokenizer, max_length=256)
    assert len({len(e.input_ids) for e in examples}) > 1  # a padded batch
    with torch.no_grad():
        batched = sequence_losses(model, collate(examples, tokenizer.pad_token_id))
        alone = torch.cat([sequence_losses(model, collate([e], tokenizer.pad_token_id)) for e in examples])
        picked, mask, _ = token_logprobs(model, collate(examples[:1], tokenizer.pad_token_id))
        ids, labels = torch.tensor([examples[0].input_ids]), torch.tensor(examples[0].labels[1:])
        logits = model(input_ids=ids).logits[0, :-1]  # peft's own forward, the prefix in the cache
        expected = torch.nn.functional.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE])
        with model.disable_adapter():
            bare = sequence_losses(model, collate(examples[:1], tokenizer.pad_token_id))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-picked.sum() / mask.sum(), alone[0], rtol=1e-5, atol=1e-5)
    assert abs(float(bare[0] - alone[0])) > 0.05  # the scored loss is the prefixed model's
    # Exposure scores candidates on a cached [prefix; shared text]; GCG's answer loss is the training loss.
    check_exposure_and_gcg(model, tokenizer, examples[0])


def test_generation_under_a_prefix_is_the_greedy_decoding_of_its_whole_forward(prefixed):
    """peft's own generation path under transformers 5.24 would put the prefix in place of the cache at every
    step; fedleak's gives what the prefixed model's argmax over the whole sequence gives, in padded batches too,
    and the repetition penalty skips the prefix's placeholder positions as it skips padding."""
    from fedleak.federated.generation import generate
    from fedleak.federated.prompts import prompt_ids

    model, tokenizer = prefixed
    _perturbed(model)
    prompts = [prompt_ids(tokenizer, r.instruction, r.input)
               for r in generate_records(3, seed=4, purpose="g", private=True)]
    out = check_greedy_generation(model, tokenizer, prompts)
    penalised = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=3, repetition_penalty=3.0)
    assert penalised == [generate(model, tokenizer, [p], max_new_tokens=10, repetition_penalty=3.0)[0]
                         for p in prompts]
    assert penalised != out


def _config(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("body, expected", [
    ('[model.prefix_tuning]\nnum_virtual_tokens = 0', "model.prefix_tuning.num_virtual_tokens = 0: must be a positive"),
    ('[model.prefix_tuning]\ninit = "text"', "model.prefix_tuning.init = 'text'"),
])
def test_the_config_refuses_what_prefix_tuning_cannot_do(tmp_path, body, expected):
    with pytest.raises(FedleakError, match=expected) as info:
        _config(tmp_path, f'[model]\nadaptation = "prefix_tuning"\n{body}\n')
    assert "\n" not in str(info.value)


def test_dp_sgd_takes_a_prefix_and_gradient_checkpointing_is_refused(tmp_path):
    config = _config(tmp_path, '[model]\nadaptation = "prefix_tuning"\n[matrix]\n'
                               'defenses = [{ name = "dp_sgd", noise_multiplier = 1.0 }]\n')
    assert config.model.adapter == PrefixTuningSettings()
    with pytest.raises(FedleakError, match="model.adaptation = 'prefix_tuning' cannot train with "
                                           "model.gradient_checkpointing = true"):
        _config(tmp_path, '[model]\ngradient_checkpointing = true\n[matrix]\nadaptations = ["lora", "prefix_tuning"]\n')


def test_a_prefix_federation_end_to_end(tmp_path, tiny_run_config):
    """`fedleak run` with prefix tuning: FEDIT with no defense and under DP-SGD (its epsilon reported), black-box
    and update attacks on every view, checkpoints that hold the prefix only."""
    (tmp_path / "run.toml").write_text(tiny_run_config + f"""
[model]
adaptation = "prefix_tuning"
[model.prefix_tuning]
num_virtual_tokens = {P}
lr = 0.02
[matrix]
algorithms = ["fedit"]
defenses = ["none", {{ name = "dp_sgd", target_epsilon = 8.0 }}]
attacks = [{{ name = "loss", observers = ["global", "upload", "client"] }}, "exposure",
           {{ name = "update_gradient", observers = ["upload"] }}]
""")
    out = tmp_path / "out"
    from fedleak.cli import main

    assert main(["run", str(tmp_path / "run.toml"), "--out", str(out), "--quiet"]) == 0  # in process: no new imports
    results = json.loads((out / "results.json").read_text())
    from fedleak.eval.results import validate_results

    validate_results(results)
    plain, private = results["trainings"]
    assert plain["defense"] == "none" and private["defense"] == "dp_sgd(target_epsilon=8.0)"
    assert 7.0 < private["privacy"]["record_level_epsilon"] <= 8.0
    from safetensors.torch import load_file

    files = sorted((out / plain["checkpoint_dir"]).rglob("*.safetensors"))
    assert files and all(list(load_file(f)) == ["prompt_embeddings"] for f in files)
    width = load_file(files[0])["prompt_embeddings"].shape
    assert width[0] == P and plain["cost"]["upload_bytes_per_client_per_round"] == width[0] * width[1] * 4
    cells = [c for c in results["cells"] if not c.get("error")]
    assert {(c["attack_name"], c["observer"]) for c in cells} >= {("loss", "global"), ("loss", "upload"),
                                                                    ("loss", "client"), ("exposure", "global"),
                                                                    ("update_gradient", "upload")}
    assert all(np.isfinite(c["metrics"]["auc"]) for c in cells if "auc" in c["metrics"])
    assert "model.adaptation = prefix_tuning" in (out / "report.md").read_text()
