"""No defense: plain FEDIT with FedAvg."""

from fedleak.defenses.base import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    """No defense: every hook is the identity (plain FedAvg of the client adapters)."""
