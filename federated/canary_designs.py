"""Designed canaries for the one-run audit, beside today's random-digit ones.

Panda, Tang, Nasr, Choquette-Choo and Mittal (2025), "Privacy Auditing of Large Language Models"
(ICLR 2025, arXiv 2503.06808): canaries whose secrets the model finds improbable, yet can learn, are
memorised far more readily than secrets of random ordinary tokens, so a membership test separates
inserted from left-out canaries better and the audit's epsilon lower bound rises (on Qwen2.5-0.5B,
49.6% TPR at 1% FPR against 4.2% for prior canaries). Their designs: new tokens appended to the
vocabulary, and secrets of rare tokens (least frequent unigrams) or of token pairs the training data
never has (bigrams). New tokens need the embedding matrix trained, which LoRA leaves frozen (a new
token would keep its random initial embedding), so they are not offered. The data is generated before
any model or tokenizer exists (`check_data` runs first, a dry run never builds one), so both designs
here are fixed in characters, not token ids; each secret has six tokens on the embedded model, as a
random canary's six digits do, so the designs differ in their tokens alone. The frame ("The access
code of patient NAME is SECRET.") is the random design's.

`rare_tokens`: six symbols drawn uniformly from `RARE_ALPHABET`, ASCII punctuation the public
pretraining corpus never contains. For the embedded model that is exact: its byte-level BPE is trained
on that corpus, every byte has a token and no merge involves a character the corpus lacks, so each
symbol is one token of pretraining frequency zero, the end of the unigram tail. Measured on the demo's
FEDIT training they separate worse than random digits: tokens seen only as softmax negatives had their
tied embeddings pushed together (mean pairwise cosine 0.89 for these 16, 0.57 for the digits), so a
LoRA with frozen embeddings learns "a rare symbol comes next" from the inserted canaries and predicts
it for the left-out ones alike. On a Hugging Face base the symbols are common code punctuation.

`unseen_bigrams`: six words drawn uniformly from `COMMON_WORDS`, everyday words the corpus uses often,
so each is a well-trained, distinguishable token, while the random order makes almost every consecutive
pair one the corpus never has: the bigram design, rare pairs of frequent tokens. Everyday words are
frequent tokens in any English BPE, so it does not lean on the embedded tokenizer; it separates best here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fedleak.common.errors import FedleakError
from fedleak.common.synthetic import FIRST_NAMES, LAST_NAMES
from fedleak.federated.data import CANARY_CATEGORY, Canary, Record, make_audit_canaries, make_patient
from fedleak.federated.seeding import numpy_rng

RANDOM = "random"
RARE_TOKENS = "rare_tokens"
# Absent from the public corpus; quotes, backslash, backtick and | are left out so that no secret needs
# escaping in JSON or breaks a Markdown table where a record is shown.
RARE_ALPHABET = "!$%&*+<=>@[]_{}~"
# Everyday words the public corpus uses (tests/test_canary_designs.py checks each occurs, is one token of the
# embedded tokenizer, and that few of their pairs occur side by side there).
COMMON_WORDS = tuple("""ankle back blood book breath call care cell chest clinic cough count daily days desk diet
drink drive drug fall fever first front gentle hand heart heavy high home joint keep knee left level light meals
minutes morning muscle night normal pain plan rash rest review right risk side signal sodium soon steps team throat
today tooth walk warm water week white wound young""".split())
UNSEEN_BIGRAMS = "unseen_bigrams"
DESIGNS = {
    RANDOM: "six random digits (Carlini et al. 2019's format; today's audit canaries)",
    RARE_TOKENS: f"six symbols from {RARE_ALPHABET!r}, characters the public corpus never contains: for the "
                 "embedded model, tokens never seen in pretraining (Panda et al. 2025's rare-token canaries)",
    UNSEEN_BIGRAMS: f"six words drawn from {len(COMMON_WORDS)} everyday words of the corpus: frequent tokens in "
                    "an order the corpus never has (Panda et al. 2025's bigram canaries)",
}


@dataclass(frozen=True)
class DesignedCanary(Canary):
    """An audit canary of a design other than `random`: the same frame, its own kind of secret."""

    design: str = RARE_TOKENS

    def record(self, copy: int) -> Record:
        # Ids key caches and results: words joined by "-", any other secret as the hex of its bytes.
        words = self.secret.split(" ")
        key = "-".join(words) if all(w.isalnum() for w in words) else self.secret.encode().hex()
        return Record(instruction=self.prompt, input="", output=self.text_with(self.secret),
                      category=CANARY_CATEGORY, record_id=f"canary-{self.design}-{key}-{copy}",
                      identifiers=(self.patient_name, self.secret))


def design_of(canary: Canary) -> str:
    """A canary's design (`make_audit_canaries` makes plain `Canary`s: the random design)."""
    return getattr(canary, "design", RANDOM)


def _rare_secret(rng) -> str:
    return "".join(RARE_ALPHABET[int(i)] for i in rng.integers(len(RARE_ALPHABET), size=Canary.SECRET_DIGITS))


def _bigram_secret(rng) -> str:
    return " ".join(COMMON_WORDS[int(i)] for i in rng.integers(len(COMMON_WORDS), size=Canary.SECRET_DIGITS))


_SECRETS = {RARE_TOKENS: _rare_secret, UNSEEN_BIGRAMS: _bigram_secret}


def _designed(design: str, n: int, *, seed: int, num_clients: int, taken: Sequence[Canary]) -> list[Canary]:
    """`n` canaries of one design from its own stream, as `make_audit_canaries` draws them: names and
    secrets distinct from `taken`, each inserted once with probability 1/2 into a uniform client."""
    names_left = len(FIRST_NAMES) * len(LAST_NAMES) - len({c.patient_name for c in taken})
    if n > names_left // 2:  # rejection sampling slows to a crawl as the names run out
        raise FedleakError(f"data.embedded.audit_canaries = {n} per design leaves too few of the generator's "
                           f"{len(FIRST_NAMES) * len(LAST_NAMES)} patient names distinct: lower it")
    rng = numpy_rng(seed, "audit-canaries", design)
    names, secrets = {c.patient_name for c in taken}, {c.secret for c in taken}
    out: list[Canary] = []
    while len(out) < n:
        name, secret = make_patient(rng).name, _SECRETS[design](rng)
        if name in names or secret in secrets:
            continue
        names.add(name)
        secrets.add(secret)
        out.append(DesignedCanary(patient_name=name, secret=secret, repetitions=int(rng.integers(2)),
                                  client=int(rng.integers(num_clients)), design=design))
    return out


def make_designed_audit_canaries(n: int, designs: Sequence[str], *, seed: int, num_clients: int,
                                 taken: Sequence[Canary] = ()) -> list[Canary]:
    """`n` audit canaries per design, listed in the order of `designs`. The random design is drawn first,
    by `make_audit_canaries` and avoiding only `taken`, so it is today's set whatever other designs run
    beside it; each other design has its own stream and avoids every name and secret drawn before it."""
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise FedleakError(f"audit canary design {unknown[0]!r} is unknown: use one of {', '.join(DESIGNS)}")
    taken = list(taken)
    made: dict[str, list[Canary]] = {}
    for design in sorted(designs, key=lambda d: d != RANDOM):
        made[design] = (make_audit_canaries(n, seed=seed, num_clients=num_clients, taken=taken) if design == RANDOM
                        else _designed(design, n, seed=seed, num_clients=num_clients, taken=taken))
        taken += made[design]
    return [c for d in designs for c in made[d]]
