"""Alignment: resample the template onto the search image's pixel grid.

Two variants share one interpolation order and one mask rule:

* :func:`align_pair` resamples the whole template (image, variance, mask)
  with ``reproject`` -- what the dia mode needs before PSF matching.
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
import time

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage

from dia.masks import MaskBits
from pipeline.io import Exposure, InputError

__all__ = ["AlignConfig", "AlignedPair", "PixelMap", "align_pair", "resample_cutouts", "overlap_fraction",
           "template_coverage", "template_has_data", "RegistrationCheck", "check_registration",
           "pixel_scale_ratio"]

_ORDERS = {"nearest-neighbor": 0, "bilinear": 1, "biquadratic": 2, "bicubic": 3}


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
        ``grid`` (default): the pixel mapping is computed exactly through both
        WCSs every 32 pixels and spline-interpolated in between, then the planes
        are interpolated with scipy; ``reproject``: ``reproject.reproject_interp``
        transforms every pixel through both WCSs (same interpolation, ~3x slower;
        the two agree to < 1e-3 of the pixel values, see the tests).
    registration_stars : int
        Bright isolated search stars used to check that the template's pixels really sit where
        the two WCSs say (default 40; 0 disables the check).  A template whose pixels were
        rotated, flipped or shifted without updating its WCS fails with a clear error instead
        of giving hundreds of false candidates.
    registration_min_stars : int
        With fewer usable stars than this the check is skipped (and the skip recorded; default 5).
    registration_radius_fwhm : float
        A star is found in the template when a template source peaks within this many template
        FWHM of its WCS position (default 1.5).
    registration_min_fraction : float
        Least fraction of the stars that must be found (default 0.5; transients and variables
        are a few percent of bright stars, a wrong WCS leaves almost none).
    """

    order: str = "bicubic"
    min_overlap: float = 0.05
    method: str = "grid"
    registration_stars: int = 40
    registration_min_stars: int = 5
    registration_radius_fwhm: float = 1.5
    registration_min_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.registration_stars < 0 or self.registration_min_stars < 1:
            raise ValueError("AlignConfig.registration_stars must be >= 0 and registration_min_stars >= 1")
        if not 0.0 <= self.registration_min_fraction <= 1.0 or self.registration_radius_fwhm <= 0:
            raise ValueError("AlignConfig.registration_min_fraction must be in [0, 1] and "
                             "registration_radius_fwhm > 0")
        if self.method not in ("grid", "reproject"):
            raise ValueError(f"AlignConfig.method must be 'grid' or 'reproject', got {self.method!r}")
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


def _template_pixels(search_wcs: WCS, template_wcs: WCS, xs: np.ndarray, ys: np.ndarray):
    """Template pixel coordinates of search pixel coordinates (any shape), exact through both WCSs."""
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
        tx, ty = _template_pixels(search_wcs, template_wcs, xx, yy)
        return cls(RectBivariateSpline(gy, gx, tx, kx=3, ky=3), RectBivariateSpline(gy, gx, ty, kx=3, ky=3))

    def grid(self, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
        """Template coordinates of every pixel of the (ny, nx) search grid starting at (0, 0)."""
        y, x = np.arange(ny, dtype=float), np.arange(nx, dtype=float)
        return self.spline_x(y, x, grid=True), self.spline_y(y, x, grid=True)

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
    tx, ty = _template_pixels(search.wcs, template.wcs, xs, ys)
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
    tx, ty = _template_pixels(search_wcs, template.wcs, np.asarray(x, float), np.asarray(y, float))
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
    """Bright isolated search stars looked for in the template."""
    n_found: int
    """Of those, how many have a template source within the match radius of their WCS position."""
    median_offset_px: float
    """Median distance (template pixels) from the WCS position to the template's peak, found stars only."""
    radius_px: float
    """Match radius in template pixels."""
    checked: bool
    """False when there were too few stars to decide (the pair is then accepted)."""

    @property
    def fraction(self) -> float:
        """Fraction of the stars found (NaN without stars)."""
        return self.n_found / self.n_stars if self.n_stars else float("nan")

    def as_dict(self) -> dict:
        """JSON-able summary for status records."""
        out = dataclasses.asdict(self)
        out["median_offset_px"] = round(float(self.median_offset_px), 3) if np.isfinite(self.median_offset_px) else None
        out["radius_px"] = round(float(self.radius_px), 3)
        return out


def _sky(image: np.ndarray) -> float:
    """A global sky level: the median of a sparse (about 256 x 256) sample of the image."""
    return float(np.median(image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]))


def _pixel_snr(exposure: Exposure) -> np.ndarray:
    """Per-pixel S/N above the global sky, 0 where masked."""
    good = ((exposure.mask & int(MaskBits.NO_DATA | MaskBits.BAD)) == 0) & (exposure.variance > 0)
    snr = (exposure.image - _sky(exposure.image)) / np.sqrt(np.where(good, exposure.variance, 1.0))
    return np.where(good, snr, 0.0).astype(np.float32)


