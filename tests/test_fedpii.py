"""fedpii (attacks/extraction/fedpii.py): prefixes and their frequency draw, the coverage count and its intervals
by hand, targets and controls, parameter and threat-model errors, the attack on fake generations, on a model
trained to memorise two clients' data, and end to end on the frontier federation."""

import contextlib
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from fedleak.attacks.base import ATTACKS, AttackEnvironment, Secrets, Target
from fedleak.attacks.extraction import fedpii
from fedleak.attacks.extraction.fedpii import (FedPiiAttack, Prefix, draw_prefixes, prefix_counts, prefix_ids,
                                               rates, record_prefixes, recovered)
from fedleak.common.errors import FedleakError
from fedleak.common.params import instantiate
from fedleak.federated.adapters import LoraSettings, add_peft_adapter, get_adapter_state
from fedleak.federated.data import Canary, Record, make_record
from fedleak.federated.generation import Generation
from fedleak.federated.model import load_base_model
from fedleak.federated.training import TrainSettings, encode, train_adapter

# One thread: tiny matrices gain little from a second, and lose a lot when another process holds the other core.
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "### Instruction:\nCall Ann Lee (MRN 12345678).\n### Response:\n"
RESPONSE = "Hello Ann Lee, bring MRN 12345678 and call 555-123-4567."
IDS = ["Ann Lee", "12345678", "555-123-4567"]


# -- prefixes by hand -------------------------------------------------------------------------------------------

def test_prefixes_follow_the_trained_identifiers_back_to_the_previous_one():
    """Response-only: the three identifiers of the response, each preceded by the text since the previous
    identifier (the first reaches back into the prompt), trailing spaces dropped."""
    got = record_prefixes(PROMPT, RESPONSE, IDS, response_only=True)
    assert got == [Prefix(").\n### Response:\n", "Hello", False), Prefix("", ", bring MRN", False),
                   Prefix("", " and call", False)]
    # Whole-sequence loss: the prompt's identifiers too, the first from the sequence start.
    full = record_prefixes(PROMPT, RESPONSE, IDS, response_only=False)
    assert full[:2] == [Prefix("### Instruction:\nCall", "", True), Prefix(" (MRN", "", False)]
    assert full[2:] == got
    # At most two words: the window is cut inside the prompt part.
    assert record_prefixes(PROMPT, RESPONSE, IDS, response_only=True, context_words=2)[0] == \
        Prefix("Response:\n", "Hello", False)
    # Overlapping identifiers count as one span: nothing between them is a prefix.
    assert fedpii._spans("Ann Lee Park", ["Ann Lee", "Lee Park"]) == [(0, 12)]
    assert record_prefixes("", "x Ann Lee Park", ["Ann Lee", "Lee Park"], response_only=True) == \
        [Prefix("", "x", True)]


class CharTokenizer:
    """One token per character, alpaca format, no BOS: enough for prompts and fake generations."""

    bos_token_id = None
    eos_token_id = 0
    pad_token_id = 0
    fedleak_prompt_format = "alpaca"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_prefix_counts_deduplicate_templates_and_ids_follow_the_training_split():
    own = [make_record("appointment", np.random.default_rng(s), f"r{s}", private=True) for s in range(3)]
    counts = prefix_counts(CharTokenizer(), own, min_length=4, response_only=True, context_words=2)
    # Every appointment response writes MRN then phone after the same words: one template each, seen 3 times.
    assert counts[Prefix("", "bring MRN", False)] == 3 and counts[Prefix("", "and call", False)] == 3
    assert sum(counts.values()) == 9  # name, MRN, phone per record
    assert prefix_ids(CharTokenizer(), Prefix("ab", "c", True)) == [97, 98, 99]


