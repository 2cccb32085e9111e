"""bench/gpu.py's building blocks: real-size model shapes written as random-weight folders, the FLOP
count, the bf16 peak (measured and datasheet), device timing and memory helpers."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from fedleak.federated.training import IGNORE, Example


@dataclass(frozen=True)
class Shape:
    kind: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    def matmul_params(self) -> int:
        """N: the weights every token multiplies by: the layers' linear maps and the output head (the
        embedding lookup is no matmul; a tied head still is one). Biases and norms are left out."""
        kv = self.kv_heads * (self.hidden // self.heads)
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.hidden * self.vocab

    def train_flops_per_token(self, seq: int) -> float:
        """LoRA on a frozen base: forward 2N, backward through the activations 2N (no weight gradients
        for the base), plus PaLM's attention term 12 L h T (Chowdhery et al. 2022, appendix B)."""
        return 4 * self.matmul_params() + 12 * self.layers * self.hidden * seq

    def config(self):
        from transformers import LlamaConfig, Qwen2Config

        cls = LlamaConfig if self.kind == "llama" else Qwen2Config
        return cls(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                   num_key_value_heads=self.kv_heads, intermediate_size=self.intermediate, vocab_size=self.vocab,
                   tie_word_embeddings=self.tied, max_position_embeddings=8192)


SHAPES = {  # Llama 3.2 1B, Llama 3.1 8B, Qwen2 7B
    "llama-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128256, True),
    "llama-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256, False),
    "qwen2-7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
}
SMOKE_SHAPES = {  # the same families at toy size; the vocabulary holds the bench tokenizer's ids
    "llama-1b": Shape("llama", 64, 2, 4, 2, 128, 2048, True),
    "llama-8b": Shape("llama", 64, 2, 4, 2, 128, 2048, False),
    "qwen2-7b": Shape("qwen2", 64, 2, 4, 2, 160, 2048, False),
}

# bf16 dense tensor-core peak (no sparsity), TFLOP/s; the first substring of the device name that matches.
DATASHEET = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362),
             ("A10G", 125), ("RTX 4090", 165))


def datasheet_peak(device_name: str) -> float | None:
    """FLOP/s from the datasheet table for `device_name`, or None for a GPU not in it."""
    return next((tflops * 1e12 for key, tflops in DATASHEET if key in device_name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak(device: torch.device, *, smoke: bool, repeats: int = 3) -> float:
    """Best FLOP/s of a square matmul loop: 8192^3 in bf16 on a GPU, 256^3 in fp32 in smoke mode."""
    n, dtype, iters = (256, torch.float32, 5) if smoke else (8192, torch.bfloat16, 50)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * iters / best


def make_tokenizer(folder) -> None:
    """A small byte-level BPE tokenizer (fedleak's embedded-model recipe, trained in seconds on public
    records) saved into `folder`: load_base_model wants one, and the random-id benchmarks ignore it."""
    from fedleak.federated.data import generate_records
    from fedleak.federated.embedded import train_tokenizer

    records = generate_records(2000, seed=0, purpose="public", private=False)
    train_tokenizer([f"{r.instruction}\n{r.input}\n{r.output}" for r in records], 2000).save_pretrained(folder)


def write_model(shape: Shape, folder, *, device: torch.device, dtype: torch.dtype, tokenizer_folder) -> None:
    """Random weights of `shape` built directly on `device` in `dtype`, saved with the tokenizer's files."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=dtype)
    model.save_pretrained(folder)
    del model
    free(device)
    for path in Path(tokenizer_folder).iterdir():
        shutil.copy(path, Path(folder) / path.name)


def random_examples(n: int, length: int, vocab: int, *, seed: int) -> list[Example]:
    """`n` sequences of random ids, the loss on the second half (as response-only masking does)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=gen).tolist()
    return [Example(tuple(row), tuple([IGNORE] * (length // 2) + row[length // 2:])) for row in ids]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated GB since `reset_peak` (None off CUDA: no allocator statistics)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def allocated_gb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
