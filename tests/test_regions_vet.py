"""ds9 region files (pipeline.regions) and the HTML vetting page (pipeline.vet, ``pipeline vet``)."""

from __future__ import annotations

import argparse
import base64
import html.parser
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack

from pipeline.detect import CandidateFlags, CandidateTable
from pipeline.io import write_catalog

regions = pytest.importorskip("regions")

THRESHOLD = 0.5
#: ccd -> (id, x, y, score, flags, truth_kind) of the fake run's candidates
ROWS = {
    "ccdA": [(0, 30.0, 40.0, 0.95, 0, "transient"),
             (1, 60.25, 70.5, 0.60, int(CandidateFlags.DIPOLE | CandidateFlags.EDGE), "<b>galaxy</b>"),
             (2, 90.0, 10.0, 0.30, 0, ""),
             (3, 5.0, 5.0, 0.05, int(CandidateFlags.MASKED), "transient")],
    "ccdB": [(0, 12.0, 14.0, 0.90, 0, "transient"),
             (1, 40.0, 41.0, 0.10, 0, ""),
             (2, 77.0, 33.0, 0.80, 0, "galaxy")],
}
#: order of the stamps in ccdA's stamps file (not the catalog order: stamps are matched by id)
STAMP_IDS = [3, 1, 0, 2]


def _table(ccd, rows, with_mag=False):
    ids, x, y, score, flags, kind = (np.array(v) for v in zip(*rows))
    n = len(ids)
    cols = dict(ccd=[ccd] * n, id=ids, x=x, y=y, ra=10.0 + x / 3600, dec=-5.0 + y / 3600,
                flux=np.full(n, 100.0), flux_err=np.full(n, 10.0), snr=10.0 + 5 * ids, flags=flags,
                score=score, mode=["dia"] * n, model=["triplet"] * n, truth_id=np.arange(n),
                truth_kind=kind, truth_mag=np.full(n, 21.0), truth_sep=np.full(n, 0.1))
    if with_mag:
        cols.update(mag=20.0 + ids, mag_err=np.full(n, 0.05), mjd=np.full(n, 60000.5), band=["r"] * n)
    return CandidateTable.from_columns(**cols)


def _stamp_stack(cid):
    """(3, 51, 51) template/search/difference of candidate ``cid``: a Gaussian of amplitude 10 (cid + 1)."""
    rng = np.random.default_rng(100 + cid)
    yy, xx = np.mgrid[0:51, 0:51]
    blob = 10.0 * (cid + 1) * np.exp(-0.5 * ((xx - 25) ** 2 + (yy - 25) ** 2) / 2.0**2)
    noise = rng.normal(0, 1, (3, 51, 51))
    stack = np.stack([noise[0] + 100, blob + noise[1] + 100, blob + noise[2]]).astype(np.float32)
    if cid == 1:
        stack[0, :, :10] = np.nan  # template off the image on the left
    return stack


def write_stamps(path, ids, channels=("template", "search", "difference")):
    data = np.stack([_stamp_stack(i)[: len(channels)] for i in ids]).astype(np.float32)
    hdu = fits.ImageHDU(data, name="STAMPS")
    hdu.header["CHANNELS"] = ",".join(channels)
    table = fits.table_to_hdu(Table({"id": np.asarray(ids, np.int64)}))
    table.name = "IDS"
    fits.HDUList([fits.PrimaryHDU(), hdu, table]).writeto(path)


def make_run(root, with_mag=False, run_json=True):
    """A small fake ``pipeline run`` output folder; stamps for ccdA only."""
    (root / "ccds").mkdir(parents=True)
    tables = []
    for ccd, rows in ROWS.items():
        t = _table(ccd, rows, with_mag)
        write_catalog(t, root / "ccds" / f"{ccd}.fits")
        (root / "ccds" / f"{ccd}.json").write_text(json.dumps({"ccd": ccd, "status": "done"}))
        tables.append(t)
    write_catalog(vstack(tables), root / "candidates.fits")
    write_stamps(root / "ccds" / "ccdA_stamps.fits", STAMP_IDS)
    if run_json:
        record = {"started": "2026-01-02T03:04:05+00:00", "mode": "dia", "n_ccds": 2, "n_failed": 0,
                  "config": {"mode": "dia", "score_threshold": THRESHOLD},
                  "ccds": [{"ccd": c, "status": "done"} for c in ROWS]}
        (root / "run.json").write_text(json.dumps(record))
    return root


