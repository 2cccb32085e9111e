"""The parameter-efficient methods a federation can train, as peft configs: LoRA (Hu et al. 2021), IA3
(Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"), prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning") and prefix tuning (Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"), and full fine-tuning (every base parameter trained: `federated/full.py`).
`model.adaptation` picks one; each method's table (`model.lora`, `model.ia3`, `model.prompt_tuning`,
`model.prefix_tuning`, `model.full`) holds its settings.

Every method's state is what peft saves for its adapter (`get_peft_model_state_dict`; for full
fine-tuning every base parameter, by its name in the base model), so uploads, aggregation, DP-FedAvg
and checkpoints treat them alike. The differences that matter downstream:

- LoRA and IA3 are layer tuners: several adapters can be on at once (LoRA's updates add up, IA3's
  scales multiply), as FEDPIT's parameter isolation needs.
- Prompt tuning prepends `num_virtual_tokens` trained input embeddings: the model's outputs gain that
  many leading positions (`virtual_tokens` says how many to skip). peft runs one soft prompt at a time;
  several on at once are concatenated into one more adapter (`adapters.combined_prompt`), whose
  `num_virtual_tokens` is their sum.
- Prefix tuning puts `num_virtual_tokens` trained keys and values in every layer's attention cache: the
  outputs keep their length, but the prefix takes the first positions (`prompt_positions`), so the
  text starts at position `num_virtual_tokens` and fits in that many fewer. Several prefixes combine as
  soft prompts do.
- Full fine-tuning keeps one whole copy of the base's parameters per adapter name; several on at once
  add their differences from the base (`federated/full.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fedleak.common.errors import FedleakError
from fedleak.common.params import PositiveFloat, PositiveInt, check_fields

# peft's parameter-name markers of each method's trainable tensors (LoRA: lora_A/lora_B/lora_embedding_*).
# Full fine-tuning's copies are told apart by object, not name (`federated/full.py`).
MARKERS = {"lora": ("lora_",), "ia3": ("ia3_l",), "prompt_tuning": ("prompt_encoder.",),
           "prefix_tuning": ("prompt_encoder.",), "full": ()}
METHODS = tuple(MARKERS)


def _targets(value) -> str | list[str]:
    return value if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class IA3Settings:
    """IA3: learned vectors that rescale the activations of the targeted layers (keys, values and the
    feed-forward input in the paper)."""

    method: ClassVar[str] = "ia3"
    target_modules: str | tuple[str, ...] = field(default="all-linear", metadata={
        "help": "Module names whose outputs (or, for feedforward_modules, inputs) are rescaled, or \"all-linear\" "
                "(peft: every linear layer but the output head)."})
    feedforward_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "Those of target_modules rescaled at their input (the paper's feed-forward layers, e.g. "
                "[\"down_proj\"]); empty: none."})

    def __post_init__(self):
        check_fields(self, "model.ia3.")
        if not self.target_modules:
            raise FedleakError("model.ia3.target_modules is empty: give module names or 'all-linear'")
        targets = self.target_modules
        if self.feedforward_modules and (targets == "all-linear" or (
                not isinstance(targets, str) and not set(self.feedforward_modules) <= set(targets))):
            raise FedleakError("model.ia3.feedforward_modules must be a subset of model.ia3.target_modules: list the "
                               "targets by name when some are feed-forward")

    def peft_config(self):
        from peft import IA3Config

        return IA3Config(target_modules=_targets(self.target_modules),
                         feedforward_modules=list(self.feedforward_modules), task_type="CAUSAL_LM")


@dataclass(frozen=True)
class PromptTuningSettings:
    """Prompt tuning: `num_virtual_tokens` trained input embeddings prepended to every sequence; the
    model's weights stay frozen."""

    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: PositiveInt = field(default=20, metadata={
        "help": "Trained embeddings prepended to every input (each as long as the model's hidden size)."})
    init: Literal["sample_vocab", "random"] = field(default="sample_vocab", metadata={
        "help": "How the soft prompt starts (peft's PromptTuningInit): \"sample_vocab\" the embeddings of random "
                "vocabulary tokens (Lester et al.: vocabulary init trains better than random), \"random\" "
                "N(0, 1) rows."})

    lr: PositiveFloat | None = field(default=None, metadata={
        "help": "Learning rate of the soft prompt; unset: federation.lr. A soft prompt needs a far larger one than "
                "LoRA (Lester et al. train it at 0.3)."})

    def __post_init__(self):
        check_fields(self, "model.prompt_tuning.")

    def peft_config(self):
        from peft import PromptTuningConfig

        return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, task_type="CAUSAL_LM",
                                  prompt_tuning_init=self.init.upper())


