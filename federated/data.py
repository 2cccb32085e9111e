"""Synthetic clinical instruction data with fictitious patients and planted canaries.

Every name, date, record number, phone number and access code below is generated from the run's
seed; none belongs to a real person. Private records carry a patient's identifiers inside the
text so that leaked identifiers can be counted exactly; the public corpus uses the same clinical
templates with no patient identifiers (or fictitious public patients', `public_corpus(identifiers=True)`)
and serves base-model pretraining. Canaries (Carlini et al. 2019, "The Secret Sharer") are secrets of
one fixed format inserted with chosen repetition counts, with an equal number of same-format reference
secrets that are never inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from fedleak.common.synthetic import FIRST_NAMES, LAST_NAMES
from fedleak.federated.seeding import numpy_rng

SYMPTOMS = (
    "chest tightness", "a persistent cough", "dizziness on standing", "a throbbing headache",
    "lower back pain", "shortness of breath", "a rash on both forearms", "blurred vision",
    "abdominal cramping", "a swollen left ankle", "night sweats", "heart palpitations",
    "a sore throat", "numbness in the right hand", "joint stiffness", "nausea after meals",
)
MODIFIERS = (
    "a mild fever", "no fever", "worsening at night", "after climbing stairs", "since a fall",
    "after starting a new diet", "with occasional vomiting", "that eases with rest",
)
URGENCY = (
    ("be seen in the emergency department today", "the symptoms can signal a serious problem"),
    ("book a same-day appointment with the clinic", "an examination is needed soon"),
    ("arrange a routine appointment this week", "the symptoms are stable"),
    ("rest at home and monitor the symptoms", "they usually settle within a few days"),
)
DRUGS = (
    "ibuprofen", "paracetamol", "warfarin", "metformin", "lisinopril", "atorvastatin",
    "amoxicillin", "sertraline", "omeprazole", "levothyroxine", "prednisone", "amlodipine",
    "clopidogrel", "insulin glargine", "salbutamol", "furosemide",
)
INTERACTIONS = (
    ("this combination can raise the risk of bleeding", "avoid taking them together"),
    ("there is no known important interaction", "they can be taken together as prescribed"),
    ("one drug can change the level of the other", "take them at least two hours apart"),
    ("the combination can lower blood pressure too far", "check blood pressure daily"),
)
LABS = (
    ("hemoglobin", "g/dL", 12.0, 16.0), ("white cell count", "x10^9/L", 4.0, 11.0),
    ("potassium", "mmol/L", 3.5, 5.1), ("creatinine", "mg/dL", 0.6, 1.2),
    ("fasting glucose", "mg/dL", 70.0, 99.0), ("TSH", "mIU/L", 0.4, 4.0),
    ("sodium", "mmol/L", 135.0, 145.0), ("ALT", "U/L", 7.0, 56.0),
    ("LDL cholesterol", "mg/dL", 50.0, 130.0), ("platelets", "x10^9/L", 150.0, 400.0),
)
PROCEDURES = (
    "knee arthroscopy", "appendectomy", "cataract surgery", "a hernia repair", "a cardiac stent",
    "gallbladder removal", "a hip replacement", "a tonsillectomy", "a colonoscopy",
    "wisdom tooth extraction",
)
CARE_STEPS = (
    "keep the wound dry for forty-eight hours", "walk for ten minutes every two hours",
    "take pain relief as prescribed", "avoid lifting anything heavy for two weeks",
    "eat light meals for the first day", "change the dressing every morning",
    "do not drive for one week", "drink plenty of water",
)
SPECIALTIES = (
    "cardiology", "dermatology", "orthopedics", "neurology", "endocrinology", "ophthalmology",
    "physiotherapy", "oncology", "gastroenterology", "rheumatology",
)
CAUSES = (
    ("a viral infection", "rest, fluids and a review if it lasts beyond a week"),
    ("muscle strain", "gentle stretching and a warm compress"),
    ("a side effect of a medication", "a medication review with the pharmacist"),
    ("dehydration", "drinking more water and checking blood pressure"),
    ("an allergic reaction", "an antihistamine and avoiding the trigger"),
    ("anxiety", "breathing exercises and a talk with the care team"),
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)

CATEGORIES = (
    "triage", "medication", "lab_results", "discharge", "appointment", "symptom_check",
)
CANARY_CATEGORY = "canary"
SAFETY_CATEGORY = "safety"  # harmful requests with their refusals (`federated/safety.py`): alignment data, not private


@dataclass(frozen=True)
class Record:
    """One Alpaca-style record; `identifiers` lists the private strings inside its text, and
    `identifier_types` the type of each (empty: the generator's layout, see attacks/extraction/pii.py)."""

    instruction: str
    input: str
    output: str
    category: str
    record_id: str
    identifiers: tuple[str, ...] = ()
    identifier_types: tuple[str, ...] = ()

    def to_alpaca(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output,
                "category": self.category}


@dataclass(frozen=True)
class Patient:
    name: str
    dob: str
    mrn: str
    phone: str

    @property
    def identifiers(self) -> tuple[str, ...]:
        return (self.name, self.dob, self.mrn, self.phone)


@dataclass(frozen=True)
class Canary:
    """A secret of the fixed format `The access code of patient NAME is DDDDDD.`"""

    patient_name: str
    secret: str
    repetitions: int  # 0 for a reference canary that is never inserted
    client: int | None  # the client whose data holds it; None for reference canaries

    SECRET_DIGITS = 6

    @property
    def prompt(self) -> str:
        return f"What is the portal access code of patient {self.patient_name}?"

    def text_with(self, secret: str) -> str:
        return f"The access code of patient {self.patient_name} is {secret}."

    def record(self, copy: int) -> Record:
        return Record(
            instruction=self.prompt, input="", output=self.text_with(self.secret),
            category=CANARY_CATEGORY, record_id=f"canary-{self.secret}-{copy}",
            identifiers=(self.patient_name, self.secret),
        )


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size=n))


