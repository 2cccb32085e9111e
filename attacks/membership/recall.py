"""ReCaLL (Xie, Wang, Huang, Zhang, Ge, Pei, Gong and Dhingra 2024, "ReCaLL: Membership Inference via
Relative Conditional Log-Likelihoods", arXiv 2406.15968) and Con-ReCall (Wang, Wang, Hooi, Cai, Peng and
Chang 2024, "Con-ReCall: Detecting Pre-training Data in LLMs via Contrastive Decoding", arXiv 2409.03363).

With LL(x) the mean log-prob of x's scored tokens and LL(x | P) the same tokens behind a prefix P:

    recall(x)     = LL(x | P_non) / LL(x)
    con_recall(x) = (LL(x | P_non) - gamma * LL(x | P_mem)) / LL(x)

Higher = member in both (the papers' sign: the official code ranks by the score as is, MIMIR's
recall.py negates it because MIMIR ranks lower = member). A non-member context lowers a member's
likelihood more than a non-member's; the paper argues a member context lowers it less, so contrasting
the two amplifies the gap. LL(x) < 0, so the scores are loss ratios: recall = loss(x | P_non) / loss(x).

Here x is a record's scored tokens in the training format (the response under response-only training)
and P is `num_shots` whole records in the same format, each as `encode` tokenises it, put in front of
the record with unscored labels (`stats.prefixed`): the prefixed pass scores exactly the plain pass's
tokens. Shots that do not fit beside the longest scored record in the model's positions are dropped,
whole, from the end (logged); the record itself is never cut (`stats.prefixed` would cut the prefix).

- P_non: `num_shots` records of the attacker's public pool (`AttackEnvironment.public`, records no model
  of the run trained on; never the targets), drawn with `env.seed`. Recall and con_recall draw the same
  shots, so at equal `num_shots` they share the non-member-prefixed pass.
- P_mem: the same public prompts answered by the view itself (greedy, `max_new_tokens`). The paper takes
  true members and also studies approximating them; an attacker in a federation has no member it may
  use here (the scored records are the targets, a curious server holds no record, and the environment
  gives a client's own records to no attack). What a model generates is what it ranks likely: its answers
  carry the fine-tune's templates and memorised strings. Measured on the tests' federation
  (tests/frontier.py, FEDIT/none, round 3, 4 shots, gamma 0.5, 4 of each view's members removed from the
  scored ones and used as an oracle P_mem), AUC global / upload 0, 1, 2: view's answers 0.54 / 0.57,
  0.78, 0.61; true members 0.54 / 0.64, 0.71, 0.62; recall 0.59 / 0.64, 0.78, 0.68. True members do no
  better than the view's answers, and neither beats recall: after fine-tuning any context, member-like
  or not, moves a member (trained at position 0 with no context) more than a non-member, so the
  subtracted term carries recall's own signal and AUC falls with gamma (4 shots, mean of the four
  views: gamma 0.2 0.64, 0.5 0.60, 1.0 0.48). Hence the default gamma 0.2, the low end of the paper's
  sweep (0.1 to 1.0). At the defaults (8 shots, gamma 0.2) con_recall's mean AUC is 0.64 on the tests'
  federation and 0.63 on the demo's training, recall's 0.66 and 0.64.
- num_shots: mean AUC of the four views 0.57, 0.60, 0.65, 0.66 at 1, 2, 4, 8 shots (LOSS: 0.72), the
  blind baseline's (adapters off) 0.49 at 8 shots and 0.62 at 4; on the demo's FEDIT/none training
  0.59 at 4 and 0.64 at 8 (LOSS 0.69). Hence 8 (MIMIR's default is 1 shot of 100-200 words; these
  records are about 70 tokens).

Threat model: black-box, any view whose model the attacker can query with its own inputs and read
token log-probs from (global, upload, client), any round.

Cost per view and record set: recall, one forward pass over the prefixed records (the plain pass is the
one LOSS and the other logit scores share); con_recall, two (the non-member one shared with recall at
equal num_shots), plus `num_shots` greedy generations of at most `max_new_tokens` tokens. A prefixed
sequence is longer by the prefix's tokens (about 70 per shot for the embedded generator's records, so
8 shots make it about 6 times the plain one's tokens), but the prefix is the same for every record: a
prefixed pass runs it once and scores each batch of records behind its key/value cache
(`stats.prefix_cache`), so it computes the records' tokens (each attending to the prefix) and the prefix
once, not the prefix once per record. Measured with the embedded model (a LoRA view) on 2 shared CPU
cores, 7 records behind 8 shots (596 tokens), batch 3: 0.45 s behind the cache against 1.9 s with the
prefix in every sequence. Where the cache would not give the same statistics (`stats.prefix_cache`: a
prefix the model's positions cut for some record, an active soft prompt or prefix, a short sliding window)
the prefixed sequences run whole, at the old cost (the blind baseline repeats each on the base model).
"""

from __future__ import annotations

import logging
from typing import Annotated, Sequence

import numpy as np

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.attacks.extraction.common import greedy_texts
from fedleak.attacks.membership.stats import TokenStats, positions, shared_stats
from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveInt, Range
from fedleak.federated.data import Record
from fedleak.federated.seeding import numpy_rng
from fedleak.federated.training import encode

log = logging.getLogger(__name__)

