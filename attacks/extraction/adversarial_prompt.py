"""Adversarial prompts for extraction: a greedy coordinate gradient (GCG) suffix (Zou, Wang, Carlini, Nasr, Kolter
and Fredrikson 2023, "Universal and Transferable Adversarial Attacks on Aligned Language Models", arXiv 2307.15043)
that makes the model write other clients' canary secrets.

Threat model: a client, white-box on the global model (every client receives it). It knows its own canaries (its own data) and optimises one suffix s of `suffix_tokens` tokens, appended
to the instruction of each of its canary prompts, to minimise the loss of its canaries' answers:

    L(s) = mean_j  CE(answer_j | head_j + s + tail_j)           (j over the attacker's own canaries)

Each step: the gradient of L with respect to the one-hot suffix gives, per position, the `top_k` token swaps with
the most negative gradient; `candidates` random single swaps from them are evaluated exactly and the best kept if
it lowers L. The suffix is then appended to the prompts of the other clients' inserted canaries, which the attacker
does not know, and greedy decoding tells whether their secrets come out: the secret rate with the suffix against
without it (transfer across canaries), each with its Clopper-Pearson interval, and the mean answer loss with and
without it. A suffix that only taught the format cannot write a random six-digit secret: a rise above the rate
without the suffix is memorisation the suffix unlocked.

Token level: the suffix is a list of token ids placed between the prompt's instruction and the rest of its
template (white-box: the attacker feeds ids; a text interface may tokenise the decoded suffix differently). Special
tokens are never candidates. Without canaries of its own and of others in the view, the metrics are NaN with a note.
The search keeps the current suffix when no candidate lowers the loss (the paper takes the best candidate
regardless) and sums the prompts' losses without normalising their gradients. Not covered: the backdoor target
without the trigger, a client's own model (it holds that client's canaries only), transfer of one suffix to other
views.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from scipy.stats import binomtest

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import run_seed, view_key
from fedleak.common.params import PositiveInt
from fedleak.federated.data import Canary
from fedleak.federated.generation import generate
from fedleak.federated.methods import virtual_tokens
from fedleak.federated.prompts import _special_ids, _text_ids, bos_prefix, is_chat, prompt_ids, prompt_text
from fedleak.federated.seeding import numpy_rng, torch_generator
from fedleak.federated.batching import IGNORE
from fedleak.federated.training import encode

_MARK = "\x00suffix\x00"
CHUNK = 64  # candidate rows per forward pass (bounds activation memory on a large model)
METRICS = ("secret_rate_without", "secret_rate_with", "secret_rate_gain", "answer_loss_without", "answer_loss_with",
           "known_secret_rate_with", "suffix_loss", "targets", "known")


def split_prompt(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """The prompt's ids before the suffix's place (through the instruction) and after it (the template's rest).

    Where the prompt's own tokens start with the head's (the usual case), the tail is the rest of them, so head +
    tail is exactly the prompt training saw; otherwise (a token spans the boundary) the tail is tokenised alone."""
    head_text, tail_text = prompt_text(tokenizer, instruction + _MARK).split(_MARK)
    head = ([] if is_chat(tokenizer) else bos_prefix(tokenizer)) + _text_ids(tokenizer, head_text)
    full = prompt_ids(tokenizer, instruction)
    if full[:len(head)] == head:
        return head, full[len(head):]
    return head, _text_ids(tokenizer, tail_text)


def answer_ids(tokenizer, canary: Canary, max_length: int) -> list[int]:
    """The canary's answer as training tokenised it (response tokens and end of answer)."""
    example = encode([canary.record(0)], tokenizer, max_length=max_length, response_only=True)[0]
    return [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]


def _answer_loss(model, ids: torch.Tensor | None, start: int, target: torch.Tensor, *,
                 embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of `target`, which starts at position `start`, per row."""
    logits = (model(input_ids=ids, use_cache=False) if embeds is None
              else model(inputs_embeds=embeds, use_cache=False)).logits
    start += virtual_tokens(model)  # a soft prompt's positions come first
    predicted = logits[:, start - 1:start - 1 + len(target)].float()
    return torch.nn.functional.cross_entropy(predicted.transpose(1, 2), target.expand(len(predicted), -1),
                                             reduction="none").mean(dim=1)


def gcg_suffix(model, prompts: Sequence[tuple[list[int], list[int], list[int]]], *, suffix_tokens: int, steps: int,
               top_k: int, candidates: int, allowed: torch.Tensor, init_id: int,
               generator: torch.Generator) -> tuple[list[int], list[float]]:
    """Greedy coordinate gradient (Zou et al. 2023, Algorithm 1 over several prompts: the universal suffix).

    Args:
        model: a causal LM (white-box: its input embeddings are read and differentiated through).
        prompts: (head ids, tail ids, target ids) per prompt; the sequence is head + suffix + tail + target.
        suffix_tokens: the suffix length L.
        steps: optimisation steps T.
        top_k: token swaps kept per position from the gradient (k).
        candidates: single-swap candidates evaluated exactly per step (B).
        allowed: [V] bool, the tokens a suffix may hold.
        init_id: the token every position starts as.
        generator: draws the candidates' positions and swaps.

    Returns:
        The suffix's token ids and the loss (mean over prompts of the target's mean cross-entropy) after each step,
        the starting loss first.
    """
    embedding = model.get_input_embeddings().weight
    device = embedding.device
    suffix = torch.full((suffix_tokens,), init_id, dtype=torch.long, device=device)
    parts = [(torch.tensor(h, device=device), torch.tensor(t, device=device), torch.tensor(y, device=device))
             for h, t, y in prompts]

    def losses(suffixes: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B], in chunks of CHUNK rows
        total = torch.zeros(len(suffixes), device=device)
        for head, tail, target in parts:
            for at in range(0, len(suffixes), CHUNK):
                part = suffixes[at:at + CHUNK]
                rows = torch.cat([head.expand(len(part), -1), part, tail.expand(len(part), -1),
                                  target.expand(len(part), -1)], dim=1)
                total[at:at + CHUNK] += _answer_loss(model, rows, len(head) + suffix_tokens + len(tail), target)
        return total / len(parts)

    with torch.no_grad():
        history = [float(losses(suffix[None])[0])]
    for _ in range(steps):
        one_hot = torch.nn.functional.one_hot(suffix, embedding.shape[0]).to(embedding.dtype).requires_grad_(True)
        with torch.enable_grad():
            loss = 0.0
            for head, tail, target in parts:
                embeds = torch.cat([embedding[head], one_hot @ embedding, embedding[tail], embedding[target]])[None]
                loss = loss + _answer_loss(model, None, len(head) + suffix_tokens + len(tail), target, embeds=embeds)[0]
            (grad,) = torch.autograd.grad(loss, one_hot)
        grad = grad.float().masked_fill(~allowed[None].to(device), float("inf"))
        k = min(top_k, int(allowed.sum()))  # never a forbidden token, however small the allowed set
        top = (-grad).topk(k, dim=1).indices  # [L, k]: the swaps the linearisation says lower the loss most
        pos = torch.randint(suffix_tokens, (candidates,), generator=generator).to(device)
        swap = top[pos, torch.randint(k, (candidates,), generator=generator).to(device)]
        batch = suffix.expand(candidates, -1).clone()
        batch[torch.arange(candidates, device=device), pos] = swap
        with torch.no_grad():
            scored = losses(batch)
        best = int(scored.argmin())
        if float(scored[best]) < history[-1]:
            suffix = batch[best]
        history.append(min(float(scored[best]), history[-1]))
    return suffix.tolist(), history


def _rate(hits: int, n: int) -> tuple[float, float, float]:
    if n == 0:
        return (np.nan,) * 3
    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
    return hits / n, float(ci.low), float(ci.high)


@register_attack("adversarial_prompt")
class AdversarialPrompt(ExtractionAttack):
    """adversarial_prompt: a GCG suffix optimised on the attacker's own canaries writes other clients' secrets?"""

    observers = ("global",)
    observers_why = ("a client optimises on the global model it receives, where every client's canaries meet; a "
                     "view of one client holds that client's canaries only")

    def __init__(self, *, suffix_tokens: PositiveInt = 8, steps: PositiveInt = 30, top_k: PositiveInt = 32,
                 candidates: PositiveInt = 48, max_known: PositiveInt = 4, batch_size: PositiveInt = 16):
        """Set the search budget (Zou et al. 2023 use 20 tokens, 500 steps, k = 256, B = 512 on 7B models).

        Args:
            suffix_tokens: tokens in the adversarial suffix.
            steps: GCG steps (one gradient and `candidates` forward passes per known canary each).
            top_k: token swaps per suffix position taken from the gradient.
            candidates: single-swap candidates evaluated per step.
            max_known: at most this many of the attacker's own canaries enter the objective.
            batch_size: prompts per greedy-generation batch.
        """
        self.suffix_tokens, self.steps, self.top_k, self.candidates = suffix_tokens, steps, top_k, candidates
        self.max_known, self.batch_size = max_known, batch_size

    def _nan(self, note: str) -> ExtractionResult:
        metrics = {k: np.nan for k in METRICS}
        metrics.update({f"{k}_{e}": np.nan for k in ("secret_rate_without", "secret_rate_with") for e in ("low", "high")})
        return ExtractionResult(metrics, {"note": note})

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        started = time.perf_counter()
        seed = run_seed(target, self.name)
        inserted = [c for c in secrets.canaries if c.repetitions > 0 and c.client is not None]
        holders = sorted({c.client for c in inserted})
        # The attacker: a client with canaries of its own (seeded), the targets: everyone else's.
        rng = numpy_rng(seed, "attack", self.name, view_key(target))
        attacker = int(rng.choice(holders)) if holders else None
        known = [c for c in inserted if c.client == attacker][:self.max_known]
        others = [c for c in inserted if c.client != attacker]
        if not known or not others:
            return self._nan("the view needs inserted canaries of the attacker's own and of other clients: "
                             f"{len(known)} own, {len(others)} others'")
        tok, model = target.tokenizer, target.model
        vocab = model.get_input_embeddings().weight.shape[0]
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[[i for i in _special_ids(tok) if i < vocab]] = False
        allowed[len(tok):] = False  # embedding rows no token maps to
        init_id = _text_ids(tok, "!")[-1]
        prompts = [(*split_prompt(tok, c.prompt), answer_ids(tok, c, target.max_length)) for c in known]
        suffix, history = gcg_suffix(model, prompts, suffix_tokens=self.suffix_tokens, steps=self.steps,
                                     top_k=self.top_k, candidates=self.candidates, allowed=allowed, init_id=init_id,
                                     generator=torch_generator(seed, "attack", self.name, view_key(target)))
        without, loss_without = self._measure(target, others, [])
        with_suffix, loss_with = self._measure(target, others, suffix)
        known_with, _ = self._measure(target, known, suffix)
        metrics: dict[str, float] = {}
        for name, hits in (("secret_rate_without", without), ("secret_rate_with", with_suffix)):
            metrics[name], metrics[f"{name}_low"], metrics[f"{name}_high"] = _rate(sum(hits), len(hits))
        metrics.update({"secret_rate_gain": metrics["secret_rate_with"] - metrics["secret_rate_without"],
                        "answer_loss_without": loss_without, "answer_loss_with": loss_with,
                        "known_secret_rate_with": float(np.mean(known_with)), "suffix_loss": history[-1],
                        "targets": float(len(others)), "known": float(len(known))})
        return ExtractionResult(metrics, {
            "attacker_client": attacker, "suffix": tok.decode(suffix), "suffix_ids": suffix,
            "loss_history": [round(v, 4) for v in history], "seconds": time.perf_counter() - started,
            "extracted_with": [c.patient_name for c, hit in zip(others, with_suffix) if hit][:5],
            "forward_passes": self.steps * len(known) * (1 + self.candidates)})

    def _measure(self, target: Target, canaries: list[Canary], suffix: list[int]) -> tuple[list[bool], float]:
        """Greedy answers to the canaries' prompts with `suffix` in place: whether each contains its secret, and
        the mean answer loss (nats per token) given the prompt."""
        tok, model = target.tokenizer, target.model
        rows = []
        for c in canaries:
            head, tail = split_prompt(tok, c.prompt)
            rows.append((head + suffix + tail, answer_ids(tok, c, target.max_length)))
        out = generate(model, tok, [p for p, _ in rows], max_new_tokens=max(len(a) for _, a in rows) + 4,
                       batch_size=self.batch_size)
        hits = [c.secret in g.text for c, g in zip(canaries, out)]
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            losses = [float(_answer_loss(model, torch.tensor([p + a], device=device), len(p),
                                         torch.tensor(a, device=device))[0]) for p, a in rows]
        return hits, float(np.mean(losses))
