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
import logging

import numpy as np
from astropy.table import Table

from dia import PsfMatchConfig
from pipeline.align import (
    AlignedPair,
    RegistrationCheck,
    align_pair,
    check_registration,
    refine_registration,
    resample_cutouts,
    template_coverage,
    template_has_data,
    template_pixels,
)
from pipeline.config import RunConfig
from pipeline.detect import (
    CANDIDATE_COLUMNS,
    CandidateTable,
    describe_columns,
    detect_difference,
    detect_direct,
    estimate_background,
    fit_psf_model,
    map_peaks,
    schema_order,
)
from pipeline.io import Exposure, InputError, PairEntry
from pipeline.stamps import STAMP_SIZE, Stamps, cut_stamps, ring_background
from pipeline.truth import match_truth, read_truth

__all__ = [
    "LoadedPair",
    "load_pair",
    "mask_cosmics",
    "dense_map",
    "dense_planes",
    "dense_positions",
    "ensure_fwhm",
    "align",
    "difference_image",
    "psf_match_subtract",
    "DirectPairCheck",
    "check_direct_pair",
    "drop_without_template",
    "detect_on_difference",
    "cut_triplets",
    "detect_without_difference",
    "cut_pairs",
    "sky_levels",
    "model_reads_sky",
    "get_scorer",
    "score_stamps",
    "magnitudes",
    "finalize_candidates",
]

logger = logging.getLogger(__name__)


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
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise InputError(f"{exposure.name}: no FWHM keyword and the PSF size could not be measured from the "
                         f"image (got {fwhm}); give it a FWHM header keyword in pixels")
    provenance = dict(exposure.provenance, fwhm=f"measured from the stars ({fwhm:.3f} px)")
    return dataclasses.replace(exposure, fwhm=fwhm, provenance=provenance)


def load_pair(entry: PairEntry, truth: bool = True) -> LoadedPair:
    """Read a manifest entry: both exposures (FWHM measured if absent) and, with ``truth``, the truth table."""
    search, template = entry.load()
    truth = read_truth(entry.truth) if truth and entry.truth is not None else None
    return LoadedPair(entry.ccd, ensure_fwhm(search), ensure_fwhm(template), truth)


def mask_cosmics(pair: LoadedPair, config: RunConfig) -> tuple[LoadedPair, dict]:
    """Flag cosmic rays ``MaskBits.CR`` in the search (and a single-exposure template) before alignment,
    subtraction and detection (:func:`pipeline.cosmics.mask_pair_cosmics` with ``config.cosmics``; both modes).

    Returns the pair with the cleaned exposures and the stage's record (counts and seconds per image, or why
    an image was skipped) for the CCD's decisions.
    """
    from pipeline.cosmics import mask_pair_cosmics

    search, template, record = mask_pair_cosmics(pair.search, pair.template, config.cosmics)
    return dataclasses.replace(pair, search=search, template=template), record


def align(pair: LoadedPair, config: RunConfig) -> AlignedPair:
    """Resample the template onto the search grid and check its registration (dia mode; the direct
    mode's :func:`cut_pairs` when its stamps cover much of the frame)."""
    return align_pair(pair.search, pair.template, config.align)


def difference_image(aligned: AlignedPair, config: PsfMatchConfig, device: str = "cpu"):
    """PSF-match and subtract an aligned pair: the one code path of ``pipeline run`` and ``pipeline subtract``.

    The rules that decide the result live here only: which image is convolved
    (:func:`dia.subtract.choose_convolved` on FWHMs in search pixels) and, when the search is
    the convolved one, the resampled template's per-pixel variance reduced by the
    interpolation (:attr:`AlignedPair.variance_factor`), because it then enters the difference
    pixel by pixel.  Returns a :class:`dia.Difference` with NumPy planes.
    """
    from dia import StarSelectionError, subtract
    from dia.subtract import choose_convolved

    s, t = aligned.search, aligned.template
    t_var = t.variance
    if choose_convolved(s.fwhm, t.fwhm, config.convolve) == "search":
        t_var = t.variance * np.float32(aligned.variance_factor)
    try:
        diff = subtract(
            s.image, s.variance, s.mask, t.image, t_var, t.mask,
            search_fwhm=s.fwhm, template_fwhm=t.fwhm, config=config, device=device,
        )
    except StarSelectionError as exc:
        raise StarSelectionError(f"{s.name} - {t.name}: {exc}", exc.found, exc.usable, exc.rejected) from None
    except ValueError as exc:  # dia is array code: name the files here
        raise ValueError(f"{s.name} - {t.name}: {exc}") from None
    return diff.to_numpy()


