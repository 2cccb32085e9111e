"""model.adaptation: LoRA, IA3, prompt and prefix tuning, full fine-tuning through states, training, scoring and the
config's refusals."""

import json

import numpy as np
import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.eval.cache import model_fingerprint
from fedleak.eval.config import load_config
from fedleak.federated.adapters import (DEFAULT, LoraSettings, activate, adapter_parameters, adapters_enabled,
                                        add_peft_adapter, get_adapter_state, set_adapter_state)
from fedleak.federated.batching import packing_ok
from fedleak.federated.data import generate_records
from fedleak.federated.methods import FullSettings, IA3Settings, PrefixTuningSettings, PromptTuningSettings, virtual_tokens
from fedleak.federated.model import load_base_model
from fedleak.federated.training import IGNORE, TrainSettings, batches, collate, encode, sequence_losses, train_adapter
from tests.adaptation_checks import check_exposure_and_gcg, check_greedy_generation

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {"lora": LoraSettings(r=4, alpha=8), "ia3": IA3Settings(),
           "prompt_tuning": PromptTuningSettings(num_virtual_tokens=6),
           "prefix_tuning": PrefixTuningSettings(num_virtual_tokens=6), "full": FullSettings()}


@torch.no_grad()
def _losses(model, examples, pad_id):
    model.eval()
    return torch.cat([sequence_losses(model, b) for b in batches(examples, batch_size=4, pad_id=pad_id)])


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_only_its_own_tensors_and_its_state_round_trips(small_model_path, method):
    base, tokenizer = load_base_model(small_model_path)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_peft_adapter(base, METHODS[method], seed=0)
    params = adapter_parameters(model)
    assert params and sorted(params) == sorted(get_adapter_state(model))
    activate(model, [DEFAULT], trainable=DEFAULT)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params.values()}
    examples = encode(generate_records(8, seed=1, purpose="t", private=True), tokenizer, max_length=256)
    before = _losses(model, examples, tokenizer.pad_token_id)
    # prompt learning needs larger steps, full fine-tuning smaller ones
    lr = {"prompt_tuning": 3e-2, "prefix_tuning": 0.1, "full": 1e-3}.get(method, 1e-2)
    train_adapter(model, examples, TrainSettings(epochs=4, batch_size=4, lr=lr),
                  pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    after = _losses(model, examples, tokenizer.pad_token_id)
    # A 6-token soft prompt on a 1M-parameter model has little capacity (Lester et al.: prompt tuning catches up
    # with fine-tuning only at scale): it lowers the loss by about 8% where LoRA and IA3 take off more.
    drop = 0.95 if method == "prompt_tuning" else 0.9
    assert after.mean() < drop * before.mean(), (method, float(before.mean()), float(after.mean()))
    with model.disable_adapter():  # full fine-tuning's copy sits in the base's modules until then
        base_now = model.get_base_model().state_dict()
    assert all(torch.equal(base_now[k], v) for k, v in frozen.items() if k in base_now)  # the base never moves
    # The state, loaded into a fresh adapter of the same method, gives the same losses; another method's refuses.
    state = get_adapter_state(model)
    fresh = add_peft_adapter(load_base_model(small_model_path)[0], METHODS[method], seed=5)
    set_adapter_state(fresh, state)
    torch.testing.assert_close(_losses(fresh, examples, tokenizer.pad_token_id), after)
    other = next(m for m in METHODS if m != method)
    with pytest.raises(FedleakError, match="adapter lacks .* tensors .*restore the file or rerun"):
        set_adapter_state(add_peft_adapter(load_base_model(small_model_path)[0], METHODS[other], seed=0), state)


def test_a_soft_prompt_is_scored_after_its_virtual_positions(small_model_path):
    """The training loss under a soft prompt equals the base model run on [prompt rows; token embeddings] with
    the prompt's positions dropped, for padded batches; packing is off (peft drops position_ids)."""
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, METHODS["prompt_tuning"], seed=0)
    model.eval()
    n = virtual_tokens(model)
    assert n == 6 and not packing_ok(model, pad_id=tokenizer.pad_token_id)
    examples = encode(generate_records(5, seed=2, purpose="t", private=True), tokenizer, max_length=256)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_losses(model, batch)
        rows = adapter_parameters(model)["prompt_embeddings"]
        embeds = torch.cat([rows.expand(len(examples), -1, -1), base.get_input_embeddings()(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(len(examples), n, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
        logits = base(inputs_embeds=embeds, attention_mask=mask).logits[:, n:-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        expected = (nll * (labels != IGNORE)).sum(1) / (labels != IGNORE).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Exposure scores candidates on a cached [soft prompt; shared text]; GCG's answer loss skips the prompt's positions.
    check_exposure_and_gcg(model, tokenizer, examples[0])


def test_generation_under_a_soft_prompt_is_the_greedy_decoding_of_its_training_forward(small_model_path):
    """peft 0.21's generation under transformers 5.24 re-inserted the soft prompt before every new token (it looks
    for the cache under its old name): fedleak's generation must give what the training forward's argmax gives."""
    from fedleak.federated.prompts import prompt_ids

    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, PromptTuningSettings(num_virtual_tokens=6, init="random"), seed=2)
    model.eval()
    prompts = [prompt_ids(tokenizer, r.instruction, r.input) for r in generate_records(3, seed=4, purpose="g",
                                                                                        private=True)]
    check_greedy_generation(model, tokenizer, prompts)


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "prefix_tuning", "full"])
def test_the_blind_baseline_is_the_base_and_an_attack_reference_still_acts_inside_it(small_model_path, method):
    base, tokenizer = load_base_model(small_model_path)
    examples = encode(generate_records(4, seed=3, purpose="t", private=True), tokenizer, max_length=256)
    bare = _losses(base, examples, tokenizer.pad_token_id)
    model = add_peft_adapter(base, METHODS[method], seed=0)
    with torch.no_grad():  # move the adapter away from its (identity for IA3) start
        for p in adapter_parameters(model).values():
            p.add_((0.3 if method != "full" else 0.02) * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    on = _losses(model, examples, tokenizer.pad_token_id)
    assert not torch.allclose(on, bare)
    with model.disable_adapter():
        torch.testing.assert_close(_losses(model, examples, tokenizer.pad_token_id), bare)
        with adapters_enabled(model):
            torch.testing.assert_close(_losses(model, examples, tokenizer.pad_token_id), on)
        torch.testing.assert_close(_losses(model, examples, tokenizer.pad_token_id), bare)
    torch.testing.assert_close(_losses(model, examples, tokenizer.pad_token_id), on)


def _config(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("body, expected", [
    ('adaptation = "prompt_tuning"\n[matrix]\ndefenses = [{ name = "dp_sgd", noise_multiplier = 1.0 }]',
     "dp_sgd cannot train model.adaptation = 'prompt_tuning': peft computes the soft prompt once per batch"),
    ('adaptation = "ia3"\n[matrix]\ndefenses = [{ name = "dp_sgd", noise_multiplier = 1.0 }]',
     "dp_sgd cannot train model.adaptation = 'ia3': Opacus has no per-sample gradient rule"),
    ('adaptation = "ia3"\n[matrix]\nattacks = [{ name = "vocabulary", observers = ["upload"] }]',
     "vocabulary cannot probe model.adaptation = 'ia3': it reads the span of the updates of LoRA's A factors"),
    ('adaptation = "full"\ndtype = "bfloat16"', "model.dtype = 'bfloat16': model.adaptation = 'full' trains the base "
                                               "weights themselves, which must be float32"),
    ('adaptation = "full"\nquantization = "4bit"', "model.quantization = '4bit': model.adaptation = 'full'"),
    ('adaptation = "adapter"', "model.adaptation = 'adapter'"),
    ('adaptation = "prompt_tuning"\n[model.prompt_tuning]\nnum_virtual_tokens = 0',
     "model.prompt_tuning.num_virtual_tokens = 0: must be a positive integer"),
    ('adaptation = "ia3"\n[model.ia3]\ntarget_modules = ["q_proj"]\nfeedforward_modules = ["down_proj"]',
     "model.ia3.feedforward_modules must be a subset of model.ia3.target_modules"),
])
def test_the_config_refuses_what_a_method_cannot_do_in_one_line(tmp_path, body, expected):
    with pytest.raises(FedleakError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        _config(tmp_path, f"[model]\n{body}\n")
    assert "\n" not in str(info.value)


def test_the_training_key_holds_the_method_and_its_table_only(tmp_path):
    lora = model_fingerprint(_config(tmp_path, "[model]\n"))
    assert lora["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    assert "adaptation" not in lora  # LoRA trainings keep their keys
    soft = model_fingerprint(_config(tmp_path, '[model]\nadaptation = "prompt_tuning"\n[model.lora]\nr = 4\n'))
    assert soft["adaptation"] == "prompt_tuning" and "lora" not in soft
    assert soft["prompt_tuning"] == {"num_virtual_tokens": 20, "init": "sample_vocab", "lr": None}


def test_a_soft_prompt_federation_end_to_end(tmp_path, tiny_run_config):
    """`fedleak run` with prompt tuning: trainings with and without DP-FedAvg, black-box and update attacks on
    every view, results that validate, checkpoints that hold the soft prompt only."""
    (tmp_path / "run.toml").write_text(tiny_run_config + """
[model]
adaptation = "prompt_tuning"
[model.prompt_tuning]
num_virtual_tokens = 8
[matrix]
algorithms = ["fedit", { name = "locit_sa", synthetic_per_round = 2, max_attempts = 4 }]
defenses = ["none", { name = "dp_fedavg", noise_multiplier = 0.5, clip_norm = 1.0 }]
attacks = [{ name = "loss", observers = ["global", "upload", "client"] }, "exposure",
           { name = "update_gradient", observers = ["upload"] }]
""")
    out = tmp_path / "out"
    from fedleak.cli import main

    assert main(["run", str(tmp_path / "run.toml"), "--out", str(out), "--quiet"]) == 0  # in process: no new imports
    assert main(["validate", str(out / "results.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {t["defense"] for t in results["trainings"] if t["algorithm"] == "fedit"} == {
        "none", "dp_fedavg(clip_norm=1.0,noise_multiplier=0.5)"}
    fedit = next(t for t in results["trainings"] if (t["algorithm"], t["defense"]) == ("fedit", "none"))
    from safetensors.torch import load_file

    files = sorted((out / fedit["checkpoint_dir"]).rglob("*.safetensors"))
    assert files
    for f in files:
        tensors = load_file(f)
        assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape[0] == 8
        hidden = tensors["prompt_embeddings"].shape[1]
    assert fedit["cost"]["upload_bytes_per_client_per_round"] == 8 * hidden * 4
    cells = [c for c in results["cells"] if not c.get("error")]
    assert {(c["attack_name"], c["observer"]) for c in cells} >= {("loss", "global"), ("loss", "upload"),
                                                                    ("loss", "client"), ("exposure", "global"),
                                                                    ("update_gradient", "upload")}
    assert all(np.isfinite(c["metrics"]["auc"]) for c in cells if "auc" in c["metrics"])
    assert "model.adaptation = prompt_tuning" in (out / "report.md").read_text()


def test_a_method_with_its_own_learning_rate_trains_and_is_attacked_with_it(small_model_path, tmp_path):
    """model.prompt_tuning.lr reaches every client's optimizer and the attackers' shadow/reference fine-tunes."""
    from fedleak.defenses.base import Defense
    from fedleak.eval.context import seed_context
    from fedleak.federated.data import FederatedData
    from fedleak.federated.fedit import FedIT
    from fedleak.federated.loop import run_rounds
    from fedleak.federated.rounds import FederationSettings, TrainingSetup

    class Seen(Defense):
        def __init__(self):
            self.lrs = []

        def train_client(self, job):
            self.lrs.append(job.settings.lr)
            return job.run()

    records = generate_records(8, seed=0, purpose="t", private=True)
    base, tokenizer = load_base_model(small_model_path)
    hooks = Seen()
    run_rounds(TrainingSetup(base_model=base, tokenizer=tokenizer, federation=FederationSettings(
        clients=2, rounds=1, local_epochs=1, batch_size=4, lr=5e-3, min_records_per_client=1),
        data=FederatedData(clients=[records[:4], records[4:]], heldout=records[:2]),
        adapter=PromptTuningSettings(num_virtual_tokens=4, lr=0.07), hooks=hooks, seed=0, out_dir=tmp_path / "t",
        config_hash="h", progress=False), FedIT())
    assert hooks.lrs == [0.07, 0.07]
    small = "[model.embedded]\npretrain_steps = 200\npublic_records = 2000\n"  # the cached small model
    config = _config(tmp_path, '[model]\nadaptation = "prompt_tuning"\n' + small +
                     '[model.prompt_tuning]\nlr = 0.07\n[federation]\nlr = 0.005\n')
    assert seed_context(config, 0, tmp_path).environment(tokenizer).train.lr == 0.07
    lora = _config(tmp_path, small + '[federation]\nlr = 0.005\n')
    assert seed_context(lora, 0, tmp_path).environment(tokenizer).train.lr == 0.005


def test_a_combination_the_rules_cut_out_is_not_refused(tmp_path):
    config = _config(tmp_path, '[model]\nadaptation = "ia3"\n[matrix]\ndefenses = ["none", { name = "dp_sgd", '
                               'noise_multiplier = 1.0 }]\nexclude = [{ defense = "dp_sgd" }]\n')
    from fedleak.eval.plan import all_trainings

    assert [u.label for u in all_trainings(config)] == ["fedit/none"]
