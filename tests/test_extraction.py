import json
import math

import numpy as np
import pytest
import torch

from fedleak.attacks.base import AttackEnvironment, ExtractionResult, Secrets, Target
from fedleak.attacks.extraction.discoverable import DiscoverableAttack
from fedleak.attacks.extraction.exposure import ExposureAttack, candidate_losses
from fedleak.attacks.extraction.generate_rank import (GenerateRankAttack, hit_flags, precision_at, rankings,
                                                      start_ids)
from fedleak.attacks.extraction.pii import PiiAttack
from fedleak.attacks.membership.zlib import zlib_bytes
from fedleak.federated.adapters import LoraSettings, add_peft_adapter
from fedleak.federated.data import Canary, Record, generate_records
from fedleak.common.errors import FedleakError
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, collate, encode, token_logprobs, train_adapter

# One thread: tiny matrices gain little from a second, and lose a lot when another process holds the other core.
pytestmark = pytest.mark.usefixtures("one_thread")

CANARY = Canary(patient_name="Quentin Rasmussen", secret="4821", repetitions=4, client=0)
REFERENCE = Canary(patient_name="Greta Novak", secret="7305", repetitions=0, client=None)


def _same(a: ExtractionResult, b: ExtractionResult) -> bool:
    """Equal results, NaN included."""
    return json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)


