"""Baselines of the FEDPIT paper: centralised (CENIT) and local-only (LOCIT, LOCIT+SA) tuning.

- `cenit`: one trainer holds the union of all clients' data and runs the same number of epochs
  per round as a FEDIT client (the paper's ceiling). Its only view is `global`.
- `locit`: each client trains alone on its own data; nothing is exchanged, there is no server.
  Views: `client/i`.
- `locit_sa`: like `locit`, on its own data plus data it self-generates with its own model
  (the paper's LOCIT+SA), with the same generation settings as `fedpit`. Under DP-SGD its budget is
  planned for `synthetic_per_round` synthetic records a round; its synthetic records come from its
  real ones (in-context demonstrations, no noise), which the accountant does not bound.
"""

from __future__ import annotations

from fedleak.federated.adapters import DEFAULT, get_adapter_state, set_adapter_state
from fedleak.federated.data import FederatedData, Record
from fedleak.federated.fedit import train_on_own_data
from fedleak.federated.fedpit import SelfGenerating
from fedleak.federated.rounds import Algorithm, ClientContext, ClientResult, register_algorithm


@register_algorithm("cenit")
class CenIT(Algorithm):
    """CENIT: centralised instruction tuning on the union of all clients' data (the ceiling)."""

    federated = False
    record_uploads = False

    def client_data(self, data: FederatedData) -> list[list[Record]]:
        return [[r for client in data.clients for r in client]]

    def global_clients(self, data: FederatedData, contributors: set[int]) -> set[int]:
        return set(range(len(data.clients)))  # one pooled "client" holds everyone's data

    def client_round(self, ctx: ClientContext) -> ClientResult:
        state, metrics = train_on_own_data(ctx, ctx.global_state)
        return ClientResult(upload=state, num_examples=len(ctx.examples), view={}, metrics=metrics)


@register_algorithm("locit")
class LocIT(Algorithm):
    """LOCIT: every client tunes its own adapter on its own data alone; nothing is exchanged."""

    has_server = False
    federated = False

    def client_round(self, ctx: ClientContext) -> ClientResult:
        state, metrics = train_on_own_data(ctx, ctx.memory.get("adapter", ctx.initial_state))
        ctx.memory["adapter"] = state
        return ClientResult(upload=None, num_examples=len(ctx.examples), view={DEFAULT: state}, metrics=metrics)


@register_algorithm("locit_sa")
class LocITSA(SelfGenerating):
    """LOCIT+SA: local-only tuning on own data plus data self-generated with the client's own model."""

    has_server = False
    federated = False

    def training_plan(self, records: int) -> tuple[tuple[str, int], ...]:
        """One training a round, on the client's records plus `synthetic_per_round` synthetic ones.

        Args:
            records: the client's own records.

        Returns:
            ((the adapter, records + synthetic_per_round),).
        """
        return ((DEFAULT, records + self.synthetic_per_round),)

    def client_round(self, ctx: ClientContext) -> ClientResult:
        set_adapter_state(ctx.model, ctx.memory.get("adapter", ctx.initial_state))
        synthetic, gen_stats = self.synthetic(ctx)
        metrics = ctx.train(ctx.examples + ctx.encode(synthetic))
        state = get_adapter_state(ctx.model)
        ctx.memory["adapter"] = state
        return ClientResult(upload=None, num_examples=len(ctx.examples), view={DEFAULT: state},
                            metrics={**metrics, "selfgen": gen_stats, "synthetic": len(synthetic)},
                            artifacts={"synthetic": [r.to_alpaca() for r in synthetic]})
