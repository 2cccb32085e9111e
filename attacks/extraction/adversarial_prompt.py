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

Transfer to other views (`SuffixAttack`, `gcg.py`): with `upload` or `client` among the observers, the suffix found
on the round's global model is carried unchanged to each other client's model (or upload), and measured on that
client's canaries: does a suffix crafted on the shared model open another client's personalised one? The attacker's
own model holds only its own canaries: NaN there, with a note. The search, its token rules and its departures from
the paper are in `gcg.py`; `adversarial_trigger` optimises for a backdoor's target instead.
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.base import Secrets, Target, register_attack
from fedleak.attacks.extraction.gcg import SuffixAttack, rates, response_ids, split_prompt
from fedleak.common.params import PositiveInt
from fedleak.federated.data import Canary

METRICS = ("secret_rate_without", "secret_rate_without_low", "secret_rate_without_high", "secret_rate_with",
           "secret_rate_with_low", "secret_rate_with_high", "secret_rate_gain", "answer_loss_without",
           "answer_loss_with", "known_secret_rate_with", "suffix_loss", "targets", "known")


def answer_ids(tokenizer, canary: Canary, max_length: int) -> list[int]:
    """The canary's answer as training tokenised it (response tokens and end of answer)."""
    return response_ids(tokenizer, canary.record(0), max_length)


@register_attack("adversarial_prompt")
class AdversarialPrompt(SuffixAttack):
    """adversarial_prompt: a GCG suffix optimised on the attacker's own canaries writes other clients' secrets?"""

    metric_names = METRICS

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

    def objective(self, target: Target, secrets: Secrets, rng: np.random.Generator):
        # The attacker: a client with canaries of its own (seeded); the targets: everyone else's.
        inserted = [c for c in secrets.canaries if c.repetitions > 0 and c.client is not None]
        holders = sorted({c.client for c in inserted})
        attacker = int(rng.choice(holders)) if holders else None
        known = [c for c in inserted if c.client == attacker][:self.max_known]
        others = [c for c in inserted if c.client != attacker]
        if not known or not others:
            return ("the view needs inserted canaries of the attacker's own and of other clients: "
                    f"{len(known)} own, {len(others)} others'")
        tok = target.tokenizer
        prompts = [(*split_prompt(tok, c.prompt), answer_ids(tok, c, target.max_length)) for c in known]
        return prompts, {"attacker_client": attacker, "known_canaries": [c.patient_name for c in known]}

    def measure(self, target: Target, secrets: Secrets, suffix: list[int], chosen: dict):
        attacker = chosen["attacker_client"]
        others = [c for c in secrets.canaries if c.repetitions > 0 and c.client is not None and c.client != attacker]
        if not others:
            return f"this view holds no inserted canary of a client other than the attacker (client {attacker})"
        known = [c for c in secrets.canaries if c.client == attacker and c.repetitions > 0
                 and c.patient_name in chosen["known_canaries"]]
        without, loss_without = self._measure(target, others, [])
        with_suffix, loss_with = self._measure(target, others, suffix)
        known_with = self._measure(target, known, suffix)[0] if known else []
        metrics: dict[str, float] = {}
        rates(metrics, "secret_rate_without", without)
        rates(metrics, "secret_rate_with", with_suffix)
        metrics.update({"secret_rate_gain": metrics["secret_rate_with"] - metrics["secret_rate_without"],
                        "answer_loss_without": loss_without, "answer_loss_with": loss_with,
                        "known_secret_rate_with": float(np.mean(known_with)) if known_with else np.nan,
                        "targets": float(len(others)), "known": float(len(chosen["known_canaries"]))})
        return metrics, {"extracted_with": [c.patient_name for c, hit in zip(others, with_suffix) if hit][:5]}

    def _measure(self, target: Target, canaries: list[Canary], suffix: list[int]) -> tuple[list[bool], float]:
        """Greedy answers to the canaries' prompts with `suffix` in place: whether each contains its secret, and
        the mean answer loss (nats per token) given the prompt."""
        tok = target.tokenizer
        rows = []
        for c in canaries:
            head, tail = split_prompt(tok, c.prompt)
            rows.append((head + suffix + tail, answer_ids(tok, c, target.max_length)))
        texts = self.greedy(target, [p for p, _ in rows], max(len(a) for _, a in rows) + 4)
        return [c.secret in text for c, text in zip(canaries, texts)], self.losses(target, rows)
