"""Memory paths: exposures read without copies, stamps cut without full-frame copies, and the
per-CCD chain freeing full frames once no later stage reads them -- with the same numbers."""

from __future__ import annotations

import os
import sys
import tracemalloc

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from dia.masks import MaskBits
from pipeline import graph
from pipeline.config import RunConfig
from pipeline.io import _weight_to_variance, read_exposure, read_manifest
from pipeline.stamps import cut_stamps, ring_background


def _wcs_header(saturation: float = 5000.0) -> fits.Header:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -20.0]
    w.wcs.crpix = [40.0, 30.0]
    w.wcs.cdelt = [-7e-5, 7e-5]
    hdr = w.to_header()
    hdr["SATURATE"] = saturation
    hdr["FWHM"] = 3.0
    return hdr


def _write_mef(path, image, variance, mask, header):
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(image, header, name="IMAGE"),
        fits.ImageHDU(variance, header, name="VARIANCE"),
        fits.ImageHDU(mask, fits.Header([("MP_BAD", int(MaskBits.BAD))]), name="MASK"),
    ]).writeto(path)
    return path


def test_read_exposure_native_planes_and_bad_pixels(tmp_path):
    rng = np.random.default_rng(5)
    image = rng.normal(100.0, 5.0, (64, 80)).astype(np.float32)
    image[3, 4] = np.nan
    image[10, 10] = 6000.0  # saturated
    variance = np.full(image.shape, 25.0, np.float32)
    variance[5, 6] = 0.0  # no weight
    variance[7, 8] = 49.0  # the largest good variance
    mask = np.zeros(image.shape, np.int32)
    mask[20, :] = MaskBits.BAD
    exp = read_exposure(_write_mef(tmp_path / "e.fits", image, variance, mask, _wcs_header()))
    for plane, dtype in ((exp.image, np.float32), (exp.variance, np.float32), (exp.mask, np.int32)):
        assert plane.dtype == dtype and plane.dtype.isnative and plane.flags.writeable
    good = np.ones(image.shape, bool)
    good[3, 4] = good[5, 6] = False
    assert np.array_equal(exp.image[good], image[good])
    # no data: image 0, variance the largest good one, NO_DATA set; other bits as in the file
    assert exp.image[3, 4] == 0 and exp.image[5, 6] == 0
    assert exp.variance[3, 4] == 49.0 and exp.variance[5, 6] == 49.0
    assert np.array_equal(exp.variance[good], variance[good])
    assert exp.mask[3, 4] & MaskBits.NO_DATA and exp.mask[5, 6] & MaskBits.NO_DATA
    assert exp.mask[10, 10] == MaskBits.SAT and (exp.mask[20] & MaskBits.BAD).all()
    assert np.count_nonzero(exp.mask) == 2 + 1 + image.shape[1]


def test_read_exposure_same_hdu_twice_reads_it_twice(tmp_path):
    """The image HDU is also the variance HDU: each plane is read (and byte-swapped) once."""
    rng = np.random.default_rng(6)
    variance = rng.uniform(10.0, 20.0, (60, 70)).astype(np.float32)
    path = _write_mef(tmp_path / "v.fits", variance, variance, np.zeros(variance.shape, np.int32), _wcs_header())
    exp = read_exposure(path, hdu="VARIANCE")
    assert np.array_equal(exp.image, variance) and np.array_equal(exp.variance, variance)
    assert not np.shares_memory(exp.image, exp.variance)


