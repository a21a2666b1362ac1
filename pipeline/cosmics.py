"""Cosmic rays found and masked before subtraction (L.A.Cosmic, through astroscrappy).

Survey pipelines (DES, LSST) find cosmic rays in each single exposure and mask them before the
difference is made; an unflagged hit is a sharp positive spike that PSF matching either leaves in
the difference as it is (template convolved) or smears into a star-like blob (search convolved).
Flagged, it is left out of the kernel fit and of detection, and the convolution reads its pixels as
zeros (``PsfMatchConfig.grow_bits``).
This module flags them with van Dokkum's (2001) Laplacian edge detection as implemented by
astroscrappy (:func:`astroscrappy.detect_cosmics`):

* :func:`mask_cosmic_rays` -- the pure array function: image, mask and variance of one exposure in,
  the new cosmic-ray pixels (and, with ``replace``, the image with them interpolated over) out, as a
  :class:`CosmicRayResult`.
  Pixels already flagged (``skip_bits``) or non-finite are kept out of the detection and never
  flagged again.  The noise model is the exposure's own: its variance plane when given (ADU^2; it
  works for sky-subtracted images too), else ``image / gain + (read_noise / gain)^2``.
* :func:`clean_exposure` -- the same on an :class:`~pipeline.io.Exposure`: the flagged pixels get
  ``MaskBits.CR`` in a new mask plane, so they stay out of the kernel fit (``BAD_FOR_FIT``), are grown
  into ``CONVOLVED`` through the kernel (``PsfMatchConfig.grow_bits``), get zero weight in the matched
  filter, the PSF photometry and the background, and a candidate on them is flagged ``MASKED``.
* :func:`mask_pair_cosmics` -- the policy of a pair: the search always, the template only when it
  is a single exposure (:func:`single_exposure`: its ``NCOMBINE`` card), with a record of what was
  done for the CCD's decisions.

The default ``method = "tiled"`` runs L.A.Cosmic only on small tiles around the pixels that could
be flagged at all -- those whose sub-sampled Laplacian, over the smallest variance among the pixel
and its four neighbours, exceeds ``sigclip`` (the first test of the algorithm, with the noise taken
from the variance plane rather than its median-filtered version) and whose Laplacian exceeds ``objlim``
times the fine structure (the second test, which needs no noise: star and galaxy cores, most of the
first test's pixels, fail it) -- with ``tile_margin`` pixels of
context, which covers the reach of the algorithm's median filters, and the image reflected beyond
its border (unpadded, L.A.Cosmic flagged the core of a star cut by the edge of a real DECam stack).
On the simulated DECam CCDs the mask is the same pixel for pixel as one full-frame call
(``method = "full"``) at a seventh to a twelfth of the cost: a CCD is mostly empty sky.
The tiles go through :func:`pipeline.lacosmic.lacosmic_stack` (``engine = "numpy"``): tiles of one shape
as one stack, the algorithm as whole-stack array operations, the same mask as astroscrappy's call on each tile
(tested pixel for pixel) at about a quarter of its time per pixel.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from scipy import ndimage

from dia.fused import grow_mask_box
from dia.masks import MaskBits
from dia.stats import robust_std
from pipeline.detect.filter import label_pixels

__all__ = ["CosmicRayConfig", "CosmicRayResult", "mask_cosmic_rays", "noise_scale", "single_exposure",
           "clean_exposure", "mask_pair_cosmics", "engine_label", "SKIP_BITS"]

#: Mask bits whose pixels L.A.Cosmic neither reads nor flags: bad, saturated, no data, already a
#: cosmic ray, suspect.  ``EDGE`` is not among them: it says where a pixel is, not what it holds.
SKIP_BITS = int(MaskBits.BAD | MaskBits.SAT | MaskBits.NO_DATA | MaskBits.CR | MaskBits.SUSPECT)

_METHODS = ("tiled", "full")
_ENGINES = ("numpy", "astroscrappy")
_SQUARE = np.ones((3, 3), bool)
#: ``noise_check`` scales the variance when the measured noise exceeds its prediction by more than this factor.
_NOISE_TOLERANCE = 1.1
_TEMPLATE_POLICIES = ("single", "always", "never")
_CLEANTYPES = ("meanmask", "medmask", "median", "idw")
_FSMODES = ("median", "convolve")


@dataclasses.dataclass(frozen=True)
class CosmicRayConfig:
    """Parameters of the cosmic-ray stage (before alignment and subtraction).

    The L.A.Cosmic parameters keep astroscrappy's defaults except ``sigclip`` and ``niter``; they were
    checked on simulated DECam CCDs against truth (every injected cosmic ray flagged, no injected
    transient touched) and on real DECam stacks (nothing flagged on the stars or the transient).
    """

    enabled: bool = True
    """Run the stage (``pipeline subtract --no-cosmics`` turns it off for one subtraction)."""
    template: str = "single"
    """Which templates are cleaned (the search always is): ``"single"`` (default) when the template is a
    single exposure by its header (:func:`single_exposure`: ``NCOMBINE`` <= 1, or no such card -- a coadd
    without the card is cleaned too: L.A.Cosmic flags next to nothing on a stack, and the cost is only
    time), ``"always"`` or ``"never"``."""
    sigclip: float = 5.0
    """Laplacian-to-noise threshold of a cosmic-ray pixel (astroscrappy's default is 4.5: on the simulated DECam
    CCDs 5 flagged the same injected cosmic rays and hot pixels with 7x fewer groups of noise pixels)."""
    sigfrac: float = 0.3
    """Neighbours of a flagged pixel are flagged down to ``sigfrac * sigclip`` (astroscrappy default)."""
    objlim: float = 5.0
    """Least contrast between the Laplacian and the fine-structure image: what keeps the cores of stars
    (whose light the PSF spreads) from being flagged; raise it if star cores are flagged (astroscrappy default;
    5 and 8 flagged the same pixels on the simulated CCDs)."""
    niter: int = 2
    """L.A.Cosmic iterations (astroscrappy's default is 4: the third and fourth changed nothing in the tests and
    < 0.1% of the pixels on the simulated CCDs).  1 costs ~60% of 2 and flagged the same simulated cosmic rays,
    but 79% of the pixels of 3-pixel-wide tracks in the tests against 89% (1- and 2-pixel-wide ones: all)."""
    sepmed: bool = True
    """Separable median filters (faster than the full 2-D ones, nearly the same; astroscrappy default)."""
    fsmode: str = "median"
    """Fine-structure image: ``"median"`` (the original algorithm, default) or ``"convolve"`` (a Gaussian of
    the exposure's FWHM)."""
    cleantype: str = "meanmask"
    """How astroscrappy interpolates over flagged pixels between its iterations: ``"meanmask"`` (masked 5x5 mean,
    default), ``"medmask"``, ``"median"`` or ``"idw"``."""
    grow: int = 1
    """Each flagged group is grown by this many pixels (3x3 dilations; never into ``skip_bits`` pixels): L.A.Cosmic
    leaves the flat middle of tracks wider than two pixels and the faint rims of tracks unflagged (about a third of
    the pixels of 3-pixel-wide tracks in the tests); 0 keeps its mask as it is."""
    replace: bool = False
    """Replace the flagged pixels of the image by the mean of the good pixels in the 5x5 box around each (the box
    grown where it holds none); the mask bit is set either way.  Their values still enter the stamps the CNN
    scores and the difference where the template is the convolved image (the kernel fit, detection and photometry
    ignore them, the convolution reads zeros).  Off by default, as masked pixels keep their values in the stamps
    (:mod:`pipeline.stamps`): on 8 simulated CCDs replacing changed no candidate and no selection (75 of 2465
    scores moved, by at most 0.24)."""
    noise_check: bool = True
    """Scale the variance up (never down) to the noise measured between neighbouring pixels when that is more than
    10% larger (:func:`noise_scale`): a variance plane too small -- a weight map in other units -- would otherwise
    make noise and star cores look like cosmic rays.  Never down: the correlated noise of resampled or stacked
    images is smaller between neighbours than per pixel (0.80-0.83 on the real DECam stacks; 1.00 on the
    simulated exposures)."""
    skip_bits: int = SKIP_BITS
    """Mask bits of pixels kept out of the detection and never flagged (:data:`SKIP_BITS`)."""
    method: str = "tiled"
    """``"tiled"`` (default): L.A.Cosmic on tiles around the pixels that pass its first test (see the module
    notes); ``"full"``: one call on the whole frame (the reference; the same mask on the simulated CCDs)."""
    tile_margin: int = 12
    """Pixels of context around each tile (``"tiled"``); it must cover the reach of the median filters
    (~8 px) plus the growth of each further iteration."""
    engine: str = "numpy"
    """What runs L.A.Cosmic on the tiles (``"tiled"``): ``"numpy"`` (default), :func:`pipeline.lacosmic.lacosmic_stack`
    on stacks of equal-shape tiles (each tile widened with real pixels to the next multiple of 8 px), the same mask
    as astroscrappy's per tile and 3-5x faster on a CCD; ``"astroscrappy"``, one ``detect_cosmics`` call per tile.
    ``"numpy"`` implements ``sepmed = True``, ``fsmode = "median"`` and ``cleantype = "meanmask"``; other settings
    use astroscrappy.  ``method = "full"`` (the reference) always calls astroscrappy."""

    def __post_init__(self) -> None:
        for name, value, choices in (("template", self.template, _TEMPLATE_POLICIES),
                                     ("method", self.method, _METHODS),
                                     ("engine", self.engine, _ENGINES),
                                     ("cleantype", self.cleantype, _CLEANTYPES),
                                     ("fsmode", self.fsmode, _FSMODES)):
            if value not in choices:
                raise ValueError(f"CosmicRayConfig.{name} must be one of {choices}, got {value!r}")
        if not (self.sigclip > 0 and 0 < self.sigfrac <= 1 and self.objlim > 0):
            raise ValueError(f"CosmicRayConfig needs sigclip > 0, 0 < sigfrac <= 1 and objlim > 0, got "
                             f"sigclip={self.sigclip}, sigfrac={self.sigfrac}, objlim={self.objlim}")
        if self.niter < 1 or self.grow < 0:
            raise ValueError(f"CosmicRayConfig needs niter >= 1 and grow >= 0, got niter={self.niter}, "
                             f"grow={self.grow}")
        if self.tile_margin < 8:
            raise ValueError(f"CosmicRayConfig.tile_margin must be >= 8 (the reach of L.A.Cosmic's filters), "
                             f"got {self.tile_margin}")


@dataclasses.dataclass
class CosmicRayResult:
    """What :func:`mask_cosmic_rays` found in one image.

    Attributes
    ----------
    mask : ndarray (ny, nx) bool
        New cosmic-ray pixels, grown by ``grow`` (never a pixel that was already flagged with ``skip_bits``).
    cleaned : ndarray (ny, nx) float32 or None
        The image with those pixels replaced by the local mean of good pixels (``replace``), else None.
    n_pixels : int
        Number of flagged pixels.
    n_cosmic_rays : int
        Number of 8-connected groups of flagged pixels.
    n_tiles : int
        Tiles L.A.Cosmic ran on (1 for ``method = "full"``, 0 when nothing could be flagged).
    noise_scale : float
        Factor the standard deviation of the variance plane was multiplied by (``noise_check``; 1: used as it is).
    """

    mask: np.ndarray
    cleaned: np.ndarray | None
    n_pixels: int
    n_cosmic_rays: int
    n_tiles: int
    noise_scale: float = 1.0

    def as_dict(self) -> dict:
        """Counts and the noise scale (JSON-able), for a CCD's decisions."""
        return {"n_pixels": self.n_pixels, "n_cosmic_rays": self.n_cosmic_rays, "n_tiles": self.n_tiles,
                "noise_scale": round(float(self.noise_scale), 4)}


def _noise_variance(image: np.ndarray, variance: np.ndarray | None, gain: float, read_noise: float) -> np.ndarray:
    """The per-pixel variance (ADU^2) L.A.Cosmic divides by: the exposure's own, else its CCD noise model."""
    if variance is not None:
        return np.asarray(variance, np.float32)
    return (np.clip(image, 0, None) / np.float32(gain) + np.float32((read_noise / gain) ** 2)).astype(np.float32)


def _clipped_laplacian(centre2, left, right, up, down) -> np.ndarray:
    """``sum`` over the four sub-pixels of ``max(0, 2 I - I_h - I_v)``: 4x L.A.Cosmic's clipped Laplacian of the
    2x sub-sampled image binned back, from ``2 I`` and the four neighbours (arrays of any one shape)."""
    lap = np.zeros(np.shape(centre2), np.float32)
    part = np.empty(np.shape(centre2), np.float32)
    for h, v in ((left, up), (right, up), (left, down), (right, down)):
        np.subtract(centre2, h, out=part)
        part -= v
        np.maximum(part, 0, out=part)
        lap += part
    return lap


def _candidate_pixels(image: np.ndarray, variance: np.ndarray, skip: np.ndarray, sigclip: float,
                      block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that could pass L.A.Cosmic's first test: sub-sampled Laplacian / (2 noise) > ``sigclip``.

    The Laplacian of the 2x sub-sampled image, clipped at zero and binned back, is at each pixel the mean
    over its four sub-pixels of ``max(0, 2 I - I_h - I_v)`` (``h``: the left or right neighbour, ``v``:
    the one above or below).  The noise is the square root of the smallest variance among the pixel and
    its four neighbours (a variance estimated from the image itself is raised at a cosmic ray; the
    algorithm uses a 7x7 median of it).  Beyond the border the image is reflected, as the tiles are
    (see :func:`_reflect`).

    Computed in bands of ``block`` rows (temporaries in cache, none of frame size).  A band is first
    screened with a necessary condition: the sum of the four parts exceeds its threshold only if the
    largest, ``2 I - min(I_l, I_r) - min(I_u, I_d)``, exceeds a quarter of it, and the threshold is at
    least the band's smallest noise times ``8 sigclip``.  The exact test then runs on the few pixels that
    pass (the same float32 arithmetic, so the same pixels), or on the whole band when the screen passes
    more than a twentieth of it (a variance plane with near-zero pixels).

    Returns
    -------
    ys, xs : ndarray of int
        Row and column of every candidate not in ``skip``, in row-major order.
    """
    ny, nx = image.shape
    mode = "reflect" if min(image.shape) > 1 else "edge"
    threshold = np.float32(8.0 * sigclip)
    found_y, found_x = [], []
    for r0 in range(0, ny, block):
        r1 = min(r0 + block, ny)
        lo, hi = max(r0 - 1, 0), min(r1 + 1, ny)
        rows = ((1 if r0 == 0 else 0), (1 if r1 == ny else 0))  # rows to reflect: only at the frame's edges
        img = np.pad(image[lo:hi], (rows, (1, 1)), mode=mode).astype(np.float32, copy=False)
        centre2 = 2.0 * img[1:-1, 1:-1]
        largest = centre2 - np.minimum(img[1:-1, :-2], img[1:-1, 2:])
        largest -= np.minimum(img[:-2, 1:-1], img[2:, 1:-1])
        least = float(np.min(variance[lo:hi]))  # the smallest variance any pixel of the band can be compared with
        floor = np.sqrt(max(least, 0.0)) * float(threshold) / 4.0
        screened = np.flatnonzero(largest > np.float32(floor * (1 - 1e-5)))  # slack for rounding: never too strict
        if mode != "reflect" or not np.isfinite(least) or screened.size > largest.size // 20:  # every pixel
            var = np.pad(variance[lo:hi], (rows, (1, 1)), mode=mode).astype(np.float32, copy=False)
            lap = _clipped_laplacian(centre2, img[1:-1, :-2], img[1:-1, 2:], img[:-2, 1:-1], img[2:, 1:-1])
            noise = var[1:-1, 1:-1].copy()
            for neighbour in (var[1:-1, :-2], var[1:-1, 2:], var[:-2, 1:-1], var[2:, 1:-1]):
                np.minimum(noise, neighbour, out=noise)
            hit = np.flatnonzero(lap > _noise_threshold(noise, threshold))
        else:
            y, x = np.divmod(screened, nx)
            y = y + 1  # rows of the padded band
            near = [(y, x), (y, x + 2), (y - 1, x + 1), (y + 1, x + 1)]  # left, right, up, down in ``img``
            lap = _clipped_laplacian(centre2.ravel()[screened], *(img[yy, xx] for yy, xx in near))
            fy, fx = y - 1 + r0, x
            noise = variance[fy, fx].astype(np.float32, copy=True)
            for yy, xx in ((fy, fx - 1), (fy, fx + 1), (fy - 1, fx), (fy + 1, fx)):
                np.minimum(noise, variance[_reflected(yy, ny), _reflected(xx, nx)].astype(np.float32, copy=False),
                           out=noise)
            hit = screened[lap > _noise_threshold(noise, threshold)]
        y, x = np.divmod(hit, nx)
        found_y.append(y + r0)
        found_x.append(x)
    ys, xs = np.concatenate(found_y), np.concatenate(found_x)
    keep = ~skip[ys, xs]
    return ys[keep], xs[keep]


def _noise_threshold(min_variance: np.ndarray, threshold: np.float32) -> np.ndarray:
    """``8 sigclip`` times the noise, from the smallest variance of each pixel's cross (in place, float32):
    the mean of the Laplacian's four parts over twice the noise exceeds ``sigclip`` when their sum exceeds it."""
    np.maximum(min_variance, 0, out=min_variance)
    np.sqrt(min_variance, out=min_variance)
    min_variance *= threshold
    return min_variance


def _median5(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Element-wise median of five arrays by a min/max network (equal to ``np.median`` of the five, no NaN).

    The smallest and the largest of ``a..d`` are ``min(min(a, b), min(c, d))`` and ``max(max(a, b), max(c, d))``,
    so the middle two are ``max(min(a, b), min(c, d))`` and ``min(max(a, b), max(c, d))``; the median of five is
    the median of those two and ``e``.  About ten times faster than ``np.median`` over windows of five.
    """
    lo = np.maximum(np.minimum(a, b), np.minimum(c, d))
    hi = np.minimum(np.maximum(a, b), np.maximum(c, d))
    return np.maximum(np.minimum(lo, hi), np.minimum(np.maximum(lo, hi), e))


def _reflected(index: np.ndarray, n: int) -> np.ndarray:
    """Indices beyond ``[0, n)`` reflected about the end pixels (``np.pad``'s ``"reflect"``; any distance)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.mod(index, period)
    return np.where(index >= n, period - index, index)


def _fine_structure_pass(image: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                         config: CosmicRayConfig) -> tuple[np.ndarray, np.ndarray]:
    """The seeds (rows ``ys``, columns ``xs``) that can also pass L.A.Cosmic's second test, Laplacian / fine
    structure > ``objlim``.

    astroscrappy flags a pixel when ``sp > sigclip`` and ``sp / f > objlim``, where ``sp = s - med(s)``,
    ``s`` is the clipped sub-sampled Laplacian (binned back: ``lap / 8`` of :func:`_candidate_pixels`'s sum)
    over the noise, and ``f = max(m - med_wide(m), 0.01 noise) / noise`` with ``m`` a median of the image
    (``sepmed``: the separable 5 x 5 median, rows then columns, and a separable 9 x 9 one of it; else the
    3 x 3 median and a 7 x 7 one of it).  ``med(s) >= 0`` gives ``s >= sp``, and the noise cancels in
    ``s / f``, so a pixel with ``lap / 8 <= objlim (m - med_wide(m))`` can never be flagged: the cores of
    stars and galaxies, which make most of the first test's seeds, are dropped here (per seed, on its
    neighbourhood, the image reflected beyond its border as the tiles are; with 1% of slack for rounding)
    before any tile is built around them.  Once no pixel of a region passes both tests in the first
    iteration nothing there is cleaned, so later iterations see the same pixels: the mask is unchanged
    (equal to the full-frame call on the simulated and real CCDs).  ``fsmode = "convolve"`` keeps every seed.
    """
    if ys.size == 0 or config.fsmode != "median":
        return ys, xs
    inner, outer = (5, 9) if config.sepmed else (3, 7)
    r = inner // 2 + outer // 2  # reach of the wide median of the narrow one
    ny, nx = image.shape
    data = image.astype(np.float32, copy=False)

    def at(dy: int, dx: int) -> np.ndarray:  # the image at the seeds shifted by (dy, dx), reflected at the border
        return data[_reflected(ys + dy, ny), _reflected(xs + dx, nx)]

    lap = _clipped_laplacian(2.0 * at(0, 0), at(0, -1), at(0, 1), at(-1, 0), at(1, 0))
    kept = np.zeros(ys.size, bool)
    off = np.arange(-r, r + 1)
    window = np.lib.stride_tricks.sliding_window_view
    chunk = 2048  # bounded memory: 2048 seeds x 13 x 13 pixels x 25 in the windows
    for start in range(0, ys.size, chunk):
        part = slice(start, start + chunk)
        py = _reflected(ys[part, None] + off[None, :], ny)
        px = _reflected(xs[part, None] + off[None, :], nx)
        patch = data[py[:, :, None], px[:, None, :]]
        if config.sepmed:  # rows (x) first, then columns (y), as astroscrappy's separable filters
            narrow = _median5(*(patch[:, :, i:i + outer] for i in range(inner)))
            narrow = _median5(*(narrow[:, i:i + outer, :] for i in range(inner)))  # (n, outer, outer) around the seed
            mid = outer // 2
            wide = np.sort(np.sort(narrow, axis=2)[:, :, mid], axis=1)[:, mid]  # the separable wide median at the seed
        else:
            narrow = np.median(window(patch, (inner, inner), axis=(1, 2)).reshape(len(patch), outer, outer, -1),
                               axis=-1)
            wide = np.median(narrow.reshape(len(patch), -1), axis=-1)
        fine = narrow[:, outer // 2, outer // 2] - wide
        kept[part] = 1.01 * lap[part] / 8.0 > config.objlim * fine
    return ys[kept], xs[kept]


def mask_cosmic_rays(image: np.ndarray, mask: np.ndarray | None = None, variance: np.ndarray | None = None,
                     config: CosmicRayConfig = CosmicRayConfig(), *, gain: float, read_noise: float,
                     saturation: float = float("inf"), fwhm: float = float("nan")) -> CosmicRayResult:
    """Find cosmic rays in one exposure with L.A.Cosmic (:func:`engine_label` says which implementation runs).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Pixel values in ADU (a single exposure; sky included or not when ``variance`` is given).
    mask : ndarray (ny, nx) int, optional
        Bit mask (:class:`dia.masks.MaskBits`); pixels with ``config.skip_bits`` are neither read nor flagged.
    variance : ndarray (ny, nx), optional
        Per-pixel variance in ADU^2, the noise model of the detection; without it,
        ``max(image, 0) / gain + (read_noise / gain)^2`` (the image must then include its sky).
    config : CosmicRayConfig
        Parameters (``enabled`` is not read here: the caller decides whether to call).
    gain : float
        Electrons per ADU (> 0).
    read_noise : float
        Read noise in electrons (used without ``variance``).
    saturation : float
        Saturation level in ADU (pixels at or above it, and the cores of saturated stars, are not flagged).
    fwhm : float
        PSF FWHM in pixels, needed by ``fsmode = "convolve"`` only.

    Returns
    -------
    CosmicRayResult

    Raises
    ------
    ValueError
        Planes of different shapes, a gain that is not positive, or ``fsmode = "convolve"`` without a FWHM.
    ImportError
        astroscrappy is not installed (``pip install astroscrappy``).
    """
    try:  # here, for a clear error: the full-frame reference and other settings than the NumPy engine's need it
        import astroscrappy  # noqa: F401
    except ImportError:
        raise ImportError("cosmic-ray masking needs astroscrappy (pip install astroscrappy), or turn it off: "
                          "cosmics.enabled = false ([run.cosmics] table), pipeline subtract --no-cosmics") from None

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"mask_cosmic_rays: image must be 2-D, got shape {image.shape}")
    for name, plane in (("mask", mask), ("variance", variance)):
        if plane is not None and np.shape(plane) != image.shape:
            raise ValueError(f"mask_cosmic_rays: {name} shape {np.shape(plane)} differs from the image's {image.shape}")
    if not (np.isfinite(gain) and gain > 0):
        raise ValueError(f"mask_cosmic_rays: gain must be a positive number of electrons per ADU, got {gain}")
    if config.fsmode == "convolve" and not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError("mask_cosmic_rays: CosmicRayConfig.fsmode = 'convolve' needs the exposure's FWHM, got "
                         f"{fwhm}")
    finite = np.isfinite(image)
    skip = ~finite
    if mask is not None:
        skip |= (np.asarray(mask) & int(config.skip_bits)) != 0
    data = image.astype(np.float32, copy=False)
    if not finite.all():
        data = np.where(finite, data, np.float32(0))
    var = _noise_variance(data, variance, gain, read_noise)
    if not np.isfinite(var).all():
        skip |= ~np.isfinite(var)
        var = np.where(np.isfinite(var), var, np.float32(0))
    scale = noise_scale(data, var, skip) if config.noise_check else 1.0
    scale = scale if scale > _NOISE_TOLERANCE else 1.0  # NaN (too few pixels) too
    if scale > 1.0:
        var = var * np.float32(scale * scale)
    kwargs = dict(sigclip=float(config.sigclip), sigfrac=float(config.sigfrac), objlim=float(config.objlim),
                  gain=float(gain), readnoise=float(read_noise), satlevel=float(saturation) * float(gain),
                  niter=int(config.niter), sepmed=bool(config.sepmed), cleantype=config.cleantype,
                  fsmode=config.fsmode, psffwhm=float(fwhm) if np.isfinite(fwhm) else 2.5,
                  psfsize=2 * int(np.ceil(1.5 * fwhm)) + 1 if np.isfinite(fwhm) else 7, verbose=False)
    flagged = np.zeros(image.shape, bool)
    keys = []  # flat indices of the flagged pixels, tile by tile
    cleaned = image.astype(np.float32, copy=True) if config.replace else None  # non-finite pixels kept as they are
    ny, nx = image.shape
    if config.method == "full":
        boxes = [(slice(0, ny), slice(0, nx))]
    else:
        ys, xs = _fine_structure_pass(data, *_candidate_pixels(data, var, skip, config.sigclip), config)
        # flags reach 2 px from a seed per iteration (two 3x3 dilations), a later iteration's seeds lie next to
        # earlier flags, and then the flags grow: a tile holds every pixel within 2 niter + 1 + grow px of its seeds
        boxes = _seed_boxes(ys, xs, (ny, nx), 2 * int(config.niter) + 1 + int(config.grow))
    margin = int(config.tile_margin)
    if config.method == "tiled" and _numpy_engine(config):
        tiles = _stacked_lacosmic(data, var, skip, boxes, margin, config, gain, saturation)
    else:
        tiles = _astroscrappy_tiles(data, var, skip, boxes, margin, config, kwargs)
    for rows, cols, inner, tile_data, tile_skip, crmask in tiles:
        flagged[rows, cols] |= crmask[inner]
        ty, tx = np.nonzero(crmask[inner])
        keys.append((ty + rows.start) * nx + (tx + cols.start))
        if cleaned is not None and crmask[inner].any():
            fill = _masked_mean(tile_data, crmask | tile_skip, crmask)
            np.copyto(cleaned[rows, cols], fill[inner], where=crmask[inner])
    keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)  # tiles may overlap
    return CosmicRayResult(mask=flagged, cleaned=cleaned, n_pixels=int(keys.size),
                           n_cosmic_rays=label_pixels(keys, (ny, nx))[1], n_tiles=len(boxes), noise_scale=scale)


def _astroscrappy_tiles(data, var, skip, boxes, margin: int, config: CosmicRayConfig, kwargs: dict):
    """astroscrappy's ``detect_cosmics`` on each box with ``margin`` px of context (reflected beyond the image);
    yields what :func:`_stacked_lacosmic` yields, per box."""
    import astroscrappy
    from threadpoolctl import threadpool_limits

    shape = data.shape
    # astroscrappy's OpenMP loops cost more than they save on small tiles and spin on a busy host (a run's workers
    # already use the cores): one thread
    with threadpool_limits(limits=1, user_api="openmp"):
        for rows, cols in boxes:
            tile, pads, inner = _tile(rows, cols, margin, shape)
            tile_data, tile_skip = _reflect(data[tile], pads), _reflect(skip[tile], pads)
            crmask, _ = astroscrappy.detect_cosmics(tile_data, inmask=tile_skip, invar=_reflect(var[tile], pads),
                                                    **kwargs)
            if config.grow:  # ``grow`` 3 x 3 dilations are one (2 grow + 1)-pixel box
                crmask = grow_mask_box(np, crmask, int(config.grow), border=False)
            crmask &= ~tile_skip
            yield rows, cols, inner, tile_data, tile_skip, crmask


def engine_label(config: CosmicRayConfig) -> str:
    """Which implementation of L.A.Cosmic :func:`mask_cosmic_rays` runs with these settings (for provenance)."""
    if config.method == "tiled" and _numpy_engine(config):
        return "NumPy tiles, pipeline.lacosmic"
    return "astroscrappy" + (" tiles" if config.method == "tiled" else ", full frame")


def _numpy_engine(config: CosmicRayConfig) -> bool:
    """Whether :func:`pipeline.lacosmic.lacosmic_stack` implements these settings (else astroscrappy runs)."""
    return (config.engine == "numpy" and config.sepmed and config.fsmode == "median"
            and config.cleantype == "meanmask")


def _stacked_lacosmic(data, var, skip, boxes, margin: int, config: CosmicRayConfig, gain: float, saturation: float,
                      multiple: int = 8, stack_pixels: int = 1 << 20):
    """L.A.Cosmic on the tiles around ``boxes``, stacked: each tile (its box plus ``margin``) is widened with the
    image's own pixels (reflected beyond its border, as :func:`_reflect`) to the next multiple of ``multiple`` px on
    each axis, tiles of one shape form stacks of at most ``stack_pixels`` pixels (or one tile) for
    :func:`pipeline.lacosmic.lacosmic_stack`, so that its ~25 temporaries stay small whatever the frame holds (a
    CCD's 200-300 tiles make stacks of 0.1-0.3 Mpx).  A wider tile only gives the box more real context than
    ``margin``.

    Yields, per box: its rows and columns, where it lies in its tile, the tile's image and skip planes and the
    tile's flags (grown by ``config.grow``, never on a skipped pixel).
    """
    from pipeline.lacosmic import lacosmic_stack

    ny, nx = data.shape
    if not boxes:
        return
    y0 = np.array([r.start for r, _ in boxes])
    h = np.array([r.stop - r.start for r, _ in boxes])
    x0 = np.array([c.start for _, c in boxes])
    w = np.array([c.stop - c.start for _, c in boxes])
    th = -(-(h + 2 * margin) // multiple) * multiple  # tile shape
    tw = -(-(w + 2 * margin) // multiple) * multiple
    top = y0 - margin - (th - h - 2 * margin) // 2  # first row and column of each tile (may lie off the image)
    left = x0 - margin - (tw - w - 2 * margin) // 2
    shapes = np.stack([th, tw], axis=1)
    chunks = []  # tiles of one shape, at most ``stack_pixels`` per stack (memory bounded)
    for shape in np.unique(shapes, axis=0):
        members = np.flatnonzero((shapes == shape).all(axis=1))
        per_stack = max(1, stack_pixels // int(shape[0] * shape[1]))
        chunks += [(shape, members[i : i + per_stack]) for i in range(0, members.size, per_stack)]
    for shape, members in chunks:
        rows = _reflected(top[members, None] + np.arange(shape[0]), ny)[:, :, None]
        cols = _reflected(left[members, None] + np.arange(shape[1]), nx)[:, None, :]
        tile_data, tile_var, tile_skip = data[rows, cols], var[rows, cols], skip[rows, cols]
        crmask = lacosmic_stack(tile_data, tile_var, tile_skip, sigclip=config.sigclip, sigfrac=config.sigfrac,
                                objlim=config.objlim, gain=gain, saturation=float(saturation) * float(gain),
                                niter=config.niter)
        if config.grow:  # ``grow`` 3 x 3 dilations are one (2 grow + 1)-pixel box, nothing beyond a tile's edge
            crmask = grow_mask_box(np, crmask, int(config.grow), border=False)
        crmask &= ~tile_skip
        for k, i in enumerate(members.tolist()):
            r0, c0 = int(y0[i] - top[i]), int(x0[i] - left[i])
            inner = (slice(r0, r0 + int(h[i])), slice(c0, c0 + int(w[i])))
            yield boxes[i][0], boxes[i][1], inner, tile_data[k], tile_skip[k], crmask[k]


def noise_scale(image: np.ndarray, variance: np.ndarray, skip: np.ndarray | None = None,
                step: int | None = None) -> float:
    """Robust standard deviation of ``(I[y, x+1] - I[y, x]) / sqrt(V[y, x+1] + V[y, x])`` over every ``step``-th row.

    1 when the variance plane describes the pixel noise; sources and cosmic rays are few enough for the median
    absolute deviation to ignore.  NaN when fewer than 100 pixel pairs are usable (neither in ``skip``).
    ``step`` defaults to the one that leaves about 2^18 pixel pairs (every 32nd row of a DECam CCD, every row of
    a 512 x 512 frame): the MAD of that many Gaussian values is within 0.3% of the truth, and the check acts only
    beyond 10%.
    """
    if step is None:
        step = max(1, int(image.size) >> 18)
    rows = slice(None, None, step)
    diff = np.diff(image[rows], axis=1)
    total = variance[rows][:, 1:] + variance[rows][:, :-1]
    good = total > 0
    if skip is not None:
        good &= ~(skip[rows][:, 1:] | skip[rows][:, :-1])
    if good.sum() < 100:
        return float("nan")
    z = diff[good] / np.sqrt(total[good])
    return robust_std(z)


def _seed_boxes(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], reach: int,
                max_box: int = 256) -> list[tuple[slice, slice]]:
    """Boxes that hold every pixel within ``reach`` pixels of a seed (rows ``ys``, columns ``xs`` of an image of
    ``shape``), seeds closer than about ``2 reach`` sharing one.

    Seeds are grouped on a grid of ``reach`` x ``reach`` cells (the cells holding seeds and their 8 neighbours,
    in 8-connected groups: a few thousand seeds cost far less than a full-frame dilation); each group's box is
    the bounding box of its own seeds grown by ``reach`` and clipped to the image, not the cells' (which would
    add up to a cell on each side: ~30% more tile pixels for the 1-3 pixel seeds of most cosmic rays).  A box
    longer than ``max_box`` px (a satellite trail, a crowded region) is cut into parts of at most that size, and the
    parts with no seed within ``reach`` are dropped: every pixel within ``reach`` of a seed is still in a box, and
    no tile grows with the frame.
    """
    if ys.size == 0:
        return []
    ny, nx = shape
    cell = max(int(reach), 1)
    grid = np.zeros((-(-ny // cell), -(-nx // cell)), bool)
    grid[ys // cell, xs // cell] = True
    grid = ndimage.binary_dilation(grid, structure=_SQUARE)
    labels, n_groups = ndimage.label(grid, structure=_SQUARE)
    group = labels[ys // cell, xs // cell] - 1  # every seed's cell is in a group
    lo_y = np.full(n_groups, ny, np.int64)
    lo_x = np.full(n_groups, nx, np.int64)
    hi_y = np.full(n_groups, -1, np.int64)
    hi_x = np.full(n_groups, -1, np.int64)
    np.minimum.at(lo_y, group, ys)
    np.minimum.at(lo_x, group, xs)
    np.maximum.at(hi_y, group, ys)
    np.maximum.at(hi_x, group, xs)
    boxes = []
    for g, (y0, x0, y1, x1) in enumerate(zip(lo_y.tolist(), lo_x.tolist(), hi_y.tolist(), hi_x.tolist())):
        r0, r1 = max(y0 - reach, 0), min(y1 + reach + 1, ny)
        c0, c1 = max(x0 - reach, 0), min(x1 + reach + 1, nx)
        if r1 - r0 <= max_box and c1 - c0 <= max_box:
            boxes.append((slice(r0, r1), slice(c0, c1)))
            continue
        # a long trail or a crowded region: parts of at most max_box px a side, each its own tile with its margin,
        # those with no seed within reach left out (a diagonal trail's bounding box is mostly empty)
        gy, gx = ys[group == g], xs[group == g]
        for a in range(r0, r1, max_box):
            for b in range(c0, c1, max_box):
                a1, b1 = min(a + max_box, r1), min(b + max_box, c1)
                near = (gy >= a - reach) & (gy < a1 + reach) & (gx >= b - reach) & (gx < b1 + reach)
                if near.any():
                    boxes.append((slice(a, a1), slice(b, b1)))
    return boxes


def _masked_mean(data: np.ndarray, bad: np.ndarray, need: np.ndarray, size: int = 5) -> np.ndarray:
    """Mean of the good pixels in a ``size`` x ``size`` box around each pixel of ``need`` (float32, 0 elsewhere);
    the box doubles where it holds no good pixel, and the median of all good pixels fills what is still empty."""
    good = ~bad
    out = np.zeros(data.shape, np.float32)
    todo = need.copy()
    weights = good.astype(np.float32)
    values = np.where(good, data, np.float32(0)).astype(np.float32)
    while todo.any() and size <= 2 * max(data.shape):
        den = ndimage.uniform_filter(weights, size, mode="mirror")
        num = ndimage.uniform_filter(values, size, mode="mirror")
        ok = todo & (den > 1e-6)
        out[ok] = num[ok] / den[ok]
        todo &= ~ok
        size *= 2
    if todo.any():
        out[todo] = np.float32(np.median(data[good])) if good.any() else np.float32(0)
    return out


def _tile(rows: slice, cols: slice, margin: int, shape: tuple[int, int]):
    """The box ``(rows, cols)`` with ``margin`` pixels of context: the part on the image, the padding the
    rest needs (``((top, bottom), (left, right))``) and where the box lies in the padded tile."""
    ny, nx = shape
    y0, y1 = max(rows.start - margin, 0), min(rows.stop + margin, ny)
    x0, x1 = max(cols.start - margin, 0), min(cols.stop + margin, nx)
    pads = ((y0 - (rows.start - margin), rows.stop + margin - y1),
            (x0 - (cols.start - margin), cols.stop + margin - x1))
    inner = (slice(margin, margin + rows.stop - rows.start), slice(margin, margin + cols.stop - cols.start))
    return (slice(y0, y1), slice(x0, x1)), pads, inner


def _reflect(plane: np.ndarray, pads) -> np.ndarray:
    """A tile extended past the image border by reflection (L.A.Cosmic's median filters are not defined on
    the border: unpadded, the core of a star cut by the edge of a real DECam stack was flagged); any width,
    a tile smaller than its padding too (:func:`_reflected`)."""
    if not any(p for pair in pads for p in pair):
        return plane
    (top, bottom), (left, right) = pads
    ny, nx = plane.shape
    rows = _reflected(np.arange(-top, ny + bottom), ny)
    cols = _reflected(np.arange(-left, nx + right), nx)
    return plane[np.ix_(rows, cols)]


def single_exposure(exposure) -> tuple[bool, str]:
    """Whether an exposure is a single exposure (which can hold cosmic rays) by its header, and why.

    ``NCOMBINE`` (frames combined, written by IRAF imcombine, SWarp-based stackers and our simulator)
    above 1 makes it a stack; 1 or less, or no such card, a single exposure -- a raw or calibrated
    frame rarely carries the card, and L.A.Cosmic flags next to nothing on a stack that lacks it.
    """
    value = exposure.header.get("NCOMBINE") if exposure.header is not None else None
    if value is None:
        return True, "no NCOMBINE card: taken as a single exposure"
    try:
        n = float(value)
    except (TypeError, ValueError):
        return True, f"NCOMBINE = {value!r} is not a number: taken as a single exposure"
    if n > 1:
        return False, f"NCOMBINE = {value}: a stack"
    return True, f"NCOMBINE = {value}"


def clean_exposure(exposure, config: CosmicRayConfig = CosmicRayConfig()):
    """An exposure with its cosmic rays flagged ``MaskBits.CR`` (and replaced when ``config.replace``).

    The input exposure is not modified: the mask (and the image when replacing) are new planes.

    Returns
    -------
    exposure : pipeline.io.Exposure
        The same exposure with the new planes; its provenance records ``cosmic_rays``.
    result : CosmicRayResult
    """
    result = mask_cosmic_rays(exposure.image, exposure.mask, exposure.variance, config, gain=exposure.gain,
                              read_noise=exposure.read_noise, saturation=exposure.saturation, fwhm=exposure.fwhm)
    mask = exposure.mask
    if result.n_pixels:  # a new plane, the input's left as it was
        mask = mask.copy()
        mask[result.mask] |= np.asarray(int(MaskBits.CR), dtype=mask.dtype)
    image = exposure.image
    if result.cleaned is not None and result.n_pixels:  # a new plane: the image with the flagged pixels replaced
        image = result.cleaned.astype(exposure.image.dtype, copy=False)
    replaced = " (values replaced by the local mean)" if config.replace and result.n_pixels else ""
    provenance = dict(exposure.provenance, cosmic_rays=f"L.A.Cosmic ({engine_label(config)}): {result.n_pixels} "
                                                      f"pixels in {result.n_cosmic_rays} groups flagged CR{replaced}")
    return dataclasses.replace(exposure, image=image, mask=mask, provenance=provenance), result


def mask_pair_cosmics(search, template, config: CosmicRayConfig = CosmicRayConfig()):
    """The cosmic-ray stage of a CCD pair: the search always, the template when ``config.template`` says so.

    Returns
    -------
    search, template : pipeline.io.Exposure
        The exposures, cleaned where the stage ran (the inputs themselves when it did not).
    record : dict
        What was done, for the CCD's decisions: per image its counts and seconds
        (:meth:`CosmicRayResult.as_dict` plus ``wall_s``) or why it was skipped.
    """
    if not config.enabled:
        return search, template, {"enabled": False}
    record: dict = {"enabled": True}
    out = {}
    for label, exposure in (("search", search), ("template", template)):
        if label == "template":
            single, why = single_exposure(exposure)
            run = config.template == "always" or (config.template == "single" and single)
            if not run:
                reason = why if config.template == "single" else "CosmicRayConfig.template = 'never'"
                record[label] = {"skipped": reason}
                out[label] = exposure
                continue
        t0 = time.perf_counter()
        out[label], result = clean_exposure(exposure, config)
        record[label] = dict(result.as_dict(), wall_s=round(time.perf_counter() - t0, 3))
        if label == "template":
            record[label]["why"] = why
    return out["search"], out["template"], record
