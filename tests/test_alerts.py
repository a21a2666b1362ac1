"""Alert packets (ZTF / Rubin layout) -> model stamps -> ``pipeline score-alerts``.

The packets are written here with fastavro, with cutouts made here: gzipped FITS for ZTF (63 x 63
and 45 x 45, blank -3.4e38 edges, a negative-difference alert shipped as reference - science, the
way ZTF ships them) and plain FITS with a WCS for Rubin (30 x 30, even).
"""

from __future__ import annotations

import argparse
import gzip
import io
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

fastavro = pytest.importorskip("fastavro")

from classifier.data import CHANNELS  # noqa: E402
from pipeline.alerts import (  # noqa: E402
    AlertError,
    AlertStampConfig,
    alert_stamps,
    clean_blanks,
    cutout_centre,
    fit_stamp,
    read_alert_file,
)
from pipeline.commands import score_alerts  # noqa: E402

BLANK = np.float32(-3.4e38)
SKY, NOISE, FWHM = 300.0, 10.0, 4.0
T, S, D = (CHANNELS.index(c) for c in ("template", "search", "difference"))

# --------------------------------------------------------------------------- packet makers

CUTOUT = {"type": "record", "name": "cutout", "namespace": "ztf.alert",
          "fields": [{"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}]}
ZTF_SCHEMA = {
    "type": "record", "name": "alert", "namespace": "ztf",
    "fields": [
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {"name": "candidate", "type": {"type": "record", "name": "candidate", "namespace": "ztf.alert", "fields": [
            {"name": "candid", "type": "long"},
            {"name": "isdiffpos", "type": "string"},
            {"name": "xpos", "type": ["null", "float"], "default": None},
            {"name": "ypos", "type": ["null", "float"], "default": None},
            {"name": "magpsf", "type": "float"},
            {"name": "rb", "type": ["null", "float"], "default": None},
            {"name": "drb", "type": ["null", "float"], "default": None}]}},
        {"name": "cutoutScience", "type": ["null", CUTOUT], "default": None},
        {"name": "cutoutTemplate", "type": ["null", "ztf.alert.cutout"], "default": None},
        {"name": "cutoutDifference", "type": ["null", "ztf.alert.cutout"], "default": None},
    ],
}
RUBIN_SCHEMA = {
    "type": "record", "name": "alert", "namespace": "lsst.test",
    "fields": [
        {"name": "diaSourceId", "type": "long"},
        {"name": "diaSource", "type": {"type": "record", "name": "diaSource", "fields": [
            {"name": "diaSourceId", "type": "long"},
            {"name": "diaObjectId", "type": ["null", "long"], "default": None},
            {"name": "ra", "type": "double"},
            {"name": "dec", "type": "double"},
            {"name": "psfFlux", "type": ["null", "float"], "default": None},
            {"name": "isNegative", "type": ["null", "boolean"], "default": None},
            {"name": "reliability", "type": ["null", "float"], "default": None}]}},
        {"name": "cutoutDifference", "type": ["null", "bytes"], "default": None},
        {"name": "cutoutScience", "type": ["null", "bytes"], "default": None},
        {"name": "cutoutTemplate", "type": ["null", "bytes"], "default": None},
    ],
}


def gauss(shape, y0, x0, flux, fwhm=FWHM):
    """A circular Gaussian of total ``flux`` at (y0, x0)."""
    s = fwhm / 2.3548
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return flux * np.exp(-0.5 * ((yy - y0) ** 2 + (xx - x0) ** 2) / s ** 2) / (2 * np.pi * s ** 2)


def noise(rng, shape, sky=SKY):
    return sky + NOISE * rng.standard_normal(shape)


def fits_bytes(img, header=None, gz=True):
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(img, np.float32), header=header).writeto(buf)
    return gzip.compress(buf.getvalue()) if gz else buf.getvalue()


def ztf_record(candid, sci, ref, diff, isdiffpos="t", rb=0.9, drb=0.95, xpos=1000.0, ypos=1000.0, mag=17.0):
    tag = "refmsci" if isdiffpos in ("f", "0") else "scimref"
    return {
        "objectId": f"ZTF24test{candid}", "candid": candid,
        "candidate": {"candid": candid, "isdiffpos": isdiffpos, "xpos": xpos, "ypos": ypos, "magpsf": mag,
                      "rb": rb, "drb": drb},
        "cutoutScience": {"fileName": f"candid{candid}_sci.fits.gz", "stampData": fits_bytes(sci)},
        "cutoutTemplate": {"fileName": f"candid{candid}_ref.fits.gz", "stampData": fits_bytes(ref)},
        "cutoutDifference": {"fileName": f"candid{candid}_targ_{tag}.fits.gz", "stampData": fits_bytes(diff)},
    }


def write_avro(path, schema, records):
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records)
    return path


def ztf_alerts(seed=1):
    """Five ZTF alerts: (records, what each one is)."""
    rng = np.random.default_rng(seed)
    flux = 20000.0  # S/N ~ 280 for FWHM 4 px and noise 10
    recs = []
    # 1: 63 x 63, real positive transient at (31, 31), 10 blank columns on the left of every cutout
    n = 63
    src = gauss((n, n), 31, 31, flux)
    sci, ref = noise(rng, (n, n)) + src, noise(rng, (n, n))
    diff = sci - ref
    for img in (sci, ref, diff):
        img[:, :10] = BLANK
    recs.append(ztf_record(101, sci, ref, diff, "t", rb=0.9, drb=0.99))
    # 2: 45 x 45, real positive transient at (22, 22)
    n = 45
    src = gauss((n, n), 22, 22, flux)
    sci, ref = noise(rng, (n, n)) + src, noise(rng, (n, n))
    recs.append(ztf_record(102, sci, ref, sci - ref, "t", rb=0.8, drb=0.9))
    # 3: 63 x 63, negative: the source faded (in the reference, not in the science image); ZTF ships
    #    the reference - science difference, in which it is positive
    n = 63
    src = gauss((n, n), 31, 31, flux)
    sci, ref = noise(rng, (n, n)), noise(rng, (n, n)) + src
    recs.append(ztf_record(103, sci, ref, ref - sci, "f", rb=0.7, drb=0.8))
    # 4: 63 x 63 noise only: nothing there
    sci, ref = noise(rng, (n, n)), noise(rng, (n, n))
    recs.append(ztf_record(104, sci, ref, sci - ref, "t", rb=0.1, drb=0.05))
    # 5: 63 x 47 cut by the quadrant's high-x edge (xpos 3060 of 3072): candidate at column 31
    src = gauss((63, 47), 31, 31, flux)
    sci, ref = noise(rng, (63, 47)) + src, noise(rng, (63, 47))
    recs.append(ztf_record(105, sci, ref, sci - ref, "t", rb=0.6, drb=None, xpos=3060.0, ypos=500.0))
    return recs


def rubin_header(ra, dec, crpix):
    h = fits.Header()
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CD1_1"], h["CD2_2"] = -0.2 / 3600, 0.2 / 3600
    h["BUNIT"] = "nJy"
    return h


def rubin_records(seed=2):
    """Two Rubin alerts on 30 x 30 cutouts, the source at 0-based (row 14, col 15): positive, negative."""
    rng = np.random.default_rng(seed)
    ra, dec = 150.0, 2.0
    header = rubin_header(ra, dec, (16.0, 15.0))  # 1-based x, y
    src = gauss((30, 30), 14, 15, 20000.0)
    out = []
    for k, negative in enumerate((False, True)):
        sci, ref = noise(rng, (30, 30), 0.0), noise(rng, (30, 30), 0.0)
        if negative:
            ref = ref + src
        else:
            sci = sci + src
        diff = sci - ref
        diff[0, :] = np.nan
        out.append({
            "diaSourceId": 9000 + k,
            "diaSource": {"diaSourceId": 9000 + k, "diaObjectId": 77, "ra": ra, "dec": dec,
                          "psfFlux": -5000.0 if negative else 5000.0, "isNegative": negative,
                          "reliability": 0.9},
            "cutoutDifference": fits_bytes(diff, header, gz=False),
            "cutoutScience": fits_bytes(sci, header, gz=False),
            "cutoutTemplate": fits_bytes(ref, header, gz=False),
        })
    return out


def run_command(argv):
    parser = argparse.ArgumentParser()
    score_alerts.add_arguments(parser)
    return score_alerts.main(parser.parse_args([str(a) for a in argv]))


# --------------------------------------------------------------------------- pure functions


def test_clean_blanks():
    a = np.array([[1.0, -3.4e38, np.inf], [np.nan, -1e31, 5.0]], np.float64)
    out = clean_blanks(a)
    assert out.dtype == np.float32
    assert np.array_equal(np.isnan(out), [[False, True, True], [True, True, False]])
    assert out[0, 0] == 1.0 and out[1, 2] == 5.0
    assert np.isnan(clean_blanks(np.array([3e30]))[0])  # |value| >= 1e30 is blank either sign


@pytest.mark.parametrize("n", [63, 51, 45, 30, 31, 8])
def test_fit_stamp_centre_pixel(n):
    img = np.arange(n * n, dtype=np.float32).reshape(n, n)
    c = cutout_centre((n, n))
    assert c == (n // 2, n // 2)
    st = fit_stamp(img, c)
    assert st.shape == (51, 51)
    assert st[25, 25] == img[n // 2, n // 2]  # the alert pixel lands on the stamp centre
    # neighbours keep their offsets (no resampling)
    assert st[25, 26] == img[n // 2, n // 2 + 1] and st[24, 25] == img[n // 2 - 1, n // 2]
    finite = np.isfinite(st)
    if n >= 51:  # cropped: every pixel from the image
        assert finite.all()
    else:  # padded: exactly the image's pixels, NaN elsewhere
        assert finite.sum() == n * n
        rows = np.flatnonzero(finite.any(axis=1))
        assert rows[0] == 25 - n // 2 and rows[-1] == 25 + (n - 1 - n // 2)


def test_fit_stamp_off_centre_and_no_overlap():
    img = np.arange(63 * 63, dtype=np.float32).reshape(63, 63)
    st = fit_stamp(img, (5, 60))  # near the corner: crop and pad at once
    assert st[25, 25] == img[5, 60]
    assert np.isnan(st[:20]).all() and np.isfinite(st[20:, :28]).all() and np.isnan(st[:, 28:]).all()
    assert st[25, 25 - 10] == img[5, 50]
    assert np.isnan(fit_stamp(img, (200, 200))).all()
    assert fit_stamp(img, (31.49, 30.5))[25, 25] == img[31, 31]  # nearest pixel, halves up
    with pytest.raises(ValueError, match="odd"):
        fit_stamp(img, (31, 31), size=50)


def test_cutout_centre_at_ccd_edges():
    # full cutout: geometric centre; a cut-short axis: the side lost is told by the position
    quad = (3080, 3072)
    assert cutout_centre((63, 63), (1000.0, 1000.0), 63, quad) == (31, 31)
    assert cutout_centre((63, 47), (500.0, 3060.0), 63, quad) == (31, 31)  # high-x side lost
    assert cutout_centre((57, 63), (26.2, 900.0), 63, quad) == (25, 31)  # low-y side lost: ypos 26.2 -> row 25
    assert cutout_centre((53, 63), (3070.0, 900.0), 63, quad) == (31, 31)  # high-y side lost
    assert cutout_centre((45, 45), (1000.0, 1000.0), 63, quad) == (22, 22)  # small, not at an edge: centred
    assert cutout_centre((30, 30)) == (15, 15)  # even side: the upper middle pixel


# --------------------------------------------------------------------------- reading


def test_read_ztf_packet(tmp_path):
    path = write_avro(tmp_path / "ztf.avro", ZTF_SCHEMA, ztf_alerts())
    alerts, errors = read_alert_file(path)
    assert errors == []
    assert [a.candid for a in alerts] == [101, 102, 103, 104, 105]
    a = alerts[0]
    assert a.survey == "ztf" and a.object_id == "ZTF24test101" and a.dia_source_id is None
    assert math.isclose(a.rb, 0.9, rel_tol=1e-6) and math.isclose(a.drb, 0.99, rel_tol=1e-6)
    assert a.science.dtype == np.float32 and np.isnan(a.science[:, :10]).all() and np.isfinite(a.science[:, 10:]).all()
    assert a.shapes()["science"] == (63, 63) and alerts[1].shapes()["difference"] == (45, 45)
    neg = alerts[2]
    assert neg.negative and neg.template_minus_science and neg.isdiffpos == "f"
    assert not alerts[0].negative and not alerts[0].template_minus_science
    assert math.isnan(alerts[4].drb)
    assert alerts[1].centres["science"] == (22, 22) and alerts[1].notes == ()
    assert alerts[4].centres["science"] == (31, 31) and "cut short by the quadrant edge" in alerts[4].notes[0]


def test_stamps_geometry_nan_and_sign(tmp_path):
    alerts, _ = read_alert_file(write_avro(tmp_path / "ztf.avro", ZTF_SCHEMA, ztf_alerts()))
    st = alert_stamps(alerts)
    assert st.data.shape == (5, 3, 51, 51) and st.channels == CHANNELS
    for i in (0, 1, 4):  # the source peaks on the centre pixel of search and difference
        for ch in (S, D):
            img = np.nan_to_num(st.data[i, ch], nan=-np.inf)
            assert np.unravel_index(np.argmax(img), img.shape) == (25, 25), (i, ch)
    # 63 -> 51 crop keeps columns 6..56: blank columns 6..9 of the cutout are stamp columns 0..3
    assert np.isnan(st.data[0][:, :, :4]).all() and np.isfinite(st.data[0][:, :, 4:]).all()
    assert math.isclose(st.nan_fraction[0], 4 / 51, rel_tol=1e-6)
    # 45 -> 51 pad: a 3-pixel NaN border
    assert np.isnan(st.data[1][:, :3]).all() and np.isnan(st.data[1][:, :, -3:]).all()
    assert np.isfinite(st.data[1][:, 3:48, 3:48]).all()
    # 63 x 47 cut at the high-x edge: columns beyond the edge NaN
    assert np.isfinite(st.data[4][:, :, :25 + 16]).all() and np.isnan(st.data[4][:, :, 25 + 16:]).all()

    # negative alert, default "swap": search = the reference cutout, template = the science cutout,
    # difference = reference - science as delivered; the transient positive and search - template
    neg = alerts[2]
    assert st.swapped.tolist() == [False, False, True, False, False]
    assert st.diff_sign[2] == 1
    assert np.array_equal(st.data[2, S], fit_stamp(neg.template, (31, 31)))
    assert np.array_equal(st.data[2, T], fit_stamp(neg.science, (31, 31)))
    assert st.data[2, D, 25, 25] > 50 * NOISE
    np.testing.assert_allclose(st.data[2, D], st.data[2, S] - st.data[2, T], atol=1e-2)
    # "observed": images as observed, difference science - template: the transient negative (flipped)
    obs = alert_stamps(alerts, AlertStampConfig(negative="observed"))
    assert obs.diff_sign[2] == -1 and not obs.swapped.any()
    assert np.array_equal(obs.data[2, S], fit_stamp(neg.science, (31, 31)))
    assert obs.data[2, D, 25, 25] < -50 * NOISE
    np.testing.assert_allclose(obs.data[2, D], obs.data[2, S] - obs.data[2, T], atol=1e-2)
    # "positive": images as observed, difference oriented so that the transient is positive
    pos = alert_stamps(alerts, AlertStampConfig(negative="positive"))
    assert pos.diff_sign[2] == 1 and np.array_equal(pos.data[2, S], obs.data[2, S])
    assert pos.data[2, D, 25, 25] > 50 * NOISE
    # positive alerts are the same under every policy
    for other in (obs, pos):
        assert np.array_equal(np.delete(other.data, 2, 0), np.delete(st.data, 2, 0), equal_nan=True)


def test_rubin_packet_even_cutouts_wcs_centre_and_negative(tmp_path):
    alerts, errors = read_alert_file(write_avro(tmp_path / "rubin.avro", RUBIN_SCHEMA, rubin_records()))
    assert errors == []
    assert [(a.survey, a.dia_source_id, a.candid, a.object_id) for a in alerts] == \
        [("rubin", 9000, None, "77"), ("rubin", 9001, None, "77")]
    assert alerts[0].centres["difference"] == pytest.approx((14.0, 15.0), abs=1e-6)  # from the WCS
    assert math.isclose(alerts[0].reliability, 0.9, rel_tol=1e-6)
    assert not alerts[0].template_minus_science and alerts[1].negative
    st = alert_stamps(alerts)
    for i in (0, 1):
        for ch in (S, D):
            img = np.nan_to_num(st.data[i, ch], nan=-np.inf)
            assert np.unravel_index(np.argmax(img), img.shape) == (25, 25), (i, ch)
    # the source at (14, 15) of 30 x 30: rows 11..40, columns 10..39 of the stamp hold the cutout;
    # the difference's NaN first row stays NaN (stamp row 11)
    assert np.isfinite(st.data[0, S, 11:41, 10:40]).all() and np.isnan(st.data[0, S, :11]).all()
    assert np.isnan(st.data[0, D, 11]).all() and np.isfinite(st.data[0, D, 12:41, 10:40]).all()
    # Rubin negative: difference science - template (transient negative) -> swapped and negated
    assert st.swapped.tolist() == [False, True] and st.diff_sign.tolist() == [1, -1]


def test_bad_records_and_files_are_reported_not_fatal(tmp_path):
    recs = ztf_alerts()[:3]
    recs[1]["cutoutScience"]["stampData"] = b"\x1f\x8b this is not gzip"
    recs[2]["cutoutTemplate"]["stampData"] = gzip.compress(b"not a FITS file at all" * 200)
    alerts, errors = read_alert_file(write_avro(tmp_path / "mixed.avro", ZTF_SCHEMA, recs))
    assert [a.candid for a in alerts] == [101]
    assert len(errors) == 2
    assert "mixed.avro[record 1] (candid 102) cutoutScience" in str(errors[0]) and "gzip" in str(errors[0])
    assert "mixed.avro[record 2] (candid 103) cutoutTemplate" in str(errors[1]) and "FITS" in str(errors[1])
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"not avro")
    with pytest.raises(AlertError, match="junk.avro: not an Avro"):
        read_alert_file(junk)
    # a file cut short keeps the records before the damage
    good = write_avro(tmp_path / "good.avro", ZTF_SCHEMA, ztf_alerts())
    cut = tmp_path / "cut.avro"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) - 5000])
    alerts, errors = read_alert_file(cut)
    assert len(alerts) == 4 and len(errors) == 1 and "cut.avro: unreadable after record 3" in str(errors[0])


