"""Stamp normalisation: the paper's scheme and the shared-scale scheme of our own models.

Schemes (``normalize_stamps(stamps, scheme, channels)``):

``"paper"`` (Acero-Cuellar et al. 2023)
    * difference: z-scored per stamp (mean 0, standard deviation 1);
    * search and template, each on its own: mapped linearly so that the pixels inside
      mean +- 3 sigma of the stamp span 0..1 (the minimum of those pixels -> 0, the maximum -> 1);
      outliers are kept, i.e. bright pixels exceed 1.
``"shared"`` (our ``triplet`` / ``pair`` models)
    * template and search: each minus its own background (3-sigma-clipped mean), then both
      divided by ONE scale, the clipped noise (std) of the search stamp, then ``asinh``.  The common
      scale keeps the template/search flux ratio (a static star looks the same in both, a new source
      only in the search), which a per-stamp min-max scaling destroys; ``asinh`` keeps noise linear
      and bright stars in range.
    * difference: minus its clipped mean, divided by its own clipped std, then ``asinh``.
``"sky"`` (the direct mode's dense detector, ``pair-sky``)
    * template and search arrive **already in sky units**: each image minus its own smooth sky,
      over the search image's sky noise, both read from the whole frame at the stamp's centre
      (:func:`sky_units`); the scheme only applies ``asinh``.  No statistic comes from the stamp, so
      a stamp is normalised exactly as the fully convolutional network's frame is
      (:func:`classifier.dense.normalized_planes`): the network scores the same pixels on a stamp and
      in the score map.  The ``shared`` scheme instead takes the sky and the scale from the stamp,
      which on a bright host is the host's light and structure, not the sky.
    * difference (if any): as in ``shared``.

Missing pixels (NaN, and infinite values) are ignored by the statistics and set to 0 after
normalising, so the output is finite and deterministic.  A constant stamp maps to 0.  The
statistics are accumulated in float64 (see ``_mean_std``); the pixels stay float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data import CHANNELS

__all__ = ["normalize_stamps", "SCHEMES", "paper_minmax", "zscore", "shared_scale", "sky_units"]

#: Normalisation schemes understood by :func:`normalize_stamps`.
SCHEMES: tuple[str, ...] = ("paper", "shared", "sky")

#: Clipping threshold (in std) of the shared scheme's background / noise estimate.
_CLIP = 3.0

# The arithmetic runs in torch (multi-threaded, and on the GPU for CUDA tensors); NumPy arrays
# are converted without copies.


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32), False
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), True


def _back(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def _mean_std(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (stamp, channel) mean and population std of (N, K, P) pixels, NaN-aware.

    Two passes (mean, then mean squared deviation), accumulated in float64 and returned in
    float32: a constant stamp gets a std of exactly 0 (float32 sums leave a rounding error
    that a later division blows up to +-1), and pixels near the float32 limit do not overflow
    the sums.  Several times faster on CPU than ``torch.std_mean`` for rows of a few thousand
    pixels.
    """
    x64 = x.to(torch.float64)
    if valid is None:
        mean = x64.mean(dim=-1, keepdim=True)
        dev = x64 - mean
        std = torch.sqrt((dev * dev).mean(dim=-1, keepdim=True))
    else:
        n = valid.sum(dim=-1, keepdim=True).clamp_min(1)
        mean = torch.where(valid, x64, 0.0).sum(dim=-1, keepdim=True) / n
        dev = torch.where(valid, x64 - mean, 0.0)
        std = torch.sqrt((dev * dev).sum(dim=-1, keepdim=True) / n)
    return mean.to(torch.float32), std.to(torch.float32)


def _valid(x: torch.Tensor) -> torch.Tensor | None:
    """Mask of usable pixels (finite ones), or None when all are (the usual case)."""
    finite = torch.isfinite(x)
    return None if bool(finite.all()) else finite


