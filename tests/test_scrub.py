"""The `scrub` defense (issue 21, item 3): each pattern on hand cases, every identifier of the embedded data
scrubbed while a canary design no pattern knows passes through, bad settings refused with the fix, and a real
federated training whose clients train on the scrubbed records while the history records what changed."""

import pytest

from fedleak.common.errors import FedleakError
from fedleak.common.params import instantiate
from fedleak.defenses.base import DEFENSES, Composition
from fedleak.defenses.scrub import Scrub, scrub_records, scrub_text
from fedleak.eval.training_runs import sanitisation_summary
from fedleak.federated.adapters import LoraSettings
from fedleak.federated.canary_designs import UNSEEN_BIGRAMS, make_designed_audit_canaries
from fedleak.federated.data import FederatedData, generate_records, make_canaries
from fedleak.federated.fedit import FedIT
from fedleak.federated.loop import ClientSide, run_rounds
from fedleak.federated.model import load_base_model
from fedleak.federated.rounds import FederationSettings, TrainingSetup
from fedleak.reports.document import Table
from fedleak.reports.sanitisation import sanitisation_table

pytestmark = pytest.mark.usefixtures("one_thread")


def scrub(text, **kwargs):
    return scrub_text(text, patterns=Scrub(**kwargs).patterns)


@pytest.mark.parametrize("text, expected, entity", [
    ("write to ada.l+notes@clinic-7.example.org today", "write to [EMAIL] today", "email"),
    ("call 555-123-4567 now", "call [PHONE] now", "phone"),
    ("call (555) 123-4567 or +1 555 123 4567", "call [PHONE] or [PHONE]", "phone"),
    ("born 1984-04-09, seen 03/01/2024", "born [DATE], seen [DATE]", "date"),
    ("on March 12 and on 3 Sept 2021", "on [DATE] and on [DATE]", "date"),
    ("bring MRN 79164341 please", "bring MRN [MRN] please", "record_number"),
    ("medical record number: AB-12345", "medical record number: [MRN]", "record_number"),
    ("Medical Record Number: 12345, MRN-12345678, mrn12345678", "Medical Record Number: [MRN], MRN-[MRN], mrn[MRN]",
     "record_number"),
    ("the access code is 798439.", "the access code is [NUMBER].", "digits"),
    ("code-123456 and X1234567Y", "code-[NUMBER] and X[NUMBER]Y", "digits"),
])
def test_each_pattern_replaces_its_entity(text, expected, entity):
    out, counts = scrub(text)
    assert out == expected
    assert set(counts) == {entity} and counts[entity] == expected.count("[")


def test_what_the_patterns_leave_alone():
    # Short numbers (doses, lab values, times), a five-digit run under min_digits = 6, names not in the list,
    # a listed name in lower case (case-sensitive: "hollis" is a word), digits inside a longer token.
    text = ("take 500 mg at 14:30; glucose 106.9; pi 3.1415926; ZIP 02139; Dr. Hollisworth; hollis; record 3 times; "
            "ID 5 mg; account 2")
    assert scrub(text) == (text, {})
    assert scrub("ZIP 02139", min_digits=5)[0] == "ZIP [NUMBER]"
    # Only the entities asked for run.
    assert scrub("Ada Hollis, 555-123-4567", entities=("phone",))[0] == "Ada Hollis, [PHONE]"


def test_names_from_the_list_and_a_full_name_as_one_placeholder(tmp_path):
    names = tmp_path / "register.txt"
    names.write_text("# staff and patients\nAda Lovelace\n\nGrace Hopper\n", encoding="utf-8")
    out, counts = scrub("Ada Lovelace met Dr. Hopper and Grace.", names=str(names))
    assert out == "[NAME] met Dr. [NAME] and [NAME]." and counts == {"name": 3}
    # A line break between two names stays (two placeholders, the text's layout kept).
    assert scrub("Ada\nLovelace", names=str(names))[0] == "[NAME]\n[NAME]"
    # The embedded list holds the generator's first and last names.
    assert scrub("Hello Fionn Vasquez, Dr. Ivanova will see you")[0] == "Hello [NAME], Dr. [NAME] will see you"


