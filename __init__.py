"""fedleak: privacy attacks and defenses for federated instruction tuning of LLMs."""

__version__ = "0.1.0"
