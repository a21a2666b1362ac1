"""What a survey scientist gets from ``pipeline run``: catalogs with magnitudes, epochs, bands, named
flag bits, units and descriptions (FITS and Parquet), provenance and inputs; and the stamps files
the vetting page reads.

Checked against the simulator's truth (injected magnitudes), the search exposures' headers and
the shipped weights file, on the two small simulated CCDs of ``conftest.sim_field``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.cluster import SchedulerConfig
from pipeline.config import RunConfig
from pipeline.detect import CANDIDATE_COLUMNS, FLAG_DESCRIPTIONS, CandidateFlags, CandidateTable, flag_bits
from pipeline.graph import ccd_paths, collect_catalog
from pipeline.io import (
    Exposure,
    InputError,
    PairEntry,
    check_ccd_ids,
    inputs_table,
    read_catalog,
    read_exposure,
    read_manifest,
    read_stamps,
    write_catalog,
)
from pipeline.runner import run_pipeline
from pipeline.stamps import STAMP_SIZE, cut_stamps, ring_background
from pipeline.steps import finalize_candidates, magnitudes

THREADS = SchedulerConfig(kind="threads", workers=2)
WEIGHTS = Path(__file__).resolve().parents[1] / "classifier" / "weights"


def _run(entries, out, mode, **config):
    result = run_pipeline(entries, RunConfig(mode=mode, **config), out, THREADS, progress=False)
    assert result.exit_status == 0, [r.get("error") for r in result.records]
    return result


@pytest.fixture(scope="module")
def dia_out(sim_field, tmp_path_factory):
    """A dia run of the two simulated CCDs that keeps its difference images."""
    out = tmp_path_factory.mktemp("catalog-dia")
    _run(read_manifest(sim_field), out, "dia", save_diff=True)
    return out


@pytest.fixture(scope="module")
def direct_out(sim_field, tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog-direct")
    _run(read_manifest(sim_field), out, "direct")
    return out


def _outputs(request, mode):
    return request.getfixturevalue(f"{mode}_out")


def _catalogs(out: Path) -> dict[str, Path]:
    return {"merged": out / "candidates.fits", "ccd00": out / "ccds" / "ccd00.fits",
            "ccd01": out / "ccds" / "ccd01.fits"}


# ----------------------------------------------------------------------------- magnitudes, epoch, band


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_magnitudes_agree_with_the_injected_transients(mode, request):
    cat = read_catalog(_outputs(request, mode) / "candidates.fits")
    real = np.asarray(cat["truth_kind"]).astype(str) == "transient"
    assert real.sum() >= 20
    mag, err, truth = (np.asarray(cat[c], float)[real] for c in ("mag", "mag_err", "truth_mag"))
    assert np.isfinite(mag).all() and (err > 0).all()
    pull = (mag - truth) / err
    # the catalog's magnitude is the injected one within its own error bar
    assert np.abs(pull).max() < 5, np.sort(pull)
    assert np.mean(np.abs(pull) < 3) >= 0.9, np.sort(pull)
    assert abs(np.median(mag - truth)) < 0.05
    # and it is MAGZERO - 2.5 log10(flux), mag_err = 2.5 / ln 10 * flux_err / flux, on the search zero point
    for ccd in ("ccd00", "ccd01"):
        rows = np.asarray(cat["ccd"]).astype(str) == ccd
        zp = fits.getheader(request.getfixturevalue("sim_field").parent / f"{ccd}_search.fits", "IMAGE")["MAGZERO"]
        flux, flux_err = np.asarray(cat["flux"])[rows], np.asarray(cat["flux_err"])[rows]
        pos = flux > 0
        np.testing.assert_allclose(np.asarray(cat["mag"])[rows][pos], zp - 2.5 * np.log10(flux[pos]), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(cat["mag_err"])[rows][pos],
                                   2.5 / np.log(10.0) * flux_err[pos] / flux[pos], rtol=1e-12)
        assert np.isnan(np.asarray(cat["mag"])[rows][~pos]).all()


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_mjd_and_band_are_the_search_exposures(mode, request, sim_field):
    out = _outputs(request, mode)
    merged = read_catalog(out / "candidates.fits")
    mjds = {}
    for ccd in ("ccd00", "ccd01"):
        search = fits.getheader(sim_field.parent / f"{ccd}_search.fits", "IMAGE")
        template = fits.getheader(sim_field.parent / f"{ccd}_template.fits", "IMAGE")
        assert template["MJD-OBS"] < search["MJD-OBS"]  # the template is older
        cat = read_catalog(out / "ccds" / f"{ccd}.fits")
        assert len(cat) > 0
        assert (np.asarray(cat["mjd"]) == search["MJD-OBS"]).all()
        assert set(np.asarray(cat["band"]).astype(str)) == {search["BAND"]} == {"r"}
        rows = np.asarray(merged["ccd"]).astype(str) == ccd
        assert (np.asarray(merged["mjd"])[rows] == search["MJD-OBS"]).all()
        mjds[ccd] = search["MJD-OBS"]
    assert mjds["ccd00"] != mjds["ccd01"]  # per CCD, not one value for the run


def test_the_simulator_dates_its_exposures_and_states_an_ab_zero_point(sim_field):
    from astropy.time import Time

    for ccd in ("ccd00", "ccd01"):
        for role in ("search", "template"):
            path = sim_field.parent / f"{ccd}_{role}.fits"
            for hdu in ("PRIMARY", "IMAGE"):
                hdr = fits.getheader(path, hdu)
                assert hdr["MAGSYS"] == "AB" and "EXPTIME" in hdr
                assert Time(hdr["DATE-OBS"], format="isot", scale="utc").mjd == pytest.approx(hdr["MJD-OBS"],
                                                                                             abs=1e-8)
            exposure = read_exposure(path)
            assert exposure.mag_system == "AB" and exposure.mjd == fits.getheader(path, "IMAGE")["MJD-OBS"]


def test_epoch_from_date_obs_or_nan_with_one_warning_per_ccd(caplog):
    from astropy.wcs import WCS

    from pipeline.io import observation_mjd

    assert observation_mjd(fits.Header({"MJD-OBS": 60000.25, "DATE-OBS": "1999-01-01"})) == (60000.25, "MJD-OBS")
    mjd, source = observation_mjd(fits.Header({"DATE-OBS": "2023-02-25T06:00:00"}))
    assert mjd == pytest.approx(60000.25, abs=1e-9) and source.startswith("DATE-OBS")
    assert observation_mjd(fits.Header({"DATE-OBS": "2023-02-25", "TIME-OBS": "18:00:00"}))[0] == \
        pytest.approx(60000.75, abs=1e-9)
    assert math.isnan(observation_mjd(fits.Header({"DATE-OBS": "not a date"}))[0])
    assert math.isnan(observation_mjd(fits.Header())[0])

    def exposure(**kw):
        shape = (STAMP_SIZE, STAMP_SIZE)
        return Exposure(np.zeros(shape, np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int32),
                        WCS(naxis=2), name="s.fits[1]", **kw)

    table = CandidateTable.from_columns(ccd=["c1"] * 3, id=[0, 1, 2], x=[1.0, 2, 3], y=[1.0, 2, 3],
                                        flux=[100.0, 0.0, -5.0], flux_err=[10.0, 10, 10], snr=[10.0, 0, -0.5])
    table.meta["NOISESCL"] = 1.25
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = finalize_candidates(table, np.zeros(3), RunConfig(), None,
                                  search=exposure(zero_point=30.0, band="g", mag_system="AB"))
    assert np.isnan(out["mjd"]).all() and list(out["band"]) == ["g"] * 3
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "c1" in caplog.records[0].message
    assert out["mag"][0] == pytest.approx(25.0) and out["mag_err"][0] == pytest.approx(2.5 / np.log(10) * 0.1)
    assert np.isnan(out["mag"][1:]).all() and np.isnan(out["mag_err"][1:]).all()  # flux <= 0
    assert out.meta["MAGSYS"] == "AB" and "NOISESCL" not in out.meta
    assert out["noise_scale"].dtype == np.float32 and (out["noise_scale"] == np.float32(1.25)).all()
    # a zero point read_exposure made up (no keyword) gives no magnitudes
    unknown = exposure(zero_point=25.0, mjd=60000.0, provenance={"zero_point": "default 25.0 (no MAGZERO keyword)"})
    out = finalize_candidates(table, np.zeros(3), RunConfig(), None, search=unknown)
    assert np.isnan(out["mag"]).all() and out.meta["MAGSYS"] == "NONE" and (out["mjd"] == 60000.0).all()


def test_magnitudes_function():
    mag, err = magnitudes([1000.0, 0.0, -1.0, np.nan, 1.0], [10.0, 1, 1, 1, np.nan], 27.5)
    assert mag[0] == pytest.approx(20.0) and err[0] == pytest.approx(0.010857362, rel=1e-6)
    assert np.isnan(mag[1:4]).all() and np.isnan(err[1:4]).all() and mag[4] == 27.5 and np.isnan(err[4])
    assert np.isnan(magnitudes([1000.0], [1.0], float("nan"))[0]).all()


# ----------------------------------------------------------------------------- headers


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_catalog_headers_name_flags_provenance_and_inputs(mode, request, sim_field):
    out = _outputs(request, mode)
    run = json.loads((out / "run.json").read_text())
    model = run["config"]["model_dia" if mode == "dia" else "model_direct"]
    sha = hashlib.sha256((WEIGHTS / f"{model}.pt").read_bytes()).hexdigest()
    assert run["weights"]["sha256"] == sha
    entries = {e.ccd: e for e in read_manifest(sim_field)}
    for name, path in _catalogs(out).items():
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "CANDIDATES", "INPUTS"], name
            prov, cand = hdul[0].header, hdul["CANDIDATES"].header
            assert prov["SOFTVERS"] == version("transient-pipeline")
            assert prov["MODE"] == mode and prov["MODEL"] == model
            assert prov["WGTSHA"] == sha and prov["CFGHASH"] == run["config_hash"]
            assert prov["MANIFEST"] == str(sim_field.resolve())
            written = dt.datetime.fromisoformat(prov["DATE"]).replace(tzinfo=dt.timezone.utc)
            assert abs((dt.datetime.now(dt.timezone.utc) - written).total_seconds()) < 3600
            # one card per flag bit, generated from CandidateFlags, the meaning uncut in its comment
            flag_cards = {k: (cand[k], cand.comments[k]) for k in cand if k.startswith("FLAG")}
            assert flag_cards == {f"FLAG{int(f).bit_length() - 1}": (f.name, FLAG_DESCRIPTIONS[f.name])
                                  for f in CandidateFlags}
            assert cand["MAGSYS"] == "AB"
            assert "NOISESCL" not in cand
            inputs = Table(hdul["INPUTS"].data)
            ccds = ["ccd00", "ccd01"] if name == "merged" else [name]
            assert list(np.asarray(inputs["ccd"]).astype(str)) == ccds
            for row in inputs:
                e = entries[str(row["ccd"])]
                assert (str(row["search"]), str(row["template"])) == (str(e.search), str(e.template))
                assert (str(row["search_hdu"]).strip(), str(row["template_hdu"]).strip()) == ("", "")
        table, inputs = read_catalog(path, with_inputs=True)
        assert len(table) > 0 and len(inputs) == len(ccds)


def test_flag_bits_list_every_flag_once():
    rows = flag_bits()
    assert [(1 << bit, name) for bit, name, _ in rows] == [(int(f), f.name) for f in CandidateFlags]
    assert all(0 < len(desc) <= 47 for _, _, desc in rows)


# ----------------------------------------------------------------------------- columns: units, descriptions


def _expected_meta(name):
    _, unit, desc = CANDIDATE_COLUMNS[name]
    return (unit or None), desc


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_units_and_descriptions_survive_fits_and_parquet(mode, request):
    out = _outputs(request, mode)
    fits_cat = read_catalog(out / "candidates.fits")
    parquet = Table.read(out / "candidates.parquet")
    assert fits_cat.colnames == parquet.colnames
    for col in ("mag", "mag_err", "mjd", "band", "noise_scale", "truth_mag", "truth_sep", "x", "flux", "flags"):
        assert col in fits_cat.colnames
    for table in (fits_cat, parquet, read_catalog(out / "ccds" / "ccd00.fits")):
        for name in table.colnames:
            unit, desc = _expected_meta(name)
            got_unit = None if table[name].unit is None else table[name].unit.to_string()
            assert (got_unit, table[name].description) == (unit, desc), name
    assert str(fits_cat["truth_mag"].unit) == "mag" and str(fits_cat["truth_sep"].unit) == "pix"
    assert str(fits_cat["mjd"].unit) == "d"
    # truth_sep is the distance on the search grid from the candidate to its truth object
    truth = Table.read(request.getfixturevalue("sim_field").parent / "ccd00_truth.ecsv", format="ascii.ecsv")
    cat = read_catalog(out / "ccds" / "ccd00.fits")
    matched = np.asarray(cat["truth_id"]) >= 0
    tx = dict(zip(np.asarray(truth["id"]), np.asarray(truth["x"])))
    ty = dict(zip(np.asarray(truth["id"]), np.asarray(truth["y"])))
    ids = np.asarray(cat["truth_id"])[matched]
    sep = np.hypot(np.asarray(cat["x"])[matched] - [tx[i] for i in ids],
                   np.asarray(cat["y"])[matched] - [ty[i] for i in ids])
    np.testing.assert_allclose(np.asarray(cat["truth_sep"])[matched], sep, rtol=1e-9)
    # the Parquet file carries the magnitude system and the provenance too
    assert parquet.meta["MAGSYS"] == "AB" and parquet.meta["mode"] == mode


def test_noise_scale_is_a_per_row_column(dia_out, direct_out):
    run = json.loads((dia_out / "run.json").read_text())
    merged = read_catalog(dia_out / "candidates.fits")
    assert "NOISESCL" not in merged.meta
    assert (merged["noise_scale"].dtype.kind, merged["noise_scale"].dtype.itemsize) == ("f", 4)
    scales = {}
    for rec in run["ccds"]:
        ccd = rec["ccd"]
        rows = np.asarray(merged["noise_scale"])[np.asarray(merged["ccd"]).astype(str) == ccd]
        assert len(set(rows.tolist())) == 1
        assert rows[0] == pytest.approx(rec["decisions"]["detect"]["noise_scale"], abs=1e-4)
        per_ccd = read_catalog(dia_out / "ccds" / f"{ccd}.fits")
        assert (np.asarray(per_ccd["noise_scale"]) == rows[0]).all()
        scales[ccd] = rows[0]
    assert len(set(scales.values())) == 2, scales  # two CCDs, two values: none is lost in the merge
    assert (np.asarray(read_catalog(direct_out / "candidates.fits")["noise_scale"]) == 1).all()


# ----------------------------------------------------------------------------- stamps files


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_stamps_files_hold_the_scored_stamps_row_for_row(mode, request, sim_field):
    out = _outputs(request, mode)
    channels = ("template", "search", "difference") if mode == "dia" else ("template", "search")
    for ccd in ("ccd00", "ccd01"):
        cat = read_catalog(out / "ccds" / f"{ccd}.fits")
        path = out / "ccds" / f"{ccd}_stamps.fits"
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "STAMPS", "IDS"]
            assert hdul[0].data is None and hdul["STAMPS"].data.dtype == np.dtype(">f4")
            assert hdul["STAMPS"].header["CHANNELS"] == ",".join(channels)
            assert hdul["STAMPS"].header["BUNIT"] == "adu"
            assert hdul["IDS"].data["id"].dtype.kind == "i" and hdul["IDS"].data["id"].dtype.itemsize == 8
        data, ids, got_channels, _ = read_stamps(path)
        assert data.shape == (len(cat), len(channels), STAMP_SIZE, STAMP_SIZE) and got_channels == channels
        assert ids.tolist() == list(np.asarray(cat["id"]))
        # the centre pixel is the image pixel at the candidate's (x, y): the search channel less its stamp's
        # ring sky, the difference as it is
        search = read_exposure(sim_field.parent / f"{ccd}_search.fits")
        ny, nx = search.shape
        ix, iy = (np.rint(np.asarray(cat[c])).astype(int) for c in ("x", "y"))
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        raw = cut_stamps({"search": search.image}, {"search": search.mask}, cat["x"], cat["y"])
        expected = raw.data[:, 0, 25, 25] - ring_background(raw.data[:, :1])[:, 0]
        centre = data[:, 1, STAMP_SIZE // 2, STAMP_SIZE // 2]
        ok = inside & np.isfinite(centre)
        assert ok.sum() >= 0.9 * len(cat)
        np.testing.assert_array_equal(centre[ok], expected[ok].astype(np.float32))
        if mode == "dia":
            from dia.masks import MaskBits

            diff = fits.getdata(out / "diff" / f"{ccd}.fits", "IMAGE")
            no_data = (fits.getdata(out / "diff" / f"{ccd}.fits", "MASK") & int(MaskBits.NO_DATA)) != 0
            centre = data[:, 2, STAMP_SIZE // 2, STAMP_SIZE // 2]
            ok = inside & np.isfinite(centre)
            assert ok.sum() >= 0.5 * len(cat)
            np.testing.assert_array_equal(centre[ok], diff[iy[ok], ix[ok]])
            # NaN exactly where the difference has no data
            assert no_data[iy[inside & ~ok], ix[inside & ~ok]].all()
        # NaN where there are no data: a stamp hanging over the CCD border
        near = (ix < STAMP_SIZE // 2) | (iy < STAMP_SIZE // 2) | (ix >= nx - STAMP_SIZE // 2) | \
            (iy >= ny - STAMP_SIZE // 2)
        if near.any():
            assert np.isnan(data[near][:, 1]).any(axis=(1, 2)).all()


def test_a_missing_or_stale_stamps_file_redoes_the_ccd_and_save_stamps_off_removes_it(sim_field, direct_out,
                                                                                         tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(direct_out, out)
    entries = read_manifest(sim_field)
    (out / "ccds" / "ccd01_stamps.fits").unlink()
    result = run_pipeline(entries, RunConfig(mode="direct"), out, THREADS, resume=True, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert {r["ccd"]: r["resumed"] for r in result.records} == {"ccd00": True, "ccd01": False}
    assert "stamps file is missing" in run["resume"]["computed_again"]["ccd01"]
    data, ids, _, _ = read_stamps(out / "ccds" / "ccd01_stamps.fits")
    assert ids.tolist() == list(np.asarray(read_catalog(out / "ccds" / "ccd01.fits")["id"]))
    # a stamps file that does not match its catalog is redone too
    shutil.copy(out / "ccds" / "ccd00_stamps.fits", out / "ccds" / "ccd01_stamps.fits")
    result = run_pipeline(entries, RunConfig(mode="direct"), out, THREADS, resume=True, progress=False)
    assert {r["ccd"]: r["resumed"] for r in result.records} == {"ccd00": True, "ccd01": False}
    # save_stamps is an execution setting: off, finished CCDs are reused; a CCD computed again drops its stamps
    no_stamps = RunConfig(mode="direct", save_stamps=False)
    result = run_pipeline(entries, no_stamps, out, THREADS, resume=True, progress=False)
    assert all(r["resumed"] for r in result.records)
    result = run_pipeline(entries[1:], no_stamps, out, THREADS, progress=False)
    assert result.exit_status == 0
    assert not (out / "ccds" / "ccd01_stamps.fits").exists() and (out / "ccds" / "ccd00_stamps.fits").exists()


def test_a_ccd_with_no_candidates_gets_an_empty_stamps_file(tmp_path):
    from pipeline.graph import CcdState, _write_ccd_stamps
    from pipeline.stamps import Stamps

    entry = PairEntry("empty", tmp_path / "s.fits", tmp_path / "t.fits")
    state = CcdState(ccd="empty", entry=entry)
    table = CandidateTable.empty()
    path = ccd_paths(tmp_path, "empty")["stamps"]
    for mode, n_channels in (("dia", 3), ("direct", 2)):
        _write_ccd_stamps(state, table, RunConfig(mode=mode), path)
        data, ids, channels, _ = read_stamps(path)
        assert data.shape == (0, n_channels, STAMP_SIZE, STAMP_SIZE) and ids.size == 0 and len(channels) == n_channels
    state.stamps = Stamps(np.zeros((1, 2, STAMP_SIZE, STAMP_SIZE), np.float32),
                          np.zeros((1, 2, STAMP_SIZE, STAMP_SIZE), np.int32), ("template", "search"),
                          np.zeros(1, np.int64), np.zeros(1, np.int64))
    with pytest.raises(RuntimeError, match="1 stamps for 0 catalog rows"):
        _write_ccd_stamps(state, table, RunConfig(mode="direct"), path)


def test_damaged_stamps_file_is_refused(dia_out, tmp_path):
    path = tmp_path / "s.fits"
    data = (dia_out / "ccds" / "ccd00_stamps.fits").read_bytes()
    path.write_bytes(data[:20000] + bytes([data[20000] ^ 0xFF]) + data[20001:])
    with pytest.raises(InputError, match="damaged"):
        read_stamps(path)


def test_no_ccd_id_may_name_another_ccds_stamps_file():
    with pytest.raises(InputError, match="stamps file of CCD 'ccd07'"):
        check_ccd_ids(["ccd07", "ccd07_stamps"])
    check_ccd_ids(["ccd07", "ccd08_stamps"])


# ----------------------------------------------------------------------------- older catalogs


def test_catalogs_of_the_previous_layout_are_read_and_merged(tmp_path):
    """HDU 1 without EXTNAME, no provenance, no new columns, NOISESCL in its header: what resume finds."""
    old = Table({"ccd": ["a", "a"], "id": [0, 1], "x": [1.0, 2.0], "y": [3.0, 4.0], "flux": [10.0, 20.0],
                 "score": np.array([0.1, 0.9], np.float32)})
    old.meta["NOISESCL"] = 1.3
    path = ccd_paths(tmp_path, "a")["catalog"]
    path.parent.mkdir(parents=True)
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(old)]).writeto(path, checksum=True)
    back = read_catalog(path)
    assert back["flux"].tolist() == [10.0, 20.0]
    new = CandidateTable.from_columns(ccd=["b"], id=[0], x=[5.0], y=[6.0], flux=[30.0], score=[0.5], mag=[21.0],
                                      noise_scale=[1.1])
    new.meta["MAGSYS"] = "AB"
    write_catalog(new, ccd_paths(tmp_path, "b")["catalog"],
                  inputs=inputs_table([PairEntry("b", tmp_path / "s.fits", tmp_path / "t.fits")]))
    errors = {}
    merged = collect_catalog(tmp_path, ["a", "b"], errors)
    assert errors == {} and merged["ccd"].tolist() == ["a", "a", "b"]
    assert np.isnan(merged["mag"][:2]).all() and merged["mag"][2] == 21.0
    assert merged.meta == {"MAGSYS": "MIXED"} and not merged.masked
    assert merged["mag"].description == CANDIDATE_COLUMNS["mag"][2]
