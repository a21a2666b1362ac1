"""Candidate detection on a difference image (dia mode).

:class:`DetectConfig` and :func:`detect_difference`: the PSF matched filter of the difference
(:func:`pipeline.detect.filter.psf_filter`), its S/N map renormalised to the measured scatter
(PSF matching correlates the noise), thresholded (default 5) and segmented; each segment's S/N
peak (or each separated local maximum), refined to sub-pixel precision, is one candidate.  The
same statistic on ``-D`` finds negative footprints: a positive candidate with one nearby is
flagged ``DIPOLE`` (the signature of misregistration or PSF mismatch), the negative ones
themselves are not reported.  Mask flags, sky positions and PSF fluxes (through a
:class:`~pipeline.detect.psf.PsfModel` when given) complete the table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from astropy.wcs import WCS

from dia.masks import BAD_FOR_FIT, MaskBits
from dia.stats import robust_std
from pipeline.detect.filter import check_method, find_peaks, gaussian_psf, matched_filter
from pipeline.detect.flags import edge_distance_ok_at, near_mask_at
from pipeline.detect.photometry import forced_psf_photometry
from pipeline.detect.psf import PsfModel
from pipeline.detect.schema import CANDIDATE_COLUMNS, CandidateFlags, CandidateTable

__all__ = ["DetectConfig", "detect_difference"]


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
    method : str
        Implementation: ``"fast"`` (default: cache-blocked matched filter, segmentation and
        local maxima at the pixels above threshold, flags read around the candidates only) or
        ``"reference"`` (the previous full-frame code, kept to compare against); the same
        candidates to float32 rounding of the S/N.
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
    method: str = "fast"

    def __post_init__(self) -> None:
        check_method(self.method, "DetectConfig.method")
        for name in ("threshold", "negative_threshold", "dipole_radius", "psf_radius"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DetectConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_pixels < 1 or self.max_candidates < 1 or self.edge < 0:
            raise ValueError("DetectConfig.n_pixels and max_candidates must be >= 1 and edge >= 0")



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
    method = config.method
    psf = gaussian_psf(fwhm, config.psf_radius)
    if method == "reference":  # the previous code also built the flux and error maps
        filt = matched_filter(image, variance, mask, psf, method=method).result()
        snr = filt.snr
    else:
        snr = matched_filter(image, variance, mask, psf, method=method).snr
    noise_scale = 1.0
    if config.renormalize:
        # A convolved image has correlated noise: the per-pixel variance is right, but the
        # matched-filter statistic is noisier than it predicts.  Measure its actual scatter
        # (robustly: sources are a small fraction of the pixels) and rescale.
        sample = snr[::3, ::3]
        sample = sample[(sample != 0) & np.isfinite(sample)]
        if sample.size > 1000:
            noise_scale = robust_std(sample)
            if abs(noise_scale - 1.0) > 0.02:
                if method == "reference":
                    snr = snr / noise_scale
                else:
                    snr /= np.float32(noise_scale)
            else:
                noise_scale = 1.0
    sep = int(round(config.min_separation_fwhm * fwhm))
    x, y, peak = find_peaks(snr, config.threshold, config.n_pixels, config.max_candidates, min_separation=sep,
                            method=method)
    nx_, ny_, _ = find_peaks(snr, config.negative_threshold, config.n_pixels, method=method, negative=True)
    ix = np.clip(np.rint(x).astype(int), 0, image.shape[1] - 1)
    iy = np.clip(np.rint(y).astype(int), 0, image.shape[0] - 1)
    flags = np.zeros(x.size, dtype=np.int32)
    if nx_.size and x.size:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([nx_, ny_]))
        dist, _ = tree.query(np.column_stack([x, y]), k=1)
        flags[dist <= config.dipole_radius * fwhm] |= CandidateFlags.DIPOLE
    if x.size:
        masked = int(BAD_FOR_FIT & ~MaskBits.SAT & ~MaskBits.EDGE)
        flags[near_mask_at(mask, masked, 1, iy, ix, method)] |= CandidateFlags.MASKED
        sat_radius = int(np.ceil(config.psf_radius * fwhm))
        flags[near_mask_at(mask, int(MaskBits.SAT), sat_radius, iy, ix, method)] |= CandidateFlags.SATURATED
        flags[near_mask_at(mask, int(MaskBits.CONVOLVED), 0, iy, ix, method)] |= CandidateFlags.CONVOLVED
        flags[~edge_distance_ok_at(mask, config.edge, iy, ix, method)] |= CandidateFlags.EDGE
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