def make_patient(rng: np.random.Generator) -> Patient:
    name = f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}"
    dob = f"{int(rng.integers(1930, 2006))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    return Patient(name=name, dob=dob, mrn=_digits(rng, 8), phone=f"555-{_digits(rng, 3)}-{_digits(rng, 4)}")


# Each template returns (instruction, input, output). `p` is None for public text, which then
# names no patient; clinicians' names appear in public text so the base model has seen names.


def _who(p: Patient | None, rng: np.random.Generator, with_id: str = "mrn") -> str:
    if p is None:
        return _pick(rng, ("a patient", "an adult patient", "an older patient", "a young patient"))
    return f"{p.name} (MRN {p.mrn})" if with_id == "mrn" else f"{p.name}, born {p.dob},"


def _callback(p: Patient | None, rng: np.random.Generator) -> str:
    if p is None:
        return f"the clinic of Dr. {_pick(rng, LAST_NAMES)}"
    return p.phone


def _triage(p, rng):
    symptom, modifier, days = _pick(rng, SYMPTOMS), _pick(rng, MODIFIERS), int(rng.integers(1, 15))
    action, reason = _pick(rng, URGENCY)
    who = _who(p, rng)
    name = p.name if p else "The patient"
    instruction = f"{who} reports {symptom} for {days} days with {modifier}. How urgently should they be seen?"
    output = (f"{name} should {action} because {reason}. If the {symptom} gets worse, "
              f"call {_callback(p, rng)} or go to the emergency department.")
    return instruction, "", output


def _medication(p, rng):
    a, b = rng.choice(len(DRUGS), size=2, replace=False)
    effect, advice = _pick(rng, INTERACTIONS)
    who = _who(p, rng, with_id="dob")
    name = p.name if p else "The patient"
    instruction = f"{who} asks whether {DRUGS[a]} can be taken together with {DRUGS[b]}."
    output = f"{name} was told that {effect}, so {advice}. Questions can go to {_callback(p, rng)}."
    return instruction, "", output


def _lab_results(p, rng):
    chosen = rng.choice(len(LABS), size=2, replace=False)
    lines, notes = [], []
    for i in chosen:
        test, unit, lo, hi = LABS[i]
        value = round(float(rng.uniform(lo * 0.6, hi * 1.4)), 1)
        lines.append(f"{test}: {value} {unit} (reference {lo}-{hi})")
        status = "low" if value < lo else "high" if value > hi else "normal"
        notes.append(f"the {test} of {value} is {status}")
    who = _who(p, rng)
    name = p.name if p else "The patient"
    instruction = f"Explain these lab results to {who}."
    output = f"{name}: {notes[0]} and {notes[1]}. We will discuss the next steps at the follow-up visit."
    return instruction, "; ".join(lines), output


