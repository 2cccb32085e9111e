"""The round loop, as a client side and a server side that exchange only adapters and metrics.

`ClientSide.update` is everything a client does in one round (train through the defense's client hook,
build its upload and its own view); `ServerSide` samples the clients, receives their results, applies
the adversary's model poisoning, refuses non-finite uploads, runs the defense's aggregation hooks and
checkpoints every observer's view. `run_rounds` drives both in one process; an engine that runs
clients elsewhere (one process or machine per client) calls the same two sides, so no algorithm,
defense or poisoning code exists twice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedleak.common.errors import FedleakError
from fedleak.common.io import atomic_write_text, sha256_bytes
from fedleak.federated import checkpoint
from fedleak.federated.adapters import (DEFAULT, AdapterState, activate, add_peft_adapter, get_adapter_state,
                                        set_adapter_state, trainable_adapter)
from fedleak.federated.aggregation import nonfinite_reason
from fedleak.federated.hooks import ClientUpdate, RoundInfo, ServerModel
from fedleak.federated.methods import with_method_lr
from fedleak.federated.rounds import GLOBAL, Algorithm, ClientContext, ClientResult, TrainingRun, TrainingSetup
from fedleak.federated.seeding import derive_seed, numpy_rng, torch_generator
from fedleak.federated.training import encode, train_adapter

log = logging.getLogger("fedleak.federated.rounds")


def _round_files(global_state: AdapterState | None, results: dict[int, ClientResult], record_uploads: bool):
    """File stems and views for one round, storing each distinct tensor dict once."""
    files: dict[str, AdapterState] = {}
    stem_of: dict[int, str] = {}

    def stem(state: AdapterState, name: str) -> str:
        if id(state) not in stem_of:
            stem_of[id(state)] = name
            files[name] = state
        return stem_of[id(state)]

    views: dict[str, dict[str, str]] = {}
    if global_state is not None:
        views["global"] = {DEFAULT: stem(global_state, "global")}
    for client, result in sorted(results.items()):
        if result.upload is not None and record_uploads:
            views[checkpoint.view_key("upload", client)] = {DEFAULT: stem(result.upload, f"upload-client-{client:02d}")}
        if result.view:
            views[checkpoint.view_key("client", client)] = {
                adapter: (stem(global_state, "global") if state is GLOBAL else stem(state, f"{adapter}-client-{client:02d}"))
                for adapter, state in result.view.items()}
    return files, views


def _write_artifacts(folder: Path, results: dict[int, ClientResult]) -> dict:
    entries = {}
    for client, result in sorted(results.items()):
        for name, rows in result.artifacts.items():
            path = folder / f"{name}-client-{client:02d}.jsonl"
            text = "".join(json.dumps(row) + "\n" for row in rows)
            atomic_write_text(path, text)
            entries[path.stem] = {"path": path.name, "sha256": sha256_bytes(text.encode()), "records": len(rows)}
    return entries


class ServerTraining(ServerModel):
    """`ServerModel` on the clients' peft model (the same seeded adapters): trains the default adapter server-side,
    after the round's clients have trained (each client loads its starting adapter itself)."""

    def __init__(self, model, setup: TrainingSetup):
        self.model, self.setup, self.seed = model, setup, setup.seed

    def train(self, records, *, start, round, purpose):
        fed = self.setup.federation
        examples = encode(records, self.setup.tokenizer, max_length=fed.max_length,
                          response_only=fed.response_only_loss)
        # The clients' activation and trainable flags come back afterwards (FEDPIT's rest state is not FEDIT's),
        # and the global RNG too: the server's training draws nothing the clients' runs would have drawn.
        active, trainable = list(self.model.active_adapters), trainable_adapter(self.model)
        with torch.random.fork_rng(devices=[]):
            activate(self.model, [DEFAULT], trainable=DEFAULT)
            set_adapter_state(self.model, start)
            torch.manual_seed(derive_seed(self.setup.seed, "server-train", round, purpose))  # dropout
            metrics = train_adapter(self.model, examples, with_method_lr(fed.train_settings(), self.setup.adapter),
                                    pad_id=self.setup.tokenizer.pad_token_id,
                                    generator=torch_generator(self.setup.seed, "server-batches", round, purpose))
            state = get_adapter_state(self.model)
        activate(self.model, active, trainable=trainable)
        return state, metrics


