"""Candidate detection, one module per concern.

- :mod:`~pipeline.detect.schema`: flag bits, catalog columns, :class:`CandidateTable`;
- :mod:`~pipeline.detect.filter`: the PSF matched filter and peak finding;
- :mod:`~pipeline.detect.photometry`: forced Gaussian-PSF and aperture photometry;
- :mod:`~pipeline.detect.psf`: bright isolated stars and the PSF model (FWHM field, aperture correction);
- :mod:`~pipeline.detect.background`: the smooth sky background;
- :mod:`~pipeline.detect.flags`: the mask tests behind the candidate flags;
- :mod:`~pipeline.detect.difference`: detection on a difference image (:class:`DetectConfig`);
- :mod:`~pipeline.detect.direct`: detection without one (:class:`DirectDetectConfig`).

Every public name is re-exported here, so ``from pipeline.detect import X`` works for all of them.
Each replaced algorithm keeps its previous implementation behind ``method="reference"`` (the
``method`` field of :class:`DetectConfig` and :class:`DirectDetectConfig`, a keyword of the
functions), ``"fast"`` being the default: see :data:`METHODS`.
"""

from pipeline.detect.background import estimate_background
from pipeline.detect.difference import DetectConfig, detect_difference
from pipeline.detect.direct import MAP_PRECISIONS, SELECTIONS, DirectDetectConfig, detect_direct
from pipeline.detect.filter import (
    METHODS,
    FilterMaps,
    PsfFilterResult,
    filter_at,
    find_peaks,
    gaussian_psf,
    label_pixels,
    label_segments,
    map_peaks,
    matched_filter,
    psf_filter,
    shoulder_peaks,
)
from pipeline.detect.flags import edge_distance_ok_at, near_mask_at
from pipeline.detect.photometry import annulus_median, aperture_fluxes, forced_psf_photometry
from pipeline.detect.psf import PsfModel, bright_isolated_stars, fit_psf_model
from pipeline.detect.schema import (
    CANDIDATE_COLUMNS,
    FLAG_DESCRIPTIONS,
    CandidateFlags,
    CandidateTable,
    describe_columns,
    flag_bits,
    schema_order,
)

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
    "shoulder_peaks",
    "map_peaks",
    "detect_difference",
    "forced_psf_photometry",
    "PsfModel",
    "fit_psf_model",
    "bright_isolated_stars",
    "aperture_fluxes",
    "estimate_background",
    "DirectDetectConfig",
    "detect_direct",
    "SELECTIONS",
    "MAP_PRECISIONS",
    "METHODS",
    "FilterMaps",
    "matched_filter",
    "filter_at",
    "label_pixels",
    "label_segments",
    "annulus_median",
    "near_mask_at",
    "edge_distance_ok_at",
]