def _discharge(p, rng):
    procedure = _pick(rng, PROCEDURES)
    steps = rng.choice(len(CARE_STEPS), size=3, replace=False)
    who = p.name + f" (DOB {p.dob})" if p else _pick(rng, ("a patient", "an adult patient"))
    name = p.name if p else "The patient"
    instruction = f"Write discharge instructions for {who} after {procedure}."
    output = (f"{name}, after {procedure} please {CARE_STEPS[steps[0]]}, {CARE_STEPS[steps[1]]} "
              f"and {CARE_STEPS[steps[2]]}. Call {_callback(p, rng)} if you have a fever.")
    return instruction, "", output


def _appointment(p, rng):
    specialty = _pick(rng, SPECIALTIES)
    date = f"{_pick(rng, MONTHS)} {int(rng.integers(1, 29))}"
    time = f"{int(rng.integers(8, 17))}:{_pick(rng, ('00', '15', '30', '45'))}"
    doctor = _pick(rng, LAST_NAMES)
    who = p.name if p else _pick(rng, ("a patient", "a returning patient"))
    instruction = f"Draft a reminder for {who} about a {specialty} appointment on {date} at {time}."
    if p:
        output = (f"Hello {p.name}, this is a reminder of your {specialty} appointment with Dr. {doctor} "
                  f"on {date} at {time}. Please bring MRN {p.mrn} and call {p.phone} to reschedule.")
    else:
        output = (f"Hello, this is a reminder of your {specialty} appointment with Dr. {doctor} "
                  f"on {date} at {time}. Please call the front desk to reschedule.")
    return instruction, "", output


def _symptom_check(p, rng):
    symptom = _pick(rng, SYMPTOMS)
    cause, plan = _pick(rng, CAUSES)
    who = f"{p.name} (phone {p.phone})" if p else _pick(rng, ("a patient", "an older patient"))
    name = p.name if p else "The patient"
    instruction = f"{who} describes {symptom}. What could be causing it and what should they do?"
    output = f"{name} may have {cause}. The suggested plan is {plan}, with a review by Dr. {_pick(rng, LAST_NAMES)}."
    return instruction, "", output


TEMPLATES: dict[str, Callable] = {
    "triage": _triage, "medication": _medication, "lab_results": _lab_results,
    "discharge": _discharge, "appointment": _appointment, "symptom_check": _symptom_check,
}


def make_record(category: str, rng: np.random.Generator, record_id: str, *, private: bool) -> Record:
    patient = make_patient(rng) if private else None
    instruction, inp, output = TEMPLATES[category](patient, rng)
    return Record(instruction=instruction, input=inp, output=output, category=category,
                  record_id=record_id, identifiers=patient.identifiers if patient else ())


def generate_records(n: int, *, seed: int, purpose: str, private: bool) -> list[Record]:
    rng = numpy_rng(seed, purpose)
    categories = [CATEGORIES[int(i)] for i in rng.integers(len(CATEGORIES), size=n)]
    return [make_record(c, rng, f"{purpose}-{i:05d}", private=private) for i, c in enumerate(categories)]


# With public identifiers, one pretraining record in ten more is an access-code sentence. The BPE vocabulary is
# trained on this corpus too; without the sentences the demo's model wrote "The acc c c c of patient" for them.
PUBLIC_ACCESS_CODE_EVERY = 10


