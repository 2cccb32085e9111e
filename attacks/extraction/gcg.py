"""Greedy coordinate gradient (GCG) adversarial suffixes (Zou, Wang, Carlini, Nasr, Kolter and Fredrikson 2023,
"Universal and Transferable Adversarial Attacks on Aligned Language Models", arXiv 2307.15043): the search, the
prompt surgery that places a suffix inside the training template, and `SuffixAttack`, the base of the attacks that
optimise one suffix on the global model and measure it there and on every other view of the same round.

Token level: a suffix is a list of token ids placed between a prompt's instruction and the rest of its template
(white-box: the attacker feeds ids; a text interface may tokenise the decoded suffix differently). Special tokens are
never candidates. The search keeps the current suffix when no candidate lowers the loss (the paper takes the best
candidate regardless) and sums the prompts' losses without normalising their gradients.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Sequence

import numpy as np
import torch
from scipy.stats import binomtest

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target
from fedleak.attacks.extraction.common import run_seed, view_key
from fedleak.federated.batching import IGNORE
from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.methods import virtual_tokens
from fedleak.federated.prompts import _special_ids, _text_ids, bos_prefix, is_chat, prompt_ids, prompt_text
from fedleak.federated.seeding import numpy_rng, torch_generator
from fedleak.federated.training import encode

_MARK = "\x00suffix\x00"
CHUNK = 64  # candidate rows per forward pass (bounds activation memory on a large model)


def split_prompt(tokenizer, instruction: str, input: str = "") -> tuple[list[int], list[int]]:
    """The prompt's ids before the suffix's place (through the instruction) and after it (the template's rest).

    Where the prompt's own tokens start with the head's (the usual case), the tail is the rest of them, so head +
    tail is exactly the prompt training saw; otherwise (a token spans the boundary) the tail is tokenised alone."""
    head_text, tail_text = prompt_text(tokenizer, instruction + _MARK, input).split(_MARK)
    head = ([] if is_chat(tokenizer) else bos_prefix(tokenizer)) + _text_ids(tokenizer, head_text)
    full = prompt_ids(tokenizer, instruction, input)
    if full[:len(head)] == head:
        return head, full[len(head):]
    return head, _text_ids(tokenizer, tail_text)


def response_ids(tokenizer, record: Record, max_length: int) -> list[int]:
    """The record's response as training tokenised it (response tokens and end of answer)."""
    example = encode([record], tokenizer, max_length=max_length, response_only=True)[0]
    return [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]


def allowed_tokens(tokenizer, model) -> torch.Tensor:
    """[V] bool: the ids a suffix may hold (no special token, no embedding row that no token maps to)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in _special_ids(tokenizer) if i < vocab]] = False
    allowed[len(tokenizer):] = False
    return allowed


def answer_loss(model, ids: torch.Tensor | None, start: int, target: torch.Tensor, *,
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
                total[at:at + CHUNK] += answer_loss(model, rows, len(head) + suffix_tokens + len(tail), target)
        return total / len(parts)

    with torch.no_grad():
        history = [float(losses(suffix[None])[0])]
    for _ in range(steps):
        one_hot = torch.nn.functional.one_hot(suffix, embedding.shape[0]).to(embedding.dtype).requires_grad_(True)
        with torch.enable_grad():
            loss = 0.0
            for head, tail, target in parts:
                embeds = torch.cat([embedding[head], one_hot @ embedding, embedding[tail], embedding[target]])[None]
                loss = loss + answer_loss(model, None, len(head) + suffix_tokens + len(tail), target, embeds=embeds)[0]
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


def rate(hits: Sequence[bool]) -> tuple[float, float, float]:
    """The hit rate and its exact (Clopper-Pearson) 95% interval; NaNs without trials."""
    if not len(hits):
        return (np.nan,) * 3
    ci = binomtest(int(sum(hits)), len(hits)).proportion_ci(confidence_level=0.95, method="exact")
    return float(np.mean(hits)), float(ci.low), float(ci.high)


def rates(metrics: dict, name: str, hits: Sequence[bool]) -> None:
    """Sets `name`, `name_low` and `name_high` in `metrics` (`rate`)."""
    metrics[name], metrics[f"{name}_low"], metrics[f"{name}_high"] = rate(hits)


class SuffixAttack(ExtractionAttack):
    """Base of the GCG attacks: one suffix per training and round, optimised on the global model (a client holds it),
    measured on the global view and carried unchanged to every other view of that round the attack probes (the
    attacker sends it to another client's model or reads an upload the way a server would): transfer across views.

    Subclasses set `suffix_tokens`, `steps`, `top_k`, `candidates`, `batch_size` and implement `objective` (the
    prompts to optimise on) and `measure` (the metrics of a suffix on a view). Every cell's `suffix_loss` is the
    search's final loss on the global model; `forward_passes` (the search's cost) is in the global cell only.
    """

    observers = ("global", "upload", "client")
    observers_why = "the suffix is optimised on the global model, then carried to the other views of the round"
    metric_names: tuple[str, ...] = ()  # every metric `measure` returns, for the NaN result

    @abstractmethod
    def objective(self, target: Target, secrets: Secrets, rng: np.random.Generator
                  ) -> tuple[list[tuple[list[int], list[int], list[int]]], dict] | str:
        """On the global view: the (head, tail, target ids) prompts the suffix is optimised on and what the attacker
        chose (JSON-serialisable, handed to `measure`), or a note saying why there is nothing to optimise."""

    @abstractmethod
    def measure(self, target: Target, secrets: Secrets, suffix: list[int], chosen: dict) -> tuple[dict, dict] | str:
        """The metrics and details of `suffix` on a view (the global one or another of its round), or a note."""

    def _nan(self, note: str, **details) -> ExtractionResult:
        metrics = {k: np.nan for k in self.metric_names}
        return ExtractionResult(metrics, {"note": note, **details})

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        started = time.perf_counter()
        found = vars(self).setdefault("_found", {})  # (training, round) -> suffix, chosen, its facts
        # A training is its checkpoint folder; a view built by hand is known by its environment.
        where = (str(target.server.training_dir) if target.server is not None else f"env {id(target.env)}",
                 target.round)
        if target.observer == "global":
            found[where] = self._optimise(target, secrets)
        elif where not in found:
            return self._nan(f"no suffix for round {target.round}: it is optimised on that round's global view, which "
                             "this attack did not probe (not among its observers, cut by a rule, the algorithm has "
                             "none, or its cell failed)")
        suffix, chosen, facts = found[where]
        if suffix is None:
            return self._nan(facts["note"])
        measured = self.measure(target, secrets, suffix, chosen)
        if isinstance(measured, str):
            return self._nan(measured, suffix_ids=suffix)
        metrics, details = measured
        metrics["suffix_loss"] = facts["loss_history"][-1]  # the global model's, where the suffix was found
        # The search's cost is the global cell's; a carried suffix costs only its measurement.
        own = facts if target.observer == "global" else {"transferred_from": "global",
                                                         "loss_history": facts["loss_history"]}
        return ExtractionResult(metrics, {**chosen, **own, **details, "suffix": target.tokenizer.decode(suffix),
                                          "suffix_ids": suffix, "seconds": time.perf_counter() - started})

    def _optimise(self, target: Target, secrets: Secrets):
        seed = run_seed(target, self.name)
        spec = self.objective(target, secrets, numpy_rng(seed, "attack", self.name, view_key(target)))
        if isinstance(spec, str):
            return None, {}, {"note": spec}
        prompts, chosen = spec
        tok = target.tokenizer
        suffix, history = gcg_suffix(target.model, prompts, suffix_tokens=self.suffix_tokens, steps=self.steps,
                                     top_k=self.top_k, candidates=self.candidates,
                                     allowed=allowed_tokens(tok, target.model), init_id=_text_ids(tok, "!")[-1],
                                     generator=torch_generator(seed, "attack", self.name, view_key(target)))
        if not np.isfinite(history[-1]):
            return None, {}, {"note": "the search's loss on the global model is not finite (a diverged model?): "
                                      "no suffix"}
        return suffix, chosen, {"loss_history": [round(v, 4) for v in history],
                                "forward_passes": self.steps * len(prompts) * (1 + self.candidates)}

    def greedy(self, target: Target, prompts: list[list[int]], budget: int) -> list[str]:
        """Greedy answers (text) to token-id prompts, `budget` new tokens each."""
        out = generate(target.model, target.tokenizer, prompts, max_new_tokens=budget, batch_size=self.batch_size)
        return [g.text for g in out]

    @staticmethod
    def losses(target: Target, rows: list[tuple[list[int], list[int]]]) -> float:
        """Mean over (prompt, answer) rows of the answer's mean cross-entropy (nats per token) given the prompt."""
        device = target.model.get_input_embeddings().weight.device
        with torch.no_grad():
            return float(np.mean([float(answer_loss(target.model, torch.tensor([p + a], device=device), len(p),
                                                    torch.tensor(a, device=device))[0]) for p, a in rows]))
