"""The dense form of our stamp network (``classifier.dense``; ``benchmarks.dense_map_cost`` times it): the same
logits on a stamp, one score per 8 x 8 pixels on a frame, its peaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.dense_map_cost import HALO, dense_map
from classifier.dense import STRIDE, dense_network
from classifier.models import build_model


@pytest.mark.parametrize("name", ["pair", "triplet", "pair-sky-lite"])
def test_dense_network_gives_the_stamp_logits_on_a_stamp(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():  # BatchNorm statistics away from the identity, so that eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    stamps = torch.randn(5, model.features[0].in_channels, 51, 51)
    net = dense_network(model)
    with torch.inference_mode():
        expected = model(stamps)
        got = net(stamps)
    assert got.shape == (5, 2, 1, 1)
    torch.testing.assert_close(got[:, :, 0, 0], expected, rtol=1e-5, atol=1e-5)


def test_dense_map_tiles_cover_the_frame_at_the_stride():
    model = build_model("pair").eval()
    frame = torch.randn(1, 2, 96, 160)
    maps = dense_map(dense_network(model), frame, tile=64)
    assert len(maps) == 2 * 3  # 2 x 3 tiles of 64 px
    for m in maps:  # a tile with its halo of w pixels gives (w // 8) - 5 outputs per axis: the 51-px window slides by 8
        assert m.shape[:2] == (1, 2)
        assert all(n >= 1 for n in m.shape[2:])
    first = maps[0]  # the corner tile: 64 + HALO pixels on each axis
    assert first.shape[2] == (64 + HALO) // STRIDE - 5


def test_dense_network_refuses_other_models():
    with pytest.raises(TypeError, match="StampNet"):
        dense_network(build_model("pair-paper"))


def test_median_seconds_warms_up_once_and_waits_for_the_device_each_time():
    from benchmarks.metrics import median_seconds

    calls, syncs = [], []
    seconds = median_seconds(lambda: calls.append(1), 4, sync=lambda: syncs.append(1))
    assert len(calls) == 5 and len(syncs) == 5  # one untimed warm-up, then the 4 timed calls
    assert 0.0 <= seconds < 1.0
    calls.clear()
    median_seconds(lambda: calls.append(1), 3)  # no device: nothing to wait for
    assert len(calls) == 4


class _CentrePixel(torch.nn.Module):
    """A stand-in with the dense network's geometry (a 51-pixel window every 8 pixels, (H - 51) // 8 + 1 outputs)
    whose logit difference is the first channel at the window's centre pixel."""

    def forward(self, x):
        k, m = (x.shape[2] - 51) // 8 + 1, (x.shape[3] - 51) // 8 + 1
        centre = x[:, 0, 25::8, 25::8][:, :k, :m]
        return torch.stack([torch.zeros_like(centre), centre], dim=1)


