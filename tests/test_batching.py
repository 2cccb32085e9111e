"""Packed batches and the output head at target positions leave every record's loss and gradient what a
right-padded batch with full logits gives (federated/batching.py)."""

import pytest
import torch

from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.batching import (IGNORE, collate_packed, pack_rows, packing_ok, padded_segments,
                                        row_losses)
from fedleak.federated.data import generate_records
from fedleak.federated.model import load_base_model
from fedleak.federated.training import Example, TrainSettings, collate, encode, token_logprobs, train_adapter


def _examples(tokenizer, n=12):
    """Records of mixed lengths plus short ones, so that some packed rows hold several records."""
    examples = list(encode(generate_records(n, seed=3, purpose="pack", private=True), tokenizer, max_length=256))
    short = [Example(e.input_ids[:k], e.labels[:k]) for e, k in zip(examples[:4], (9, 17, 25, 40))]
    short[0] = Example(short[0].input_ids, (IGNORE,) * 9)  # a record without a target: loss 0 in both
    return examples + short


def _full_logit_losses(model, batch):
    """The reference: logits at every position, masked mean per row (what training did before)."""
    picked, mask, _ = token_logprobs(model, batch)
    return -(picked.sum(1) / mask.sum(1).clamp(min=1))


def _loss_and_grads(model, losses_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    losses = losses_fn()
    losses.mean().backward()
    return losses.detach(), [p.grad.detach().clone() for p in params]


@pytest.fixture(scope="module")
def lora(small_model_path):
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8, target_modules="all-linear"), seed=0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters weights so their gradients mean something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


def test_pack_rows_places_every_index_once_within_the_width():
    lengths = [9, 5, 3, 9, 1, 4, 4, 8]
    rows = pack_rows(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows)
    assert len(rows) == 5  # 9 | 9 | 8+1 | 5+4 | 4+3: first-fit decreasing
    assert pack_rows(lengths, 9) == rows


def test_collate_packed_restarts_positions_and_cuts_labels_at_boundaries():
    a, b = Example((5, 6, 7, 8), (5, 6, 7, 8)), Example((9, 10), (IGNORE, 10))
    c = Example((11, 12, 13, 14, 15, 16), (11, 12, 13, 14, 15, 16))
    batch, segments = collate_packed([a, b, c], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    # No record's first token is a target: the previous record's last position predicts nothing.
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, 14, 15, 16], [IGNORE, 6, 7, 8, IGNORE, 10]]
    assert segments.tolist() == [[2] * 6, [0, 0, 0, 0, 1, 1]]
    assert "attention_mask" not in batch  # transformers reads restarting positions as packed sequences


def test_packed_and_head_at_targets_give_the_padded_losses_and_gradients(lora):
    model, tokenizer = lora
    examples = _examples(tokenizer)
    model.train()
    padded = collate(examples, tokenizer.pad_token_id)
    packed, segments = collate_packed(examples, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # some rows really hold several records
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    ref_loss, ref_grads = _loss_and_grads(model, lambda: _full_logit_losses(model, padded))
    for losses_fn in (lambda: row_losses(model, padded, padded_segments(padded), len(examples)),
                      lambda: row_losses(model, packed, segments, len(examples))):
        loss, grads = _loss_and_grads(model, losses_fn)
        assert loss[12] == 0 and ref_loss[12] == 0  # the record without targets
        torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert any(g.abs().max() > 1e-4 for g in ref_grads)  # gradients that could differ


def test_training_packed_or_padded_ends_at_the_same_adapter(lora):
    model, tokenizer = lora
    examples = _examples(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    ends, results = [], []
    for pack in (True, False):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        results.append(train_adapter(model, examples, TrainSettings(epochs=2, batch_size=6, lr=1e-3),
                                     pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(1),
                                     pack=pack))
        ends.append([p.detach().clone() for p in params])
    assert results[0]["steps"] == results[1]["steps"] == 6
    # Adam's first steps move each weight by about lr whatever its gradient's size, so a float-order
    # difference in a near-zero gradient shows at that scale: compare against how far training moved.
    moved = max(float((e - s).abs().max()) for e, s in zip(ends[0], start))
    apart = max(float((a - b).abs().max()) for a, b in zip(*ends))
    print(f"moved {moved:.2e}, packed and padded apart {apart:.2e}")
    assert moved > 1e-3 and apart < 1e-3 * moved
    assert results[0]["loss_last_quarter"] == pytest.approx(results[1]["loss_last_quarter"], rel=1e-4)


@pytest.mark.parametrize("family, expected", [("llama", True), ("gpt2", True), ("gemma2", True), ("opt", False)])
def test_packing_probe_accepts_position_aware_architectures_and_refuses_opt(tiny_model_path, family, expected):
    """OPT derives positions from the attention mask, so packed positions would be wrong: it keeps padding."""
    base, tokenizer = load_base_model(tiny_model_path(family))
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8, target_modules="all-linear"), seed=0)
    assert packing_ok(model, pad_id=tokenizer.pad_token_id) is expected
    examples = _examples(tokenizer, n=6)
    losses = train_adapter(model, examples, TrainSettings(epochs=1, batch_size=10, lr=1e-3),
                           pad_id=tokenizer.pad_token_id, generator=None)
    assert losses["steps"] == 1 and torch.isfinite(torch.tensor(losses["loss_last_quarter"]))


def test_packing_probe_and_training_with_lora_on_the_embeddings(small_model_path):
    """peft wraps a LoRA'd embedding (no `num_embeddings` of its own): the probe still runs, and a
    training that LoRAs the embedding and the tied head packs like any other."""
    from fedleak.federated import batching

    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "lm_head", "embed_tokens"]), seed=0)
    batching._PACKING.clear()  # no verdict cached by an earlier test: the probe itself must run here
    assert packing_ok(model, pad_id=tokenizer.pad_token_id) is True
    examples = _examples(tokenizer, n=6)
    losses = train_adapter(model, examples, TrainSettings(epochs=1, batch_size=10, lr=1e-3),
                           pad_id=tokenizer.pad_token_id, generator=None)
    assert losses["steps"] == 1 and torch.isfinite(torch.tensor(losses["loss_last_quarter"]))


def test_run_rounds_still_imports_from_rounds():
    from fedleak.federated import loop, rounds

    assert rounds.run_rounds is loop.run_rounds
    with pytest.raises(AttributeError):
        rounds.no_such_name
