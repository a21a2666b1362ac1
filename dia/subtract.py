"""PSF-matched image subtraction (Alard & Lupton 1998), one code path for NumPy and CuPy."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from .backend import Backend, get_backend
from .background import refit_background
from .basis import make_basis
from .config import PsfMatchConfig
from .convolve import background_image, convolve_spatial, convolve_variance, grow_mask, kernel_sum_image
from .decorrelate import decorrelate_difference, empirical_variance_scale
from .fit import FitStats, KernelSolution, fit_kernel
from .fused import subtract_fused
from .masks import BAD_FOR_FIT, MaskBits
from .noise import correlation_factor, noise_covariance
from .stars import select_stars

__all__ = ["Difference", "subtract", "subtract_on_backend", "choose_convolved"]

# plain ints: CuPy kernels do not take enum scalars
_BAD = int(BAD_FOR_FIT)
_SAT = int(MaskBits.SAT)


@dataclasses.dataclass
class Difference:
    """A difference image on the search image's photometric scale (ADU of the search image).

    Attributes
    ----------
    image, variance : array (NumPy or CuPy, float32)
        Difference and its per-pixel variance.
    mask : array (int32)
        OR of the input masks; ``MaskBits.CONVOLVED`` where a flagged pixel
        of the convolved image (or the image border) is within the kernel footprint.
    convolved : str
        ``"template"`` or ``"search"``.
    solution : KernelSolution
        The fitted kernel and background.
    stats : FitStats
        Star counts, rejections and fit residual metrics.
    timings : dict
        Seconds per step (transfer, select, fit, noise, convolve, variance, mask, background,
        decorrelate, total),
        plus sub-steps named ``step.part`` (already counted in their step).
    decorrelated : bool
        Whether the Reiss & Lupton afterburner was applied.
    """

    image: Any
    variance: Any
    mask: Any
    convolved: str
    solution: KernelSolution
    stats: FitStats
    timings: dict[str, float]
    decorrelated: bool = False

    def to_numpy(self) -> "Difference":
        """The same difference with NumPy planes (returns ``self`` if they already are)."""
        if isinstance(self.image, np.ndarray):
            return self
        import cupy

        return dataclasses.replace(self, image=cupy.asnumpy(self.image), variance=cupy.asnumpy(self.variance),
                                   mask=cupy.asnumpy(self.mask))


def choose_convolved(search_fwhm: float, template_fwhm: float, convolve: str) -> str:
    """Which image to convolve: the forced one, or (``auto``) the one with the narrower PSF."""
    if convolve != "auto":
        return convolve
    return "template" if template_fwhm <= search_fwhm else "search"


def _check_inputs(planes: dict[str, Any], search_fwhm: float, template_fwhm: float) -> None:
    shape = None
    for name, arr in planes.items():
        if arr is None:
            raise ValueError(f"{name} is required (got None)")
        if getattr(arr, "ndim", None) != 2:
            raise ValueError(f"{name} must be a 2-D array, got shape {getattr(arr, 'shape', None)}")
        if shape is None:
            shape = tuple(arr.shape)
        elif tuple(arr.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arr.shape)} but search has shape {shape}; all planes must match")
    for name, value in (("search_fwhm", search_fwhm), ("template_fwhm", template_fwhm)):
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number of pixels, got {value!r}")
    for name in ("search_mask", "template_mask"):
        if not np.issubdtype(np.dtype(planes[name].dtype), np.integer):
            raise ValueError(f"{name} must be an integer bit-mask array, got dtype {planes[name].dtype}")


def subtract(
    search,
    search_variance,
    search_mask,
    template,
    template_variance,
    template_mask,
    *,
    search_fwhm: float,
    template_fwhm: float,
    config: PsfMatchConfig = PsfMatchConfig(),
    device: str = "cpu",
) -> Difference:
    """PSF-match and subtract a template (already on the search pixel grid) from a search image.

    Parameters
    ----------
    search, search_variance, search_mask : 2-D arrays
        Search image [ADU], its variance [ADU^2] and integer bit mask (``dia.masks.MaskBits``).
    template, template_variance, template_mask : 2-D arrays
        The template resampled onto the search grid, same shape.
    search_fwhm, template_fwhm : float
        PSF FWHMs [px] (``estimate_fwhm`` measures them).
    config : PsfMatchConfig
        Basis, fit and convolution parameters.
    device : {"cpu", "gpu"}
        NumPy/SciPy or CuPy.  NumPy inputs are copied to the GPU; CuPy inputs stay there.

    Returns
    -------
    Difference
        ``image = S - (K*T + B)`` when the template is convolved, or
        ``(K*S + B - T) / sum(K)`` when the search is; both in search ADU, so a
        transient of flux f in the search has flux f in the difference.

    Raises
    ------
    ValueError
        Shape mismatch, non-positive FWHM, all pixels masked, bad device.
    StarSelectionError
        Too few usable kernel-fit stars (the message gives counts per rejection reason).
    ImportError, RuntimeError
        ``device="gpu"`` without CuPy or without a CUDA device.
    """
    planes = {
        "search": search,
        "search_variance": search_variance,
        "search_mask": search_mask,
        "template": template,
        "template_variance": template_variance,
        "template_mask": template_mask,
    }
    _check_inputs(planes, search_fwhm, template_fwhm)
    be = get_backend(device, config.fft_workers)
    return subtract_on_backend(be, planes, search_fwhm=float(search_fwhm), template_fwhm=float(template_fwhm),
                               config=config)


def subtract_on_backend(be: Backend, planes: dict[str, Any], *, search_fwhm: float, template_fwhm: float,
                        config: PsfMatchConfig) -> Difference:
    """The xp-generic body of :func:`subtract` (tests call it with any backend, e.g. to count FFTs)."""
    xp = be.xp
    dtype = xp.float32 if config.float32 else xp.float64
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        be.sync()
        now = time.perf_counter()
        timings[name] = now - t
        t = now

    s_img, s_var = xp.asarray(planes["search"]), xp.asarray(planes["search_variance"])
    t_img, t_var = xp.asarray(planes["template"]), xp.asarray(planes["template_variance"])
    s_mask = xp.asarray(planes["search_mask"]).astype(xp.int32, copy=False)
    t_mask = xp.asarray(planes["template_mask"]).astype(xp.int32, copy=False)
    for name, img, var, mask in (("search", s_img, s_var, s_mask), ("template", t_img, t_var, t_mask)):
        # a sparse subsample answers at once for any real image; the full check only when it finds nothing
        sparse = (slice(None, None, 7), slice(None, None, 7))
        if bool((((mask[sparse] & _BAD) == 0) & xp.isfinite(img[sparse]) & xp.isfinite(var[sparse])).any()):
            continue
        usable = ((mask & _BAD) == 0) & xp.isfinite(img) & xp.isfinite(var)
        if not bool(usable.any()):
            n = int(mask.size)
            bits = ", ".join(f"{b.name} {int(((mask & int(b)) != 0).sum()) / n:.0%}" for b in MaskBits
                             if int(b) & _BAD and bool(((mask & int(b)) != 0).any()))
            raise ValueError(f"{name}: every pixel is masked or non-finite, nothing to subtract (flagged: "
                             f"{bits or 'none'}; non-finite: {int((~xp.isfinite(img)).sum()) / n:.0%})")
    lap("transfer")

    convolved = choose_convolved(search_fwhm, template_fwhm, config.convolve)
    if convolved == "template":
        x_img, x_var, x_mask, y_img, y_var, y_mask = t_img, t_var, t_mask, s_img, s_var, s_mask
        x_fwhm, y_fwhm = template_fwhm, search_fwhm
    else:
        x_img, x_var, x_mask, y_img, y_var, y_mask = s_img, s_var, s_mask, t_img, t_var, t_mask
        x_fwhm, y_fwhm = search_fwhm, template_fwhm
    basis = make_basis(y_fwhm, x_fwhm, config)
    hw = basis.half_width
    core_hw = config.stamp_half_width if config.stamp_half_width is not None else hw + 1

    sub: dict[str, float] = {}
    stars = select_stars(be, x_img, x_var, x_mask, y_img, y_var, y_mask, core_hw=core_hw, kernel_hw=hw, config=config,
                         timings=sub)
    lap("select")
    solution, stats = fit_kernel(be, basis, stars, x_img, x_var, y_img, y_var, y_mask, core_hw=core_hw, config=config,
                                 timings=sub)
    lap("fit")

    cov = None  # the convolved image's noise covariance (None: white)
    if config.noise_correlation:
        cov = noise_covariance(be, x_img, x_var, x_mask)
        kc = solution.kernel_at((x_img.shape[1] - 1) / 2, (x_img.shape[0] - 1) / 2)
        factor = correlation_factor(cov, kc)
        if np.count_nonzero(cov) == 1 or not (math.isfinite(factor) and factor > 0):
            cov = None  # white noise (delta): the plain propagation
        else:
            stats = dataclasses.replace(stats, noise_correlation_factor=factor)
        lap("noise")

    band = config.fft_band_rows if be.name == "cpu" else None
    if config.path == "fused":
        parts: dict[str, float] = {}
        image, variance, mask = subtract_fused(be, x_img, x_var, x_mask, y_img, y_var, y_mask, solution, convolved,
                                               grow_bits=config.grow_bits, dtype=dtype, band_rows=band,
                                               timings=parts, noise_cov=cov)
        be.sync()
        timings.update(parts)  # convolve, variance, mask: measured inside the band loop
        t = time.perf_counter()
    else:
        # pixels that must not spread through the kernel: flagged bits and non-finite values
        bad_x = ((x_mask & config.grow_bits) != 0) | ~xp.isfinite(x_img) | ~xp.isfinite(x_var)
        x_clean = xp.where(bad_x, dtype(0), x_img).astype(dtype, copy=False)
        conv = convolve_spatial(be, x_clean, solution, dtype, band)
        conv += background_image(be, solution, dtype)
        if convolved == "template":
            image = y_img.astype(dtype, copy=False) - conv
        else:
            ksum = kernel_sum_image(be, solution, dtype)
            image = conv - y_img.astype(dtype, copy=False)
            image /= ksum
        lap("convolve")

        var_conv = convolve_variance(be, xp.where(bad_x, dtype(0), x_var).astype(dtype, copy=False), solution, dtype,
                                     band, noise_cov=cov)
        variance = var_conv
        variance += y_var.astype(dtype, copy=False)
        if convolved == "search":
            variance /= ksum * ksum
        lap("variance")

        grown = grow_mask(be, bad_x, hw)
        mask = s_mask | t_mask | xp.where(grown, xp.int32(int(MaskBits.CONVOLVED)), xp.int32(0))
        mask |= xp.where(~xp.isfinite(y_img), xp.int32(int(MaskBits.NO_DATA)), xp.int32(0))
        lap("mask")

    if config.background_fit == "sky":
        image, solution, sky = refit_background(be, image, variance, mask, solution, convolved, config, dtype)
        if sky is not None:
            stats = dataclasses.replace(stats, background_order=solution.background_order, background=sky.describe())
        lap("background")

    decorrelated = False
    if config.decorrelate:
        image, variance = decorrelate_difference(be, image, variance, y_var, x_var, solution, convolved, mask, dtype)
        decorrelated = True
        if config.decorrelate_variance == "measured":
            ratio = empirical_variance_scale(be, image, variance, mask)
            if math.isfinite(ratio) and ratio > 0:
                variance *= dtype(ratio)
                stats = dataclasses.replace(stats, variance_scale=ratio)
        lap("decorrelate")
    timings["total"] = time.perf_counter() - t0
    timings.update(sub)  # sub-steps ("select.peaks", "fit.stamps", ...), already inside their steps
    return Difference(image, variance, mask, convolved, solution, stats, timings, decorrelated)