def test_dense_logit_map_puts_each_window_at_its_centre_pixel():
    """classifier.dense.dense_logit_map: the value at (i, j) belongs to the window centred at pixel
    (4 i, 4 j), over all four phases of the 8-pixel stride and across tiles (exact, with a stand-in network of
    the same geometry)."""
    from classifier.dense import GRID, dense_logit_map

    frame = np.random.default_rng(3).normal(0, 1, (2, 70, 93)).astype(np.float32)
    got = dense_logit_map(_CentrePixel(), frame, tile=16)
    assert got.shape == (-(-70 // GRID), -(-93 // GRID))
    np.testing.assert_array_equal(got, frame[0, ::GRID, ::GRID])
    np.testing.assert_array_equal(dense_logit_map(_CentrePixel(), frame, tile=4096), got)


def test_map_peaks_and_normalized_planes():
    """Local maxima above a probability threshold on the map's grid; the shared normalisation with maps."""
    from classifier.dense import GRID, normalized_planes
    from pipeline.detect import map_peaks

    logits = np.full((10, 12), -5.0, np.float32)
    yy, xx = np.mgrid[1:4, 2:5]
    logits[1:4, 2:5] = 3.0 - (yy - 2.25) ** 2 - (xx - 3.4) ** 2  # a peak at (2, 3), the vertex at (2.25, 3.4)
    logits[7, 9] = 0.5  # p = 0.62, an isolated peak: equal neighbours, it stays on the grid
    logits[0, 0] = np.nan
    x, y, p = map_peaks(logits, 0.9, GRID, refine=False)
    assert (x.tolist(), y.tolist()) == ([3 * GRID], [2 * GRID])
    assert p[0] == pytest.approx(1 / (1 + np.exp(-logits[2, 3])))
    x, y, _ = map_peaks(logits, 0.9, GRID)  # the vertex of the parabola through the peak and its neighbours, per axis
    assert x[0] == pytest.approx(3.4 * GRID, abs=1e-4) and y[0] == pytest.approx(2.25 * GRID, abs=1e-4)
    x, y, _ = map_peaks(logits, 0.6, GRID)
    assert sorted(zip(y.tolist(), x.tolist()))[1] == (7 * GRID, 9 * GRID)
    with pytest.raises(ValueError, match="threshold"):
        map_peaks(logits, 1.0, GRID)
    sky = np.full((4, 4), 100.0, np.float32)
    planes = normalized_planes(sky + 20, sky + 10, sky, sky, np.full((4, 4), 10.0, np.float32))
    assert np.allclose(planes["search"], np.arcsinh(2.0)) and np.allclose(planes["template"], np.arcsinh(1.0))
    bad = normalized_planes(np.full((4, 4), np.nan, np.float32), sky, sky, sky, np.ones((4, 4), np.float32))
    assert np.all(bad["search"] == 0)


def test_map_peaks_gives_one_peak_per_plateau():
    """Neighbouring cells of equal value (what a network gives where all its units are off) are one peak, the
    first cell in raster order, not one per cell; separate plateaus and strict peaks stay separate."""
    from pipeline.detect import map_peaks

    logits = np.full((9, 14), -4.0, np.float32)
    logits[2:4, 3:6] = 2.0  # a 2 x 3 plateau
    logits[6, 1:4] = 2.0  # a row plateau with a diagonal step up to the next row
    logits[7, 4] = 2.0
    logits[1, 10] = 3.0  # a strict peak beside a lower shoulder
    logits[1, 11] = 2.0
    logits[6:8, 8:10] = 1.5  # a 2 x 2 plateau, not touching the others
    x, y, p = map_peaks(logits, 0.5, 1.0, refine=False)
    assert sorted(zip(y.tolist(), x.tolist())) == [(1, 10), (2, 3), (6, 1), (6, 8)]
    assert np.allclose(sorted(p), sorted(1 / (1 + np.exp(-np.array([3.0, 2.0, 2.0, 1.5])))))
    flat = np.full((5, 5), 1.0, np.float32)  # the whole map one plateau
    assert map_peaks(flat, 0.5, 1.0, refine=False)[0].tolist() == [0.0]


def test_dense_logit_map_shares_the_trunk_between_phases():
    """The trunk of classifier.dense.DenseStampNet runs once for the four phases: away from the frame's edges
    (where each phase's layers see their own zero padding) the map equals four separate passes."""
    from classifier.dense import GRID, dense_logit_map

    torch.manual_seed(2)
    model = build_model("pair").eval()
    net = dense_network(model)

    class Plain(torch.nn.Module):  # the same network, not recognised as a DenseStampNet: one pass per phase
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x):
            return self.inner(x)

    frame = np.random.default_rng(5).normal(0, 1, (2, 160, 176)).astype(np.float32)
    shared = dense_logit_map(net, frame, tile=4096)
    plain = dense_logit_map(Plain(), frame, tile=4096)
    inner = (slice(40 // GRID, (160 - 40) // GRID), slice(40 // GRID, (176 - 40) // GRID))
    np.testing.assert_allclose(shared[inner], plain[inner], rtol=1e-4, atol=1e-5)
    assert np.isfinite(shared).all()


def test_dense_map_in_bfloat16_is_the_float32_map_to_its_precision():
    """``dense_network(model, torch.bfloat16)`` (``DirectDetectConfig.map_precision``) keeps the folded weights
    and the head in bfloat16 and ``dense_logit_map`` feeds it the frame in bfloat16: the same map as in float32 to
    bfloat16's precision (8 bits of mantissa), the float32 map returned; a bad precision is refused by name."""
    from classifier.dense import dense_logit_map
    from pipeline.detect import DirectDetectConfig

    torch.manual_seed(1)
    model = build_model("pair").eval()
    with torch.no_grad():  # spread the untrained logits over a few units
        model.head[-1].weight *= 100
    rng = np.random.default_rng(2)
    frame = np.arcsinh(rng.normal(0, 1, (2, 120, 136)) + 20 * (rng.random((2, 120, 136)) > 0.995)).astype(np.float32)
    ref = dense_logit_map(dense_network(model), frame, tile=64)
    half = dense_network(model, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(c.keywords["weight"].dtype == torch.bfloat16 for c in half._convs)
    got = dense_logit_map(half, frame, tile=64)
    assert got.dtype == np.float32 and got.shape == ref.shape
    spread = np.ptp(ref)
    assert spread > 2 and np.abs(got - ref).max() <= 0.03 * spread  # measured: 1% of the spread
    assert np.abs(got - ref).max() > 0  # it did run in bfloat16
    with pytest.raises(ValueError, match="map_precision"):
        DirectDetectConfig(map_precision="float16")


def test_mining_adds_random_bogus_points_and_leaves_the_rest(tmp_path):
    """``benchmarks.dense_detector --mine --random N``: N random points per CCD, bogus, more than 5 px from every
    transient and inside the stamp margin, appended to the stamps mined without them, which stay the same."""
    import dataclasses

    from benchmarks.dense_detector import main
    from classifier.data import StampSet
    from pipeline.simulate import SimulationConfig, simulate_pair

    common = ["--ccds", "1", "--shape", "320x320", "--seed", "7", "--val-ccds", "0", "--model", "pair-dense-lite",
              "--threads", "1"]
    assert main(["--mine", str(tmp_path / "plain.npz"), *common]) == 0
    assert main(["--mine", str(tmp_path / "random.npz"), "--random", "1000", *common]) == 0
    plain, more = StampSet.load(tmp_path / "plain.npz"), StampSet.load(tmp_path / "random.npz")
    kind = np.asarray(more.meta["kind"])
    added = kind == "random"
    assert 500 <= added.sum() <= 1000 and not np.any(np.asarray(plain.meta["kind"]) == "random")
    np.testing.assert_array_equal(more.stamps[~added], plain.stamps)
    np.testing.assert_array_equal(more.labels[~added], plain.labels)
    assert np.all(more.labels[added] == 0)
    x, y = np.asarray(more.meta["x"])[added], np.asarray(more.meta["y"])[added]
    assert np.all((x >= 26) & (x < 320 - 26) & (y >= 26) & (y < 320 - 26))
    config = SimulationConfig()
    sim = simulate_pair(dataclasses.replace(config, shape=(320, 320), transient_density=config.transient_density * 12),
                        7, 0)
    tt = sim.truth[(sim.truth["kind"] == "transient") & ~sim.truth["flagged"]]
    assert len(tt) > 0
    d = np.hypot(x[:, None] - np.asarray(tt["x"])[None], y[:, None] - np.asarray(tt["y"])[None]).min(axis=1)
    assert d.min() > 5