def test_prefixes_are_drawn_by_frequency_without_replacement_and_seeded():
    counts = {Prefix("", "a", False): 3, Prefix("", "b", False): 1, Prefix("", "c", False): 6}
    assert [p.response for p in draw_prefixes(counts, 5, np.random.default_rng(0))] == ["c", "a", "b"]
    two = draw_prefixes(counts, 2, np.random.default_rng(1))
    assert len(set(two)) == 2 and two == draw_prefixes(counts, 2, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    first = [draw_prefixes(counts, 1, rng)[0].response for _ in range(3000)]
    # P(c) = 0.6, P(a) = 0.3, P(b) = 0.1 for a single draw.
    assert abs(first.count("c") / 3000 - 0.6) < 0.03 and abs(first.count("b") / 3000 - 0.1) < 0.02


# -- counting by hand ---------------------------------------------------------------------------------------------

def test_recovered_needs_the_identifier_in_an_output_whose_prompt_lacks_it():
    prompts = ["call", "MRN 11112222", "x"]
    outputs = ["555-000-1111 now", "MRN 11112222 and Bo Li", "nothing"]
    assert recovered(["555-000-1111", "11112222", "Bo Li", "Cy Ma"], prompts, outputs) == {"555-000-1111", "Bo Li"}


def test_rates_per_type_with_clopper_pearson_intervals():
    types = {"Ann Lee": "name", "Bo Li": "name", "555-000-1111": "phone", "12345678": "mrn"}
    out = rates(types, {"Bo Li", "555-000-1111"}, "coverage")
    assert out["coverage"] == 0.5 and out["coverage_name"] == 0.5 and out["coverage_phone"] == 1.0
    assert out["coverage_mrn"] == 0.0 and math.isnan(out["coverage_dob"]) and math.isnan(out["coverage_dob_low"])
    ci = binomtest(2, 4).proportion_ci(confidence_level=0.95, method="exact")
    assert out["coverage_low"] == pytest.approx(ci.low) and out["coverage_high"] == pytest.approx(ci.high)


def _secrets():
    rng = np.random.default_rng(0)
    a = [make_record("appointment", rng, f"a{i}", private=True) for i in range(2)]
    b = [make_record("appointment", rng, f"b{i}", private=True) for i in range(2)]
    # The victim's second patient shares the attacker's first phone number: the attacker knows it.
    b[1] = Record(b[1].instruction, b[1].input, b[1].output.replace(b[1].identifiers[3], a[0].identifiers[3]),
                  b[1].category, b[1].record_id, b[1].identifiers[:3] + (a[0].identifiers[3],))
    held = [make_record("appointment", rng, "h0", private=True)]
    canaries = [Canary("Greta Novak", "730512", 1, 0), Canary("Quentin Rasmussen", "482193", 8, 1)]
    return Secrets(records=a + b, canaries=canaries, reference_canaries=[Canary("Ines Achterberg", "915570", 0, None)],
                   nonmembers=held, clients={0: a, 1: b}), a, b, held


def test_targets_are_the_other_clients_written_identifiers_less_the_attackers():
    secrets, a, b, held = _secrets()
    targets, control = FedPiiAttack(attacker=0).targets(secrets, a)
    # An appointment writes name, MRN and phone (no date of birth); b[1]'s phone is the attacker's.
    expected = {i: t for r in b for t, i in zip(("name", "mrn", "phone"), (r.identifiers[0], *r.identifiers[2:]))}
    del expected[a[0].identifiers[3]]
    assert targets == {**expected, "Quentin Rasmussen": "name", "482193": "secret"}
    assert control == {held[0].identifiers[0]: "name", held[0].identifiers[2]: "mrn", held[0].identifiers[3]: "phone",
                       "Ines Achterberg": "name", "915570": "secret"}


# -- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [({"samples_per_prefix": 9, "max_queries": 8}, "samples_per_prefix"),
                                           ({"attacker": -1}, "attacker"), ({"temperature": 0.0}, "temperature"),
                                           ({"max_queries": 0}, "max_queries")])
def test_parameter_errors_name_the_attack_and_field(kwargs, field):
    with pytest.raises(FedleakError, match=field):
        instantiate(ATTACKS.get("fedpii"), kwargs, "matrix.attacks")


