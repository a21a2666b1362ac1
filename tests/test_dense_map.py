"""The dense form of our stamp network (``benchmarks.dense_map_cost``): the same logits on a stamp, one
score per 8 x 8 pixels on a frame."""

from __future__ import annotations

import pytest
import torch

from benchmarks.dense_map_cost import HALO, STRIDE, dense_map, dense_network
from classifier.models import build_model


@pytest.mark.parametrize("name", ["pair", "triplet"])
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
