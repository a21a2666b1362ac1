"""Saving matplotlib figures: one atomic PNG writer for the classifier and the benchmark reports."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["save_figure"]


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
