"""Vocabulary leakage from a client's update: which tokens its round data held, read from the LoRA A factors of
the layers that see one token at a time. The first step of text reconstruction from updates, after DAGER
(Petrov, Dimitrov, Baader, Muller and Vechev 2024, "DAGER: Exact Gradient Inversion for Large Language
Models", arXiv 2405.15586): a token is in the batch iff its first-layer input embedding lies in the span of
the first layer's gradient.

A LoRA layer y = W h + s B A h has dL/dA = s sum_t (B^T delta_t) h_t^T: the rows of A's gradient lie in the span
of the layer's inputs h_t. For the modules that read the block input before any token mixing (Llama's q/k/v
projections of block 0 read input_layernorm(embedding(token)); RoPE comes after the projection) h_t = e_v is a
function of the token v alone. With R the stacked A updates of those modules, P the projection that removes the
direction every token vector shares (the vocabulary's mean, which otherwise puts every token "in" any span) and
Q an orthonormal basis of the row space of R P (its top singular directions holding `energy` of the squared
singular values), each vocabulary token scores

    score(v) = ||Q P e_v|| / ||P e_v||          (= sqrt(1 - residual^2 / ||P e_v||^2), DAGER's distance, normalised)

averaged over groups of modules with distinct inputs; tokens of the round's data score high. P is linear, so a
token in span{h_t} stays in the span after it: the test stays exact. The modules are found, not named: the
LoRA-wrapped modules whose input at each position of a random sequence equals their input when that token is fed
alone. None qualifies where positions enter before block 0 (GPT-2, OPT: learned absolute positions): the attack
then refuses the model.

What it recovers: a bag of tokens, not their order or counts. What limits it: the update's row space has at most
r dimensions per module (rank-r LoRA) and the inputs live in d_in dimensions, so a round with more distinct tokens
than that spans (nearly) everything and the test ranks rather than decides (the embedded model: d_in = 128, about
300 distinct tokens per client and round); AdamW divides each coordinate by its running RMS, which bends the rows
out of the inputs' span (one 20-token record on the embedded model: token AUC 1.00 from its plain gradient, 0.79
from the sign matrix that is AdamW's first step); LoRA dropout multiplies the inputs by random masks; after round
1 the update also carries the growth of B in its factor (B^T delta_t), which reweights the span, not its
directions. Round 0 has no update: NaN metrics and a note. On the global view the update is the aggregate of the
round's clients (all the server learns under secure aggregation), scored against the bag of every client whose
records the global view holds (all of them under full participation).

Threat model: a curious server holding the training's checkpoints (`Target.server`): "upload/i" (client i's
upload minus the previous global adapter) or "global" (the aggregate update). Not "client/i": a client's own
model is not what the server receives. Token vectors come from the base model (adapters off): exact where no
adapted layer precedes the module, as in every decoder whose first block opens with attention.

Ground truth: every token (prompt and response: each position feeds block 0) of the view's training records and
inserted canaries, encoded as training encodes them. Special tokens and the tokens of every record of the
attacker's public pool (the template and the domain's stock words) are left out of the vocabulary, the bag and
both rankings: the attacker knows them without any update, and they would pad both sides' hits. Metrics: the
token AUC over the vocabulary (bag vs not, bootstrap interval); precision and recall among the top k = |bag|
tokens (at that k they coincide: hits / k), with Clopper-Pearson intervals; the share of the identifiers'
tokens (names, dates, MRNs, phones, canary secrets, tokenised alone and after a space; those in the bag) in the
top k. `prior_*`: the same for a ranking by frequency in the public pool, ties by token id (BPE merge order,
itself a frequency prior), without the update: what the update adds is the difference. On an upload view
`details.other_uploads` holds the attack's metrics when the other clients' uploads of the round are read against
this client's bag (their mean): a ranking that any update of the domain gives, so the gap to it is what is
specific to this client.

Cost per view: no backward pass. Once per loaded model: two forward passes of a `probe_length`-token probe (module
detection) and the vocabulary as length-1 sequences in batches of `batch_size`, each pass stopped by an exception
at the last context-free module (embedding and norm only); kept as V x d_in floats. Per view: one SVD of a
(modules x r) x d_in matrix and a V x d_in x (modules x r) product, once more for each other client's upload on
an upload view (the control).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedleak.attacks.base import ExtractionAttack, ExtractionResult, Secrets, Target, register_attack
from fedleak.attacks.extraction.common import canary_records, run_seed
from fedleak.attacks.updates import GLOBAL, UPLOAD, server_of
from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveInt, UnitInterval
from fedleak.federated.adapters import DEFAULT
from fedleak.federated.data import Record
from fedleak.federated.model import model_device
from fedleak.federated.seeding import derive_seed, numpy_rng
from fedleak.federated.training import encode

NAME = "vocabulary"
RATES = ("precision", "recall", "identifier_token_recall")
EXAMPLES = 20  # top-ranked tokens listed in details
CHUNK = 16384  # token vectors per product: bounds the float64 temporaries for a 128k vocabulary


class _Captured(Exception):
    """Raised by a hook once every wanted module has its input: the rest of the model need not run."""


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """The modules carrying the shared adapter's LoRA factors, by name (their update keys add ".lora_A.weight")."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and DEFAULT in getattr(m, "lora_A", {})}


