"""Every common architecture through every algorithm, defense and attack family (issue 16's sweep).

Tiny randomly initialised instances of real architectures (tests/tiny_archs.py: GPT-2's Conv1D and
no pad token, Llama, Qwen2 with a chat template, Mistral with left padding, Gemma 2, Phi-3's fused
qkv, OPT, GPT-NeoX, Mixtral's experts) run `fedleak run` with FEDIT, FEDPIT, DP-SGD and a robust rule
and the loss / min_k_pp / reference / lira / exposure / discoverable attacks, with each family's usual
LoRA targets; then with "all-linear", where DP-SGD must either train or be refused in one line before
any step (OPT's flattened MLP gives per-token gradients, Mixtral's router and experts none).
A random model fits nothing, so the report must say so instead of presenting chance as privacy. Prefix
tuning, whose cache layout peft builds per architecture, is checked on each against the whole forward, and
full fine-tuning, whose tied weights and per-record gradients differ per architecture, on each too.
"""

from __future__ import annotations

import json

import pytest

from fedleak.cli import main
from tests.tiny_archs import FAMILIES, LORA_TARGETS

# DP-SGD with LoRA on every linear layer: refused where Opacus's per-sample gradients are not per record.
REFUSED_ALL_LINEAR = {"opt": "per token, not per record", "mixtral": "dp_sgd: "}

HEAD = """
[model]
name = "{folder}"

[model.lora]
r = 4
alpha = 8
target_modules = {targets}

[data.embedded]
private_records = 24
heldout_records = 12
canary_repetitions = [2]
canaries_per_repetition = 1
audit_canaries = 0

[federation]
clients = 2
rounds = 2
local_epochs = 1
batch_size = 4
min_records_per_client = 2
max_length = 96

[utility]
records = 4
max_new_tokens = 8

[attack]
bootstrap = 50
"""

FULL = """
[matrix]
algorithms = ["fedit", { name = "fedpit", synthetic_per_round = 2, max_attempts = 4 }]
defenses = ["none", { name = "dp_sgd", noise_multiplier = 1.0 }, "median"]
exclude = [{ algorithm = "fedpit", defense = "!none" }]
attacks = [
    { name = "loss", observers = ["global", "upload", "client"] },
    { name = "min_k_pp", observers = ["global"] },
    { name = "reference", observers = ["global"] },
    { name = "lira", shadow_models = 2, epochs = 1, observers = ["global"] },
    { name = "exposure", samples = 20 },
    { name = "discoverable", max_records = 4 },
]
"""

DP_ONLY = """
[matrix]
algorithms = ["fedit"]
defenses = [{ name = "dp_sgd", noise_multiplier = 1.0 }]
attacks = [{ name = "loss", observers = ["global"] }]
"""


@pytest.fixture(scope="module")
def tiny_models(tiny_model_path):
    return {family: tiny_model_path(family) for family in FAMILIES}


