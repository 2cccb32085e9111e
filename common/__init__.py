"""Small utilities every layer may use without importing the training backbone (no torch here):
the one user-facing error type, atomic file writes and logging set-up."""