class ClientSide:
    """The clients' half of a training: the peft model (every adapter the algorithm uses, seeded the same
    way on every side), each client's records and encoded examples, and each client's memory across rounds.

    Args:
        setup: the training (base model, tokenizer, data, settings, hooks, adversary, seed).
        algorithm: what a client does in a round (`Algorithm.client_round`).
        clients: the client indices whose examples are encoded now (default: all of `algorithm.client_data`);
            another client's are encoded when it is first updated (an engine serving clients in other processes).
    """

    def __init__(self, setup: TrainingSetup, algorithm: Algorithm, clients: list[int] | None = None):
        self.setup, self.algorithm = setup, algorithm
        self.records = algorithm.client_data(setup.data)
        self.model = add_peft_adapter(setup.base_model, setup.adapter, seed=derive_seed(setup.seed, "lora-init"))
        algorithm.prepare(self.model, setup)
        self.initial = get_adapter_state(self.model)
        served = range(len(self.records)) if clients is None else clients
        self.trained: dict[int, tuple] = {}  # client -> (records it trains on, facts about them, encoded examples)
        for c in served:
            self._prepare(c)
        self.memory: dict[int, dict] = {c: {} for c in served}

    def _prepare(self, client: int) -> tuple:
        """The client's records after the defense's `client_records` (sanitisation), their facts and examples."""
        if client not in self.trained:
            records, facts = self.setup.hooks.client_records(list(self.records[client]), client=client)
            fed = self.setup.federation
            self.trained[client] = (records, facts, encode(records, self.setup.tokenizer, max_length=fed.max_length,
                                                           response_only=fed.response_only_loss))
        return self.trained[client]

    @property
    def num_clients(self) -> int:
        return len(self.records)

    def server_model(self) -> ServerTraining:
        """The server's model for defenses that train server-side: this side's peft model (same seeded adapters)."""
        return ServerTraining(self.model, self.setup)

    def update(self, client: int, rnd: int, global_state: AdapterState | None) -> tuple[ClientResult, dict | None]:
        """What `client` does in round `rnd` given the adapter it received: (its result, its cumulative
        privacy accounting or None).

        Raises:
            FedleakError: the algorithm cannot run the round, or ignores the data poisoning a malicious
                client must apply (`ClientContext.poison_data`).
        """
        setup = self.setup
        records, facts, examples = self._prepare(client)
        ctx = ClientContext(client=client, round=rnd, model=self.model, records=records,
                            examples=examples, global_state=global_state, initial_state=self.initial,
                            memory=self.memory.setdefault(client, {}), setup=setup,
                            plan=self.algorithm.training_plan(len(records)))
        result = self.algorithm.client_round(ctx)
        if facts:
            result.metrics["sanitisation"] = facts
        if setup.adversary.poisons_data and setup.adversary.acts(client, rnd) and not ctx.data_poisoned:
            raise FedleakError(f"algorithm {self.algorithm.name!r} does not support data poisoning: its client_round "
                               f"must pass the records its upload trains on through ctx.poison_data(...)")
        return result, ctx.privacy


