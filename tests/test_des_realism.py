"""Tests of the simulator's DES-realism options: per-star template shifts (misregistration dipoles)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.simulate import SimulationConfig, simulate_pair
from pipeline.simulate.core import star_shifts

NO_ARTIFACTS = dict(cosmic_ray_density=0.0, hot_pixel_rate=0.0, bad_column_rate=0.0, satellite_probability=0.0)
STARS = SimulationConfig(shape=(384, 384), star_density_range=(40.0, 40.0), galaxy_density=0.0,
                         transient_density=0.0, variable_fraction=0.0, **NO_ARTIFACTS)


def _template_centroids(pair, rows, half=6):
    """First-moment centroids of sources in the noiseless template model, sky removed."""
    model = pair.template_model.astype(float) - pair.truth.meta["template_sky"]
    out = []
    for row in rows:
        x0, y0 = (float(v) for v in pair.template.wcs.world_to_pixel_values(row["ra"], row["dec"]))
        xc, yc = x0, y0
        for _ in range(4):  # re-centre the window on the centroid
            ix, iy = int(round(xc)), int(round(yc))
            w = np.clip(model[iy - half:iy + half + 1, ix - half:ix + half + 1], 0, None)
            yy, xx = np.mgrid[iy - half:iy + half + 1, ix - half:ix + half + 1]
            xc, yc = float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())
        out.append((xc - x0, yc - y0))
    return np.array(out)


def _isolated_bright(truth, shape, mag_max=20.0, radius=15.0, edge=20):
    stars = truth[(truth["kind"] == "star") & (truth["mag"] < mag_max)]
    allxy = np.column_stack([truth["x"], truth["y"]])[np.asarray(truth["kind"]) == "star"]
    keep = []
    for row in stars:
        d = np.hypot(allxy[:, 0] - row["x"], allxy[:, 1] - row["y"])
        ok = edge < row["x"] < shape[1] - edge and edge < row["y"] < shape[0] - edge
        if ok and np.sum(d < radius) == 1:
            keep.append(row)
    return keep


def test_star_shifts_off_by_default_and_statistics():
    assert not star_shifts(SimulationConfig(), 1, 0, 50).any()
    cfg = SimulationConfig(star_shift_rms=0.03, high_pm_fraction=0.1, high_pm_shift_range=(0.2, 0.4))
    s = star_shifts(cfg, 1, 0, 20000)
    r = np.hypot(s[:, 0], s[:, 1])
    fast = r > 0.15  # a Gaussian 0.03 arcsec per axis essentially never reaches 0.15
    assert fast.mean() == pytest.approx(0.1, abs=0.01)
    assert r[fast].min() > 0.2 - 5 * 0.03 and r[fast].max() < 0.4 + 5 * 0.03
    assert np.std(s[~fast], axis=0) == pytest.approx([0.03, 0.03], rel=0.05)
    np.testing.assert_array_equal(s, star_shifts(cfg, 1, 0, 20000))  # deterministic
    assert not np.array_equal(s, star_shifts(cfg, 1, 1, 20000))  # per CCD
    with pytest.raises(ValueError, match="star_shift_rms"):
        star_shifts(dataclasses.replace(cfg, star_shift_rms=-1.0), 1, 0, 3)


def test_star_shifts_move_template_stars_only():
    plain = simulate_pair(STARS, seed=21)
    moved_cfg = dataclasses.replace(STARS, high_pm_fraction=1.0, high_pm_shift_range=(0.5, 0.5))
    moved = simulate_pair(moved_cfg, seed=21)
    # own random stream: the search image (and the truth) are untouched, the template is not
    np.testing.assert_array_equal(plain.search.image, moved.search.image)
    both = np.asarray(plain.truth["image"]) != "template"  # template-only records (bleeds) follow their star
    np.testing.assert_array_equal(plain.truth["x"][both], moved.truth["x"][both])
    assert not np.array_equal(plain.template.image, moved.template.image)
    rows = _isolated_bright(plain.truth, plain.search.shape)
    assert len(rows) >= 5
    still = _template_centroids(plain, rows)
    shifted = _template_centroids(moved, rows)
    # without shifts the template star sits at its WCS position; with them it is 0.5" (1.9 px) away
    assert np.median(np.hypot(still[:, 0], still[:, 1])) < 0.1
    r = np.hypot(shifted[:, 0], shifted[:, 1])
    assert np.median(np.abs(r - 0.5 / 0.263)) < 0.1
    assert np.mean(np.abs(r - 0.5 / 0.263) < 0.2) >= 0.75  # windowed centroids: a neighbour may pull one


def _fake_stamps(ccd, xy, kinds, shape):
    from classifier.data import StampSet

    n = len(xy)
    meta = {"ccd": np.array([ccd] * n), "x": np.array([p[0] for p in xy], float),
            "y": np.array([p[1] for p in xy], float), "kind": np.array(kinds), "snr": np.full(n, 10.0),
            "flags": np.zeros(n, np.int32)}
    stamps = StampSet(np.zeros((n, 3, 51, 51), np.float32), np.zeros(n, np.int8), meta,
                      ("template", "search", "difference"), {})
    stamps.attrs["dataset_config"] = {"shape": list(shape), "transient_density_factor": 1.0, "instrument": "decam"}
    return stamps


def test_refine_kinds_names_extended_artifacts():
    from benchmarks.des_checkpoints import refine_kinds

    shape = (256, 256)
    base = dataclasses.replace(SimulationConfig(), shape=shape)
    found = None
    for index in range(60):  # a small CCD with a cosmic-ray track, a bad column and a search trail
        truth = simulate_pair(base, 9, index).truth
        kinds = np.asarray(truth["kind"]).astype(str)
        image = np.asarray(truth["image"]).astype(str)
        if ((kinds == "satellite") & (image == "search")).any() and ((kinds == "cosmic_ray")
                                                                      & (truth["length"] > 4)).any():
            found = index
            break
    assert found is not None
    cr = truth[(kinds == "cosmic_ray") & (truth["length"] > 4)][0]
    sat = truth[(kinds == "satellite") & (image == "search")][0]
    # far from every truth object: stays unmatched
    txy = np.column_stack([truth["x"], truth["y"]])
    grid = [(gx, gy) for gx in range(30, 226, 7) for gy in range(30, 226, 7)]
    lone = max(grid, key=lambda p: np.min(np.hypot(txy[:, 0] - p[0], txy[:, 1] - p[1])))
    xy = [(cr["x"] + 3.0, cr["y"]), (sat["x"], sat["y"]), (cr["x"], cr["y"]), lone]
    stamps = _fake_stamps(f"s9-ccd{found:02d}", xy, ["unmatched", "unmatched", "star", "unmatched"], shape)
    counts = refine_kinds(stamps)
    new = list(stamps.meta["kind"])
    assert new[0] in ("cosmic_ray", "satellite") and new[1] == "satellite"
    assert new[2] == "star"  # only unmatched stamps are renamed
    assert new[3] == "unmatched" or new[3] == "satellite"  # a lone point is renamed only if a trail passes by
    assert sum(counts.values()) == sum(a != b for a, b in zip(new, ["unmatched", "unmatched", "star", "unmatched"]))


def test_load_stream_filters_and_rebalances(tmp_path):
    from benchmarks.des_checkpoints import load_stream
    from pipeline.detect import CandidateFlags

    kinds = ["transient"] * 6 + ["cosmic_ray", "cosmic_ray", "variable", "satellite", "star", "star"]
    flags = [0] * 6 + [int(CandidateFlags.MASKED)] * 2 + [0] * 4
    stamps = _fake_stamps("s9-ccd00", [(float(i), 0.0) for i in range(12)], kinds, (256, 256))
    stamps.labels = (np.array(kinds) == "transient").astype(np.int8)
    stamps.meta["flags"] = np.array(flags, np.int32)
    stamps.meta["split"] = np.array(["test"] * 12)
    stamps.save(tmp_path / "s.npz")
    path = [str(tmp_path / "s.npz")]

    def kinds_of(st):
        return sorted(np.asarray(st.meta["kind"]).astype(str)[st.labels == 0].tolist())

    assert len(load_stream(path)) == 12  # as built
    masked = load_stream(path, drop_flags=int(CandidateFlags.MASKED))
    assert kinds_of(masked) == ["satellite", "star", "star", "variable"] and masked.labels.sum() == 4
    real_var = load_stream(path, drop_flags=int(CandidateFlags.MASKED), variables="real")
    assert kinds_of(real_var) == ["satellite", "star", "star"] and real_var.labels.sum() == 3
    no_sat = load_stream(path, drop_flags=int(CandidateFlags.MASKED), variables="drop", drop_kinds=("satellite",))
    assert kinds_of(no_sat) == ["star", "star"] and no_sat.labels.sum() == 2
    with pytest.raises(ValueError, match="variables"):
        load_stream(path, variables="maybe")


def test_dataset_sim_config_reaches_the_simulation(tmp_path, monkeypatch):
    """``pipeline dataset --sim-config`` simulates with the file's parameters (instrument, shape and
    density from the command line still win) and records them in the data set's configuration."""
    import argparse
    import json

    import pipeline.simulate as simulate_module  # the builder imports simulate_pair from it when it runs
    from pipeline.commands import dataset
    from pipeline.simulate import SimulationConfig

    seen = []

    original = simulate_module.simulate_pair

    def spy(cfg, seed, index):
        seen.append(cfg)
        return original(cfg, seed, index)

    monkeypatch.setattr(simulate_module, "simulate_pair", spy)
    toml = tmp_path / "sim.toml"
    toml.write_text("[simulation]\nstar_shift_rms = 0.2\nhigh_pm_fraction = 0.01\nshape = [64, 64]\n")
    parser = argparse.ArgumentParser()
    dataset.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "ds"), "--ccds", "1", "--seed", "5", "--instrument", "ztf",
                              "--shape", "256x256", "--density-factor", "20", "--workers", "1", "--fractions", "0,0,1",
                              "--streams", "dia", "--sim-config", str(toml), "--quiet"])
    assert dataset.main(args) == 0
    assert len(seen) == 1
    cfg = seen[0]
    assert (cfg.star_shift_rms, cfg.high_pm_fraction) == (0.2, 0.01)
    assert cfg.shape == (256, 256) and cfg.instrument == "ztf"  # the command line's, not the file's
    assert cfg.transient_density == 20 * SimulationConfig().transient_density
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert report["dataset_config"]["simulation"]["star_shift_rms"] == 0.2
    # a misspelt parameter is an error that names it
    toml.write_text("[simulation]\nstar_shift = 0.2\n")
    with pytest.raises(Exception, match="star_shift"):
        dataset.main(args)
