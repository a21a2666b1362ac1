"""pipeline/lacosmic.py: L.A.Cosmic on stacks of tiles, against astroscrappy on the same tiles, pixel for pixel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from dia.fused import grow_mask_box
from pipeline.cosmics import CosmicRayConfig, mask_cosmic_rays
from pipeline.lacosmic import (
    _batcher_comparators,
    _laplacian,
    _median_of,
    lacosmic_stack,
    median_network,
    separable_median,
)

astroscrappy = pytest.importorskip("astroscrappy")
from astroscrappy.utils import sepmedfilt5, sepmedfilt7, sepmedfilt9  # noqa: E402


def _laplacian_literal(clean: np.ndarray) -> np.ndarray:
    """L.A.Cosmic's Laplacian: the 2x sub-sampled image convolved with ``[[0,-1,0],[-1,4,-1],[0,-1,0]]``,
    clipped at zero and block-averaged back, with astroscrappy's arithmetic (float32, its order; its edge
    rows and columns as it computes them), transcribed literally on the sub-sampled grid: the reference of
    :func:`pipeline.lacosmic._laplacian`."""
    sub = np.repeat(np.repeat(clean, 2, axis=1), 2, axis=2)
    n, ny2, nx2 = sub.shape
    four = np.float32(4.0)
    out = np.empty_like(sub)
    p = sub[:, 1:-1, 1:-1] * four
    p -= sub[:, 1:-1, 2:]
    p -= sub[:, 1:-1, :-2]
    p -= sub[:, 2:, 1:-1]
    p -= sub[:, :-2, 1:-1]
    out[:, 1:-1, 1:-1] = p
    # first sub-row: one double-precision expression; last sub-row, first and last sub-columns: float32 steps
    out[:, 0, 1:-1] = _double(sub[:, 0, 1:-1], sub[:, 0, 2:], sub[:, 0, :-2], sub[:, 1, 1:-1])
    p = sub[:, -1, 1:-1] * four
    p -= sub[:, -1, 2:]
    p -= sub[:, -1, :-2]
    p -= sub[:, -2, 1:-1]
    out[:, -1, 1:-1] = p
    p = sub[:, 1:-1, 0] * four
    p -= sub[:, 1:-1, 1]
    p -= sub[:, 2:, 0]
    p -= sub[:, :-2, 0]
    out[:, 1:-1, 0] = p
    p = sub[:, 1:-1, -1] * four
    p -= sub[:, 1:-1, -2]
    p -= sub[:, 2:, -1]
    p -= sub[:, :-2, -1]
    out[:, 1:-1, -1] = p
    out[:, 0, 0] = _double(sub[:, 0, 0], sub[:, 0, 1], sub[:, 1, 0])
    out[:, 0, -1] = _double(sub[:, 0, -1], sub[:, 0, -2], sub[:, 1, -1])
    for col, near in ((0, 1), (-1, -2)):
        p = sub[:, -1, col] * four
        p -= sub[:, -1, near]
        p -= sub[:, -2, col]
        out[:, -1, col] = p
    np.maximum(out, 0, out=out)
    s = out[:, 0::2, 0::2].copy()
    s += out[:, 1::2, 0::2]
    s += out[:, 1::2, 1::2]
    s += out[:, 0::2, 1::2]
    s /= four
    return s


def _double(centre: np.ndarray, *neighbours: np.ndarray) -> np.ndarray:
    """``4 centre - neighbours...`` in double precision, rounded to float32 (astroscrappy's first sub-row)."""
    out = 4.0 * centre.astype(np.float64)
    for n in neighbours:
        out -= n
    return out.astype(np.float32)


def _tiles(seed: int, n: int = 10):
    """A stack of tiles: sky and noise, stars (some saturated), cosmic-ray tracks 1-2 px wide, a few 6-px-wide
    bands (whose middle pixels have no good neighbour in their 5 x 5 box), bad rows and pixels."""
    rng = np.random.default_rng(seed)
    ny, nx = (int(v) for v in rng.integers(20, 60, 2))
    yy, xx = np.mgrid[:ny, :nx]
    image = rng.normal(200, 10, (n, ny, nx)).astype(np.float32)
    variance = np.full((n, ny, nx), 100, np.float32) * rng.uniform(0.8, 1.2, (n, 1, 1)).astype(np.float32)
    bad = np.zeros((n, ny, nx), bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            x0, y0, flux = rng.uniform(0, nx), rng.uniform(0, ny), 10 ** rng.uniform(2.7, 6.5)
            image[i] += (flux / (8 * np.pi) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 8)).astype(np.float32)
        for _ in range(rng.integers(0, 4)):
            y0, x0 = rng.integers(0, ny), rng.integers(0, nx)
            dy, dx = rng.choice([-1, 0, 1], 2)
            for t in range(rng.integers(1, 8)):
                y, x = y0 + t * dy, x0 + t * dx
                if 0 <= y < ny and 0 <= x < nx:
                    image[i, y, x] += rng.uniform(100, 3000)
                    if rng.random() < 0.3 and x + 1 < nx:
                        image[i, y, x + 1] += rng.uniform(50, 1000)
        if rng.random() < 0.3:
            bad[i, rng.integers(0, ny), :] = True
        if rng.random() < 0.3:
            bad[i, rng.integers(0, ny, 5), rng.integers(0, nx, 5)] = True
        if rng.random() < 0.2:
            y0 = rng.integers(3, ny - 8)
            image[i, y0 : y0 + 6, 5 : min(30, nx)] += 2000
        variance[i] += np.clip(image[i] - 200, 0, None) / 1.5
    return image, variance, bad


@pytest.mark.parametrize("seed", range(12))
def test_each_slice_equals_astroscrappy_on_it(seed):
    image, variance, bad = _tiles(seed)
    rng = np.random.default_rng(100 + seed)
    gain = float(rng.choice([1.0, 1.7, 4.0]))
    saturation = float(rng.choice([np.inf, 3e4]))  # in ADU: stars up to ~1.3e5 ADU at their peak
    niter = int(rng.integers(1, 4))
    kwargs = dict(sigclip=5.0, sigfrac=0.3, objlim=5.0, niter=niter)
    got = lacosmic_stack(image, variance, bad, gain=gain, saturation=saturation * gain, **kwargs)
    flagged = 0
    for i in range(len(image)):
        want, _ = astroscrappy.detect_cosmics(image[i], inmask=bad[i], invar=variance[i], gain=gain, readnoise=5.0,
                                              satlevel=saturation * gain, sepmed=True, fsmode="median",
                                              cleantype="meanmask", verbose=False, **kwargs)
        assert np.array_equal(got[i], want), (seed, i, int(got[i].sum()), int(want.sum()))
        flagged += int(want.sum())
    assert flagged > 0  # the comparison saw cosmic rays


def test_median_networks_and_separable_medians_equal_the_reference():
    rng = np.random.default_rng(0)
    for n in (3, 5, 7, 9):
        for perm in itertools.islice(itertools.permutations(range(n)), 3000):  # a sorting network sorts these
            wires = [np.array([v], np.float32) for v in perm]
            assert _median_of(wires)[0] == n // 2
        ties = rng.integers(0, 3, (n, 5000)).astype(np.float32)
        assert np.array_equal(_median_of(list(ties)), np.median(ties, axis=0).astype(np.float32))
        if n > 3:  # pruned: the comparators the middle wire does not depend on are gone
            assert len(median_network(n)) < len(_batcher_comparators(n))
    stack = rng.normal(100, 10, (4, 31, 26)).astype(np.float32)
    stack[:, 10, 10] = 1e4
    for size, reference in ((5, sepmedfilt5), (7, sepmedfilt7), (9, sepmedfilt9)):
        assert np.array_equal(separable_median(stack, size), np.stack([reference(s) for s in stack]))
    with pytest.raises(ValueError, match="odd"):
        median_network(4)


def test_laplacian_at_pixel_resolution_equals_the_sub_sampled_one():
    rng = np.random.default_rng(1)
    for shape in [(30, 3, 3), (20, 4, 7), (8, 40, 40), (9, 17, 5), (7, 2, 9), (5, 1, 6), (5, 6, 1), (3, 1, 1)]:
        for scale in (1.0, 1e-3, 1e5):  # values whose float32 rounding differs between the orders of subtraction
            x = (rng.normal(100, 30, shape) * rng.choice([1, 1e-3, 1e3, -1], shape) * scale).astype(np.float32)
            assert np.array_equal(_laplacian(x), _laplacian_literal(x)), (shape, scale)


def test_a_stack_of_tiles_is_grown_slice_by_slice():
    rng = np.random.default_rng(2)
    for half in (1, 2, 3):
        flags = rng.random((3, 23, 17)) < 0.02
        box = np.ones((1, 2 * half + 1, 2 * half + 1), bool)
        grown = grow_mask_box(np, flags, half, border=False)
        assert np.array_equal(grown, ndimage.binary_dilation(flags, structure=box))
        assert np.array_equal(grown[1], grow_mask_box(np, flags[1], half, border=False))


def test_both_engines_give_the_same_mask_and_the_numpy_one_finds_the_tracks():
    from tests.test_cosmics import GAIN, READ_NOISE, SATURATION, _scene

    stars = [(40.3, 40.7, 2e5), (150.2, 60.6, 2e4), (160.4, 160.2, 5e5)]
    image, var, tracks, _ = _scene(seed=21, shape=(220, 260), n_tracks=15, stars=stars)
    mask = np.zeros(image.shape, np.int32)
    mask[100, :] = 1  # a bad row (BAD) across two tracks' tiles
    results = {}
    for engine in ("numpy", "astroscrappy"):
        config = CosmicRayConfig(engine=engine, replace=True)
        results[engine] = mask_cosmic_rays(image, mask, var, config, gain=GAIN, read_noise=READ_NOISE,
                                           saturation=SATURATION)
    numpy_result, reference = results["numpy"], results["astroscrappy"]
    assert np.array_equal(numpy_result.mask, reference.mask)
    assert np.array_equal(numpy_result.cleaned, reference.cleaned)
    assert numpy_result.n_cosmic_rays == reference.n_cosmic_rays >= 15
    labels, n_tracks = ndimage.label(tracks, np.ones((3, 3), bool))
    found = np.unique(labels[numpy_result.mask & tracks])
    assert set(found[found > 0]) == set(range(1, n_tracks + 1))  # every track
    # most of their pixels: L.A.Cosmic leaves the middles of 3-px-wide tracks and the pixels next to the bad row
    assert (numpy_result.mask & tracks).sum() >= 0.7 * tracks.sum()
    with pytest.raises(ValueError, match="engine"):
        CosmicRayConfig(engine="fortran")


def test_long_groups_of_seeds_are_cut_into_bounded_boxes_that_cover_their_reach():
    from pipeline.cosmics import _seed_boxes

    shape, reach = (3000, 2000), 6
    t = np.arange(0, 1800)
    ys = np.concatenate([200 + t, [50]])  # a diagonal trail 1800 px long, and one lone seed
    xs = np.concatenate([100 + t, [1900]])
    boxes = _seed_boxes(ys, xs, shape, reach, max_box=256)
    covered = np.zeros(shape, bool)
    for rows, cols in boxes:
        assert rows.stop - rows.start <= 256 and cols.stop - cols.start <= 256
        covered[rows, cols] = True
    near = np.zeros(shape, bool)
    near[ys, xs] = True
    near = ndimage.binary_dilation(near, np.ones((2 * reach + 1, 2 * reach + 1), bool))
    assert covered[near].all()  # every pixel within reach of a seed is in a box
    assert covered.sum() < 0.5 * (1800 + 2 * reach) ** 2  # not the trail's whole bounding box (here 38% of it)
    assert len(_seed_boxes(ys, xs, shape, reach, max_box=1 << 20)) == 2  # uncut: one box per group