def test_read_exposure_makes_no_full_frame_copies(tmp_path):
    """Peak traced memory of a read stays near the three planes it returns (it was 3.5x)."""
    n = 512
    image = np.random.default_rng(7).normal(100.0, 5.0, (n, n)).astype(np.float32)
    image[1, 1] = np.nan
    path = _write_mef(tmp_path / "big.fits", image, np.full((n, n), 25.0, np.float32), np.zeros((n, n), np.int32),
                      _wcs_header())
    read_exposure(path)  # warm imports and caches
    tracemalloc.start()
    try:
        exp = read_exposure(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    planes = exp.image.nbytes + exp.variance.nbytes + exp.mask.nbytes
    assert peak < 2.0 * planes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_to_variance_is_the_rounded_inverse(dtype):
    w = np.array([4.0, 0.0, -1.0, np.nan, 3.0, 7e-3, 1e30], dtype=dtype)
    var = _weight_to_variance(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(w.astype(np.float64) > 0, 1.0 / w.astype(np.float64), np.inf).astype(np.float32)
    assert var.dtype == np.float32 and np.array_equal(var, expected)


def _reference_cut(plane, mask, x, y, size):
    """Stamps one by one with explicit loops: the truth the vectorised cutter must match."""
    half = size // 2
    n = len(x)
    data = np.full((n, size, size), np.nan, np.float32)
    bits = np.full((n, size, size), int(MaskBits.NO_DATA), np.int32)
    for k in range(n):
        cx, cy = int(np.rint(x[k])), int(np.rint(y[k]))
        for j in range(size):
            for i in range(size):
                yy, xx = cy - half + j, cx - half + i
                if 0 <= yy < plane.shape[0] and 0 <= xx < plane.shape[1]:
                    bits[k, j, i] = mask[yy, xx] if mask is not None else 0
                    data[k, j, i] = np.nan if bits[k, j, i] & MaskBits.NO_DATA else np.float32(plane[yy, xx])
    return data, bits


def test_cut_stamps_matches_loops_on_edges_layouts_and_dtypes():
    rng = np.random.default_rng(8)
    ny, nx, size = 40, 33, 9
    wide = rng.normal(0.0, 1.0, (ny, 2 * nx))
    planes = {
        "f32": rng.normal(0.0, 1.0, (ny, nx)).astype(np.float32),
        "f64": rng.normal(0.0, 1.0, (ny, nx)),  # converted per stamp, not per frame
        "strided": wide[:, ::2],  # a non-contiguous view
    }
    mask = rng.integers(0, 4, (ny, nx)).astype(np.int32) * int(MaskBits.BAD)
    mask[5, 5:9] = MaskBits.NO_DATA
    masks = {"f32": mask, "strided": mask.astype(np.int16)}
    x = np.array([16.0, 0.2, 32.6, -3.0, 16.4, 4.6, 30.0])
    y = np.array([20.0, 0.0, 39.0, 20.0, 5.4, 4.0, -6.0])  # inside, corners, off the image
    st = cut_stamps(planes, masks, x, y, size=size)
    assert st.channels == ("f32", "f64", "strided") and st.data.dtype == np.float32 and st.mask.dtype == np.int32
    for k, (name, plane) in enumerate(planes.items()):
        data, bits = _reference_cut(plane, masks.get(name), x, y, size)
        assert np.array_equal(st.data[:, k], data, equal_nan=True), name
        assert np.array_equal(st.mask[:, k], bits), name
    assert list(st.complete) == [True, False, False, False, True, False, False]  # 5: a NO_DATA run
    empty = cut_stamps(planes, masks, [], [], size=size)
    assert empty.data.shape == (0, 3, size, size) and empty.mask.shape == (0, 3, size, size)


def test_cut_stamps_does_not_copy_planes():
    plane = np.random.default_rng(9).normal(0.0, 1.0, (1024, 1024))  # float64: 8 MB
    x = y = np.array([100.0, 500.0, 900.0])
    cut_stamps({"a": plane}, None, x, y)
    tracemalloc.start()
    try:
        cut_stamps({"a": plane}, None, x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < plane.nbytes / 16  # stamps only: no float32 copy of the frame, no zero mask frame


def test_ring_background_matches_per_stamp_nanmedian():
    rng = np.random.default_rng(10)
    data = rng.normal(50.0, 3.0, (12, 2, 21, 21)).astype(np.float32)
    data[2, 1, :3, :] = np.nan  # part of the ring missing
    data[4] = np.nan  # nothing at all: background 0
    data[6, 0, 10, 10] = 1e6  # the centre does not count
    bkg = ring_background(data, width=4)
    ring = np.ones((21, 21), bool)
    ring[4:-4, 4:-4] = False
    for i in range(12):
        for c in range(2):
            values = data[i, c][ring]
            expected = np.nanmedian(values) if np.isfinite(values).any() else 0.0
            assert bkg[i, c] == np.float32(expected), (i, c)
    assert bkg.dtype == np.float32 and bkg[4, 0] == 0.0


def _zero_stride(a) -> bool:
    return a.strides == (0, 0)


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_chain_frees_full_frames_it_no_longer_needs(mode, sim_field, tmp_path):
    """Stage by stage: the template on its own grid goes after alignment, the convolved image's
    variance after subtraction, every full frame after the stamps -- and the CCD still finishes."""
    config = RunConfig(mode=mode)
    entry = read_manifest(sim_field)[0]
    chash = graph.config_hash(config)
    state = graph.CcdState.start(entry, chash)
    seen = {}
    for stage in graph.STAGES[mode]:
        state = graph.run_stage(stage, state, config, str(tmp_path), chash)
        assert state.status != "failed", state.traceback
        seen[stage] = state
    if mode == "dia":
        assert seen["align"].pair.template is None and seen["align"].aligned.template.image.size > 0
        sub = seen["subtract"]
        convolved = sub.aligned.template if sub.diff.convolved == "template" else sub.aligned.search
        kept = sub.aligned.search if sub.diff.convolved == "template" else sub.aligned.template
        assert _zero_stride(convolved.variance) and np.isnan(convolved.variance).all()
        assert not _zero_stride(kept.variance) and not _zero_stride(convolved.image)
        assert seen["stamps"].aligned is None and seen["stamps"].diff is None
    else:
        assert seen["detect"].pair.template is not None
    after = seen["stamps"]
    assert after.pair.template is None
    search = after.pair.search
    assert all(_zero_stride(p) for p in (search.image, search.variance, search.mask))
    assert search.shape == tuple(after.shape) and search.zero_point == seen["load"].pair.search.zero_point
    assert state.status == "done" and state.n_candidates == len(state.candidates) > 0


def test_release_free_memory_is_harmless():
    assert graph.release_free_memory() in (True, False)
    assert graph.without_planes(None) is None


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from pipeline.graph import tune_heap

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # an 8 MiB temporary made, touched and freed, as a stage's band or tile
        a = np.ones(1024 * 1024)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = faults()
ok = tune_heap()
tuned = faults()
print(untuned, tuned, ok)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_heap_reuses_the_heap_in_a_dask_nanny_environment():
    """Under Dask's nanny setting MALLOC_TRIM_THRESHOLD_=65536 every 8 MiB temporary is a fresh mmap whose pages
    fault in (the kernel maps several at once); after tune_heap (a worker's start-up) the heap is reused: page
    faults counted, not times."""
    import subprocess

    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    untuned, tuned, ok = out.stdout.split()
    assert ok == "True"
    assert int(untuned) > 20 * 200  # every temporary's pages fault in again (< 2048: the kernel maps some at once)
    assert int(tuned) < 0.2 * int(untuned)


_FRAME_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from pipeline.graph import release_free_memory, tune_heap

ok = tune_heap(reuse=sys.argv[1] == "reuse")

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # a 40 MiB frame made, touched and freed, as a stage's output (over the 32 MiB mmap limit)
        a = np.ones(5 * 1024 * 1024)
        del a
        release_free_memory()  # a stage boundary
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()  # the first frame's pages fault in either way
print(faults(), ok, release_free_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_heap_reuse_serves_full_frames_from_pages_already_held():
    """A full frame is above the largest mmap threshold glibc accepts, so by default each is a fresh mapping whose
    pages fault in, and the stage-boundary trim returns the heap's; with ``reuse=True`` (a run's default) the second
    and later frames fault nothing and the trim is skipped: page faults counted, not times."""
    import subprocess

    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")  # as Dask's nanny starts a worker
    counts = {}
    for policy in ("reuse", "trim"):
        out = subprocess.run([sys.executable, "-c", _FRAME_FAULTS_SCRIPT, policy], env=env, capture_output=True,
                             text=True, check=True)
        faults, ok, trimmed = out.stdout.split()
        assert ok == "True"
        assert trimmed == ("False" if policy == "reuse" else "True")
        counts[policy] = int(faults)
    # 10 frames of 40 MiB: >= 20 faults each even with 2 MiB pages when fresh; a reused heap needs next to none
    assert counts["trim"] > 10 * 15
    assert counts["reuse"] < 0.1 * counts["trim"]


def test_reuse_memory_is_an_execution_setting_that_reaches_the_workers():
    """``RunConfig.reuse_memory`` changes no result (not in what ``--resume`` keys on) and a worker's start-up sets
    its heap policy from it: the stage-boundary trim is skipped when memory is reused and done when it is not."""
    import subprocess

    from pipeline.config import RunConfig, science_dict

    assert science_dict(RunConfig(reuse_memory=False)) == science_dict(RunConfig())
    script = ("import sys\nfrom pipeline.graph import release_free_memory\nfrom pipeline.runner import prepare_worker\n"
              "prepare_worker('triplet', 'cpu', 1, 64, '', sys.argv[1] == 'reuse')\nprint(release_free_memory())\n")
    trimmed = {}
    for policy in ("reuse", "trim"):
        out = subprocess.run([sys.executable, "-c", script, policy], capture_output=True, text=True, check=True)
        trimmed[policy] = out.stdout.split()[-1]
    if sys.platform.startswith("linux"):
        assert trimmed == {"reuse": "False", "trim": "True"}
    else:  # no glibc: nothing to tune, nothing trimmed
        assert set(trimmed.values()) == {"False"}


def _child_peak(queue) -> None:  # module level: a spawned process imports it
    queue.put(graph._peak_rss_mb())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the carried-over ru_maxrss is Linux's")
def test_a_spawned_worker_reports_its_own_peak_not_its_parents():
    """Linux carries ``ru_maxrss`` over exec: a Dask worker spawned by a process that had reached 1 GB reported 1 GB
    (both modes of `pipeline benchmark` showed the parent's 1068 MB).  The peak is the worker's own high-water mark."""
    import multiprocessing
    import resource

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB touched in this (parent) process
    ballast += 1.0
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    assert parent_peak > 400
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak, args=(queue,))
    child.start()
    peak = queue.get(timeout=120)
    child.join(timeout=60)
    assert 0 < peak < parent_peak - 250  # the child imported numpy and the pipeline, far less than 400 MiB
    del ballast
