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


def test_every_subcommand_is_installed():
    """`pipeline --help` lists every subcommand (a packaging slip would drop modules silently)."""
    from pipeline.cli import COMMANDS, build_parser

    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text
