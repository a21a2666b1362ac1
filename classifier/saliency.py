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


def _outcome(label: int, score: float, threshold: float) -> str:
    """TP, FP, TN or FN of one object."""
    return ("T" if (score >= threshold) == (label == 1) else "F") + ("P" if score >= threshold else "N")


def _score_text(p: float) -> str:
    """P(real) readable at both ends: 3.2e-09 and 1 - 4e-07 rather than 0.00 and 1.00."""
    if p <= 0:
        return "P = 0 (below float32)"
    if p >= 1:
        return "P = 1 (to float32)"
    if p < 0.01:
        return f"P = {p:.1e}"
    if p > 0.99:
        return f"P = 1 - {1 - p:.0e}"
    return f"P = {p:.2f}"


def plot_saliency_gallery(stamps: np.ndarray, result: SaliencyResult, labels: np.ndarray, path: str | Path,
                          channels: tuple[str, ...] = CHANNELS, n_max: int = 8, title: str = "",
                          threshold: float = 0.5) -> Path:
    """PNG gallery: per object (row) each stamp and its saliency map, with outcome, label and score.

    Each row is labelled with its outcome at ``threshold`` (TP, FP, TN, FN), its true label and
    P(real); every panel has a colorbar (stamp pixel values; saliency ``|dP/dx|`` per normalised
    input pixel, in absolute units, so rows can be compared).  A score near 0 or 1 saturates the
    softmax and makes the gradient tiny (or exactly 0): the row says so, and a map that is
    exactly 0 is captioned "no gradient" instead of a meaningless equal share.

    Parameters
    ----------
    stamps : ndarray (N, C, 51, 51)
        Raw stamps (names in ``channels``).
    result : SaliencyResult
        Their saliency (same N objects).
    labels : array of int
        True labels (1 real, 0 bogus).
    path : path
        Output PNG (written to a temporary name, then renamed).
    channels : tuple of str
        Names of the stamp channels.
    n_max : int
        Rows drawn at most.
    title : str
        Figure title.
    threshold : float
        Score threshold of the outcomes (default 0.5).
    """
    from matplotlib.ticker import MaxNLocator

    n = min(n_max, result.maps.shape[0])
    k = len(result.channels)
    fig = new_figure((2.55 * 2 * k + 0.6, 2.15 * max(n, 1) + 0.5))  # no pyplot: the caller's backend is untouched
    axes = fig.subplots(max(n, 1), 2 * k, squeeze=False)
    names = {"TP": "true positive", "FP": "false positive", "TN": "true negative", "FN": "false negative"}
    for i in range(n):
        score = float(result.scores[i])
        peak = float(np.max(result.maps[i])) if result.maps[i].size else 0.0
        for j, ch in enumerate(result.channels):
            img = stamps[i, channels.index(ch)]
            finite = img[np.isfinite(img)]
            lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0, 1))
            im = axes[i, 2 * j].imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            cb = fig.colorbar(im, ax=axes[i, 2 * j], fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=6)
            sal = result.maps[i, j]
            im = axes[i, 2 * j + 1].imshow(sal, origin="lower", cmap="inferno", vmin=0, vmax=peak if peak > 0 else 1)
            # the exponent on every tick (a shared offset text above the bar would run into the next title)
            cb = fig.colorbar(im, ax=axes[i, 2 * j + 1], fraction=0.046, pad=0.03, format="%.1e",
                              ticks=MaxNLocator(4))
            cb.ax.tick_params(labelsize=6)
            if float(sal.sum()) == 0:  # nothing to show: say why instead of an empty scale
                cb.set_ticks([0])
                axes[i, 2 * j + 1].text(0.5, 0.5, "|dP/dx| = 0\neverywhere:\nsoftmax saturated", color="white",
                                        ha="center", va="center", fontsize=7, transform=axes[i, 2 * j + 1].transAxes)
            axes[i, 2 * j].set_title(f"{ch} (ADU)", fontsize=7)
            share = (f"{ch} saliency: {result.fractions[i, j]:.0%} of total" if float(sal.sum()) > 0
                     else f"{ch}: no gradient")
            axes[i, 2 * j + 1].set_title(share, fontsize=7)
        outcome = _outcome(int(labels[i]), score, threshold)
        text = f"{outcome}: {names[outcome]}\nlabel {'real' if int(labels[i]) == 1 else 'bogus'}, {_score_text(score)}"
        if peak == 0:
            text += "\nsaturated: no gradient at all"
        elif score < 0.01 or score > 0.99:
            text += f"\nsaturated: max |dP/dx| {peak:.0e}"
        axes[i, 0].set_ylabel(text, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height if title else 1))  # the title clear of the first row
    return save_figure(fig, path, dpi=90)