def test_every_identifier_of_the_embedded_data_goes_but_a_canary_design_no_pattern_knows_stays():
    records = generate_records(300, seed=3, purpose="scrub", private=True)
    inserted, _ = make_canaries(seed=3, repetitions=[1, 4], per_repetition=2, num_clients=1)
    words = make_designed_audit_canaries(4, [UNSEEN_BIGRAMS], seed=3, num_clients=1)
    canaries = [c.record(0) for c in inserted] + [c.record(0) for c in words]
    out, facts = scrub_records(records + canaries, patterns=Scrub().patterns)
    assert len(out) == len(records) + len(canaries) and [r.record_id for r in out] == [
        r.record_id for r in records + canaries]
    for before, after in zip(records + canaries, out):
        text = " ".join((after.instruction, after.input, after.output))
        secret = before.identifiers[-1] if before.category == "canary" else None
        missed = [i for i in before.identifiers if i in text]
        if secret is not None and " " in secret:  # an unseen-bigrams secret: six common words
            assert missed == [secret] and after.identifiers == (secret,)
        else:
            assert missed == [] and after.identifiers == ()
    assert facts["records"] == facts["changed"] == len(records) + len(canaries)
    assert facts["identifiers_left"] == len(words)  # exactly the word secrets
    assert set(facts["replaced"]) == {"name", "phone", "date", "record_number", "digits"}
    assert facts["replaced"]["digits"] == len(inserted)  # the six-digit access codes
    # Scrubbing is a function of the text: the same records give the same output.
    assert scrub_records(records, patterns=Scrub().patterns)[0] == out[:len(records)]