def _fake_target(observer="global"):
    return Target(model=FakeModel(), tokenizer=CharTokenizer(), observer=observer, round=1,
                  env=AttackEnvironment(tokenizer=CharTokenizer(), seed=0))


def test_only_the_global_view_and_a_contributing_attacker_are_accepted():
    secrets = _secrets()[0]
    assert FedPiiAttack.observers == ("global",)
    with pytest.raises(FedleakError, match="observer 'upload'"):
        FedPiiAttack().run(_fake_target("upload"), secrets)
    with pytest.raises(FedleakError, match=r"attacker = 5 is not a contributing client .*\[0, 1\]"):
        FedPiiAttack(attacker=5).run(_fake_target(), secrets)


# -- the attack on fake generations -------------------------------------------------------------------------------

class FakeModel:
    """Answers a prompt ending in "and call" with `phone` while the adapters are on, with a made-up number when
    they are off; every other prompt with `control`."""

    def __init__(self, phone="", control=""):
        self.phone, self.control, self.adapters = phone, control, True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapters = False
        yield
        self.adapters = True


def _fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, do_sample=False, **options):
    texts = [tokenizer.decode(p) for p in prompts]
    return [Generation(text=(f" {model.phone if model.adapters else '555-999-9999'}." if t.endswith("and call")
                             else f" {model.control}"), finished=True) for t in texts]


def test_run_counts_coverage_control_and_base_on_fake_generations(monkeypatch):
    secrets, a, b, held = _secrets()
    monkeypatch.setattr(fedpii, "generate", _fake_generate)
    target = _fake_target()
    target.model = FakeModel(phone=b[0].identifiers[3], control=held[0].identifiers[0])
    out = FedPiiAttack(attacker=0, max_queries=9, samples_per_prefix=3, context_words=2).run(target, secrets)
    m, d = out.metrics, out.details
    # The attacker's two appointments share their three 2-word contexts ("Response: Hello", "bring MRN", "and
    # call"); each is answered 3 times.
    assert d["templates"] == 3 and d["prefixes"] == 3 and m["queries"] == 9.0
    n_targets = sum(d["targets"].values())
    assert d["recovered"] == {"phone": 1} and m["coverage"] == pytest.approx(1 / n_targets)
    assert m["coverage_phone"] == pytest.approx(1 / d["targets"]["phone"]) and m["efficiency"] == pytest.approx(1 / 9)
    assert m["control_coverage_name"] == 0.5 and m["control_coverage_phone"] == 0.0  # held-out name guessed
    assert m["base_coverage"] == 0.0 and d["base_recovered"] == 0
    assert d["examples"][0]["recovered"] == [["phone", b[0].identifiers[3]]]


def test_answers_put_each_prefix_greedy_answer_before_its_samples(monkeypatch):
    calls = []

    def fake(model, tokenizer, prompts, *, do_sample=False, **options):
        calls.append((do_sample, options.get("temperature"), options["max_new_tokens"]))
        return [Generation(text=f"{tokenizer.decode(p)}:{'s' if do_sample else 'g'}{i}", finished=True)
                for i, p in enumerate(prompts)]

    monkeypatch.setattr(fedpii, "generate", fake)
    attack = FedPiiAttack(samples_per_prefix=3, max_new_tokens=5, temperature=0.5)
    got = attack.answers(_fake_target(), [Prefix("", "a", False), Prefix("", "b", False)], seed=0)
    assert got == ["a:g0", "a:s0", "a:s1", "b:g1", "b:s2", "b:s3"]
    assert calls == [(False, None, 5), (True, 0.5, 5)]
    assert FedPiiAttack(samples_per_prefix=1).answers(_fake_target(), [Prefix("", "a", False)], seed=0) == ["a:g0"]


# -- a real model trained to memorise two clients ------------------------------------------------------------------

