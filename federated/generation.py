"""Batched text generation from token-id prompts (left-padded), cut at the first stop token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fedleak.federated.model import model_device
from fedleak.federated.prompts import pad_id, stop_ids as default_stop_ids


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool  # a stop token ended it (False: it ran out of max_new_tokens)
    ids: tuple[int, ...] = ()  # the generated token ids before the stop token
    stop_id: int | None = None  # the stop token that ended it (EOS, or a chat template's end-of-turn)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 16,
             stop_ids: Sequence[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0) -> list[Generation]:
    """Greedy unless `do_sample` (top-p and/or top-k, 0 = no top-k cut); sampling draws from torch's
    global RNG, so seed it first. `stop_ids` default: `prompts.stop_ids` (the model's and tokenizer's EOS
    and a chat template's end-of-turn). Prompts are left-padded here, whatever the tokenizer's padding_side."""
    stop = list(stop_ids or default_stop_ids(model, tokenizer))
    pad = pad_id(tokenizer)
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "eos_token_id": stop, "pad_token_id": pad,
               "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    model.eval()
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        device = model_device(model)
        new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)[:, width:].tolist()
        for row in new:
            cut = next((i for i, t in enumerate(row) if t in stop), None)
            out.append(Generation(text=tokenizer.decode(row[:cut], skip_special_tokens=True), finished=cut is not None,
                                  ids=tuple(row[:cut]), stop_id=row[cut] if cut is not None else None))
    return out
