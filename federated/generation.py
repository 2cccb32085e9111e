"""Batched text generation from token-id prompts (left-padded), cut at the first stop token.

Greedy calls group prompts by length: the call sorts its prompts by token count, batches neighbours
(so a batch is padded to the spread of neighbouring lengths, not to the call's longest) and returns
the generations in the caller's order. Each batch runs Hugging Face's `generate` with its KV cache.
A greedy generation depends only on its own prompt, so grouping changes nothing but float order:
the output is what a batch-1 loop over the same prompts gives (tests/test_generation.py checks it
token for token). Padding never counts as text the model has seen: transformers' repetition penalty
skips the masked positions itself (`prompt_ignore_length` from the attention mask, transformers >= 5),
and the n-gram block cannot match them: rows are padded with a stop token, and an n-gram holding one
could only be completed after that row has stopped (a pad id the model might generate could ban a token).

Under a soft prompt (prompt tuning) the rows go to the base model's `generate` as embeddings, the prompt's
virtual tokens first: peft 0.21's own generation path looks for the KV cache under `past_key_values`, which
transformers 5.24 passes as `cache`, so it took every decoding step for the first and inserted the soft prompt again
before each new token (seen: decoding steps of 21 positions for a 20-token prompt). Only the new tokens come back;
the repetition penalty and the n-gram block then see the generated tokens, not the prompt's.

Under a prefix (prefix tuning) peft's generation path fails the same way (it would insert the prefix as the
whole cache before every new token), so the base model's `generate` gets the prefix as its starting cache,
with as many placeholder tokens (the padding's stop token) in front of the prompt as the prefix has positions:
transformers takes a cache's length from the tokens before it. The repetition penalty skips them with the
padding. On an architecture with sliding-window attention (Gemma 2, Mistral's older releases) every batch under
a soft prompt or prefix, greedy or sampled, holds prompts of one length only: left padding would push the prompt
out of the window sooner than training's right padding does.

Sampling calls (`do_sample=True`: FEDPIT's self-generation, `generate_rank`) keep the caller's order
and batches: the i-th random draws of a batch go to the same prompts as before this module grouped
anything, so a run seeded as before samples the same texts. (Grouping would hand the draws to other
prompts: still deterministic given the seed, but a different sample.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fedleak.federated.methods import is_prefix, prompt_positions, virtual_tokens
from fedleak.federated.model import cache_keyword, model_device
from fedleak.federated.prompts import pad_id, stop_ids as default_stop_ids


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool  # a stop token ended it (False: it ran out of max_new_tokens)
    ids: tuple[int, ...] = ()  # the generated token ids before the stop token
    stop_id: int | None = None  # the stop token that ended it (EOS, or a chat template's end-of-turn)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts batched by length: sorted (stably) by length, then cut into
    ceil(n / batch_size) batches of near-equal size (60 prompts at 16 a batch: four of 15)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    count = -(-len(order) // batch_size) if order else 0
    return [order[len(order) * b // count:len(order) * (b + 1) // count] for b in range(count)]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 16,
             stop_ids: Sequence[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0) -> list[Generation]:
    """Generations for `prompts`, in their order. Greedy unless `do_sample` (top-p and/or top-k, 0 = no
    top-k cut); sampling draws from torch's global RNG, so seed it first. `stop_ids` default:
    `prompts.stop_ids` (the model's and tokenizer's EOS and a chat template's end-of-turn). Prompts are
    left-padded here, whatever the tokenizer's padding_side.

    `batch_size` caps the prompts per batch. Greedy batches hold prompts of neighbouring lengths (see
    the module docstring: the result equals a batch-1 loop); sampling batches are the caller's
    consecutive prompts, so the seeded random draws meet the prompts in the caller's order."""
    if not prompts:
        return []
    stop = list(stop_ids or default_stop_ids(model, tokenizer))
    stop_set = set(stop)
    # Rows are padded with a stop token (see the module docstring), else with the tokenizer's pad id.
    vocab = model.get_input_embeddings().num_embeddings
    fill = next((t for t in stop if 0 <= t < vocab), pad_id(tokenizer))
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "eos_token_id": stop,
               "pad_token_id": pad_id(tokenizer), "repetition_penalty": repetition_penalty,
               "no_repeat_ngram_size": no_repeat_ngram_size}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    prompts = [list(p) for p in prompts]
    if do_sample:
        groups = [list(range(s, min(s + batch_size, len(prompts)))) for s in range(0, len(prompts), batch_size)]
    else:
        groups = length_batches([len(p) for p in prompts], batch_size)
    if prompt_positions(model) and getattr(model.get_base_model().config, "sliding_window", None):
        # Left padding would sit between the prompt (soft or prefix) and the text and push the prompt out of a
        # sliding window sooner than in training (padded on the right): no padding there.
        groups = [[i for i in group if len(prompts[i]) == n] for group in groups
                  for n in sorted({len(prompts[i]) for i in group})]
    model.eval()
    device = model_device(model)
    out: list[Generation | None] = [None] * len(prompts)
    for group in groups:
        chunk = [prompts[i] for i in group]
        width = max(len(p) for p in chunk)
        padding = [width - len(p) for p in chunk]
        ids = torch.tensor([[fill] * n + p for n, p in zip(padding, chunk)])
        mask = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(padding, chunk)])
        if is_prefix(model):
            new = _prefixed_generate(model, ids.to(device), mask.to(device), options, fill).tolist()
        elif virtual_tokens(model):
            new = _soft_prompted_generate(model, ids.to(device), mask.to(device), options).tolist()
        else:
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)[:, width:].tolist()
        for i, row in zip(group, new):
            cut = next((k for k, t in enumerate(row) if t in stop_set), None)
            kept = row[:cut]
            out[i] = Generation(text=tokenizer.decode(kept, skip_special_tokens=True), finished=cut is not None,
                                ids=tuple(kept), stop_id=row[cut] if cut is not None else None)
    return out  # type: ignore[return-value]


def _prefixed_generate(model, ids: torch.Tensor, mask: torch.Tensor, options: dict, fill: int) -> torch.Tensor:
    """[B, new tokens]: the base model generating from the prefix's cache (see the module docstring)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    rows, positions = len(ids), prompt_positions(model)
    padding = (mask != 0).int().argmax(dim=1)  # left padding per row
    ids = torch.cat([torch.full((rows, positions), fill, dtype=ids.dtype, device=ids.device), ids], dim=1)
    mask = torch.cat([torch.ones((rows, positions), dtype=mask.dtype, device=mask.device), mask], dim=1)
    options = dict(options)
    penalty = options.pop("repetition_penalty", 1.0)
    options["repetition_penalty"] = 1.0  # the model's generation_config.json would else apply its own over everything
    processors = LogitsProcessorList()
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=positions + padding))
    base = model.get_base_model()
    name = cache_keyword(base) or "past_key_values"
    out = base.generate(input_ids=ids, attention_mask=mask, logits_processor=processors,
                        **{name: model.get_prompt(rows)}, **options)
    return out[:, ids.shape[1]:]


def _soft_prompted_generate(model, ids: torch.Tensor, mask: torch.Tensor, options: dict) -> torch.Tensor:
    """[B, new tokens]: the base model generating after [soft prompt; token embeddings] (see the module docstring);
    the virtual positions are attended, as in training, and the padding stays masked."""
    embeds = model.get_input_embeddings()(ids)
    prompt = model.get_prompt(batch_size=len(ids)).to(embeds.dtype)
    mask = torch.cat([torch.ones(prompt.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
    return model.get_base_model().generate(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask,
                                           **options)

