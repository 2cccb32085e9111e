"""Secure aggregation on Flower: the SecAgg+ protocol (Bell et al. 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"), through Flower's own `SecAggPlusWorkflow` and `secaggplus_mod`.

The server learns only the weighted mean of the round's uploads (weights: num_examples, as FedAvg), never
an upload: each client quantises its adapter (clipped to +-clipping_range, quantization_range levels),
masks it with pairwise and private masks, and the masks cancel in the sum. fedleak's server side then
runs the defense's `after_aggregation` on that mean and checkpoints it; there is no `upload` view. Flower
1.42 ships SecAgg+ only as a workflow of its legacy strategy API, so a small legacy strategy hands the
workflow fedleak's sampled clients and collects their metrics (training loss, DP-SGD accounting).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from fedleak.common.errors import FedleakError
from fedleak.federated.loop import ServerSide
from fedleak.federated.rounds import ClientResult

RESULT_KEY = "fedleak"  # the client's result (JSON) in the legacy FitRes metrics


def secagg_mod(msg, context, call_next):
    """Flower's `secaggplus_mod` for the protocol's messages; any other message passes through unchanged."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_fitins(content) -> bool:
    return "fitins.parameters" in content.array_records


def read_fitins(content) -> tuple[dict, dict]:
    """(config, global adapter state) of a legacy FitIns the SecAgg+ workflow forwards."""
    from flwr.compat.common import recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    names = json.loads(fitins.config["names"])
    arrays = parameters_to_ndarrays(fitins.parameters)
    return dict(fitins.config), {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)}


def fitres_content(result: ClientResult, privacy: dict | None, names: list[str]):
    """The legacy FitRes the mod masks: the upload as float arrays in `names` order, the rest as JSON metrics."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedleak.federated.flower.records import dumps

    if result.upload is None:
        raise FedleakError("under SecAgg+ every sampled client must upload (the protocol sums a vector from each): "
                           "this algorithm uploaded nothing this round; use secure aggregation with FEDIT")
    arrays = [result.upload[n].detach().float().cpu().numpy() for n in names]
    meta = dumps({"metrics": result.metrics, "artifacts": result.artifacts, "privacy": privacy}, "the client's result")
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                    num_examples=result.num_examples, metrics={RESULT_KEY: meta})
    return compat.fitres_to_recorddict(fitres, keep_input=True)


class _Node:
    """What the legacy workflow needs of a client proxy: its node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id


def _strategy(server: ServerSide, rnd: int, sampled: list[int], node_of: dict[int, int], spec_text: str,
              names: list[str], collected: dict):
    from flwr.common import FitIns
    from flwr.server.strategy import Strategy

    class Sampled(Strategy):
        """fedleak's sampled clients for the workflow; the secure mean comes back to fedleak's server side."""

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            config = {"spec": spec_text, "round": rnd, "names": json.dumps(names)}
            return [(_Node(node_of[c]), FitIns(parameters, {**config, "client": c})) for c in sampled]

        def aggregate_fit(self, server_round, results, failures):
            collected["results"], collected["failures"] = results, failures
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return Sampled()


def check_clipping(state: dict[str, torch.Tensor], *, clipping_range: float, rnd: int) -> None:
    """FedleakError when the round's starting adapter already holds values SecAgg+ would clip (the uploads start
    from it): a prefix initialised from real activations (`model.prefix_tuning.init`) can exceed the default
    range, which would otherwise change the aggregate silently."""
    largest = max((float(t.detach().abs().max()) for t in state.values() if t.numel()), default=0.0)
    if largest > clipping_range:
        raise FedleakError(f"round {rnd}: the global adapter holds values up to {largest:.3g}, beyond "
                           f"engine.secagg_clipping_range = {clipping_range:g}, and SecAgg+ would clip the uploads: "
                           f"raise engine.secagg_clipping_range to {2 * largest:.3g} or more")


def secagg_round(grid, server: ServerSide, rnd: int, node_of: dict[int, int], spec_text: str, *,
                 timeout: float | None, clipping_range: float, quantization_range: int, max_weight: float) -> dict:
    """One round under SecAgg+: sample, run the protocol with the sampled nodes, and finish the round on the
    secure weighted mean. Returns the round's history entry."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from fedleak.federated.flower.records import loads, to_arrays

    start = time.perf_counter()
    check_clipping(server.global_state, clipping_range=clipping_range, rnd=rnd)
    sampled = server.sample()
    names = list(server.global_state)
    collected: dict = {}
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=_strategy(server, rnd, sampled, node_of, spec_text, names, collected))
    context.state.array_records[MAIN_PARAMS_RECORD] = to_arrays(
        {n: server.global_state[n].float() for n in names})[0]
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    SecAggPlusWorkflow(num_shares=len(sampled), reconstruction_threshold=max(2, -(-2 * len(sampled) // 3)),
                       clipping_range=clipping_range, quantization_range=quantization_range, max_weight=max_weight,
                       timeout=timeout)(grid, context)
    client_of = {node: client for client, node in node_of.items()}
    results: dict[int, ClientResult] = {}
    privacy: dict[str, dict] = {}
    mean = None
    for proxy, fitres in collected.get("results", []):
        client = client_of[proxy.node_id]
        meta = loads(str(fitres.metrics[RESULT_KEY]))
        results[client] = ClientResult(upload=None, num_examples=fitres.num_examples, view={},
                                       metrics=meta["metrics"], artifacts=meta["artifacts"])
        if meta["privacy"] is not None:
            privacy[str(client)] = meta["privacy"]
        if mean is None:  # every result carries the same secure mean
            arrays = parameters_to_ndarrays(fitres.parameters)
            mean = {n: torch.from_numpy(np.array(a, dtype=np.float32)).to(server.global_state[n].dtype)
                    for n, a in zip(names, arrays)}
    failed = {c: "no masked upload (dropped, crashed or late): SecAgg+ recovered the sum without it"
              for c in sampled if c not in results}
    if not results:
        raise FedleakError(f"round {rnd}: SecAgg+ aggregated no client (fewer than its reconstruction threshold "
                           f"answered): see the log")
    return server.finish_round(rnd, sampled, results, privacy, start, failed, secure_mean=mean)
