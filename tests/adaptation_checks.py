"""Checks shared by the soft-prompt and prefix tests: fedleak's cached or batched paths (exposure's cached shared
text, GCG's answer loss, greedy generation) against the adapted model's whole forward, and a prefix's
initialisation against its definition."""

import numpy as np
import pytest
import torch

from fedleak.attacks.extraction.exposure import _canary_examples, candidate_losses
from fedleak.federated.data import Canary
from fedleak.federated.training import IGNORE, Example, collate, encode, sequence_losses, token_logprobs


def check_exposure_and_gcg(model, tokenizer, example: Example) -> None:
    """Exposure's summed NLL of each candidate equals the whole sequence's; GCG's answer loss on `example`'s
    response equals its training loss."""
    from fedleak.attacks.extraction.gcg import answer_loss

    canary = Canary(patient_name="Ada Lind", secret="123456", repetitions=1, client=0)
    candidates = ["123456", "654321", "000000"]
    record = encode([canary.record(0)], tokenizer, max_length=256)  # the record's form, for the expected loss
    losses = candidate_losses(model, tokenizer, canary, candidates, max_length=256, batch_size=2)
    assert losses.shape == (3,) and len(set(losses.round(6))) == 3
    with torch.no_grad():
        one = sequence_losses(model, collate(record, tokenizer.pad_token_id))
        picked, _, _ = token_logprobs(model, collate(_canary_examples(tokenizer, canary, candidates, 256),
                                                     tokenizer.pad_token_id))
    scored = sum(label != IGNORE for label in record[0].labels[1:])
    assert losses[0] == pytest.approx(float(one[0]) * scored, rel=1e-4)
    np.testing.assert_allclose(losses, -picked.sum(1).double().numpy(), rtol=1e-4)
    ids, start = list(example.input_ids), next(i for i, label in enumerate(example.labels) if label != IGNORE)
    with torch.no_grad():
        gcg = answer_loss(model, torch.tensor([ids]), start, torch.tensor(ids[start:]))
        plain = sequence_losses(model, collate([Example(tuple(ids), (IGNORE,) * start + tuple(ids[start:]))],
                                               tokenizer.pad_token_id))
    torch.testing.assert_close(gcg, plain, rtol=1e-5, atol=1e-5)


def check_greedy_generation(model, tokenizer, prompts, *, max_new_tokens: int = 10) -> list:
    """fedleak's batched greedy generation of `prompts` (of several lengths: left padding) is the argmax of the
    model's whole forward, step by step with no cache; returns the generations."""
    from fedleak.federated.generation import generate
    from fedleak.federated.prompts import stop_ids

    assert len({len(p) for p in prompts}) > 1
    out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    stop = set(stop_ids(model, tokenizer))
    with torch.no_grad():
        for prompt, generation in zip(prompts, out):
            row, expected = list(prompt), []
            for _ in range(max_new_tokens):
                token = int(model(input_ids=torch.tensor([row])).logits[0, -1].argmax())
                if token in stop:
                    break
                expected.append(token)
                row.append(token)
            assert list(generation.ids) == expected
    return out


def check_prefix_init(model, tokenizer, settings) -> None:
    """init = "sample_vocab": the prefixed model's logits on a text are the base model's on [the sampled tokens;
    the text] at the text's positions (the model's BOS first, where it has one, then random vocabulary tokens);
    the prefix's size is what the memory estimate counts."""
    from transformers import AutoConfig

    from fedleak.eval.memory import shape_of
    from fedleak.federated.adapters import DEFAULT, _init_prefix, adapter_parameters

    base, count = model.get_base_model(), settings.num_virtual_tokens
    torch.manual_seed(11)
    _init_prefix(model, DEFAULT, settings)
    torch.manual_seed(11)
    sampled = torch.randint(0, base.get_input_embeddings().num_embeddings, (1, count))
    if isinstance(base.config.bos_token_id, int):
        sampled[0, 0] = base.config.bos_token_id
    text = torch.tensor([tokenizer("Patient Ada Lind reports a cough since Monday.")["input_ids"]])
    with torch.no_grad():
        got = model(input_ids=text).logits
        with model.disable_adapter():
            bare = model(input_ids=text).logits
            expected = model(input_ids=torch.cat([sampled, text], dim=1)).logits[:, count:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - bare).abs().max() > 1e-3  # the prefix acts
    shape = shape_of(AutoConfig.from_pretrained(base.config._name_or_path))
    assert adapter_parameters(model)["prompt_embeddings"].numel() == shape.adapter_params(settings)[0]