def test_bad_settings_name_the_fix(tmp_path):
    with pytest.raises(FedleakError, match=r"scrub.names = '.*nowhere.txt': cannot read it .*one name per line"):
        Scrub(names=str(tmp_path / "nowhere.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(FedleakError, match="lists no name: put one name per line"):
        Scrub(names=str(tmp_path / "empty.txt"))
    with pytest.raises(FedleakError, match="lists an entity twice"):
        Scrub(entities=("name", "name"))
    with pytest.raises(FedleakError, match="scrub.entities is empty: list at least one of email"):
        Scrub(entities=())
    # The patterns' order is fixed: the same entities in another order are the same defense (params, cache key).
    assert Scrub(entities=("name", "phone")).params() == Scrub(entities=("phone", "name")).params()
    with pytest.raises(FedleakError, match=r"entities\[1\].*'email'"):
        instantiate(DEFENSES.get("scrub"), {"entities": ["name", "ssn"]}, "matrix.defenses[0]")
    with pytest.raises(FedleakError, match="min_digits"):
        instantiate(DEFENSES.get("scrub"), {"min_digits": 0}, "matrix.defenses[0]")
    # A name file is read only where names are scrubbed.
    assert Scrub(entities=("phone",), names=str(tmp_path / "nowhere.txt")).patterns.keys() == {"phone"}


@pytest.fixture(scope="module")
def scrubbed_training(small_model_path, tmp_path_factory):
    """Two rounds of FEDIT with scrub composed with norm bounding, on 3 clients of 6 records and a canary."""
    base, tokenizer = load_base_model(small_model_path)
    records = generate_records(18, seed=0, purpose="pool", private=True)
    canaries, _ = make_canaries(seed=0, repetitions=[2], per_repetition=1, num_clients=3)
    clients = [records[i * 6:(i + 1) * 6] for i in range(3)]
    clients[canaries[0].client] += [canaries[0].record(k) for k in range(2)]
    data = FederatedData(clients=clients, heldout=generate_records(4, seed=0, purpose="h", private=True),
                         canaries=canaries)
    defense = Composition([Scrub(), instantiate(DEFENSES.get("norm_bound"), {"max_norm": 50.0}, "test")])
    setup = TrainingSetup(base_model=base, tokenizer=tokenizer, data=data,
                          federation=FederationSettings(clients=3, rounds=2, local_epochs=1, batch_size=4,
                                                        min_records_per_client=1),
                          adapter=LoraSettings(r=4, alpha=8), hooks=defense, seed=0,
                          out_dir=tmp_path_factory.mktemp("scrub"), config_hash="test", progress=False)
    return setup, run_rounds(setup, FedIT())


def test_clients_train_on_scrubbed_records_and_the_history_says_what_changed(scrubbed_training):
    setup, run = scrubbed_training
    side = ClientSide(setup, FedIT())
    for client, original in enumerate(setup.data.clients):
        records, facts, examples = side.trained[client]
        assert len(records) == len(examples) == len(original)
        text = setup.tokenizer.decode([t for e in examples for t in e.input_ids])
        assert "[NAME]" in text and "[PHONE]" in text
        assert not any(i in text for r in original for i in r.identifiers)
        # What the round loop recorded is what the hook returned, in every round the client trained.
        assert all(entry["client_metrics"][str(client)]["sanitisation"] == facts for entry in run.history)
        assert facts["scrub"]["changed"] == len(original) and facts["scrub"]["identifiers_left"] == 0
    # The attacks' members stay the original records.
    assert run.global_members == setup.data.members
    summary = sanitisation_summary(run.history)
    assert summary["scrub"]["clients"] == 3 and summary["scrub"]["records"] == sum(map(len, setup.data.clients))
    assert summary["scrub"]["replaced"]["digits"] == 2  # the canary's two copies
    assert sum(summary["scrub"]["replaced"].values()) == sum(
        sum(e["client_metrics"][str(c)]["sanitisation"]["scrub"]["replaced"].values()) for c in range(3)
        for e in run.history[:1])


def test_the_report_shows_what_was_scrubbed():
    facts = {"scrub": {"clients": 3, "records": 40, "changed": 30, "identifiers_left": 2,
                       "replaced": {"name": 50, "phone": 10}}}
    training = {"algorithm": "fedit", "defense": "scrub", "scenario": "clean", "sanitisation": facts}
    run = type("Run", (), {"trainings": [dict(training, per_seed=[training, dict(training, sanitisation={
        "scrub": dict(facts["scrub"], changed=20, replaced={"name": 30})})])]})()
    table = sanitisation_table(run)
    assert isinstance(table, Table) and table.rows == [["fedit", "scrub", "scrub", "25.0 of 40.0", "name 40.0, phone 5.0",
                                                        "2.0"]]
    assert sanitisation_table(type("Run", (), {"trainings": [{"algorithm": "fedit", "defense": "none"}]})()) is None


def test_without_presidio_installed_its_option_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # an import of it raises ImportError
    with pytest.raises(FedleakError, match=r"scrub.presidio_model = 'en_core_web_lg' needs Microsoft Presidio: pip "
                                           r"install 'fedleak\[presidio\]'"):
        Scrub(presidio_model="en_core_web_lg")
    assert Scrub().analyzer is None  # off by default: nothing imported


def test_presidio_runs_after_the_patterns_where_it_is_installed():
    """Presidio's pattern and checksum recognizers (a blank spaCy model: no download) catch what the patterns do
    not: a URL and a card number (Luhn-valid); what the patterns replaced already stays their placeholder."""
    pytest.importorskip("presidio_analyzer")
    from fedleak.federated.data import Record

    record = Record(instruction="Dario Okonkwo asks: see https://clinic.example.org/p/7 and bill card 4111 1111 1111 1111.",
                    input="", output="Call 555-123-4567 on March 3.", category="triage", record_id="r")
    (out,), facts = Scrub(presidio_model="blank:en").client_records([record], client=0)
    assert out.instruction == "[NAME] asks: see [URL] and bill card [CREDIT_CARD]."
    assert out.output == "Call [PHONE] on [DATE]."
    assert facts["scrub"]["replaced"] == {"date": 1, "name": 1, "phone": 1, "presidio_credit_card": 1,
                                          "presidio_url": 1}
    with pytest.raises(FedleakError, match="spaCy has no such model installed: install it"):
        Scrub(presidio_model="no_such_model_xyz")
