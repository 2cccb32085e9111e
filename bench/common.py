"""What every benchmark starts from: the embedded model with LoRA on all linear layers, and records."""

from __future__ import annotations

from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import generate_records
from fedleak.federated.embedded import EmbeddedModelConfig, build_embedded
from fedleak.federated.model import load_base_model
from fedleak.federated.training import Example, encode


def embedded_lora(num_records: int):
    """(peft model, tokenizer, encoded private-format records) for a side-by-side timing."""
    base, tokenizer = load_base_model(build_embedded(EmbeddedModelConfig(pretrain_steps=600)))
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    records = generate_records(num_records, seed=0, purpose="bench", private=True)
    examples: list[Example] = encode(records, tokenizer, max_length=256)
    return model, tokenizer, examples
