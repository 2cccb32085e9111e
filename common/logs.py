"""Logging set-up shared by the command line, the matrix's worker processes and the bench scripts
(it sits below both, so the evaluation layer never imports `cli.py`)."""

from __future__ import annotations

import os
import warnings

LOG_FORMAT = "%(asctime)s %(message)s"


def quiet_libraries() -> None:
    """Silence third-party chatter that is not the user's concern (transformers progress bars and
    advice, known harmless warnings), so a run's log holds fedleak's lines only."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*only one class.*")
    # Opacus's hooks on a frozen base trip torch's full-backward-hook notice; RDP order hints are advice.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the")
    # fedleak measures leakage; reproducible (seeded) noise is the point, not a secure RNG.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
