"""Smoke check (not a test): one DP-SGD client training on each tiny real architecture, with LoRA on
all-linear and on the family's usual targets; prints which train and which DP-SGD refuses.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dp_families.py [FAMILY ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load(folder):
    from fedleak.common.errors import FedleakError
    from fedleak.federated.model import load_base_model

    try:
        return load_base_model(folder), ""
    except FedleakError as exc:  # e.g. an architecture without sdpa that load_base_model does not fall back for
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        return (model, tokenizer), f" (load_base_model failed, loaded with eager attention: {str(exc)[:80]}...)"


def run(families, *, tokenizer_from=None) -> list[tuple[str, str, str, str]]:
    import torch

    from fedleak.common.errors import FedleakError
    from fedleak.defenses.dp_sgd import DPSGD
    from fedleak.federated.adapters import LoraSettings, add_peft_adapter
    from fedleak.federated.data import generate_records
    from fedleak.federated.hooks import ClientJob
    from fedleak.federated.training import TrainSettings, encode
    from fedleak.tests.tiny_archs import LORA_TARGETS, build_tiny

    rows = []
    root = Path(tempfile.mkdtemp(prefix="fedleak-tiny-"))
    records = generate_records(8, seed=0, purpose="dp-smoke", private=True)
    for family in families:
        folder = build_tiny(family, root / family, tokenizer_from=tokenizer_from)
        for targets in ("all-linear", LORA_TARGETS[family]):
            (base, tokenizer), note = _load(folder)
            start = time.perf_counter()
            try:
                model = add_peft_adapter(base, LoraSettings(r=4, alpha=8, target_modules=targets), seed=0)
                examples = encode(records, tokenizer, max_length=48)
                job = ClientJob(client=0, round=1, model=model, examples=examples,
                                settings=TrainSettings(epochs=1, batch_size=4, lr=1e-3), pad_id=tokenizer.pad_token_id,
                                generator=torch.Generator().manual_seed(0))
                torch.manual_seed(0)
                metrics = DPSGD(noise_multiplier=1.0).train_client(job)
                outcome, detail = "trains", f"epsilon {metrics['epsilon']:.2f}, {metrics['steps']} steps"
            except FedleakError as exc:
                outcome, detail = "refused", str(exc)
            except Exception as exc:  # noqa: BLE001 - a smoke check reports every failure
                outcome, detail = "CRASH", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            shown = targets if isinstance(targets, str) else ",".join(targets)
            rows.append((family, shown, outcome, f"{detail}{note} [{time.perf_counter() - start:.1f} s]"))
            print(*rows[-1], sep=" | ", flush=True)
    return rows


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from fedleak.tests.tiny_archs import FAMILIES

    embedded = os.environ.get("FEDLEAK_TINY_TOKENIZER")  # a folder with the embedded model's tokenizer.json
    run(sys.argv[1:] or FAMILIES, tokenizer_from=embedded)
