"""Matplotlib figures without pyplot: one figure maker and one atomic PNG writer.

The figures are :class:`matplotlib.figure.Figure` objects drawn by the Agg canvas directly, so
making and saving them neither selects nor switches the process's matplotlib backend (the
caller's interactive backend, or a notebook's, is left as it was) and no global figure
registry holds them: they are freed like any other object.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize: tuple[float, float]):
    """A new figure of ``figsize`` inches on its own Agg canvas (no pyplot, no backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` (temporary name, then rename).

    A figure that pyplot manages (made with ``plt.subplots``) is closed afterwards; one made
    by :func:`new_figure` needs no closing.
    """
    import sys

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        # only when pyplot is already loaded: importing it here would set up a backend
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and getattr(fig.canvas, "manager", None) is not None:
            plt.close(fig)
    os.replace(tmp, path)
    return path