@dataclass(frozen=True)
class PrefixTuningSettings:
    """Prefix tuning: `num_virtual_tokens` trained key and value vectors prepended to every layer's
    attention; the model's weights stay frozen.

    The prefix is trained directly, without Li and Liang's MLP reparametrisation: peft saves a projected
    prefix as its output (`get_prompt_embedding_to_save`), not the MLP that trains, so clients could not
    average what they train. Li and Liang initialise from real words' activations, which helped them most
    with little data: `init = "sample_vocab"` does that."""

    method: ClassVar[str] = "prefix_tuning"
    num_virtual_tokens: PositiveInt = field(default=10, metadata={
        "help": "Prefix length: trained key and value vectors per layer (each prefix position costs 2 x layers x "
                "the key width in parameters, and takes one position of the model's context)."})
    init: Literal["sample_vocab", "random", "zero"] = field(default="sample_vocab", metadata={
        "help": "How the prefix starts: \"sample_vocab\" the keys and values the base model computes for random "
                "vocabulary tokens (Li and Liang's real-word initialisation: the model first acts as if those "
                "tokens preceded each text), \"random\" peft's N(0, 1) rows, \"zero\" zeros."})
    lr: PositiveFloat | None = field(default=None, metadata={
        "help": "Learning rate of the prefix; unset: federation.lr. A prefix needs a larger one than LoRA (on the "
                "embedded model 0.03 to 0.1 train it where 0.01 barely moves it)."})

    def __post_init__(self):
        check_fields(self, "model.prefix_tuning.")

    def peft_config(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, task_type="CAUSAL_LM",
                                  prefix_projection=False, init_weights="zero" if self.init == "zero" else None)


@dataclass(frozen=True)
class FullSettings:
    """Full fine-tuning: every parameter of the base model trains (tied weights stay tied), and a client
    uploads all of them. For small models: each adapter name holds a copy of the base's weights, and AdamW
    two more; the base loads in float32 (`model.dtype` "auto" becomes float32), since AdamW's steps on
    16-bit weights are lost below their precision, and quantised weights cannot train."""

    method: ClassVar[str] = "full"
    lr: PositiveFloat | None = field(default=None, metadata={
        "help": "Learning rate of the base weights; unset: federation.lr. Full fine-tuning needs a smaller one "
                "than LoRA (a LoRA rate moves every weight, not a low-rank update scaled by alpha / r)."})

    def __post_init__(self):
        check_fields(self, "model.full.")

    def peft_config(self):
        from fedleak.federated.full import FullConfig

        return FullConfig()


def with_method_lr(train, settings):
    """`train` (a TrainSettings) with the method's own learning rate where its settings give one."""
    import dataclasses

    lr = getattr(settings, "lr", None)
    return dataclasses.replace(train, lr=lr) if lr is not None else train


def is_prompt_learning(model) -> bool:
    """Whether `model` (or the peft model an Opacus GradSampleModule wraps) has a soft prompt or a prefix
    active (peft's prompt-learning methods)."""
    model = getattr(model, "_module", model)
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return bool(getattr(config, "is_prompt_learning", False))


def prompt_positions(model) -> int:
    """How many leading positions an active soft prompt or prefix takes (0 for layer tuners, a bare base
    model, or inside `disable_adapter()`): the text starts at this position, and fits in that many fewer."""
    model = getattr(model, "_module", model)
    if not is_prompt_learning(model) or getattr(model, "_adapters_disabled", False):
        return 0
    return int(model.peft_config[model.active_adapter].num_virtual_tokens)


def is_prefix(model) -> bool:
    """Whether `model` (or the peft model an Opacus GradSampleModule wraps) has a prefix active (prefix
    tuning: trained keys and values in the attention cache)."""
    model = getattr(model, "_module", model)
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return prompt_positions(model) > 0 and getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING"


def virtual_tokens(model) -> int:
    """How many leading positions the model's outputs gain from an active soft prompt (0 for layer
    tuners, a prefix, which adds none, a bare base model, or inside `disable_adapter()`)."""
    return 0 if is_prefix(model) else prompt_positions(model)
