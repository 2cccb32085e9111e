"""The embedded base model: a tiny Llama built offline and cached.

It is a byte-level BPE tokenizer (trained with `tokenizers`) and a small
`LlamaConfig` model pretrained on the generator's public corpus (no patient identifiers unless
`public_identifiers`: `federated.data.public_corpus`). LoRA on a randomly initialised base learns
nothing useful, hence the pretraining. The build is
deterministic and cached under `FEDLEAK_CACHE` (default ~/.cache/fedleak) in a folder named by a
hash of its settings, so later runs load it in well under a second.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveFloat, PositiveInt, check_fields

log = logging.getLogger(__name__)

# Bump when the build procedure changes, so old caches are not reused.
EMBEDDED_BUILD_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class EmbeddedModelConfig:
    vocab_size: PositiveInt = field(default=2000, metadata={
        "help": "Byte-level BPE vocabulary trained on the public corpus (digits are single tokens)."})
    hidden_size: PositiveInt = field(default=128, metadata={"help": "Width of the Llama model; a multiple of num_heads."})
    num_layers: PositiveInt = field(default=4, metadata={"help": "Transformer layers."})
    num_heads: PositiveInt = field(default=4, metadata={"help": "Attention heads per layer."})
    intermediate_size: PositiveInt = field(default=512, metadata={"help": "Width of the MLP blocks."})
    max_length: PositiveInt = field(default=1024, metadata={
        "help": "Longest sequence (RoPE positions) in tokens: room for FEDPIT's few-shot generation prompts."})
    public_records: PositiveInt = field(default=6000, metadata={
        "help": "Public synthetic records (no private patients) in the pretraining corpus."})
    public_identifiers: bool = field(default=False, metadata={
        "help": "Public records name fictitious public patients (names, dates of birth, record and phone numbers), "
                "plus one access-code sentence of the canaries' format per ten records (public_records grows by "
                "10%), as a real LLM's pretraining holds such text; names may coincide with a run's patients' and "
                "canaries' (federated.data.public_corpus). False: the corpus names no patient, and the tests' model "
                "(200 steps on 2,000 records) cannot write a name's sub-words, even copied from its prompt."})
    pretrain_steps: PositiveInt = field(default=1000, metadata={"help": "Optimiser steps of pretraining."})
    pretrain_batch_size: PositiveInt = field(default=16, metadata={"help": "Blocks per pretraining step."})
    pretrain_seq_len: PositiveInt = field(default=128, metadata={
        "help": "Tokens per packed pretraining block (the corpus is concatenated and cut into blocks)."})
    pretrain_lr: PositiveFloat = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (one-cycle schedule)."})
    seed: NonNegativeInt = field(default=0, metadata={
        "help": "Seed of the corpus, tokenizer and pretraining; part of the model cache's key (not the run's seed)."})

    def __post_init__(self):
        check_fields(self, "model.embedded.")
        if self.hidden_size % self.num_heads:
            raise FedleakError(f"model.embedded.hidden_size = {self.hidden_size} is not divisible by "
                               f"num_heads = {self.num_heads}: pick sizes that divide")

    def cache_key(self) -> str:
        """Settings, build version and what generates the pretraining corpus (`corpus_fingerprint`)."""
        h = hashlib.sha256(json.dumps({"build": EMBEDDED_BUILD_VERSION, **dataclasses.asdict(self)},
                                      sort_keys=True).encode())
        h.update(corpus_fingerprint().encode())
        return h.hexdigest()[:16]


# The code the public corpus comes from: a change to any of it rebuilds the model. Hashing these few
# files instead of the 6,000 generated records keeps finding the cached model at ~1 ms, not 0.25 s.
CORPUS_SOURCES = ("federated/data.py", "federated/seeding.py", "common/synthetic.py")


@functools.lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """sha256 of the corpus generator's source files, the Alpaca template and numpy's version (its
    generators draw the records)."""
    import numpy

    from fedleak.federated.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"{numpy.__version__}\n{PROMPT_WITH_INPUT}\n{PROMPT_NO_INPUT}".encode())
    for name in CORPUS_SOURCES:
        h.update((root / name).read_bytes())
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("FEDLEAK_CACHE") or Path.home() / ".cache" / "fedleak")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one (as Llama does): every digit of an identifier or canary is its own token.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=100_000)


def _pretrain_texts(cfg: EmbeddedModelConfig) -> list[str]:
    from fedleak.federated.data import public_corpus
    from fedleak.federated.prompts import format_prompt

    records = public_corpus(cfg.public_records, seed=cfg.seed, identifiers=cfg.public_identifiers)
    return [format_prompt(r.instruction, r.input) + r.output for r in records]


def _pretrain(model, tokenizer, texts: list[str], cfg: EmbeddedModelConfig) -> float:
    """Full fine-tune on packed blocks of the public corpus; returns the last 50 steps' mean loss."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    blocks = torch.tensor(ids[: len(ids) // cfg.pretrain_seq_len * cfg.pretrain_seq_len]).view(-1, cfg.pretrain_seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=0.05)
    model.train()
    losses = []
    for _ in range(cfg.pretrain_steps):
        batch = blocks[torch.randint(len(blocks), (cfg.pretrain_batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return float(sum(losses[-50:]) / len(losses[-50:]))


def build_embedded(cfg: EmbeddedModelConfig, *, cache_dir: Path | None = None) -> Path:
    """Return the folder of the embedded model for `cfg`, building it once if missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = (cache_dir or cache_root()) / f"embedded-{cfg.cache_key()}"
    if (target / "fedleak_build.json").exists():
        return target
    texts = _pretrain_texts(cfg)
    log.info("building the embedded model once (about 1-2 minutes on 2 cores), cached at %s", target)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_length,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    final_loss = _pretrain(model, tokenizer, texts, cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"settings": dataclasses.asdict(cfg), "build_version": EMBEDDED_BUILD_VERSION,
                "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
                "pretrain_final_loss": final_loss, "build_seconds": time.perf_counter() - start}
        (tmp / "fedleak_build.json").write_text(json.dumps(info, indent=2))
        try:
            tmp.rename(target)  # atomic: a half-built model is never seen under the final name
        except OSError:
            if not (target / "fedleak_build.json").exists():  # lost a race to another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("embedded model built in %.0f s (final pretraining loss %.3f)", info["build_seconds"], final_loss)
    return target


