"""FEDPIT's parameter isolation with every adaptation method: a global and a local adapter of one kind on
together (federated/adapters.py `activate`), the local one training, and a federation that runs, defends and
is attacked with it."""

import json

import numpy as np
import pytest
import torch

from fedleak.common.errors import FedleakError
from fedleak.defenses.dp_probe import check_per_sample_gradients
from fedleak.eval import memory
from fedleak.eval.config import parse_config
from fedleak.federated.adapters import (DEFAULT, activate, add_named_adapter, add_peft_adapter, get_adapter_state,
                                        set_adapter_state, trainable_adapter)
from fedleak.federated.data import generate_records
from fedleak.federated.methods import FullSettings, PrefixTuningSettings, PromptTuningSettings
from fedleak.federated.model import load_base_model
from fedleak.federated.training import collate, encode, sequence_losses

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3  # virtual tokens of each soft prompt or prefix

METHODS = {"full": FullSettings(), "prompt_tuning": PromptTuningSettings(num_virtual_tokens=N),
           "prefix_tuning": PrefixTuningSettings(num_virtual_tokens=N)}


def _nudged(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def _reference(model, method, own, g, l):
    """What the two adapters on together must equal, as one adapter named "whole": full fine-tuning's copy
    base + (g - base) + (l - base); a soft prompt's or prefix's 2N rows, the global's first."""
    if method == "full":
        add_named_adapter(model, "whole", METHODS[method], seed=0)
        set_adapter_state(model, {k: g[k] + (l[k] - own[k]) for k in g}, "whole")
    else:
        add_named_adapter(model, "whole", type(METHODS[method])(num_virtual_tokens=2 * N), seed=0)
        set_adapter_state(model, {"prompt_embeddings": torch.cat([g["prompt_embeddings"], l["prompt_embeddings"]])},
                          "whole")


def _near(got, want, rel=1e-4):
    """Within `rel` of `want` in relative L2: the combination and the reference round differently."""
    assert (got - want).norm() <= rel * want.norm(), ((got - want).norm(), want.norm())


def _step(model, batch):
    """One SGD step (lr 0.1) on the trainable parameters, through `.data` as some optimizers write (no version
    bump: the full model's write-back must not rely on one); returns their gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    sequence_losses(model, batch).mean().backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.data.sub_(0.1 * p.grad)
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("method", list(METHODS))
def test_a_global_and_a_local_adapter_combine_and_only_the_local_one_trains(small_model_path, method):
    """On together the two act as the reference combination (outputs, and the local adapter's gradient: the
    reference's, its rows for a prompt); a step moves the local adapter only, by the reference's step; the
    global one alone acts as before, bit for bit; the blind baseline is the base."""
    base, tokenizer = load_base_model(small_model_path)
    own = {k: v.detach().clone() for k, v in base.named_parameters()}
    batch = collate(encode(generate_records(3, seed=5, purpose="t", private=True), tokenizer, max_length=96),
                    tokenizer.pad_token_id)
    with torch.no_grad():
        bare = sequence_losses(base, batch)
    model = add_peft_adapter(base, METHODS[method], seed=0)
    add_named_adapter(model, "local", METHODS[method], seed=1)
    g, l = _nudged(get_adapter_state(model), 1), _nudged(get_adapter_state(model, "local"), 2)
    set_adapter_state(model, g)
    set_adapter_state(model, l, "local")
    with torch.no_grad():
        alone = sequence_losses(model, batch)
    _reference(model, method, own, g, l)

    activate(model, ["whole"], trainable="whole")
    with torch.no_grad():
        expected = sequence_losses(model, batch)
    ref_before = get_adapter_state(model, "whole")
    ref_grads = _step(model, batch)
    ref_moved = {k: get_adapter_state(model, "whole")[k] - ref_before[k] for k in ref_before}

    activate(model, [DEFAULT, "local", DEFAULT], trainable="local")  # a name twice counts once
    assert model.active_adapters in (["default+local"], [DEFAULT, "local"]) and trainable_adapter(model) == "local"
    assert get_adapter_state(model, "local").keys() == l.keys()
    assert all(torch.equal(get_adapter_state(model, "local")[k], l[k]) for k in l)  # read back untrained: exact
    with torch.no_grad():
        combined = sequence_losses(model, batch)
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(combined, alone, atol=1e-3)
    grads = _step(model, batch)
    moved = {k: get_adapter_state(model, "local")[k] - l[k] for k in l}
    if method == "full":
        assert len(grads) == len(ref_grads)
        for got, want in zip(grads, ref_grads):
            _near(got, want)
        for k in moved:  # a difference of nearby weights: relative rounding grows
            _near(moved[k], ref_moved[k], rel=1e-2)
    else:  # the prompt's trainable rows are the local ones: the reference's last N rows
        (got,), (want,) = grads, ref_grads
        _near(got, want[N:])
        _near(moved["prompt_embeddings"], ref_moved["prompt_embeddings"][N:])
    assert max(v.abs().max() for v in moved.values()) > 1e-4
    assert all(torch.equal(get_adapter_state(model)[k], g[k]) for k in g)  # the global adapter never moved

    activate(model, [DEFAULT], trainable=DEFAULT)
    with torch.no_grad():
        assert torch.equal(sequence_losses(model, batch), alone)
    activate(model, [DEFAULT, "local"])
    assert not any(p.requires_grad for p in model.parameters())
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(sequence_losses(model, batch), bare)
    # A local adapter deleted and added anew is the one combined then (not the old one's tensors).
    activate(model, [DEFAULT])
    model.delete_adapter("local")
    add_named_adapter(model, "local", METHODS[method], seed=3)
    set_adapter_state(model, l, "local")
    activate(model, [DEFAULT, "local"])
    with torch.no_grad():
        torch.testing.assert_close(sequence_losses(model, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "prefix_tuning"])
def test_opacus_gives_the_local_adapter_per_record_gradients_behind_the_global_one(small_model_path, method):
    """DP-SGD's probe (each record's Opacus row against its own autograd gradient) passes for the local adapter
    trained behind the global one; a prefix shared by two adapters is hooked once, not twice (each per-record
    gradient would be doubled)."""
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, METHODS[method], seed=0)
    add_named_adapter(model, "local", METHODS[method], seed=1)
    set_adapter_state(model, _nudged(get_adapter_state(model), 1))
    activate(model, [DEFAULT, "local"], trainable="local")
    examples = encode(generate_records(3, seed=5, purpose="t", private=True), tokenizer, max_length=64)
    check_per_sample_gradients(model, examples, tokenizer.pad_token_id)  # raises on a wrong row
    assert [n for n, p in model.named_parameters() if p.requires_grad]


def test_the_checks_count_both_adapters():
    """Two soft prompts take twice the positions; full fine-tuning holds the local copy and the copies' sum."""
    def config(method, algorithm, **federation):
        return parse_config({"model": {"device": "cpu", "adaptation": method},
                             "federation": {"batch_size": 1, "max_length": 64, **federation},
                             "matrix": {"algorithms": [algorithm], "defenses": ["none"]}})
    fedit, fedpit = (memory.estimate(config("full", a), available=1 << 40) for a in ("fedit", {"name": "fedpit"}))
    hf_config = memory.model_config(config("full", "fedit"))
    params = memory.shape_of(hf_config).params
    assert fedpit.phases["client training"] - fedit.phases["client training"] == 2 * params * 4
    memory.check_positions(config("prompt_tuning", "fedit", max_length=1000), hf_config)
    with pytest.raises(FedleakError, match=r"max_length = 1000 plus a soft prompt's or prefix's 40 virtual tokens "
                                           r"exceeds the 1024 positions .* lower federation.max_length to 984"):
        memory.check_positions(config("prompt_tuning", "fedpit", max_length=1000), hf_config)


def test_fedpit_with_each_method_end_to_end(tmp_path, tiny_run_config):
    """`fedleak run` of FEDPIT over full fine-tuning, a soft prompt and a prefix (DP-SGD on the prefix): each
    client's local adapter, of the global's kind, is checkpointed beside its upload and is in its view; the global
    and client views are attacked; the epsilon is reported. (Uploads are single adapters, as FEDIT's.)"""
    (tmp_path / "run.toml").write_text(tiny_run_config + """
[model]
adaptation = "full"
[model.full]
lr = 1e-3
[model.prompt_tuning]
num_virtual_tokens = 8
lr = 0.1
[model.prefix_tuning]
num_virtual_tokens = 4
lr = 0.05
[matrix]
algorithms = [{ name = "fedpit", synthetic_per_round = 2, max_attempts = 4 }]
adaptations = ["full", "prompt_tuning", "prefix_tuning"]
defenses = ["none", { name = "dp_sgd", target_epsilon = 8.0 }]
attacks = [{ name = "loss", observers = ["global", "client"] }]
exclude = [{ setting = "!adaptation=prefix_tuning", defense = "dp_sgd*" }]
""")
    out = tmp_path / "out"
    from fedleak.cli import main

    assert main(["run", str(tmp_path / "run.toml"), "--out", str(out), "--quiet"]) == 0  # in process
    assert main(["validate", str(out / "results.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    trainings = {(t.get("setting") or {}).get("value", "full") + "/" + t["defense_name"]: t for t in results["trainings"]}
    assert set(trainings) == {"full/none", "prompt_tuning/none", "prefix_tuning/none", "prefix_tuning/dp_sgd"}
    assert 7.0 < trainings["prefix_tuning/dp_sgd"]["privacy"]["record_level_epsilon"] <= 8.0
    from safetensors.torch import load_file

    for key, t in trainings.items():
        final = sorted((out / t["checkpoint_dir"]).glob("round-*"))[-1]
        glob, locals_ = load_file(final / "global.safetensors"), sorted(final.glob("local-client-*.safetensors"))
        assert locals_ and len(locals_) == len(list(final.glob("upload-client-*.safetensors")))
        for f in locals_:  # a local adapter of the global's kind, trained away from it
            local = load_file(f)
            assert {k: v.shape for k, v in local.items()} == {k: v.shape for k, v in glob.items()}
            assert any(not torch.equal(local[k], glob[k]) for k in glob)
        assert t["cost"]["upload_bytes_per_client_per_round"] == 4 * t["adapter_parameters"]
        if key.endswith("/none"):  # the client's view holds its local adapter, fitted to its own records
            assert t["utility"]["client_mean"]["loss"] < t["utility"]["global"]["loss"], key
    cells = [c for c in results["cells"] if not c.get("error")]
    assert len(cells) == len(results["cells"]) == 4 * 4  # the global view and 3 clients' (global + local)
    assert all(np.isfinite(c["metrics"]["auc"]) and np.isfinite(c["metrics"]["blind_auc"]) for c in cells)
