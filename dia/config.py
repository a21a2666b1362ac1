"""Configuration of Alard-Lupton PSF matching and subtraction."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["PsfMatchConfig"]

_CONVOLVE_CHOICES = ("auto", "template", "search")
_PATH_CHOICES = ("fused", "reference")
_BACKGROUND_FIT_CHOICES = ("sky", "stamps")


@dataclasses.dataclass(frozen=True)
class PsfMatchConfig:
    """Parameters of the PSF-matching kernel fit and the subtraction.

    Defaults follow Rubin's ip_diffim AlardLuptonSubtractTask where it has a
    counterpart (basis widths from the two PSFs, degrees (4, 2, 2), kernel
    size 6 x the widest sigma clipped to 21..35 px, spatial kernel order 2,
    background order 1).  A HOTPANTS-like basis is obtained with
    ``kernel_sigmas=(0.7, 1.5, 3.0)``, ``kernel_degrees=(6, 4, 2)``,
    ``kernel_size=21``.
    """

    kernel_degrees: tuple[int, ...] = (4, 2, 2)
    """Polynomial degree of each Gaussian of the basis (one entry per Gaussian)."""
    kernel_sigmas: tuple[float, ...] | None = None
    """Fixed Gaussian widths [px]; ``None`` derives them from the two PSF FWHMs."""
    sigma_beta: float = 2.0
    """Ratio between successive basis Gaussian widths when derived from the FWHMs."""
    min_sigma: float = 0.7
    """Floor on the narrowest derived basis sigma [px]."""
    kernel_size: int | None = None
    """Kernel side [px, odd]; ``None``: ``kernel_size_factor`` x widest sigma, clipped."""
    kernel_size_factor: float = 6.0
    """Kernel side in units of the widest basis sigma (when ``kernel_size`` is None)."""
    kernel_size_min: int = 21
    """Smallest automatic kernel side [px]."""
    kernel_size_max: int = 35
    """Largest automatic kernel side [px]."""
    spatial_order: int = 2
    """Polynomial order of the spatial variation of the kernel."""
    background_order: int = 1
    """Polynomial order of the differential background (with ``background_fit="sky"``: of the sky re-fit,
    lowered only when the frame has fewer than two background cells per term)."""
    background_fit: str = "sky"
    """Where the differential background comes from.  ``"sky"`` (default): fitted with the kernel on the star
    stamps, then re-fitted on the blank sky of the difference (robust medians of cells of ``background_cell`` px,
    :mod:`dia.background`), which the star stamps alone determine poorly (a constant is nearly degenerate with the
    kernel's wings on a stamp; few stars, stacks' PSF wings).  ``"stamps"``: the kernel fit's background as it is
    (the previous behaviour)."""
    background_cell: int | None = None
    """Cell side [px] of the sky re-fit; ``None``: a quarter of the shorter image side clipped to 16..128 px."""
    background_clip: float = 5.0
    """Sky re-fit: pixels beyond this many sigma of the difference (transients, residuals) are left out of the
    cell medians, and cells off the fit by more than this many robust sigma are rejected."""
    convolve: str = "auto"
    """Which image is convolved: ``"auto"`` (the one with the narrower PSF), ``"template"`` or ``"search"``."""

    max_stars: int = 120
    """Maximum number of kernel-fit stars."""
    grid_cells: int = 32
    """Approximate number of cells of the grid that spreads the stars over the image."""
    min_stars: int = 10
    """Fewest usable stars (after clipping) for a fit with the configured ``spatial_order`` and
    ``background_order`` (and at least one more than the terms of either).  With fewer, see ``order_fallback``."""
    order_fallback: bool = True
    """With fewer than ``min_stars`` usable stars, lower the orders instead of failing: the spatial order,
    then the background order, each to the highest order ``o`` (not above the configured one) with at least
    ``fallback_stars_per_term`` x its number of terms ``(o + 1)(o + 2) / 2`` stars (defaults: order 1 needs 6,
    order 0 needs ``fallback_min_stars``).  The orders used and why are recorded in ``FitStats``.  ``False``:
    fewer than ``min_stars`` raises StarSelectionError (the previous behaviour)."""
    fallback_stars_per_term: float = 2.0
    """Usable stars per spatial term needed for a lowered order (see ``order_fallback``)."""
    fallback_min_stars: int = 3
    """Fewest usable stars for any fit (order 0 kernel and background; ``min_stars`` if that is smaller);
    fewer raises StarSelectionError."""
    stamp_half_width: int | None = None
    """Half-width of the fitted stamp core [px]; ``None``: the kernel half-width + 1."""
    detect_snr: float = 5.0
    """Per-pixel S/N of the local maxima considered (also used for the isolation test)."""
    min_peak_snr: float = 25.0
    """Least peak S/N (per pixel, above background) of a kernel-fit star in each image, judged against that
    image's own noise (the convolved image: ``too_faint``; the other one: ``no_counterpart``)."""
    min_peak_snr_floor: float = 10.0
    """When fewer stars than the configured orders need (``min_stars``) pass ``min_peak_snr``, the cut is
    lowered just enough to keep that many (the brightest by their lower S/N of the two images), but not below
    this (small or sparse frames).  A value at or above ``min_peak_snr`` gives a fixed cut.  The cut used is recorded
    (``FitStats.peak_snr_cut``)."""
    isolation_ratio: float = 0.05
    """A neighbour peak brighter than this fraction of the star's peak within the stamp makes it not isolated."""
    saturation: float = math.inf
    """Pixels at or above this value (ADU) in either image count as saturated, besides the SAT bit."""
    clip_sigma: float = 3.0
    """Stars whose reduced chi^2 exceeds median + clip_sigma x robust std are rejected."""
    clip_iterations: int = 3
    """Iterations of the spatial fit / clipping loop."""
    regularization: float = 1e-9
    """Ridge added to the normal equations, relative to their mean diagonal."""
    grow_bits: int = 1 | 2 | 4 | 8
    """Mask bits of the convolved image that are grown by the kernel footprint (BAD|SAT|NO_DATA|CR)."""
    noise_correlation: bool = True
    """Measure the noise covariance of the convolved image on its blank sky (lags up to 3 px, significant ones
    only) and scale its variance term by what the convolution does to correlated noise (:mod:`dia.noise`;
    stacks, resampled images); white noise leaves the variance as it was.  Recorded as
    ``FitStats.noise_correlation_factor``."""
    decorrelate: bool = False
    """Apply the Reiss & Lupton (2016) noise decorrelation afterburner to the difference."""
    decorrelate_variance: str = "measured"
    """Variance plane of a decorrelated difference.  ``"formula"``: ``v_Y + kappa^2 v_X`` (Reiss & Lupton), right for
    white input noise and too large when the inputs' noise is already correlated (stacks, resampled images: x1.3-1.5
    on real DECam stacks).  ``"measured"`` (default): the formula's plane scaled by the measured variance of the
    decorrelated difference over it on unflagged pixels (robust, sources clipped;
    :func:`dia.decorrelate.empirical_variance_scale`), recorded as ``FitStats.variance_scale``."""
    float32: bool = True
    """Full-frame convolutions in float32 (the fit is always float64)."""
    # execution settings: same result to rounding, so not part of a run's resume key
    # (metadata "science": False is the convention pipeline.config.science_dict reads)
    fft_band_rows: int | None = dataclasses.field(default=512, metadata={"science": False})
    """On CPU, full-frame convolutions run in bands of this many rows (overlap-save; cache-sized FFTs;
    the fused path balances the bands to about this many rows); None: one band. The GPU always uses one band."""
    fft_workers: int | None = dataclasses.field(default=None, metadata={"science": False})
    """Threads for scipy.fft on CPU (None: all cores)."""
    path: str = dataclasses.field(default="fused", metadata={"science": False})
    """Implementation of the kernel fit's stamp convolutions and of the full-frame subtraction; both give the
    same difference to float32 rounding. ``"fused"`` (default): separable basis convolutions of the fit stamps
    as matrix products; difference, variance and mask finished band by band in one pass, one inverse FFT along
    y per spatial term and one along x per power of x, mask growth by running ORs. ``"reference"``: the
    previous implementation (FFT stamp convolutions; one 2-D inverse FFT per spatial term, full-frame
    variance and mask steps, maximum filter), kept for same-run comparisons (``benchmarks/bench_dia.py``)."""

    def __post_init__(self) -> None:
        if self.path not in _PATH_CHOICES:
            raise ValueError(f"PsfMatchConfig.path must be one of {_PATH_CHOICES}, got {self.path!r}")
        if self.decorrelate_variance not in ("measured", "formula"):
            raise ValueError("PsfMatchConfig.decorrelate_variance must be 'measured' or 'formula', "
                             f"got {self.decorrelate_variance!r}")
        if self.background_fit not in _BACKGROUND_FIT_CHOICES:
            raise ValueError(f"PsfMatchConfig.background_fit must be one of {_BACKGROUND_FIT_CHOICES}, "
                             f"got {self.background_fit!r}")
        if self.background_cell is not None and self.background_cell < 4:
            raise ValueError(f"PsfMatchConfig.background_cell must be >= 4 px (or None), got {self.background_cell}")
        if not self.background_clip > 0:
            raise ValueError(f"PsfMatchConfig.background_clip must be > 0, got {self.background_clip}")
        if self.convolve not in _CONVOLVE_CHOICES:
            raise ValueError(f"PsfMatchConfig.convolve must be one of {_CONVOLVE_CHOICES}, got {self.convolve!r}")
        if not self.kernel_degrees or any(d < 0 for d in self.kernel_degrees):
            raise ValueError(f"PsfMatchConfig.kernel_degrees must be non-negative integers, got {self.kernel_degrees}")
        if self.kernel_sigmas is not None:
            if len(self.kernel_sigmas) != len(self.kernel_degrees):
                raise ValueError("PsfMatchConfig.kernel_sigmas must have one entry per kernel_degrees entry")
            if any(s <= 0 for s in self.kernel_sigmas):
                raise ValueError(f"PsfMatchConfig.kernel_sigmas must be positive, got {self.kernel_sigmas}")
        if self.kernel_size is not None and (self.kernel_size < 3 or self.kernel_size % 2 == 0):
            raise ValueError(f"PsfMatchConfig.kernel_size must be odd and >= 3, got {self.kernel_size}")
        if self.spatial_order < 0 or self.background_order < 0:
            raise ValueError("PsfMatchConfig.spatial_order and background_order must be >= 0")
        if self.min_stars < 1 or self.max_stars < self.min_stars:
            raise ValueError("PsfMatchConfig needs 1 <= min_stars <= max_stars")
        if self.fallback_min_stars < 2 or self.fallback_stars_per_term <= 0:
            raise ValueError("PsfMatchConfig needs fallback_min_stars >= 2 and fallback_stars_per_term > 0")
        if not self.min_peak_snr_floor > 0:
            raise ValueError("PsfMatchConfig.min_peak_snr_floor must be > 0")
        if self.sigma_beta <= 1.0 or self.min_sigma <= 0:
            raise ValueError("PsfMatchConfig.sigma_beta must be > 1 and min_sigma > 0")
