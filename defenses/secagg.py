"""Secure aggregation view (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), simulated.

With secure aggregation the server learns only the sum of the uploads, so the `upload` observer
view does not exist: fedleak writes no per-client upload files. The sum itself is computed in the
clear (the cryptography does not change what any observer learns). Rules that need individual
updates (median, Krum, ...) cannot run under it.
"""

from fedleak.defenses.base import Defense, register_defense


@register_defense("secagg")
class SecAgg(Defense):
    """Secure aggregation: the server sees only the aggregate, never an individual upload (Bonawitz et al. 2017)."""

    hides_uploads = True