# --------------------------------------------------------------------------- the command


def test_score_alerts_command(tmp_path, capsys):
    ztf = write_avro(tmp_path / "ztf.avro", ZTF_SCHEMA, ztf_alerts())
    rubin = write_avro(tmp_path / "rubin.avro", RUBIN_SCHEMA, rubin_records())
    out = tmp_path / "scores.ecsv"
    assert run_command([ztf, rubin, "--out", out]) == 0
    t = Table.read(out, format="ascii.ecsv")
    assert len(t) == 7
    assert list(t["candid"][:5]) == [101, 102, 103, 104, 105] and t["candid"].mask[5:].all()
    assert list(t["diaSourceId"][5:]) == [9000, 9001] and t["diaSourceId"].mask[:5].all()
    assert list(t["objectId"][:2]) == ["ZTF24test101", "ZTF24test102"]
    assert list(t["isdiffpos"][:5]) == ["t", "t", "f", "t", "t"]
    assert list(t["size_science"]) == ["63x63", "45x45", "63x63", "63x63", "63x47", "30x30", "30x30"]
    assert list(t["swapped"]) == [False, False, True, False, False, False, True]
    assert list(t["diff_sign"]) == [1, 1, 1, 1, 1, 1, -1]
    np.testing.assert_allclose(t["drb"][:4], [0.99, 0.9, 0.8, 0.05], rtol=1e-6)
    assert np.isnan(t["drb"][4]) and np.isnan(t["rb"][5]) and math.isclose(t["reliability"][5], 0.9, rel_tol=1e-6)
    for col in ("score_triplet", "score_pair"):
        s = np.asarray(t[col])
        assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    # a bright point source on the centre scores far higher than pure noise for the triplet model
    # (shipped weights, seeds 0-4: >= 0.9998 for alerts 101, 102, 105; 0.49-0.72 for the noise
    # alert 104, which is unlike any training stamp: every simulated candidate is a detection)
    trip = np.asarray(t["score_triplet"])
    assert min(trip[[0, 1, 2, 4]]) > 0.99 and trip[3] < min(trip[[0, 1, 2, 4]]) - 0.2
    summary = capsys.readouterr().out
    assert "7 alerts from 2 file(s) (ZTF 5, Rubin 2); 0 unreadable" in summary and "2 negative" in summary


