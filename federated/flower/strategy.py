"""fedleak's server side as a Flower strategy (`flwr.serverapp.strategy.Strategy`): Flower's `start` drives
the rounds, and each round's sampling and aggregation are fedleak's.

`configure_train` samples with the server's seeded sampler and sends each sampled client's node the global
adapter; `aggregate_train` hands the replies to `ServerSide.finish_round` (model poisoning, refusal of
non-finite uploads, the defense's hooks and rule, checkpoints). fedleak's rules run here rather than Flower's
FedAvg, FedMedian or Krum strategies so that both engines run one implementation of each rule and write the
same adapters (the rules' tests use Flower's numpy aggregation functions as oracles). A node that errs, or
does not reply within the timeout, is recorded in the round's `failed`; a round in which every sampled client
failed stops the run.
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedleak.common.errors import FedleakError
from fedleak.federated.flower.records import read_result, to_arrays
from fedleak.federated.loop import ServerSide
from fedleak.federated.rounds import ClientResult

log = logging.getLogger("fedleak.federated.flower")


def error_reason(reason: str) -> str:
    """Flower's error reason (a remote traceback) cut to its last meaningful line."""
    lines = [line.strip() for line in reason.splitlines() if line.strip() and not set(line.strip()) <= set("^~")]
    return " ".join((lines[-1] if lines else reason).split())[:300]


def replying_node(reply, sent) -> int:
    """The node a reply speaks for. An error the SuperLink writes for a node it declared offline comes from
    the SuperLink itself (node id 1): its `reply_to_message_id` names the message, whose destination is the node."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
        return reply.metadata.src_node_id
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


class FedleakStrategy(Strategy):
    """fedleak's seeded sampling and server side for Flower's round loop.

    Args:
        server: the training's server side (global adapter, sampler, defense, checkpoints, history).
        node_of: {fedleak client: Flower node id}.
        spec_text: the training spec every train message carries (JSON).
        round_timeout: seconds a round waits for replies (None: all); named in a late client's failure.
    """

    def __init__(self, server: ServerSide, node_of: dict[int, int], spec_text: str, round_timeout: float | None):
        self.server, self.node_of, self.spec_text, self.round_timeout = server, node_of, spec_text, round_timeout
        self.client_of = {node: client for client, node in node_of.items()}
        self.sampled: list[int] = []
        self.sent: list = []
        self.started = 0.0

    def summary(self) -> None:
        log.debug("fedleak strategy: %s, %d clients", self.server.setup.label, self.server.num_clients)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        """One train message per sampled client, with the server's global adapter (not `arrays`, its copy)."""
        self.started, self.sampled = time.perf_counter(), self.server.sample()
        content, dtypes = RecordDict(), {}
        if self.server.global_state is not None:
            content["global"], dtypes = to_arrays(self.server.global_state)
        # Kept: the grid gives each its message id when it sends it, and error replies name only that id.
        self.sent = [Message(RecordDict({**content, "config": ConfigRecord(
                        {"spec": self.spec_text, "client": c, "round": server_round, "dtypes": json.dumps(dtypes)})}),
                             message_type="train", dst_node_id=self.node_of[c]) for c in self.sampled]
        return self.sent

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's results through `ServerSide.finish_round`; the new global adapter and the mean loss."""
        results: dict[int, ClientResult] = {}
        privacy: dict[str, dict] = {}
        failed: dict[int, str] = {}
        for reply in replies:
            client = self.client_of.get(replying_node(reply, self.sent))
            if client is None:
                raise FedleakError(f"round {server_round}: a reply from Flower node {reply.metadata.src_node_id}, "
                                   f"which holds no client of this training: {error_reason(reply.error.reason) if reply.has_error() else 'unexpected'}")
            if reply.has_error():  # the node or its ClientApp runtime failed
                failed[client] = error_reason(reply.error.reason)
            elif "fedleak_error" in reply.content:
                raise FedleakError(f"client {client}: {reply.content['fedleak_error']['message']}")
            elif "client_error" in reply.content:
                failed[client] = reply.content["client_error"]["message"]
            else:
                results[client], accounting = read_result(reply.content)
                if accounting is not None:
                    privacy[str(client)] = accounting
        for client in self.sampled:
            if client not in results and client not in failed:
                failed[client] = f"no reply within engine.round_timeout = {self.round_timeout} s"
        for client, reason in sorted(failed.items()):
            log.warning("%s round %d: client %d failed (%s); the round goes on without it",
                        self.server.setup.label or "training", server_round, client, reason)
        if failed and not results:
            raise FedleakError(f"round {server_round}: every sampled client failed (client {min(failed)}: "
                               f"{failed[min(failed)]})")
        entry = self.server.finish_round(server_round, self.sampled, results, privacy, self.started, failed)
        arrays = to_arrays(self.server.global_state)[0] if self.server.global_state is not None else None
        loss = entry["mean_train_loss"]
        return arrays, (MetricRecord({"mean_train_loss": float(loss)}) if loss is not None else None)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        return []  # fedleak evaluates the checkpoints after training

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        return None