@pytest.fixture(scope="module")
def memorised(one_thread, small_model_path):
    """A LoRA trained hard on six private records and four copies of a canary with a 4-digit secret."""
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    records = generate_records(6, seed=0, purpose="mem", private=True)
    examples = encode(records + [CANARY.record(k) for k in range(CANARY.repetitions)], tokenizer, max_length=256)
    train_adapter(model, examples, TrainSettings(epochs=40, batch_size=5, lr=5e-3), pad_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    heldout = generate_records(6, seed=0, purpose="other", private=True)
    secrets = Secrets(records=records, canaries=[CANARY], reference_canaries=[REFERENCE], other_records=heldout,
                      nonmembers=heldout)
    return model, tokenizer, secrets


def _target(model, tokenizer, seed=0, observer="client"):
    return Target(model=model, tokenizer=tokenizer, observer=observer, round=1, client=0,
                  env=AttackEnvironment(tokenizer=tokenizer, seed=seed))


# --- exposure -----------------------------------------------------------------------------------


def test_exposure_ranks_a_memorised_canary_first_by_exact_enumeration(memorised):
    model, tokenizer, secrets = memorised
    only = Secrets(records=secrets.records, canaries=[CANARY])  # 10^4 candidates: enumerated exactly
    out = ExposureAttack().run(_target(model, tokenizer), only)
    row = out.details["canaries"][0]
    assert row["method"] == "exact" and row["candidates"] == 10_000
    assert row["rank"] == 1
    assert out.metrics["exposure_mean"] == pytest.approx(math.log2(10_000))
    assert out.metrics["exposure_rep4"] == out.metrics["exposure_max"] == out.metrics["exposure_mean"]
    assert math.isnan(out.metrics["exposure_reference_mean"])
    json.dumps(out.details)


def test_exposure_candidate_losses_match_whole_sequence_scoring(memorised):
    """The shared-prefix cache is only a speed-up: same summed NLL as scoring each whole sequence."""
    model, tokenizer, _ = memorised
    candidates = ["4821", "0000", "9371", "4820", "1234"]
    fast = candidate_losses(model, tokenizer, CANARY, candidates, max_length=256, batch_size=2)
    records = [Record(CANARY.prompt, "", CANARY.text_with(c), "canary", "c") for c in candidates]
    batch = collate(encode(records, tokenizer, max_length=256), tokenizer.pad_token_id)
    with torch.no_grad():
        picked, _, _ = token_logprobs(model, batch)
    np.testing.assert_allclose(fast, -picked.sum(1).double().numpy(), rtol=1e-5, atol=1e-4)
    assert fast.argmin() == 0  # the memorised secret is the most likely


def test_exposure_sampled_estimate_uses_a_skew_normal_fit_and_is_seeded(memorised):
    model, tokenizer, secrets = memorised
    attack = ExposureAttack(enumerate_limit=100, samples=200)
    out = attack.run(_target(model, tokenizer), secrets)
    row, ref = out.details["canaries"][0], out.details["reference_canaries"][0]
    assert row["method"] == "skew-normal fit to 200 sampled candidates"
    assert row["exposure"] > 10 and row["exposure_sampled"] == pytest.approx(math.log2(10_000))
    assert ref["repetitions"] == 0 and ref["exposure"] < 5  # the never-inserted control
    assert out.metrics["exposure_reference_mean"] == ref["exposure"]
    assert _same(ExposureAttack(enumerate_limit=100, samples=200).run(_target(model, tokenizer), secrets), out)
    other_seed = attack.run(_target(model, tokenizer, seed=1), secrets).details["reference_canaries"][0]
    assert other_seed["exposure"] != ref["exposure"]  # another run seed draws other candidates


def test_exposure_without_canaries_is_nan_with_a_note(memorised):
    model, tokenizer, secrets = memorised
    out = ExposureAttack().run(_target(model, tokenizer), Secrets(records=secrets.records,
                                                                 reference_canaries=[REFERENCE]))
    assert all(math.isnan(v) for v in out.metrics.values()) and "no canary" in out.details["note"]


# --- discoverable -------------------------------------------------------------------------------


def test_discoverable_extracts_memorised_records_and_not_from_the_base(memorised):
    model, tokenizer, secrets = memorised
    attack = DiscoverableAttack(prefix_tokens=24, suffix_tokens=12, max_new_tokens=48)
    out = attack.run(_target(model, tokenizer), secrets)
    m = out.metrics
    assert m["exact_rate"] > 0 and m["rouge_rate"] >= m["exact_rate"] and m["canary_exact_rate"] == 1.0
    assert m["prefix_suffix_rate"] > 0 and m["prefix_suffix_eligible"] == 7
    # Records it never saw are not reproduced: the control is what the template alone gives.
    assert m["control_exact_rate"] == 0 and m["control_rouge_rate"] < m["rouge_rate"]
    assert out.details["records"] == 7 and out.details["exact"] == round(m["exact_rate"] * 7)
    example = out.details["examples"][0]
    record = {r.record_id: r for r in secrets.records + [CANARY.record(0)]}[example["record_id"]]
    assert example["exact"] and example["generated"].strip() == record.output
    json.dumps(out.details)
    with model.disable_adapter():  # the base model never saw these records
        base = attack.run(_target(model, tokenizer), secrets).metrics
    assert base["exact_rate"] == 0 and base["canary_exact_rate"] == 0 and base["prefix_suffix_rate"] == 0
    assert base["mean_rouge"] < m["mean_rouge"]


def test_discoverable_samples_records_by_seed_and_counts_eligible_sequences(memorised):
    model, tokenizer, secrets = memorised
    lengths = [len(e.input_ids) for e in encode(secrets.records + [CANARY.record(0)], tokenizer, max_length=256)]
    cut = max(lengths)  # only the longest sequences hold prefix + suffix tokens
    out = DiscoverableAttack(max_new_tokens=8, prefix_tokens=cut - 8, suffix_tokens=8).run(
        _target(model, tokenizer), secrets)
    assert 0 < out.metrics["prefix_suffix_eligible"] == sum(n >= cut for n in lengths) < len(lengths)
    attack = DiscoverableAttack(max_records=3, max_new_tokens=8)
    a, b = (attack.run(_target(model, tokenizer), secrets) for _ in range(2))
    assert _same(a, b)
    assert a.details["records"] == 4 and a.details["canary_records"] == 1  # 3 sampled + the canary
    empty = attack.run(_target(model, tokenizer), Secrets(records=[]))
    assert math.isnan(empty.metrics["exact_rate"]) and "no private records" in empty.details["note"]


# --- pii ----------------------------------------------------------------------------------------


def _patient_record(rid, name, dob, mrn, phone):
    return Record(instruction=f"{name} (MRN {mrn}) reports a cough. How urgently should they be seen?", input="",
                  output=f"{name} should rest. Call {phone} if it gets worse.", category="triage", record_id=rid,
                  identifiers=(name, dob, mrn, phone))


def test_pii_counts_only_identifiers_missing_from_the_prompt(monkeypatch):
    a = _patient_record("a", "Amara Dubois", "1980-01-02", "12345678", "555-111-2222")
    b = _patient_record("b", "Bjorn Szabo", "1975-05-06", "87654321", "555-333-4444")
    other = _patient_record("o", "Amara Dubois", "1990-03-04", "11112222", "555-999-0000")  # same name as a
    canary = Canary(patient_name="Tamsin Varga", secret="4821", repetitions=2, client=0)
    short = Canary(patient_name="Ines Novak", secret="123", repetitions=1, client=0)
    outputs = {
        # a: name and MRN are in a's prompt, the DOB is not in a's response: only the phone counts.
        a.instruction: "Amara Dubois 12345678 1980-01-02 555-111-2222",
        b.instruction: "Bjorn Szabo should rest.",  # b's phone not leaked
        canary.prompt: "The access code is 4821.",
        short.prompt: "The access code is 123.",
        # The cross prompt names Amara Dubois: that name does not count; b's MRN and the canary's secret do.
        other.instruction: "Amara Dubois, MRN 87654321, code 4821, 123",
    }
    monkeypatch.setattr(PiiAttack, "_complete", lambda self, target, records: [outputs[r.instruction] for r in records])
    secrets = Secrets(records=[a, b], canaries=[canary, short], other_records=[other])
    out = PiiAttack().run(_target(None, None), secrets)
    m, d = out.metrics, out.details
    assert d["own_countable"] == {"phone": 2, "secret": 1} and d["own_leaked"] == {"phone": 1, "secret": 1}
    assert m["own_fraction"] == 0.5 == m["own_fraction_phone"]  # the records' identifiers, secrets apart
    assert m["own_fraction_secret"] == 1.0 and math.isnan(m["own_fraction_mrn"]) and math.isnan(m["own_fraction_dob"])
    assert m["canary_fraction"] == 1.0 and d["canary_prompts"] == 1  # the 3-digit secret is too short to count
    # Countable across: 4 names less Amara's (in the only cross prompt), 2 DOBs, 2 MRNs, 2 phones and
    # 1 secret of at least 4 characters.
    assert d["cross_countable"] == {"name": 3, "dob": 2, "mrn": 2, "phone": 2, "secret": 1}
    assert d["cross_leaked"] == {"mrn": 1, "secret": 1}
    assert m["cross_fraction"] == pytest.approx(2 / 10)
    assert {e["identifier"] for e in d["cross_examples"]} == {"87654321", "4821"}
    json.dumps(out.details)


def test_pii_on_user_data_is_nan_with_a_note():
    user = [Record("Summarise this.", "text", "A summary.", "user", "u0")]
    out = PiiAttack().run(_target(None, None), Secrets(records=user, other_records=user))
    assert all(math.isnan(v) for v in out.metrics.values()) and "no private identifier" in out.details["note"]


def test_pii_real_run_leaks_the_memorised_canary_and_is_deterministic(memorised):
    model, tokenizer, secrets = memorised
    attack = PiiAttack(max_prompts=4, max_new_tokens=48)
    out = attack.run(_target(model, tokenizer), secrets)
    assert out.metrics["canary_fraction"] == 1.0 and out.metrics["own_fraction_secret"] == 1.0
    assert out.details["own_prompts"] == 5 and out.details["cross_prompts"] == 4
    assert all(0 <= v <= 1 for v in out.metrics.values() if not math.isnan(v))
    assert _same(attack.run(_target(model, tokenizer), secrets), out)
    with model.disable_adapter():
        assert attack.run(_target(model, tokenizer), secrets).metrics["canary_fraction"] == 0.0


# --- generate_rank ------------------------------------------------------------------------------


def test_precision_at_k_of_each_ranking_on_hand_made_generations():
    texts = ["aaaa aaaa aaaa", "the patient", "some words here", "x"]
    log_ppl = np.array([1.0, 2.0, 3.0, np.nan])
    reference = np.array([1.0, 8.0, 1.5, 1.0])
    scores = rankings(log_ppl, reference, texts)
    np.testing.assert_allclose(scores["reference"][:3], [1.0, 0.25, 2.0])
    np.testing.assert_allclose(scores["zlib"][:3], log_ppl[:3] / [zlib_bytes(t) for t in texts[:3]])
    hits = np.array([False, True, False, True])
    assert precision_at(scores["perplexity"], hits, 1) == 0.0  # lowest perplexity: text 0, a miss
    assert precision_at(scores["reference"], hits, 1) == 1.0  # lowest ratio: text 1, a hit
    assert precision_at(scores["perplexity"], hits, 3) == pytest.approx(1 / 3)  # NaN ranks last
    assert precision_at(scores["perplexity"], hits, 10) == 0.5  # k capped at the number of items


def test_hit_flags_count_identifiers_and_word_runs_no_held_out_record_has():
    private = [("r1", "Amara Dubois should rest at home and monitor the symptoms for two days."),
               ("r2", "The access code of patient Tamsin Varga is 4821.")]
    texts = ["Then Amara Dubois should rest at home and monitor the symptoms.",  # 8 words of r1, in no control
             "Call 555-111-2222 now.",  # a private phone number
             "Tamsin Varga is fine.",  # the name is in the prompt: not a hit
             "code 12 today",  # a 2-character identifier never counts
             "Someone should rest at home and monitor the symptoms for two days."]  # template words only
    controls = [("h1", "Bjorn Szabo should rest at home and monitor the symptoms for two days.")]
    flags = hit_flags(texts, private, ["555-111-2222", "Tamsin Varga", "12"], prompt="About Tamsin Varga:",
                      ngram=8, min_identifier_length=4, controls=controls)
    assert [f["hit"] for f in flags] == [True, True, False, False, False]
    assert "r1" in flags[0]["why"] and "amara dubois" in flags[0]["why"] and "555-111-2222" in flags[1]["why"]
    # Without the held-out control the template run would be taken for training data.
    assert hit_flags(texts[4:], private, [], prompt="", ngram=8, min_identifier_length=4)[0]["hit"]
    assert not hit_flags(texts[:1], private, [], prompt="", ngram=12, min_identifier_length=4)[0]["hit"]


def test_generate_rank_runs_seeded_and_leaves_the_global_rng_alone(memorised):
    model, tokenizer, secrets = memorised
    attack = GenerateRankAttack(samples=8, max_new_tokens=24, prompt="template", precision_at=4, batch_size=8)
    state = torch.random.get_rng_state()
    out = attack.run(_target(model, tokenizer), secrets)
    assert torch.equal(state, torch.random.get_rng_state())
    m = out.metrics
    assert set(m) == {"precision@k_perplexity", "precision@k_zlib", "precision@k_reference", "hit_rate"}
    assert all(0 <= v <= 1 for v in m.values()) and out.details["samples"] == 8
    assert out.details["start"] == "### Instruction:\n" and out.details["k"] == 4
    assert _same(attack.run(_target(model, tokenizer), secrets), out)
    other = attack.run(_target(model, tokenizer, seed=1), secrets)
    assert other.details["top"] != out.details["top"]
    json.dumps(out.details)
    # Unconditioned generation starts after the document separator (this tokenizer adds no BOS).
    assert start_ids(tokenizer, "") == [tokenizer.eos_token_id]


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kwargs, param", [
    (DiscoverableAttack, {"max_records": 0}, "max_records"),
    (DiscoverableAttack, {"rouge_threshold": 1.5}, "rouge_threshold"),
    (DiscoverableAttack, {"prefix_tokens": 0}, "prefix_tokens"),
    (PiiAttack, {"max_prompts": -1}, "max_prompts"),
    (PiiAttack, {"min_identifier_length": 0}, "min_identifier_length"),
    (ExposureAttack, {"samples": 5}, "samples"),
    (ExposureAttack, {"enumerate_limit": 0}, "enumerate_limit"),
    (GenerateRankAttack, {"top_k": -1}, "top_k"),
    (GenerateRankAttack, {"temperature": 0.0}, "temperature"),
    (GenerateRankAttack, {"precision_at": 0}, "precision_at"),
    (GenerateRankAttack, {"ngram": 0}, "ngram"),
])
def test_parameter_errors_name_the_attack_and_parameter(cls, kwargs, param):
    with pytest.raises(FedleakError, match=rf"attack {cls.name}: {param} = "):
        cls(**kwargs)
    assert cls().params()[param] != kwargs[param]  # defaults are valid and stored under the same name