@torch.no_grad()
def module_inputs(model, modules: dict[str, torch.nn.Module], ids: torch.Tensor, *,
                  stop: bool = False) -> dict[str, torch.Tensor]:
    """Each module's input (float32, CPU) in a forward pass of `ids` [B, L] with the adapters off; with `stop`
    the pass ends as soon as every module has been called."""
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(_module, args):
            seen[name] = args[0].detach().float().cpu()
            if stop and len(seen) == len(modules):
                raise _Captured
        return hook

    handles = [m.register_forward_pre_hook(grab(name)) for name, m in modules.items()]
    ids = ids.to(model_device(model))
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with off:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def context_free_modules(model, ids: Sequence[int], *, tolerance: float) -> list[list[str]]:
    """The LoRA modules whose input depends on the current token alone, grouped by equal inputs.

    `ids` runs once as one sequence and once as len(ids) length-1 sequences; a module qualifies when its input at
    every position equals its input for that token alone (largest difference at most `tolerance` of the largest
    magnitude). Returns groups of module names in model order; empty when none qualifies.
    """
    modules = lora_modules(model)
    seq = torch.tensor([list(ids)])
    joint, alone = module_inputs(model, modules, seq), module_inputs(model, modules, seq.T)
    groups: list[list[str]] = []
    firsts: list[torch.Tensor] = []
    for name in modules:
        a, b = joint.get(name), alone.get(name)
        if a is None or b is None or a.dim() != 3 or a.shape[:2] != seq.shape or b.shape[:2] != seq.T.shape:
            continue  # not called, or called on a reshaped input (an MoE expert, OPT's flattened MLP)
        a, b = a[0], b[:, 0]
        if float((a - b).abs().max()) > tolerance * max(float(a.abs().max()), 1e-30):
            continue
        for group, first in zip(groups, firsts):
            if first.shape == a.shape and torch.equal(first, a):
                group.append(name)
                break
        else:
            groups.append([name])
            firsts.append(a)
    return groups


def row_basis(rows: np.ndarray, energy: float) -> np.ndarray:
    """Orthonormal basis (k x d) of the top right singular directions of `rows` holding `energy` of the squared
    singular values, within the numerical rank of float32 updates (all of those at energy 1)."""
    _, s, vh = np.linalg.svd(np.asarray(rows, dtype=np.float64), full_matrices=False)
    if not len(s) or s[0] <= 0:
        return np.zeros((0, rows.shape[1]))
    rank = int((s > s[0] * max(rows.shape) * np.finfo(np.float32).eps).sum())
    share = np.cumsum(s[:rank] ** 2) / np.sum(s[:rank] ** 2)
    return vh[:min(rank, int(np.searchsorted(share, energy - 1e-12)) + 1)]