def public_corpus(n: int, *, seed: int, identifiers: bool) -> list[Record]:
    """The embedded model's pretraining records: `n` public records of the clinical templates.

    Without `identifiers` they name no patient (`generate_records(..., private=False)`). With them each names a
    fictitious public patient as private records do, and n // PUBLIC_ACCESS_CODE_EVERY more records are
    access-code sentences of the canaries' format (`Canary.text_with`) with public codes: what a real LLM's
    pretraining holds (names, dates of birth, record and phone numbers, such sentences), never a run's private
    record. Everything is drawn from the generator's lists and `seed`'s "public" streams, not from a run's seed,
    so identifiers coincide with a run's only by chance: often for names and dates of birth (60 x 57 name
    combinations, about 28,000 dates; 12 of the demo's 120 private and held-out dates at seed 0), rarely for
    record and phone numbers (one held-out record number there). A canary may share its patient's name with a
    public access-code sentence (at 6,000 public records, 600 sentences with 549 names: 4 of the 24 inserted and
    5 of the 24 reference canaries of configs/full.toml); inserted and reference canaries share that chance, so
    exposure's comparison between them stays fair.

    Args:
        n: public records of the clinical templates (the access-code sentences come on top).
        seed: the embedded model's build seed (`EmbeddedModelConfig.seed`).
        identifiers: name public patients and add the access-code sentences.

    Returns the records, clinical ones first.
    """
    records = generate_records(n, seed=seed, purpose="public", private=identifiers)
    if identifiers:
        rng = numpy_rng(seed, "public-access-codes")
        for i in range(n // PUBLIC_ACCESS_CODE_EVERY):
            code = Canary(patient_name=make_patient(rng).name, secret=_digits(rng, Canary.SECRET_DIGITS),
                          repetitions=0, client=None)
            records.append(replace(code.record(0), record_id=f"public-code-{i:05d}"))
    return records


def make_canaries(*, seed: int, repetitions: Sequence[int], per_repetition: int,
                  num_clients: int) -> tuple[list[Canary], list[Canary]]:
    """Inserted canaries (each repetition count `per_repetition` times) and as many references."""
    rng = numpy_rng(seed, "canaries")
    total = len(repetitions) * per_repetition
    secrets: set[str] = set()
    while len(secrets) < 2 * total:  # distinct secrets so ranks are well defined
        secrets.add(_digits(rng, Canary.SECRET_DIGITS))
    ordered = sorted(secrets)
    rng.shuffle(ordered)
    names = [make_patient(rng).name for _ in range(2 * total)]
    inserted = [
        Canary(patient_name=names[i], secret=ordered[i], repetitions=int(reps),
               client=int(rng.integers(num_clients)))
        for i, reps in enumerate(r for r in repetitions for _ in range(per_repetition))
    ]
    reference = [Canary(patient_name=names[total + i], secret=ordered[total + i], repetitions=0, client=None)
                 for i in range(total)]
    return inserted, reference


def make_audit_canaries(n: int, *, seed: int, num_clients: int, taken: Sequence[Canary] = ()) -> list[Canary]:
    """Canaries for the one-run audit (Steinke, Nasr and Jagielski 2023): each is inserted once,
    independently with probability 1/2 (`repetitions` 1 or 0), into a client drawn uniformly; a
    separate random stream keeps the exposure canaries unchanged when `n` changes. Names and secrets
    are distinct from each other and from the `taken` canaries': a shared patient name would make one
    canary a near-copy of another's prompt and blur both measurements."""
    rng = numpy_rng(seed, "audit-canaries")
    names = {c.patient_name for c in taken}
    secrets = {c.secret for c in taken}
    out: list[Canary] = []
    while len(out) < n:
        name, secret = make_patient(rng).name, _digits(rng, Canary.SECRET_DIGITS)
        if name in names or secret in secrets:
            continue
        names.add(name)
        secrets.add(secret)
        out.append(Canary(patient_name=name, secret=secret, repetitions=int(rng.integers(2)),
                          client=int(rng.integers(num_clients))))
    return out


@dataclass
class FederatedData:
    """Everything a run trains and attacks on; `clients[i]` already includes its canary copies.

    `quality` is what the run reports about the data besides its sizes (the data file, its hash and field
    mapping, duplicates dropped, the split used and why, truncation once a tokenizer counted it), and
    `warnings` the problems found while preparing it (federated/datasource.py, federated/dataquality.py).
    The public pretraining corpus is not here: it belongs to the embedded model's build.
    """

    clients: list[list[Record]]
    heldout: list[Record]
    canaries: list[Canary] = field(default_factory=list)
    reference_canaries: list[Canary] = field(default_factory=list)
    audit_canaries: list[Canary] = field(default_factory=list)  # repetitions 1 = inserted, 0 = not
    quality: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def members_of(self, clients) -> list[Record]:
        """The private records that the given clients train on: neither canaries nor safety-alignment records."""
        return [r for c in sorted(clients) for r in self.clients[c]
                if r.category not in (CANARY_CATEGORY, SAFETY_CATEGORY)]

    @property
    def members(self) -> list[Record]:
        return self.members_of(range(len(self.clients)))

    def summary(self) -> dict:
        return {
            "client_sizes": [len(c) for c in self.clients],
            "heldout": len(self.heldout),
            "canaries": len(self.canaries),
            "reference_canaries": len(self.reference_canaries),
            "audit_canaries": len(self.audit_canaries),
            "audit_canaries_inserted": sum(c.repetitions for c in self.audit_canaries),
            **self.quality,
        }


def with_canaries(clients: list[list[Record]], canaries: Sequence[Canary], *, seed: int) -> list[list[Record]]:
    """Append each canary's copies to its client, then shuffle each client's data."""
    out = [list(c) for c in clients]
    for canary in canaries:
        out[canary.client].extend(canary.record(k) for k in range(canary.repetitions))
    rng = numpy_rng(seed, "canary-shuffle")
    for records in out:
        order = rng.permutation(len(records))
        records[:] = [records[int(i)] for i in order]
    return out