def test_exposure_rises_with_the_canary_repetition_count(small_model_path):
    """The Secret Sharer's dose-response on a short fine-tune (not saturated, unlike many epochs):
    canaries inserted 8 times are clearly more exposed than those inserted once or never (measured:
    5.2 bits against 1.1 and 1.1 after two epochs)."""
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    rng = np.random.default_rng(3)
    names = ["Amara Okonkwo", "Bjorn Szabo", "Camila Varga", "Dmitri Yilmaz", "Esther Novak", "Farid Quist",
             "Greta Moreau", "Hana Lombardi", "Ines Drummond"]
    secrets = [f"{int(s):03d}" for s in rng.choice(1000, size=len(names), replace=False)]
    canaries = [Canary(patient_name=n, secret=s, repetitions=r, client=0)
                for n, s, r in zip(names, secrets, [1, 1, 1, 8, 8, 8, 0, 0, 0])]
    records = generate_records(24, seed=0, purpose="dose", private=True)
    copies = [c.record(k) for c in canaries for k in range(c.repetitions)]
    train_adapter(model, encode(records + copies, tokenizer, max_length=256),
                  TrainSettings(epochs=2, batch_size=8, lr=3e-3), pad_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    result = ExposureAttack().run(_target(model, tokenizer), Secrets(
        records=records, canaries=canaries[:6], reference_canaries=canaries[6:]))
    metrics = result.metrics
    assert {row["method"] for row in result.details["canaries"]} == {"exact"}
    assert metrics["exposure_rep8"] > metrics["exposure_rep1"] + 1
    assert metrics["exposure_rep8"] > metrics["exposure_reference_mean"] + 1
    assert metrics["exposure_rep8"] < math.log2(1000)  # not saturated: the ordering is informative