def _divisor(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` can be divided by: positive, finite, and with a finite float32 inverse (a
    denormal spread, e.g. of two tiny pixels, would scale the stamp to infinity)."""
    return torch.isfinite(x) & (x > 0) & torch.isfinite(1.0 / torch.where(x > 0, x, 1.0))


def _inverse(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x`` is a usable divisor (:func:`_divisor`), else 0."""
    ok = _divisor(x)
    return torch.where(ok, 1.0 / torch.where(ok, x, 1.0), 0.0)


def _finish(out: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return out if valid is None else torch.where(valid, out, 0.0)


def _asinh(t: torch.Tensor) -> torch.Tensor:
    """``asinh`` in place on a fresh tensor: NumPy's vectorised one on CPU (~10x faster than
    torch's there, equal to 1 ulp), torch's on a GPU or where gradients flow."""
    if t.device.type == "cpu" and not t.requires_grad:
        np.arcsinh(t.numpy(), out=t.numpy())
        return t
    return torch.asinh(t)


def zscore(x):
    """Z-score each ``(N, K, H, W)`` stamp plane: mean 0, std 1 over its valid pixels.

    Accepts and returns a NumPy array or a torch tensor.
    """
    t, was_np = _as_tensor(x)
    shape = t.shape
    if t.numel() == 0:
        return _back(t.clone(), was_np)
    t = t.reshape(shape[0], shape[1], -1)
    valid = _valid(t)
    mean, std = _mean_std(t, valid)
    scale = _inverse(std)
    return _back(_finish((t - mean) * scale, valid).reshape(shape), was_np)


def paper_minmax(x, nsigma: float = 3.0):
    """Map each ``(N, K, H, W)`` plane so its pixels within mean +- ``nsigma`` std span 0..1.

    Pixels outside that range keep the same linear map (values below 0 or above 1).
    Accepts and returns a NumPy array or a torch tensor.
    """
    t, was_np = _as_tensor(x)
    shape = t.shape
    if t.numel() == 0:
        return _back(t.clone(), was_np)
    t = t.reshape(shape[0], shape[1], -1)
    valid = _valid(t)
    mean, std = _mean_std(t, valid)
    # The lowest pixel inside mean +- n sigma is the lowest one above the lower bound (pixels
    # beyond the upper bound are larger than any inside one, and some pixel is always inside);
    # NaN compares False, so missing pixels drop out.
    lo = torch.where(t >= mean - nsigma * std, t, torch.inf).amin(dim=-1, keepdim=True)
    hi = torch.where(t <= mean + nsigma * std, t, -torch.inf).amax(dim=-1, keepdim=True)
    span = hi - lo
    ok = _divisor(span)
    lo = torch.where(ok, lo, 0.0)
    scale = torch.where(ok, 1.0 / torch.where(ok, span, 1.0), 0.0)
    return _back(_finish((t - lo) * scale, valid).reshape(shape), was_np)


def shared_scale(x, image_channels: Sequence[int], reference: int | None):
    """The ``"shared"`` scheme on a ``(N, K, H, W)`` array or tensor (see module docstring).

    Parameters
    ----------
    x : ndarray or Tensor (N, K, H, W)
    image_channels : sequence of int
        Channels (template, search) that share one scale; the others (difference) keep their own.
    reference : int or None
        The channel whose robust noise sets the shared scale (the search stamp); default the
        last image channel.
    """
    t, was_np = _as_tensor(x)
    shape = t.shape
    if t.numel() == 0:
        return _back(t.clone(), was_np)
    t = t.reshape(shape[0], shape[1], -1)
    valid = _valid(t)
    # robust background and noise: mean and std after one 3-sigma clip (much cheaper than
    # median / MAD, and as insensitive to a star filling a few percent of the stamp)
    mean, std = _mean_std(t, valid)
    inside = (t - mean).abs() <= _CLIP * std
    if valid is not None:
        inside = inside & valid
    med, sig = _mean_std(t, inside)
    sig = torch.where(_divisor(sig), sig, std)
    sig = torch.where(_divisor(sig), sig, 1.0)
    if image_channels:
        ref = reference if reference is not None else image_channels[-1]
        # every image channel takes the reference channel's noise; built out of place (an
        # in-place scatter from a view of the same tensor is refused by torch when N == 1)
        shared = torch.zeros(shape[1], dtype=torch.bool, device=t.device)
        shared[list(image_channels)] = True
        sig = torch.where(shared[None, :, None], sig[:, ref:ref + 1], sig)
    out = _asinh((t - med) / sig)
    return _back(_finish(out, valid).reshape(shape), was_np)


def sky_units(stamps: np.ndarray, sky: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Stamps in the ``sky`` scheme's units: each channel minus its sky, over the noise.

    Parameters
    ----------
    stamps : ndarray (N, C, H, W)
        Raw stamps (ADU; the template already on the search's zero point).
    sky : ndarray (N, C)
        Smooth sky of each channel's image at the stamp's centre.
    noise : ndarray (N,)
        Sky noise (standard deviation) of the search image at the stamp's centre.

    Returns
    -------
    ndarray (N, C, H, W) float32
        ``(stamps - sky) / noise``; NaN stays NaN.
    """
    stamps = np.asarray(stamps, np.float32)
    sky = np.asarray(sky, np.float32)
    noise = np.asarray(noise, np.float32)
    if sky.shape != stamps.shape[:2] or noise.shape != stamps.shape[:1]:
        raise ValueError(f"sky_units: sky must be (N, C) = {stamps.shape[:2]} and noise (N,) = {stamps.shape[:1]}; "
                         f"got {sky.shape} and {noise.shape}")
    if not (np.isfinite(noise) & (noise > 0)).all():
        raise ValueError("sky_units: the sky noise must be finite and > 0 for every stamp")
    return (stamps - sky[:, :, None, None]) / noise[:, None, None, None]


def normalize_stamps(stamps: np.ndarray, scheme: str = "paper",
                     channels: Sequence[str] = CHANNELS) -> np.ndarray:
    """Normalise a stamp array channel by channel.

    Parameters
    ----------
    stamps : ndarray or Tensor (N, C, H, W)
        Raw stamps (``sky``: template and search in sky units, :func:`sky_units`); NaN marks missing
        pixels.  Tensors stay on their device.
    scheme : {"paper", "shared", "sky"}
        See the module docstring.
    channels : sequence of str
        Name of each channel (``template``, ``search``, ``difference``); decides how each is scaled.

    Returns
    -------
    ndarray or Tensor (N, C, H, W) float32 (the input's type)
        Finite normalised stamps (missing pixels set to 0).
    """
    if not isinstance(stamps, torch.Tensor):
        stamps = np.asarray(stamps)
    if stamps.ndim != 4:
        raise ValueError(f"stamps must be (N, C, H, W), got shape {stamps.shape}")
    channels = tuple(channels)
    if len(channels) != stamps.shape[1]:
        raise ValueError(f"channels {channels} do not match the {stamps.shape[1]} stamp channels")
    unknown = set(channels) - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown channel name(s) {sorted(unknown)}; expected some of {CHANNELS}")
    diff = [i for i, c in enumerate(channels) if c == "difference"]
    imgs = [i for i, c in enumerate(channels) if c != "difference"]
    if scheme == "paper":
        if not diff:
            return paper_minmax(stamps)
        if not imgs:
            return zscore(stamps)
        t, was_np = _as_tensor(stamps)
        # each channel scaled on its own: normalise them one by one and stack (no scatter)
        parts = [zscore(t[:, i:i + 1]) if i in diff else paper_minmax(t[:, i:i + 1])
                 for i in range(t.shape[1])]
        return _back(torch.cat(parts, dim=1), was_np)
    if scheme == "shared":
        ref = channels.index("search") if "search" in channels else None
        return shared_scale(stamps, imgs, ref)
    if scheme == "sky":
        t, was_np = _as_tensor(stamps)
        parts = []
        for i in range(t.shape[1]):
            plane = t[:, i:i + 1]
            if i in diff:
                parts.append(shared_scale(plane, [], None))
            else:  # a copy: the caller's stamps are never written
                parts.append(_finish(_asinh(plane.clone()), _valid(plane)))
        return _back(torch.cat(parts, dim=1), was_np)
    raise ValueError(f"unknown normalisation scheme {scheme!r}; choose one of {SCHEMES}")
