"""Instrument presets end to end: ``pipeline dataset --instrument``, the variable-star label policy,
and the choice of shipped weights per preset by ``pipeline run`` (recorded in run.json)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch

import classifier.infer as infer
from classifier.data import StampSet
from classifier.infer import WeightsError, preset_model_name, preset_weights
from pipeline import steps
from pipeline.cluster import SchedulerConfig
from pipeline.config import RunConfig
from pipeline.datasets import DatasetConfig, pair_stamp_sets
from pipeline.io import read_manifest
from pipeline.runner import (
    RunSetupError,
    check_model,
    preset_of_instrume,
    resolve_instrument,
    run_pipeline,
)
from pipeline.simulate import INSTRUMENTS, SimulationConfig, simulate_pair, write_simulation
from pipeline.truth import candidate_labels

# ----------------------------------------------------------------------------- pipeline dataset


def test_dataset_default_shape_per_preset():
    assert DatasetConfig().shape == (2048, 2048)  # DECam: half a CCD, as the shipped DECam weights
    assert DatasetConfig(instrument="ztf").shape == INSTRUMENTS["ztf"].shape
    assert DatasetConfig(instrument="lsst").shape == INSTRUMENTS["lsst"].shape
    assert DatasetConfig(instrument="ztf", shape=(64, 96)).shape == (64, 96)
    with pytest.raises(ValueError, match="instrument"):
        DatasetConfig(instrument="hubble")
    with pytest.raises(ValueError, match="variables"):
        DatasetConfig(variables="maybe")


def test_dataset_command_simulates_ztf_and_records_it(tmp_path):
    from pipeline.commands import dataset

    parser = argparse.ArgumentParser()
    dataset.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "ds"), "--ccds", "2", "--seed", "5", "--instrument", "ztf",
                              "--shape", "256x256", "--density-factor", "20", "--workers", "1",
                              "--fractions", "0.5,0,0.5", "--streams", "dia", "--variables", "real", "--quiet"])
    assert dataset.main(args) == 0
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert (report["instrument"], report["variables"], report["shape"]) == ("ztf", "real", [256, 256])
    # the CCDs are the ZTF preset's: as many transients as the ZTF simulation of the same CCDs
    # (a DECam CCD of that shape covers 15x less sky and holds far fewer)
    base = SimulationConfig()
    for k, row in enumerate(report["ccds"]):
        cfg = SimulationConfig(instrument="ztf", shape=(256, 256), transient_density=20 * base.transient_density)
        truth = simulate_pair(cfg, 5, k).truth
        assert row["n_transients"] == int((truth["kind"] == "transient").sum()) > 0
    stamps = StampSet.load(tmp_path / "ds" / "dia.npz")
    assert stamps.attrs["instrument"] == "ztf" and stamps.attrs["variables"] == "real"
    assert stamps.attrs["dataset_config"]["instrument"] == "ztf"
    assert len(stamps) > 0 and set(np.unique(stamps.labels)) == {0, 1}


def test_candidate_labels_policy():
    kinds = np.array(["transient", "variable", "star", "", "cosmic_ray", "variable"])
    assert candidate_labels(kinds).tolist() == [1, 0, 0, 0, 0, 0]
    assert candidate_labels(kinds, "real").tolist() == [1, 1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="variables"):
        candidate_labels(kinds, "sometimes")


def test_variables_policy_flips_exactly_the_variable_star_candidates():
    # many variable stars, so that some are detected on the difference
    cfg = SimulationConfig(instrument="ztf", shape=(384, 384), variable_fraction=0.6,
                           variable_dmag_range=(0.5, 1.5))
    sim = simulate_pair(cfg, seed=3, ccd_index=0)
    pair = steps.LoadedPair("ztf-test", sim.search, sim.template, sim.truth)
    sets = {}
    for policy in ("bogus", "real"):
        out, errors = pair_stamp_sets(pair, streams=("dia",), drop_edge=False, variables=policy)
        assert not errors
        sets[policy] = out["dia"]
    bogus, real = sets["bogus"], sets["real"]
    assert np.array_equal(bogus.meta["truth_id"], real.meta["truth_id"])  # the same candidates
    kind = bogus.meta["kind"]
    variable = kind == "variable"
    assert variable.sum() >= 2, "the test field should have detected variable stars"
    changed = bogus.labels != real.labels
    assert np.array_equal(changed, variable)
    assert (bogus.labels[variable] == 0).all() and (real.labels[variable] == 1).all()
    # the truth says which are real: transients only, plus the variables under "real"
    truth_kind = dict(zip(np.asarray(sim.truth["id"]).tolist(), np.asarray(sim.truth["kind"]).astype(str)))
    matched = bogus.meta["truth_id"] >= 0
    assert all(truth_kind[i] == k for i, k in zip(bogus.meta["truth_id"][matched], kind[matched]))
    assert np.array_equal(real.labels == 1, (kind == "transient") | variable)


# ----------------------------------------------------------------------------- weights per preset


def _fake_weights(path, seed):
    """A valid triplet weights file with its own random initialisation (so its SHA-256 is its own)."""
    from classifier.models import build_model, get_spec
    from classifier.train import save_weights

    torch.manual_seed(seed)
    return save_weights(build_model("triplet"), get_spec("triplet"), path, note=f"test weights {seed}")


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """A weights folder with DECam ``triplet.pt`` and ``pair-direct.pt`` and a ZTF ``triplet-ztf.pt`` only."""
    folder = tmp_path / "weights"
    folder.mkdir()
    _fake_weights(folder / "triplet.pt", 1)
    _fake_weights(folder / "triplet-ztf.pt", 2)
    shutil.copy(infer.WEIGHTS_DIR / "pair-direct.pt", folder / "pair-direct.pt")
    monkeypatch.setattr(infer, "WEIGHTS_DIR", folder)
    steps.get_scorer.cache_clear()
    yield folder
    steps.get_scorer.cache_clear()


def test_preset_weights_resolution(weights_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert preset_weights("triplet", "ztf") == (weights_dir / "triplet-ztf.pt", "preset")
    assert preset_weights("triplet", "decam") == ("triplet", "default")
    assert preset_model_name("triplet", "ztf") == "triplet-ztf" and preset_model_name("triplet", "decam") == "triplet"
    assert preset_weights("triplet", "") == ("triplet", "default")
    assert preset_weights("triplet-ztf", "decam") == ("triplet-ztf", "as given")
    assert preset_weights("triplet-ztf", "ztf") == ("triplet-ztf", "as given")
    # an explicit file always wins, whatever the instrument
    own = _fake_weights(tmp_path / "mine.pt", 3)
    assert preset_weights(str(own), "ztf") == (str(own), "as given")
    # no ZTF pair-direct: the DECam weights, unless ZTF was asked for explicitly
    assert preset_weights("pair-direct", "ztf") == ("pair-direct", "fallback")
    with pytest.raises(WeightsError, match=r"no shipped ztf weights for model .pair-direct.*choose one of .*ztf"):
        preset_weights("pair-direct", "ztf", strict=True)
    with pytest.raises(ValueError, match="preset"):
        preset_weights("triplet", "hubble")


def test_check_model_reads_the_preset_file(weights_dir):
    path, sha = check_model(RunConfig(instrument="ztf"))
    assert path == str(weights_dir / "triplet-ztf.pt")
    assert sha == hashlib.sha256((weights_dir / "triplet-ztf.pt").read_bytes()).hexdigest()
    assert check_model(RunConfig(instrument="decam"))[0] == str(weights_dir / "triplet.pt")
    with pytest.raises(WeightsError, match="lsst"):
        check_model(RunConfig(instrument="lsst"))  # asked for, and none shipped
    assert check_model(RunConfig(instrument="lsst"), strict=False)[0] == str(weights_dir / "triplet.pt")


def test_preset_of_instrume():
    for value, preset in [("DECam", "decam"), ("ZTF", "ztf"), ("ZTF/MOSAIC", "ztf"), (" lsstcam ", "lsst"),
                          ("LSSTComCam", "lsst"), ("LSST", "lsst")]:
        assert preset_of_instrume(value) == preset
    for value in ("", "NIRCAM", "HSC", None):
        assert preset_of_instrume(value) is None


@pytest.fixture(scope="module")
def ztf_field(tmp_path_factory):
    """One small simulated ZTF CCD pair on disk (INSTRUME = ZTF)."""
    out = tmp_path_factory.mktemp("ztf_field")
    cfg = SimulationConfig(instrument="ztf", shape=(512, 512),
                           transient_density=4 * SimulationConfig().transient_density)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_simulation(out, n_ccds=1, seed=21, config=cfg)


def test_resolve_instrument_from_headers(weights_dir, ztf_field, sim_field, caplog, tmp_path):
    from astropy.io import fits

    ztf = read_manifest(ztf_field)
    decam = read_manifest(sim_field)
    config, choice = resolve_instrument(ztf, RunConfig())
    assert (config.instrument, choice["source"], choice["explicit"]) == ("ztf", "INSTRUME", False)
    assert choice["instrume"] == {"ZTF": 1}
    assert resolve_instrument(decam, RunConfig())[0].instrument == "decam"
    # asked for: used as asked, headers not needed
    config, choice = resolve_instrument(ztf, RunConfig(instrument="decam"))
    assert (config.instrument, choice["source"], choice["explicit"]) == ("decam", "asked", True)
    # a weights file: no preset needed
    assert resolve_instrument(ztf, RunConfig(model_dia=str(weights_dir / "triplet.pt")))[1]["source"] == "not used"
    with pytest.raises(RunSetupError, match="several instruments.*--instrument"):
        resolve_instrument(ztf + decam, RunConfig())
    # an instrument without a preset: DECam weights, with a warning
    import dataclasses

    other = tmp_path / "other.fits"
    with fits.open(ztf[0].search) as hdul:
        hdul[0].header["INSTRUME"] = "NIRCAM"
        for h in hdul:
            h.header.pop("INSTRUME", None) if h is not hdul[0] else None
        hdul.writeto(other)
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        config, _ = resolve_instrument([dataclasses.replace(ztf[0], search=other)], RunConfig())
    assert config.instrument == "decam"
    assert "NIRCAM" in caplog.text and "DECam-trained" in caplog.text


def test_run_uses_and_records_the_preset_weights_and_resume_sees_a_change(weights_dir, ztf_field, tmp_path):
    entries = read_manifest(ztf_field)
    sched = SchedulerConfig(kind="threads", workers=1)
    out = tmp_path / "run"
    result = run_pipeline(entries, RunConfig(), out, sched, progress=False)
    assert result.exit_status == 0
    run = json.loads((out / "run.json").read_text())
    ztf_file = weights_dir / "triplet-ztf.pt"
    assert run["weights"]["path"] == str(ztf_file)
    assert run["weights"]["sha256"] == hashlib.sha256(ztf_file.read_bytes()).hexdigest()
    assert (run["weights"]["model"], run["weights"]["resolved_model"]) == ("triplet", "triplet-ztf")
    assert (run["weights"]["instrument"], run["weights"]["instrument_source"]) == ("ztf", "INSTRUME")
    # the scores are the ZTF file's: the CCD's saved stamps scored with it directly, not with the DECam one
    from pipeline.io import read_catalog, read_stamps

    cat = read_catalog(out / "ccds" / f"{entries[0].ccd}.fits")
    data, _, channels, _ = read_stamps(out / "ccds" / f"{entries[0].ccd}_stamps.fits")
    assert len(cat) > 0
    for path, same in ((ztf_file, True), (weights_dir / "triplet.pt", False)):
        scores = infer.Scorer(path).score(data, channels=channels)
        assert np.allclose(scores, np.asarray(cat["score"], float), atol=1e-5) == same
    # resume with the DECam weights forced: the finished CCD is not reused (other weights, other key)
    again = run_pipeline(entries, RunConfig(instrument="decam"), out, sched, progress=False, resume=True)
    assert again.exit_status == 0
    run2 = json.loads((out / "run.json").read_text())
    assert run2["weights"]["path"] == str(weights_dir / "triplet.pt")
    assert run2["weights"]["instrument_source"] == "asked"
    assert run2["resume"]["reused"] == [] and entries[0].ccd in run2["resume"]["computed_again"]
    assert run2["config_hash"] != run["config_hash"]
    # and resuming with the same choice reuses it
    third = run_pipeline(entries, RunConfig(instrument="decam"), out, sched, progress=False, resume=True)
    assert third.exit_status == 0
    assert json.loads((out / "run.json").read_text())["resume"]["reused"] == [entries[0].ccd]
