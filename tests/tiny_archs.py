"""Tiny randomly initialised instances of real architectures, built offline, for tests and bench.

Each family is the real transformers model class (GPT-2's Conv1D, Phi-3's fused qkv_proj and
gate_up_proj, OPT's [batch*tokens, hidden] MLP, Mixtral's router and experts, ...) at hidden size 64
with 2 layers, and a tokenizer that re-wraps a byte-level BPE (the embedded model's, or one trained
here with the embedded model's `train_tokenizer` on the public generator corpus) with the family's
own special tokens and conventions: GPT-2 has no pad token, Qwen2 has a ChatML chat template,
Mistral pads on the left and adds BOS, Gemma2 and OPT add BOS (OPT's is `</s>`), Phi-3 stops at
several end tokens. Builds are seeded (the same family gives the same weights) and take about a
second; `load_base_model(folder)` loads every one (Gemma2, which has no sdpa attention, once
load_base_model's eager fallback recognises transformers' "scaled_dot_product_attention" error).

    from tests.tiny_archs import FAMILIES, LORA_TARGETS, build_tiny
    folder = build_tiny("opt", tmp_path / "opt")
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma2", "phi3", "opt", "gpt_neox", "mixtral")

# Each family's usual LoRA targets (what its model cards and peft's defaults use).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "mixtral": ("q_proj", "v_proj"),
}

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 64, 2, 4, 2, 128, 1024
BUILD_VERSION = 1  # bump when a family's build changes: folders of an older build are rebuilt

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PHI3_CHAT = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
              "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

# family -> tokenizer conventions: special tokens to add (in order), the roles, whether BOS is prepended,
# padding side, chat template, and extra end-of-generation tokens.
TOKENIZERS: dict[str, dict] = {
    "gpt2": dict(special=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=None),
    "llama": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|endoftext|>",
                  eos="<|endoftext|>", unk="<|endoftext|>", pad=None),  # SmolLM: no BOS prepended
    "qwen2": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>", chat_template=CHATML, stop=["<|endoftext|>"]),
    "mistral": dict(special=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>", pad=None,
                    add_bos=True, padding_side="left"),
    "gemma2": dict(special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>",
                   eos="<eos>", unk="<unk>", pad="<pad>", add_bos=True, chat_template=GEMMA_CHAT,
                   stop=["<end_of_turn>"]),
    "phi3": dict(special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                          "<|user|>"], bos="<s>", eos="<|endoftext|>", unk="<unk>", pad="<|endoftext|>",
                 chat_template=PHI3_CHAT, stop=["<|assistant|>", "<|end|>"]),
    "opt": dict(special=["<s>", "<pad>", "</s>", "<unk>"], bos="</s>", eos="</s>", unk="<unk>", pad="<pad>",
                add_bos=True),
    "gpt_neox": dict(special=["<|endoftext|>", "<|padding|>"], bos="<|endoftext|>", eos="<|endoftext|>",
                     unk="<|endoftext|>", pad="<|padding|>"),
    "mixtral": dict(special=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>", pad=None, add_bos=True,
                    padding_side="left"),
}


def _bpe_source(tokenizer_from: str | Path | None):
    """The byte-level BPE to re-wrap: `tokenizer_from`'s tokenizer.json, or one trained here (seeded)."""
    from tokenizers import Tokenizer

    if tokenizer_from is not None:
        return Tokenizer.from_file(str(Path(tokenizer_from) / "tokenizer.json"))
    from fedleak.federated.data import generate_records
    try:
        from fedleak.federated.embedded import train_tokenizer
    except ImportError:  # before the embedded model moved out of federated/model.py
        from fedleak.federated.model import train_tokenizer
    from fedleak.federated.prompts import format_prompt

    records = generate_records(400, seed=0, purpose="public", private=False)
    texts = [format_prompt(r.instruction, r.input) + r.output for r in records]
    return train_tokenizer(texts, 1000).backend_tokenizer


def make_tokenizer(family: str, tokenizer_from: str | Path | None = None):
    """The family's tokenizer (a PreTrainedTokenizerFast) on the re-wrapped byte-level BPE."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZERS[family]
    tok = _bpe_source(tokenizer_from)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    if spec.get("add_bos"):
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = None
    kwargs = {role: spec.get(role) for role in ("bos", "eos", "unk", "pad") if spec.get(role)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, **{f"{role}_token": value for role, value in kwargs.items()},
        additional_special_tokens=[t for t in spec["special"] if t not in kwargs.values()],
        padding_side=spec.get("padding_side", "right"), model_max_length=POSITIONS,
        clean_up_tokenization_spaces=False)
    if spec.get("chat_template"):
        tokenizer.chat_template = spec["chat_template"]
    return tokenizer


def make_config(family: str, tokenizer):
    """The family's transformers config at the tiny size, its token ids taken from `tokenizer`."""
    import transformers as tf

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    attention = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS,
                             **ids)
    if family == "llama":
        return tf.LlamaConfig(**attention, num_key_value_heads=KV_HEADS, tie_word_embeddings=True, **ids)
    if family == "qwen2":
        return tf.Qwen2Config(**attention, num_key_value_heads=KV_HEADS, tie_word_embeddings=True, **ids)
    if family == "mistral":
        return tf.MistralConfig(**attention, num_key_value_heads=KV_HEADS, sliding_window=None, **ids)
    if family == "gemma2":
        return tf.Gemma2Config(**attention, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
                               query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=32, **ids)
    if family == "phi3":
        return tf.Phi3Config(**attention, num_key_value_heads=KV_HEADS, original_max_position_embeddings=POSITIONS,
                             **ids)
    if family == "opt":
        return tf.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**attention, **ids)
    if family == "mixtral":
        return tf.MixtralConfig(**attention, num_key_value_heads=KV_HEADS, num_local_experts=4, num_experts_per_tok=2,
                                **ids)
    raise ValueError(f"unknown family {family!r}: pick one of {', '.join(FAMILIES)}")


def build_tiny(family: str, folder: str | Path, *, tokenizer_from: str | Path | None = None, seed: int = 0) -> Path:
    """Build (once) and save the tiny `family` model and its tokenizer in `folder`.

    Args:
        family: one of FAMILIES.
        folder: where save_pretrained writes config, weights, generation config and tokenizer (created).
        tokenizer_from: a folder with a tokenizer.json holding a byte-level BPE to re-wrap (the embedded
            model's, e.g. the tests' `small_model_path`); None trains a small one here (seeded, ~1 s).
        seed: seeds the random weights.

    Returns:
        `folder`, loadable with `fedleak.federated.model.load_base_model`. A folder already holding this
        build (same family, seed, tokenizer source and BUILD_VERSION) is returned as it is.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: pick one of {', '.join(FAMILIES)}")
    folder = Path(folder)
    stamp = {"family": family, "seed": seed, "build": BUILD_VERSION,
             "tokenizer_from": str(tokenizer_from) if tokenizer_from is not None else None}
    marker = folder / "tiny_arch.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    tokenizer = make_tokenizer(family, tokenizer_from)
    config = make_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    spec = TOKENIZERS[family]
    stops = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in spec.get("stop", ()))]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops if len(stops) > 1 else stops[0])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(stamp))
    return folder