MIN_LOSS = 1e-12  # floor for LL(x) = 0 (every token at probability 1): the ratio stays finite


def recall_score(plain: TokenStats, nonmember: TokenStats) -> np.ndarray:
    """LL(x | P_non) / LL(x), i.e. loss(x | P_non) / loss(x), per record."""
    return nonmember.loss / np.maximum(plain.loss, MIN_LOSS)


def con_recall_score(plain: TokenStats, nonmember: TokenStats, member: TokenStats, *, gamma: float) -> np.ndarray:
    """(LL(x | P_non) - gamma * LL(x | P_mem)) / LL(x), i.e. (loss_non - gamma * loss_mem) / loss, per record."""
    return (nonmember.loss - gamma * member.loss) / np.maximum(plain.loss, MIN_LOSS)


def shots(target: Target, num_shots: int, attack: str) -> list[Record]:
    """`num_shots` records of the attacker's public pool, drawn with the run's seed; a smaller num_shots
    takes the first of a larger one's (one permutation), so prefixes nest."""
    env = target.env
    if env is None:
        raise FedleakError(f"attack {attack}: the target has no AttackEnvironment: its public pool gives the prefixes")
    if len(env.public) < num_shots:
        raise FedleakError(f"attack {attack}: num_shots = {num_shots} but the attacker's public pool holds "
                           f"{len(env.public)} records: lower num_shots or raise attack.public_records")
    order = numpy_rng(env.seed, "recall", "shots").permutation(len(env.public))[:num_shots]
    return [env.public[int(i)] for i in order]


def prefix_ids(target: Target, records: Sequence[Record], prefix: Sequence[Record], attack: str) -> tuple[int, ...]:
    """The prefix records' tokens in the training format, concatenated, keeping the shots that fit beside
    the longest of `records` in the model's positions (at least one: `stats.prefixed` cuts it per record)."""
    encoded = encode(prefix, target.tokenizer, max_length=target.max_length, response_only=target.response_only)
    limit = positions(target.model)
    room = None if limit is None else limit - max(
        (len(e.input_ids) for e in encode(records, target.tokenizer, max_length=target.max_length,
                                          response_only=target.response_only)), default=0)
    ids: list[int] = []
    kept = 0
    for e in encoded:
        if room is not None and kept and len(ids) + len(e.input_ids) > room:
            break
        ids += e.input_ids
        kept += 1
    if kept < len(encoded):
        log.warning("attack %s: %d of %d shots fit beside the longest record in the model's %d positions; "
                    "the rest are dropped", attack, kept, len(encoded), limit)
    return tuple(ids)


@register_attack("recall")
class ReCaLLAttack(MembershipAttack):
    """ReCaLL: likelihood ratio of each record behind non-member (public) shots and alone (Xie et al. 2024)."""

    def __init__(self, *, num_shots: PositiveInt = 8):
        """Set the prefix.

        Args:
            num_shots: records of the attacker's public pool put in front of every scored record (the
                paper's shots), drawn with the run's seed; fewer where they do not fit the model's positions.
        """
        self.num_shots = num_shots

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """`recall_score` from the shared plain pass and one prefixed pass (see the module docstring)."""
        nonmember = prefix_ids(target, records, shots(target, self.num_shots, "recall"), "recall")
        return recall_score(shared_stats(target, records), shared_stats(target, records, prefix=nonmember))


@register_attack("con_recall")
class ConReCaLLAttack(MembershipAttack):
    """Con-ReCall: ReCaLL contrasted with member-like shots, the view's own answers (Wang et al. 2024)."""

    def __init__(self, *, num_shots: PositiveInt = 8, gamma: Annotated[float, Range(ge=0)] = 0.2,
                 max_new_tokens: PositiveInt = 64):
        """Set the prefixes and the contrast.

        Args:
            num_shots: public records in each prefix: as is for the non-member prefix (recall's), with the
                view's own greedy answers for the member prefix.
            gamma: weight of the member-prefixed likelihood (the paper's gamma; 0 gives recall).
            max_new_tokens: cap on each answer the view generates for the member prefix.
        """
        self.num_shots, self.gamma, self.max_new_tokens = num_shots, gamma, max_new_tokens

    def member_shots(self, target: Target) -> list[Record]:
        """The public shots answered by the view itself (greedy), cached per view."""
        public = shots(target, self.num_shots, "con_recall")
        key = ("con_recall-answers", tuple(r.record_id for r in public), tuple(hash(r) for r in public),
               self.max_new_tokens)
        if key not in target.cache:
            target.cache[key] = greedy_texts(target, public, max_new_tokens=self.max_new_tokens,
                                             batch_size=target.batch_size)
        return [Record(instruction=r.instruction, input=r.input, output=text, category=r.category,
                       record_id=f"{r.record_id}-answered") for r, text in zip(public, target.cache[key])]

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """`con_recall_score` from the shared plain pass and two prefixed passes (see the module docstring)."""
        nonmember = prefix_ids(target, records, shots(target, self.num_shots, "con_recall"), "con_recall")
        member = prefix_ids(target, records, self.member_shots(target), "con_recall")
        return con_recall_score(shared_stats(target, records), shared_stats(target, records, prefix=nonmember),
                                shared_stats(target, records, prefix=member), gamma=self.gamma)
