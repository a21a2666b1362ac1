"""The science of one CCD pair, one function per pipeline stage.

``pipeline/graph.py`` strings these into Dask tasks; the dataset builder and
the benchmark call them too, so candidates, stamps and scores are made the
same way everywhere.  Every function takes the previous stage's result and a
:class:`~pipeline.config.RunConfig` and returns a small object.

Stamps of both modes are calibrated the same way: the search and template
channels have their local sky (the median of the stamp's outer ring)
removed and the template is put on the search image's photometric scale
with the two zero points -- header arithmetic, not PSF matching.  The
channel order is (template, search[, difference]).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from astropy.table import Table

from pipeline.align import AlignedPair, align_pair, resample_cutouts
from pipeline.config import RunConfig
from pipeline.detect import (
    CandidateTable,
    detect_difference,
    detect_direct,
    estimate_background,
    fit_psf_model,
)
from pipeline.io import Exposure, PairEntry
from pipeline.stamps import STAMP_SIZE, Stamps, cut_stamps, ring_background
from pipeline.truth import match_truth

__all__ = [
    "LoadedPair",
    "load_pair",
    "ensure_fwhm",
    "align",
    "psf_match_subtract",
    "detect_on_difference",
    "cut_triplets",
    "detect_without_difference",
    "cut_pairs",
    "get_scorer",
    "score_stamps",
    "finalize_candidates",
]


@dataclasses.dataclass
class LoadedPair:
    """The exposures (and truth, when known) of one CCD pair."""

    ccd: str
    search: Exposure
    template: Exposure
    truth: Table | None = None


def ensure_fwhm(exposure: Exposure) -> Exposure:
    """Return the exposure with a PSF FWHM, measured from its stars when the header has none."""
    if np.isfinite(exposure.fwhm) and exposure.fwhm > 0:
        return exposure
    from dia import estimate_fwhm

    fwhm = float(estimate_fwhm(exposure.image, exposure.mask, saturation=exposure.saturation))
    return dataclasses.replace(exposure, fwhm=fwhm)


def load_pair(entry: PairEntry) -> LoadedPair:
    """Read a manifest entry: both exposures (FWHM measured if absent) and the truth table."""
    search, template = entry.load()
    truth = Table.read(entry.truth, format="ascii.ecsv") if entry.truth is not None else None
    return LoadedPair(entry.ccd, ensure_fwhm(search), ensure_fwhm(template), truth)


def align(pair: LoadedPair, config: RunConfig) -> AlignedPair:
    """Resample the template onto the search grid (dia mode only)."""
    return align_pair(pair.search, pair.template, config.align)


def psf_match_subtract(aligned: AlignedPair, config: RunConfig):
    """Alard-Lupton PSF matching and subtraction; returns a :class:`dia.Difference` on the host."""
    from dia import subtract

    from dia.subtract import choose_convolved

    s, t = aligned.search, aligned.template
    t_var = t.variance
    if choose_convolved(s.fwhm, t.fwhm, config.psf_match.convolve) == "search":
        # the resampled template enters the difference pixel by pixel: its per-pixel variance
        # is reduced by the interpolation (see AlignedPair.variance_factor)
        t_var = t.variance * np.float32(aligned.variance_factor)
    diff = subtract(
        s.image, s.variance, s.mask, t.image, t_var, t.mask,
        search_fwhm=s.fwhm, template_fwhm=t.fwhm, config=config.psf_match, device=config.device,
    )
    return diff.to_numpy()


def _difference_fwhm(aligned: AlignedPair, diff) -> float:
    """PSF FWHM of the difference: the PSF of the image that was not convolved."""
    return aligned.search.fwhm if diff.convolved == "template" else aligned.template.fwhm


def detect_on_difference(diff, aligned: AlignedPair, config: RunConfig, ccd: str = "") -> CandidateTable:
    """Matched-filter detection on the difference (fluxes aperture-corrected on the unconvolved image)."""
    fwhm = _difference_fwhm(aligned, diff)
    model = None
    if config.aperture_correction:
        ref = aligned.search if diff.convolved == "template" else aligned.template
        img = ref.image - estimate_background(ref.image, ref.mask)
        model = fit_psf_model(img, ref.variance, ref.mask, fwhm)
    return detect_difference(diff.image, diff.variance, diff.mask, fwhm, aligned.search.wcs,
                             config.detect, ccd=ccd, psf_model=model)


def _calibrate(data: np.ndarray, template_scale: float) -> np.ndarray:
    """Remove the ring sky of the template (0) and search (1) channels; scale the template."""
    data = data.copy()
    data[:, :2] -= ring_background(data[:, :2])[..., None, None]
    data[:, 0] *= template_scale
    return data


def _zp_scale(search: Exposure, template: Exposure) -> float:
    return float(10.0 ** (0.4 * (search.zero_point - template.zero_point)))


def cut_triplets(candidates: Table, aligned: AlignedPair, diff, size: int = STAMP_SIZE) -> Stamps:
    """(template, search, difference) stamps on the search grid, calibrated."""
    s, t = aligned.search, aligned.template
    stamps = cut_stamps(
        {"template": t.image, "search": s.image, "difference": diff.image},
        {"template": t.mask, "search": s.mask, "difference": diff.mask},
        np.asarray(candidates["x"]), np.asarray(candidates["y"]), size=size,
    )
    stamps.data = _calibrate(stamps.data, _zp_scale(s, t))
    return stamps


def detect_without_difference(pair: LoadedPair, config: RunConfig) -> CandidateTable:
    """Direct-mode detection: search peaks that brightened against forced template photometry."""
    return detect_direct(pair.search, pair.template, config.direct, ccd=pair.ccd)


def cut_pairs(candidates: Table, pair: LoadedPair, config: RunConfig, size: int = STAMP_SIZE) -> Stamps:
    """(template, search) stamps: search cut out, template resampled at the same pixels only."""
    s, t = pair.search, pair.template
    x, y = np.asarray(candidates["x"]), np.asarray(candidates["y"])
    search = cut_stamps({"search": s.image}, {"search": s.mask}, x, y, size=size)
    t_img, t_mask = resample_cutouts(t, s.wcs, x, y, size=size, config=config.align)
    data = np.concatenate([t_img[:, None], search.data], axis=1)
    mask = np.concatenate([t_mask[:, None], search.mask], axis=1)
    stamps = Stamps(data=data, mask=mask, channels=("template", "search"), x=search.x, y=search.y)
    stamps.data = _calibrate(stamps.data, _zp_scale(s, t))
    return stamps


@functools.lru_cache(maxsize=4)
def get_scorer(model: str, device: str, threads: int, batch_size: int):
    """The CNN scorer, loaded once per worker process (cached by model, device, threads, batch)."""
    from classifier.infer import Scorer

    return Scorer(model, device="cuda" if device == "gpu" else "cpu", batch_size=batch_size, threads=threads)


def score_stamps(stamps: Stamps, config: RunConfig) -> np.ndarray:
    """P(real) of every stamp with this mode's model."""
    if len(stamps) == 0:
        return np.zeros(0, np.float32)
    scorer = get_scorer(config.model, config.device, config.torch_threads, config.batch_size)
    return np.asarray(scorer.score(stamps.data, channels=stamps.channels), np.float32)


def finalize_candidates(candidates: Table, scores: np.ndarray, config: RunConfig,
                        truth: Table | None) -> Table:
    """Attach score, mode and model (and truth matches when truth is known)."""
    out = candidates.copy()
    out["score"] = np.asarray(scores, np.float32)
    out["mode"] = np.full(len(out), config.mode, dtype="U8")
    out["model"] = np.full(len(out), config.model, dtype="U32")
    if truth is not None:
        out = match_truth(out, truth, config.match)
    return out
