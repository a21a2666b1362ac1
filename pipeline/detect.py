"""Candidate detection: PSF-matched-filter S/N maps, segmentation, candidate tables.

Detection on a difference image uses the optimal point-source statistic: at
every pixel the PSF-weighted flux estimate and its error,

    F = corr(D / V, P),   W = corr(1 / V, P**2),
    flux = F / W,   flux_err = 1 / sqrt(W),   snr = F / sqrt(W),

with ``P`` the (unit-sum) PSF and masked pixels given zero weight.  The S/N
map is thresholded (default 5) and segmented with photutils; each segment's
S/N peak, refined to sub-pixel precision, is one candidate.  The same
statistic on ``-D`` finds negative footprints: a positive candidate with one
nearby is flagged ``DIPOLE`` (the signature of misregistration or PSF
mismatch), the negative ones themselves are not reported.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage, signal

from dia.masks import BAD_FOR_FIT, MaskBits

__all__ = [
    "DetectConfig",
    "CandidateFlags",
    "CandidateTable",
    "CANDIDATE_COLUMNS",
    "FLAG_DESCRIPTIONS",
    "flag_bits",
    "describe_columns",
    "schema_order",
    "PsfFilterResult",
    "gaussian_psf",
    "psf_filter",
    "find_peaks",
    "detect_difference",
    "forced_psf_photometry",
    "PsfModel",
    "fit_psf_model",
    "bright_isolated_stars",
    "aperture_fluxes",
    "estimate_background",
    "DirectDetectConfig",
    "detect_direct",
]


class CandidateFlags(enum.IntFlag):
    """Bit flags of the ``flags`` column of a candidate table.

    What each bit means in one line is :data:`FLAG_DESCRIPTIONS`: every catalog's header
    carries it as ``FLAG<bit>`` cards and :func:`flag_bits` lists it.
    """

    DIPOLE = 1
    """A significant negative footprint lies within ``dipole_radius`` FWHM."""
    MASKED = 2
    """The candidate's central pixel (or its 3x3 core) is masked in some input."""
    EDGE = 4
    """Within ``edge`` pixels of the image border or of missing data: the stamp is incomplete."""
    SATURATED = 8
    """A saturated pixel lies within the PSF footprint."""
    CONVOLVED = 16
    """A masked pixel reached the candidate through the PSF-matching kernel."""


#: One line per :class:`CandidateFlags` bit, at most 47 characters: it is the comment of the
#: ``FLAG<bit>`` card in every catalog's header, which must hold it uncut.
FLAG_DESCRIPTIONS: dict[str, str] = {
    "DIPOLE": "negative footprint within dipole_radius FWHM",
    "MASKED": "masked pixel in the 3x3 core in some input",
    "EDGE": "near the border or missing data: stamp partial",
    "SATURATED": "saturated pixel within the PSF footprint",
    "CONVOLVED": "masked pixel spread in by the PSF-match kernel",
}


def flag_bits() -> list[tuple[int, str, str]]:
    """``(bit, name, description)`` of every :class:`CandidateFlags` bit, lowest bit first.

    The one list that the catalog header cards (``FLAG<bit> = '<name>' / <description>``),
    the README and the vetting page print; ``flags & (1 << bit)`` tests a bit.
    """
    rows = []
    for member in CandidateFlags:
        value = int(member)
        if value <= 0 or value & (value - 1):
            raise ValueError(f"CandidateFlags.{member.name} = {value} is not a single bit")
        rows.append((value.bit_length() - 1, member.name, FLAG_DESCRIPTIONS[member.name]))
    return sorted(rows)


#: name -> (dtype, unit, description) of every column a candidate table may carry, in catalog order.
CANDIDATE_COLUMNS: dict[str, tuple[str, str, str]] = {
    "ccd": ("U64", "", "CCD pair identifier (pipeline.io.CCD_ID_MAX_LENGTH characters at most)"),
    "id": ("i8", "", "candidate number within the CCD (the id of its row in the CCD's stamps file)"),
    "x": ("f8", "pix", "x position on the search grid (0-based)"),
    "y": ("f8", "pix", "y position on the search grid (0-based)"),
    "ra": ("f8", "deg", "right ascension (ICRS)"),
    "dec": ("f8", "deg", "declination (ICRS)"),
    "flux": ("f8", "adu", "PSF flux on the search image's photometric scale"),
    "flux_err": ("f8", "adu", "1-sigma error of flux"),
    "mag": ("f8", "mag", "MAGZERO - 2.5 log10(flux) on the search exposure's zero point, in the system "
                         "of the MAGSYS card (NaN: flux <= 0 or no zero point)"),
    "mag_err": ("f8", "mag", "1-sigma error of mag: 2.5 / ln(10) * flux_err / flux (NaN where mag is)"),
    "snr": ("f8", "", "PSF-matched-filter signal-to-noise"),
    "flags": ("i4", "", "CandidateFlags bits (the FLAGn header cards name bit n)"),
    "score": ("f4", "", "CNN probability of being real (NaN before scoring)"),
    "mode": ("U8", "", "pipeline mode: dia or direct"),
    "model": ("U32", "", "CNN model name or weights file (the column widens to fit)"),
    "mjd": ("f8", "d", "MJD (UTC) of the search exposure: its MJD-OBS, else its DATE-OBS (NaN unknown)"),
    "band": ("U16", "", "filter of the search exposure: its BAND or FILTER card ('' unknown)"),
    "noise_scale": ("f4", "", "factor applied to flux_err (and snr divided by) for the correlated noise of "
                              "this CCD's difference image; 1 = no rescaling"),
    "search_flux": ("f8", "adu", "direct mode: PSF flux in the search image"),
    "template_flux": ("f8", "adu", "direct mode: forced PSF flux in the template, on the search scale"),
    "delta_snr": ("f8", "", "direct mode: (search_flux - template_flux) / flux_err"),
    "truth_id": ("i8", "", "matched truth object id (-1 none)"),
    "truth_kind": ("U16", "", "matched truth object kind ('' none)"),
    "truth_mag": ("f8", "mag", "matched truth magnitude (NaN none)"),
    "truth_sep": ("f8", "pix", "distance on the search grid to the matched truth object (NaN none)"),
}


