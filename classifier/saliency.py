"""Vanilla-gradient saliency: which input stamp does the CNN look at?

The saliency map of an object is ``|d P(real) / d input|`` with respect to the model's
normalised input.  Summing it over each input stamp (for the paper models: each side-by-side
panel) and dividing by the total gives the fraction of saliency per stamp (summing to 1), which
is tabulated by true/predicted class (TP, FP, TN, FN) as in Acero-Cuellar et al. (2023).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import CHANNELS
from .models import ModelSpec, panel_slices, prepare_input
from .plotting import new_figure, save_figure

__all__ = ["SaliencyResult", "saliency_maps", "saliency_table", "plot_saliency_gallery"]


@dataclasses.dataclass
class SaliencyResult:
    """Saliency of N objects.

    Attributes
    ----------
    maps : ndarray (N, K, 51, 51)
        ``|d P(real) / d input|`` per stamp, in ``channels`` order (side-by-side panels cut back
        into stamps).
    fractions : ndarray (N, K)
        Fraction of each object's saliency in each stamp (rows sum to 1).
    scores : ndarray (N,)
        P(real).
    channels : tuple of str
        The model's stamps (canonical order).
    """

    maps: np.ndarray
    fractions: np.ndarray
    scores: np.ndarray
    channels: tuple[str, ...]


def saliency_maps(net: torch.nn.Module, spec: ModelSpec, stamps: np.ndarray,
                  channels: tuple[str, ...] = CHANNELS, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> SaliencyResult:
    """Vanilla-gradient saliency maps and per-stamp fractions.

    Parameters
    ----------
    net : torch.nn.Module
        The trained model (put in eval mode here).
    spec : ModelSpec
        Its registry entry (input layout).
    stamps : ndarray (N, C, 51, 51)
        Raw stamps (names in ``channels``).
    channels : tuple of str
    batch_size : int
    device : str or torch.device
    """
    net = net.eval().to(device)
    slices = panel_slices(spec)
    maps, scores = [], []
    for i in range(0, stamps.shape[0], batch_size):
        x = torch.as_tensor(prepare_input(stamps[i:i + batch_size], spec, channels)).to(device, torch.float32)
        x.requires_grad_(True)
        p = torch.softmax(net(x), dim=1)[:, 1]
        # each object's score depends only on its own input: the gradient of the sum is per object
        (grad,) = torch.autograd.grad(p.sum(), x)
        g = grad.abs().detach().cpu().numpy()
        maps.append(np.stack([g[:, ch, rows, cols] for ch, rows, cols in
                              (slices[c] for c in spec.channels)], axis=1))
        scores.append(p.detach().cpu().numpy())
    m = np.concatenate(maps) if maps else np.zeros((0, len(spec.channels), 51, 51), np.float32)
    tot = m.sum(axis=(2, 3))
    norm = tot.sum(axis=1, keepdims=True)
    frac = np.where(norm > 0, tot / np.where(norm > 0, norm, 1.0), 1.0 / len(spec.channels))
    return SaliencyResult(m.astype(np.float32), frac, np.concatenate(scores) if scores else np.zeros(0),
                          tuple(spec.channels))


def saliency_table(result: SaliencyResult, labels: np.ndarray, threshold: float = 0.5) -> dict[str, dict[str, Any]]:
    """Mean saliency fraction per stamp for TP, FP, TN and FN objects (the paper's table).

    Returns
    -------
    dict
        ``{"TP": {"n": int, "template": mean fraction, "search": ..., ...}, ...}``; means are
        None for an empty class.
    """
    labels = np.asarray(labels)
    pred = result.scores >= threshold
    real = labels == 1
    groups = {"TP": pred & real, "FP": pred & ~real, "TN": ~pred & ~real, "FN": ~pred & real}
    table: dict[str, dict[str, Any]] = {}
    for name, m in groups.items():
        row: dict[str, Any] = {"n": int(m.sum())}
        for k, ch in enumerate(result.channels):
            row[ch] = float(result.fractions[m, k].mean()) if m.any() else None
        table[name] = row
    return table


def plot_saliency_gallery(stamps: np.ndarray, result: SaliencyResult, labels: np.ndarray, path: str | Path,
                          channels: tuple[str, ...] = CHANNELS, n_max: int = 8, title: str = "") -> Path:
    """PNG gallery: per object (row) each stamp and its saliency map, with label and score.

    The file is written to a temporary name, then renamed.
    """
    n = min(n_max, result.maps.shape[0])
    k = len(result.channels)
    fig = new_figure((2.0 * 2 * k, 2.0 * max(n, 1)))  # no pyplot: the caller's backend is untouched
    axes = fig.subplots(max(n, 1), 2 * k, squeeze=False)
    for i in range(n):
        for j, ch in enumerate(result.channels):
            img = stamps[i, channels.index(ch)]
            finite = img[np.isfinite(img)]
            lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0, 1))
            axes[i, 2 * j].imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            axes[i, 2 * j + 1].imshow(result.maps[i, j], origin="lower", cmap="inferno")
            axes[i, 2 * j].set_title(ch, fontsize=7)
            axes[i, 2 * j + 1].set_title(f"saliency {result.fractions[i, j]:.2f}", fontsize=7)
        axes[i, 0].set_ylabel(f"label {int(labels[i])}\nP={result.scores[i]:.2f}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
