import hashlib

import pytest
import torch

from fedleak.federated import embedded as model_module
from fedleak.common.errors import FedleakError
from fedleak.federated.embedded import EmbeddedModelConfig, build_embedded
from fedleak.federated.model import load_base_model

TINY = EmbeddedModelConfig(vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           public_records=300, pretrain_steps=5, pretrain_batch_size=4, pretrain_seq_len=32)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "fedleak_build.json"}


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = build_embedded(TINY, cache_dir=tmp_path / "a")
    second = build_embedded(TINY, cache_dir=tmp_path / "b")
    assert first.name == second.name and _digest(first) == _digest(second)
    assert "model.safetensors" in _digest(first) and "tokenizer.json" in _digest(first)
    # A second call finds the cache and does not train again.
    monkeypatch.setattr(model_module, "_pretrain", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert build_embedded(TINY, cache_dir=tmp_path / "a") == first
    # Other settings get another folder.
    other = EmbeddedModelConfig(**{**TINY.__dict__, "pretrain_steps": 6})
    assert other.cache_key() != TINY.cache_key()
    assert EmbeddedModelConfig(**{**TINY.__dict__, "public_identifiers": True}).cache_key() != TINY.cache_key()


def test_loaded_model_and_tokenizer(small_model_path):
    model, tokenizer = load_base_model(small_model_path)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert len(tokenizer("482913", add_special_tokens=False)["input_ids"]) == 6  # one token per digit
    text = "### Instruction:\nWrite discharge instructions for a patient after a hernia repair.\n### Response:\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000


def test_pretrained_base_predicts_the_domain_better_than_chance(small_model_path):
    import json
    import math

    build = json.loads((small_model_path / "fedleak_build.json").read_text())
    assert build["pretrain_final_loss"] < 0.5 * math.log(build["vocab"])


def test_the_default_pretraining_corpus_is_the_one_every_cached_model_was_built_on():
    """sha256 of the default corpus's first 300 texts, as before `public_identifiers` existed (a19e051): a change
    here changes every embedded model and every figure measured on one; update the pin only on purpose."""
    texts = model_module._pretrain_texts(EmbeddedModelConfig(public_records=300))
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    assert digest == "daf14797a8b3faff4049b16cff1234993edcf60b4c550a15df09b03cd1859acd"


def _copied_name_logprob(folder) -> float:
    """Mean log-probability per token (nats) of a private patient's name where the response repeats it from the
    prompt, over 40 records no model saw: how well the base model in `folder` can write a name at all."""
    from fedleak.federated.data import generate_records
    from fedleak.federated.prompts import bos_prefix, prompt_text

    model, tokenizer = load_base_model(folder)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    per_token = []
    for r in generate_records(40, seed=7, purpose="probe", private=True):
        at = r.output.find(r.identifiers[0])
        assert at >= 0  # every template writes the name in its answer
        head = bos_prefix(tokenizer) + encode(prompt_text(tokenizer, r.instruction, r.input))
        head += encode(r.output[:at].rstrip(" ")) if r.output[:at].strip() else []
        name = encode((" " if at else "") + r.identifiers[0])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([head + name])).logits[0, len(head) - 1:-1]
        per_token += logits.log_softmax(-1).gather(1, torch.tensor(name)[:, None]).squeeze(1).tolist()
    return sum(per_token) / len(per_token)


def test_public_identifiers_teach_the_base_model_to_write_names(tmp_path):
    """Measured (40 steps on 400 records, 33 s for both builds on one thread): a copied name's tokens at -8.96
    nats each without public identifiers (first names' sub-words never occur in that corpus), -7.22 with them.
    The same probe over 60 records on the demo's models (200 steps on 2,000 records): -10.75 and -4.27, below
    and above a uniform guess over their 2,000 tokens (-7.6)."""
    small = dict(public_records=400, pretrain_steps=40)
    plain = _copied_name_logprob(build_embedded(EmbeddedModelConfig(**small), cache_dir=tmp_path))
    rich = _copied_name_logprob(build_embedded(EmbeddedModelConfig(**small, public_identifiers=True),
                                               cache_dir=tmp_path))
    assert rich > plain + 1.0