def psf_match_subtract(aligned: AlignedPair, config: RunConfig):
    """Alard-Lupton PSF matching and subtraction with the run's settings (:func:`difference_image`)."""
    return difference_image(aligned, config.psf_match, config.device)


@dataclasses.dataclass(frozen=True)
class DirectPairCheck:
    """What the direct mode knows about a pair before detecting: template coverage and registration."""

    coverage: float
    registration: RegistrationCheck | None
    template: Exposure | None = None
    """The template, its WCS corrected by the measured shift when :func:`refine_registration` applied one."""


def check_direct_pair(pair: LoadedPair, config: RunConfig) -> DirectPairCheck:
    """The checks dia gets from alignment, for the direct mode (which never resamples the full frame).

    Raises
    ------
    InputError
        The template covers less than ``align.min_overlap`` of the search image with data (far
        away, or mostly NaN), or its pixels do not match its WCS (:func:`check_registration`).  A shift of
        the template against its WCS that the check measures is corrected as dia's alignment corrects it
        (:func:`refine_registration`): use ``DirectPairCheck.template``.
    """
    s, t = pair.search, pair.template
    coverage = template_coverage(s, t)
    if coverage < config.align.min_overlap:
        raise InputError(
            f"no overlap: template {t.name!r} has data over {coverage:.1%} of search {s.name!r} "
            f"(need >= {config.align.min_overlap:.0%}, align.min_overlap); check the WCS of both files "
            f"and the template's NaN / zero-weight pixels"
        )
    template, registration = refine_registration(t, check_registration(s, t, config.align), config.align)
    return DirectPairCheck(coverage=coverage, registration=registration, template=template)


def drop_without_template(candidates: Table, pair: LoadedPair, radius: float | None = None) -> tuple[Table, int]:
    """Remove direct-mode candidates where the template has no data over the core of their measurement.

    Without template pixels there is nothing to compare with, so such a position cannot be a
    detection of change -- as in dia mode, where the difference has no data there (the template's
    no-data border grown by the kernel).  A candidate is kept when the template has data at its
    position and at 8 points around it at ``radius`` search pixels (default: the search image's
    FWHM), the core of the forced measurement and of the template stamp the CNN reads: at the
    edge of a template's data (a border shifted by a registration correction, a chip gap) the
    template's share of a source would otherwise be missing and read as a brightening.  Returns
    the kept candidates and how many were dropped.
    """
    if len(candidates) == 0:
        return candidates, 0
    x, y = np.asarray(candidates["x"], float), np.asarray(candidates["y"], float)
    fwhm = float(pair.search.fwhm)
    r = float(radius) if radius is not None else (fwhm if np.isfinite(fwhm) and fwhm > 0 else 3.0)
    angles = np.arange(8) * (np.pi / 4)
    px = np.concatenate([x[:, None], x[:, None] + r * np.cos(angles)[None, :]], axis=1)
    py = np.concatenate([y[:, None], y[:, None] + r * np.sin(angles)[None, :]], axis=1)
    keep = template_has_data(pair.search.wcs, pair.template, px, py).all(axis=1)
    kept = candidates[keep]
    if "id" in kept.colnames:
        kept["id"] = np.arange(len(kept))
    return kept, int((~keep).sum())


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
        model = fit_psf_model(img, ref.variance, ref.mask, fwhm, method=config.detect.method)
    return detect_difference(diff.image, diff.variance, diff.mask, fwhm, aligned.search.wcs,
                             config.detect, ccd=ccd, psf_model=model)


