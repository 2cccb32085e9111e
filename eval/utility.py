"""Utility of a model view on held-out records: token loss, perplexity, ROUGE-L of greedy answers."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.prompts import pad_id, prompt_ids
from fedleak.federated.rouge import rouge_l
from fedleak.federated.training import batches, encode, token_logprobs


@torch.no_grad()
def evaluate_utility(model, tokenizer, records: Sequence[Record], *, max_length: int, batch_size: int = 16,
                     max_new_tokens: int = 96) -> dict[str, float]:
    """Mean token loss and perplexity on the responses; mean ROUGE-L F1 of greedy generations."""
    model.eval()
    total_logp, total_tokens = 0.0, 0
    for batch in batches(encode(records, tokenizer, max_length=max_length), batch_size=batch_size,
                         pad_id=pad_id(tokenizer)):
        picked, mask, _ = token_logprobs(model, batch)
        total_logp += float(picked.sum())
        total_tokens += int(mask.sum())
    loss = -total_logp / max(total_tokens, 1)
    prompts = [prompt_ids(tokenizer, r.instruction, r.input) for r in records]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rouge = [rouge_l(out.text, r.output) for out, r in zip(outputs, records)]
    return {"loss": loss, "perplexity": math.exp(loss), "rouge_l": sum(rouge) / len(rouge)}
