import torch

from fedleak.defenses.base import Defense
from fedleak.federated import checkpoint
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import FederatedData, generate_records
from fedleak.federated.fedit import FedIT
from fedleak.federated.loop import run_rounds
from fedleak.federated.rounds import FederationSettings, TrainingSetup
from fedleak.federated.model import load_base_model
from fedleak.federated.training import IGNORE, TrainSettings, batches, encode, sequence_losses, train_adapter

FED = FederationSettings(clients=2, rounds=2, local_epochs=1, batch_size=4, min_records_per_client=1)


def _data():
    records = generate_records(12, seed=0, purpose="t", private=True)
    return FederatedData(clients=[records[:5], records[5:]], heldout=generate_records(4, seed=0, purpose="h", private=True))


def test_encode_masks_prompt_tokens(small_model_path):
    _, tokenizer = load_base_model(small_model_path)
    record = _data().clients[0][0]
    example = encode([record], tokenizer, max_length=256)[0]
    response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(example.input_ids) - len(response)
    assert example.labels[:n_prompt] == (IGNORE,) * n_prompt
    assert list(example.labels[n_prompt:]) == response == list(example.input_ids[n_prompt:])
    full = encode([record], tokenizer, max_length=256, response_only=False)[0]
    assert full.labels == full.input_ids
    assert len(encode([record], tokenizer, max_length=10)[0].input_ids) == 10


@torch.no_grad()
def mean_loss(model, examples, *, batch_size: int, pad_id: int) -> float:
    model.eval()
    return float(torch.cat([sequence_losses(model, b) for b in batches(examples, batch_size=batch_size, pad_id=pad_id)]).mean())


def test_lora_training_lowers_the_loss_on_its_data(small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    examples = encode(_data().clients[0], tokenizer, max_length=256)
    before = mean_loss(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id)
    train_adapter(model, examples, TrainSettings(epochs=10, batch_size=5, lr=3e-3), pad_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    after = mean_loss(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id)
    assert after < 0.8 * before


def _run(tmp_path, small_model_path, hooks, name):
    base, tokenizer = load_base_model(small_model_path)
    return run_rounds(TrainingSetup(base_model=base, tokenizer=tokenizer, data=_data(), federation=FED,
                                    adapter=LoraSettings(r=4, alpha=8), hooks=hooks, seed=5, out_dir=tmp_path / name,
                                    config_hash="h", progress=False), FedIT())


def test_fedit_is_deterministic_and_checkpoints_every_view(tmp_path, small_model_path):
    a = _run(tmp_path, small_model_path, Defense(), "a")
    b = _run(tmp_path, small_model_path, Defense(), "b")
    assert checkpoint.rounds(a.training_dir) == [0, 1, 2]
    for rnd in (1, 2):
        ma, mb = (checkpoint.read_manifest(checkpoint.round_dir(r.training_dir, rnd)) for r in (a, b))
        assert ma["files"] == mb["files"]  # same sha256 for global and every upload
        assert set(ma["views"]) == {"global", "upload/0", "upload/1", "client/0", "client/1"}
        assert ma["views"]["client/0"] == ma["views"]["upload/0"]  # a FEDIT client keeps what it uploads
        assert ma["num_examples"] == {"0": 5, "1": 7}
    final = checkpoint.load_view(checkpoint.round_dir(a.training_dir, 2), "global")["default"]
    # FedAvg: the global adapter is the example-weighted mean of the round's uploads.
    folder = checkpoint.round_dir(a.training_dir, 2)
    up0, up1 = (checkpoint.load_view(folder, "upload", c)["default"] for c in (0, 1))
    for key in final:
        torch.testing.assert_close(final[key], (5 * up0[key] + 7 * up1[key]) / 12)


def test_hooks_are_called_and_replace_aggregation(tmp_path, small_model_path):
    calls = []

    class KeepInitial(Defense):
        def train_client(self, job):
            calls.append(("train", job.round, job.client))
            return job.run()

        def aggregate(self, updates, *, info):
            calls.append(("aggregate", info.round, tuple(u.client for u in updates)))
            return self.initial

        def before_aggregation(self, updates, *, global_state, info):
            self.initial = global_state if info.round == 1 else self.initial
            return updates

    run = _run(tmp_path, small_model_path, KeepInitial(), "k")
    assert calls == [("train", 1, 0), ("train", 1, 1), ("aggregate", 1, (0, 1)),
                     ("train", 2, 0), ("train", 2, 1), ("aggregate", 2, (0, 1))]
    initial = checkpoint.load_view(checkpoint.round_dir(run.training_dir, 0), "global")["default"]
    final = checkpoint.load_view(checkpoint.round_dir(run.training_dir, 2), "global")["default"]
    assert all(torch.equal(initial[k], final[k]) for k in initial)


def test_secure_aggregation_leaves_no_upload_view(tmp_path, small_model_path):
    from fedleak.defenses.secagg import SecAgg

    run = _run(tmp_path, small_model_path, SecAgg(), "s")
    plain = _run(tmp_path, small_model_path, Defense(), "p")
    for rnd in (1, 2):
        views = checkpoint.available_views(checkpoint.round_dir(run.training_dir, rnd))
        assert views == ["global", "client/0", "client/1"]
        assert not list(checkpoint.round_dir(run.training_dir, rnd).glob("upload-*"))
        # The aggregate is the same as without it: only what the server sees changes.
        same = [checkpoint.read_manifest(checkpoint.round_dir(r.training_dir, rnd))["files"]["global"] for r in (run, plain)]
        assert same[0] == same[1]
