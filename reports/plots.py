"""The matplotlib side every figure shares: a figure on the non-interactive backend, its PNG bytes with
the legend beside the axes, and long tick labels wrapped; each section draws its own figures with them."""

from __future__ import annotations

import io
import textwrap


def axes(width: float, height: float, ncols: int = 1):
    """A figure and its axes (`ncols` side by side) on the non-interactive backend (reports are written
    without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=110)


def png(fig, ax, *, legend: bool = True) -> bytes:
    """PNG bytes of the figure, legend beside the axes so many curves stay legible."""
    import matplotlib.pyplot as plt

    if legend:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def wrap(text: str, width: int = 26) -> str:
    """Long labels (an algorithm with its parameters) over several lines; commas are break points."""
    lines = textwrap.wrap(text.replace(",", ", "), width, break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines) or text