def describe_columns(table: Table) -> Table:
    """Attach the unit and description of :data:`CANDIDATE_COLUMNS` to every known column, in place.

    Returns ``table``; columns the schema does not know are left as they are.
    """
    for name in table.colnames:
        if name in CANDIDATE_COLUMNS:
            _, unit, desc = CANDIDATE_COLUMNS[name]
            table[name].description = desc
            table[name].unit = unit or None
    return table


def schema_order(names) -> list[str]:
    """``names`` in :data:`CANDIDATE_COLUMNS` order, columns the schema does not know last."""
    names = list(names)
    return [c for c in CANDIDATE_COLUMNS if c in names] + [c for c in names if c not in CANDIDATE_COLUMNS]


class CandidateTable(Table):
    """An :class:`astropy.table.Table` of candidates with the columns of :data:`CANDIDATE_COLUMNS`.

    Units and descriptions are attached to every known column.
    """

    @classmethod
    def from_columns(cls, **columns) -> "CandidateTable":
        """Build a table from 1-D arrays, in the documented column order."""
        n = {len(np.atleast_1d(v)) for v in columns.values()}
        if len(n) > 1:
            raise ValueError("candidate columns differ in length: "
                             f"{ {k: len(np.atleast_1d(v)) for k, v in columns.items()} }")
        order = schema_order(columns)
        table = cls()
        for name in order:
            dtype, unit, desc = CANDIDATE_COLUMNS.get(name, (None, "", ""))
            data = np.atleast_1d(np.asarray(columns[name], dtype=dtype))
            table[name] = data
            table[name].description = desc
            if unit:
                table[name].unit = unit
        return table

    @classmethod
    def empty(cls, names=("ccd", "id", "x", "y", "ra", "dec", "flux", "flux_err", "snr", "flags")) -> "CandidateTable":
        """An empty table with the given documented columns."""
        return cls.from_columns(**{n: np.zeros(0, dtype=CANDIDATE_COLUMNS[n][0]) for n in names})