def _calibrate(data: np.ndarray, template_scale: float, *, inplace: bool = False,
               ring: np.ndarray | None = None) -> np.ndarray:
    """Remove the ring sky of the template (0) and search (1) channels; scale the template.

    Works on a copy unless ``inplace`` (the stamp cutters pass their own fresh cube).  ``ring``: that ring sky,
    (N, 2), when the caller has measured it already (:func:`pipeline.stamps.ring_background`).
    """
    if not inplace:
        data = data.copy()
    data[:, :2] -= (ring_background(data[:, :2]) if ring is None else ring)[..., None, None]
    data[:, 0] *= template_scale
    return data


def _zp_scale(search: Exposure, template: Exposure) -> float:
    return float(10.0 ** (0.4 * (search.zero_point - template.zero_point)))


def cut_triplets(candidates: Table, aligned: AlignedPair, diff, size: int = STAMP_SIZE, *,
                 sky: bool = False) -> Stamps:
    """(template, search, difference) stamps on the search grid, calibrated; with ``sky``, the frames' sky and
    noise at each (``Stamps.sky``, ``Stamps.noise``: what a ``sky``-scheme model reads, :func:`sky_levels`)."""
    s, t = aligned.search, aligned.template
    stamps = cut_stamps(
        {"template": t.image, "search": s.image, "difference": diff.image},
        {"template": t.mask, "search": s.mask, "difference": diff.mask},
        np.asarray(candidates["x"]), np.asarray(candidates["y"]), size=size,
    )
    return _calibrate_with_sky(stamps, s, t, sky)


def detect_without_difference(pair: LoadedPair, config: RunConfig) -> CandidateTable:
    """Direct-mode detection: search peaks (all of them, or those that brightened in forced photometry of
    both images) or the peaks of the CNN's dense score map (:func:`dense_positions`), as
    ``config.direct.selection`` says, with the forced measurement of their change."""
    positions = dense_positions(pair, config) if config.direct.selection == "dense" else None
    return detect_direct(pair.search, pair.template, config.direct, ccd=pair.ccd, positions=positions)


@functools.lru_cache(maxsize=4)
def _dense_network(model: str, device: str, threads: int, batch_size: int, instrument: str = "",
                   precision: str = "float32"):
    """The direct model's fully convolutional form and its channels, built once per worker (as the scorer)."""
    import torch

    from classifier.dense import dense_network
    from classifier.models import StampNet

    scorer = get_scorer(model, device, threads, batch_size, instrument)
    if not isinstance(scorer.net, StampNet) or scorer.spec.channels != ("template", "search"):
        raise ValueError(f"direct.selection = 'dense' needs a two-image StampNet (our 'pair' models, e.g. "
                         f"'pair-dense'); model {model!r} is {scorer.spec.name!r}")
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    return dense_network(scorer.net, dtype), scorer.spec.channels, scorer.threads


def dense_planes(pair: LoadedPair, config: RunConfig, channels: tuple[str, ...] = ("template", "search")) -> np.ndarray:
    """The frame a dense map reads: ``(C, ny, nx)`` float32 planes in ``channels`` order.

    The template is resampled onto the search pixels (:func:`align`) and put on the search's zero point; both
    images less their smooth sky, over the search's sky noise, through ``asinh``
    (:func:`classifier.dense.normalized_planes`): the ``sky`` normalisation per pixel, which a stamp cut with
    ``sky=True`` gets from :func:`sky_levels`.  No PSF matching, no difference image.
    """
    from classifier.dense import normalized_planes

    aligned = align(pair, config)
    s = pair.search
    # the template on the search's zero point, in place (the resampled image is the aligned pair's own; the whole
    # frame: _calibrate is the stamps' ring-sky calibration); its variance and mask are let go at once
    template = aligned.template.image
    template *= np.float32(_zp_scale(s, pair.template))
    template_sky = estimate_background(template, aligned.template.mask)
    del aligned
    frame = np.empty((len(channels),) + s.shape, np.float32)
    normalized_planes(s.image, template, estimate_background(s.image, s.mask), template_sky, _sky_noise(s),
                      out={name: frame[k] for k, name in enumerate(channels)})  # written into the frame
    return frame


