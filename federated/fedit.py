"""FEDIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction Tuning"):
each sampled client trains the shared LoRA adapter on its own instructions, starting from the
global adapter; the server aggregates the uploads (FedAvg unless a defense changes it).

Views: `global` is the aggregate, `upload/i` and `client/i` are both client i's fine-tuned adapter
(in FEDIT the model a client ends a round with is the one it uploads).
"""

from __future__ import annotations

from fedleak.federated.adapters import DEFAULT, AdapterState, get_adapter_state, set_adapter_state
from fedleak.federated.rounds import Algorithm, ClientContext, ClientResult, register_algorithm


def train_on_own_data(ctx: ClientContext, start: AdapterState) -> tuple[AdapterState, dict]:
    """Train from `start` on the client's records, as it shares them (a malicious client's poisoned)."""
    set_adapter_state(ctx.model, start)
    records = ctx.poison_data(ctx.records)
    metrics = ctx.train(ctx.examples if records is ctx.records else ctx.encode(records))
    return get_adapter_state(ctx.model), metrics


@register_algorithm("fedit")
class FedIT(Algorithm):
    """FEDIT: clients fine-tune the shared LoRA adapter on their data, the server averages (Zhang et al. 2024)."""

    def client_round(self, ctx: ClientContext) -> ClientResult:
        state, metrics = train_on_own_data(ctx, ctx.global_state)
        return ClientResult(upload=state, num_examples=len(ctx.examples), view={DEFAULT: state}, metrics=metrics)