@dataclasses.dataclass(frozen=True)
class DetectConfig:
    """Parameters of candidate detection on a difference image.

    Attributes
    ----------
    threshold : float
        Detection threshold on the PSF-matched-filter S/N (default 5).
    n_pixels : int
        Minimum number of connected pixels above threshold in the S/N map (default 3;
        the matched filter already integrates over the PSF).
    negative_threshold : float
        S/N threshold for negative footprints used in the dipole flag (default 5).
    dipole_radius : float
        A negative footprint within this many FWHM of a positive candidate flags it DIPOLE (default 1.5).
    edge : int
        Candidates closer than this to the border or to no-data pixels are flagged EDGE
        (default 25: half a 51-pixel stamp).
    psf_radius : float
        Half-width of the Gaussian detection kernel in FWHM (default 1.5).
    max_candidates : int
        At most this many candidates per image, the highest S/N kept (default 5000), a guard
        against a pathological image flooding the classifier.
    min_separation_fwhm : float
        Local S/N maxima at least this many FWHM apart inside one segment are separate
        candidates (default 1.0; 0 keeps one peak per segment).
    renormalize : bool
        Rescale the matched-filter S/N map (and flux errors) by its measured robust scatter
        (default True): PSF matching correlates the noise of the convolved image, which the
        per-pixel variance cannot describe.  The factor is kept in the table's meta (``NOISESCL``).
    """

    threshold: float = 5.0
    n_pixels: int = 3
    negative_threshold: float = 5.0
    dipole_radius: float = 1.5
    edge: int = 25
    psf_radius: float = 1.5
    max_candidates: int = 5000
    min_separation_fwhm: float = 1.0
    renormalize: bool = True

    def __post_init__(self) -> None:
        for name in ("threshold", "negative_threshold", "dipole_radius", "psf_radius"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DetectConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_pixels < 1 or self.max_candidates < 1 or self.edge < 0:
            raise ValueError("DetectConfig.n_pixels and max_candidates must be >= 1 and edge >= 0")


def gaussian_psf(fwhm: float, radius_fwhm: float = 1.5) -> np.ndarray:
    """Unit-sum circular Gaussian PSF image of the given FWHM (pixels)."""
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise ValueError(f"PSF FWHM must be a positive number of pixels, got {fwhm}")
    sigma = fwhm / 2.3548
    r = max(2, int(np.ceil(radius_fwhm * fwhm)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    psf = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    return psf / psf.sum()


def _correlate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate with a small kernel: two 1-D passes when it is separable (a Gaussian), else FFT."""
    u, sv, vt = np.linalg.svd(kernel)
    if sv.size > 1 and sv[1] <= 1e-7 * sv[0]:
        ky = (u[:, 0] * np.sqrt(sv[0])).astype(np.float32)
        kx = (vt[0] * np.sqrt(sv[0])).astype(np.float32)
        if ky.sum() < 0:
            ky, kx = -ky, -kx
        out = ndimage.correlate1d(image, ky, axis=0, mode="constant", output=np.float32)
        return ndimage.correlate1d(out, kx, axis=1, mode="constant", output=np.float32)
    return signal.fftconvolve(image, kernel[::-1, ::-1].astype(np.float32), mode="same").astype(np.float32)


@dataclasses.dataclass
class PsfFilterResult:
    """PSF-weighted flux, its error and S/N at every pixel."""

    flux: np.ndarray
    flux_err: np.ndarray
    snr: np.ndarray


def psf_filter(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf: np.ndarray,
               bad_bits: int = int(BAD_FOR_FIT)) -> PsfFilterResult:
    """Optimal PSF-fit flux of a point source centred at every pixel.

    Pixels with ``mask & bad_bits`` or non-finite values get zero weight.

    Parameters
    ----------
    image, variance : ndarray
        Image (ADU) and variance (ADU^2).
    mask : ndarray or None
        Bit mask.
    psf : ndarray
        Unit-sum PSF image (odd size).
    bad_bits : int
        Mask bits that zero a pixel's weight.
    """
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None:
        good &= (mask & bad_bits) == 0
    ivar = np.zeros(image.shape, np.float32)
    np.divide(1.0, variance, out=ivar, where=good)
    data = np.where(good, image, np.float32(0)).astype(np.float32, copy=False) * ivar
    psf = np.asarray(psf, np.float64)
    num = _correlate(data, psf)
    den = _correlate(ivar, psf**2)
    positive = den[::7, ::7]
    positive = positive[positive > 0]
    ok = den > 1e-3 * np.median(positive) if positive.size else den > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.where(ok, den, np.float32(1)))
        flux = np.where(ok, num / np.where(ok, den, np.float32(1)), np.float32(0))
        err = np.where(ok, 1 / root, np.float32(np.inf))
        snr = np.where(ok, num / root, np.float32(0))
    return PsfFilterResult(flux=flux.astype(np.float32), flux_err=err.astype(np.float32), snr=snr.astype(np.float32))


def find_peaks(snr: np.ndarray, threshold: float, n_pixels: int, max_peaks: int | None = None,
               min_separation: int = 0):
    """Segment ``snr >= threshold`` with photutils and return each segment's sub-pixel peak.

    With ``min_separation > 0`` every local maximum of the S/N map inside the
    segments that is the highest within ``min_separation`` pixels is returned
    instead (peaks on galaxies are resolved into separate candidates).

    Returns
    -------
    x, y : ndarray
        Peak positions refined by a 3-point parabola in each axis.
    peak : ndarray
        S/N at the peak pixel.
    """
    from photutils.segmentation import detect_sources
    from photutils.utils.exceptions import NoDetectionsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)  # an empty result is a valid answer
        segm = detect_sources(snr, threshold, n_pixels=n_pixels)
    if segm is None or segm.n_labels == 0:
        e = np.zeros(0)
        return e, e, e
    if min_separation > 0:
        # local maxima inside the segments (one separable maximum filter over the frame)
        inside = segm.data > 0
        masked = np.where(inside, snr, -np.inf).astype(np.float32)
        local_max = ndimage.maximum_filter(masked, size=2 * min_separation + 1, mode="nearest")
        iy, ix = np.nonzero(inside & (masked == local_max))
    else:
        # peak of each segment: sort only the (few) pixels above threshold by (label, -snr)
        flat = np.flatnonzero(segm.data)
        lab = segm.data.ravel()[flat]
        order = np.lexsort((-snr.ravel()[flat], lab))
        first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
        iy, ix = np.unravel_index(flat[first], snr.shape)
    peak = snr[iy, ix]
    if max_peaks is not None and peak.size > max_peaks:
        keep = np.argsort(-peak)[:max_peaks]
        iy, ix, peak = iy[keep], ix[keep], peak[keep]
    x, y = _refine_peaks(snr, ix, iy)
    return x, y, peak


def _refine_peaks(values: np.ndarray, ix: np.ndarray, iy: np.ndarray):
    """Sub-pixel peak positions from a 3-point parabola through the peak pixel in each axis."""
    ny, nx = values.shape
    peak = values[iy, ix]
    xm = np.clip(ix - 1, 0, nx - 1)
    xp = np.clip(ix + 1, 0, nx - 1)
    ym = np.clip(iy - 1, 0, ny - 1)
    yp = np.clip(iy + 1, 0, ny - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx_den = values[iy, xm] - 2 * peak + values[iy, xp]
        dy_den = values[ym, ix] - 2 * peak + values[yp, ix]
        dx = np.where(dx_den < 0, 0.5 * (values[iy, xm] - values[iy, xp]) / dx_den, 0.0)
        dy = np.where(dy_den < 0, 0.5 * (values[ym, ix] - values[yp, ix]) / dy_den, 0.0)
    dx = np.clip(np.nan_to_num(dx), -0.5, 0.5)
    dy = np.clip(np.nan_to_num(dy), -0.5, 0.5)
    return ix + dx, iy + dy


def forced_psf_photometry(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    fwhm: "float | np.ndarray",
    radius_fwhm: float = 1.5,
    bad_bits: int = int(BAD_FOR_FIT),
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-PSF-fit fluxes at fixed sub-pixel positions.

    The model is a circular Gaussian of the given FWHM (scalar or one per position) centred exactly on
    ``(x, y)`` and normalised to unit integral, fitted with inverse-variance
    weights inside ``radius_fwhm`` FWHM; masked pixels get zero weight.

    Returns
    -------
    flux, flux_err : ndarray
        Fluxes (ADU) and 1-sigma errors; NaN where no pixel was usable.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    from pipeline.stamps import cut_stamps

    fwhm = np.broadcast_to(np.asarray(fwhm, float), x.shape)
    r = max(2, int(np.ceil(radius_fwhm * fwhm.max())))
    size = 2 * r + 1
    planes = {"image": image, "variance": variance}
    cut = cut_stamps(planes, {"image": mask} if mask is not None else None, x, y, size=size)
    data, var = cut.data[:, 0].astype(np.float64), cut.data[:, 1].astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0) & ((cut.mask[:, 0] & bad_bits) == 0)
    sigma = (fwhm / 2.3548)[:, None, None]
    offs = np.arange(-r, r + 1)
    dx = offs[None, None, :] - (x - cut.x)[:, None, None]
    dy = offs[None, :, None] - (y - cut.y)[:, None, None]
    rr = dx**2 + dy**2
    psf = np.exp(-0.5 * rr / sigma**2) / (2 * np.pi * sigma**2)
    good &= rr <= (radius_fwhm * fwhm[:, None, None]) ** 2
    w = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    num = (psf * np.where(good, data, 0.0) * w).sum(axis=(1, 2))
    den = (psf**2 * w).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(den > 0, num / den, np.nan)
        err = np.where(den > 0, 1.0 / np.sqrt(den), np.nan)
    return flux, err


def _segment_peaks(values: np.ndarray, above: np.ndarray):
    """Peak pixel (iy, ix) of every connected region of ``above``."""
    labels, n = ndimage.label(above)
    if n == 0:
        e = np.zeros(0, int)
        return e, e
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    order = np.lexsort((-values.ravel()[flat], lab))
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
    return np.unravel_index(flat[first], values.shape)


def bright_isolated_stars(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    fwhm: float,
    *,
    min_snr: float = 100.0,
    isolation: float = 12.0,
    max_stars: int = 400,
    neighbour_snr: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of bright, unmasked point-like peaks with no neighbour within ``isolation`` FWHM.

    Works on the per-pixel S/N (no convolution, so it is cheap): a point
    source of PSF S/N ``S`` has a peak pixel S/N of about ``S / (sqrt(pi) sigma)``.
    Neighbours are peaks of regions above ``neighbour_snr`` per pixel.
    ``image`` must be background-subtracted.
    """
    sigma = fwhm / 2.3548
    good = np.isfinite(image) & (variance > 0)
    snr = np.where(good, image / np.sqrt(np.where(good, variance, 1.0)), 0.0).astype(np.float32)
    iy, ix = _segment_peaks(snr, snr > neighbour_snr)
    if ix.size == 0:
        return np.zeros(0), np.zeros(0)
    peak = snr[iy, ix]
    # sharpness: a cosmic ray or hot pixel towers over its four neighbours, a PSF does not
    ny, nx = snr.shape
    around = 0.25 * (snr[iy, np.clip(ix - 1, 0, nx - 1)] + snr[iy, np.clip(ix + 1, 0, nx - 1)]
                     + snr[np.clip(iy - 1, 0, ny - 1), ix] + snr[np.clip(iy + 1, 0, ny - 1), ix])
    psf_like = peak < 1.5 * np.exp(0.5 / sigma**2) * np.maximum(around, 1e-3)
    bright = np.flatnonzero((peak > min_snr / (np.sqrt(np.pi) * sigma)) & psf_like)
    if bright.size > max_stars:
        bright = bright[np.argsort(-peak[bright])[:max_stars]]
    reach = 0.5 * isolation * fwhm
    x, y = _refine_peaks(snr, ix[bright], iy[bright])
    ok = (x > reach) & (x < nx - reach) & (y > reach) & (y < ny - reach)
    if bright.size and ix.size > 1:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(np.column_stack([ix, iy])).query(np.column_stack([x, y]), k=2)
        ok &= d[:, 1] > isolation * fwhm
    x, y = x[ok], y[ok]
    if x.size:  # nothing flagged within the core (saturated stars, bad pixels)
        from pipeline.stamps import cut_stamps

        core = 2 * int(np.ceil(fwhm)) + 1
        m = cut_stamps({"m": mask}, {"m": mask}, x, y, size=core).mask[:, 0]
        clean = ((m & int(BAD_FOR_FIT)) == 0).all(axis=(1, 2))
        x, y = x[clean], y[clean]
    return x, y


def aperture_fluxes(image, variance, mask, x, y, radius, *, annulus: tuple[float, float] | None = None):
    """Aperture sums (and errors) at positions; optional local background from an annulus.

    Returns
    -------
    flux, flux_err, bad : ndarray
        Background-subtracted aperture flux, its error, and whether a flagged pixel is in the aperture.
    """
    from photutils.aperture import CircularAperture, aperture_photometry

    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.size == 0:
        e = np.zeros(0)
        return e, e, e.astype(bool)
    pos = np.column_stack([x, y])
    ap = CircularAperture(pos, r=radius)
    flagged = ((mask & int(BAD_FOR_FIT)) != 0).astype(np.float32)
    tab = aperture_photometry(np.nan_to_num(image), ap, error=np.sqrt(np.clip(variance, 0, None)))
    bad = np.asarray(aperture_photometry(flagged, ap, method="center")["aperture_sum"]) > 0
    flux = np.asarray(tab["aperture_sum"], float)
    err = np.asarray(tab["aperture_sum_err"], float)
    if annulus is not None:  # sigma-clipped median of the annulus: neighbours do not bias it
        flux = flux - _annulus_median(image, x, y, annulus) * ap.area
    return flux, err, bad


def _annulus_median(image, x, y, annulus):
    """Sigma-clipped (3 sigma, 3 passes) median of an annulus around each position (vectorised)."""
    from pipeline.stamps import cut_stamps

    r_out = int(np.ceil(annulus[1]))
    cut = cut_stamps({"i": image}, None, x, y, size=2 * r_out + 1)
    offs = np.arange(-r_out, r_out + 1)
    dx = offs[None, None, :] - (np.asarray(x, float) - cut.x)[:, None, None]
    dy = offs[None, :, None] - (np.asarray(y, float) - cut.y)[:, None, None]
    rr = np.hypot(dx, dy)
    vals = np.where((rr >= annulus[0]) & (rr < annulus[1]), cut.data[:, 0], np.nan)
    vals = vals.reshape(len(vals), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            med = np.nanmedian(vals, axis=1)
            sig = 1.4826 * np.nanmedian(np.abs(vals - med[:, None]), axis=1)
            vals = np.where(np.abs(vals - med[:, None]) <= 3 * sig[:, None] + 1e-12, vals, np.nan)
        return np.nan_to_num(np.nanmedian(vals, axis=1))


def _psf_sky_response(fwhm, radius_fwhm: float = 1.5) -> np.ndarray:
    """Flux a Gaussian fit (:func:`forced_psf_photometry`) returns for a constant sky of 1 per pixel."""
    fwhm = np.atleast_1d(np.asarray(fwhm, float))
    out = np.empty(fwhm.size)
    for i, f in enumerate(fwhm):
        r = max(2, int(np.ceil(radius_fwhm * f)))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        rr = xx**2 + yy**2
        sig = f / 2.3548
        p = np.exp(-0.5 * rr / sig**2) / (2 * np.pi * sig**2) * (rr <= (radius_fwhm * f) ** 2)
        out[i] = p.sum() / (p**2).sum()
    return out


def _poly_design(u: np.ndarray, v: np.ndarray, n_terms: int) -> np.ndarray:
    """Columns 1, u, v (, u^2, uv, v^2) of a polynomial surface with 1, 3 or 6 terms."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    cols = [np.ones_like(u), u, v, u * u, u * v, v * v][:n_terms]
    return np.stack(cols, axis=-1)


@dataclasses.dataclass(frozen=True)
class PsfModel:
    """Gaussian-core PSF model with a FWHM varying linearly across the image, and a flux correction.

    ``fwhm_at(x, y)`` is a polynomial in ``u, v`` (the position scaled to [-1, 1]
    over ``shape``) with 1, 3 or 6 coefficients ``fwhm_coeffs`` (1, u, v, u^2, uv, v^2).
    ``correction`` is the ratio of total flux (a 5-FWHM aperture) to the flux
    measure the model was fitted for (the Gaussian fit at the local FWHM, or an
    aperture): real PSFs have wings a Gaussian misses -- the classic aperture
    correction.
    """

    fwhm_coeffs: tuple[float, ...]
    correction: float = 1.0
    shape: tuple[int, int] = (1, 1)
    n_stars: int = 0
    aperture_radius: float | None = None

    def fwhm_at(self, x, y) -> np.ndarray:
        """Local FWHM in pixels."""
        u = 2.0 * np.asarray(x, float) / max(self.shape[1] - 1, 1) - 1.0
        v = 2.0 * np.asarray(y, float) / max(self.shape[0] - 1, 1) - 1.0
        return _poly_design(u, v, len(self.fwhm_coeffs)) @ np.asarray(self.fwhm_coeffs)

    def photometry(self, image, variance, mask, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Total fluxes and errors: Gaussian fits at the local FWHM times the correction."""
        flux, err = forced_psf_photometry(image, variance, mask, x, y, self.fwhm_at(x, y))
        return flux * self.correction, err * self.correction


def _best_fwhm(image, variance, mask, x, y, fwhm, factors=np.arange(0.7, 1.42, 0.02),
               bad_bits: int = int(BAD_FOR_FIT)):
    """Per star, the Gaussian FWHM (on a grid) that fits the core best (least chi^2).

    Each trial width is a weighted Gaussian flux fit inside 1 FWHM, exactly as
    :func:`forced_psf_photometry` does; the stamps are cut once for all widths.
    """
    from pipeline.stamps import cut_stamps

    r = max(2, int(np.ceil(fwhm * factors[-1])))
    cut = cut_stamps({"i": image, "v": variance}, {"i": mask}, x, y, size=2 * r + 1)
    data, var = cut.data[:, 0].astype(np.float64), cut.data[:, 1].astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0) & ((cut.mask[:, 0] & bad_bits) == 0)
    w_pix = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    data = np.where(good, data, 0.0)
    offs = np.arange(-r, r + 1)
    dx = offs[None, None, :] - (np.asarray(x, float) - cut.x)[:, None, None]
    dy = offs[None, :, None] - (np.asarray(y, float) - cut.y)[:, None, None]
    rr = dx**2 + dy**2
    chi2 = []
    for f in factors:
        w = fwhm * f
        sig = w / 2.3548
        psf = np.exp(-0.5 * rr / sig**2) / (2 * np.pi * sig**2)
        inside = rr <= w**2
        weight = np.where(inside, w_pix, 0.0)
        den = (psf**2 * weight).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = np.where(den > 0, (psf * data * weight).sum(axis=(1, 2)) / den, np.nan)
        res = np.where(inside, (data - flux[:, None, None] * psf) ** 2 * w_pix, 0.0)
        chi2.append(np.nansum(res, axis=(1, 2)) / np.maximum(inside.sum(axis=(1, 2)), 1))
    return fwhm * factors[np.nanargmin(np.array(chi2), axis=0)]


def fit_psf_model(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    fwhm: float,
    *,
    aperture_radius: float | None = None,
    min_snr: float = 50.0,
    total_fwhm: float = 5.0,
    min_stars: int = 5,
    min_stars_linear: int = 12,
    min_stars_quadratic: int = 60,
    fit_width: bool = True,
) -> PsfModel:
    """Measure the PSF width field and the flux correction on bright isolated stars.

    Parameters
    ----------
    image : ndarray
        Background-subtracted image whose PSF is wanted.
    variance, mask : ndarray
        Its variance and mask.
    fwhm : float
        Nominal FWHM (pixels), the starting point.
    aperture_radius : float, optional
        Fit the correction for aperture fluxes of this radius instead of PSF fits.
    min_snr : float
        Least matched-filter S/N of a star used.
    total_fwhm : float
        Radius (in FWHM) of the aperture that defines "total" flux.
    fit_width : bool
        Fit the FWHM field (default); False keeps the nominal FWHM (cheaper: only the
        correction is measured, with galaxies rejected by the ratio clipping).
    min_stars, min_stars_linear, min_stars_quadratic : int
        Fewer usable stars than ``min_stars``: the nominal FWHM and no correction;
        at least ``min_stars_linear``: a FWHM plane; at least ``min_stars_quadratic``: a
        quadratic surface (PSFs vary smoothly but not linearly across a CCD); else a constant.
    """
    shape = image.shape
    nominal = PsfModel((float(fwhm), 0.0, 0.0), 1.0, shape, 0, aperture_radius)
    # neighbours inside the total-flux aperture would bias the ratio; fainter ones beyond are harmless
    x, y = bright_isolated_stars(image, variance, mask, fwhm, min_snr=min_snr, isolation=total_fwhm + 1)
    if x.size < min_stars:
        return nominal
    local = _best_fwhm(image, variance, mask, x, y, fwhm) if fit_width else np.full(x.size, float(fwhm))
    med = np.median(local)
    keep = np.abs(local - med) < 0.15 * med  # galaxies fit wide
    coeffs = (float(np.median(local[keep])) if keep.any() else float(fwhm), 0.0, 0.0)
    if fit_width and keep.sum() >= min_stars_linear:
        u = 2.0 * x / max(shape[1] - 1, 1) - 1.0
        v = 2.0 * y / max(shape[0] - 1, 1) - 1.0
        n_terms = 6 if keep.sum() >= min_stars_quadratic else 3
        design = _poly_design(u, v, n_terms)
        for _ in range(3):
            coef, *_ = np.linalg.lstsq(design[keep], local[keep], rcond=None)
            resid = local - design @ coef
            scale = 1.4826 * np.median(np.abs(resid[keep])) + 1e-3
            new = keep & (np.abs(resid) < 3 * scale)
            if new.sum() < min_stars_linear or np.array_equal(new, keep):
                break
            keep = new
        coeffs = tuple(float(c) for c in coef)
    x, y = x[keep], y[keep]
    if x.size < min_stars:
        return nominal
    model = PsfModel(coeffs, 1.0, shape, int(x.size), aperture_radius)
    # A coarse background map is biased by the light of crowded fields; both measures are made
    # relative to the local sky of a far annulus (where the PSF wings hold < 0.1% of the flux).
    annulus = ((total_fwhm + 1) * fwhm, (total_fwhm + 3) * fwhm)
    total, _, _ = aperture_fluxes(image, variance, mask, x, y, total_fwhm * fwhm, annulus=annulus)
    local_sky = _annulus_median(image, x, y, annulus)
    if aperture_radius is None:
        small, _ = forced_psf_photometry(image - 0.0, variance, mask, x, y, model.fwhm_at(x, y))
        small = small - local_sky * _psf_sky_response(model.fwhm_at(x, y))
    else:
        small, _, _ = aperture_fluxes(image, variance, mask, x, y, aperture_radius, annulus=annulus)
    ratio = total / small
    ratio = ratio[np.isfinite(ratio) & (ratio > 0.5) & (ratio < 3.0)]
    if ratio.size < min_stars:
        return dataclasses.replace(model, n_stars=int(ratio.size))
    med = np.median(ratio)
    mad = 1.4826 * np.median(np.abs(ratio - med)) + 1e-3
    ratio = ratio[np.abs(ratio - med) < 4 * mad]
    return dataclasses.replace(model, correction=float(np.median(ratio)), n_stars=int(ratio.size))


def _nanmedian_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (one sort; NaN where a row has no finite value)."""
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    srt = np.sort(np.where(finite, values, np.inf), axis=1)
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[:, None], axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _interp_matrix(n_out: int, centres: np.ndarray) -> np.ndarray:
    """(n_out, len(centres)) matrix of linear-interpolation weights (extrapolated beyond the end
    centres, so a sky gradient continues to the image border); centres are evenly spaced."""
    if centres.size == 1:
        return np.ones((n_out, 1), np.float32)
    pos = (np.arange(n_out) - centres[0]) / (centres[1] - centres[0])
    lo = np.clip(np.floor(pos), 0, centres.size - 2).astype(int)
    hi = lo + 1
    w = pos - lo
    mat = np.zeros((n_out, centres.size), np.float32)
    mat[np.arange(n_out), lo] += 1 - w
    mat[np.arange(n_out), hi] += w
    return mat


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None, cell: int = 128) -> np.ndarray:
    """Smooth sky background: 3-sigma-clipped medians in ``cell`` x ``cell`` boxes, bilinearly interpolated.

    Medians use a regular subsample of each box (every 4th pixel per axis for
    large boxes); the interpolation is separable (two small matrix products).
    """
    ny, nx = image.shape
    cy, cx = max(1, ny // cell), max(1, nx // cell)
    hy, hx = ny // cy, nx // cx
    data = np.where(np.isfinite(image), image, np.nan).astype(np.float32)
    if mask is not None:
        data = np.where((mask & int(BAD_FOR_FIT)) != 0, np.nan, data)
    step = 4 if min(hy, hx) >= 64 else (2 if min(hy, hx) >= 32 else 1)
    boxes = data[: cy * hy, : cx * hx].reshape(cy, hy, cx, hx)[:, ::step, :, ::step]
    boxes = boxes.transpose(0, 2, 1, 3).reshape(cy * cx, -1)
    med = _nanmedian_rows(boxes)
    mad = 1.4826 * _nanmedian_rows(np.abs(boxes - med[:, None]))
    grid = _nanmedian_rows(np.where(np.abs(boxes - med[:, None]) <= 3 * mad[:, None], boxes, np.nan)).reshape(cy, cx)
    if not np.isfinite(grid).any():
        return np.zeros_like(image, dtype=np.float32)
    grid = np.where(np.isfinite(grid), grid, np.nanmedian(grid)).astype(np.float32)
    if min(cy, cx) >= 3:  # replace cells that stand out from their neighbours (a bright star's halo)
        smooth = ndimage.median_filter(grid, size=3, mode="nearest")
        spread = 1.4826 * np.median(np.abs(grid - smooth)) + 1e-6
        grid = np.where(np.abs(grid - smooth) > 5 * spread, smooth, grid)
    wy = _interp_matrix(ny, (np.arange(cy) + 0.5) * hy - 0.5)
    wx = _interp_matrix(nx, (np.arange(cx) + 0.5) * hx - 0.5)
    return (wy @ grid @ wx.T).astype(np.float32)


def _near_mask(mask: np.ndarray, bits: int, radius: int) -> np.ndarray:
    hit = (mask & bits) != 0
    if radius > 0 and hit.any():
        hit = ndimage.maximum_filter(hit, size=2 * radius + 1)
    return hit


def _edge_distance_ok(mask: np.ndarray, edge: int) -> np.ndarray:
    """True where the pixel is at least ``edge`` px from the border and from NO_DATA."""
    ny, nx = mask.shape
    ok = np.zeros(mask.shape, bool)
    if ny > 2 * edge and nx > 2 * edge:
        ok[edge : ny - edge, edge : nx - edge] = True
    nodata = (mask & int(MaskBits.NO_DATA)) != 0
    if nodata.any() and edge > 0:
        # distance transform on a coarse grid would do; the maximum filter is exact and fast enough
        ok &= ~ndimage.maximum_filter(nodata, size=2 * edge + 1)
    return ok


def detect_difference(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    fwhm: float,
    wcs: WCS | None = None,
    config: DetectConfig = DetectConfig(),
    ccd: str = "",
    psf_model: "PsfModel | None" = None,
) -> CandidateTable:
    """Detect positive point-source candidates on a difference image.

    Parameters
    ----------
    image, variance, mask : ndarray
        Difference image (ADU, search scale), its variance and mask.
    fwhm : float
        PSF FWHM of the difference image in pixels (that of the wider PSF after matching).
    wcs : astropy.wcs.WCS, optional
        Search WCS for ``ra``/``dec`` (NaN without one).
    config : DetectConfig
        Thresholds and flag radii.
    ccd : str
        CCD identifier written into the ``ccd`` column.
    psf_model : PsfModel, optional
        PSF of the difference (:func:`fit_psf_model` on the unconvolved image): fluxes are then
        Gaussian fits at the local FWHM put on a total-flux scale; without it, fits at ``fwhm``.

    Returns
    -------
    CandidateTable
        One row per positive candidate, sorted by decreasing S/N.
    """
    psf = gaussian_psf(fwhm, config.psf_radius)
    filt = psf_filter(image, variance, mask, psf)
    noise_scale = 1.0
    if config.renormalize:
        # A convolved image has correlated noise: the per-pixel variance is right, but the
        # matched-filter statistic is noisier than it predicts.  Measure its actual scatter
        # (robustly: sources are a small fraction of the pixels) and rescale.
        sample = filt.snr[::3, ::3]
        sample = sample[(sample != 0) & np.isfinite(sample)]
        if sample.size > 1000:
            noise_scale = float(1.4826 * np.median(np.abs(sample - np.median(sample))))
            if abs(noise_scale - 1.0) > 0.02:
                filt = PsfFilterResult(filt.flux, filt.flux_err * noise_scale, filt.snr / noise_scale)
            else:
                noise_scale = 1.0
    sep = int(round(config.min_separation_fwhm * fwhm))
    x, y, peak = find_peaks(filt.snr, config.threshold, config.n_pixels, config.max_candidates, min_separation=sep)
    nx_, ny_, _ = find_peaks(-filt.snr, config.negative_threshold, config.n_pixels)
    ix = np.clip(np.rint(x).astype(int), 0, image.shape[1] - 1)
    iy = np.clip(np.rint(y).astype(int), 0, image.shape[0] - 1)
    flags = np.zeros(x.size, dtype=np.int32)
    if nx_.size and x.size:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([nx_, ny_]))
        dist, _ = tree.query(np.column_stack([x, y]), k=1)
        flags[dist <= config.dipole_radius * fwhm] |= CandidateFlags.DIPOLE
    if x.size:
        flags[_near_mask(mask, int(BAD_FOR_FIT & ~MaskBits.SAT & ~MaskBits.EDGE), 1)[iy, ix]] |= CandidateFlags.MASKED
        sat_radius = int(np.ceil(config.psf_radius * fwhm))
        flags[_near_mask(mask, int(MaskBits.SAT), sat_radius)[iy, ix]] |= CandidateFlags.SATURATED
        flags[_near_mask(mask, int(MaskBits.CONVOLVED), 0)[iy, ix]] |= CandidateFlags.CONVOLVED
        flags[~_edge_distance_ok(mask, config.edge)[iy, ix]] |= CandidateFlags.EDGE
    if wcs is not None and x.size:
        ra, dec = wcs.pixel_to_world_values(x, y)
    else:
        ra = dec = np.full(x.size, np.nan)
    if psf_model is not None:
        flux, flux_err = psf_model.photometry(image, variance, mask, x, y)
    else:
        flux, flux_err = forced_psf_photometry(image, variance, mask, x, y, fwhm, config.psf_radius)
    flux_err = flux_err * noise_scale
    order = np.argsort(-peak, kind="stable")
    table = CandidateTable.from_columns(
        ccd=np.full(x.size, str(ccd), dtype=CANDIDATE_COLUMNS["ccd"][0])[order],
        id=np.arange(x.size),
        x=x[order], y=y[order], ra=np.asarray(ra)[order], dec=np.asarray(dec)[order],
        flux=flux[order], flux_err=flux_err[order], snr=peak[order],
        flags=flags[order],
    )
    table.meta["NOISESCL"] = noise_scale  # matched-filter S/N renormalisation factor
    return table


@dataclasses.dataclass(frozen=True)
class DirectDetectConfig:
    """Parameters of candidate detection without a difference image (direct mode).

    Candidates are local maxima of the search image's PSF-matched-filter S/N
    (peaks on galaxies resolved separately) whose calibrated point-source flux
    rose significantly with respect to the template at the same sky position.
    Each image is photometered on its own with its own PSF (a Gaussian core
    at the image's FWHM, aperture-corrected to total flux on its stars) and
    its own zero point; the template is read at the positions mapped through
    the two WCSs.  No resampling, no PSF matching, no difference image: a
    catalogue-level comparison.  What survives is scored by the two-image CNN.

    Attributes
    ----------
    threshold : float
        S/N threshold of a search-image peak (default 5).
    n_pixels : int
        Minimum connected pixels above threshold (default 3).
    min_separation_fwhm : float
        Local maxima closer than this many search FWHM are merged (default 1.0).
    brightening_sigma : float
        Keep a peak when its search flux exceeds the scaled template flux by this many
        sigma (default 3; the CNN does the rest).
    systematic : float
        Fractional flux error added in quadrature to the comparison, for the seeing
        dependence of PSF fluxes of resolved sources and calibration errors (default 0.05).
    background_cell : int
        Box size of the sky background estimate in pixels (default 128).
    edge : int
        Edge distance below which candidates are flagged EDGE (default 25).
    max_candidates : int
        At most this many candidates, the most significant brightenings kept (default 5000).
    """

    threshold: float = 5.0
    n_pixels: int = 3
    min_separation_fwhm: float = 1.0
    brightening_sigma: float = 3.0
    systematic: float = 0.05
    background_cell: int = 128
    edge: int = 25
    max_candidates: int = 5000


def _psf_flux_map(exposure, fwhm: float, cell: int):
    """PSF-filter maps of the background-subtracted image, and the flux correction to total flux."""
    img = exposure.image - estimate_background(exposure.image, exposure.mask, cell)
    filt = psf_filter(img, exposure.variance, exposure.mask, gaussian_psf(fwhm))
    model = fit_psf_model(img, exposure.variance, exposure.mask, fwhm, fit_width=False)
    # psf_filter fits a unit-sum Gaussian at the nominal FWHM, as the model's photometry does
    return filt, model.correction


def detect_direct(search, template, config: DirectDetectConfig = DirectDetectConfig(), ccd: str = "") -> CandidateTable:
    """Find candidates without a difference image.

    Parameters
    ----------
    search, template : pipeline.io.Exposure
        The pair on their own pixel grids (the template is NOT resampled).
        Both need a PSF FWHM (pixels), zero point and WCS.
    config : DirectDetectConfig
    ccd : str
        CCD identifier for the ``ccd`` column.

    Returns
    -------
    CandidateTable
        Columns as for the dia mode; ``flux`` is the brightening (search minus
        template, search ADU), ``snr`` the search-image peak S/N, plus
        ``search_flux``, ``template_flux`` and ``delta_snr``.
    """
    fs, ft = float(search.fwhm), float(template.fwhm)
    for label, value in (("search", fs), ("template", ft)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"detect_direct: {label} exposure has no valid PSF FWHM ({value})")
    filt_s, corr_s = _psf_flux_map(search, fs, config.background_cell)
    sep = max(1, int(round(config.min_separation_fwhm * fs)))
    x, y, peak = find_peaks(filt_s.snr, config.threshold, config.n_pixels, None, min_separation=sep)
    if x.size == 0:
        return CandidateTable.empty()
    ix = np.clip(np.rint(x).astype(int), 0, search.shape[1] - 1)
    iy = np.clip(np.rint(y).astype(int), 0, search.shape[0] - 1)
    f_s = filt_s.flux[iy, ix] * corr_s
    e_s = filt_s.flux_err[iy, ix] * corr_s
    filt_t, corr_t = _psf_flux_map(template, ft, config.background_cell)
    world = search.wcs.pixel_to_world_values(x, y)
    tx, ty = (np.asarray(v, float) for v in template.wcs.world_to_pixel_values(*world))
    tny, tnx = template.shape
    in_t = (tx >= 1) & (tx <= tnx - 2) & (ty >= 1) & (ty <= tny - 2)
    coords = np.array([np.where(in_t, ty, 0), np.where(in_t, tx, 0)])
    zp_scale = 10.0 ** (0.4 * (search.zero_point - template.zero_point))
    f_t = ndimage.map_coordinates(filt_t.flux, coords, order=1) * corr_t * zp_scale
    e_t = ndimage.map_coordinates(filt_t.flux_err, coords, order=1) * corr_t * zp_scale
    f_t = np.where(in_t, f_t, 0.0)
    e_t = np.where(in_t & np.isfinite(e_t), e_t, 0.0)
    delta = f_s - f_t
    err = np.sqrt(e_s**2 + e_t**2 + (config.systematic * np.maximum(np.abs(f_s), np.abs(f_t))) ** 2)
    delta_snr = delta / err
    keep = delta_snr >= config.brightening_sigma
    if keep.sum() > config.max_candidates:
        keep &= delta_snr >= np.sort(delta_snr[keep])[-config.max_candidates]
    x, y, peak, delta, err, delta_snr = x[keep], y[keep], peak[keep], delta[keep], err[keep], delta_snr[keep]
    f_s, f_t, in_t, ix, iy = f_s[keep], f_t[keep], in_t[keep], ix[keep], iy[keep]
    flags = np.zeros(x.size, np.int32)
    if x.size:
        t_bad = ndimage.map_coordinates(((template.mask & int(BAD_FOR_FIT)) != 0).astype(np.float32),
                                        coords[:, keep], order=1) > 0
        s_bad = (search.mask[iy, ix] & int(BAD_FOR_FIT & ~MaskBits.SAT & ~MaskBits.EDGE)) != 0
        flags[s_bad | t_bad] |= CandidateFlags.MASKED
        flags[_near_mask(search.mask, int(MaskBits.SAT), int(np.ceil(1.5 * fs)))[iy, ix]] |= CandidateFlags.SATURATED
        flags[~_edge_distance_ok(search.mask, config.edge)[iy, ix] | ~in_t] |= CandidateFlags.EDGE
        ra, dec = search.wcs.pixel_to_world_values(x, y)
    else:
        ra = dec = np.zeros(0)
    order = np.argsort(-delta_snr, kind="stable")
    return CandidateTable.from_columns(
        ccd=np.full(x.size, str(ccd), dtype=CANDIDATE_COLUMNS["ccd"][0])[order], id=np.arange(x.size),
        x=x[order], y=y[order], ra=np.asarray(ra)[order], dec=np.asarray(dec)[order],
        flux=delta[order], flux_err=err[order], snr=peak[order], flags=flags[order],
        search_flux=f_s[order], template_flux=f_t[order], delta_snr=delta_snr[order],
    )