class ServerSide:
    """The server's half: client sampling, the adversary's model poisoning (an omniscient attacker sees
    the round's uploads), refusal of non-finite uploads, the defense's aggregation hooks, checkpoints
    and the round history. Writes round 0 (the initial adapter) when created.

    Args:
        setup: the training.
        algorithm: whether a server aggregates, whose uploads it records, whose data the global holds.
        num_clients: the clients it samples from.
        initial: the seeded initial adapter (the global adapter before round 1).
        server_model: the model a defense that trains server-side uses (`RoundInfo.server`); None: the server has
            none, and such a defense refuses to run.
    """

    def __init__(self, setup: TrainingSetup, algorithm: Algorithm, *, num_clients: int, initial: AdapterState,
                 server_model: ServerModel | None = None):
        self.setup, self.algorithm, self.num_clients = setup, algorithm, num_clients
        self.server_model = server_model
        self.global_state = initial if algorithm.has_server else None
        files, views = _round_files(self.global_state, {}, False)
        checkpoint.write_round(setup.out_dir, 0, files=files, views=views, num_examples={},
                               config_hash=setup.config_hash)
        fed = setup.federation
        self.per_round = max(1, round(fed.client_fraction * num_clients))
        self.sampler = numpy_rng(setup.seed, "client-sampling")
        self.history: list[dict] = []
        self.contributors: set[int] = set()

    def sample(self) -> list[int]:
        """The next round's clients (the seeded sampler's next draw, sorted)."""
        return sorted(int(c) for c in self.sampler.choice(self.num_clients, size=self.per_round, replace=False))

    def finish_round(self, rnd: int, sampled: list[int], results: dict[int, ClientResult],
                     privacy: dict[str, dict], seconds_from: float, failed: dict[int, str] | None = None, *,
                     secure_mean: AdapterState | None = None) -> dict:
        """Aggregate round `rnd`'s results into the global adapter, checkpoint every view, append and return
        the round's history entry.

        `failed` names the sampled clients that sent no result (crashed, timed out, dropped) with the reason:
        the round completes with the others and the history's `failed` records them. `secure_mean` is the
        weighted mean of the uploads a secure-aggregation protocol computed (the results then carry no
        upload): only the defense's `after_aggregation` runs on it.

        A NaN or inf upload is refused before any defense hook sees it (`refused` names the client and the
        tensor); a round with nothing to aggregate, or whose aggregate is not finite, keeps the previous
        global adapter (`global_unchanged`)."""
        setup, algorithm = self.setup, self.algorithm
        results = dict(sorted(results.items()))  # client order, however they arrived: the rules' float order
        info = RoundInfo(round=rnd, clients=sampled, num_clients_total=self.num_clients,
                         generator=torch_generator(setup.seed, "server", rnd), start=self.global_state,
                         server=self.server_model)
        updates = [ClientUpdate(client=c, state=r.upload, num_examples=r.num_examples)
                   for c, r in results.items() if r.upload is not None]
        if secure_mean is not None:
            self._aggregate(secure_mean, sorted(results), rnd, info)
        elif algorithm.has_server and not updates:
            info.metrics["aggregated"] = []  # no upload: the global adapter holds nobody's data from this round
        elif algorithm.has_server:
            updates = self._aggregate_uploads(updates, results, rnd, info)
        folder = checkpoint.round_dir(setup.out_dir, rnd)
        artifacts = _write_artifacts(folder, results)
        files, views = _round_files(self.global_state, results,
                                    algorithm.record_uploads and not setup.hooks.hides_uploads)
        checkpoint.write_round(setup.out_dir, rnd, files=files, views=views,
                               num_examples={c: r.num_examples for c, r in results.items()} if secure_mean is not None
                               else {u.client: u.num_examples for u in updates},
                               config_hash=setup.config_hash, extra={"clients": sampled, "data": artifacts})
        losses = [r.metrics["loss_last_quarter"] for r in results.values() if "loss_last_quarter" in r.metrics]
        sent = ({str(c): sum(t.numel() * t.element_size() for t in secure_mean.values()) for c in results}
                if secure_mean is not None  # a masked vector of the adapter's size (the server never sees it unmasked)
                else {str(u.client): sum(t.numel() * t.element_size() for t in u.state.values()) for u in updates})
        entry = {"round": rnd, "clients": sampled,
                 "uploads": [int(c) for c in sent],
                 # what each client sent: the upload's tensors as the server received them
                 "upload_bytes": sent,
                 "seconds": time.perf_counter() - seconds_from,
                 "client_metrics": {str(c): r.metrics for c, r in results.items()},
                 "mean_train_loss": sum(losses) / len(losses) if losses else None,
                 **({"client_privacy": dict(sorted(privacy.items(), key=lambda kv: int(kv[0])))} if privacy else {}),
                 **({"failed": {str(c): r for c, r in sorted(failed.items())}} if failed else {}), **info.metrics}
        self.history.append(entry)
        return entry

    def _aggregate_uploads(self, updates: list[ClientUpdate], results: dict[int, ClientResult], rnd: int,
                           info: RoundInfo) -> list[ClientUpdate]:
        """Model poisoning, refusal of non-finite uploads, the defense's hooks; returns the uploads as received."""
        setup, label = self.setup, self.setup.label or "training"
        updates = setup.adversary.poison_updates(updates, global_state=self.global_state, info=info)
        for u in updates:  # the upload view is what the server received
            results[u.client].upload = u.state
        # A NaN or inf coordinate would spread through every rule into the global adapter: refuse it.
        refused = {str(u.client): f"non-finite upload ({reason})" for u in updates
                   if (reason := nonfinite_reason(u.state)) is not None}
        for client, reason in refused.items():
            log.warning("%s round %d: refused client %s's %s", label, rnd, client, reason)
        accepted = [u for u in updates if str(u.client) not in refused]
        if refused:
            info.metrics["refused"] = refused
        received = setup.hooks.before_aggregation(accepted, global_state=self.global_state, info=info) if accepted else []
        if received:
            self._aggregate(setup.hooks.aggregate(received, info=info), [u.client for u in received], rnd, info)
        else:
            info.metrics["global_unchanged"] = True
            info.metrics["aggregated"] = []
        return updates

    def _aggregate(self, aggregate: AdapterState, clients: list[int], rnd: int, info: RoundInfo) -> None:
        """The defense's after_aggregation on the round's aggregate of `clients`' uploads; the new global adapter
        unless it is not finite."""
        setup, label = self.setup, self.setup.label or "training"
        new_state = setup.hooks.after_aggregation(aggregate, previous=self.global_state, info=info)
        if (reason := nonfinite_reason(new_state)) is not None:
            log.warning("%s round %d: the aggregate has %s: the global adapter stays as it was", label, rnd, reason)
            info.metrics["aggregate_refused"] = f"non-finite aggregate ({reason})"
            info.metrics["global_unchanged"] = True  # the clients keep the previous global adapter
            info.metrics["aggregated"] = []
            return
        self.global_state = new_state
        # Whose data entered the global adapter: what the rule received, less what it excluded (Krum's
        # unselected uploads); the global view's members are scored against these.
        aggregated = sorted(set(clients) - set(info.metrics.get("excluded_clients", ())))
        self.contributors |= set(aggregated)
        info.metrics["aggregated"] = aggregated


