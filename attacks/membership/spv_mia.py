"""SPV-MIA's self-prompt reference model (Fu, Wang, Gao, Liu, Li and Jiang 2024, "Practical Membership
Inference Attacks against Fine-tuned Large Language Models via Self-prompt Calibration", NeurIPS 2024,
arXiv 2311.06062).

A reference model needs data from the target's training distribution, which an attacker rarely holds; but
the fine-tuned target has learnt that distribution, so it can write such data itself. Prompt the view with
the attacker's public prompts, sample its answers, fine-tune a fresh adapter of the base model on them
(the target's adapter and train settings, for `epochs`), and calibrate the target's likelihood by it:

    score(x) = NLL_reference(x) - NLL_target(x)        (mean NLL of x's scored tokens)

the paper's calibrated likelihood, which is `reference.py`'s score with the self-prompted model as the
reference. Implemented: the self-prompt reference and that score. Not implemented: the paper's
"probabilistic variation" (the likelihood's second-order change under paraphrases from a mask-filling
model, in place of the likelihood itself): it needs a paraphrase model and many passes per record.

Self-prompts: the paper cuts short chunks of in-domain text and lets the target continue them. Here a prompt
is a public record's instruction (and input) in the run's prompt format, optionally followed by the first
`prefix_tokens` tokens of its answer (a chunk of in-domain text, the paper's self-prompt); the target's
continuation, with that chunk, is the answer the reference trains on, with the training's response-only loss.

Epochs: 2 by default, not the target's. A reference trained as long as the target on a few dozen samples
memorises them, and its loss on x then says how close x is to those samples (and to any member the view
regurgitated into them) more than how typical x is of the view's distribution. On the frontier federation
(tests/frontier.py, 9 target epochs, 64 prompts) 9 epochs gave AUC 0.59 on upload/0 and 0.63 on global,
2 epochs 0.86 and 0.64 (LOSS 0.82 and 0.64); temperature 0.7 did worse (0.57, 0.52 at 9 epochs).

Threat model: black-box generation and likelihoods of any view (global, upload, client), the base model, the
target's training recipe and the public pool `env.public`; no record of the training distribution.
Cost per distinct view model (the views loading one adapter file, FEDIT's upload/i and client/i, and views
scored again share it; the blind baseline's base model is one more): `prompts` sampled generations of up to
`max_new_tokens` tokens, one LoRA fine-tune of `epochs` over them (`prompts` records), and one forward pass
of the reference per scored record set; the target's pass is shared with LOSS (`shared_stats`). The
reference adapter's tensors (an upload's size) stay in the view's cache for its later record sets, its
statistics in `env.cache` keyed by the view's adapter tensors. Seeded from `env.seed`: same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from typing import Sequence

import numpy as np
import torch

from fedleak.attacks.base import MembershipAttack, Target, register_attack
from fedleak.attacks.membership.stats import compute_stats, shared_stats
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveFloat, PositiveInt
from fedleak.federated.adapters import activate, adapters_enabled, add_named_adapter, get_adapter_state, set_adapter_state
from fedleak.federated.data import Record
from fedleak.federated.generation import generate
from fedleak.federated.prompts import prompt_ids
from fedleak.federated.seeding import derive_seed, numpy_rng, torch_generator
from fedleak.federated.training import encode, train_adapter

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "spv-reference"  # the adapter the reference trains on the target's base weights
ADAPTERS_OFF = "adapters-off"  # the fingerprint of a peft model with its adapters switched off: the base model


def view_fingerprint(model) -> str:
    """What model a peft view is: a digest of its active adapters' tensors, or ADAPTERS_OFF inside
    `disable_adapter()` (the blind baseline's base model). Views loading the same files agree."""
    if getattr(model, "_adapters_disabled", False):
        return ADAPTERS_OFF
    digest = hashlib.sha256()
    for name in sorted(model.active_adapters):
        state = get_adapter_state(model, name)
        for key in sorted(state):
            digest.update(f"{name}/{key}/{state[key].dtype}/{tuple(state[key].shape)}".encode())
            digest.update(state[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def reference_adapter(model, env, *, seed: int, state=None):
    """A fresh adapter of the target's method (seeded; `state` loaded if given) on the view's base weights, alone active and
    trainable inside the context; afterwards deleted and the view's adapters (and their on/off state) back."""
    active = list(model.active_adapters)
    try:
        add_named_adapter(model, REFERENCE_ADAPTER, env.adapter, seed=seed)
        if state is not None:
            set_adapter_state(model, state, REFERENCE_ADAPTER, source="attack spv_mia: the cached reference")
        # Inside the blind baseline's disable_adapter() the reference must still act.
        with adapters_enabled(model):
            activate(model, [REFERENCE_ADAPTER], trainable=REFERENCE_ADAPTER)
            try:
                yield
            finally:
                activate(model, active)  # first: peft warns when the active adapter is deleted
    finally:
        if REFERENCE_ADAPTER in model.peft_config:
            model.delete_adapter(REFERENCE_ADAPTER)
        model.eval()


def self_prompts(public: Sequence[Record], tokenizer, *, count: int, prefix_tokens: int,
                 seed: int) -> list[tuple[Record, list[int], list[int]]]:
    """`count` (record, prompt ids, answer-prefix ids) from the public pool: a seeded random order of the
    pool, cycled when `count` exceeds it (sampling makes each repeat a new answer)."""
    order = numpy_rng(seed, "spv-mia", "prompts").permutation(len(public))
    out = []
    for i in range(count):
        record = public[int(order[i % len(public)])]
        prefix = tokenizer(record.output, add_special_tokens=False)["input_ids"][:prefix_tokens]
        out.append((record, prompt_ids(tokenizer, record.instruction, record.input), list(prefix)))
    return out


def self_generated_records(model, tokenizer, public: Sequence[Record], *, count: int, prefix_tokens: int,
                           max_new_tokens: int, temperature: float, batch_size: int, seed: int) -> list[Record]:
    """The view's sampled answers to the self-prompts, as training records (an answer prefix followed by
    nothing is dropped)."""
    prompts = self_prompts(public, tokenizer, count=count, prefix_tokens=prefix_tokens, seed=seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(derive_seed(seed, "spv-mia", "sampling"))
        outputs = generate(model, tokenizer, [p + prefix for _, p, prefix in prompts], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, do_sample=True, temperature=temperature)
    records = []
    for i, ((source, _, prefix), out) in enumerate(zip(prompts, outputs)):
        text = tokenizer.decode(prefix + list(out.ids), skip_special_tokens=True).strip()
        if out.ids and text:  # the prefix alone is public text, not the view's
            records.append(Record(instruction=source.instruction, input=source.input, output=text,
                                  category=source.category, record_id=f"spv-self-{i:05d}"))
    return records


@register_attack("spv_mia")
class SPVMIAAttack(MembershipAttack):
    """SPV-MIA: the loss drop from a reference fine-tuned on the view's own generations (Fu et al. 2024)."""

    def __init__(self, *, prompts: PositiveInt = 64, max_new_tokens: PositiveInt = 64, epochs: PositiveInt = 2,
                 temperature: PositiveFloat = 1.0, prefix_tokens: NonNegativeInt = 0):
        """Set the self-prompting and the reference fine-tune.

        Args:
            prompts: self-prompts, drawn from the public pool (cycled past its size): the reference's
                training records.
            max_new_tokens: longest sampled answer per prompt.
            epochs: epochs of the reference fine-tune (the target's LoRA and train settings otherwise); few: it
                should learn the view's distribution, not memorise its samples (attacks/membership/spv_mia.py).
            temperature: sampling temperature of the view's answers (1: its own distribution).
            prefix_tokens: first tokens of the public record's answer given after the prompt, continued by
                the view (the paper's text-chunk self-prompt); 0: the instruction alone.
        """
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.epochs = epochs
        self.temperature = temperature
        self.prefix_tokens = prefix_tokens

    def _key(self, env, target: Target) -> tuple:
        """What the reference depends on besides the view (the view is the fingerprint)."""
        return ("spv-mia", self.prompts, self.max_new_tokens, self.epochs, self.temperature, self.prefix_tokens,
                env.seed, env.adapter, env.train, env.max_length, env.response_only, target.max_length,
                target.response_only, tuple(r.record_id for r in env.public), tuple(hash(r) for r in env.public))

    def _check(self, target: Target):
        env = target.env
        if env is None:
            raise FedleakError("attack spv_mia: the target has no attack environment: it needs the public pool "
                               "(self-prompts) and the adapter and train settings (the reference fine-tune)")
        missing = [name for name in ("public", "adapter", "train") if not getattr(env, name)]
        if missing:
            raise FedleakError(f"attack spv_mia: the attack environment lacks {', '.join(missing)}: the "
                               f"self-prompts come from env.public (attack.public_records) and the reference "
                               f"fine-tune follows the target's adapter and train settings")
        from peft import PeftModel

        from fedleak.federated.full import FullModel

        if not isinstance(target.model, (PeftModel, FullModel)):
            raise FedleakError("attack spv_mia: the target is not a peft model: the reference is an adapter "
                               "trained on the view's base weights; attack a peft-wrapped view")
        return env

    @staticmethod
    def _fingerprint(target: Target) -> str:
        if getattr(target.model, "_adapters_disabled", False):
            return ADAPTERS_OFF
        memo = target.cache.setdefault(("spv-mia", "fingerprint"), {})  # a view's cache serves one model:
        if "view" not in memo:  # hash its tensors once
            memo["view"] = view_fingerprint(target.model)
        return memo["view"]

    def reference_stats(self, target: Target, records: Sequence[Record]):
        """The reference's `TokenStats` of `records`: cached per view model (fingerprint) and record set in
        `env.cache`; the reference trains on first use per view model (its adapter kept in `target.cache`)."""
        env = self._check(target)
        model, tokenizer = target.model, target.tokenizer
        key = self._key(env, target) + (self._fingerprint(target),)
        stats = env.cache.setdefault(key, {})
        records_key = (tuple(r.record_id for r in records), tuple(hash(r) for r in records))
        if records_key in stats:
            return stats[records_key]
        seed = derive_seed(env.seed, "spv-mia")
        adapters = target.cache.setdefault(("spv-mia", "adapter"), {})
        scoring = dict(max_length=target.max_length, response_only=target.response_only, batch_size=target.batch_size)
        if key in adapters:
            with reference_adapter(model, env, seed=seed, state=adapters[key]):
                stats[records_key] = compute_stats(model, tokenizer, records, **scoring)
            return stats[records_key]
        start = time.perf_counter()
        generated = self_generated_records(model, tokenizer, env.public, count=self.prompts,
                                           prefix_tokens=self.prefix_tokens, max_new_tokens=self.max_new_tokens,
                                           temperature=self.temperature, batch_size=target.batch_size, seed=seed)
        if not generated:
            raise FedleakError(f"attack spv_mia: the view answered all {self.prompts} self-prompts with empty text: "
                               f"raise max_new_tokens or prompts")
        generating = time.perf_counter() - start
        settings = dataclasses.replace(env.train, epochs=self.epochs)
        with reference_adapter(model, env, seed=derive_seed(seed, "init")):
            examples = encode(generated, tokenizer, max_length=env.max_length, response_only=env.response_only)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "train"))  # dropout
                train_adapter(model, examples, settings, pad_id=tokenizer.pad_token_id,
                              generator=torch_generator(seed, "spv-mia", "batches"))
            adapters[key] = get_adapter_state(model, REFERENCE_ADAPTER)
            stats[records_key] = compute_stats(model, tokenizer, records, **scoring)
        log.info("spv_mia: %d self-prompted records generated in %.1f s, reference fine-tuned (%d epochs) and "
                 "scored in %.1f s", len(generated), generating, settings.epochs,
                 time.perf_counter() - start - generating)
        return stats[records_key]

    def score(self, target: Target, records: Sequence[Record]) -> np.ndarray:
        """NLL_reference(x) - NLL_target(x) of each record (see `MembershipAttack.score`).

        Raises:
            FedleakError: no environment, no public pool, no LoRA or train settings, a target that is not a
                peft model, or a view that answers every self-prompt with nothing.
        """
        reference = self.reference_stats(target, records)
        return reference.loss - shared_stats(target, records).loss