def check_registration(search: Exposure, template: Exposure, config: AlignConfig = AlignConfig()) -> RegistrationCheck:
    """Check that bright search stars appear in the template where the two WCSs put them.

    The brightest isolated point-like sources of the search image are mapped through both
    WCSs into template pixels (those falling where the template has no data are left out); a
    star counts as found when the template's per-pixel S/N peaks
    above 5 within ``registration_radius_fwhm`` template FWHM of that position.  Cheap (a few
    dozen small windows) and independent of PSF matching, so both modes use it.

    Raises
    ------
    InputError
        When enough stars were tried and fewer than ``registration_min_fraction`` were found:
        the template's WCS does not describe its pixels.
    """
    from pipeline.detect import bright_isolated_stars

    t_fwhm = float(template.fwhm) if np.isfinite(template.fwhm) and template.fwhm > 0 else 3.0
    radius = max(2.0, config.registration_radius_fwhm * t_fwhm)
    if config.registration_stars == 0:
        return RegistrationCheck(0, 0, float("nan"), radius, False)
    s_fwhm = float(search.fwhm) if np.isfinite(search.fwhm) and search.fwhm > 0 else 3.0
    x, y = bright_isolated_stars(search.image - _sky(search.image), search.variance, search.mask, s_fwhm,
                                 min_snr=50.0, isolation=4.0, max_stars=config.registration_stars)
    r = int(np.ceil(radius))
    # only where the template has data: a star over its NaN / zero-weight part cannot be found
    usable = template_has_data(search.wcs, template, x, y, bits=int(MaskBits.NO_DATA | MaskBits.BAD), margin=r)
    tx, ty = _template_pixels(search.wcs, template.wcs, np.asarray(x, float)[usable], np.asarray(y, float)[usable])
    n = int(tx.size)
    if n < config.registration_min_stars:
        return RegistrationCheck(n, 0, float("nan"), radius, False)
    snr = _pixel_snr(template)
    offsets = []
    for cx, cy in zip(tx, ty):
        ix, iy = int(round(cx)), int(round(cy))
        win = snr[iy - r:iy + r + 1, ix - r:ix + r + 1]
        k = int(np.argmax(win))
        py, px = divmod(k, win.shape[1])
        d = float(np.hypot(ix - r + px - cx, iy - r + py - cy))
        if win.flat[k] >= 5.0 and d <= radius:
            offsets.append(d)
    result = RegistrationCheck(n, len(offsets), float(np.median(offsets)) if offsets else float("nan"), radius, True)
    if result.fraction < config.registration_min_fraction:
        raise InputError(
            f"template {template.name!r} does not line up with search {search.name!r} through their WCSs: "
            f"{result.n_found} of {n} bright isolated search stars have a template source within "
            f"{radius:.1f} template px of their WCS position (need {config.registration_min_fraction:.0%}); "
            f"the template's WCS does not describe its pixels (rotated, flipped or shifted image?). "
            f"align.registration_stars = 0 disables this check"
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


def align_pair(search: Exposure, template: Exposure, config: AlignConfig = AlignConfig()) -> AlignedPair:
    """Resample the template's image, variance and mask onto the search pixel grid.

    Parameters
    ----------
    search, template : Exposure
        The pair; both need a celestial WCS.
    config : AlignConfig
        Interpolation order and overlap requirement.

    Returns
    -------
    AlignedPair

    Raises
    ------
    InputError
        If the template covers less than ``config.min_overlap`` of the search image.
    """
    from reproject import reproject_interp

    t0 = time.perf_counter()
    frac = overlap_fraction(search, template)
    if frac < config.min_overlap:
        raise InputError(
            f"no overlap: template {template.name!r} covers {frac:.1%} of search {search.name!r} "
            f"(need >= {config.min_overlap:.0%}); check the WCS of both files"
        )
    registration = check_registration(search, template, config)  # before the costly resampling
    shape = search.shape
    bad_in = (template.mask & int(MaskBits.NO_DATA)) != 0
    image_in = np.where(bad_in, 0.0, template.image).astype(np.float32)
    bits = _mask_bits_present(template.mask)
    planes = [np.where(bad_in, np.nanmax(template.variance), template.variance).astype(np.float32)]
    planes += [((template.mask & b) != 0).astype(np.float32) for b in bits]
    if config.method == "reproject":
        from reproject import reproject_interp

        image, footprint = reproject_interp(
            (image_in, template.wcs), search.wcs, shape_out=shape, order=config.order, roundtrip_coords=False
        )
        # variance and each mask bit go through one bilinear call (reproject broadcasts leading axes)
        resampled, _ = reproject_interp(
            (np.stack(planes), template.wcs), search.wcs, shape_out=shape, order="bilinear", roundtrip_coords=False
        )
    else:
        pmap = PixelMap.build(search.wcs, template.wcs, (0, shape[1] - 1), (0, shape[0] - 1))
        tx, ty = pmap.grid(*shape)
        tny, tnx = template.shape
        footprint = ((tx >= -0.5) & (tx <= tnx - 0.5) & (ty >= -0.5) & (ty <= tny - 0.5)).astype(np.float32)
        image = ndimage.map_coordinates(image_in, np.array([ty, tx]), order=_ORDERS[config.order],
                                        mode="constant", cval=np.nan, output=np.float32)
        variance, mask = _bilinear_with_mask(planes[0], template.mask, tx, ty)
    if config.method == "reproject":
        variance = resampled[0]
        mask = np.zeros(shape, dtype=np.int32)
        for plane, b in zip(resampled[1:], bits):
            mask[np.nan_to_num(plane) > 1e-3] |= b
    # bicubic reaches one *template* pixel further than bilinear: grow no-data by that many search
    # pixels (two for a 2x-binned template)
    scale = pixel_scale_ratio(search, template)
    nodata = ~(footprint > 0) | ~np.isfinite(image) | ~np.isfinite(variance)
    if config.order in ("bicubic", "biquadratic"):
        nodata = ndimage.binary_dilation(nodata, iterations=max(1, int(np.ceil(1.0 / scale - 1e-6))))
    mask[nodata] |= MaskBits.NO_DATA
    fill_var = float(np.nanmax(variance)) if np.isfinite(variance).any() else 1.0
    aligned = dataclasses.replace(
        template,
        image=np.where(nodata, 0.0, image).astype(np.float32),
        variance=np.where(nodata, fill_var, variance).astype(np.float32),
        mask=mask,
        wcs=search.wcs,
        name=f"{template.name} (resampled onto {search.name})",
    )
    factor = _interpolation_variance_factor(search, template, config)
    # PSF sizes past alignment are in search pixels: a 2x-binned template's FWHM doubles
    aligned.fwhm = float(template.fwhm) / scale
    covered = float((~nodata).mean())
    if covered < config.min_overlap:
        raise InputError(
            f"no overlap: after resampling, template {template.name!r} covers {covered:.1%} of "
            f"search {search.name!r} (need >= {config.min_overlap:.0%})"
        )
    return AlignedPair(search=search, template=aligned, overlap=covered, seconds=time.perf_counter() - t0,
                       scale_ratio=scale, registration=registration, variance_factor=factor)


def _interpolation_variance_factor(search: Exposure, template: Exposure, config: AlignConfig, size: int = 96) -> float:
    """Variance of resampled unit white noise, measured on a patch at the search image's centre."""
    ny, nx = search.shape
    y0, x0 = max(0, ny // 2 - size // 2), max(0, nx // 2 - size // 2)
    ys, xs = np.mgrid[y0 : y0 + size, x0 : x0 + size].astype(float)
    tx, ty = _template_pixels(search.wcs, template.wcs, xs, ys)
    bx0, by0 = int(np.floor(tx.min())) - 4, int(np.floor(ty.min())) - 4
    w = int(np.ceil(tx.max())) - bx0 + 5
    h = int(np.ceil(ty.max())) - by0 + 5
    noise = np.random.default_rng(12345).standard_normal((h, w))
    out = ndimage.map_coordinates(noise, np.array([ty - by0, tx - bx0]), order=_ORDERS[config.order], mode="nearest")
    return float(np.var(out))


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
    if config.method == "grid":  # the mapping is only needed over the cut-outs' bounding box
        pmap = PixelMap.build(search_wcs, template.wcs, (xs.min(), xs.max()), (ys.min(), ys.max()))
        tx, ty = pmap.points(xs, ys)
    else:
        tx, ty = _template_pixels(search_wcs, template.wcs, xs, ys)
    order = _ORDERS[config.order]
    tny, tnx = template.shape
    # Only the bounding box of all cut-outs is needed from the template.
    finite = np.isfinite(tx) & np.isfinite(ty)
    pad = 4
    x0 = int(np.clip(np.floor(np.nanmin(np.where(finite, tx, np.inf))) - pad, 0, tnx - 1)) if finite.any() else 0
    x1 = int(np.clip(np.ceil(np.nanmax(np.where(finite, tx, -np.inf))) + pad + 1, 1, tnx)) if finite.any() else 1
    y0 = int(np.clip(np.floor(np.nanmin(np.where(finite, ty, np.inf))) - pad, 0, tny - 1)) if finite.any() else 0
    y1 = int(np.clip(np.ceil(np.nanmax(np.where(finite, ty, -np.inf))) + pad + 1, 1, tny)) if finite.any() else 1
    coords = np.array([ty - y0, tx - x0])
    bad_in = (template.mask[y0:y1, x0:x1] & int(MaskBits.NO_DATA)) != 0
    sub = np.where(bad_in, 0.0, template.image[y0:y1, x0:x1]).astype(np.float32)
    image = ndimage.map_coordinates(sub, coords, order=order, mode="constant", cval=np.nan).astype(np.float32)
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