@pytest.mark.parametrize("suffix", [".fits", ".parquet", ".csv"])
def test_score_alerts_table_formats(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    ztf = write_avro(tmp_path / "ztf.avro", ZTF_SCHEMA, ztf_alerts()[:2])
    out = tmp_path / f"scores{suffix}"
    assert run_command([ztf, "--model", "triplet", "--out", out]) == 0
    t = Table.read(out, format="ascii.csv") if suffix == ".csv" else Table.read(out)
    assert len(t) == 2 and list(t["candid"]) == [101, 102] and "score_triplet" in t.colnames
    assert "score_pair" not in t.colnames


def test_score_alerts_reports_bad_records(tmp_path, capsys):
    recs = ztf_alerts()[:2]
    recs[0]["cutoutDifference"]["stampData"] = b"garbage"
    bad = write_avro(tmp_path / "bad.avro", ZTF_SCHEMA, recs)
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"\x00" * 10)
    out = tmp_path / "scores.ecsv"
    assert run_command([bad, junk, "--model", "pair", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "bad.avro[record 0] (candid 101) cutoutDifference" in err and "junk.avro: not an Avro" in err
    assert list(Table.read(out)["candid"]) == [102]
    # nothing readable: exit 2, no table
    out2 = tmp_path / "none.ecsv"
    assert run_command([junk, "--out", out2]) == 2 and not out2.exists()
    assert run_command([bad, "--out", tmp_path / "x.txt"]) == 2
    assert run_command([bad, "--model", "no-such-model"]) == 2
    # the dense map's detector reads the frames' sky units: cut-outs have no frame, so it is refused by name
    capsys.readouterr()
    assert run_command([bad, "--model", "pair-dense", "--out", tmp_path / "d.ecsv"]) == 2
    assert "'pair-dense' (pair-sky) reads stamps in the frames' sky units" in capsys.readouterr().err