def span_scores(vectors: np.ndarray, rows: np.ndarray, *, energy: float = 1.0,
                shared: np.ndarray | None = None) -> np.ndarray:
    """||Q P e|| / ||P e|| for each row e of `vectors` [V, d]: Q the basis of the row space of `rows` P
    (`row_basis`), P the projection removing the direction `shared` (none: identity); 0 for a vector P removes."""
    project = np.eye(vectors.shape[1])
    if shared is not None and np.linalg.norm(shared) > 0:
        u = shared / np.linalg.norm(shared)
        project -= np.outer(u, u)
    basis = row_basis(np.asarray(rows, dtype=np.float64) @ project, energy)
    out = np.zeros(len(vectors))
    for start in range(0, len(vectors), CHUNK):
        e = np.asarray(vectors[start:start + CHUNK], dtype=np.float64) @ project
        norms = np.linalg.norm(e, axis=1)
        inside = np.linalg.norm(e @ basis.T, axis=1)
        out[start:start + CHUNK] = np.divide(inside, norms, out=np.zeros_like(norms), where=norms > 1e-12)
    return out


def token_bag(records: Sequence[Record], tokenizer, *, max_length: int) -> Counter:
    """Token id -> occurrences over the records encoded as training encodes them (every position)."""
    return Counter(i for e in encode(records, tokenizer, max_length=max_length) for i in e.input_ids)


def identifier_tokens(identifiers: Sequence[str], tokenizer) -> set[int]:
    """The ids of the identifiers tokenised as they may appear in text: alone and after a space."""
    out: set[int] = set()
    for text in identifiers:
        for variant in (text, " " + text):
            out.update(tokenizer(variant, add_special_tokens=False)["input_ids"])
    return out


def rate(hits: int, n: int) -> tuple[float, float, float]:
    """hits / n with its 95% Clopper-Pearson interval (NaN when n = 0)."""
    if n == 0:
        return math.nan, math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(method="exact")
    return hits / n, float(ci.low), float(ci.high)


