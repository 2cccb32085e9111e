"""Full fine-tuning (model.adaptation = "full", federated/full.py): named copies of every base parameter
behind the adapter interface, and a federation that trains, defends, checkpoints and is attacked with it."""

import json

import numpy as np
import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.federated.adapters import (DEFAULT, activate, add_named_adapter, add_peft_adapter, apply_view,
                                        get_adapter_state, set_adapter_state)
from fedleak.federated.data import generate_records
from fedleak.federated.methods import FullSettings
from fedleak.federated.model import load_base_model
from fedleak.federated.training import collate, encode, sequence_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_copies_switch_and_train_alone(small_model_path):
    """A second copy (an attack's shadow or reference) starts at the base, trains alone, and leaves the view's
    copy as it was; an unknown copy and deleting the active one are refused in one line (copies on together:
    tests/test_parameter_isolation.py)."""
    base, tokenizer = load_base_model(small_model_path)
    batch = collate(encode(generate_records(3, seed=5, purpose="t", private=True), tokenizer, max_length=128),
                    tokenizer.pad_token_id)
    with torch.no_grad():
        bare = sequence_losses(base, batch)
    model = add_peft_adapter(base, FullSettings(), seed=0)
    view = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
            for k, v in get_adapter_state(model).items()}
    apply_view(model, {DEFAULT: view}, FullSettings())
    with torch.no_grad():
        seen = sequence_losses(model, batch)
    assert not torch.allclose(seen, bare)
    add_named_adapter(model, "shadow", FullSettings(), seed=1)
    activate(model, ["shadow"], trainable="shadow")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(view) and all(p is model.adapter_tensors("shadow")[k]
                                               for k, p in zip(model.adapter_tensors("shadow"), trainable))
    with torch.no_grad():
        torch.testing.assert_close(sequence_losses(model, batch), bare)  # a new copy starts at the base
    sequence_losses(model, batch).mean().backward()
    with torch.no_grad():
        for p in trainable:
            p.sub_(1e-2 * p.grad)
    model.zero_grad(set_to_none=True)
    activate(model, [DEFAULT])
    model.delete_adapter("shadow")
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(sequence_losses(model, batch), seen)
    assert all(torch.equal(get_adapter_state(model)[k], view[k]) for k in view)
    for call, expected in [(lambda: activate(model, [DEFAULT, "local"]), "no adapter named 'local'"),
                           (lambda: model.delete_adapter(DEFAULT), "is active: activate another"),
                           (lambda: set_adapter_state(model, {k: v for k, v in view.items() if "norm" not in k}),
                            "adapter lacks .* tensors")]:
        with pytest.raises(FedleakError, match=expected) as info:
            call()
        assert "\n" not in str(info.value)


def test_a_full_fine_tuning_federation_end_to_end(tmp_path, tiny_run_config, small_model_path):
    """`fedleak run` with full fine-tuning: FEDIT with no defense, a robust rule and DP-SGD (every parameter's
    per-record gradient through Opacus, its epsilon reported), black-box attacks on every view with their blind
    baselines (the base's own weights), the shadow-model and self-prompt attacks (their own copies), the
    update attack, checkpoints holding every base parameter once."""
    (tmp_path / "run.toml").write_text(tiny_run_config + """
[model]
adaptation = "full"
[model.full]
lr = 1e-3
[matrix]
algorithms = ["fedit"]
defenses = ["none", "median", { name = "dp_sgd", target_epsilon = 8.0 }]
attacks = [{ name = "loss", observers = ["global", "upload", "client"] },
           { name = "lira", shadow_models = 2, epochs = 1, observers = ["global"] },
           { name = "spv_mia", prompts = 8, max_new_tokens = 16, epochs = 1, observers = ["global"] },
           { name = "update_gradient", observers = ["upload"] }]
exclude = [{ defense = "!none", attack = "lira|spv_mia" }]
""")
    out = tmp_path / "out"
    from fedleak.cli import main

    assert main(["run", str(tmp_path / "run.toml"), "--out", str(out), "--quiet"]) == 0  # in process: no new imports
    results = json.loads((out / "results.json").read_text())
    from fedleak.eval.results import validate_results

    validate_results(results)
    plain, median, private = results["trainings"]
    assert (plain["defense"], median["defense"], private["defense"]) == ("none", "median", "dp_sgd(target_epsilon=8.0)")
    assert 7.0 < private["privacy"]["record_level_epsilon"] <= 8.0
    from safetensors.torch import load_file

    base, _ = load_base_model(small_model_path)  # the run's embedded model
    names = {n: p.numel() for n, p in base.named_parameters()}  # tied parameters once
    files = sorted((out / plain["checkpoint_dir"]).rglob("*.safetensors"))
    assert files and all({k: v.numel() for k, v in load_file(f).items()} == names for f in files)
    assert plain["cost"]["upload_bytes_per_client_per_round"] == sum(names.values()) * 4
    cells = [c for c in results["cells"] if not c.get("error")]
    assert {(c["attack_name"], c["observer"]) for c in cells if c["defense"] == "none"} >= {
        ("loss", "global"), ("loss", "upload"), ("loss", "client"), ("lira", "global"), ("spv_mia", "global"),
        ("update_gradient", "upload")}
    loss = [c for c in cells if c["attack_name"] == "loss" and c["observer"] == "global"]
    assert len(loss) == 3 and all(np.isfinite(c["metrics"]["auc"]) for c in loss)
    # The blind baseline scores the base's own weights: the same records give the same AUC whatever trained.
    assert len({c["metrics"]["blind_auc"] for c in loss}) == 1 and len({c["metrics"]["auc"] for c in loss}) == 3
    report = (out / "report.md").read_text()
    assert "model.adaptation = full" in report and f"{private['privacy']['record_level_epsilon']:.2f}" in report
