"""The per-stage speed benchmark and the HOTPANTS comparison script (small and fast; no timed assertion)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from benchmarks import bench_stages as bs
from benchmarks import hotpants as hp


def _summary(stages: dict[str, float], cpu_factor: float = 0.9, rss: float = 800.0) -> dict:
    """A :func:`bench_stages.summarize_run` result with the given per-stage wall seconds."""
    return {"stages": {k: {"wall_s": v, "cpu_s": v * cpu_factor} for k, v in stages.items()},
            "wall_per_ccd": float(sum(stages.values())), "cpu_per_ccd": float(sum(stages.values())) * cpu_factor,
            "core_s_per_ccd": float(sum(stages.values())), "run_wall_s": 10.0, "n_done": 1, "n_failed": 0,
            "failures": {}, "peak_rss_mb": {"w0": rss}, "peak_rss_mb_max": rss}


# ----------------------------------------------------------------------------- the real pipeline, one small CCD


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_stages")
    config = bs.StageBenchConfig(n_ccds=1, shape=(1024, 1024), workers=1, repeats=1, scheduler="threads")
    data = bs.run(config, out, in_process=True, log=lambda line: None)
    return out, data


def test_report_has_every_stage_of_both_modes(small_report):
    out, data = small_report
    expected = {"dia": ["load", "align", "psf_fit", "convolve", "detect", "stamps", "score", "write", "total"],
                "direct": ["load", "detect", "stamps", "score", "write", "total"]}
    for mode, stages in expected.items():
        entry = data["modes"][mode]
        assert entry["after"]["n_failed"] == 0, entry["after"]["failures"]
        rows = {r["stage"]: r for r in entry["rows"]}
        assert list(rows) == stages
        for r in rows.values():
            assert math.isfinite(r["after_wall_s"]) and r["after_wall_s"] >= 0
            assert math.isfinite(r["after_cpu_s"]) and r["after_cpu_s"] >= 0
            assert r["before_wall_s"] is None and r["speedup_wall"] is None  # no baseline asked for
        # the total is the per-CCD sum of the stages (one CCD, one repeat)
        assert rows["total"]["after_wall_s"] == pytest.approx(sum(r["after_wall_s"] for k, r in rows.items()
                                                                  if k != "total"), rel=1e-9)
        assert math.isfinite(entry["after"]["peak_rss_mb_max"]) and entry["after"]["peak_rss_mb_max"] > 50
    # the stage seconds are run.json's own
    run_json = json.loads((out / "runs" / "after-r0" / "dia" / "run.json").read_text())
    rec = run_json["ccds"][0]
    assert data["modes"]["dia"]["after"]["stages"]["detect"]["wall_s"] == pytest.approx(rec["wall_s"]["detect"])
    subtract = data["modes"]["dia"]["after"]["stages"]
    assert subtract["psf_fit"]["wall_s"] + subtract["convolve"]["wall_s"] == pytest.approx(rec["wall_s"]["subtract"])
    # each stage's worker and start are recorded, in stage order; one CCD on one worker: every stage a first run,
    # so there is no steady state to report
    stages = list(rec["wall_s"])
    assert set(rec["stage_worker"]) == set(rec["stage_start_unix"]) == set(stages)
    assert [rec["stage_start_unix"][s] for s in stages] == sorted(rec["stage_start_unix"][s] for s in stages)
    from benchmarks.metrics import first_on_worker
    assert first_on_worker(run_json["ccds"]) == {rec["ccd"]: {"load", "align", "psf_fit", "convolve", "detect",
                                                              "stamps", "score", "write"}}
    assert data["modes"]["dia"]["after"]["steady"] is None and "Steady state" not in (out / "report.md").read_text()
    # the budget rows and the LSST cores follow from the table
    t = data["modes"]["dia"]["targets"]["after"]
    scale = 4096 * 2048 / (1024 * 1024)
    assert t["scale"] == pytest.approx(scale)
    psf = next(r for r in t["rows"] if r["name"] == "PSF fit + subtract")
    assert psf["wall_s"] == pytest.approx((subtract["psf_fit"]["wall_s"] + subtract["convolve"]["wall_s"]) * scale)
    lsst = next(r for r in data["modes"]["direct"]["extrapolation"]["after"] if r["target"] == "LSST visit")
    core_s = data["modes"]["direct"]["after"]["core_s_per_ccd"]
    assert lsst["cores_for_cadence"] == pytest.approx(189 * core_s * 4096 * 4096 / (1024 * 1024) / 40.0)
    cpu_s = data["modes"]["direct"]["after"]["cpu_per_ccd"]
    assert lsst["cores_for_cadence_cpu"] == pytest.approx(189 * cpu_s * 16 / 40.0)
    # both files written, strict JSON, and the markdown holds the table
    reread = json.loads((out / "report.json").read_text())
    assert reread["modes"]["direct"]["rows"][-1]["stage"] == "total"
    md = (out / "report.md").read_text()
    assert "| convolve/subtract |" in md and "## direct" in md and "Load average at start" in md
    assert data["n_ccds"] == 1 and data["simulated"] and "1 CCD pair(s) of 1024 x 1024 px (simulated, seed 9000)" in md


def test_ratio_against_a_synthetic_baseline_json(small_report, tmp_path):
    """A baseline report whose 'after' runs are twice as slow per stage gives speed-ups of x2 exactly."""
    out, data = small_report
    prev = json.loads((out / "report.json").read_text())
    slow = copy.deepcopy(prev)
    for runs in slow["summaries"]["after"].values():
        for s in runs:
            for st in s["stages"].values():
                st["wall_s"] *= 2.0
                st["cpu_s"] *= 3.0
            s["wall_per_ccd"] *= 2.0
            s["cpu_per_ccd"] *= 3.0
            s["core_s_per_ccd"] *= 2.0
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(slow))
    before = bs.prev_summaries(json.loads(base.read_text()))
    after = data["summaries"]["after"]
    report = bs.build_report(after, before, data["ccd_shape"], {"revisions": {}})
    for mode in ("dia", "direct"):
        for r in report["modes"][mode]["rows"]:
            if r["after_wall_s"] > 0:
                assert r["speedup_wall"] == pytest.approx(2.0)
                assert r["before_wall_s"] == pytest.approx(2.0 * r["after_wall_s"])
            if r["after_cpu_s"] > 0:
                assert r["speedup_cpu"] == pytest.approx(3.0)
    assert report["dia_over_direct"]["before"] == pytest.approx(report["dia_over_direct"]["after"])
    md = bs.render_markdown(report)
    assert "x2.00" in md and "speed-up wall" in md


def test_aggregate_compare_and_targets_by_hand():
    runs_after = [_summary({"load": 0.2, "align": 0.4, "psf_fit": 0.3, "convolve": 0.5, "detect": 0.4,
                            "stamps": 0.1, "score": 0.2, "write": 0.05}, rss=900.0),
                  _summary({"load": 0.4, "align": 0.6, "psf_fit": 0.3, "convolve": 0.5, "detect": 0.6,
                            "stamps": 0.1, "score": 0.2, "write": 0.05}, rss=1100.0),
                  _summary({"load": 0.3, "align": 0.5, "psf_fit": 0.3, "convolve": 0.5, "detect": 0.5,
                            "stamps": 0.1, "score": 0.2, "write": 0.05}, rss=950.0)]
    agg = bs.aggregate(runs_after)
    assert agg["stages"]["load"]["wall_s"] == pytest.approx(0.3)  # median of 0.2, 0.4, 0.3
    assert agg["stages"]["load"]["wall_min"] == pytest.approx(0.2)
    assert agg["wall_per_ccd"] == pytest.approx(2.45)  # totals 2.15, 2.75, 2.45
    assert agg["peak_rss_mb_max"] == 1100.0
    before = bs.aggregate([_summary({"load": 1.2, "align": 5.0, "detect": 3.0, "mystery": 1.0})])
    rows = {r["stage"]: r for r in bs.compare(agg, before)}
    assert rows["load"]["speedup_wall"] == pytest.approx(4.0)
    assert rows["align"]["speedup_wall"] == pytest.approx(10.0)
    assert rows["psf_fit"]["before_wall_s"] is None and rows["psf_fit"]["speedup_wall"] is None
    assert rows["mystery"]["after_wall_s"] is None and list(rows)[-2:] == ["mystery", "total"]
    assert rows["total"]["speedup_wall"] == pytest.approx(10.2 / 2.45)
    t = bs.check_targets(agg)
    met = {r["name"]: r["met"] for r in t["rows"]}
    assert met == {"load": True, "align": True, "PSF fit + subtract": True, "detect": True,
                   "stamps + CNN": True, "write": True}
    assert t["total"]["met"] is True and t["rss"]["met"] is False and t["all_met"] is False
    t2 = bs.check_targets(agg, scale=2.0)  # a CCD of half DECam's pixels
    assert t2["rows"][0]["wall_s"] == pytest.approx(0.6) and t2["rows"][0]["met"] is False
    assert bs.cadence_cores(10.0, 189, 40.0) == pytest.approx(47.25)
    with pytest.raises(ValueError):
        bs.cadence_cores(1.0, 1, 0.0)
    with pytest.raises(ValueError):
        bs.aggregate([])


def test_config_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="modes"):
        bs.StageBenchConfig(modes=("dia", "nope"))
    with pytest.raises(ValueError, match="repeats"):
        bs.StageBenchConfig(repeats=0)
    assert bs.main(["--baseline", "HEAD", "--baseline-json", "x.json", "--out", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert bs.main(["--input", str(tmp_path / "none.ecsv"), "--out", str(tmp_path)]) == 2
    assert "no such manifest" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a revision"):
        bs.baseline_tree("no-such-revision-xyz", tmp_path / "tree")


def test_baseline_tree_is_extracted_with_this_script(tmp_path):
    tree, commit = bs.baseline_tree("HEAD", tmp_path / "tree")
    assert len(commit) == 40
    assert (tree / "pipeline" / "runner.py").is_file()
    assert (tree / "benchmarks" / "bench_stages.py").read_text() == (bs.REPO / "benchmarks" / "bench_stages.py"
                                                                        ).read_text()


# ----------------------------------------------------------------------------- HOTPANTS script


def test_hotpants_without_binary_says_so(capsys, tmp_path):
    assert hp.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--hotpants PATH" in err and "neither ships nor builds" in err
    assert hp.main(["--hotpants", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "not an executable" in capsys.readouterr().err
    exe = tmp_path / "fake"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    assert hp.main(["--hotpants", str(exe), "--shape", "12", "--out", str(tmp_path)]) == 2
    assert "NYxNX" in capsys.readouterr().err
    assert hp.main(["--hotpants", str(exe), "--repeats", "0", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("input"))  # nothing simulated before the arguments were checked


def test_hotpants_option_mapping():
    choice = hp.KernelChoice(half_width=12, sigmas=(0.8, 1.6, 3.2), degrees=(4, 2, 2), spatial_order=2,
                             background_order=1, convolved="template")
    files = {"search": "s.fits", "template": "t.fits", "out": "d.fits", "search_noise": "sn.fits",
             "template_noise": "tn.fits", "search_mask": "sm.fits", "template_mask": "tm.fits",
             "out_noise": "dn.fits", "out_mask": "dm.fits"}
    opts = hp.hotpants_options(choice, files, saturation=45000.0, lower=10.0)

    def value(flag, n=1):
        i = opts.index(flag)
        return opts[i + 1:i + 1 + n]

    assert value("-inim") == ["s.fits"] and value("-tmplim") == ["t.fits"] and value("-outim") == ["d.fits"]
    assert value("-r") == ["12"] and int(value("-rss")[0]) > 12
    assert value("-ko") == ["2"] and value("-bgo") == ["1"]
    assert value("-c") == ["t"] and value("-n") == ["i"]
    assert value("-ng", 7) == ["3", "4", "0.8000", "2", "1.6000", "2", "3.2000"]
    assert value("-iu") == ["45000"] and value("-tu") == ["45000"] and value("-il") == ["10"]
    for key, flag in (("search_noise", "-ini"), ("template_noise", "-tni"), ("search_mask", "-imi"),
                      ("template_mask", "-tmi"), ("out_noise", "-oni"), ("out_mask", "-omi")):
        assert value(flag) == [files[key]]
    # convolving the search image maps to -c i; normalisation stays on the search image
    other = hp.hotpants_options(hp.KernelChoice(5, (1.0,), (2,), 0, 0, "search"),
                                {"search": "s", "template": "t", "out": "d"})
    assert other[other.index("-c") + 1] == "i" and other[other.index("-n") + 1] == "i"
    assert "-ini" not in other and other[other.index("-iu") + 1] == "1e+30"
    with pytest.raises(ValueError, match="out"):
        hp.hotpants_options(choice, {"search": "s", "template": "t"})
    with pytest.raises(ValueError, match="exceed"):
        hp.hotpants_options(choice, files, stamp_half_width=12)
    with pytest.raises(ValueError):
        hp.KernelChoice(3, (1.0, 2.0), (2,))


def test_kernel_choice_from_header():
    from astropy.io import fits

    h = fits.Header()
    for i, (s, d) in enumerate(((0.8, 4), (1.6, 2)), start=1):
        h[f"HIERARCH DIA KERNEL BASIS SIGMAS {i}"] = s
        h[f"HIERARCH DIA KERNEL BASIS DEGREES {i}"] = d
    h["HIERARCH DIA KERNEL BASIS HALF_WIDTH"] = 11
    h["HIERARCH DIA KERNEL SPATIAL_ORDER"] = 1
    h["HIERARCH DIA KERNEL BACKGROUND_ORDER"] = 0
    h["CONVOLV"] = "search"
    assert hp.kernel_choice_from_header(h) == hp.KernelChoice(11, (0.8, 1.6), (4, 2), 1, 0, "search")
    del h["CONVOLV"]
    with pytest.raises(ValueError, match="CONVOLV"):
        hp.kernel_choice_from_header(h)


def test_quality_measures_on_known_noise():
    rng = np.random.default_rng(7)
    shape = (200, 200)
    sigma = np.full(shape, 2.0)
    diff = rng.normal(0.0, 2.0, shape)
    stars = np.array([[50.0, 50.0], [150.0, 60.0], [100.0, 150.0]])
    flux = np.array([1000.0, 2000.0, 4000.0])
    yy, xx = np.mgrid[0:200, 0:200]
    for (x, y), f in zip(stars, flux):  # leave 5% of each star in the difference
        diff += 0.05 * f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2)) / (2 * np.pi * 1.5**2)
    bad = np.zeros(shape, bool)
    bad[:, :10] = True
    diff[:, :10] = 1e6  # masked garbage must not count
    sky = hp.blank_sky_stats(diff, sigma, bad, stars, radius=15.0)
    assert sky["std"] == pytest.approx(1.0, abs=0.02) and abs(sky["mean"]) < 0.02
    assert sky["n_pixels"] < 200 * 190 - 3 * 600  # the star disks are left out
    res = hp.star_residuals(diff, sigma, bad, stars, flux, radius=6.0)
    assert res["n"] == 3
    assert res["median_abs_frac"] == pytest.approx(0.05, abs=0.01)
    # a star whose aperture touches masked pixels is not counted
    res2 = hp.star_residuals(diff, sigma, bad, np.array([[12.0, 100.0]]), np.array([100.0]), radius=6.0)
    assert res2["n"] == 0 and res2["median_abs_frac"] is None


def test_sep_comparison_scores_detections_against_truth():
    """benchmarks.bench_sep's scoring: transients found within 1.5 px, the border left out, detections on variables
    counted apart, the rest unmatched."""
    from astropy.table import Table

    from benchmarks import bench_sep

    truth = Table({"kind": ["transient", "transient", "transient", "variable", "star"],
                   "x": [100.0, 200.0, 5.0, 300.0, 400.0], "y": [100.0, 220.0, 50.0, 300.0, 400.0],
                   "snr": [50.0, 6.0, 80.0, 20.0, 100.0]})
    x = np.array([100.8, 203.0, 5.0, 300.2, 400.1, 250.0])
    y = np.array([100.9, 220.0, 50.0, 300.0, 400.0, 250.0])
    s = bench_sep.score_detections(x, y, truth, (500, 500), edge=25)
    assert s["n_transients"] == 2 and s["found"] == 1 and s["completeness"] == 0.5  # (5, 50) is in the border
    assert s["n_transients_snr10"] == 1 and s["found_snr10"] == 1
    # matched: the first transient, the one in the border and the variable; the star's and the blank one are not
    assert s["n_detections"] == 6 and s["on_variables"] == 1 and s["unmatched"] == 3
    empty = bench_sep.score_detections(np.zeros(0), np.zeros(0), truth, (500, 500), edge=25)
    assert empty["found"] == 0 and empty["unmatched"] == 0 and empty["n_detections"] == 0


def test_sep_comparison_finds_injected_point_sources_both_ways():
    """Both detections on a difference made here (noise plus Gaussian point sources of known S/N) find the
    bright ones and nothing much else; skipped without SEP."""
    pytest.importorskip("sep")
    from types import SimpleNamespace

    from benchmarks import bench_sep
    from pipeline.detect import DetectConfig

    rng = np.random.default_rng(5)
    shape, fwhm, sigma_pix = (400, 400), 3.0, 10.0
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    xs = rng.uniform(40, 360, 12)
    ys = rng.uniform(40, 360, 12)
    s = fwhm / 2.3548
    image = rng.normal(0, sigma_pix, shape).astype(np.float32)
    for x0, y0 in zip(xs, ys):  # S/N ~ 40 each: flux / (sigma sqrt(4 pi s^2))
        image += (40 * sigma_pix * np.sqrt(4 * np.pi * s**2) * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / s**2)
                  / (2 * np.pi * s**2)).astype(np.float32)
    diff = SimpleNamespace(image=image, variance=np.full(shape, sigma_pix**2, np.float32),
                           mask=np.zeros(shape, np.int32))
    from astropy.table import Table

    truth = Table({"kind": ["transient"] * 12, "x": xs, "y": ys, "snr": np.full(12, 40.0)})
    ox, oy, scale = bench_sep.ours_difference_detection(diff, fwhm, DetectConfig())
    sx, sy = bench_sep.sep_difference_detection(diff, fwhm, DetectConfig(), scale)
    for x, y in ((ox, oy), (sx, sy)):
        score = bench_sep.score_detections(x, y, truth, shape, edge=25)
        assert score["found"] == 12 and score["unmatched"] <= 2


def _record(ccd: str, worker: str, t0: float, walls: dict[str, float], worker_of: dict[str, str] | None = None) -> dict:
    """A run.json CCD record whose stages ran back to back from ``t0`` on ``worker``."""
    starts, t = {}, t0
    for stage, w in walls.items():
        starts[stage], t = t, t + w
    return {"ccd": ccd, "status": "done", "wall_s": dict(walls), "cpu_s": {k: 0.5 * v for k, v in walls.items()},
            "worker": worker, "stage_worker": {k: (worker_of or {}).get(k, worker) for k in walls},
            "stage_start_unix": starts, "peak_rss_mb": {"load": 100.0}}


def test_steady_state_leaves_out_each_workers_first_run_of_each_stage():
    """Two workers, three CCDs each: the first CCD on each costs 1 s more in load and 0.5 s more in detect.  The
    steady state is the later CCDs' cost exactly, the once-per-worker extra 1.5 s; a stage that ran on another
    worker is a first run there."""
    from benchmarks.metrics import cost_summary, first_on_worker

    later = {"load": 0.4, "detect": 0.8, "write": 0.1}
    first = {"load": 1.4, "detect": 1.3, "write": 0.1}
    records = []
    for w, t0 in (("A", 100.0), ("B", 100.2)):
        for k in range(3):
            records.append(_record(f"{w}{k}", w, t0 + 10 * k, first if k == 0 else later))
    # listed out of time order: the order of the records must not matter
    records = records[::-1]
    marks = first_on_worker(records)
    assert marks == {"A0": {"load", "detect", "write"}, "B0": {"load", "detect", "write"}}
    cost = cost_summary({"ccds": records, "n_failed": 0, "wall_s": 60.0})
    steady = cost["steady"]
    rows = {r["stage"]: r for r in steady["stages"]}
    for stage, v in later.items():
        assert rows[stage]["wall_s"] == pytest.approx(v) and rows[stage]["n"] == 4
        assert rows[stage]["cpu_s"] == pytest.approx(0.5 * v)
        assert rows[stage]["first_wall_s"] == pytest.approx(first[stage]) and rows[stage]["n_first"] == 2
    assert steady["wall_per_ccd"] == pytest.approx(sum(later.values()))
    assert steady["start_up_s"] == pytest.approx(1.5)
    # the all-runs mean is higher by the two first runs' share
    assert cost["wall_per_ccd"] == pytest.approx((2 * sum(first.values()) + 4 * sum(later.values())) / 6)
    # a CCD whose detect ran on worker C: that is C's first detect, whatever came before on A
    moved = _record("A3", "A", 200.0, later, worker_of={"detect": "C"})
    assert first_on_worker(records + [moved])["A3"] == {"detect"}
    # a CCD resumed from an earlier run ran on that run's workers, whatever their names: not a first run here
    earlier = dict(_record("A9", "A", 1.0, first), resumed=True)
    assert first_on_worker(records + [earlier]) == marks
    # records without start times (run.json before 2026-12-02): no first runs known, no steady state
    old = [{k: v for k, v in r.items() if k not in ("stage_worker", "stage_start_unix")} for r in records]
    assert first_on_worker(old) == {}
    assert math.isnan(cost_summary({"ccds": old, "n_failed": 0})["steady"]["wall_per_ccd"])


def test_a_given_manifest_sets_the_ccd_count(small_report, tmp_path):
    """With ``--input`` the report counts the manifest's CCDs and names it (not ``--ccds`` and a seed)."""
    out, _ = small_report
    config = bs.StageBenchConfig(n_ccds=4, shape=(1024, 1024), workers=1, repeats=1, scheduler="threads",
                                 modes=("direct",))
    manifest = out / "input" / "manifest.ecsv"
    data = bs.run(config, tmp_path / "given", manifest=manifest, in_process=True, log=lambda line: None)
    assert data["n_ccds"] == 1 and not data["simulated"]
    md = (tmp_path / "given" / "report.md").read_text()
    assert f"1 CCD pair(s) of 1024 x 1024 px (from {manifest.resolve()})" in md