def ranking_metrics(scores: np.ndarray, truth: np.ndarray, identifiers: np.ndarray, *, bootstrap: int,
                    seed: int) -> dict[str, float]:
    """Token AUC (bootstrap interval; NaN without one), precision and recall at k = |bag| and the identifier tokens'
    share of the top k, each rate with its Clopper-Pearson interval. `truth`, `identifiers`: boolean masks."""
    k = int(truth.sum())
    top = np.zeros(len(scores), dtype=bool)
    top[np.argsort(-scores, kind="stable")[:k]] = True
    hits = int((top & truth).sum())
    labels = truth.astype(int)
    if 0 < k < len(labels):
        out = {"token_auc": float(roc_auc_score(labels, scores))}
        # Percentile bootstrap resampling each class on its own, so every resample has both (scipy's bootstrap
        # cannot stratify; attacks/ does not import eval/'s interval).
        if bootstrap:
            rng = np.random.default_rng(seed)
            pos, neg = scores[labels == 1], scores[labels == 0]
            y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            aucs = [roc_auc_score(y, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
                    for _ in range(bootstrap)]
            out["token_auc_low"], out["token_auc_high"] = (float(v) for v in np.percentile(aucs, [2.5, 97.5]))
        else:
            out["token_auc_low"] = out["token_auc_high"] = math.nan
    else:  # one class only: no AUC
        out = {"token_auc": math.nan, "token_auc_low": math.nan, "token_auc_high": math.nan}
    counts = {"precision": (hits, k), "recall": (hits, k),
              "identifier_token_recall": (int((top & identifiers).sum()), int(identifiers.sum()))}
    for name, (num, den) in counts.items():
        out[name], out[f"{name}_low"], out[f"{name}_high"] = rate(num, den)
    return out


def metric_names() -> list[str]:
    """Every metric a cell carries, in order (the attack's, then the prior's)."""
    own = [f"{m}{s}" for m in ("token_auc", *RATES) for s in ("", "_low", "_high")]
    return own + [f"prior_{m}" for m in own]


@register_attack(NAME)
class VocabularyAttack(ExtractionAttack):
    """vocabulary: tokens of a client's round data from the row space of its LoRA A updates (after DAGER, 2024)."""

    access = "updates"
    observers = (UPLOAD, GLOBAL)
    adaptations = ("lora",)
    adaptations_why = ("it reads the span of the updates of LoRA's A factors (low-rank), which other methods do not "
                       "train: drop it for this method")
    observers_why = ("it reads the server's record of the updates: a client's upload (upload/i) or their aggregate "
                     "(global); a client's own model is not something the server receives")

    def __init__(self, *, energy: UnitInterval = 1.0, center: bool = True, probe_length: PositiveInt = 16,
                 tolerance: UnitInterval = 1e-3, batch_size: PositiveInt = 4096, bootstrap: NonNegativeInt = 200):
        """Set the span test and its probes.

        Args:
            energy: share of the update's squared singular values whose directions make the span (1: all of them,
                up to the numerical rank); lower keeps the dominant directions only.
            center: remove the vocabulary's mean direction from the token vectors and the update's rows before the
                test (False: DAGER's plain test, in which every token shares that direction and scores high).
            probe_length: tokens of the random sequence that finds the context-free modules.
            tolerance: largest relative difference between a module's input in the sequence and for its token
                alone for the module to count as context-free (float error passes, context does not).
            batch_size: vocabulary ids per forward pass (each a length-1 sequence).
            bootstrap: resamples of the token AUC's interval (0: no interval).
        """
        self.energy = energy
        self.center = center
        self.probe_length = probe_length
        self.tolerance = tolerance
        self.batch_size = batch_size
        self.bootstrap = bootstrap

    def groups(self, target: Target) -> list[list[str]]:
        """The context-free LoRA modules of the target's model, grouped by input (found once per run and model)."""
        seed = run_seed(target, self.name)
        key = (NAME, "modules", id(target.model), self.probe_length, self.tolerance)
        cache = target.env.cache
        if key not in cache:
            method = getattr(target.env.adapter, "method", "lora")
            if method not in self.adaptations:
                raise FedleakError(f"attack {NAME}: model.adaptation = '{method}': {self.adaptations_why}")
            special = set(target.tokenizer.all_special_ids)
            pool = [i for i in range(vocabulary_size(target)) if i not in special]
            ids = numpy_rng(seed, "attack", NAME, "probe").choice(pool, size=self.probe_length)
            groups = context_free_modules(target.model, ids.tolist(), tolerance=self.tolerance)
            if not groups:
                raise FedleakError(
                    f"attack {NAME}: no LoRA module of {type(target.model).__name__} reads a token alone (positions or "
                    f"other tokens enter before every adapted layer, as GPT-2's learned positions do): the span test "
                    f"has nothing to read; run it on a rotary-position model with its first block's "
                    f"projections adapted")
            cache[key] = groups
        return cache[key]

    def token_vectors(self, target: Target, groups: list[list[str]]) -> list[np.ndarray]:
        """Per group, every vocabulary id's input vector [V, d] (float32), from length-1 sequences (once per run)."""
        key = (NAME, "vectors", id(target.model), tuple(map(tuple, groups)))
        cache = target.env.cache
        if key not in cache:
            modules = lora_modules(target.model)
            firsts = {g[0]: modules[g[0]] for g in groups}
            vocab = vocabulary_size(target)
            parts: dict[str, list[torch.Tensor]] = {name: [] for name in firsts}
            for start in range(0, vocab, self.batch_size):
                ids = torch.arange(start, min(vocab, start + self.batch_size))[:, None]
                seen = module_inputs(target.model, firsts, ids, stop=True)
                for name in firsts:
                    parts[name].append(seen[name][:, 0])
            cache[key] = [torch.cat(parts[g[0]]).numpy() for g in groups]
        return cache[key]

    def scores(self, target: Target, update: dict[str, torch.Tensor]) -> np.ndarray:
        """The span score of every vocabulary id: the mean over module groups of `span_scores`."""
        groups = self.groups(target)
        total = np.zeros(vocabulary_size(target))
        for names, vectors in zip(groups, self.token_vectors(target, groups)):
            keys = [f"{n}.lora_A.weight" for n in names]
            missing = [k for k in keys if k not in update]
            if missing:
                raise FedleakError(f"attack {NAME}: the update lacks {missing[0]}: attack the checkpoints with the "
                                   f"LoRA settings they were trained with")
            rows = np.concatenate([update[k].double().cpu().numpy() for k in keys])
            total += span_scores(vectors, rows, energy=self.energy,
                                 shared=vectors.mean(0, dtype=np.float64) if self.center else None)
        return total / len(groups)

    def run(self, target: Target, secrets: Secrets) -> ExtractionResult:
        seed = run_seed(target, self.name)
        if target.observer not in self.observers:
            raise FedleakError(f"attack {NAME}: observer {target.observer!r}: {self.observers_why}")
        if target.round < 1:
            return ExtractionResult(dict.fromkeys(metric_names(), math.nan),
                                    {"note": "round 0 is the initial adapter: there is no update to read"})
        view = GLOBAL if target.observer == GLOBAL else f"{UPLOAD}/{target.client}"
        update = server_of(target, NAME).update(target.round, view)
        score = self.scores(target, update)

        env, tokenizer, vocab = target.env, target.tokenizer, len(score)
        public = encode(env.public, tokenizer, max_length=env.max_length)
        # Known without any update: special tokens and what every public record holds (the template).
        known = set(tokenizer.all_special_ids) | (set.intersection(*(set(e.input_ids) for e in public)) if public
                                                  else set())
        keep = np.array([i not in known for i in range(vocab)])
        bag = token_bag(list(secrets.records) + canary_records(secrets), tokenizer, max_length=env.max_length)
        truth = np.array([i in bag for i in range(vocab)])
        idents = identifier_tokens(secrets.identifiers, tokenizer)
        ident = np.array([i in idents and i in bag for i in range(vocab)])
        counts = Counter(i for e in public for i in e.input_ids)
        # The prior: public frequency; ties (tokens the pool never shows, most of them) go to the lower id.
        prior = np.array([counts.get(i, 0) for i in range(vocab)], dtype=float) + 0.5 * (1 - np.arange(vocab) / vocab)

        boot = derive_seed(seed, "attack", NAME, "bootstrap", view, target.round)
        metrics = ranking_metrics(score[keep], truth[keep], ident[keep], bootstrap=self.bootstrap, seed=boot)
        base = ranking_metrics(prior[keep], truth[keep], ident[keep], bootstrap=self.bootstrap, seed=boot)
        metrics.update({f"prior_{k}": v for k, v in base.items()})
        order = np.flatnonzero(keep)[np.argsort(-score[keep], kind="stable")]
        details = {
            "view": view, "modules": self.groups(target), "vocabulary": int(keep.sum()), "bag": int(truth[keep].sum()),
            "identifier_tokens": int(ident[keep].sum()), "excluded": [tokenizer.decode([i]) for i in sorted(known)],
            "top_tokens": [{"token": tokenizer.decode([int(i)]), "in_bag": bool(truth[i])} for i in order[:EXAMPLES]],
        }
        if target.observer == UPLOAD:
            details["other_uploads"] = self._control(target, ident[keep], truth[keep], keep)
        return ExtractionResult(metrics, details)

    def _control(self, target: Target, ident: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> dict:
        """The same ranking read from the other clients' uploads of the round, scored against this client's bag
        (means over them): what an update of the same domain gives without holding this client's data."""
        server = server_of(target, NAME)
        others = [c for c in server.clients(target.round) if c != target.client]
        found = [ranking_metrics(self.scores(target, server.update(target.round, f"{UPLOAD}/{c}"))[keep], truth, ident,
                                 bootstrap=0, seed=0) for c in others]
        means = {n: float(np.mean([f[n] for f in found])) if found else math.nan for n in ("token_auc", *RATES)}
        return {"clients": others, **{n: None if math.isnan(v) else v for n, v in means.items()}}  # JSON: no NaN


def vocabulary_size(target: Target) -> int:
    """Token ids with an embedding row the tokenizer can produce: min(tokenizer size, embedding rows)."""
    return min(len(target.tokenizer), target.model.get_input_embeddings().num_embeddings)
