"""FEDPIT (Zhang et al. 2024, "FEDPIT: Towards Privacy-preserving and Few-shot Federated
Instruction Tuning", arXiv 2403.06131), implemented from the paper's description (its code is not
public).

Each sampled client, every round:
1. self-generates synthetic instructions and responses by in-context learning with the model it
   received (base + global adapter), from k of its own records (`fedleak.federated.selfgen`);
2. trains the *global* adapter, starting from the received one, on the synthetic records only,
   and uploads it (aggregated by FedAvg or the configured defense);
3. trains its *local* adapter (kept across rounds, never uploaded) on its own records plus the
   synthetic ones, stacked on the received global adapter, which stays frozen.
The client's final model is base + global + local with both adapters active: `client/i` is the
round's aggregated global adapter plus client i's local adapter. The paper uses LoRA, whose deltas add;
the local adapter is always of the global's kind, and other methods combine as `adapters.activate`
says (IA3's scales multiply, soft prompts and prefixes are concatenated, the global's first, full
fine-tuning's copies add their differences from the base).

Our choices where the paper is silent: step 3 stacks on the *received* global adapter (the one
the client holds during the round); the upload's FedAvg weight is its number of synthetic
records; a client with no accepted synthetic record uploads nothing that round;
a malicious client (a poisoning scenario) poisons the synthetic records behind its upload, since
its local adapter is never shared (its local adapter trains on clean data);
`generate_every_round = False` generates once, in the first round the client is sampled.

Under DP-SGD both trainings are charged to the client's one accountant, and `training_plan`
declares them (global on `synthetic_per_round` records, local on the real plus as many synthetic
ones) so the defense solves one noise for their composition over all rounds
(`fedleak.defenses.dp_sgd`). The synthetic records are generated with the client's real records
as in-context demonstrations, without noise: DP-SGD on the global adapter bounds its training on
the synthetic records, not what the real records pass into them.
"""

from __future__ import annotations

from typing import Annotated

import torch

from fedleak.federated.adapters import (DEFAULT, activate, add_named_adapter, get_adapter_state,
                                        set_adapter_state)
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveFloat, PositiveInt, Range, UnitInterval
from fedleak.federated.rounds import (GLOBAL, Algorithm, ClientContext, ClientResult, TrainingSetup,
                                      register_algorithm)
from fedleak.federated.seeding import derive_seed
from fedleak.federated.selfgen import SelfGenSettings, self_generate

LOCAL = "local"


