"""Stamps (edges, masks, alignment of channels) and truth matching rules."""

import numpy as np
import pytest
from astropy.table import Table

from dia.masks import MaskBits
from pipeline.detect import CandidateTable
from pipeline.stamps import cut_stamps, ring_background, stack_channels
from pipeline.truth import match_truth, summarize_against_truth


def test_stamps_centre_edges_and_masks():
    img = np.arange(100 * 80, dtype=np.float32).reshape(100, 80)
    mask = np.zeros(img.shape, np.int32)
    mask[50, 40] = MaskBits.BAD
    mask[10, :] = MaskBits.NO_DATA
    st = cut_stamps({"a": img, "b": 2 * img}, {"a": mask}, [40.4, 2.0], [50.0, 12.0], size=11)
    assert st.data.shape == (2, 2, 11, 11)
    assert st.data[0, 0, 5, 5] == img[50, 40] and st.data[0, 1, 5, 5] == 2 * img[50, 40]
    assert st.mask[0, 0, 5, 5] & MaskBits.BAD and st.data[0, 0, 5, 5] == img[50, 40]  # value kept
    # off the left edge: NaN + NO_DATA; the NO_DATA row of the mask: NaN in channel a only
    assert np.isnan(st.data[1, :, :, :3]).all() and (st.mask[1, :, :, :3] & MaskBits.NO_DATA).all()
    assert np.isnan(st.data[1, 0, 3, 5]) and not np.isnan(st.data[1, 1, 3, 5])
    assert list(st.complete) == [True, False]
    both = stack_channels(st, cut_stamps({"c": img}, None, [40.4, 2.0], [50.0, 12.0], size=11))
    assert both.channels == ("a", "b", "c")
    with pytest.raises(ValueError, match="odd"):
        cut_stamps({"a": img}, None, [1], [1], size=10)


def test_ring_background_ignores_centre():
    data = np.full((1, 1, 51, 51), 7.0, np.float32)
    data[0, 0, 20:31, 20:31] = 1000.0
    assert ring_background(data)[0, 0] == 7.0


def _truth():
    return Table({"id": [1, 2, 3, 4], "kind": ["transient", "transient", "star", "cosmic_ray"],
                  "x": [10.0, 50.0, 51.0, 90.0], "y": [10.0, 50.0, 50.0, 90.0], "mag": [20.0, 21.0, 18.0, np.nan]})


def test_match_truth_prefers_transients_and_credits_each_once():
    cands = CandidateTable.from_columns(x=[10.5, 11.0, 50.8, 90.0, 200.0], y=[10.0, 10.5, 50.0, 91.5, 5.0])
    m = match_truth(cands, _truth())
    assert list(m["truth_kind"]) == ["transient", "", "transient", "cosmic_ray", ""]
    assert list(m["truth_id"]) == [1, -1, 2, 4, -1]
    m["score"] = [0.9, 0.8, 0.2, 0.7, 0.1]
    s = summarize_against_truth(m, _truth(), 0.5)
    assert (s.n_transients, s.n_detected, s.n_selected, s.n_false_positives) == (2, 2, 1, 2)
    assert s.completeness == 0.5 and s.purity == pytest.approx(1 / 3)


def test_every_subcommand_is_installed(capsys):
    """Every documented subcommand is registered, its module imports and defines its arguments:
    `pipeline NAME --help` exits 0 with that command's usage (a packaging slip would drop one)."""
    from pipeline.cli import COMMANDS, build_parser

    documented = {"simulate", "subtract", "run", "dataset", "train", "evaluate", "saliency", "benchmark"}
    assert documented <= set(COMMANDS)
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: pipeline {name} ")


def _tan_wcs(crpix):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    return w


def _static_star_exposure(shape, star_xy, mag, zero_point, sky, crpix):
    """A noiseless exposure of one Gaussian star (FWHM 3 px) of magnitude ``mag`` on a flat sky."""
    from pipeline.io import Exposure

    s = 3.0 / 2.3548
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    flux = 10 ** (0.4 * (zero_point - mag))  # mag = zero_point - 2.5 log10(flux)
    image = sky + flux * np.exp(-0.5 * ((xx - star_xy[0]) ** 2 + (yy - star_xy[1]) ** 2) / s**2) / (2 * np.pi * s**2)
    return Exposure(image.astype(np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int32),
                    _tan_wcs(crpix), fwhm=3.0, zero_point=zero_point)


@pytest.mark.parametrize("stream", ["triplet", "pair"])
def test_stamps_put_the_template_on_the_search_photometric_scale(stream):
    """A static star of magnitude 20 through two zero points (search 27.0, template 25.5: the
    template's ADU are 10**(0.4 * 1.5) ~ 3.98x fewer) on different skies (300 and 80 ADU): after
    calibration both channels hold the star's search-scale flux 10**(0.4 * 7) ~ 631 ADU on zero
    sky, pixel for pixel; the difference channel is left as it was."""
    from types import SimpleNamespace

    from pipeline.align import AlignedPair
    from pipeline.config import RunConfig
    from pipeline.detect import CandidateTable
    from pipeline.steps import LoadedPair, cut_pairs, cut_triplets

    search = _static_star_exposure((101, 101), (50, 50), 20.0, 27.0, 300.0, crpix=(51, 51))
    cands = CandidateTable.from_columns(x=[50.0], y=[50.0])
    if stream == "triplet":  # dia: the template already resampled onto the search grid
        template = _static_star_exposure((101, 101), (50, 50), 20.0, 25.5, 80.0, crpix=(51, 51))
        diff = SimpleNamespace(image=np.full((101, 101), 7.0, np.float32), mask=np.zeros((101, 101), np.int32))
        stamps = cut_triplets(cands, AlignedPair(search, template, overlap=1.0, seconds=0.0), diff)
        np.testing.assert_array_equal(stamps.data[0, 2], 7.0)  # no sky removed, no scaling
    else:  # direct: the template on its own grid, shifted by (+7, -4) pixels, resampled per stamp
        template = _static_star_exposure((121, 121), (57, 46), 20.0, 25.5, 80.0, crpix=(58, 47))
        stamps = cut_pairs(cands, LoadedPair("c", search, template), RunConfig())
    assert stamps.channels[:2] == ("template", "search")
    t, s = stamps.data[0, 0].astype(float), stamps.data[0, 1].astype(float)
    expected = 10 ** (0.4 * (27.0 - 20.0))
    assert s.sum() == pytest.approx(expected, rel=1e-3)
    assert t.sum() == pytest.approx(expected, rel=1e-3)
    np.testing.assert_allclose(t, s, rtol=0, atol=1e-3 * s.max())
    assert np.median(t[:5]) == pytest.approx(0.0, abs=1e-3) and np.median(s[:5]) == pytest.approx(0.0, abs=1e-3)