@pytest.fixture(scope="module")
def memorised(one_thread, small_model_path):
    """A 'global' adapter trained hard on two clients: three records each, the attacker's canary once and the
    victim's eight times (a heavily duplicated secret)."""
    base, tokenizer = load_base_model(small_model_path)
    model = add_peft_adapter(base, LoraSettings(), seed=0)
    rng = np.random.default_rng(0)
    make = lambda who: [make_record(c, rng, f"{who}-{i}", private=True)
                        for i, c in enumerate(("appointment", "triage", "medication"))]
    mine, theirs, held = make("a"), make("b"), make("h")
    canaries = [Canary("Greta Novak", "730512", 1, 0), Canary("Quentin Rasmussen", "482193", 8, 1)]
    train = mine + [canaries[0].record(0)] + theirs + [canaries[1].record(k) for k in range(8)]
    train_adapter(model, encode(train, tokenizer, max_length=256), TrainSettings(epochs=20, batch_size=8, lr=5e-3),
                  pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    secrets = Secrets(records=mine + theirs, canaries=canaries, nonmembers=held,
                      reference_canaries=[Canary("Ines Achterberg", "915570", 0, None)], clients={0: mine, 1: theirs})
    env = AttackEnvironment(tokenizer=tokenizer, seed=0, train=TrainSettings(epochs=1, batch_size=4, lr=5e-3))
    return Target(model=model, tokenizer=tokenizer, observer="global", round=1, env=env), secrets


def test_a_client_reads_the_other_clients_memorised_canary_and_not_the_held_out_ones(memorised):
    """Measured: answers to the attacker's 4-word contexts write the victim's canary in full (the greedy answer to
    "be seen? ### Response:", from the attacker's triage record); nothing held out, nothing from the base model."""
    target, secrets = memorised
    attack = FedPiiAttack(attacker=0, max_queries=28, samples_per_prefix=4)
    out = attack.run(target, secrets)
    m = out.metrics
    assert m["coverage_secret"] == 1.0 and out.details["recovered"].get("name", 0) >= 1
    assert m["coverage_low"] > 0 and m["control_coverage"] == 0.0 and m["base_coverage"] == 0.0
    assert attack.run(target, secrets).to_dict() == out.to_dict()  # seeded: the same numbers again


def test_local_fine_tuning_leaves_the_view_as_it_was(memorised):
    target, secrets = memorised
    before = get_adapter_state(target.model)
    out = FedPiiAttack(attacker=0, max_queries=4, samples_per_prefix=2, finetune_epochs=1, base_control=False,
                       max_new_tokens=8).run(target, secrets)
    after = get_adapter_state(target.model)
    assert out.details["finetune_seconds"] > 0 and math.isnan(out.metrics["base_coverage"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in target.model.parameters())


# -- end to end -----------------------------------------------------------------------------------------------------

def test_fedpii_on_the_frontier_federation(frontier):
    """FEDIT without defense, every round of the global view, attacker 0. Measured: this small model writes no
    other client's identifier verbatim (coverage 0 in every round, as its controls; fine-tuning 6 epochs and 512
    queries change nothing; even its victims' own prompts do not bring their identifiers out), so the test checks
    the run: cells per round, the query budget, controls at 0 and the interval around the coverage."""
    cells = frontier.cells('{ name = "fedpii", max_queries = 24, samples_per_prefix = 3, max_new_tokens = 24, '
                           'observers = ["global"], rounds = "all" }', defenses='["none"]')
    assert sorted(c["round"] for c in cells) == [0, 1, 2, 3]
    for cell in cells:
        m, d = cell["metrics"], cell["details"]
        assert cell["observer"] == "global" and "error" not in cell
        assert m["queries"] == 24 and d["prefixes"] == 8 and d["templates"] >= 8
        assert sum(d["targets"].values()) > 50 and set(d["targets"]) >= {"name", "mrn", "phone", "secret"}
        assert m["control_coverage"] == 0.0 and m["base_coverage"] == 0.0
        assert m["coverage_low"] <= m["coverage"] <= m["coverage_high"] < 0.1
    with pytest.raises(FedleakError, match="cannot probe the 'upload' view"):
        frontier.cells('{ name = "fedpii", observers = ["upload"] }', defenses='["none"]')