def _run(tmp_path, folder, targets, matrix, capsys):
    config = tmp_path / "c.toml"
    config.write_text(HEAD.format(folder=folder, targets=json.dumps(list(targets)) if not isinstance(targets, str)
                                  else json.dumps(targets)) + matrix)
    rc = main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_every_algorithm_defense_and_attack_runs(family, tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, err = _run(tmp_path, tiny_models[family], LORA_TARGETS[family], FULL, capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    trainings = {(t["algorithm_name"], t["defense_name"]) for t in results["trainings"]}
    assert trainings == {("fedit", "none"), ("fedit", "dp_sgd"), ("fedit", "median"), ("fedpit", "none")}
    dp = next(t for t in results["trainings"] if t["defense_name"] == "dp_sgd")
    assert dp["privacy"]["record_level_epsilon"] > 0
    cells = results["cells"]
    assert {c["attack_name"] for c in cells} >= {"loss", "min_k_pp", "reference", "lira", "exposure", "discoverable"}
    failed = [(c["attack"], c["observer"], c["error"]) for c in cells if c.get("error")]
    assert not failed, failed
    membership = [c for c in cells if c["family"] == "membership"]
    assert membership and all(c["metrics"]["auc"] is not None and c["metrics"]["blind_auc"] is not None
                              for c in membership)
    # A random model fits nothing: the report opens with the warning, not with "leakage at chance".
    assert not results["model_fit"]["fits"]
    assert "perplexity" in {p["check"] for p in results["model_fit"]["problems"]}
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("Warning: the model does not fit the data") < report.index("Membership")


@pytest.mark.parametrize("family", FAMILIES)
def test_dp_sgd_on_all_linear_trains_or_is_refused_in_one_line(family, tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, err = _run(tmp_path, tiny_models[family], "all-linear", DP_ONLY, capsys)
    if family in REFUSED_ALL_LINEAR:
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and REFUSED_ALL_LINEAR[family] in lines[-1] and "target_modules" in lines[-1], err
        assert "Traceback" not in err and not (tmp_path / "out" / "results.json").exists()
    else:
        assert rc == 0, err
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        assert results["trainings"][0]["privacy"]["record_level_epsilon"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_on_every_architecture_is_scored_and_generates_as_its_whole_forward(family, tiny_models, one_thread):
    """Prefix tuning (peft's per-architecture cache layouts; Gemma 2's sliding window, which left padding between
    the prefix and the text would shift): the real-word init against its definition and its size against the
    memory estimate, greedy batched generation and exposure's cached scoring against the prefixed model's whole
    forward."""
    import torch

    from fedleak.federated.adapters import adapter_parameters, add_peft_adapter
    from fedleak.federated.data import generate_records
    from fedleak.federated.methods import PrefixTuningSettings
    from fedleak.federated.model import load_base_model
    from fedleak.federated.prompts import prompt_ids
    from fedleak.federated.training import encode
    from tests.adaptation_checks import check_exposure_and_gcg, check_greedy_generation, check_prefix_init

    base, tokenizer = load_base_model(tiny_models[family])
    settings = PrefixTuningSettings(num_virtual_tokens=4)
    model = add_peft_adapter(base, settings, seed=0)
    model.eval()
    check_prefix_init(model, tokenizer, settings)  # peft's row layout per architecture, GQA's narrower keys
    with torch.no_grad():
        weight = adapter_parameters(model)["prompt_embeddings"]
        weight.add_(0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    records = generate_records(3, seed=4, purpose="g", private=True)
    check_greedy_generation(model, tokenizer, [prompt_ids(tokenizer, r.instruction, r.input) for r in records])
    check_exposure_and_gcg(model, tokenizer, encode(records[:1], tokenizer, max_length=256)[0])


# Full fine-tuning under DP-SGD: refused where a parameter has no per-record gradient in Opacus.
REFUSED_FULL = {"gpt2": "transformer.wpe are not one per record", "gemma2": "model.embed_tokens make Opacus fail",
                "opt": "model.decoder.layers.*.fc1", "mixtral": "model.layers.*.mlp.gate"}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_on_every_architecture_trains_every_parameter_once_and_keeps_the_base(
        family, tiny_models, one_thread):
    """Full fine-tuning: every parameter in the state once (tied ones too, and tied they stay), its size the
    memory estimate's, the base's own weights untouched and back inside disable_adapter(), and DP-SGD's probe
    passing or refusing in one line before any step."""
    import torch

    from fedleak.common.errors import FedleakError
    from fedleak.defenses.dp_probe import check_per_sample_gradients
    from fedleak.eval.memory import shape_of
    from fedleak.federated.adapters import add_peft_adapter, get_adapter_state, strip_adapters
    from fedleak.federated.data import generate_records
    from fedleak.federated.methods import FullSettings
    from fedleak.federated.model import load_base_model
    from fedleak.federated.training import TrainSettings, collate, encode, sequence_losses, train_adapter

    base, tokenizer = load_base_model(tiny_models[family])
    own = {n: p.detach().clone() for n, p in base.named_parameters()}
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    examples = encode(generate_records(4, seed=2, purpose="t", private=True), tokenizer, max_length=96)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        bare = sequence_losses(base, batch)
    model = add_peft_adapter(base, FullSettings(), seed=0)
    state = get_adapter_state(model)
    assert sorted(state) == sorted(own) and sum(v.numel() for v in state.values()) == shape_of(base.config).params
    train_adapter(model, examples, TrainSettings(epochs=1, batch_size=2, lr=1e-3), pad_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    model.eval()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    assert (head.weight is embedding.weight) == tied and head.weight.requires_grad  # tied ones stay tied
    trained = get_adapter_state(model)
    assert sum(not torch.equal(trained[k], own[k]) for k in own) > len(own) // 2
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(sequence_losses(model, batch), bare)
    try:
        check_per_sample_gradients(model, examples, tokenizer.pad_token_id)
        assert family not in REFUSED_FULL
    except FedleakError as exc:
        assert family in REFUSED_FULL and REFUSED_FULL[family] in str(exc) and "\n" not in str(exc), str(exc)
        assert "full fine-tuning trains every parameter" in str(exc)
    strip_adapters(base)
    assert all(torch.equal(p, own[n]) for n, p in base.named_parameters())