def test_missing_local_model_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FedleakError) as raised:
        load_base_model(missing)
    assert str(raised.value).startswith(f"model.name = {str(missing)!r}: the folder {missing} does not exist: give")
    assert "repo" not in str(raised.value).lower()  # not the hub library's repo-id rules
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedleakError, match=r"the folder .*empty holds no loadable model .*: give a folder written by "
                                           r"save_pretrained"):
        load_base_model(tmp_path / "empty")
    # "org/name" may be a hub id or a relative folder: offline, say both.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FedleakError, match="^model.name = 'models/llama': no folder of that name exists here and the "
                                           "hub is off: .*set model.allow_download = true"):
        load_base_model("models/llama")


def test_a_lora_on_tied_embeddings_uploads_and_checkpoints_only_lora_tensors(tmp_path, small_model_path):
    """peft would save the whole (tied, frozen) embedding with the adapter: every upload 7x larger, and
    DP-FedAvg's noise added to the base weight itself."""
    from fedleak.defenses.base import Defense
    from fedleak.federated import checkpoint
    from fedleak.federated.adapters import LoraSettings
    from fedleak.federated.data import FederatedData, generate_records
    from fedleak.federated.fedit import FedIT
    from fedleak.federated.loop import run_rounds
    from fedleak.federated.rounds import FederationSettings, TrainingSetup

    class Uploads(Defense):
        def __init__(self):
            self.states = []

        def before_aggregation(self, updates, *, global_state, info):
            self.states += [u.state for u in updates]
            return updates

    base, tokenizer = load_base_model(small_model_path)
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    records = generate_records(8, seed=0, purpose="tied", private=True)
    hooks = Uploads()
    run = run_rounds(TrainingSetup(
        base_model=base, tokenizer=tokenizer, data=FederatedData(clients=[records[:4], records[4:]], heldout=[]),
        federation=FederationSettings(clients=2, rounds=1, local_epochs=1, batch_size=4, min_records_per_client=1),
        adapter=LoraSettings(r=2, alpha=4, target_modules=("q_proj", "lm_head", "embed_tokens")), hooks=hooks, seed=0,
        out_dir=tmp_path / "run", config_hash="h", progress=False), FedIT())
    lora_params = sum(p.numel() for n, p in run.model.named_parameters() if "lora_" in n and (".default." in n or n.endswith(".default")))
    saved = checkpoint.load_view(checkpoint.round_dir(run.training_dir, 1), "upload", 0)["default"]
    assert len(hooks.states) == 2
    for state in [*hooks.states, saved]:
        assert all("lora_" in k for k in state), [k for k in state if "lora_" not in k]
        assert any("lm_head.lora_" in k for k in state) and any("embed_tokens.lora_embedding" in k for k in state)
        assert sum(v.numel() for v in state.values()) == lora_params


def test_bad_embedded_settings_name_the_field():
    with pytest.raises(FedleakError, match="model.embedded.hidden_size = 30 is not divisible by num_heads = 4"):
        EmbeddedModelConfig(hidden_size=30)


def test_the_model_key_follows_the_corpus_generator_source(monkeypatch):
    """The key hashes the code that writes the pretraining corpus (not the 6,000 records it writes): a
    change to that code gives another key, so a stale model is never reused."""
    model_module.corpus_fingerprint.cache_clear()
    key = TINY.cache_key()
    assert TINY.cache_key() == key  # stable
    monkeypatch.setattr(model_module, "CORPUS_SOURCES", model_module.CORPUS_SOURCES[:1])
    model_module.corpus_fingerprint.cache_clear()
    try:
        assert TINY.cache_key() != key
    finally:
        monkeypatch.undo()
        model_module.corpus_fingerprint.cache_clear()