def run_vet(argv):
    from pipeline.commands import vet

    parser = argparse.ArgumentParser()
    vet.add_arguments(parser)
    return vet.main(parser.parse_args([str(a) for a in argv]))


class _Rows(html.parser.HTMLParser):
    """Rows of the candidate table: attributes, cell texts and image sources, in document order."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-id" in a:
            self.rows.append({"attrs": a, "cells": [], "imgs": []})
        elif self.rows and tag == "td":
            self._cell = []
            self.rows[-1]["cells"].append(self._cell)
        elif self.rows and tag == "img":
            self.rows[-1]["imgs"].append(a)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"][-1] = "".join(self._cell).strip()
            self._cell = None


def parse_rows(text):
    p = _Rows()
    p.feed(text)
    return p.rows


def _decode_png(src):
    from PIL import Image

    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


# ----------------------------------------------------------------------------- regions


def test_score_colour_bins():
    from pipeline.regions import score_colour

    assert [score_colour(s) for s in (0.0, 0.249, 0.25, 0.5, 0.74, 0.75, 1.0, -0.1)] == [
        "red", "red", "yellow", "cyan", "cyan", "green", "green", "red"]
    assert score_colour(float("nan")) == "white"


def test_regions_pixel_centres_are_one_based_in_file(tmp_path):
    from pipeline.regions import write_regions

    t = CandidateTable.from_columns(id=[7, 8, 9], x=[0.0, 10.0, 99.5], y=[0.0, 20.0, 5.25],
                                    score=[0.9, 0.3, np.nan])
    path = write_regions(t, tmp_path / "a.reg", threshold=THRESHOLD)
    text = path.read_text()
    circles = [line for line in text.splitlines() if line.startswith("circle(")]
    assert "image" in text.splitlines()
    # numpy (0, 0) is ds9 (1, 1)
    assert circles[0].startswith("circle(1.0000,1.0000,6.0000)")
    assert circles[1].startswith("circle(11.0000,21.0000,")
    assert circles[2].startswith("circle(100.5000,6.2500,")
    regs = regions.Regions.read(str(path), format="ds9")
    assert len(regs) == 3
    np.testing.assert_allclose([r.center.x for r in regs], t["x"])  # read back 0-based
    np.testing.assert_allclose([r.center.y for r in regs], t["y"])
    assert [r.visual["edgecolor"] for r in regs] == ["green", "yellow", "white"]
    assert [r.visual.get("linestyle", "solid") for r in regs] == ["solid", "dashed", "dashed"]
    assert [r.visual["linewidth"] for r in regs] == [2, 1, 1]
    assert [r.meta["text"] for r in regs] == ["7 0.900", "8 0.300", "9 -"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_regions_sky_variant_skips_missing_positions(tmp_path):
    from pipeline.regions import write_regions

    t = CandidateTable.from_columns(id=[0, 1, 2], x=[1.0, 2.0, 3.0], y=[1.0, 2.0, 3.0],
                                    ra=[150.1, np.nan, 150.3], dec=[2.2, 2.3, -2.4], score=[0.8, 0.8, 0.1])
    path = write_regions(t, tmp_path / "s.reg", threshold=THRESHOLD, frame="icrs")
    assert "icrs" in path.read_text().splitlines()
    regs = regions.Regions.read(str(path), format="ds9")
    assert len(regs) == 2
    np.testing.assert_allclose([r.center.ra.deg for r in regs], [150.1, 150.3])
    np.testing.assert_allclose([r.center.dec.deg for r in regs], [2.2, -2.4])
    np.testing.assert_allclose([r.radius.to_value("arcsec") for r in regs], 1.6, rtol=1e-6)
    assert [r.meta["text"] for r in regs] == ["0 0.800", "2 0.100"]
    with pytest.raises(ValueError, match="frame"):
        write_regions(t, tmp_path / "x.reg", threshold=0.5, frame="galactic")


def test_regions_empty_table(tmp_path):
    from pipeline.regions import write_regions

    path = write_regions(CandidateTable.empty(("id", "x", "y", "score")), tmp_path / "e.reg", threshold=0.5)
    assert len(regions.Regions.read(str(path), format="ds9")) == 0


@pytest.mark.parametrize("with_record", [True, False])
def test_write_run_regions(tmp_path, with_record):
    from pipeline.regions import write_run_regions

    run = make_run(tmp_path / "run", run_json=with_record)  # without run.json: CCDs from ccds/*.json
    written = write_run_regions(run, THRESHOLD)
    assert sorted(p.relative_to(run).as_posix() for p in written) == [
        "regions/ccdA.reg", "regions/ccdB.reg", "regions/sky/ccdA.reg", "regions/sky/ccdB.reg"]
    for ccd, rows in ROWS.items():
        regs = regions.Regions.read(str(run / "regions" / f"{ccd}.reg"), format="ds9")
        assert len(regs) == len(rows)
        np.testing.assert_allclose([(r.center.x, r.center.y) for r in regs], [(row[1], row[2]) for row in rows])
        sky = regions.Regions.read(str(run / "regions" / "sky" / f"{ccd}.reg"), format="ds9")
        assert len(sky) == len(rows)
    assert not list(run.rglob("*.tmp"))


def test_run_regions_from_the_merged_catalog_equal_those_from_the_ccd_catalogs(tmp_path):
    """The runner passes its in-memory merged catalog; the files are those read from ccds/<ccd>.fits."""
    from astropy.table import vstack

    from pipeline.io import read_catalog
    from pipeline.regions import write_run_regions

    run = make_run(tmp_path / "run")
    write_run_regions(run, THRESHOLD)
    from_disk = {p.relative_to(run): p.read_text() for p in (run / "regions").rglob("*.reg")}
    merged = vstack([read_catalog(run / "ccds" / f"{ccd}.fits") for ccd in ROWS])
    for p in (run / "regions").rglob("*.reg"):
        p.unlink()
    (run / "ccds" / "ccdA.fits").unlink()  # not read when the catalog is given
    write_run_regions(run, THRESHOLD, ccds=list(ROWS), catalog=merged)
    assert {p.relative_to(run): p.read_text() for p in (run / "regions").rglob("*.reg")} == from_disk


# ----------------------------------------------------------------------------- pictures


def test_grey_and_diverging_pictures():
    from pipeline.vet import NAN_RGB, NEGATIVE_RGB, POSITIVE_RGB, diverging_rgb, grey_rgb

    rng = np.random.default_rng(3)
    d = rng.normal(0, 1, (51, 51))
    d[10, 10], d[30, 40], d[0, 0] = 40.0, -40.0, np.nan
    rgb = diverging_rgb(d)
    assert rgb.shape == (51, 51, 3) and rgb.dtype == np.uint8
    flip = 50  # row y is drawn at 50 - y (y up)
    assert tuple(rgb[flip - 0, 0]) == NAN_RGB
    assert tuple(rgb[flip - 10, 10]) == POSITIVE_RGB  # beyond the limit: the end colours
    assert tuple(rgb[flip - 30, 40]) == NEGATIVE_RGB
    # symmetric: +v and -v equally far from white along their own colour
    d2 = rng.normal(0, 2, (51, 51))  # the scatter sets the scale
    d2[20, 20], d2[21, 21], d2[30, 30] = 3.0, -3.0, 0.0
    rgb2 = diverging_rgb(d2).astype(float)
    white = np.full(3, 255.0)
    frac_pos = (white - rgb2[flip - 20, 20]) / (white - np.asarray(POSITIVE_RGB))
    frac_neg = (white - rgb2[flip - 21, 21]) / (white - np.asarray(NEGATIVE_RGB))
    assert 0.1 < frac_pos.mean() < 1 and abs(frac_pos.mean() - frac_neg.mean()) < 0.02
    assert tuple(rgb2[flip - 30, 30]) == (255, 255, 255)  # zero is white

    g = rng.normal(100, 1, (51, 51))
    g[25, 25], g[5, 6] = 130.0, np.nan
    grey = grey_rgb(g)
    assert tuple(grey[flip - 5, 6]) == NAN_RGB
    assert grey[flip - 25, 25, 0] == 255 and grey[flip - 25, 25, 0] > np.median(grey[..., 0])
    good = np.isfinite(np.flipud(g))
    assert (grey[..., 0] == grey[..., 1])[good].all() and (grey[..., 1] == grey[..., 2])[good].all()
    blank = grey_rgb(np.full((51, 51), np.nan))
    assert (blank == NAN_RGB).all()


def test_flag_names():
    from pipeline.vet import flag_names

    assert flag_names(0) == []
    assert flag_names(int(CandidateFlags.DIPOLE | CandidateFlags.EDGE)) == ["DIPOLE", "EDGE"]
    assert flag_names(1 << 20) == ["bit20"]


# ----------------------------------------------------------------------------- the page


def test_vet_page(tmp_path, capsys):
    from pipeline.vet import stamp_rgb

    run = make_run(tmp_path / "run")
    assert run_vet([run]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 candidates with score >= 0.5" in out and "2 without stamps" in out
    text = (run / "vet.html").read_text()
    # self-contained: no URL to anything outside the file
    assert "http://" not in text and "https://" not in text and 'src="//' not in text
    assert "<link" not in text and "<script src" not in text
    rows = parse_rows(text)
    assert [(r["attrs"]["data-ccd"], r["attrs"]["data-id"]) for r in rows] == [
        ("ccdA", "0"), ("ccdB", "0"), ("ccdB", "2"), ("ccdA", "1")]  # score order
    head = ["stamps", "ccd", "id", "x", "y", "ra", "dec", "score", "mag", "snr", "flags", "band", "mjd"]
    by = {(r["attrs"]["data-ccd"], r["attrs"]["data-id"]): dict(zip(head, r["cells"])) | r for r in rows}
    # stamps matched by id, not by row: the embedded pictures are those of the right stamps
    for cid in (0, 1):
        row = by[("ccdA", str(cid))]
        assert [i["alt"] for i in row["imgs"]] == ["template stamp", "search stamp", "difference stamp"]
        stack = _stamp_stack(cid)
        for img, plane, channel in zip(row["imgs"], stack, ("template", "search", "difference")):
            np.testing.assert_array_equal(_decode_png(img["src"]), stamp_rgb(plane, channel))
    assert by[("ccdA", "1")]["flags"] == "DIPOLE EDGE" and by[("ccdA", "1")]["attrs"]["data-flags"] == "DIPOLE EDGE"
    assert by[("ccdA", "0")]["flags"] == "-"
    for key in (("ccdB", "0"), ("ccdB", "2")):
        assert by[key]["imgs"] == [] and by[key]["stamps"] == "no stamps"
    assert by[("ccdA", "0")]["mag"] == "-" and by[("ccdA", "0")]["band"] == "-" and by[("ccdA", "0")]["mjd"] == "-"
    assert by[("ccdA", "0")]["x"] == "30.00" and by[("ccdA", "1")]["y"] == "70.50"
    assert by[("ccdA", "0")]["score"] == "0.9500"
    # text is escaped
    assert "<b>galaxy</b>" not in text and "&lt;b&gt;galaxy&lt;/b&gt;" in text
    assert by[("ccdA", "1")]["cells"][13] == "<b>galaxy</b>"  # the parser unescapes it back
    assert "mode</b>: dia" in text and "2026-01-02T03:04:05" in text and "score threshold</b>: 0.5" in text


def test_vet_threshold_max_and_magnitudes(tmp_path):
    run = make_run(tmp_path / "run", with_mag=True)
    assert run_vet([run, "--threshold", "0.2", "--out", tmp_path / "low.html"]) == 0
    rows = parse_rows((tmp_path / "low.html").read_text())
    assert len(rows) == 5 and rows[-1]["attrs"]["data-score"] == "0.30000001192092896"
    assert run_vet([run, "--max", "2", "--out", tmp_path / "two.html"]) == 0
    text = (tmp_path / "two.html").read_text()
    rows = parse_rows(text)
    assert [r["attrs"]["data-id"] for r in rows] == ["0", "0"] and "the 2 highest scores" in text
    row = rows[0]
    assert row["cells"][8] == "20.000 \u00b1 0.050" and row["cells"][11] == "r" and row["cells"][12] == "60000.50000"


def test_vet_not_a_run_folder(tmp_path, capsys):
    assert run_vet([tmp_path]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "run.json" in err
    assert run_vet([tmp_path / "nowhere"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_vet_bad_stamps_file_is_a_placeholder(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    path = run / "ccds" / "ccdA_stamps.fits"
    with fits.open(path) as hdul:  # IDS one row short of STAMPS
        ids = fits.BinTableHDU(Table({"id": np.array(STAMP_IDS[:-1], np.int64)}), name="IDS")
        fits.HDUList([fits.PrimaryHDU(), hdul["STAMPS"].copy(), ids]).writeto(path, overwrite=True)
    assert run_vet([run]) == 0
    captured = capsys.readouterr()
    assert "ccdA: stamps not shown" in captured.err and "stamps of shape (4, 3, 51, 51) but 3 ids" in captured.err
    rows = parse_rows((run / "vet.html").read_text())
    assert len(rows) == 4 and all(r["imgs"] == [] for r in rows)
    assert "no stamps (unreadable file)" in [r["cells"][0] for r in rows]


# ----------------------------------------------------------------------------- headless browser


def _chromium():
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome", "headless_shell"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _browser(binary, profile, *args):
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_vet_page_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium) to render the page")
    run = make_run(tmp_path / "run")
    assert run_vet([run]) == 0
    url = (run / "vet.html").resolve().as_uri()

    def dom(fragment=""):
        res = _browser(binary, tmp_path / "profile", "--dump-dom", url + fragment)
        assert "<body" in res.stdout, res.stderr[-2000:]
        body = res.stdout[res.stdout.index("<body"):]
        assert 'data-ready="1"' in body[:300], "the page's script did not run"
        shown = int(body[: body.index(">")].split('data-shown="')[1].split('"')[0])
        rows = parse_rows(res.stdout)
        visible = [(r["attrs"]["data-ccd"], r["attrs"]["data-id"]) for r in rows
                   if "hidden" not in r["attrs"].get("class", "")]
        assert len(visible) == shown
        return visible, body

    visible, body = dom()
    assert visible == [("ccdA", "0"), ("ccdB", "0"), ("ccdB", "2"), ("ccdA", "1")]
    assert 'data-sort="score:desc"' in body[:300]
    visible, body = dom("#sort=score&dir=asc")
    assert visible == [("ccdA", "1"), ("ccdB", "2"), ("ccdB", "0"), ("ccdA", "0")]
    assert 'data-sort="score:asc"' in body[:300]
    # snr 20, 15, 10, 10: ties keep the previous (score) order, Array.prototype.sort being stable
    assert dom("#sort=snr")[0] == [("ccdB", "2"), ("ccdA", "1"), ("ccdA", "0"), ("ccdB", "0")]
    assert dom("#sort=snr&dir=asc")[0] == [("ccdA", "0"), ("ccdB", "0"), ("ccdA", "1"), ("ccdB", "2")]
    assert dom("#sort=ccd")[0] == [("ccdA", "0"), ("ccdA", "1"), ("ccdB", "0"), ("ccdB", "2")]
    assert dom("#minscore=0.85")[0] == [("ccdA", "0"), ("ccdB", "0")]
    assert dom("#ccd=ccdB")[0] == [("ccdB", "0"), ("ccdB", "2")]
    assert dom("#flag=has:DIPOLE")[0] == [("ccdA", "1")]
    assert dom("#flag=none&kind=transient")[0] == [("ccdA", "0"), ("ccdB", "0")]
    assert dom("#q=edge")[0] == [("ccdA", "1")]

    shot = tmp_path / "shot.png"
    res = _browser(binary, tmp_path / "profile", "--hide-scrollbars", "--window-size=1200,900",
                   f"--screenshot={shot}", url)
    assert shot.exists(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (900, 1200, 3)
    # the stamps are drawn: the difference scale's red appears on the screen
    red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() > 50


def test_vet_direct_mode_two_channels(tmp_path):
    from pipeline.vet import grey_rgb

    run = make_run(tmp_path / "run")
    path = run / "ccds" / "ccdA_stamps.fits"
    path.unlink()
    write_stamps(path, STAMP_IDS, channels=("template", "search"))
    assert run_vet([run]) == 0
    rows = parse_rows((run / "vet.html").read_text())
    row = [r for r in rows if (r["attrs"]["data-ccd"], r["attrs"]["data-id"]) == ("ccdA", "0")][0]
    assert [i["alt"] for i in row["imgs"]] == ["template stamp", "search stamp"]
    np.testing.assert_array_equal(_decode_png(row["imgs"][1]["src"]), grey_rgb(_stamp_stack(0)[1]))