def dense_map(pair: LoadedPair, config: RunConfig) -> np.ndarray:
    """The direct model's score map over the pair (:func:`classifier.dense.dense_logit_map`): the logit of
    "real" of a window centred on every :data:`classifier.dense.GRID`-th pixel of the search image, over the planes
    of :func:`dense_planes`.
    """
    from classifier.dense import dense_logit_map
    from classifier.infer import torch_threads

    net, channels, threads = _dense_network(config.model, config.device, config.torch_threads, config.batch_size,
                                            config.instrument, config.direct.map_precision)
    frame = dense_planes(pair, config, channels)
    with torch_threads(threads):
        return dense_logit_map(net, frame)


def _sky_noise(search: Exposure, at: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The search image's sky noise per pixel (or at the pixels ``at = (ix, iy)`` only): the smooth level of its
    variance plane, square-rooted."""
    return np.sqrt(np.maximum(estimate_background(search.variance, search.mask, at=at), np.float32(1e-12)))


def sky_levels(search: Exposure, template: Exposure, x, y) -> tuple[np.ndarray, np.ndarray]:
    """The ``sky`` normalisation's reference (:func:`classifier.normalize.sky_units`) at search pixels ``x, y``.

    Each image's smooth sky (:func:`pipeline.detect.estimate_background` over the whole frame; the template's on
    its own pixels, read at the position the WCSs map ``x, y`` to and put on the search's zero point) and the
    search's sky noise (:func:`_sky_noise`): what :func:`dense_map` normalises every pixel by, here for stamps.
    ``template`` may be the raw template or one already resampled onto the search grid.

    Returns
    -------
    sky : ndarray (N, 2) float32
        (template, search).
    noise : ndarray (N,) float32
    """
    x, y = np.asarray(x, float), np.asarray(y, float)

    def pixels(shape, px, py):  # the nearest pixel of an image of this shape, inside it
        ny, nx = shape
        return np.clip(np.rint(px).astype(np.intp), 0, nx - 1), np.clip(np.rint(py).astype(np.intp), 0, ny - 1)

    on_search = pixels(search.shape, x, y)
    on_template = pixels(template.shape, *template_pixels(search.wcs, template.wcs, x, y))
    sky = np.stack([estimate_background(template.image, template.mask, at=on_template) * _zp_scale(search, template),
                    estimate_background(search.image, search.mask, at=on_search)], axis=1).astype(np.float32)
    return sky, _sky_noise(search, at=on_search).astype(np.float32)


def model_reads_sky(config: RunConfig) -> bool:
    """Whether the run's model normalises stamps by the frames' sky (scheme ``sky``, e.g. ``pair-sky``)."""
    scorer = get_scorer(config.model, config.device, config.torch_threads, config.batch_size, config.instrument)
    return scorer.spec.scheme == "sky"


def _calibrate_with_sky(stamps: Stamps, search: Exposure, template: Exposure, sky: bool) -> Stamps:
    """:func:`_calibrate` the stamps' template and search channels (in place) and, with ``sky``, record the frames'
    sky and noise at their centres as what remains of the sky on the calibrated stamps (the frame's sky less the
    ring sky :func:`_calibrate` removes), so that ``(data - sky) / noise`` is each image less its frame sky."""
    scale = _zp_scale(search, template)
    ring = None
    if sky:
        frame_sky, noise = sky_levels(search, template, stamps.x, stamps.y)
        ring = ring_background(stamps.data[:, :2])  # measured once: recorded here, removed by _calibrate
        remaining = np.zeros((len(stamps), len(stamps.channels)), np.float32)  # a difference channel: 0
        remaining[:, 0] = frame_sky[:, 0] - ring[:, 0] * np.float32(scale)
        remaining[:, 1] = frame_sky[:, 1] - ring[:, 1]
        stamps.sky, stamps.noise = remaining, noise
    stamps.data = _calibrate(stamps.data, scale, inplace=True, ring=ring)
    return stamps


def dense_positions(pair: LoadedPair, config: RunConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of ``selection = "dense"``: the peaks >= ``config.direct.map_threshold`` of :func:`dense_map`,
    refined below its grid (:func:`pipeline.detect.map_peaks`).  Returns search-image ``x``, ``y`` and the map
    scores."""
    from classifier.dense import GRID

    return map_peaks(dense_map(pair, config), config.direct.map_threshold, GRID)


#: :func:`cut_pairs` resamples the whole template once (:func:`pipeline.align.align_pair`, two separable
#: passes) rather than each stamp from its own box of template pixels (:func:`pipeline.align.resample_cutouts`,
#: ~0.7 ms per 51 x 51 stamp) when the stamps hold more than this fraction of the search image's pixels: the two
#: give the same stamps to interpolation rounding (measured: rms 0.09 ADU on 2498 DECam stamps), the full frame
#: is cheaper past ~25% (one DECam CCD: ~0.5 s for the frame, ~0.33 s for 450 stamps).
FULL_FRAME_STAMP_FRACTION = 0.25


def cut_pairs(candidates: Table, pair: LoadedPair, config: RunConfig, size: int = STAMP_SIZE, *,
              sky: bool | None = None) -> Stamps:
    """(template, search) stamps: search cut out, template resampled onto the same pixels.

    The template is resampled at the stamps' pixels only, or over the whole frame when the
    stamps cover more than :data:`FULL_FRAME_STAMP_FRACTION` of it (direct mode's every-peak
    candidates): the same stamps either way, whichever is cheaper.  With ``sky`` (default: when the run's
    model reads sky units, :func:`model_reads_sky`) the frames' sky and noise at each stamp are recorded.
    """
    s, t = pair.search, pair.template
    if sky is None:
        sky = model_reads_sky(config)
    x, y = np.asarray(candidates["x"]), np.asarray(candidates["y"])
    aligned = None
    if x.size * size * size > FULL_FRAME_STAMP_FRACTION * s.image.size:
        try:
            aligned = align(pair, config)
        except InputError:  # too little overlap for a full-frame resampling: the cut-outs still work
            aligned = None
    if aligned is not None:
        stamps = cut_stamps({"template": aligned.template.image, "search": s.image},
                            {"template": aligned.template.mask, "search": s.mask}, x, y, size=size)
        return _calibrate_with_sky(stamps, s, t, sky)
    search = cut_stamps({"search": s.image}, {"search": s.mask}, x, y, size=size)
    t_img, t_mask = resample_cutouts(t, s.wcs, x, y, size=size, config=config.align)
    data = np.concatenate([t_img[:, None], search.data], axis=1)
    mask = np.concatenate([t_mask[:, None], search.mask], axis=1)
    stamps = Stamps(data=data, mask=mask, channels=("template", "search"), x=search.x, y=search.y)
    return _calibrate_with_sky(stamps, s, t, sky)


@functools.lru_cache(maxsize=4)
def get_scorer(model: str, device: str, threads: int, batch_size: int, instrument: str = ""):
    """The CNN scorer, loaded once per worker process (cached by model, device, threads, batch, instrument).

    A shipped model name is read from the weights of the ``instrument`` preset when they exist
    (:func:`classifier.infer.preset_weights`; ``pipeline.runner.check_model`` has already
    refused a preset asked for explicitly that has none).
    """
    from classifier.infer import Scorer, preset_weights

    weights, _ = preset_weights(model, instrument)
    return Scorer(weights, device=device, batch_size=batch_size, threads=threads)  # "gpu" -> CUDA in torch_device


def score_stamps(stamps: Stamps, config: RunConfig) -> np.ndarray:
    """P(real) of every stamp with this mode's model."""
    if len(stamps) == 0:
        return np.zeros(0, np.float32)
    scorer = get_scorer(config.model, config.device, config.torch_threads, config.batch_size, config.instrument)
    data = stamps.data
    if scorer.spec.scheme == "sky":
        from classifier.normalize import sky_units

        if stamps.sky is None:
            raise ValueError(f"model {config.model!r} reads stamps in sky units: cut them with sky=True "
                             f"(cut_pairs / cut_triplets record the frames' sky and noise)")
        data = sky_units(data, stamps.sky, stamps.noise)
    return np.asarray(scorer.score(data, channels=stamps.channels), np.float32)


def magnitudes(flux, flux_err, zero_point: float) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes and their 1-sigma errors of fluxes on a zero point.

    ``mag = zero_point - 2.5 log10(flux)``, ``mag_err = 2.5 / ln(10) * flux_err / flux``;
    both NaN where ``flux <= 0`` or not finite, or when ``zero_point`` is not finite.

    Parameters
    ----------
    flux, flux_err : array_like
        Fluxes and errors in the units the zero point refers to (ADU).
    zero_point : float
        ``mag = zero_point - 2.5 log10(flux)``.
    """
    flux = np.asarray(flux, dtype=np.float64)
    flux_err = np.asarray(flux_err, dtype=np.float64)
    ok = np.isfinite(flux) & (flux > 0) & bool(np.isfinite(zero_point))
    safe = np.where(ok, flux, 1.0)
    mag = np.where(ok, zero_point - 2.5 * np.log10(safe), np.nan)
    mag_err = np.where(ok, 2.5 / np.log(10.0) * flux_err / safe, np.nan)
    return mag, mag_err


def _search_columns(n: int, search: Exposure, ccd: str) -> dict[str, np.ndarray]:
    """``mjd`` and ``band`` of the search exposure for ``n`` rows; warns (once: called once per CCD)
    when the epoch is unknown."""
    mjd = float(search.mjd)
    if not np.isfinite(mjd):
        logger.warning("%s: the search exposure %s has no usable MJD-OBS or DATE-OBS: the catalog's mjd is NaN",
                       ccd or search.ccd, search.name)
    band = str(search.band or "")
    return {"mjd": np.full(n, mjd), "band": np.full(n, band, dtype=f"U{max(16, len(band))}")}


def finalize_candidates(candidates: Table, scores: np.ndarray, config: RunConfig,
                        truth: Table | None, search: Exposure | None = None) -> Table:
    """Attach score, mode, model and noise_scale; magnitudes, epoch and band when the search exposure
    is given; truth matches when truth is known.  Columns get their units and descriptions
    (:data:`pipeline.detect.CANDIDATE_COLUMNS`) and its order.

    ``noise_scale`` is the detector's per-CCD noise rescaling (the ``NOISESCL`` meta value of a
    difference detection, 1 otherwise), one value per row so that it survives merging CCDs.
    With ``search``: ``mag``/``mag_err`` on its zero point (NaN without one, see
    :attr:`pipeline.io.Exposure.has_zero_point`), ``mjd`` and ``band``, and ``meta["MAGSYS"]``.
    """
    out = candidates.copy()
    n = len(out)
    out["score"] = np.asarray(scores, np.float32)
    out["mode"] = np.full(n, config.mode, dtype="U8")
    from classifier.infer import preset_model_name

    model = preset_model_name(config.model, config.instrument)  # "triplet-ztf" when the ZTF weights scored
    out["model"] = np.full(n, model, dtype=f"U{max(32, len(model))}")  # never cut
    noise_scale = out.meta.pop("NOISESCL", 1.0)
    out["noise_scale"] = np.full(n, noise_scale, dtype=CANDIDATE_COLUMNS["noise_scale"][0])
    if search is not None:
        zero_point = float(search.zero_point) if search.has_zero_point else float("nan")
        out["mag"], out["mag_err"] = magnitudes(out["flux"], out["flux_err"], zero_point)
        for name, values in _search_columns(n, search, str(out["ccd"][0]) if n else search.ccd).items():
            out[name] = values
        out.meta["MAGSYS"] = (search.mag_system or "UNKNOWN") if search.has_zero_point else "NONE"
    if truth is not None:
        out = match_truth(out, truth, config.match)
    out = out[schema_order(out.colnames)]
    return describe_columns(out)
