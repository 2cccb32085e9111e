"""The fast membership scoring path (`attacks/membership/stats.py`: records batched by length, the LM
head only at scored positions) computes what a plain per-record loop
computes: batch 1, full logits, a log-softmax over the whole vocabulary at every position. No timings
here: bench/mia_scores.py prints the speed ratios."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedleak.attacks.membership.stats import compute_stats
from fedleak.eval.metrics import roc_auc
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import generate_records
from fedleak.federated.model import load_base_model, to_device
from fedleak.federated.training import IGNORE, collate, encode
from tests.tiny_archs import FAMILIES, LORA_TARGETS

MAX_LENGTH = 96  # some records are cut: truncation is covered too


@torch.no_grad()
def reference_stats(model, tokenizer, records, *, response_only: bool):
    """Per record, batch 1, full logits: (logp, mu, sigma) lists of float64 arrays, one per record."""
    out = []
    for example in encode(records, tokenizer, max_length=MAX_LENGTH, response_only=response_only):
        batch = to_device(collate([example], tokenizer.pad_token_id), model)
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != IGNORE
        logp = torch.log_softmax(logits.double(), dim=-1)[keep]
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = (p * (logp - mu[:, None]).square()).sum(-1).sqrt()
        picked = logp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        out.append(tuple(t.cpu().numpy() for t in (picked, mu, sigma)))
    return out


def _records(n: int = 14):
    records = generate_records(n, seed=3, purpose="scoring-speed", private=True)
    # Lengths spread widely (batches mix short and long records) and one answer longer than MAX_LENGTH.
    records[2] = dataclasses.replace(records[2], output=" ".join([records[2].output] * 6))
    records[5] = dataclasses.replace(records[5], output=records[5].output[:12])
    return records


def _with_visible_adapter(model):
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    return model


def _assert_equal_to_reference(model, tokenizer, records, *, response_only: bool, batch_size: int = 4):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = compute_stats(model, tokenizer, records, max_length=MAX_LENGTH, response_only=response_only,
                          batch_size=batch_size)
    expected = reference_stats(model, tokenizer, records, response_only=response_only)
    assert stats.mask.sum(1).tolist() == [len(e[0]) for e in expected]
    for i, (logp, mu, sigma) in enumerate(expected):
        n = len(logp)
        for name, got, want in (("logp", stats.logp, logp), ("mu", stats.mu, mu), ("sigma", stats.sigma, sigma)):
            np.testing.assert_allclose(got[i, :n], want, rtol=1e-5, atol=1e-5, err_msg=f"record {i} {name}")
        assert not stats.logp[i, n:].any()  # padding stays zero
    losses = np.array([-e[0].mean() for e in expected])
    np.testing.assert_allclose(stats.loss, losses, rtol=1e-5)
    # Scores rank the records exactly as the reference does: identical AUCs.
    labels = np.arange(len(records)) % 2
    assert roc_auc(labels, -stats.loss) == roc_auc(labels, -losses)
    # Scoring leaves the weights as they were (the head's hook is gone, nothing merged).
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    return stats


@pytest.mark.parametrize("response_only", [True, False])
def test_embedded_peft_model_matches_the_per_record_loop(small_model_path, response_only):
    base, tokenizer = load_base_model(small_model_path)
    model = _with_visible_adapter(add_peft_adapter(base, LoraSettings(), seed=0))
    _assert_equal_to_reference(model, tokenizer, _records(), response_only=response_only)
    with model.disable_adapter():  # the base model (reference and blind passes): same numbers
        _assert_equal_to_reference(model, tokenizer, _records(), response_only=response_only)


def test_plain_model_matches_the_per_record_loop(embedded):
    model, tokenizer = embedded
    _assert_equal_to_reference(model, tokenizer, _records(), response_only=True, batch_size=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_architectures_match_the_per_record_loop(tiny, family):
    base, tokenizer = tiny(family)
    model = _with_visible_adapter(add_peft_adapter(base, LoraSettings(target_modules=LORA_TARGETS[family]), seed=0))
    _assert_equal_to_reference(model, tokenizer, _records(10), response_only=True)
    _assert_equal_to_reference(model, tokenizer, _records(10), response_only=False)


def test_output_keeps_the_input_order_and_the_head_sees_only_scored_positions(embedded):
    model, tokenizer = embedded
    records = _records()
    rows_seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows_seen.append(args[0].shape[:-1].numel()))
    try:
        stats = compute_stats(model, tokenizer, records, max_length=MAX_LENGTH, response_only=True, batch_size=4)
    finally:
        handle.remove()
    assert sum(rows_seen) == int(stats.mask.sum())  # the LM head ran on the scored positions only
    reversed_stats = compute_stats(model, tokenizer, records[::-1], max_length=MAX_LENGTH, response_only=True,
                                   batch_size=4)
    np.testing.assert_allclose(reversed_stats.loss[::-1], stats.loss, rtol=1e-6)
    assert reversed_stats.texts[::-1] == stats.texts


def test_a_model_without_an_output_head_gets_full_logits(embedded):
    model, tokenizer = embedded

    class Wrapped(torch.nn.Module):  # a causal LM that exposes no get_output_embeddings
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    records = _records(6)
    plain = compute_stats(Wrapped(model), tokenizer, records, max_length=MAX_LENGTH, response_only=True, batch_size=4)
    fast = compute_stats(model, tokenizer, records, max_length=MAX_LENGTH, response_only=True, batch_size=4)
    np.testing.assert_allclose(plain.logp, fast.logp, rtol=1e-5, atol=1e-5)
    assert np.array_equal(plain.mask, fast.mask)
