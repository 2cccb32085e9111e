"""Server-side alignment (Ye, Chai, Liu, Yang, Wang and Chen 2024, "Emerging Safety Attack and Defense in Federated
Instruction Tuning of Large Language Models", arXiv 2406.10630, the post-hoc defense).

Against a safety attack the server, which holds no client data, fine-tunes the aggregated global adapter on
aligned data of its own: harmful requests answered with refusals, beside benign instructions so that helpfulness
is kept. The paper fine-tunes once, after the last round; here the server does it after every round's aggregation
(the checkpointed global model of each round, the final one included, is the realigned one, and the clients start
the next round from it). The server's training is an honest client's (the federation's local epochs, batch size,
learning rate; `ServerModel.train`), on the embedded bank's harmful requests (`federated/safety.py`, training
part; never a measured one) and the embedded generator's public records (no patient).

What it costs: one client training per round on the server, and whatever the alignment data pulls the model away
from the clients' task (the utility columns show it).
"""

from __future__ import annotations

from fedleak.common.errors import FedleakError
from fedleak.common.params import NonNegativeInt, PositiveInt
from fedleak.defenses.base import Defense, register_defense
from fedleak.federated.adapters import AdapterState
from fedleak.federated.data import Record, generate_records
from fedleak.federated.hooks import RoundInfo
from fedleak.federated.safety import safety_records


@register_defense("server_align")
class ServerAlign(Defense):
    """Server-side alignment: the aggregate fine-tuned on refusals and benign records each round (Ye et al. 2024)."""

    def __init__(self, *, records: PositiveInt = 20, benign_records: NonNegativeInt = 20):
        """Set the server's aligned data.

        Args:
            records: harmful requests answered with refusals (the server's own draw from the bank's training part).
            benign_records: public instructions with their answers beside them (the embedded generator's, no
                patient), so the fine-tune does not teach the model to refuse everything; 0 = refusals only.
        """
        self.records, self.benign_records = records, benign_records

    def aligned_data(self, seed: int) -> list[Record]:
        """The server's aligned records for a run with this seed (the same every round)."""
        benign = (generate_records(self.benign_records, seed=seed, purpose="server-align-benign", private=False)
                  if self.benign_records else [])
        return safety_records(self.records, seed=seed, purpose="server-align", answer="refusal") + benign

    def after_aggregation(self, state: AdapterState, *, previous: AdapterState, info: RoundInfo) -> AdapterState:
        if info.server is None:
            raise FedleakError("server_align fine-tunes the aggregate on the server each round, and this round loop "
                               "gives the server no model: build its ServerSide with "
                               "server_model=ClientSide.server_model()")
        aligned, metrics = info.server.train(self.aligned_data(info.server.seed), start=state, round=info.round,
                                             purpose="server-align")
        info.metrics["server_align_loss"] = metrics["loss_last_quarter"]
        return aligned
