"""Fault injection: bad inputs and faults a survey operator meets, run as a user runs them.

Part 1 (this section): one manifest holding a good CCD and ~20 broken ones, run once per mode
through the ``pipeline run`` command.  For every case the test asserts the CCD's status, the
stage that failed, and that the message names the file (or HDU, or setting) and the problem;
that the good CCD's catalog equals a clean run's; that no input file was touched; and that
nothing half-written or foreign is left in the output folder.

Part 2 (below): run-level faults -- unsafe CCD identifiers, bad configuration, bad weights,
unusable output folders, a second run into a locked folder, a full disk, killed runs and
workers, stale resume -- each with its exit status and message.

The table of cases is ``CCD_CASES`` (per-CCD) and the test names of part 2.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from pipeline.cli import main as cli
from pipeline.runner import EXIT_OUTPUT, EXIT_SETUP, EXIT_SOME_FAILED

GOOD = "good"

# ccd -> {mode: (failed stage or "done", regex the error must match)}; the regexes name the
# file (or HDU / setting) and the problem.
CCD_CASES: dict[str, dict[str, tuple[str, str]]] = {
    "missing": {"*": ("load", r"nowhere\.fits: image file does not exist")},
    "notfits": {"*": ("load", r"garbage\.fits: cannot read image file as FITS")},
    "truncated-header": {"*": ("load", r"trunc_header\.fits: cannot read image file as FITS")},
    "truncated-data": {"*": ("load", r"trunc_data\.fits\[\w+\]: cannot read the \w+ data .*truncated")},
    "no-wcs": {"*": ("load", r"nowcs\.fits\[IMAGE\]: no celestial WCS")},
    "all-nan": {"*": ("load", r"nan\.fits\[IMAGE\]: image has no finite pixels")},
    "shape-mismatch": {"*": ("load", r"shape\.fits\[VARIANCE\]: variance plane has shape \(1024, 1000\)")},
    "tiny": {"*": ("load", r"tiny\.fits\[IMAGE\]: image is 2 x 2 pixels, smaller than one 51 x 51")},
    "saturated": {"*": ("load", r"saturated\.fits\[IMAGE\]: no usable pixels: 100% at or above the saturation "
                                r"level \(SATURATE = 10 ADU\)")},
    "bad-gain": {"*": ("load", r"badgain\.fits\[IMAGE\]: header keyword GAIN.* = 'four' is not a number")},
    "bad-hdu": {"*": ("load", r"good_search\.fits: HDU 'S7' not found \(image\)")},
    "zero-weight": {"*": ("load", r"good_search\.fits\[IMAGE\]: no usable pixels \(all NaN or zero weight\)")},
    "mask-shape": {"*": ("load", r"smallmask\.fits\[PRIMARY\]: mask plane has shape \(512, 512\)")},
    "truth-is-fits": {"*": ("load", r"truth\.fits: cannot read the truth table as ECSV")},
    "far-template": {"dia": ("align", r"no overlap: template 'far_template\.fits\[IMAGE\]'"),
                     "direct": ("detect", r"no overlap: template 'far_template\.fits\[IMAGE\]'")},
    "rotated-pixels": {"dia": ("align", r"template 'rotated_template\.fits\[IMAGE\]' does not line up .*WCS"),
                       "direct": ("detect", r"template 'rotated_template\.fits\[IMAGE\]' does not line up .*WCS")},
    "empty-sky": {"dia": ("subtract", r"empty_search\.fits.*too few usable kernel-fit stars.*psf_match\.min_stars"),
                  "direct": ("done", "")},
    # dia on this 1024-pixel CCD keeps too few kernel stars on half a template: a clean failure
    "half-nan-template": {"dia": ("subtract", r"halfnan_template\.fits.*too few usable kernel-fit stars"),
                          "direct": ("done", "")},
    "binned-template": {"*": ("done", "")},
    "int-image": {"*": ("done", "")},
    "compressed": {"*": ("done", "")},
}


def _expect(ccd: str, mode: str) -> tuple[str, str]:
    case = CCD_CASES[ccd]
    return case.get(mode, case.get("*"))


def _edit(src: Path, dst: Path, edit) -> None:
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    edit(hdul)
    hdul.writeto(dst, overwrite=True)


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _build_fault_field(sim_field: Path, out: Path) -> Path:
    """The good CCD (ccd00 of the simulated field) and one broken CCD per case in CCD_CASES."""
    src = sim_field.parent
    out.mkdir(parents=True, exist_ok=True)
    s_src, t_src = src / "ccd00_search.fits", src / "ccd00_template.fits"
    shutil.copy(s_src, out / "good_search.fits")
    shutil.copy(t_src, out / "good_template.fits")
    shutil.copy(src / "ccd00_truth.ecsv", out / "good_truth.ecsv")
    rng = np.random.default_rng(7)

    (out / "garbage.fits").write_bytes(b"this is not a FITS file\n" * 200)
    raw = s_src.read_bytes()
    (out / "trunc_header.fits").write_bytes(raw[:1000])
    (out / "trunc_data.fits").write_bytes(raw[: len(raw) // 2])

    def strip_wcs(h):
        wcs_key = re.compile(r"(CTYPE|CRVAL|CRPIX|CDELT|CUNIT)\d$|(CD|PC)\d_\d$|WCSAXES$|LONPOLE$|LATPOLE$")
        for key in [k for k in h["IMAGE"].header if wcs_key.match(k)]:
            del h["IMAGE"].header[key]

    _edit(s_src, out / "nowcs.fits", strip_wcs)

    def all_nan(h):
        h["IMAGE"].data = np.full_like(h["IMAGE"].data, np.nan)

    _edit(s_src, out / "nan.fits", all_nan)

    def bad_shape(h):
        h["VARIANCE"].data = h["VARIANCE"].data[:, :1000].copy()

    _edit(s_src, out / "shape.fits", bad_shape)

    def tiny(h):
        for name in ("IMAGE", "VARIANCE", "MASK"):
            h[name].data = h[name].data[:2, :2].copy()

    _edit(s_src, out / "tiny.fits", tiny)

    def saturated(h):
        h["IMAGE"].header["SATURATE"] = 10.0
        h[0].header["SATURATE"] = 10.0
        h["MASK"].data[:] = 0

    _edit(s_src, out / "saturated.fits", saturated)

    def bad_gain(h):
        h["IMAGE"].header["GAIN"] = "four"

    _edit(s_src, out / "badgain.fits", bad_gain)
    fits.PrimaryHDU(np.zeros((1024, 1024), np.float32)).writeto(out / "zeroweight.fits")
    fits.PrimaryHDU(np.zeros((512, 512), np.int16)).writeto(out / "smallmask.fits")
    shutil.copy(s_src, out / "truth.fits")

    def far(h):
        for hdu in h[1:]:
            hdu.header["CRVAL1"] = hdu.header["CRVAL1"] + 1.0

    _edit(t_src, out / "far_template.fits", far)

    def rotate(h):  # the pixels turned by 180 degrees, the WCS left as it was
        for name in ("IMAGE", "VARIANCE", "MASK"):
            h[name].data = np.ascontiguousarray(h[name].data[::-1, ::-1])

    _edit(t_src, out / "rotated_template.fits", rotate)

    def empty(level_sigma):
        def edit(h):
            sky = h["IMAGE"].header["SKYLEVEL"]
            h["IMAGE"].data = (sky + rng.normal(0, level_sigma, h["IMAGE"].data.shape)).astype(np.float32)
            h["VARIANCE"].data = np.full_like(h["VARIANCE"].data, level_sigma**2)
            h["MASK"].data[:] = 0
        return edit

    _edit(s_src, out / "empty_search.fits", empty(5.0))
    _edit(t_src, out / "empty_template.fits", empty(2.0))

    def half_nan(h):  # the template has no data over the right half of its pixels
        nx = h["IMAGE"].data.shape[1]
        h["IMAGE"].data[:, nx // 2:] = np.nan

    _edit(t_src, out / "halfnan_template.fits", half_nan)

    def binned(h):  # a 2x2-binned template: half the pixels per axis, FWHM in binned pixels
        img = h["IMAGE"].data.astype(np.float64)
        ny, nx = img.shape
        h["IMAGE"].data = img.reshape(ny // 2, 2, nx // 2, 2).sum(axis=(1, 3)).astype(np.float32)
        h["VARIANCE"].data = h["VARIANCE"].data.astype(np.float64).reshape(ny // 2, 2, nx // 2, 2).sum(
            axis=(1, 3)).astype(np.float32)
        m = h["MASK"].data
        h["MASK"].data = (m[0::2, 0::2] | m[1::2, 0::2] | m[0::2, 1::2] | m[1::2, 1::2]).astype(np.int32)
        for hdu in h[1:]:
            hdr = hdu.header
            hdr["CRPIX1"] = (hdr["CRPIX1"] - 0.5) / 2 + 0.5
            hdr["CRPIX2"] = (hdr["CRPIX2"] - 0.5) / 2 + 0.5
            for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "CDELT1", "CDELT2"):
                if key in hdr:
                    hdr[key] = hdr[key] * 2
        for hdr in (h[0].header, h["IMAGE"].header):
            if "FWHM" in hdr:
                hdr["FWHM"] = hdr["FWHM"] / 2
            if "SATURATE" in hdr:
                hdr["SATURATE"] = hdr["SATURATE"] * 4

    _edit(t_src, out / "binned_template.fits", binned)

    def as_int(h):  # integer ADU, as many cameras write them
        h["IMAGE"].data = np.rint(h["IMAGE"].data).astype(np.int32)

    _edit(s_src, out / "int_search.fits", as_int)

    def compress(h):  # lossless tile compression of the image
        image = h["IMAGE"]
        h[1] = fits.CompImageHDU(image.data.astype(np.float32), header=image.header.copy(strip=True), name="IMAGE",
                                 compression_type="GZIP_2", quantize_level=0.0)

    _edit(s_src, out / "compressed_search.fits", compress)

    G = ("good_search.fits", "good_template.fits")
    rows = [
        (GOOD, *G, "good_truth.ecsv", "", ""),
        ("missing", "nowhere.fits", G[1], "", "", ""),
        ("notfits", "garbage.fits", G[1], "", "", ""),
        ("truncated-header", "trunc_header.fits", G[1], "", "", ""),
        ("truncated-data", "trunc_data.fits", G[1], "", "", ""),
        ("no-wcs", "nowcs.fits", G[1], "", "", ""),
        ("all-nan", "nan.fits", G[1], "", "", ""),
        ("shape-mismatch", "shape.fits", G[1], "", "", ""),
        ("tiny", "tiny.fits", G[1], "", "", ""),
        ("saturated", "saturated.fits", G[1], "", "", ""),
        ("bad-gain", "badgain.fits", G[1], "", "", ""),
        ("bad-hdu", *G, "", "S7", ""),
        ("zero-weight", *G, "", "", "zeroweight.fits"),
        ("mask-shape", *G, "", "", ""),
        ("truth-is-fits", *G, "truth.fits", "", ""),
        ("far-template", G[0], "far_template.fits", "", "", ""),
        ("rotated-pixels", G[0], "rotated_template.fits", "", "", ""),
        ("empty-sky", "empty_search.fits", "empty_template.fits", "", "", ""),
        ("half-nan-template", G[0], "halfnan_template.fits", "good_truth.ecsv", "", ""),
        ("binned-template", G[0], "binned_template.fits", "good_truth.ecsv", "", ""),
        ("int-image", "int_search.fits", G[1], "good_truth.ecsv", "", ""),
        ("compressed", "compressed_search.fits", G[1], "good_truth.ecsv", "", ""),
    ]
    table = Table(rows=rows, names=("ccd", "search", "template", "truth", "search_hdu", "search_weight"),
                  dtype=(str, str, str, str, str, str))
    table["search_mask"] = [("smallmask.fits" if r[0] == "mask-shape" else "") for r in rows]
    assert set(table["ccd"]) == set(CCD_CASES) | {GOOD}
    table.write(out / "manifest.ecsv", format="ascii.ecsv", overwrite=True)
    return out / "manifest.ecsv"


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    status = cli(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def fault_field(sim_field, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    manifest = _build_fault_field(sim_field, folder / "in")
    return manifest


def _clean_manifest(fault_field: Path) -> Path:
    table = Table.read(fault_field, format="ascii.ecsv")
    clean = table[table["ccd"] == GOOD]
    path = fault_field.parent / "clean.ecsv"
    if not path.exists():
        clean.write(path, format="ascii.ecsv")
    return path


class _Runs:
    """Each mode run once over the fault field (and once clean), shared by the tests of part 1."""

    def __init__(self, fault_field: Path, root: Path):
        self.field = fault_field
        self.root = root
        self.cache: dict[str, dict] = {}

    def get(self, kind: str, mode: str, capsys) -> dict:
        key = f"{kind}-{mode}"
        if key not in self.cache:
            before = _checksums(self.field.parent)
            out = self.root / key
            manifest = self.field if kind == "faults" else _clean_manifest(self.field)
            status, stdout, stderr = _run_cli(["run", "--mode", mode, "--input", str(manifest), "--out", str(out),
                                               "--no-progress", "--workers", "2"], capsys)
            after = _checksums(self.field.parent)
            self.cache[key] = {"status": status, "out": out, "stdout": stdout, "stderr": stderr,
                               "inputs_changed": sorted(k for k in before if before[k] != after.get(k)),
                               "run": json.loads((out / "run.json").read_text())}
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(fault_field, tmp_path_factory):
    return _Runs(fault_field, tmp_path_factory.mktemp("fault-runs"))


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_every_bad_ccd_fails_alone_with_a_message_naming_file_and_problem(mode, runs, capsys):
    res = runs.get("faults", mode, capsys)
    assert res["status"] == EXIT_SOME_FAILED, res["stderr"][-3000:]
    by = {c["ccd"]: c for c in res["run"]["ccds"]}
    assert set(by) == set(CCD_CASES) | {GOOD}
    assert by[GOOD]["status"] == "done"
    problems = []
    for ccd in CCD_CASES:
        stage, pattern = _expect(ccd, mode)
        rec = by[ccd]
        if stage == "done":
            if rec["status"] != "done":
                problems.append(f"{ccd}: expected done, got {rec['failed_stage']}: {rec['error']}")
            continue
        if rec["status"] != "failed" or rec["failed_stage"] != stage:
            problems.append(f"{ccd}: expected failure at {stage}, got {rec['status']} {rec['failed_stage']}: "
                            f"{rec['error']}")
        elif not re.search(pattern, rec["error"] or ""):
            problems.append(f"{ccd}: message {rec['error']!r} does not match {pattern!r}")
        elif "Traceback" not in (rec["traceback"] or "") or rec["error"].split(":")[0] not in rec["traceback"]:
            problems.append(f"{ccd}: full traceback missing from run.json")
        # the terminal summary names the failure too
        if rec["status"] == "failed" and f"{ccd}: FAILED at {rec['failed_stage']}" not in res["stdout"]:
            problems.append(f"{ccd}: failure not on the terminal")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_the_good_ccd_gives_the_clean_run_catalog_and_nothing_is_left_behind(mode, runs, capsys):
    faults = runs.get("faults", mode, capsys)
    clean = runs.get("clean", mode, capsys)
    assert clean["status"] == 0
    a = Table.read(faults["out"] / "ccds" / f"{GOOD}.fits")
    b = Table.read(clean["out"] / "ccds" / f"{GOOD}.fits")
    assert len(a) == len(b) > 0
    for col in ("x", "y", "flux", "flux_err", "score"):
        np.testing.assert_allclose(np.asarray(a[col]), np.asarray(b[col]), rtol=1e-6, atol=1e-6)
    merged = Table.read(faults["out"] / "candidates.fits")
    done = {c["ccd"] for c in faults["run"]["ccds"] if c["status"] == "done"}
    assert set(np.char.strip(np.asarray(merged["ccd"]).astype(str))) <= done
    # no input touched, no temporaries, nothing but the documented outputs
    assert faults["inputs_changed"] == [] and clean["inputs_changed"] == []
    out = faults["out"]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"candidates.fits", "candidates.parquet", "run.json", "run.log", ".pipeline.lock"}
    expected |= {f"ccds/{c}.json" for c in [*CCD_CASES, GOOD]} | {f"ccds/{c}.fits" for c in done}
    assert names == expected, names ^ expected


def test_half_nan_template_gives_no_candidates_where_it_has_no_data(runs, capsys):
    for mode in ("direct",):
        res = runs.get("faults", mode, capsys)
        cat = Table.read(res["out"] / "ccds" / "half-nan-template.fits")
        rec = {c["ccd"]: c for c in res["run"]["ccds"]}["half-nan-template"]
        # the template's right half of pixels maps onto (about) the right half of the search
        x = np.asarray(cat["x"])
        assert len(cat) > 0 and (x < 1024 * 0.5 + 60).all(), (mode, np.sort(x)[-5:])
        clean = Table.read(runs.get("clean", mode, capsys)["out"] / "ccds" / f"{GOOD}.fits")
        assert len(cat) < 0.7 * len(clean)
        if mode == "direct":
            assert 0.4 < rec["decisions"]["detect"]["template_coverage"] < 0.6
            assert rec["decisions"]["detect"]["dropped_without_template"] > 0
        else:
            assert 0.4 < rec["decisions"]["align"]["overlap"] < 0.6


def test_binned_template_psf_size_is_in_search_pixels(runs, capsys):
    res = runs.get("faults", "dia", capsys)
    clean = runs.get("clean", "dia", capsys)
    rec = {c["ccd"]: c for c in res["run"]["ccds"]}["binned-template"]
    ref = {c["ccd"]: c for c in clean["run"]["ccds"]}[GOOD]
    # the template FWHM header counts binned pixels (half a search pixel's worth of template pixel per
    # search pixel); past alignment it is in search pixels, as the unbinned template's
    assert rec["decisions"]["align"]["pixel_scale_ratio"] == pytest.approx(0.5, rel=1e-3)
    assert rec["decisions"]["align"]["template_fwhm_search_px"] == pytest.approx(
        ref["decisions"]["align"]["template_fwhm_search_px"], rel=0.01)
    assert rec["decisions"]["subtract"]["convolved"] == ref["decisions"]["subtract"]["convolved"]
    assert rec["truth_summary"]["n_false_positives"] <= ref["truth_summary"]["n_false_positives"] + 1


def test_integer_and_compressed_images_give_the_same_catalog(runs, capsys):
    res = runs.get("faults", "dia", capsys)
    good = Table.read(res["out"] / "ccds" / f"{GOOD}.fits")
    comp = Table.read(res["out"] / "ccds" / "compressed.fits")
    assert len(comp) == len(good)
    np.testing.assert_allclose(np.asarray(comp["flux"]), np.asarray(good["flux"]), rtol=1e-6)
    ints = Table.read(res["out"] / "ccds" / "int-image.fits")
    # rounding to whole ADU adds 1/12 ADU^2 of noise: the same transients, nearly the same scores
    real_a = set(np.asarray(good["truth_id"])[np.asarray(good["score"]) >= 0.5])
    real_b = set(np.asarray(ints["truth_id"])[np.asarray(ints["score"]) >= 0.5])
    assert len(real_a ^ real_b) <= 2
