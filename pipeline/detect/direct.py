"""Candidate detection without a difference image (direct mode).

:class:`DirectDetectConfig` and :func:`detect_direct`: peaks of the search image's PSF matched
filter (after its own sky background), and the shoulder peaks of that map (local maxima of its curvature:
sources on the flank of a brighter one, :func:`pipeline.detect.shoulder_peaks`), are the candidates.  With
``selection="flux"`` (default) only peaks whose aperture-corrected PSF flux rose significantly against the
template's, and whose aperture flux rose too (a galaxy's PSF flux changes with the seeing), are kept
(a catalogue-level cut); with ``selection="cnn"`` every peak is one and the two-image CNN that
scores the stamps is the detector (measured: no more transients for twice the false positives, see
:class:`DirectDetectConfig`).  With ``selection="dense"`` the candidates are the peaks of the
two-image CNN's dense score map over the template resampled onto the search pixels
(:mod:`classifier.dense`, computed by :func:`pipeline.steps.dense_positions` and passed in as
``positions``).  Every way the change is measured by forced photometry of both images at the same
sky position (the template read through the two WCSs): no PSF matching, no difference image; flags
from both masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from dia.masks import BAD_FOR_FIT, MaskBits
from pipeline.align import pixel_scale_ratio, template_pixels
from pipeline.detect.background import estimate_background
from pipeline.detect.filter import check_method, filter_at, find_peaks, gaussian_psf, matched_filter, shoulder_peaks
from pipeline.detect.flags import edge_distance_ok_at, near_mask_at
from pipeline.detect.photometry import aperture_fluxes
from pipeline.detect.psf import fit_psf_model
from pipeline.detect.schema import CANDIDATE_COLUMNS, CandidateFlags, CandidateTable

__all__ = ["DirectDetectConfig", "detect_direct", "SELECTIONS"]

#: Candidate selections of :class:`DirectDetectConfig`: ``"cnn"`` (every search peak, the CNN decides),
#: ``"dense"`` (the peaks of the two-image CNN's dense score map over the aligned pair, given to
#: :func:`detect_direct` as ``positions``) and ``"flux"`` (peaks that brightened by ``brightening_sigma`` in
#: forced photometry).
SELECTIONS = ("cnn", "dense", "flux")

#: Arithmetic of the dense map's network (``DirectDetectConfig.map_precision``).
MAP_PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DirectDetectConfig:
    """Parameters of candidate detection without a difference image (direct mode).

    Candidates are local maxima of the search image's PSF-matched-filter S/N
    (peaks on galaxies resolved separately), and of its curvature away from them
    (``shoulder_sigma``).  With ``selection="flux"`` (default) only peaks whose
    calibrated point-source flux rose by ``brightening_sigma``, and their aperture
    flux by ``aperture_sigma``, are kept.  With ``selection="cnn"`` every such peak is a candidate and the
    two-image CNN that scores the stamps decides, with no flux-difference cut in
    front of it.  Measured with ``pipeline run --mode direct`` and the shipped ``pair-direct``, before shoulder
    peaks (``shoulder_sigma``) were added (a transient is found when a candidate within 2 px scores >= the
    threshold; found / false positives per CCD at thresholds 0.5 and 0.95):

    - benchmark field (4 DECam CCDs, 160 transients): ``"flux"`` 127 / 12.0 and 120 / 2.5,
      ``"cnn"`` 127 / 22.5 and 120 / 3.5;
    - seed 4242 (4 DECam CCDs, 484 transients at 3x the density): ``"flux"`` 403 / 11.25 and
      390 / 1.5, ``"cnn"`` 411 / 24.5 and 391 / 2.75.

    At 0.5 the cut costs 0-8 transients (0-2 points) and halves the false positives; at 0.95 it
    costs 0-1.  Scoring every peak (~2,150 per DECam CCD instead of ~190) adds ~1.8 s per CCD of
    stamps and CNN on 2 CPU cores, more than dia's whole subtraction, so ``"flux"`` stays the
    default.  What the direct mode
    loses against dia lies before both selections: on the benchmark field dia has a candidate
    within 2 px of 141 transients, the direct mode of 132 (133 with ``"cnn"``, 136 with a
    ``min_separation_fwhm`` of 0.5, which on the seed-4242 field adds 1 of 484, within noise, so
    the default stays 1).  The others sit on the flank of a brighter star or galaxy 1-12 px away
    and make no local maximum of their own in the search image's matched-filter S/N; of the 132,
    the CNN passes 127 and dia's CNN passes all 141.

    With ``selection="dense"`` the network itself finds the candidates: the shipped ``pair-dense``
    (trained on stamps off the search peaks too, in the frames' sky units as the map reads them) slid over
    the template resampled onto the search pixels, every 4 pixels (:mod:`classifier.dense`), its peaks
    >= ``map_threshold`` the candidates.  Measured end to end (``pipeline run --mode direct``, found /
    false positives per CCD at 0.5 and 0.95): benchmark field 136 / 4.25 and 127 / 3.0, seed-4242 field
    404 / 4.0 and 399 / 1.75: more transients than the flux cut and a third of its false positives at 0.5,
    within the noise of dia on the benchmark field.  It is not the default: on a CPU the map makes the
    direct mode dearer than dia (``pipeline benchmark``: 6.5 against 3.8 s per DECam CCD, detection 5.4 s
    on a one-thread worker), and on the real DECam pair of the README it misses the nuclear transient the
    flux cut finds (the map reaches 0.25 there and 0.85 nowhere).

    Every way the change is measured without a difference image, by forced
    photometry: each image is photometered on its own at the same sky position
    (the template read through the two WCSs) with its own PSF (a Gaussian core
    at the image's FWHM, aperture-corrected to total flux on its own stars) and
    put on the search's scale with the two zero points; the change is search
    minus template, its error the two statistical errors and a ``systematic``
    fraction of the larger flux in quadrature.  For an isolated point source
    this is the flux of the change; on a resolved host it includes the seeing
    dependence of the host's PSF flux, which the systematic term accounts for.

    Attributes
    ----------
    threshold : float
        S/N threshold of a search-image peak (default 5).
    n_pixels : int
        Minimum connected pixels above threshold (default 3).
    min_separation_fwhm : float
        Local maxima closer than this many search FWHM are merged (default 1.0).
    selection : str
        ``"flux"`` (default): only peaks that brightened by ``brightening_sigma``, capped by the
        significance of the brightening; ``"cnn"``: every search peak is a candidate, capped at
        ``max_candidates`` by search S/N.  See :data:`SELECTIONS`.
    shoulder_sigma : float
        ``selection="flux"`` and ``"cnn"``: also take the search's shoulder peaks, compact sources on the flank
        of a brighter one that make no local maximum of the S/N map (:func:`pipeline.detect.shoulder_peaks`:
        curvature above this many times its noise, S/N above ``threshold``, farther than the peaks' minimum
        separation from every peak; default 5, 0: none).  Measured with the flux cut and ``pair-direct``
        (2026-12-02): on the benchmark field's 8 CCDs (315 transients) 255 -> 263 found at 0.5, false positives
        92 -> 94 (11.5 -> 11.75 per CCD), ~40 more peaks per CCD before the cut; on the seed-4242 field (4
        CCDs, 476 transients) 395 -> 401 and 40 -> 41; at 4 sigma the same transients and more false
        positives (12.6 per CCD).  On the real SFFT DECam pair the same candidates; on the JWST NIRCam pair
        261 -> 272 candidates, 31 -> 32 of them >= 0.5.
    aperture_sigma : float
        ``selection="flux"`` only: a peak that brightened by ``brightening_sigma`` in PSF flux must also have
        brightened by this many sigma in aperture flux (radius ``aperture_fwhm`` times the larger FWHM, each
        image measured on its own at the same sky position, the template's aperture scaled to its pixels).  A
        resolved galaxy's or a star's PSF flux changes with the seeing; its aperture flux much less.  Default 2;
        0: no such test.  Measured with shoulder peaks and ``pair-direct`` (2026-12-02; found / false positives
        at 0.5): benchmark field, 8 CCDs, 315 transients: 263 / 94 without, 259 / 62 at 2, 256 / 37 at 3, the
        candidates 1662 -> 434 -> 354; seed-4242 field, 476 transients: 401 / 41, 398 / 25, 392 / 17.  On the
        real SFFT DECam pair the nuclear transient stays (0.978), the reversed pair loses its two candidates
        >= 0.5 (one at the frame's edge); on the JWST NIRCam pair 32 -> 30 -> 25 candidates >= 0.5.
    aperture_fwhm : float
        Radius of that aperture in FWHM of the image with the wider PSF (default 1.5).
    brightening_sigma : float
        ``selection="flux"`` only: keep a peak when its search flux exceeds the scaled
        template flux by this many sigma (default 3; the CNN does the rest).
    systematic : float
        Fractional flux error added in quadrature to the change's error, for the seeing
        dependence of PSF fluxes of resolved sources and calibration errors (default 0.05).
    background_cell : int
        Box size of the sky background estimate in pixels (default 128).
    edge : int
        Edge distance below which candidates are flagged EDGE (default 25).
    max_candidates : int
        At most this many candidates (default 5000): the highest search-image S/N with
        ``selection="cnn"``, the most significant brightenings with ``selection="flux"``, the
        highest map scores with ``selection="dense"``.
    map_threshold : float
        ``selection="dense"`` only: least score of a peak of the dense map to become a candidate
        (default 0.85; the candidate's own score is then its stamp's, as in the other selections).
    map_precision : str
        ``selection="dense"`` only: arithmetic of the map's network, ``"float32"`` (default) or ``"bfloat16"``
        (the frame and the folded weights in bfloat16, sums in the CPU's bfloat16 units).  Measured on one
        DECam CCD of the benchmark field, one thread of a Zen 4 core (native bfloat16): 3.15 -> 1.75 s, map
        scores within 1e-4 (median; max 0.026), the same peaks >= 0.85 within 1 px (45 against 43: two at the
        threshold).  On a CPU without native bfloat16 it can be slower; the stamps' final scores stay float32.
    method : str
        Implementation: ``"fast"`` (default: the search's matched filter cache-blocked, the
        template's computed at the candidates' pixels only, flags read around the candidates) or
        ``"reference"`` (the previous full-frame code, kept to compare against); the same
        candidates to float32 rounding.
    """

    threshold: float = 5.0
    n_pixels: int = 3
    min_separation_fwhm: float = 1.0
    selection: str = "flux"
    shoulder_sigma: float = 5.0
    aperture_sigma: float = 2.0
    aperture_fwhm: float = 1.5
    brightening_sigma: float = 3.0
    systematic: float = 0.05
    background_cell: int = 128
    edge: int = 25
    max_candidates: int = 5000
    map_threshold: float = 0.85
    map_precision: str = "float32"
    method: str = "fast"

    def __post_init__(self) -> None:
        check_method(self.method, "DirectDetectConfig.method")
        if self.selection not in SELECTIONS:
            raise ValueError(f"DirectDetectConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not (np.isfinite(self.shoulder_sigma) and self.shoulder_sigma >= 0):
            raise ValueError(f"DirectDetectConfig.shoulder_sigma must be >= 0 (0: no shoulder peaks), "
                             f"got {self.shoulder_sigma}")
        if not (np.isfinite(self.aperture_sigma) and self.aperture_sigma >= 0):
            raise ValueError(f"DirectDetectConfig.aperture_sigma must be >= 0 (0: no aperture test), "
                             f"got {self.aperture_sigma}")
        if not (np.isfinite(self.aperture_fwhm) and self.aperture_fwhm > 0):
            raise ValueError(f"DirectDetectConfig.aperture_fwhm must be > 0, got {self.aperture_fwhm}")
        if not self.max_candidates >= 1:
            raise ValueError(f"DirectDetectConfig.max_candidates must be >= 1, got {self.max_candidates}")
        if not 0 < self.map_threshold < 1:
            raise ValueError(f"DirectDetectConfig.map_threshold must lie in (0, 1), got {self.map_threshold}")
        if self.map_precision not in MAP_PRECISIONS:
            raise ValueError(f"DirectDetectConfig.map_precision must be one of {MAP_PRECISIONS}, "
                             f"got {self.map_precision!r}")


def _sky_subtracted(exposure, cell: int) -> np.ndarray:
    """The exposure's image less its smooth sky background (:func:`estimate_background`)."""
    return exposure.image - estimate_background(exposure.image, exposure.mask, cell)


def _correction(img, exposure, fwhm: float, method: str) -> float:
    """Flux correction from the Gaussian fit at the nominal FWHM to total flux, on the image's stars."""
    # the matched filter fits a unit-sum Gaussian at the nominal FWHM, as the model's photometry does
    return fit_psf_model(img, exposure.variance, exposure.mask, fwhm, fit_width=False, method=method).correction


def detect_direct(search, template, config: DirectDetectConfig = DirectDetectConfig(), ccd: str = "",
                  positions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> CandidateTable:
    """Find candidates without a difference image.

    Parameters
    ----------
    search, template : pipeline.io.Exposure
        The pair on their own pixel grids (the template is NOT resampled).
        Both need a PSF FWHM (pixels), zero point and WCS.
    config : DirectDetectConfig
    ccd : str
        CCD identifier for the ``ccd`` column.
    positions : (x, y, score) arrays, optional
        ``selection="dense"`` only, and then required: the candidates' search-image pixel positions and
        their map scores (:func:`pipeline.detect.map_peaks`); they replace the search image's peaks.

    Returns
    -------
    CandidateTable
        Columns as for the dia mode; ``flux`` and ``flux_err`` are the forced measurement of
        the change (search minus zero-point-scaled template PSF flux at the same sky position,
        search ADU; see :class:`DirectDetectConfig`), ``snr`` the search-image peak S/N, plus
        ``search_flux``, ``template_flux`` and ``delta_snr`` (``flux / flux_err``).  Rows are
        ordered by search S/N (``selection="cnn"``), by ``delta_snr`` (``"flux"``) or by map score
        (``"dense"``).

    Raises
    ------
    ValueError
        No valid FWHM; ``positions`` missing with ``selection="dense"`` or given with another selection.
    """
    fs, ft = float(search.fwhm), float(template.fwhm)
    for label, value in (("search", fs), ("template", ft)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"detect_direct: {label} exposure has no valid PSF FWHM ({value})")
    if (positions is None) == (config.selection == "dense"):
        raise ValueError("detect_direct: selection 'dense' takes its candidates from the dense score map "
                         "(positions=(x, y, score): pipeline.steps.dense_positions), and only it takes positions; "
                         f"got selection {config.selection!r} with positions {'given' if positions else 'missing'}")
    method = config.method
    img_s = _sky_subtracted(search, config.background_cell)
    maps_s = matched_filter(img_s, search.variance, search.mask, gaussian_psf(fs), method=method)
    if method == "reference":  # the previous code built the flux and error maps of both images
        filt_s = maps_s.result()
    corr_s = _correction(img_s, search, fs, method)
    if config.selection == "dense":
        x, y, map_score = (np.asarray(v, float).ravel() for v in positions)
        if not x.size == y.size == map_score.size:
            raise ValueError(f"detect_direct: positions have {x.size} x, {y.size} y and {map_score.size} scores")
    else:
        sep = max(1, int(round(config.min_separation_fwhm * fs)))
        x, y, peak = find_peaks(maps_s.snr, config.threshold, config.n_pixels, None, min_separation=sep,
                                method=method)
        if config.shoulder_sigma > 0:
            sx, sy, s_peak = shoulder_peaks(maps_s.snr, fs, config.shoulder_sigma, config.threshold, x, y, sep)
            x, y, peak = np.concatenate([x, sx]), np.concatenate([y, sy]), np.concatenate([peak, s_peak])
    if x.size == 0:
        return CandidateTable.empty()
    ix = np.clip(np.rint(x).astype(int), 0, search.shape[1] - 1)
    iy = np.clip(np.rint(y).astype(int), 0, search.shape[0] - 1)
    if config.selection == "dense":
        peak = maps_s.snr[iy, ix]  # the search image's S/N where the map found the candidate
    if method == "reference":
        f_s, e_s = filt_s.flux[iy, ix], filt_s.flux_err[iy, ix]
    else:
        f_s, e_s = maps_s.at(iy, ix)
    f_s, e_s = f_s * corr_s, e_s * corr_s
    del maps_s
    img_t = _sky_subtracted(template, config.background_cell)
    corr_t = _correction(img_t, template, ft, method)
    tx, ty = template_pixels(search.wcs, template.wcs, x, y)
    tny, tnx = template.shape
    in_t = (tx >= 1) & (tx <= tnx - 2) & (ty >= 1) & (ty <= tny - 2)
    coords = np.array([np.where(in_t, ty, 0), np.where(in_t, tx, 0)])
    zp_scale = 10.0 ** (0.4 * (search.zero_point - template.zero_point))
    if method == "reference":
        filt_t = matched_filter(img_t, template.variance, template.mask, gaussian_psf(ft), method=method).result()
        f_t = ndimage.map_coordinates(filt_t.flux, coords, order=1)
        e_t = ndimage.map_coordinates(filt_t.flux_err, coords, order=1)
    else:  # only at the candidates: the template's flux maps are read nowhere else
        f_t, e_t = filter_at(img_t, template.variance, template.mask, gaussian_psf(ft), *coords)
    f_t = f_t * corr_t * zp_scale
    e_t = e_t * corr_t * zp_scale
    f_t = np.where(in_t, f_t, 0.0)
    e_t = np.where(in_t & np.isfinite(e_t), e_t, 0.0)
    delta = f_s - f_t
    err = np.sqrt(e_s**2 + e_t**2 + (config.systematic * np.maximum(np.abs(f_s), np.abs(f_t))) ** 2)
    delta_snr = delta / err
    if config.selection == "flux":
        keep = delta_snr >= config.brightening_sigma
        if config.aperture_sigma > 0 and keep.any():  # (an aperture that cannot be measured, S/N NaN, rejects nothing)
            keep[keep] = ~(_aperture_change_snr(img_s, search, img_t, template, x[keep], y[keep], tx[keep], ty[keep],
                                                zp_scale, config.aperture_fwhm) < config.aperture_sigma)
        rank = delta_snr
    elif config.selection == "dense":  # every peak of the map: the CNN found them
        keep = np.ones(x.size, bool)
        rank = map_score
    else:  # every search peak: the CNN is the detector
        keep = np.ones(x.size, bool)
        rank = peak
    del img_s, img_t
    if keep.sum() > config.max_candidates:
        keep &= rank >= np.sort(rank[keep])[-config.max_candidates]
    rank = rank[keep]
    x, y, peak, delta, err, delta_snr = x[keep], y[keep], peak[keep], delta[keep], err[keep], delta_snr[keep]
    f_s, f_t, in_t, ix, iy = f_s[keep], f_t[keep], in_t[keep], ix[keep], iy[keep]
    flags = np.zeros(x.size, np.int32)
    if x.size:
        t_bad = _bad_near(template.mask, coords[:, keep], method)
        s_bad = (search.mask[iy, ix] & int(BAD_FOR_FIT & ~MaskBits.SAT & ~MaskBits.EDGE)) != 0
        flags[s_bad | t_bad] |= CandidateFlags.MASKED
        sat_radius = int(np.ceil(1.5 * fs))
        flags[near_mask_at(search.mask, int(MaskBits.SAT), sat_radius, iy, ix, method)] |= CandidateFlags.SATURATED
        flags[~edge_distance_ok_at(search.mask, config.edge, iy, ix, method) | ~in_t] |= CandidateFlags.EDGE
        ra, dec = search.wcs.pixel_to_world_values(x, y)
    else:
        ra = dec = np.zeros(0)
    order = np.argsort(-rank, kind="stable")
    return CandidateTable.from_columns(
        ccd=np.full(x.size, str(ccd), dtype=CANDIDATE_COLUMNS["ccd"][0])[order], id=np.arange(x.size),
        x=x[order], y=y[order], ra=np.asarray(ra)[order], dec=np.asarray(dec)[order],
        flux=delta[order], flux_err=err[order], snr=peak[order], flags=flags[order],
        search_flux=f_s[order], template_flux=f_t[order], delta_snr=delta_snr[order],
    )


def _aperture_change_snr(img_s, search, img_t, template, x, y, tx, ty, zp_scale: float,
                         radius_fwhm: float) -> np.ndarray:
    """S/N of the change of aperture flux at search pixels ``(x, y)`` (template pixels ``(tx, ty)``, the same sky
    positions): search minus zero-point-scaled template, each summed on its own sky-subtracted image in a circle of
    ``radius_fwhm`` times the larger FWHM (in search pixels; the template's circle scaled to its pixels by
    :func:`pipeline.align.pixel_scale_ratio`)."""
    scale = pixel_scale_ratio(search, template)
    radius = radius_fwhm * max(float(search.fwhm), float(template.fwhm) / scale)
    f_s, e_s, _ = aperture_fluxes(img_s, search.variance, search.mask, x, y, radius)
    f_t, e_t, _ = aperture_fluxes(img_t, template.variance, template.mask, tx, ty, radius * scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (f_s - zp_scale * f_t) / np.hypot(e_s, zp_scale * e_t)


def _bad_near(mask: np.ndarray, coords: np.ndarray, method: str) -> np.ndarray:
    """Whether a flagged (``BAD_FOR_FIT``) pixel has weight in the bilinear interpolation at ``coords``
    (rows ``y, x``) -- what the flux read there through :func:`scipy.ndimage.map_coordinates` saw."""
    if method == "reference":
        flagged = ((mask & int(BAD_FOR_FIT)) != 0).astype(np.float32)
        return ndimage.map_coordinates(flagged, coords, order=1) > 0
    ny, nx = mask.shape
    y, x = coords
    y0 = np.clip(np.floor(y).astype(np.intp), 0, max(ny - 2, 0))
    x0 = np.clip(np.floor(x).astype(np.intp), 0, max(nx - 2, 0))
    wy, wx = y - y0, x - x0
    bad = np.zeros(y.size, bool)
    for dy, dx, w in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        hit = (mask[np.minimum(y0 + dy, ny - 1), np.minimum(x0 + dx, nx - 1)] & int(BAD_FOR_FIT)) != 0
        bad |= hit & (w > 0)
    return bad