def test_report_shows_the_steady_state_budget():
    """The dia budget in steady state is computed from the later runs, and the markdown shows both tables."""
    dia_first = {"load": 1.0, "align": 0.9, "psf_fit": 0.2, "convolve": 0.6, "detect": 0.5, "stamps": 0.05,
                 "score": 0.1, "write": 0.15}
    dia_later = {"load": 0.25, "align": 0.45, "psf_fit": 0.2, "convolve": 0.6, "detect": 0.4, "stamps": 0.05,
                 "score": 0.1, "write": 0.08}
    direct_later = {"load": 0.25, "detect": 0.7, "stamps": 0.2, "score": 0.1, "write": 0.05}

    def summary(first, later_):
        s = _summary({k: 0.5 * (first.get(k, v) + v) for k, v in later_.items()})
        s["steady"] = {"stages": {k: {"wall_s": v, "cpu_s": v, "first_wall_s": first.get(k, v), "n": 2}
                                  for k, v in later_.items()},
                       "wall_per_ccd": sum(later_.values()), "cpu_per_ccd": sum(later_.values()),
                       "start_up_s": sum(first.get(k, v) - v for k, v in later_.items())}
        return s

    after = {"dia": [summary(dia_first, dia_later)], "direct": [summary({}, direct_later)]}
    data = bs.build_report(after, None, (4096, 2048), {"repeats": 1})
    steady = {r["name"]: r for r in data["modes"]["dia"]["targets"]["steady"]["rows"]}
    assert steady["load"]["wall_s"] == pytest.approx(0.25) and steady["load"]["met"] is True
    assert steady["write"]["met"] is True and steady["align"]["met"] is True
    assert data["modes"]["dia"]["targets"]["steady"]["total"]["wall_s"] == pytest.approx(sum(dia_later.values()))
    plain = {r["name"]: r for r in data["modes"]["dia"]["targets"]["after"]["rows"]}
    assert plain["load"]["met"] is False  # the mean over all runs, first ones included
    assert data["dia_over_direct"]["after, steady state"] == pytest.approx(sum(dia_later.values())
                                                                         / sum(direct_later.values()))
    md = bs.render_markdown(data)
    assert "The same budget in steady state" in md and "| load | <= 0.3 | 0.250 | yes |" in md
    assert "Once per worker" in md
