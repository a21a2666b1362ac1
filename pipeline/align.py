"""Alignment: resample the template onto the search image's pixel grid.

Two variants share one interpolation order and one mask rule:

* :func:`align_pair` resamples the whole template (image, variance, mask)
  -- what the dia mode needs before PSF matching.  By default (``method =
  "fast"``) the template -> search pixel mapping is fitted by an affine map
  (checked against both WCSs on a coarse grid) and the frame is resampled in
  two separable 1-D passes over large blocks with constant weights; a
  mapping that is not near-affine falls back to the exact ``grid`` path.
  When the two WCSs agree the template is used as it is (no resampling).
* :func:`resample_cutouts` resamples only small cut-outs of the template
  around given search-grid positions -- what the direct mode needs, at a
  tiny fraction of the cost.

Masks are propagated conservatively: a resampled pixel carries every bit of
every input pixel that contributes to it with non-zero weight, and pixels
outside the template footprint are flagged ``NO_DATA``.  The variance is
interpolated, not reduced by the interpolation weights: that is the right
variance to propagate through a smooth PSF-matching kernel (the noise the
interpolation correlates is not destroyed, only moved), and it errs on the
conservative side pixel by pixel.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage

from dia.masks import BAD_FOR_FIT, MaskBits
from pipeline.io import Exposure, InputError

__all__ = ["AlignConfig", "AlignedPair", "PixelMap", "align_pair", "resample_cutouts", "overlap_fraction",
           "template_coverage", "template_has_data", "RegistrationCheck", "check_registration", "refine_registration",
           "pixel_scale_ratio", "fit_affine_mapping", "template_pixels"]

logger = logging.getLogger(__name__)

_METHODS = ("fast", "grid", "reproject")
_ORDERS = {"nearest-neighbor": 0, "bilinear": 1, "biquadratic": 2, "bicubic": 3}

#: Template pixels beyond a cut-out's footprint that :func:`resample_cutouts` prefilters with it (spline orders
#: 2 and 3): the B-spline prefilter's reach decays as |pole|^distance (0.27 for cubic, 0.17 for quadratic), so
#: 12 pixels leave coefficients within ~1e-7 of the whole frame's.
SPLINE_MARGIN = 12


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Parameters of template resampling.

    Attributes
    ----------
    order : str
        Interpolation of the image: ``bicubic`` (default; keeps the PSF shape
        best), ``bilinear``, ``biquadratic`` or ``nearest-neighbor``.  The
        variance and mask planes are always interpolated bilinearly.
    min_overlap : float
        Smallest fraction of search pixels the template must cover (default 0.05);
        below it :class:`~pipeline.io.InputError` is raised ("no overlap").
    method : str
        ``fast`` (default): the search -> template pixel mapping is fitted by an
        affine map on a coarse grid of exact WCS positions; when it holds to
        ``fast_tolerance`` the planes are resampled in two 1-D passes (along rows,
        then along columns: the same cubic B-spline / linear kernels, applied in a
        frame sheared by the rotation) with weights that are constant over large
        blocks (~10x faster than ``grid``, agreement with it in the tests and in
        ``benchmarks/bench_align.py``); otherwise it falls back to ``grid`` and logs
        why.  Only the bicubic (default) and bilinear orders have a fast path.
        ``grid`` (the exact path): the pixel mapping is computed exactly through both
        WCSs every 32 pixels and spline-interpolated in between, then the planes
        are interpolated with scipy in 2-D; ``reproject``: ``reproject.reproject_interp``
        transforms every pixel through both WCSs (same interpolation, ~3x slower than
        ``grid``; the two agree to < 1e-3 of the pixel values, see the tests).  With every
        method, a template whose WCS maps onto the search grid to within
        ``identity_tolerance`` is used as it is (no resampling, no no-data border).
    fast_tolerance : float
        Largest position error (pixels) the ``fast`` method may make (default 0.002): the
        affine fit must reproduce the exact mapping to half of it, and the blocks of
        constant interpolation weights are sized so that each pass errs by at most a
        quarter of it.
    identity_tolerance : float
        When the two WCSs put every search pixel within this many pixels (default 0.001) of
        the same template pixel and the shapes agree, the template is not resampled.
    registration_stars : int
        Bright isolated *template* stars used to check that the template's pixels really sit where
        the two WCSs say (default 40; 0 disables the check).  A template whose pixels were
        rotated, flipped or shifted without updating its WCS fails with a clear error instead
        of giving hundreds of false candidates.  The stars are taken from the template because
        every one of them must be in the search image too: the search's own bright isolated
        sources include its transients, which no template shows (in a transient-rich field
        they are most of the bright isolated search sources).
    registration_min_stars : int
        With fewer usable stars than this the check is skipped (and the skip recorded; default 5).
    registration_star_snr : float
        Least template S/N of a star used (default 100: bright enough to stand out in a search
        image a few magnitudes shallower than the template).
    registration_radius_fwhm : float
        A star is found when the search image's PSF-matched-filter S/N peaks within this many
        FWHM (the larger of the two images', in search pixels; at least 2 px) of its WCS
        position (default 1.5).
    registration_found_snr : float
        Least matched-filter S/N of that search peak (default 5).
    registration_min_fraction : float
        Least fraction of the stars that must be found (default 0.5; variables change by at
        most a magnitude or so, a wrong WCS leaves only chance neighbours).
    registration_max_offset_px : float
        Largest systematic offset (search pixels) between where the found stars are and where the
        WCSs put them (default 1.0): the median over the found stars of what a robust fit of a
        shift plus a linear (rotation, scale, shear) term to their offsets predicts, so that the
        noise of single positions averages out (on correct simulated WCSs it is < 0.1 px; on a real
        pair of DECam stacks, 256 x 256 px with 6 usable stars and FWHMs of 3.9 and 5.2 px, 0.62 px,
        hence the margin).  Catches a template shifted by more than a pixel, or rotated by ~0.15
        degree or more about the centre of a 2k x 2k CCD, without its WCS: misregistrations whose
        stars are still "found" within the radius but would leave dipoles on every star of the
        difference image.  Raise it for real WCSs known to be poorer than that.
    registration_refine : bool
        Correct the template's WCS by the shift the check measures, before anything uses it (default
        True): the robust mean, in template pixels, of where the found stars are in the template minus
        where the two WCSs put the search's measurement of them, applied to the template's ``CRPIX`` when it
        is at least ``registration_refine_min_px`` and ``registration_refine_sigma`` times its standard
        error, from ``registration_refine_min_stars`` stars or more (the check itself, which can refuse a
        pair, still needs ``registration_min_stars``).  A shift only: the zero-point error of an
        astrometric solution; on a real pair of DECam stacks it was 0.5 px, which leaves a dipole on every
        star of the difference and moves every template stamp of the direct mode.  On the simulated pairs
        (exact WCSs) it stays below the threshold and nothing changes.
    registration_refine_min_px : float
        Smallest shift (template pixels, both axes together) applied (default 0.1).
    registration_refine_sigma : float
        Least shift-to-error ratio of an applied shift (default 3).
    registration_refine_min_stars : int
        Fewest found stars a shift is measured from (default 3).
    """

    order: str = "bicubic"
    min_overlap: float = 0.05
    method: str = "fast"
    fast_tolerance: float = 0.002
    identity_tolerance: float = 1e-3
    registration_stars: int = 40
    registration_min_stars: int = 5
    registration_star_snr: float = 100.0
    registration_radius_fwhm: float = 1.5
    registration_found_snr: float = 5.0
    registration_min_fraction: float = 0.5
    registration_max_offset_px: float = 1.0
    registration_refine: bool = True
    registration_refine_min_px: float = 0.1
    registration_refine_sigma: float = 3.0
    registration_refine_min_stars: int = 3

    def __post_init__(self) -> None:
        if self.registration_refine_min_stars < 2 or not self.registration_refine_min_px >= 0 \
                or not self.registration_refine_sigma >= 0:
            raise ValueError("AlignConfig.registration_refine_min_stars must be >= 2 and registration_refine_min_px "
                             f"and registration_refine_sigma >= 0, got {self.registration_refine_min_stars}, "
                             f"{self.registration_refine_min_px} and {self.registration_refine_sigma}")
        if self.registration_stars < 0 or self.registration_min_stars < 1:
            raise ValueError("AlignConfig.registration_stars must be >= 0 and registration_min_stars >= 1")
        if not 0.0 <= self.registration_min_fraction <= 1.0 or self.registration_radius_fwhm <= 0:
            raise ValueError("AlignConfig.registration_min_fraction must be in [0, 1] and "
                             "registration_radius_fwhm > 0")
        for name in ("registration_star_snr", "registration_found_snr", "registration_max_offset_px"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AlignConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.method not in _METHODS:
            raise ValueError(f"AlignConfig.method must be one of {list(_METHODS)}, got {self.method!r}")
        if not self.fast_tolerance > 0 or not self.identity_tolerance >= 0:
            raise ValueError("AlignConfig.fast_tolerance must be > 0 and identity_tolerance >= 0")
        if self.order not in _ORDERS:
            raise ValueError(f"AlignConfig.order must be one of {sorted(_ORDERS)}, got {self.order!r}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"AlignConfig.min_overlap must be in [0, 1], got {self.min_overlap}")


@dataclasses.dataclass
class AlignedPair:
    """A search exposure and the template resampled onto its pixel grid.

    ``template`` shares ``search.wcs``; its metadata (FWHM, zero point...) are
    the original template's.  ``overlap`` is the fraction of search pixels with
    template data; ``seconds`` the wall time of the resampling.
    """

    search: Exposure
    template: Exposure
    overlap: float
    seconds: float
    scale_ratio: float = 1.0
    """Template pixels per search pixel (linear, at the image centre); the resampled template's
    ``fwhm`` has been divided by it, so every PSF size past alignment is in search pixels."""
    registration: "RegistrationCheck | None" = None
    """Result of :func:`check_registration` (None when the check is disabled)."""
    variance_factor: float = 1.0
    """Per-pixel noise variance of the resampled template relative to its ``variance`` plane.

    Interpolation averages neighbouring pixels, so the resampled pixels are less noisy
    (by this factor, < 1) but correlated.  The ``variance`` plane is *not* reduced: that is
    the right variance to propagate through a smooth PSF-matching kernel; multiply by this
    factor where the template is used pixel by pixel (when the search is the convolved image).
    """
    method: str = ""
    """How the template was resampled: ``identity`` (WCSs agree, not resampled), ``fast``,
    ``grid`` (also when ``fast`` fell back) or ``reproject``."""


def template_pixels(search_wcs: WCS, template_wcs: WCS, xs: np.ndarray, ys: np.ndarray):
    """Template pixel coordinates of search pixel coordinates (any shape), exact through both WCSs.

    Through the WCSs' low-level ``*_values`` methods (no sky-coordinate objects); swap the two WCSs for the
    inverse mapping.

    Returns
    -------
    tx, ty : ndarray
        Shaped as ``xs``.
    """
    world = search_wcs.pixel_to_world_values(np.ravel(xs), np.ravel(ys))
    tx, ty = template_wcs.world_to_pixel_values(*world)
    return np.asarray(tx).reshape(np.shape(xs)), np.asarray(ty).reshape(np.shape(xs))


@dataclasses.dataclass
class PixelMap:
    """Search-pixel -> template-pixel mapping, exact on a coarse grid and spline-interpolated between.

    Sky projections are smooth on the scale of tens of pixels, so a bicubic
    spline through the exact mapping every ``step`` pixels reproduces it to
    well below 1e-3 pixel at a small fraction of the cost of transforming every
    pixel through two WCSs (the way SWarp resamples).
    """

    spline_x: object
    spline_y: object

    @classmethod
    def build(cls, search_wcs: WCS, template_wcs: WCS, x_range: tuple[float, float],
              y_range: tuple[float, float], step: int = 32, margin: int = 32) -> "PixelMap":
        """Exact mapping on a grid covering ``x_range`` x ``y_range`` (search pixels) plus a margin."""
        from scipy.interpolate import RectBivariateSpline

        gx = np.arange(x_range[0] - margin, x_range[1] + margin + step, step, dtype=float)
        gy = np.arange(y_range[0] - margin, y_range[1] + margin + step, step, dtype=float)
        if gx.size < 4:
            gx = np.linspace(gx[0], gx[-1] + 3 * step, 4)
        if gy.size < 4:
            gy = np.linspace(gy[0], gy[-1] + 3 * step, 4)
        xx, yy = np.meshgrid(gx, gy)
        tx, ty = template_pixels(search_wcs, template_wcs, xx, yy)
        return cls(RectBivariateSpline(gy, gx, tx, kx=3, ky=3), RectBivariateSpline(gy, gx, ty, kx=3, ky=3))

    def grid(self, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
        """Template coordinates of every pixel of the (ny, nx) search grid starting at (0, 0)."""
        y, x = np.arange(ny, dtype=float), np.arange(nx, dtype=float)
        return self.spline_x(y, x, grid=True), self.spline_y(y, x, grid=True)

    def boxes(self, x0: np.ndarray, y0: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Template coordinates of ``size`` x ``size`` boxes of search pixels starting at ``(x0[i], y0[i])``:
        arrays (n, size, size), the same values as :meth:`points` at those pixels, each box evaluated on its own
        grid (two 1-D spline bases per box instead of one scattered evaluation per pixel: ~20x cheaper)."""
        n = np.size(x0)
        tx, ty = np.empty((n, size, size)), np.empty((n, size, size))
        offs = np.arange(size, dtype=float)
        for i, (bx, by) in enumerate(zip(np.ravel(x0).astype(float), np.ravel(y0).astype(float))):
            tx[i] = self.spline_x(by + offs, bx + offs, grid=True)
            ty[i] = self.spline_y(by + offs, bx + offs, grid=True)
        return tx, ty

    def points(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Template coordinates of arbitrary search positions (any shape)."""
        shape = np.shape(x)
        xs, ys = np.ravel(x).astype(float), np.ravel(y).astype(float)
        return (self.spline_x(ys, xs, grid=False).reshape(shape), self.spline_y(ys, xs, grid=False).reshape(shape))


def pixel_scale_ratio(search: Exposure, template: Exposure) -> float:
    """Template pixels per search pixel (linear), from the pixel mapping's Jacobian at the search centre."""
    ny, nx = search.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    xs = np.array([cx - 1.0, cx + 1.0, cx, cx])
    ys = np.array([cy, cy, cy - 1.0, cy + 1.0])
    tx, ty = template_pixels(search.wcs, template.wcs, xs, ys)
    jac = np.array([[tx[1] - tx[0], tx[3] - tx[2]], [ty[1] - ty[0], ty[3] - ty[2]]]) / 2.0
    det = abs(float(np.linalg.det(jac)))
    if not np.isfinite(det) or det <= 0:
        raise InputError(f"the WCSs of {search.name!r} and {template.name!r} give a degenerate pixel mapping "
                         f"at the search centre (Jacobian {jac.tolist()})")
    return float(np.sqrt(det))


def template_has_data(search_wcs: WCS, template: Exposure, x, y, *, bits: int = int(MaskBits.NO_DATA),
                      margin: int = 0) -> np.ndarray:
    """Whether the template has data at search-pixel positions ``(x, y)`` (any shape).

    A position has data when it maps through both WCSs onto a template pixel at least
    ``margin`` pixels from the template's border that has none of the mask ``bits``
    (``bits=0``: the footprint alone).  The one rule behind :func:`overlap_fraction`,
    :func:`template_coverage`, :func:`check_registration` and the direct mode's candidate filter.
    """
    tx, ty = template_pixels(search_wcs, template.wcs, np.asarray(x, float), np.asarray(y, float))
    tny, tnx = template.shape
    with np.errstate(invalid="ignore"):
        ix, iy = np.rint(tx), np.rint(ty)
        inside = (ix >= margin) & (ix <= tnx - 1 - margin) & (iy >= margin) & (iy <= tny - 1 - margin)
    ixc = np.where(inside, ix, 0).astype(int)
    iyc = np.where(inside, iy, 0).astype(int)
    return inside & ((template.mask[iyc, ixc] & bits) == 0)


def template_coverage(search: Exposure, template: Exposure, grid: int = 65) -> float:
    """Fraction of the search image where the template has data (:func:`template_has_data`).

    Sampled on a ``grid`` x ``grid`` lattice of search pixels; a half-NaN template covers
    about half.
    """
    ny, nx = search.shape
    ys, xs = np.meshgrid(np.linspace(0, ny - 1, grid), np.linspace(0, nx - 1, grid), indexing="ij")
    return float(template_has_data(search.wcs, template, xs, ys).mean())


@dataclasses.dataclass(frozen=True)
class RegistrationCheck:
    """Do the template's pixels sit where the WCSs say?  Result of :func:`check_registration`."""

    n_stars: int
    """Bright isolated template stars looked for in the search image."""
    n_found: int
    """Of those, how many have a search source within the match radius of their WCS position."""
    median_offset_px: float
    """Median distance (search pixels) from the WCS position to the search peak, found stars only."""
    radius_px: float
    """Match radius in search pixels."""
    checked: bool
    """False when there were too few stars to decide (the pair is then accepted)."""
    median_dx_px: float = float("nan")
    """Median x offset (search pixels, search peak minus WCS position) of the found stars."""
    median_dy_px: float = float("nan")
    """Median y offset (search pixels) of the found stars."""
    systematic_offset_px: float = float("nan")
    """What ``registration_max_offset_px`` limits: the median over the found stars of the offset that a
    robust fit (a shift, plus a rotation / scale / shear with 8 stars or more) to their offsets predicts."""
    shift_x_px: float = float("nan")
    """Template pixels by which the found stars sit to the right of where the WCSs put the search's measurement of
    them (robust mean; NaN with fewer than ``registration_refine_min_stars``): what :func:`refine_registration`
    adds to the template's ``CRPIX``."""
    shift_y_px: float = float("nan")
    """The same along y."""
    shift_err_px: float = float("nan")
    """Standard error of the shift (template pixels, per axis)."""
    n_shift: int = 0
    """Stars the shift was measured from (after clipping)."""
    applied: bool = False
    """Whether :func:`refine_registration` corrected the template's WCS by the shift."""

    @property
    def fraction(self) -> float:
        """Fraction of the stars found (NaN without stars)."""
        return self.n_found / self.n_stars if self.n_stars else float("nan")

    def as_dict(self) -> dict:
        """JSON-able summary for status records."""
        out = dataclasses.asdict(self)
        for key in ("median_offset_px", "median_dx_px", "median_dy_px", "systematic_offset_px", "shift_x_px",
                    "shift_y_px", "shift_err_px"):
            value = float(getattr(self, key))
            out[key] = round(value, 3) if np.isfinite(value) else None
        out["radius_px"] = round(float(self.radius_px), 3)
        return out


def _sky(image: np.ndarray) -> float:
    """A global sky level: the median of a sparse (about 256 x 256) sample of the image."""
    return float(np.median(image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]))


def _masked_median(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Median of the ``good`` values of each window of a ``(n, h, w)`` stack (0 where a window has none), as
    ``np.median(window[good])``: the middle one, or the mean of the two middle ones."""
    n = len(values)
    flat = np.sort(np.where(good, values, np.inf).reshape(n, -1), axis=1)  # the good values first, in order
    count = good.reshape(n, -1).sum(axis=1)
    rows = np.arange(n)
    a, b = flat[rows, np.maximum((count - 1) // 2, 0)], flat[rows, count // 2]
    return np.where(count > 0, (a + b) / 2, 0).astype(values.dtype, copy=False)


def _matched_filter_snr(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, fwhm: float) -> np.ndarray:
    """PSF-matched-filter S/N of a point source at every pixel of small windows (Gaussian PSF).

    ``image``, ``variance`` and ``mask`` are stacks of windows, ``(n, h, w)``, each filtered on its own.
    ``F = corr(D / V, P)``, ``W = corr(1 / V, P**2)``, ``snr = F / sqrt(W)`` with ``D`` the window
    minus its median (a local sky) and pixels flagged in :data:`~dia.masks.BAD_FOR_FIT` given zero
    weight; a window with no usable pixel gets 0.  Smoothing by the PSF makes a single hot pixel or
    cosmic ray far less significant than a star of the same peak, and the S/N is that of a PSF flux,
    whatever the seeing.
    """
    good = ((mask & int(BAD_FOR_FIT)) == 0) & (variance > 0) & np.isfinite(image) & np.isfinite(variance)
    sigma = max(float(fwhm), 1.0) / 2.3548
    weight = np.where(good, 1.0 / np.where(good, variance, 1.0), 0.0)
    data = np.where(good, image - _masked_median(image, good)[:, None, None], 0.0)
    # corr(x, P) with P a unit-sum Gaussian is gaussian_filter(x, sigma); P**2 is a Gaussian of
    # sigma / sqrt(2) with sum 1 / (4 pi sigma**2); sigma 0 along the stack: each window on its own
    flux = ndimage.gaussian_filter(data * weight, (0.0, sigma, sigma), mode="constant", truncate=3.0)
    info = ndimage.gaussian_filter(weight, (0.0, sigma / np.sqrt(2.0), sigma / np.sqrt(2.0)), mode="constant",
                                   truncate=3.0)
    info /= 4.0 * np.pi * sigma**2
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(info > 0, flux / np.sqrt(info), 0.0)
    return np.nan_to_num(snr).astype(np.float32)


def _windowed_centroid(image: np.ndarray, mask: np.ndarray, xx: np.ndarray, yy: np.ndarray, x0: np.ndarray,
                       y0: np.ndarray, fwhm: float, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids of sources near ``(x0, y0)``, one per window of a stack.

    ``image`` and ``mask`` are ``(n, h, w)`` windows, ``xx`` and ``yy`` their pixel coordinates (``(n, 1, w)`` and
    ``(n, h, 1)``, or broadcast to the windows' shape), ``x0`` and ``y0`` the ``n`` starting points. Iterates ``x +=
    2 sum(w I (x_i - x)) / sum(w I)`` with ``w`` a Gaussian of the PSF's width: the fixed point is the centre of any
    symmetric profile, unbiased by the pixel phase even for an undersampled (binned) image, and a neighbour a few
    FWHM away barely weighs. ``I`` is the window minus its median; flagged pixels are left out. A window falls back
    to its ``(x0, y0)`` when its windowed flux is not positive or the centroid wanders more than 2 FWHM; each stops
    when it moves less than 1e-3 px.
    """
    good = ((mask & int(BAD_FOR_FIT)) == 0) & np.isfinite(image)
    data = np.where(good, image - _masked_median(image, good)[:, None, None], 0.0)
    sigma = max(float(fwhm), 1.0) / 2.3548
    x0, y0 = np.asarray(x0, float), np.asarray(y0, float)
    x, y = x0.copy(), y0.copy()
    running = np.ones(len(data), bool)
    fallback = np.zeros(len(data), bool)
    for _ in range(iterations):
        act = np.flatnonzero(running)
        if act.size == 0:
            break
        ux = xx[act] - x[act, None, None]
        uy = yy[act] - y[act, None, None]
        wi = data[act] * np.exp(-0.5 * (ux**2 + uy**2) / sigma**2)
        total = wi.sum(axis=(1, 2))
        positive = total > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            dx = np.clip(2.0 * (wi * ux).sum(axis=(1, 2)) / total, -1.0, 1.0)
            dy = np.clip(2.0 * (wi * uy).sum(axis=(1, 2)) / total, -1.0, 1.0)
        moved = act[positive]
        x[moved] += dx[positive]
        y[moved] += dy[positive]
        lost = act[~positive]
        fallback[lost] = True
        running[lost] = False
        wandered = moved[np.hypot(x[moved] - x0[moved], y[moved] - y0[moved]) > 2.0 * fwhm]
        fallback[wandered] = True
        running[wandered] = False
        settled = moved[(np.abs(dx[positive]) < 1e-3) & (np.abs(dy[positive]) < 1e-3)]
        running[settled] = False
    return np.where(fallback, x0, x), np.where(fallback, y0, y)


def _systematic_offset(x: np.ndarray, y: np.ndarray, dx: np.ndarray, dy: np.ndarray, size: float) -> float:
    """Median over the stars of the offset a robust fit to the stars' offsets ``(dx, dy)`` predicts.

    The fit is a shift, plus linear terms in ``x``, ``y`` (a rotation, scale or shear) with 8 stars or
    more; offsets more than ``max(0.5, 3 robust sigma)`` from it are dropped (chance neighbours) and it
    is fitted again.  A shift or rotation of the template shows in full, the measurement noise of
    single stars is averaged out.  ``size`` (pixels) scales the coordinates for the fit.
    """
    n = dx.size
    if n == 0:
        return float("nan")
    u = (x - np.mean(x)) / size
    v = (y - np.mean(y)) / size
    design = np.column_stack([np.ones(n), u, v]) if n >= 8 else np.ones((n, 1))
    keep = np.ones(n, bool)
    for _ in range(5):
        cx = np.linalg.lstsq(design[keep], dx[keep], rcond=None)[0]
        cy = np.linalg.lstsq(design[keep], dy[keep], rcond=None)[0]
        resid = np.hypot(dx - design @ cx, dy - design @ cy)
        limit = max(0.5, 3.0 * 1.4826 * float(np.median(resid[keep])))
        new = resid <= limit
        if new.sum() < max(3, design.shape[1]) or np.array_equal(new, keep):
            break
        keep = new
    return float(np.median(np.hypot(design @ cx, design @ cy)[keep]))


def _robust_shift(dx: np.ndarray, dy: np.ndarray, min_stars: int, floor_px: float = 0.05):
    """Clipped mean of per-star offsets ``(dx, dy)`` and its standard error per axis: offsets more than
    ``max(0.5, 3 robust sigma)`` px from the median (chance neighbours, blends) are dropped; each star's scatter
    is taken as at least ``floor_px`` (centroids are never better than that here), so a few stars that agree by
    chance do not make a tiny error.  NaNs and 0 stars with fewer than ``min_stars``."""
    good = np.isfinite(dx) & np.isfinite(dy)
    dx, dy = dx[good], dy[good]
    if dx.size < min_stars:
        return float("nan"), float("nan"), float("nan"), 0
    r = np.hypot(dx - np.median(dx), dy - np.median(dy))
    keep = r <= max(0.5, 3.0 * 1.4826 * float(np.median(r)))
    if keep.sum() < min_stars:
        return float("nan"), float("nan"), float("nan"), 0
    n = int(keep.sum())
    scatter = max(floor_px, float(np.sqrt(0.5 * (np.var(dx[keep], ddof=1) + np.var(dy[keep], ddof=1)))))
    return float(np.mean(dx[keep])), float(np.mean(dy[keep])), scatter / np.sqrt(n), n


def refine_registration(template: Exposure, check: RegistrationCheck,
                        config: AlignConfig = AlignConfig()) -> tuple[Exposure, RegistrationCheck]:
    """The template with its WCS corrected by the shift :func:`check_registration` measured, when significant.

    The shift (``check.shift_x_px``, ``shift_y_px``: template pixels) is added to the template WCS's reference
    pixel, so that its stars map onto the search's measurement of them; applied when
    ``config.registration_refine`` is set and the shift is at least ``registration_refine_min_px`` and
    ``registration_refine_sigma`` standard errors.  The input is not modified.

    Returns
    -------
    template : Exposure
        The same exposure, or a copy with the corrected WCS and a ``registration`` note in its provenance.
    check : RegistrationCheck
        ``check`` with ``applied`` set accordingly.
    """
    size = float(np.hypot(check.shift_x_px, check.shift_y_px))
    significant = (size >= config.registration_refine_min_px
                   and size >= config.registration_refine_sigma * check.shift_err_px)
    if not (config.registration_refine and check.n_shift >= config.registration_refine_min_stars and significant):
        return template, check
    wcs = template.wcs.deepcopy()
    wcs.wcs.crpix = wcs.wcs.crpix + np.array([check.shift_x_px, check.shift_y_px])
    wcs.wcs.set()
    note = (f"WCS reference pixel shifted by ({check.shift_x_px:+.3f}, {check.shift_y_px:+.3f}) px "
            f"+- {check.shift_err_px:.3f}, measured on {check.n_shift} stars found in the search image")
    provenance = dict(template.provenance, registration=note)
    return dataclasses.replace(template, wcs=wcs, provenance=provenance), dataclasses.replace(check, applied=True)


def _find_peaks_near(exposure: Exposure, x: np.ndarray, y: np.ndarray, radius: float, fwhm: float):
    """Matched-filter S/N peak within ``radius`` pixels of each position ``(x, y)`` of ``exposure``.

    Returns the sub-pixel positions (:func:`_windowed_centroid` started at the highest pixel) and
    the S/N of the peaks.  The caller keeps the positions at least ``radius + 2 fwhm + 2`` pixels
    from the border; a window that still leaves the image gets S/N 0 and a NaN position.  All the
    windows are cut, filtered and centroided as one stack.
    """
    r = int(np.ceil(radius))
    pad = int(np.ceil(2.0 * fwhm)) + 2  # the filter needs the light around the search disc
    h = r + pad
    ny, nx = exposure.shape
    x, y = np.asarray(x, float), np.asarray(y, float)
    px, py = np.full(len(x), np.nan), np.full(len(x), np.nan)
    peak = np.zeros(len(x))
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = np.flatnonzero((h <= ix) & (ix <= nx - 1 - h) & (h <= iy) & (iy <= ny - 1 - h))
    if inside.size == 0:
        return px, py, peak
    off = np.arange(-h, h + 1)
    yy = (iy[inside, None] + off)[:, :, None]  # (n, w, 1) pixel rows of each window
    xx = (ix[inside, None] + off)[:, None, :]  # (n, 1, w) pixel columns
    image, mask = exposure.image[yy, xx], exposure.mask[yy, xx]
    snr = _matched_filter_snr(image, exposure.variance[yy, xx], mask, fwhm)
    near = np.hypot(xx - x[inside, None, None], yy - y[inside, None, None]) <= radius
    snr = np.where(near, snr, -np.inf).reshape(len(inside), -1)
    k = np.argmax(snr, axis=1)
    ky, kx = np.divmod(k, 2 * h + 1)
    peak[inside] = snr[np.arange(len(inside)), k]
    px[inside], py[inside] = _windowed_centroid(image, mask, xx, yy, ix[inside] + kx - h, iy[inside] + ky - h, fwhm)
    return px, py, peak


def check_registration(search: Exposure, template: Exposure, config: AlignConfig = AlignConfig()) -> RegistrationCheck:
    """Check that bright template stars appear in the search image where the two WCSs put them.

    The brightest isolated point-like sources of the template (``registration_stars`` of them
    with template S/N above ``registration_star_snr``) are located in the template, mapped
    through both WCSs onto the search grid (those falling where the search has no data, or onto
    saturated or bad search pixels, are left out) and looked for there: a star is found when the
    search image's PSF-matched-filter S/N peaks above ``registration_found_snr`` within
    ``registration_radius_fwhm`` FWHM of that position.  The template is the reference because
    all its stars must be in the search image, whereas the search's bright sources include its
    transients.  Cheap (a few dozen small windows) and independent of PSF matching, so both
    modes use it.

    Parameters
    ----------
    search, template : Exposure
        The pair, each on its own pixel grid with a celestial WCS.
    config : AlignConfig
        The ``registration_*`` settings.

    Returns
    -------
    RegistrationCheck
        What was found; ``checked`` is False when fewer than ``registration_min_stars`` stars
        could be used (the pair is then accepted).

    Raises
    ------
    InputError
        When enough stars were tried and fewer than ``registration_min_fraction`` were found, or
        the found ones are systematically offset from their WCS positions by more than
        ``registration_max_offset_px`` (:attr:`RegistrationCheck.systematic_offset_px`): the
        template's WCS does not describe its pixels.
    """
    from pipeline.detect import bright_isolated_stars

    t_fwhm = float(template.fwhm) if np.isfinite(template.fwhm) and template.fwhm > 0 else 3.0
    s_fwhm = float(search.fwhm) if np.isfinite(search.fwhm) and search.fwhm > 0 else 3.0
    if config.registration_stars == 0:
        return RegistrationCheck(0, 0, float("nan"), float("nan"), False)
    scale = pixel_scale_ratio(search, template)  # template px per search px
    fwhm = max(s_fwhm, t_fwhm / scale)  # search px
    radius = max(2.0, config.registration_radius_fwhm * fwhm)
    # reference stars: the brightest isolated template stars (asking for more than needed, as the
    # isolation cut comes after the brightness cut), re-measured the way they are measured in the search
    sky = _sky(template.image)
    cx, cy = bright_isolated_stars(template.image - sky, template.variance, template.mask, t_fwhm,
                                   min_snr=config.registration_star_snr, isolation=4.0,
                                   max_stars=10 * config.registration_stars)
    # re-measured brightest first (by peak pixel S/N), in batches, until registration_stars usable ones are in
    # hand: a crowded CCD offers ~10x more candidates than the check needs, each a window to filter
    ix, iy = np.rint(cx).astype(int), np.rint(cy).astype(int)
    pixel_snr = (template.image[iy, ix] - sky) / np.sqrt(np.maximum(template.variance[iy, ix], 1e-30))
    rank = np.argsort(-np.nan_to_num(pixel_snr, nan=-np.inf), kind="stable")
    cx, cy = cx[rank], cy[rank]
    margin = int(np.ceil(radius + 2.0 * fwhm)) + 2
    core = int(np.ceil(fwhm))
    parts: list[tuple[np.ndarray, ...]] = []
    n_usable, batch = 0, 2 * max(config.registration_stars, 1)
    for start in range(0, cx.size, batch):
        if n_usable >= config.registration_stars:
            break
        tx, ty, t_peak = _find_peaks_near(template, cx[start : start + batch], cy[start : start + batch],
                                          max(1.0, 0.5 * t_fwhm), t_fwhm)
        ok = np.isfinite(tx) & (t_peak >= config.registration_found_snr)
        tx, ty, t_peak = tx[ok], ty[ok], t_peak[ok]
        sx, sy = template_pixels(template.wcs, search.wcs, tx, ty)  # template -> search pixels
        # usable: on the search's data, far enough from its border for the window, core not saturated / bad
        usable = template_has_data(template.wcs, search, tx, ty, bits=int(MaskBits.NO_DATA), margin=margin)
        for i in np.flatnonzero(usable):
            jx, jy = int(np.rint(sx[i])), int(np.rint(sy[i]))
            usable[i] = not (search.mask[jy - core : jy + core + 1, jx - core : jx + core + 1]
                             & int(BAD_FOR_FIT)).any()
        parts.append((sx[usable], sy[usable], t_peak[usable], tx[usable], ty[usable]))
        n_usable += int(usable.sum())
    if parts:
        sx, sy, t_peak, tx, ty = (np.concatenate(a) for a in zip(*parts))
    else:
        sx = sy = t_peak = tx = ty = np.zeros(0)
    order = np.argsort(-t_peak, kind="stable")[: config.registration_stars]
    sx, sy, tx, ty = sx[order], sy[order], tx[order], ty[order]
    n = int(order.size)
    checked = n >= config.registration_min_stars
    if not checked and not (config.registration_refine and n >= config.registration_refine_min_stars):
        return RegistrationCheck(n, 0, float("nan"), radius, False)
    px, py, peak = _find_peaks_near(search, sx, sy, radius, s_fwhm)
    found = peak >= config.registration_found_snr
    dx, dy = px[found] - sx[found], py[found] - sy[found]
    offsets = np.hypot(dx, dy)
    med = float(np.median(offsets)) if offsets.size else float("nan")
    systematic = _systematic_offset(sx[found], sy[found], dx, dy, float(max(search.shape)))
    # the same offsets in the template's pixels: where each star is there, minus where the WCSs put its search peak
    ux, uy = template_pixels(search.wcs, template.wcs, px[found], py[found])
    shift = _robust_shift(tx[found] - ux, ty[found] - uy, config.registration_refine_min_stars)
    result = RegistrationCheck(n, int(found.sum()), med, radius, checked,
                               float(np.median(dx)) if dx.size else float("nan"),
                               float(np.median(dy)) if dy.size else float("nan"), systematic, *shift)
    if not checked:
        return result
    settings = ("align.registration_min_fraction, align.registration_max_offset_px and "
                "align.registration_radius_fwhm set this check; align.registration_stars = 0 disables it")
    if result.fraction < config.registration_min_fraction:
        raise InputError(
            f"template {template.name!r} does not line up with search {search.name!r} through their WCSs: "
            f"{result.n_found} of {n} bright isolated template stars have a search source within "
            f"{radius:.1f} search px of their WCS position (need {config.registration_min_fraction:.0%}); "
            f"the template's WCS does not describe its pixels (rotated, flipped or shifted image?). {settings}"
        )
    if not systematic <= config.registration_max_offset_px:
        raise InputError(
            f"template {template.name!r} does not line up with search {search.name!r} through their WCSs: "
            f"the {result.n_found} of {n} bright isolated template stars found in the search are offset from "
            f"their WCS positions by a systematic {systematic:.2f} search px (median dx "
            f"{result.median_dx_px:+.2f}, dy {result.median_dy_px:+.2f}; allowed "
            f"{config.registration_max_offset_px:g} px); the template's WCS does not describe its pixels "
            f"(shifted or rotated image?). {settings}"
        )
    return result


def overlap_fraction(search: Exposure, template: Exposure, grid: int = 33) -> float:
    """Approximate fraction of the search image covered by the template's footprint (coarse grid)."""
    ny, nx = search.shape
    ys, xs = np.meshgrid(np.linspace(0, ny - 1, grid), np.linspace(0, nx - 1, grid), indexing="ij")
    return float(template_has_data(search.wcs, template, xs, ys, bits=0).mean())


def _bilinear_with_mask(values: np.ndarray, mask: np.ndarray, tx: np.ndarray, ty: np.ndarray):
    """Bilinear interpolation of ``values`` and the OR of ``mask`` over the 2x2 contributing pixels.

    Equivalent to interpolating each mask bit bilinearly and flagging any
    non-zero result, in one pass.  Outside the input: NaN and 0.
    """
    ny, nx = values.shape
    x0 = np.floor(tx)
    y0 = np.floor(ty)
    fx = (tx - x0).astype(np.float32)
    fy = (ty - y0).astype(np.float32)
    inside = (x0 >= -1) & (x0 <= nx - 1) & (y0 >= -1) & (y0 <= ny - 1) & np.isfinite(tx) & np.isfinite(ty)
    x0 = np.where(inside, x0, 0).astype(np.int64)
    y0 = np.where(inside, y0, 0).astype(np.int64)
    out = np.zeros(tx.shape, np.float32)
    weight = np.zeros(tx.shape, np.float32)
    omask = np.zeros(tx.shape, np.int32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            ok = inside & (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            xi, yi = np.clip(xi, 0, nx - 1), np.clip(yi, 0, ny - 1)
            w = np.where(ok, wx * wy, 0.0)
            out += w * values[yi, xi]
            weight += w
            omask |= np.where(ok & (w > 1e-3), mask[yi, xi], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(weight > 0.999, out, np.nan).astype(np.float32)
    return out, omask


def _mask_bits_present(mask: np.ndarray) -> list[int]:
    present = int(np.bitwise_or.reduce(mask.ravel())) if mask.size else 0
    return [int(b) for b in MaskBits if present & int(b)]


def _mapping_samples(search_wcs: WCS, template_wcs: WCS, shape: tuple[int, int], step: int = 128):
    """Exact template positions of a coarse lattice of search pixels (every ``step`` pixels and the edges)."""
    ny, nx = shape
    gx = np.unique(np.r_[np.arange(0, nx, step), nx - 1]).astype(float)
    gy = np.unique(np.r_[np.arange(0, ny, step), ny - 1]).astype(float)
    xx, yy = np.meshgrid(gx, gy)
    tx, ty = template_pixels(search_wcs, template_wcs, xx, yy)
    return xx.ravel(), yy.ravel(), tx.ravel(), ty.ravel()


def fit_affine_mapping(search_wcs: WCS, template_wcs: WCS, shape: tuple[int, int],
                       step: int = 128) -> tuple[np.ndarray, float]:
    """Least-squares affine fit of the search -> template pixel mapping over a search grid of ``shape``.

    Parameters
    ----------
    search_wcs, template_wcs : astropy.wcs.WCS
        The two celestial WCSs.
    shape : tuple of int
        ``(ny, nx)`` of the search grid.
    step : int
        Spacing (search pixels) of the lattice of exact positions the map is fitted to
        (default 128; the lattice always includes the last row and column).

    Returns
    -------
    coef : ndarray (2, 3)
        ``tx = coef[0] @ (x, y, 1)``, ``ty = coef[1] @ (x, y, 1)`` (0-based pixels).
    max_residual : float
        Largest distance (template pixels) between the fit and the exact mapping on the
        lattice; ``inf`` when some lattice point has no template position.
    """
    xs, ys, tx, ty = _mapping_samples(search_wcs, template_wcs, shape, step)
    if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
        return np.full((2, 3), np.nan), float("inf")
    x0, y0 = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0  # centred for conditioning
    design = np.column_stack([xs - x0, ys - y0, np.ones_like(xs)])
    cx = np.linalg.lstsq(design, tx, rcond=None)[0]
    cy = np.linalg.lstsq(design, ty, rcond=None)[0]
    resid = float(np.max(np.hypot(design @ cx - tx, design @ cy - ty)))
    coef = np.array([[cx[0], cx[1], cx[2] - cx[0] * x0 - cx[1] * y0],
                     [cy[0], cy[1], cy[2] - cy[0] * x0 - cy[1] * y0]])
    return coef, resid


def _is_identity(search: Exposure, template: Exposure, tolerance: float) -> bool:
    """Same shape and both WCSs put every lattice pixel within ``tolerance`` of the same template pixel."""
    if search.shape != template.shape:
        return False
    xs, ys, tx, ty = _mapping_samples(search.wcs, template.wcs, search.shape, step=64)
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(tx - xs) <= tolerance) and np.all(np.abs(ty - ys) <= tolerance))


# ---- the fast path: two separable 1-D passes with block-constant weights ---------------------------

_POLE = np.sqrt(3.0) - 2.0  # the cubic B-spline's prefilter pole


def _filter_axis0(a: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Cubic B-spline coefficients along axis 0 (mirror boundaries), float32, as scipy's ``spline_filter1d``.

    A row-at-a-time recursion: scipy filters columns one by one through a strided copy,
    ~10x slower on a C-ordered frame.  ``overwrite``: filter a float32 ``a`` in place.
    """
    n = a.shape[0]
    if n < 32:
        return ndimage.spline_filter1d(a, 3, axis=0, mode="mirror", output=np.float32)
    c = np.multiply(a, np.float32(6.0), out=a if overwrite else None)  # gain (1 - z)(1 - 1/z)
    z = np.float32(_POLE)
    powers = (_POLE ** np.arange(32)).astype(np.float32)  # mirror init, truncated where z**k < 1e-18
    c[0] = powers @ c[:32]
    tmp = np.empty(a.shape[1:], np.float32)
    rows = list(c)  # the row views once: the recursion is ~4 n calls on short rows, indexing would cost as much
    multiply, add, subtract = np.multiply, np.add, np.subtract
    for prev, row in zip(rows[:-1], rows[1:]):
        multiply(prev, z, out=tmp)
        add(row, tmp, out=row)
    c[n - 1] = (z / (z * z - 1)) * (z * c[n - 2] + c[n - 1])
    for row, nxt in zip(rows[-2::-1], rows[:0:-1]):
        subtract(nxt, row, out=tmp)
        multiply(tmp, z, out=row)
    return c


def _cubic_weights(f: np.ndarray) -> list[np.ndarray]:
    """Cubic B-spline weights of the taps at -1, 0, 1, 2 for fractional positions ``f`` in [0, 1)."""
    f2 = f * f
    f3 = f2 * f
    w0 = (1.0 - f) ** 3 / 6.0
    w1 = 2.0 / 3.0 - f2 + 0.5 * f3
    w3 = f3 / 6.0
    return [w.astype(np.float32) for w in (w0, w1, 1.0 - w0 - w1 - w3, w3)]


def _segments(n: int, drift: float, tol: float) -> list[tuple[int, int, float]]:
    """Split ``0..n`` into segments over which ``drift * u`` varies by at most ``2 tol`` (start, stop, centre)."""
    length = n if abs(drift) * max(n - 1, 0) <= 2 * tol else max(1, int(2 * tol / abs(drift)) + 1)
    return [(s, min(s + length, n), (s + min(s + length, n) - 1) / 2.0) for s in range(0, n, length)]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of the runs of equal consecutive values."""
    cut = np.flatnonzero(np.diff(values)) + 1
    starts = np.r_[0, cut]
    stops = np.r_[cut, values.size]
    return list(zip(starts.tolist(), stops.tolist()))


def _edge_taps(src_img, src_var, src_mask, rows, cols, base, f, w, cubic):
    """Per-pixel interpolation where the 1-D taps leave the source row (mirror for the spline, drop for linear).

    ``rows`` (R,) and ``cols`` (C,) index the output block; the sampled position of
    output ``(r, c)`` is ``c + base + f[r]`` along axis 1 of the source (``base``: an integer, or one per row
    as an ``(R, 1)`` array).
    """
    width = src_img.shape[1]
    r = rows[:, None]
    pos = cols[None, :] + base
    if cubic:
        img = np.zeros((rows.size, cols.size), np.float32)
        for t in range(4):
            i = np.abs(pos + (t - 1))  # mirror at 0 ...
            i = np.where(i > width - 1, 2 * (width - 1) - i, i)  # ... and at width - 1
            img += w[t][rows][:, None] * src_img[r, np.clip(i, 0, width - 1)]
    var = np.zeros((rows.size, cols.size), np.float32)
    mask = np.zeros((rows.size, cols.size), src_mask.dtype)
    lin = (1.0 - f[rows], f[rows])
    for t in range(2):
        i = pos + t
        ok = (i >= 0) & (i < width)
        ic = np.clip(i, 0, width - 1)
        var += np.where(ok, lin[t][:, None] * src_var[r, ic], 0.0).astype(np.float32)
        mask |= np.where(ok & (lin[t][:, None] > 1e-3), src_mask[r, ic], 0).astype(src_mask.dtype)
    if not cubic:
        img = np.zeros((rows.size, cols.size), np.float32)
        for t in range(2):
            i = pos + t
            ok = (i >= 0) & (i < width)
            img += np.where(ok, lin[t][:, None] * src_img[r, np.clip(i, 0, width - 1)], 0.0).astype(np.float32)
    return img, var, mask


_CHUNK = 65536  # elements per block operation: few numpy calls, the block and its temporaries still in the L2 cache


def _pieces(lo: int, hi: int, length: int, n_rows: int, row_major: bool):
    """Split output columns ``lo:hi`` into ``(p, q, s, n_seg)``: ``n_seg`` whole segments of ``length`` columns
    from segment ``s``, or part of segment ``s`` (``n_seg = 1``); each piece of ``n_rows`` rows is about
    ``_CHUNK`` elements or fewer where the outer memory axis is the column (transposed views), the caller
    splitting the rows otherwise."""
    pieces = []
    body0 = min(-(-lo // length) * length, hi)
    body1 = max(hi // length * length, body0)
    if body0 > lo:
        pieces.append((lo, body0, lo // length, 1))
    if row_major:
        if body1 > body0:
            pieces.append((body0, body1, body0 // length, (body1 - body0) // length))
    elif body1 > body0:
        per = _CHUNK // (n_rows * length)
        if per >= 1:
            pieces.extend((p, min(p + per * length, body1), p // length, (min(p + per * length, body1) - p) // length)
                          for p in range(body0, body1, per * length))
        else:  # a segment is more than a chunk: parts of it
            step = max(1, _CHUNK // n_rows)
            pieces.extend((p, min(p + step, (p // length + 1) * length), p // length, 1)
                          for s in range(body0, body1, length) for p in range(s, s + length, step))
    if hi > body1:
        pieces.append((body1, hi, body1 // length, 1))
    return pieces


def _interior(src_img, src_var, src_mask, out_img, out_var, out_mask, rows, p, q, s, n_seg, k, w, lin, sel, cubic):
    """Output columns ``p:q`` (``n_seg`` segments from ``s``) of ``rows``, whose taps all lie inside the source
    rows (integer shift ``k``), as ``(rows, segment, column)`` views with per-(row, segment) weights.

    ``sel`` is None when both linear taps of the mask are taken in every row, else the per-(segment, row)
    all-bits / no-bits masks of each tap.
    """
    shape = (-1, n_seg, (q - p) // n_seg)

    def at(src, t):  # source columns of output columns ``p:q`` for tap offset t
        return src[rows, p + k + t:q + k + t].reshape(shape)

    def per_row(table):  # (rows, segments, 1) view of a (segment, row) table
        return table[s:s + n_seg, rows].T[:, :, None]

    o = out_img[rows, p:q].reshape(shape)
    tmp = np.empty_like(o)
    if cubic:
        np.multiply(at(src_img, -1), per_row(w[0]), out=o)
        for t in (1, 2, 3):
            np.multiply(at(src_img, t - 1), per_row(w[t]), out=tmp)
            o += tmp
    else:
        np.multiply(at(src_img, 0), per_row(lin[0]), out=o)
        np.multiply(at(src_img, 1), per_row(lin[1]), out=tmp)
        o += tmp
    ov = out_var[rows, p:q].reshape(shape)
    np.multiply(at(src_var, 0), per_row(lin[0]), out=ov)
    np.multiply(at(src_var, 1), per_row(lin[1]), out=tmp)
    ov += tmp
    om = out_mask[rows, p:q].reshape(shape)
    if sel is None:
        np.bitwise_or(at(src_mask, 0), at(src_mask, 1), out=om)
    else:  # a tap of weight <= 1e-3 does not flag: its bits are ANDed away
        np.bitwise_and(at(src_mask, 0), per_row(sel[0]), out=om)
        other = np.bitwise_and(at(src_mask, 1), per_row(sel[1]))
        om |= other


def _shifted(src, out, rows: slice, k: int, tables, length: int, cubic: bool, row_major: bool) -> None:
    """Output ``rows`` of :func:`_resample_1d`, integer shift ``k`` throughout: every column whose taps all lie inside
    the source row, in cache-sized :func:`_interior` blocks.  ``src`` and ``out`` are the (image, variance, mask)
    triples, ``tables`` the per-(segment, row) cubic weights, linear weights and mask selections."""
    width, n_out = src[0].shape[1], out[0].shape[1]
    lo, hi = max(0, 1 - k), min(n_out, width - 2 - k)
    if hi <= lo:
        return
    w, lin, sel = tables
    every = sel[0][:, rows].all() and sel[1][:, rows].all()
    for p, q, s, n_seg in _pieces(lo, hi, length, rows.stop - rows.start, row_major):
        step = max(1, _CHUNK // (q - p)) if row_major else rows.stop - rows.start
        for r in range(rows.start, rows.stop, step):
            _interior(*src, *out, slice(r, min(r + step, rows.stop)), p, q, s, n_seg, k, w, lin, None if every else sel,
                      cubic)


def _mixed(src, out, rows: slice, base: np.ndarray, tables, length: int, cubic: bool) -> None:
    """Output ``rows`` of :func:`_resample_1d` along which the integer shift changes (``base``: per segment and row).

    Each shift present is applied to the whole rows, in contiguous copies, and its pixels selected: the same
    operations as everywhere else, pixel by pixel.  The pixels whose taps leave the source row are left to
    :func:`_edge_taps`.
    """
    n = rows.stop - rows.start
    strips = [np.ascontiguousarray(x[rows]) for x in src]  # (copies of a transposed view's rows)
    temps = [np.empty((n, x.shape[1]), x.dtype) for x in out]
    w, lin, sel = tables
    part = ([t[:, rows] for t in w] if cubic else None, tuple(t[:, rows] for t in lin), tuple(t[:, rows] for t in sel))
    shifts = base[:, rows]
    per_pixel = shifts.T[:, np.arange(out[0].shape[1]) // length]
    for k in np.unique(shifts).tolist():
        _shifted(strips, temps, slice(0, n), k, part, length, cubic, True)
        here = per_pixel == k
        for o, t in zip(out, temps):
            np.copyto(o[rows], t, where=here)


def _resample_1d(src_img, src_var, src_mask, out_img, out_var, out_mask, row_shift, drift, tol, cubic):
    """Interpolate each source row along axis 1: ``out[i, u]`` samples row ``i`` at ``u (1 + drift) + row_shift[i]``.

    ``src_img`` holds cubic B-spline coefficients along axis 1 (``cubic``) or pixel values
    (linear); ``src_var`` is interpolated linearly and ``src_mask`` ORed over the two linear
    taps with weight > 1e-3.  The drift is taken constant over segments of the output row
    (position error <= ``tol``), so the weights are per (segment, row); a run of rows with
    one integer shift in every segment is a few whole-array operations on ``(row, segment,
    column)`` views, in cache-sized pieces (:func:`_shifted`), and the few rows at each step
    of the shift from one segment to the next are done shift by shift (:func:`_mixed`).
    Views of transposed arrays work as well (the second pass).
    """
    src, out = (src_img, src_var, src_mask), (out_img, out_var, out_mask)
    width = src_img.shape[1]
    n_out = out_img.shape[1]
    row_major = out_img.strides[0] >= out_img.strides[1]
    segments = _segments(n_out, drift, tol)
    length = segments[0][1]  # of every segment but the last
    shift = row_shift + (drift * np.array([centre for _, _, centre in segments]))[:, None]  # (segment, row)
    base = np.floor(shift)
    f = shift - base
    base = base.astype(np.int64)
    w = _cubic_weights(f) if cubic else None
    lin = ((1.0 - f).astype(np.float32), f.astype(np.float32))
    every, none = ~src_mask.dtype.type(0), src_mask.dtype.type(0)
    sel = tuple(np.where(t > 1e-3, every, none) for t in lin)
    uniform = (base == base[0]).all(axis=0)  # rows with one integer shift in every segment
    for a, b in _runs(np.where(uniform, base[0], base.min() - 1)):  # (the mixed rows share one code)
        if uniform[a]:
            _shifted(src, out, slice(a, b), int(base[0, a]), (w, lin, sel), length, cubic, row_major)
            continue
        step = max(1, _CHUNK // n_out)
        for r in range(a, b, step):
            _mixed(src, out, slice(r, min(r + step, b)), base, (w, lin, sel), length, cubic)
    # the pixels whose taps leave the source row (u < 1 - k or u >= width - 2 - k), segment by segment, all rows at once
    for s, ((c0, c1, _), k_lo, k_hi) in enumerate(zip(segments, base.min(axis=1).tolist(), base.max(axis=1).tolist())):
        left, right = min(c1, max(c0, 1 - k_lo)), max(c0, min(c1, width - 2 - k_hi))
        for e0, e1 in ((c0, left), (max(right, left), c1)):
            if e1 > e0:
                cols = np.arange(e0, e1)
                edge = (cols < 1 - base[s][:, None]) | (cols >= width - 2 - base[s][:, None])
                rows = np.flatnonzero(edge.any(axis=1))
                img, var, mask = _edge_taps(src_img, src_var, src_mask, rows, cols, base[s][rows, None], f[s],
                                            [wt[s] for wt in w] if cubic else None, cubic)
                rr, cc = np.nonzero(edge[rows])
                out_img[rows[rr], cols[cc]], out_var[rows[rr], cols[cc]] = img[rr, cc], var[rr, cc]
                out_mask[rows[rr], cols[cc]] = mask[rr, cc]


def _row_intervals(coef: np.ndarray, out_shape: tuple[int, int], in_shape: tuple[int, int]):
    """Per search row, the first and last column whose affine template position lies in ``[0, n - 1]`` on both axes.

    Empty rows get ``(nx, -1)``.
    """
    ny, nx = out_shape
    v = np.arange(ny, dtype=float)
    lo = np.zeros(ny)
    hi = np.full(ny, nx - 1.0)
    eps = 1e-7
    for (alpha, beta, gamma), limit in zip(coef, (in_shape[1] - 1, in_shape[0] - 1)):
        offset = beta * v + gamma  # position = alpha * u + offset, wanted in [0, limit]
        if abs(alpha) < 1e-12:
            inside = (offset >= -eps) & (offset <= limit + eps)
            lo = np.where(inside, lo, nx)
            hi = np.where(inside, hi, -1)
            continue
        a_lo, a_hi = (-offset - eps) / alpha, (limit - offset + eps) / alpha
        lo = np.maximum(lo, np.ceil(np.minimum(a_lo, a_hi)))
        hi = np.minimum(hi, np.floor(np.maximum(a_lo, a_hi)))
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    empty = lo > hi
    return np.where(empty, nx, lo), np.where(empty, -1, hi)


def _dilate_intervals(lo: np.ndarray, hi: np.ndarray, nx: int, k: int):
    """Row intervals of data after ``k`` iterations of ``binary_dilation`` (cross) of the no-data outside them."""
    ny = lo.size
    new_lo, new_hi = lo.copy(), hi.copy()
    for dv in range(-k, k + 1):
        reach = k - abs(dv)
        src = np.arange(ny) + dv
        ok = (src >= 0) & (src < ny)
        srcc = np.clip(src, 0, ny - 1)
        lo_s, hi_s = lo[srcc], hi[srcc]
        grow_left = ok & (lo_s > 0)  # the row has no-data pixels on its left
        grow_right = ok & (hi_s < nx - 1)
        new_lo = np.where(grow_left, np.maximum(new_lo, lo_s + reach), new_lo)
        new_hi = np.where(grow_right, np.minimum(new_hi, hi_s - reach), new_hi)
    empty = new_lo > new_hi
    return np.where(empty, nx, new_lo), np.where(empty, -1, new_hi)


_BAND = 64  # rows per band of :func:`_interval_max` and :func:`_fill_outside_intervals`


def _interval_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Largest of ``values[v, lo[v]:hi[v] + 1]`` over the rows (NaN if any is NaN, -inf if all are empty).

    Band by band, the columns that all the band's intervals cover in one slice and the ragged ends as two
    narrow masked strips: no frame-sized mask.
    """
    nx = values.shape[1]
    cols = np.arange(nx)
    best = [-np.inf]
    for r0 in range(0, lo.size, _BAND):
        sub, lo_b, hi_b = values[r0:r0 + _BAND], lo[r0:r0 + _BAND, None], hi[r0:r0 + _BAND, None]
        inner0, inner1 = int(lo_b.max()), int(hi_b.min()) + 1
        if inner0 >= inner1:  # a row without data, or no column common to the band's intervals
            best.append(np.max(sub, where=(cols >= lo_b) & (cols <= hi_b), initial=-np.inf))
            continue
        best += [np.max(sub[:, inner0:inner1]),
                 np.max(sub[:, :inner0], where=cols[:inner0] >= lo_b, initial=-np.inf),
                 np.max(sub[:, inner1:], where=cols[inner1:] <= hi_b, initial=-np.inf)]
    return float(np.max(best))


def _fill_outside_intervals(image, variance, mask, lo, hi, fill_var: float) -> None:
    """Flag ``NO_DATA`` (image 0, variance ``fill_var``) outside the row intervals ``[lo[v], hi[v]]`` (none when
    ``lo > hi``), band by band: a left and a right strip as wide as the band's widest margins, each masked."""
    nx = image.shape[1]
    cols = np.arange(nx)
    bit = mask.dtype.type(MaskBits.NO_DATA)
    for r0 in range(0, lo.size, _BAND):
        rows, lo_b, hi_b = slice(r0, r0 + _BAND), lo[r0:r0 + _BAND, None], hi[r0:r0 + _BAND, None]
        left, right = min(int(lo_b.max()), nx), max(int(hi_b.min()) + 1, 0)
        for strip, outside in ((slice(0, left), cols[:left] < lo_b), (slice(right, nx), cols[right:] > hi_b)):
            np.copyto(image[rows, strip], np.float32(0.0), where=outside)
            np.copyto(variance[rows, strip], np.float32(fill_var), where=outside)
            np.bitwise_or(mask[rows, strip], bit, out=mask[rows, strip], where=outside)


def _fast_plan(coef: np.ndarray, out_shape, in_shape, config: AlignConfig) -> str | None:
    """Why the two-pass path cannot take this affine mapping (None when it can)."""
    (a, b, _), (d, e, _) = coef
    if config.order not in ("bicubic", "bilinear"):
        return f"order {config.order!r} has no fast path"
    if abs(e) < 0.5 or abs(a - b * d / e) < 0.5:
        return "the mapping rotates by more than ~60 degrees, flips or rescales by 2x"
    tol = config.fast_tolerance / 4
    ny, nx = out_shape
    slope1 = a - b * d / e
    n_blocks = (len(_segments(nx, slope1 - 1, tol)) * (abs(b / e) * in_shape[0] + 2)
                + len(_segments(ny, e - 1, tol)) * (abs(d) * nx + 2))
    if n_blocks > 0.02 * nx * ny / 16 + 4000:
        return (f"scale/rotation differences need {n_blocks:.0f} blocks of constant weights "
                f"(pixel scales {slope1:.5f}, {e:.5f})")
    return None


def _align_fast(image_in: np.ndarray, var_in: np.ndarray, mask_in: np.ndarray, coef: np.ndarray,
                out_shape: tuple[int, int], cubic: bool, tol: float, bits: int | None = None):
    """Resample image, variance and mask with the affine ``coef`` in two 1-D passes (rows, then columns).

    ``bits``: the OR of all of ``mask_in`` when known.
    """
    (a, b, c), (d, e, f) = coef
    ny_in, nx_in = image_in.shape
    ny, nx = out_shape
    # output column u crosses input row j at x = slope1 u + shear1 j + const1
    slope1, shear1, const1 = a - b * d / e, b / e, c - b * f / e
    corners_y = [d * u + e * v + f for u in (0, nx - 1) for v in (0, ny - 1)]
    margin = 20  # the spline prefilter along y is exact to float32 past ~16 rows
    r0 = int(np.clip(np.floor(min(corners_y)) - margin, 0, ny_in - 1))
    r1 = int(np.clip(np.ceil(max(corners_y)) + margin + 1, r0 + 1, ny_in))
    rows = np.arange(r0, r1, dtype=float)
    if cubic:
        src = ndimage.spline_filter1d(image_in[r0:r1], 3, axis=1, mode="mirror", output=np.float32)
    else:
        src = image_in[r0:r1]
    n_mid = r1 - r0
    mask_src = mask_in[r0:r1]
    # bits that fit in a byte (all of MaskBits) are ORed as bytes: a quarter of the mask's memory traffic
    if bits is None:
        bits = int(np.bitwise_or.reduce(mask_src, axis=None))
    narrow = mask_src.dtype.itemsize > 1 and 0 <= bits <= 255
    if narrow:
        mask_src = mask_src.astype(np.uint8)
    img1 = np.empty((n_mid, nx), np.float32)
    var1 = np.empty((n_mid, nx), np.float32)
    mask1 = np.empty((n_mid, nx), mask_src.dtype)
    _resample_1d(src, var_in[r0:r1], mask_src, img1, var1, mask1, shear1 * rows + const1, slope1 - 1, tol, cubic)
    del src, mask_src
    if cubic:
        img1 = _filter_axis0(img1, overwrite=True)
    image = np.empty((ny, nx), np.float32)
    variance = np.empty((ny, nx), np.float32)
    mask = np.empty((ny, nx), mask1.dtype)
    # output (u, v) sits at y = e v + d u + f: along each column, row (v (1 + (e - 1)) + d u + f - r0) of img1
    _resample_1d(img1.T, var1.T, mask1.T, image.T, variance.T, mask.T, d * np.arange(nx) + f - r0, e - 1, tol, cubic)
    return image, variance, mask.astype(mask_in.dtype, copy=False)


def align_pair(search: Exposure, template: Exposure, config: AlignConfig = AlignConfig()) -> AlignedPair:
    """Resample the template's image, variance and mask onto the search pixel grid.

    With ``config.method = "fast"`` (default) the mapping is fitted by an affine map and
    the planes are resampled in two separable passes; a mapping that is not affine to
    ``config.fast_tolerance`` falls back to the exact ``grid`` path (logged on this module's
    logger, recorded as ``AlignedPair.method``).  A template on the search's own pixel grid
    (WCSs agree to ``config.identity_tolerance``, same shape) is not resampled.

    Parameters
    ----------
    search, template : Exposure
        The pair; both need a celestial WCS.
    config : AlignConfig
        Method, interpolation order and overlap requirement.

    Returns
    -------
    AlignedPair

    Raises
    ------
    InputError
        If the template covers less than ``config.min_overlap`` of the search image.
    """
    t0 = time.perf_counter()
    frac = overlap_fraction(search, template)
    if frac < config.min_overlap:
        raise InputError(
            f"no overlap: template {template.name!r} covers {frac:.1%} of search {search.name!r} "
            f"(need >= {config.min_overlap:.0%}); check the WCS of both files"
        )
    registration = check_registration(search, template, config)  # before the costly resampling
    template, registration = refine_registration(template, registration, config)
    shape = search.shape
    bits = int(np.bitwise_or.reduce(template.mask, axis=None))  # every mask bit set somewhere
    any_bad = bool(bits & int(MaskBits.NO_DATA))
    bad_in = (template.mask & int(MaskBits.NO_DATA)) != 0 if any_bad else None
    method = config.method
    if _is_identity(search, template, config.identity_tolerance):
        image = np.where(bad_in, np.float32(0.0), template.image) if any_bad else template.image.copy()
        aligned = dataclasses.replace(template, image=image.astype(np.float32, copy=False),
                                      variance=template.variance.astype(np.float32, copy=True),
                                      mask=template.mask.copy(), wcs=search.wcs,
                                      name=f"{template.name} (on the grid of {search.name})")
        return AlignedPair(search=search, template=aligned, overlap=1.0, seconds=time.perf_counter() - t0,
                           scale_ratio=1.0, registration=registration, variance_factor=1.0, method="identity")
    image_in = (np.where(bad_in, 0.0, template.image) if any_bad else template.image).astype(np.float32, copy=False)
    var_in = (np.where(bad_in, np.nanmax(template.variance), template.variance) if any_bad
              else template.variance).astype(np.float32, copy=False)
    scale = pixel_scale_ratio(search, template)
    grow = max(1, int(np.ceil(1.0 / scale - 1e-6))) if config.order in ("bicubic", "biquadratic") else 0
    if method == "fast":
        coef, resid = fit_affine_mapping(search.wcs, template.wcs, shape)
        why = (f"the pixel mapping is not affine to {config.fast_tolerance / 2:g} px (max residual {resid:.3g} px)"
               if not resid <= config.fast_tolerance / 2 else _fast_plan(coef, shape, template.shape, config))
        if why is not None:
            logger.info("align %s onto %s: fast path not taken (%s); using the exact grid path", template.name,
                        search.name, why)
            method = "grid"
    if method == "fast":
        image, variance, mask = _align_fast(image_in, var_in, template.mask, coef, shape, config.order == "bicubic",
                                            config.fast_tolerance / 4, bits)
        lo, hi = _row_intervals(coef, shape, template.shape)
        fill_var = _interval_max(variance, lo, hi) if (lo <= hi).any() else 1.0
        if grow:
            lo, hi = _dilate_intervals(lo, hi, shape[1], grow)
        _fill_outside_intervals(image, variance, mask, lo, hi, fill_var)
        covered = float(np.clip(hi - lo + 1, 0, None).sum()) / image.size
    else:
        if method == "reproject":
            from reproject import reproject_interp

            bits = _mask_bits_present(template.mask)
            planes = [var_in] + [((template.mask & b) != 0).astype(np.float32) for b in bits]
            image, footprint = reproject_interp(
                (image_in, template.wcs), search.wcs, shape_out=shape, order=config.order, roundtrip_coords=False
            )
            # variance and each mask bit go through one bilinear call (reproject broadcasts leading axes)
            resampled, _ = reproject_interp(
                (np.stack(planes), template.wcs), search.wcs, shape_out=shape, order="bilinear",
                roundtrip_coords=False
            )
            variance = resampled[0]
            mask = np.zeros(shape, dtype=np.int32)
            for plane, b in zip(resampled[1:], bits):
                mask[np.nan_to_num(plane) > 1e-3] |= b
        else:
            pmap = PixelMap.build(search.wcs, template.wcs, (0, shape[1] - 1), (0, shape[0] - 1))
            tx, ty = pmap.grid(*shape)
            tny, tnx = template.shape
            footprint = ((tx >= -0.5) & (tx <= tnx - 0.5) & (ty >= -0.5) & (ty <= tny - 0.5)).astype(np.float32)
            image = ndimage.map_coordinates(image_in, np.array([ty, tx]), order=_ORDERS[config.order],
                                            mode="constant", cval=np.nan, output=np.float32)
            variance, mask = _bilinear_with_mask(var_in, template.mask, tx, ty)
        # bicubic reaches one *template* pixel further than bilinear: grow no-data by that many search
        # pixels (two for a 2x-binned template)
        nodata = ~(footprint > 0) | ~np.isfinite(image) | ~np.isfinite(variance)
        if grow:
            nodata = ndimage.binary_dilation(nodata, iterations=grow)
        mask[nodata] |= MaskBits.NO_DATA
        fill_var = float(np.nanmax(variance)) if np.isfinite(variance).any() else 1.0
        image = np.where(nodata, 0.0, image).astype(np.float32)
        variance = np.where(nodata, fill_var, variance).astype(np.float32)
        covered = float((~nodata).mean())
    aligned = dataclasses.replace(
        template,
        image=image,
        variance=variance,
        mask=mask,
        wcs=search.wcs,
        name=f"{template.name} (resampled onto {search.name})",
    )
    factor = _interpolation_variance_factor(search, template, config)
    # PSF sizes past alignment are in search pixels: a 2x-binned template's FWHM doubles
    aligned.fwhm = float(template.fwhm) / scale
    if covered < config.min_overlap:
        raise InputError(
            f"no overlap: after resampling, template {template.name!r} covers {covered:.1%} of "
            f"search {search.name!r} (need >= {config.min_overlap:.0%})"
        )
    return AlignedPair(search=search, template=aligned, overlap=covered, seconds=time.perf_counter() - t0,
                       scale_ratio=scale, registration=registration, variance_factor=factor, method=method)


def _interpolation_variance_factor(search: Exposure, template: Exposure, config: AlignConfig, size: int = 96) -> float:
    """Variance of resampled unit white noise, measured on a patch at the search image's centre."""
    ny, nx = search.shape
    y0, x0 = max(0, ny // 2 - size // 2), max(0, nx // 2 - size // 2)
    ys, xs = np.mgrid[y0 : y0 + size, x0 : x0 + size].astype(float)
    tx, ty = template_pixels(search.wcs, template.wcs, xs, ys)
    bx0, by0 = int(np.floor(tx.min())) - 4, int(np.floor(ty.min())) - 4
    w = int(np.ceil(tx.max())) - bx0 + 5
    h = int(np.ceil(ty.max())) - by0 + 5
    noise = np.random.default_rng(12345).standard_normal((h, w))
    out = ndimage.map_coordinates(noise, np.array([ty - by0, tx - bx0]), order=_ORDERS[config.order], mode="nearest")
    return float(np.var(out))


def _source_box(tx: np.ndarray, ty: np.ndarray, pad: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the source pixels around positions ``(tx, ty)`` (non-empty) with ``pad`` pixels of
    context, clipped to ``shape``."""
    ny, nx = shape
    x0 = int(np.clip(np.floor(tx.min()) - pad, 0, nx - 1))
    x1 = int(np.clip(np.ceil(tx.max()) + pad + 1, x0 + 1, nx))
    y0 = int(np.clip(np.floor(ty.min()) - pad, 0, ny - 1))
    y1 = int(np.clip(np.ceil(ty.max()) + pad + 1, y0 + 1, ny))
    return y0, y1, x0, x1


def resample_cutouts(
    template: Exposure,
    search_wcs: WCS,
    x: np.ndarray,
    y: np.ndarray,
    size: int = 51,
    config: AlignConfig = AlignConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Resample template cut-outs onto the search grid around search-pixel positions.

    The cut-out ``i`` covers search pixels ``round(x_i) - size//2 ... + size//2``
    (same for y), exactly the pixels of a search stamp cut at that position,
    so template and search stamps line up pixel for pixel without resampling
    the full frame.

    Parameters
    ----------
    template : Exposure
        Template on its own pixel grid.
    search_wcs : astropy.wcs.WCS
        WCS of the search image.
    x, y : array_like
        Search-grid pixel positions (0-based) of the stamp centres.
    size : int
        Odd stamp size (default 51).
    config : AlignConfig
        Interpolation order (same as the full-frame variant).

    Returns
    -------
    image : ndarray (N, size, size) float32
        Resampled template pixels, NaN where there are no template data.
    mask : ndarray (N, size, size) int32
        Conservatively propagated mask bits (``NO_DATA`` where NaN).
    """
    if size % 2 != 1:
        raise ValueError(f"size must be odd, got {size}")
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    n = x.size
    half = size // 2
    if n == 0:
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.int32)
    offs = np.arange(-half, half + 1)
    xs = np.rint(x)[:, None, None] + offs[None, None, :]
    ys = np.rint(y)[:, None, None] + offs[None, :, None]
    xs, ys = np.broadcast_arrays(xs, ys)
    if config.method in ("grid", "fast"):  # the mapping is only needed over the cut-outs' bounding box
        pmap = PixelMap.build(search_wcs, template.wcs, (xs.min(), xs.max()), (ys.min(), ys.max()))
        tx, ty = pmap.boxes(xs[:, 0, 0], ys[:, 0, 0], size)
    else:
        tx, ty = template_pixels(search_wcs, template.wcs, xs, ys)
    order = _ORDERS[config.order]
    tny, tnx = template.shape
    finite = np.isfinite(tx) & np.isfinite(ty)
    image = np.full(tx.shape, np.nan, np.float32)
    # Each cut-out is interpolated from its own box of template pixels, with SPLINE_MARGIN pixels beyond its
    # footprint: the spline coefficients there equal those of the whole frame to ~1e-7 (the prefilter's
    # influence decays as 0.27^distance for cubic splines), for ~60 x 60 pixels per cut-out instead of a
    # frame-sized bounding box.  Boxes that meet the frame's edge end there, as the frame's own would.
    pad = 4 + (SPLINE_MARGIN if order > 1 else 0)
    for i in range(n):
        if not finite[i].any():
            continue
        y0, y1, x0, x1 = _source_box(tx[i][finite[i]], ty[i][finite[i]], pad, template.shape)
        bad_in = (template.mask[y0:y1, x0:x1] & int(MaskBits.NO_DATA)) != 0
        sub = np.where(bad_in, np.float32(0), template.image[y0:y1, x0:x1]).astype(np.float32)
        image[i] = ndimage.map_coordinates(sub, np.array([ty[i] - y0, tx[i] - x0]), order=order, mode="constant",
                                           cval=np.nan)
    # the mask bits: bilinear weights need no prefilter, one call over the cut-outs' bounding box
    y0, y1, x0, x1 = _source_box(tx[finite], ty[finite], 4, template.shape) if finite.any() else (0, 1, 0, 1)
    coords = np.array([ty - y0, tx - x0])
    inside = (tx >= -0.5) & (tx <= tnx - 0.5) & (ty >= -0.5) & (ty <= tny - 0.5) & finite
    sub_mask = template.mask[y0:y1, x0:x1]
    mask = np.zeros(tx.shape, dtype=np.int32)
    for b in _mask_bits_present(sub_mask):
        plane = ndimage.map_coordinates(((sub_mask & b) != 0).astype(np.float32), coords, order=1,
                                        mode="constant", cval=0.0)
        mask[plane > 1e-3] |= b
    nodata = ~inside | ~np.isfinite(image)
    mask[nodata] |= MaskBits.NO_DATA
    image[nodata] = np.nan
    return image, mask