class SelfGenerating(Algorithm):
    """Shared keyword arguments of the algorithms that self-generate data (FEDPIT, LOCIT+SA)."""

    def __init__(self, *, demos: PositiveInt = 3, synthetic_per_round: PositiveInt = 8, max_attempts: PositiveInt = 24,
                 rouge_threshold: UnitInterval = 0.7, min_words: PositiveInt = 4, max_words: PositiveInt = 60,
                 instruction_max_new_tokens: PositiveInt = 48, response_max_new_tokens: PositiveInt = 96,
                 temperature: PositiveFloat = 1.0, top_p: UnitInterval = 0.95,
                 repetition_penalty: Annotated[float, Range(ge=1)] = 1.2, no_repeat_ngram_size: NonNegativeInt = 3,
                 generate_every_round: bool = True):
        """Set how each client self-generates synthetic records by in-context learning (`federated.selfgen`).

        Args:
            demos: own records shown to the model as in-context demonstrations for each candidate instruction
                (the paper's k; fewer if the client holds fewer, or if they would overflow the context).
            synthetic_per_round: accepted synthetic records wanted per client per round (generation stops there).
            max_attempts: candidate instructions sampled at most per client per round, accepted or not.
            rouge_threshold: a candidate is dropped as a near-duplicate when its ROUGE-L with any of the client's
                instructions or those already accepted is >= this.
            min_words: candidate instructions of fewer words are dropped.
            max_words: candidate instructions of more words are dropped.
            instruction_max_new_tokens: token budget of a sampled instruction; one that reaches it before a newline
                or EOS is dropped as truncated.
            response_max_new_tokens: token budget of a (greedy) response; one that reaches it before EOS is dropped.
            temperature: sampling temperature of the candidate instructions.
            top_p: nucleus sampling mass of the candidate instructions (1 = no cut).
            repetition_penalty: repetition penalty of the greedy responses, as in HF `generate` (1 = none).
            no_repeat_ngram_size: a response never repeats an n-gram of this many tokens (0 = no such constraint).
            generate_every_round: true: generate anew in every round the client is sampled; false: once, in its
                first sampled round, and reuse those records afterwards.

        Raises:
            FedleakError: max_words is below min_words.
        """
        self.demos, self.synthetic_per_round, self.max_attempts = demos, synthetic_per_round, max_attempts
        self.rouge_threshold, self.min_words, self.max_words = rouge_threshold, min_words, max_words
        self.instruction_max_new_tokens, self.response_max_new_tokens = instruction_max_new_tokens, response_max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.repetition_penalty, self.no_repeat_ngram_size = repetition_penalty, no_repeat_ngram_size
        self.generate_every_round = generate_every_round
        try:
            self.selfgen = SelfGenSettings(
                demos=demos, per_round=synthetic_per_round, max_attempts=max_attempts, rouge_threshold=rouge_threshold,
                min_words=min_words, max_words=max_words, instruction_max_new_tokens=instruction_max_new_tokens,
                response_max_new_tokens=response_max_new_tokens, temperature=temperature, top_p=top_p,
                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        except FedleakError as exc:
            raise FedleakError(f"{type(self).name or type(self).__name__}: {exc}") from None

    def synthetic(self, ctx: ClientContext) -> tuple[list, dict]:
        """This round's synthetic records, generated with the model as it stands (the caller sets it)."""
        if not self.generate_every_round and "synthetic" in ctx.memory:
            return ctx.memory["synthetic"], {"reused": len(ctx.memory["synthetic"])}
        records, stats = self_generate(ctx.model, ctx.tokenizer, ctx.records, self.selfgen, seed=ctx.setup.seed,
                                       purpose=(ctx.round, ctx.client),
                                       id_prefix=f"synthetic-r{ctx.round:03d}-c{ctx.client:02d}")
        ctx.memory["synthetic"] = records
        return records, stats


@register_algorithm("fedpit")
class FedPIT(SelfGenerating):
    """FEDPIT: global adapter trained on self-generated data is shared, local adapter on real data stays home (Zhang et al. 2024)."""

    combines_adapters = True

    def training_plan(self, records: int) -> tuple[tuple[str, int], ...]:
        """Two trainings a round: the global adapter on the synthetic records, the local one on real + synthetic.

        Args:
            records: the client's own records.

        Returns:
            ((global adapter, synthetic_per_round), (local adapter, records + synthetic_per_round)).
        """
        return (DEFAULT, self.synthetic_per_round), (LOCAL, records + self.synthetic_per_round)

    def prepare(self, model: torch.nn.Module, setup: TrainingSetup) -> None:
        add_named_adapter(model, LOCAL, setup.adapter, seed=derive_seed(setup.seed, "local-init"))
        self.initial_local = get_adapter_state(model, LOCAL)
        activate(model, [DEFAULT], trainable=DEFAULT)

    def client_round(self, ctx: ClientContext) -> ClientResult:
        model = ctx.model
        set_adapter_state(model, ctx.global_state)
        activate(model, [DEFAULT], trainable=DEFAULT)
        synthetic, gen_stats = self.synthetic(ctx)
        synthetic_examples = ctx.encode(synthetic)
        shared = ctx.poison_data(synthetic)  # a malicious client poisons the data behind its upload
        shared_examples = synthetic_examples if shared is synthetic else ctx.encode(shared)
        upload, metrics = None, {"selfgen": gen_stats, "synthetic": len(synthetic)}
        if shared_examples:
            metrics["global"] = ctx.train(shared_examples, adapter=DEFAULT)
            upload = get_adapter_state(model)
            set_adapter_state(model, ctx.global_state)  # the local adapter stacks on the received global
        set_adapter_state(model, ctx.memory.get("local", self.initial_local), LOCAL)
        activate(model, [DEFAULT, LOCAL], trainable=LOCAL)
        metrics["local"] = ctx.train(ctx.examples + synthetic_examples, adapter=LOCAL)
        metrics["loss_last_quarter"] = metrics["local"]["loss_last_quarter"]
        local = get_adapter_state(model, LOCAL)
        ctx.memory["local"] = local
        activate(model, [DEFAULT], trainable=DEFAULT)
        return ClientResult(upload=upload, num_examples=len(shared_examples), view={DEFAULT: GLOBAL, LOCAL: local},
                            metrics=metrics, artifacts={"synthetic": [r.to_alpaca() for r in synthetic]})