def run_rounds(setup: TrainingSetup, algorithm: Algorithm) -> TrainingRun:
    """Train in this process, both sides in turn, writing one checkpoint folder per round (round 0 = the
    initial adapter); see `ServerSide.finish_round` for refused uploads and unchanged rounds."""
    clients = ClientSide(setup, algorithm)
    server = ServerSide(setup, algorithm, num_clients=clients.num_clients, initial=clients.initial,
                        server_model=clients.server_model())
    start = time.perf_counter()
    rounds_bar = tqdm(range(1, setup.federation.rounds + 1), desc=f"{setup.label} rounds".strip(), unit="round",
                      disable=not setup.progress, leave=False)
    for rnd in rounds_bar:
        round_start = time.perf_counter()
        sampled = server.sample()
        results: dict[int, ClientResult] = {}
        privacy: dict[str, dict] = {}  # each private client's accounting (DP-SGD), whatever its metrics' nesting
        for client in tqdm(sampled, desc="clients", unit="client", disable=not setup.progress, leave=False):
            results[client], accounting = clients.update(client, rnd, server.global_state)
            if accounting is not None:
                privacy[str(client)] = accounting
        entry = server.finish_round(rnd, sampled, results, privacy, round_start)
        if entry["mean_train_loss"] is not None:
            rounds_bar.set_postfix(loss=f"{entry['mean_train_loss']:.3f}")
    return TrainingRun(model=clients.model, history=server.history, train_seconds=time.perf_counter() - start,
                       final_round=setup.federation.rounds, training_dir=Path(setup.out_dir),
                       global_members=algorithm.global_members(setup.data, server.contributors))
