"""Greedy generation grouped by length equals a batch-1 loop, in the caller's order; stop tokens end
generations; sampling keeps the caller's batches (so a seed samples what it sampled before grouping)."""

from __future__ import annotations

import random

import pytest
import torch

from fedleak.federated.data import generate_records
from fedleak.federated.generation import generate, length_batches
from fedleak.federated.prompts import prompt_ids, stop_ids


def _prompts(tokenizer, n: int) -> list[list[int]]:
    """Held-out records' prompts in the training format (lengths vary: records with and without input)."""
    return [prompt_ids(tokenizer, r.instruction, r.input)
            for r in generate_records(n, seed=0, purpose="heldout", private=True)]


def _batch1(model, tokenizer, prompts, **options):
    return [generate(model, tokenizer, [p], batch_size=1, **options)[0] for p in prompts]


def test_length_batches_cover_every_prompt_once_in_near_equal_sorted_batches():
    lengths = [random.Random(0).randrange(5, 90) for _ in range(61)]
    groups = length_batches(lengths, 16)
    assert sorted(i for g in groups for i in g) == list(range(61))
    assert [len(g) for g in groups] == [15, 15, 15, 16]
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)
    assert length_batches([], 4) == [] and length_batches([3], 4) == [[0]]


def test_greedy_grouped_equals_batch1_loop_on_embedded_model(embedded):
    model, tokenizer = embedded
    prompts = _prompts(tokenizer, 60)
    assert len({len(p) for p in prompts}) > 10  # lengths vary, so batches would be padded without grouping
    reference = _batch1(model, tokenizer, prompts, max_new_tokens=16)
    assert generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=16) == reference
    # The caller's order, whatever it is: a shuffled call returns the shuffled reference.
    order = list(range(len(prompts)))
    random.Random(1).shuffle(order)
    shuffled = generate(model, tokenizer, [prompts[i] for i in order], max_new_tokens=16, batch_size=7)
    assert shuffled == [reference[i] for i in order]


def test_greedy_batches_hold_neighbouring_lengths(embedded, monkeypatch):
    model, tokenizer = embedded
    prompts = _prompts(tokenizer, 30)
    batches, real = [], model.generate

    def spy(**kwargs):
        batches.append(kwargs["attention_mask"].sum(1).tolist())
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=8)
    assert [len(b) for b in batches] == [7, 8, 7, 8]
    assert [n for b in batches for n in b] == sorted(len(p) for p in prompts)


@pytest.mark.parametrize("penalty", [1.3, 3.0])
def test_padding_is_not_seen_by_repetition_penalty_or_ngram_block(embedded, penalty):
    """FEDPIT's response generation: greedy with a repetition penalty and n-gram blocking. Rows are padded
    with EOS: a penalty that counted the padding (transformers 5 leaves it out by the attention mask) would
    keep padded rows from stopping."""
    model, tokenizer = embedded
    prompts = _prompts(tokenizer, 16)
    options = dict(max_new_tokens=56, repetition_penalty=penalty, no_repeat_ngram_size=3)
    reference = _batch1(model, tokenizer, prompts, **options)
    assert any(g.finished for g in reference)
    assert generate(model, tokenizer, prompts, batch_size=16, **options) == reference


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_greedy_grouped_equals_batch1_loop_on_tiny_architectures(tiny, family):
    """GPT-2 has no pad token (fedleak pads with EOS); Mistral pads on the left and prepends BOS."""
    model, tokenizer = tiny(family)
    prompts = _prompts(tokenizer, 12)
    assert len({len(p) for p in prompts}) > 4
    for options in ({}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}):
        reference = _batch1(model, tokenizer, prompts, max_new_tokens=10, **options)
        assert generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=5, **options) == reference
        assert generate(model, tokenizer, prompts[::-1], max_new_tokens=10, batch_size=12, **options) == reference[::-1]


def test_stop_tokens_end_generations(embedded, tiny):
    model, tokenizer = embedded
    prompts = _prompts(tokenizer, 12)
    stops = set(stop_ids(model, tokenizer))
    out = generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=4)
    assert any(g.finished for g in out)
    for g in out:
        assert not stops & set(g.ids)
        assert (g.stop_id in stops) if g.finished else (g.stop_id is None and len(g.ids) == 64)
    # A stop token given by the caller ends each generation at its first occurrence, whatever the batch.
    free = _batch1(model, tokenizer, prompts, max_new_tokens=12, stop_ids=[-1])
    token = free[0].ids[3]
    cut = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=12, stop_ids=[token])
    for before, after in zip(free, cut):
        if token in before.ids:
            k = before.ids.index(token)
            assert after.ids == before.ids[:k] and after.finished and after.stop_id == token
        else:
            assert after.ids == before.ids and not after.finished
    assert cut[0].ids == free[0].ids[:free[0].ids.index(token)]
    # The model's own stop tokens on a tiny architecture with several of them (GPT-2: EOS is also the pad).
    model, tokenizer = tiny("gpt2")
    for g in generate(model, tokenizer, _prompts(tokenizer, 8), max_new_tokens=8, batch_size=8):
        assert not set(stop_ids(model, tokenizer)) & set(g.ids)


def test_sampling_keeps_the_callers_batches(embedded):
    """Seeded sampling draws for the caller's consecutive batches: the same as one call per batch."""
    model, tokenizer = embedded
    prompts = _prompts(tokenizer, 10)
    options = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.95)
    torch.manual_seed(5)
    whole = generate(model, tokenizer, prompts, batch_size=4, **options)
    torch.manual_seed(5)
    pieces = [g for s in range(0, 10, 4) for g in generate(model, tokenizer, prompts[s:s + 4], batch_size=4, **options)]
    assert whole == pieces
    torch.manual_seed(5)
    assert generate(model, tokenizer, prompts, batch_size=4, **options) == whole
