import dataclasses

import re
from collections import Counter

from fedleak.federated.data import (CANARY_CATEGORY, CATEGORIES, generate_records, make_canaries, public_corpus,
                                    with_canaries)
from fedleak.federated.datasource import DataSettings, EmbeddedDataSettings, prepare_data


def test_generator_is_deterministic_and_seed_dependent():
    a = generate_records(50, seed=3, purpose="private", private=True)
    b = generate_records(50, seed=3, purpose="private", private=True)
    c = generate_records(50, seed=4, purpose="private", private=True)
    assert a == b
    assert [r.output for r in a] != [r.output for r in c]


def test_private_records_carry_their_identifiers_in_the_text():
    records = generate_records(200, seed=0, purpose="private", private=True)
    assert {r.category for r in records} == set(CATEGORIES) and len(CATEGORIES) >= 6
    for r in records:
        name, dob, mrn, phone = r.identifiers
        text = " ".join((r.instruction, r.input, r.output))
        assert name in text
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", dob) and re.fullmatch(r"\d{8}", mrn)
        assert re.fullmatch(r"555-\d{3}-\d{4}", phone)
        assert sum(x in text for x in (dob, mrn, phone)) >= 1  # every record names at least one more identifier


def test_public_records_name_no_patient():
    private = generate_records(300, seed=0, purpose="private", private=True)
    public = generate_records(300, seed=0, purpose="public", private=False)
    assert all(r.identifiers == () for r in public)
    public_text = " ".join(r.instruction + r.input + r.output for r in public)
    assert not re.search(r"MRN \d|555-\d{3}-\d{4}|born \d{4}", public_text)
    leaked = [ident for r in private for ident in r.identifiers[1:] if ident in public_text]
    assert leaked == []


def test_public_corpus_with_identifiers_names_public_patients_and_writes_access_code_sentences():
    rich = public_corpus(300, seed=0, identifiers=True)
    assert rich == public_corpus(300, seed=0, identifiers=True) and len(rich) == 330
    people, codes = rich[:300], rich[300:]
    assert {r.category for r in people} == set(CATEGORIES)
    assert all(len(r.identifiers) == 4 and r.identifiers[0] in r.instruction + r.output for r in people)
    assert all(r.category == CANARY_CATEGORY and r.identifiers[0] in r.instruction
               and re.fullmatch(r"The access code of patient [A-Z][a-z]+ [A-Z][a-z]+ is \d{6}\.", r.output)
               and r.output.endswith(f" {r.identifiers[1]}.") for r in codes)
    # The public patients are the "public" stream's, not the run's private stream's drawn again.
    private = generate_records(300, seed=0, purpose="private", private=True)
    assert [r.identifiers for r in people] != [r.identifiers for r in private]


def test_canaries_are_inserted_with_their_repetition_counts_and_references_never():
    inserted, reference = make_canaries(seed=0, repetitions=(1, 4, 16), per_repetition=2, num_clients=3)
    assert sorted(c.repetitions for c in inserted) == [1, 1, 4, 4, 16, 16]
    assert len(reference) == len(inserted) and all(c.repetitions == 0 for c in reference)
    assert len({c.secret for c in inserted + reference}) == 12
    assert all(len(c.secret) == 6 and c.secret.isdigit() for c in inserted + reference)
    clients = with_canaries([[], [], []], inserted, seed=0)
    texts = Counter(r.output for client in clients for r in client)
    for c in inserted:
        assert texts[c.text_with(c.secret)] == c.repetitions
        assert all(r.output != c.text_with(c.secret) for i, cl in enumerate(clients) if i != c.client for r in cl)
    for c in reference:
        assert all(c.secret not in r.output for client in clients for r in client)


def test_prepare_data_splits_members_heldout_and_canaries():
    settings = DataSettings(embedded=EmbeddedDataSettings(private_records=120, heldout_records=60,
                                                          canary_repetitions=(2, 3), canaries_per_repetition=1))
    data = prepare_data(settings, seed=0, num_clients=3, partition_method="dirichlet", alpha=1.0, min_records=5)
    assert len(data.members) == 120 and len(data.heldout) == 60
    assert sum(r.category == CANARY_CATEGORY for c in data.clients for r in c) == 5
    member_ids = {r.record_id for r in data.members}
    assert not member_ids & {r.record_id for r in data.heldout}
    assert data == prepare_data(settings, seed=0, num_clients=3, partition_method="dirichlet", alpha=1.0,
                                min_records=5)


def test_audit_canaries_are_inserted_once_with_probability_one_half_and_clash_with_nothing():
    settings = DataSettings(embedded=EmbeddedDataSettings(private_records=60, heldout_records=20,
                                                          canary_repetitions=(1, 4), canaries_per_repetition=2,
                                                          audit_canaries=400))
    data = prepare_data(settings, seed=0, num_clients=3, partition_method="iid", alpha=1.0, min_records=5)
    audit = data.audit_canaries
    assert len(audit) == 400 and {c.repetitions for c in audit} == {0, 1}
    assert 160 < sum(c.repetitions for c in audit) < 240  # Binomial(400, 1/2): 200 +- 2 standard deviations
    trained = {r.record_id for c in data.clients for r in c}
    for canary in audit:  # each inserted canary's one copy sits in its client's data, the others nowhere
        assert (canary.record(0).record_id in trained) == bool(canary.repetitions)
        assert (canary.record(0).record_id in {r.record_id for r in data.clients[canary.client]}) == bool(canary.repetitions)
    others = data.canaries + data.reference_canaries
    names = [c.patient_name for c in audit + others]
    secrets = [c.secret for c in audit + others]
    assert len(set(names)) == len(names) and len(set(secrets)) == len(secrets)
    assert not {r.record_id for r in data.members} & {c.record(0).record_id for c in audit}
    # The exposure canaries do not move when audit canaries are added.
    plain = prepare_data(DataSettings(embedded=dataclasses.replace(settings.embedded, audit_canaries=0)), seed=0,
                         num_clients=3, partition_method="iid", alpha=1.0, min_records=5)
    assert plain.canaries == data.canaries and plain.audit_canaries == []
