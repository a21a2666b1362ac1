"""``pipeline benchmark``: the report's numbers agree with the runs it made (not their size)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from benchmarks import metrics

SHAPE = (1024, 1024)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny benchmark: 2 simulated 1024 x 1024 DECam-like CCDs, both modes, 2 and 1 workers."""
    from benchmarks.suite import BenchmarkConfig, run_benchmark

    out = tmp_path_factory.mktemp("bench")
    config = BenchmarkConfig(n_ccds=2, shape=SHAPE, seed=11, density_factor=4.0, workers=2, saliency_n=4)
    return out, run_benchmark(config, out)


def _run_json(out: Path, run: dict) -> dict:
    return json.loads((out / run["run_json"]).read_text())


def test_report_files(bench):
    out, data = bench
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["headline"]["modes"].keys() == {"dia", "direct"}
    html = (out / "report.html").read_text()
    # self-contained: every figure embedded as a decodable PNG, no link to a file
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == len(data["figures"]) >= 5
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert 'src="plots/' not in html
    md = (out / "report.md").read_text()
    for rel in data["figures"].values():
        assert (out / rel).is_file() and f"]({rel})" in md
    assert data["machine"]["cores"] == len(os.sched_getaffinity(0)) and data["versions"]["numpy"] == np.__version__
    # --device cpu (the default): CPU runs only, whatever this machine has, and the report says so
    # with the reason the GPU check gave
    from benchmarks.suite import gpu_available

    assert data["config"]["device"] == "cpu" and {r["device"] for r in data["runs"]} == {"cpu"}
    note = data["device_note"]
    assert note.startswith("CPU only") and gpu_available()[1] in note
    assert f"Device: {note}" in md


def test_costs_equal_run_json(bench):
    out, data = bench
    assert {(r["mode"], r["workers"]) for r in data["runs"]} == {("dia", 2), ("direct", 2), ("dia", 1), ("direct", 1)}
    for run in data["runs"]:
        rj = _run_json(out, run)
        cost = run["cost"]
        done = [r for r in rj["ccds"] if r["status"] == "done"]
        assert cost["n_done"] == len(done) > 0
        stages = {s["stage"]: s for s in cost["stages"]}
        for stage, tab in rj["stage_wall_s"].items():
            if stage == "subtract":
                # the split into PSF fit + convolve/subtract adds up to the stage
                assert stages["psf_fit"]["wall_total"] + stages["convolve"]["wall_total"] == pytest.approx(tab["total"])
                assert stages["psf_fit"]["cpu_total"] + stages["convolve"]["cpu_total"] == pytest.approx(
                    rj["stage_cpu_s"]["subtract"]["total"])
                assert 0 < stages["psf_fit"]["wall_s"] < tab["total"] / tab["n"]
            else:
                assert stages[stage]["wall_total"] == pytest.approx(tab["total"])
                assert stages[stage]["wall_s"] == pytest.approx(tab["total"] / tab["n"])
                assert stages[stage]["cpu_s"] == pytest.approx(rj["stage_cpu_s"][stage]["total"] / tab["n"])
        per_ccd_wall = [sum(r["wall_s"].values()) for r in done]
        assert cost["wall_per_ccd"] == pytest.approx(np.mean(per_ccd_wall))
        assert cost["ccds_per_core_hour"] == pytest.approx(3600 / np.mean(per_ccd_wall))
        assert run["wall_s"] == pytest.approx(rj["wall_s"])
        peak = max(v for r in rj["ccds"] for v in r["peak_rss_mb"].values())
        assert cost["peak_rss_mb_max"] == pytest.approx(peak)
        assert set(cost["peak_rss_mb_per_worker"]) == {r["worker"] for r in rj["ccds"]}
        if run["workers"] == 1:  # 2 CCDs on one worker: the later run of each stage is the steady state
            steady = {s["stage"]: s for s in cost["steady"]["stages"]}
            for stage in rj["stage_wall_s"]:
                times = sorted((r["stage_start_unix"][stage], r["wall_s"][stage]) for r in done)
                rows = ("psf_fit", "convolve") if stage == "subtract" else (stage,)
                assert all(steady[row]["n"] == 1 and steady[row]["n_first"] == 1 for row in rows)
                if stage != "subtract":
                    assert steady[stage]["wall_s"] == pytest.approx(times[1][1])
                    assert steady[stage]["first_wall_s"] == pytest.approx(times[0][1])
            assert cost["steady"]["wall_per_ccd"] == pytest.approx(sum(s["wall_s"] for s in steady.values()))
    main = {r["mode"]: r for r in data["runs"] if r["workers"] == 2}
    ratio = data["ratio"]["cpu"]
    assert ratio["wall"] == pytest.approx(main["dia"]["cost"]["wall_per_ccd"] / main["direct"]["cost"]["wall_per_ccd"])
    assert ratio["cpu"] == pytest.approx(main["dia"]["cost"]["cpu_per_ccd"] / main["direct"]["cost"]["cpu_per_ccd"])
    h = data["headline"]
    assert h["ratio_dia_over_direct"]["wall"] == ratio["wall"]
    assert h["modes"]["dia"]["wall_s_per_ccd"] == main["dia"]["cost"]["wall_per_ccd"]


def test_scaling_and_extrapolation(bench):
    out, data = bench
    runs = {(r["mode"], r["workers"]): r for r in data["runs"]}
    for mode, s in data["scaling"].items():
        w1, w2 = _run_json(out, runs[(mode, 1)])["wall_s"], _run_json(out, runs[(mode, 2)])["wall_s"]
        assert s["speedup"] == pytest.approx(w1 / w2)
        assert s["efficiency"] == pytest.approx(w1 / w2 / 2)
    for mode in ("dia", "direct"):
        core_s = runs[(mode, 2)]["cost"]["core_s_per_ccd"]
        decam, lsst = data["extrapolation"]["cpu"][mode]
        assert decam["core_hours"] == pytest.approx(62 * core_s * 4096 * 2048 / (SHAPE[0] * SHAPE[1]) / 3600)
        assert lsst["core_hours"] == pytest.approx(189 * core_s * 4096 * 4096 / (SHAPE[0] * SHAPE[1]) / 3600)
        assert lsst["wall_min_on_workers"]["64"] == pytest.approx(
            max(lsst["core_hours"] * 60 / 64, lsst["core_s_per_ccd"] / 60))
        assert decam["wall_min_on_workers"]["2"] == pytest.approx(decam["core_hours"] * 60 / 2)


def test_end_to_end_recomputed_from_catalogs_and_truth(bench):
    out, data = bench
    truths = {e: Table.read(out / "input" / f"{e}_truth.ecsv", format="ascii.ecsv") for e in data["input"]["ccds"]}
    edge = data["run_config"]["dia"]["detect"]["edge"]
    assert data["end_to_end_ccds"] == data["input"]["ccds"]  # no CCD failed: all counted
    for run in data["runs"]:
        e2e = run["end_to_end"]
        cat = Table.read(out / run["dir"] / "candidates.fits")
        ccd = np.char.strip(np.asarray(cat["ccd"]).astype(str))
        kind = np.char.strip(np.asarray(cat["truth_kind"]).astype(str))
        sel = np.asarray(cat["score"]) >= data["config"]["score_threshold"]
        n_tr = n_sel = 0
        mags_sel = []
        for name, t in truths.items():
            x, y = np.asarray(t["x"]), np.asarray(t["y"])
            real = (np.asarray(t["kind"]) == "transient") & (x >= edge) & (x < SHAPE[1] - edge) \
                & (y >= edge) & (y < SHAPE[0] - edge)
            hit = set(np.asarray(cat["truth_id"])[(ccd == name) & (kind == "transient") & sel].tolist())
            found = [i in hit for i in np.asarray(t["id"])[real]]
            n_tr += int(real.sum())
            n_sel += int(np.sum(found))
            mags_sel += list(np.asarray(t["mag"])[real][found])
        n_fp = int((sel & (kind != "transient")).sum())
        assert e2e["n_transients"] == n_tr > 0
        assert e2e["n_selected"] == n_sel
        assert e2e["n_false_positives"] == n_fp
        assert e2e["completeness"] == pytest.approx(n_sel / n_tr)
        assert e2e["false_positives_per_ccd"] == pytest.approx(n_fp / len(truths))
        area = len(truths) * SHAPE[0] * SHAPE[1] * (0.263 / 3600) ** 2
        assert e2e["false_positives_per_deg2"] == pytest.approx(n_fp / area)
        n_pos = int(sel.sum())
        assert e2e["purity"] == pytest.approx((n_pos - n_fp) / n_pos)
        # the per-magnitude bins add up, and agree with the pipeline's own truth summary in run.json
        assert sum(b["n"] for b in e2e["by_mag"]) == n_tr
        assert sum(b["n_completeness"] for b in e2e["by_mag"]) == n_sel
        for b in e2e["by_mag"]:
            assert b["n_completeness"] == sum(b["lo"] <= m < b["hi"] for m in mags_sel)
        ts = _run_json(out, run)["truth_summary"]
        assert (ts["n_transients"], ts["n_selected"], ts["n_false_positives"]) == (n_tr, n_sel, n_fp)


def test_stamp_level_uses_the_runs_candidates(bench):
    out, data = bench
    from benchmarks.suite import DIRECT_MODELS
    from classifier.infer import WEIGHTS_DIR
    from pipeline.detect import CandidateFlags

    sl = data["stamp_level"]
    assert sl["same_candidates_as_run"] and all(sl["same_candidates_as_run"].values())
    run = next(r for r in data["runs"] if r["mode"] == "dia" and r["workers"] == 2)
    cat = Table.read(out / run["dir"] / "candidates.fits")
    inner = (np.asarray(cat["flags"]) & int(CandidateFlags.EDGE)) == 0
    real = np.char.strip(np.asarray(cat["truth_kind"]).astype(str)) == "transient"
    assert sl["streams"]["dia"] == {"n": int(inner.sum()), "n_real": int((inner & real).sum()),
                                    "n_bogus": int((inner & ~real).sum())}
    shipped = {p.stem for p in WEIGHTS_DIR.glob("*.pt")}
    for row in sl["models"]:
        assert row["status"] == ("ok" if row["model"] in shipped else "missing"), row
        if row["status"] == "ok":
            res = row["result"]
            assert res["n"] == sl["streams"][row["stream"]]["n"]
            c = res["confusion"]
            assert res["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / res["n"])
            assert c["tp"] + c["fn"] == res["n_real"]
            # the training data recorded with the shipped weights (they all carry it)
            trained_stream = "direct" if row["model"] in DIRECT_MODELS else "dia"
            assert f"{trained_stream}-stream stamps from" in row["trained_on"]
    assert any(r["status"] == "ok" for r in sl["models"]), "no shipped weights at all"


def test_magnitude_at_completeness():
    centers = np.array([20.0, 21.0, 22.0, 23.0, 24.0])
    assert metrics.magnitude_at_completeness(centers, [1.0, 0.9, 0.7, 0.3, 0.0]) == pytest.approx(22.5)
    # empty bins are skipped; a curve that never reaches / never leaves 50% has no m50
    assert metrics.magnitude_at_completeness(centers, [1.0, np.nan, 0.8, 0.2, 0.0]) == pytest.approx(22.5)
    assert metrics.magnitude_at_completeness(centers, [0.4, 0.3, 0.2, 0.1, 0.0]) is None
    assert metrics.magnitude_at_completeness(centers, [1.0] * 5) is None


def test_completeness_curves_known_truth():
    truth = Table({"id": [1, 2, 3, 4, 5], "kind": ["transient"] * 4 + ["star"],
                   "x": [100.0, 200, 300, 5, 400], "y": [100.0, 200, 300, 300, 400],
                   "mag": [20.1, 21.2, 22.3, 20.5, 18.0], "snr": [80.0, 30, 8, 50, np.nan]})
    truth.meta.update(shape=[500, 500], pixel_scale=0.5)
    cat = Table({"truth_id": [1, 2, 5, 3, -1], "truth_kind": ["transient", "transient", "star", "", ""],
                 "score": [0.9, 0.2, 0.8, 0.9, 0.7]})
    r = metrics.completeness_curves({"c": cat}, {"c": truth}, 0.5, edge=25, mag_step=1.0)
    # id 4 lies in the edge; id 3's candidate is not matched to it (truth_kind empty)
    assert (r["n_transients"], r["n_detected"], r["n_selected"], r["n_false_positives"]) == (3, 2, 1, 3)
    assert r["purity"] == pytest.approx(1 / 4)
    assert r["false_positives_per_deg2"] == pytest.approx(3 / (500 * 500 * (0.5 / 3600) ** 2))
    assert [(b["lo"], b["n"], b["n_completeness"], b["n_detected"]) for b in r["by_mag"]] == [
        (20.0, 1, 1, 1), (21.0, 1, 0, 1), (22.0, 1, 0, 0)]


def test_cli_rejects_missing_manifest(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["benchmark", "--out", str(tmp_path / "o"), "--input", str(tmp_path / "none.ecsv")]) == 2
    assert "no such manifest" in capsys.readouterr().err


def test_report_plots_leave_the_matplotlib_backend_alone(bench, tmp_path):
    """The report's plots and the simulator benchmark's picture neither switch the caller's
    backend nor load pyplot (in a fresh process whose backend is svg)."""
    out, _ = bench
    code = textwrap.dedent(f"""
        import json
        import sys
        import matplotlib
        matplotlib.use("svg")  # a caller's choice, not Agg
        from benchmarks.bench_simulate import _cutout_png
        from benchmarks.report import make_plots
        from pipeline.simulate import SimulationConfig, simulate_pair
        paths = make_plots(json.loads(open({str(out / "report.json")!r}).read()), {str(tmp_path)!r})
        _cutout_png(simulate_pair(SimulationConfig(shape=(256, 256)), 1, 0), {str(tmp_path / "sim.png")!r}, size=128)
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, len(paths))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["svg", "False", "5"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*.png"))) == 6


# ----------------------------------------------------------------------------- intervals, curves, the answer


def test_binomial_interval_known_values():
    """Wilson 95% intervals against the values published by Newcombe (1998, Stat. Med. 17, 857, Table II)
    and against scipy's independent implementation."""
    from scipy.stats import binomtest

    published = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                 (1, 29): (0.0061, 0.1718)}
    for (k, n), (lo, hi) in published.items():
        assert metrics.binomial_interval(k, n, 0.95) == pytest.approx([lo, hi], abs=6e-5)
    for k, n in ((0, 10), (10, 10), (3, 7), (437, 500), (1, 1)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert metrics.binomial_interval(k, n) == pytest.approx([ci.low, ci.high], abs=1e-9)
    # 0/n starts at 0 and n/n ends at 1, neither is degenerate; 68% is narrower than 95%
    assert metrics.binomial_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert metrics.binomial_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    lo68, hi68 = metrics.binomial_interval(30, 40, 0.68)
    lo95, hi95 = metrics.binomial_interval(30, 40, 0.95)
    assert lo95 < lo68 < 0.75 < hi68 < hi95
    assert metrics.binomial_interval(0, 0) is None
    with pytest.raises(ValueError, match="k=5, n=3"):
        metrics.binomial_interval(5, 3)


def test_poisson_interval_known_values():
    """Exact (Garwood) 95% intervals: the tabulated 0 -> [0, 3.689], 1 -> [0.0253, 5.572], 10 -> [4.795, 18.39]."""
    assert metrics.poisson_interval(0) == pytest.approx([0.0, 3.6889], abs=1e-4)
    assert metrics.poisson_interval(1) == pytest.approx([0.0253, 5.5716], abs=1e-4)
    assert metrics.poisson_interval(10) == pytest.approx([4.7954, 18.3904], abs=1e-4)
    # per CCD: the count's interval divided by the CCDs
    assert metrics.poisson_interval(10, scale=1 / 4) == pytest.approx([4.7954 / 4, 18.3904 / 4], abs=1e-4)


def test_paired_difference():
    from scipy.stats import binomtest

    # identical outcomes: no difference, not significant
    a = np.array([True] * 30 + [False] * 10)
    r = metrics.paired_difference(a, a)
    assert r["difference"] == 0 and r["interval"][0] < 0 < r["interval"][1] and not r["significant"]
    assert r["p_value"] == 1.0
    # a table whose corrected phi is 0 (0 <= ad - bc <= n/2): Newcombe's square-and-add of the two Wilson intervals
    both, only_a, only_b, neither = 10, 8, 2, 2
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    n = a.size
    w1 = binomtest(18, n).proportion_ci(0.95, "wilson")
    w2 = binomtest(12, n).proportion_ci(0.95, "wilson")
    p1, p2 = 18 / n, 12 / n
    r = metrics.paired_difference(a, b)
    assert (r["only_a"], r["only_b"], r["difference"]) == (8, 2, pytest.approx(6 / 22))
    assert r["interval"] == pytest.approx([p1 - p2 - np.hypot(p1 - w1.low, w2.high - p2),
                                           p1 - p2 + np.hypot(w1.high - p1, p2 - w2.low)])
    assert r["p_value"] == pytest.approx(binomtest(8, 10, 0.5).pvalue)  # McNemar exact
    # one mode finds everything the other does and 20 more of 100: significant
    a = np.arange(100) < 80
    b = np.arange(100) < 60
    r = metrics.paired_difference(a, b)
    assert r["significant"] and r["interval"][0] > 0 and r["p_value"] < 1e-5
    # coverage: correlated outcomes with a known difference of proportions (0.85 vs 0.80)
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(300):
        u = rng.random(200)
        x, y = u < 0.85, (u < 0.80) ^ ((rng.random(200) < 0.05) & (u < 0.85))
        truth = 0.85 - (0.80 * 0.95 + 0.05 * 0.05)
        lo, hi = metrics.paired_difference(x, y)["interval"]
        hits += lo <= truth <= hi
    assert 0.92 <= hits / 300 <= 0.99
    assert metrics.paired_difference(np.zeros(0, bool), np.zeros(0, bool)) is None


def test_poisson_difference():
    same = metrics.poisson_difference(12, 12, exposure=4)
    assert same["ratio"] == 1 and same["difference"] == 0 and not same["significant"]
    assert same["ratio_interval"][0] < 1 < same["ratio_interval"][1]
    more = metrics.poisson_difference(63, 20, exposure=4)
    assert more["difference"] == pytest.approx(43 / 4) and more["ratio"] == pytest.approx(63 / 20)
    assert more["significant"] and more["ratio_interval"][0] > 1 and more["p_value"] < 1e-4
    assert more["difference_interval"] == pytest.approx([43 / 4 - 1.959964 * np.sqrt(83) / 4,
                                                         43 / 4 + 1.959964 * np.sqrt(83) / 4], rel=1e-5)
    none = metrics.poisson_difference(0, 0)
    assert none["ratio"] is None and not none["significant"]


def test_operating_curve_known_values():
    # 3 transients (one never detected), 2 false positives, 2 CCDs
    curve = metrics.operating_curve([0.9, 0.2, -np.inf], [0.8, 0.1], n_ccds=2, threshold=0.5)
    assert curve["threshold"] == [0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0]
    assert curve["n_selected"] == [2, 2, 2, 1, 1, 1, 0]
    assert curve["n_false_positives"] == [2, 2, 1, 1, 1, 0, 0]
    assert curve["completeness"] == pytest.approx([2 / 3] * 3 + [1 / 3] * 3 + [0])
    assert curve["false_positives_per_ccd"] == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0, 0])
    assert curve["threshold"][curve["operating_index"]] == 0.5
    assert np.all(np.diff(curve["completeness"]) <= 0) and np.all(np.diff(curve["false_positives_per_ccd"]) <= 0)
    # matched points: the lowest threshold with at most 0.5 FP/CCD; the highest keeping 2/3 completeness
    p = metrics.point_at_fp(curve, 0.5)
    assert (p["threshold"], p["n_selected"], p["n_false_positives"]) == (0.2, 2, 1)
    assert p["completeness_ci"] == metrics.binomial_interval(2, 3)
    assert p["false_positives_per_ccd_ci"] == pytest.approx(metrics.poisson_interval(1, scale=0.5))
    assert metrics.point_at_completeness(curve, 2 / 3)["threshold"] == 0.2
    assert metrics.point_at_completeness(curve, 0.9) is None  # never that complete
    assert metrics.point_at_fp(curve, 0.0)["threshold"] == 0.9
    # a score of exactly 1 still counts at threshold 1
    assert metrics.operating_curve([1.0], [1.0], 1)["n_false_positives"][-1] == 1


def _known_truth():
    truth = Table({"id": [1, 2, 3, 4, 5, 6, 7], "kind": ["transient"] * 4 + ["star", "cosmic_ray", "galaxy"],
                   "x": [100.0, 200, 300, 5, 400, 50, 60], "y": [100.0, 200, 300, 300, 400, 50, 60],
                   "mag": [20.1, 21.2, 22.3, 20.5, 18.0, np.nan, 19.0], "snr": [80.0, 30, 8, 50, np.nan, np.nan, 3]})
    truth.meta.update(shape=[500, 500], pixel_scale=0.5)
    return truth


def test_false_positives_by_kind_and_curve_of_a_catalog():
    cat = Table({"truth_id": [1, 2, 5, 3, -1, 6, 7, 7], "score": [0.9, 0.2, 0.8, 0.9, 0.7, 0.3, 0.6, 0.95],
                 "truth_kind": ["transient", "transient", "star", "", "", "cosmic_ray", "galaxy", "galaxy"]})
    r = metrics.completeness_curves({"c": cat}, {"c": _known_truth()}, 0.5, edge=25, mag_step=1.0)
    by = {row["kind"]: row for row in r["false_positives_by_kind"]}
    assert [row["kind"] for row in r["false_positives_by_kind"]] == ["star", "galaxy", "cosmic_ray", "unmatched"]
    assert {k: (v["n_candidates"], v["n"]) for k, v in by.items()} == {
        "star": (1, 1), "galaxy": (2, 2), "cosmic_ray": (1, 0), "unmatched": (2, 2)}
    assert sum(v["n"] for v in by.values()) == r["n_false_positives"] == 5
    assert by["galaxy"]["per_ccd_ci"] == pytest.approx(metrics.poisson_interval(2))
    # the curve agrees with the counts at the operating threshold and sweeps to the right ends
    c = r["operating_curve"]
    i = c["operating_index"]
    assert c["threshold"][i] == 0.5 and c["n_selected"][i] == r["n_selected"] == 1
    assert c["n_false_positives"][i] == 5
    assert (c["n_selected"][0], c["n_false_positives"][0]) == (2, 6)  # threshold 0: all detected, all false
    assert (c["n_selected"][-1], c["n_false_positives"][-1]) == (0, 0)
    assert r["completeness_ci"] == metrics.binomial_interval(1, 3)
    assert r["purity_ci"] == metrics.binomial_interval(1, 6)
    assert r["by_mag"][0]["completeness_ci"] == metrics.binomial_interval(1, 1)


def test_compare_modes_on_the_same_transients():
    truth = {"c": _known_truth()}
    ref = Table({"truth_id": [1, 2, 3, -1], "score": [0.9, 0.8, 0.7, 0.9],
                 "truth_kind": ["transient", "transient", "transient", ""]})
    oth = Table({"truth_id": [1, 2, 5, -1, 6], "score": [0.9, 0.3, 0.9, 0.9, 0.6],
                 "truth_kind": ["transient", "transient", "star", "", "cosmic_ray"]})
    o_ref = metrics.transient_outcomes({"c": ref}, truth, edge=25)
    o_oth = metrics.transient_outcomes({"c": oth}, truth, edge=25)
    r = metrics.compare_modes(o_ref, o_oth, 0.5, 0.5, mag_step=1.0, n_boot=50)
    c = r["completeness"]
    assert (c["n"], c["k_a"], c["k_b"], c["only_a"], c["only_b"]) == (3, 1, 3, 0, 2)
    assert c["difference"] == pytest.approx(-2 / 3)
    f = r["false_positives_per_ccd"]
    assert (f["k_a"], f["k_b"], f["difference"], f["ratio"]) == (3, 1, 2.0, 3.0)
    # the other mode at the reference's 1 FP/CCD: two of its false positives score 0.9, so only threshold 1 does
    by = {(m["mode"], m["matched_to"]): m for m in r["matched"]}
    p = by[("other", "false_positives_per_ccd")]["point"]
    assert (p["n_false_positives"], p["threshold"], p["n_selected"]) == (0, 1.0, 0)
    assert by[("other", "completeness")]["point"] is None  # it never finds 3 of 3
    assert by[("reference", "false_positives_per_ccd")]["point"]["threshold"] == 0.0
    with pytest.raises(ValueError, match="same transients"):
        other_truth = _known_truth()
        other_truth["id"][0] = 99
        metrics.compare_modes(o_ref, metrics.transient_outcomes({"c": oth}, {"c": other_truth}, edge=25), 0.5, 0.5)


def _neighbour_truth():
    """Four transients (search FWHM 4 px: neighbours within 8 px): one isolated, one 2 mag under a galaxy 3 px away,
    one beside a star 0.5 mag fainter 5 px away, one 4 mag under a star 7.9 px away and 1 mag under a variable 5 px
    away; a star 1 mag brighter 9 px from the first is out of reach, and so is a cosmic ray (not a neighbour kind)."""
    truth = Table({"id": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                   "kind": ["transient"] * 4 + ["galaxy", "star", "star", "variable", "star", "cosmic_ray"],
                   "x": [100.0, 200, 300, 400, 203, 305, 400, 400, 109, 201],
                   "y": [100.0, 200, 300, 400, 200, 300, 407.9, 395, 100, 200],
                   "mag": [21.0, 22.0, 21.0, 22.0, 20.0, 21.5, 18.0, 21.0, 20.0, np.nan],
                   "snr": [20.0, 10, 20, 10, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan]})
    truth.meta.update(shape=[500, 500], pixel_scale=0.5, search_fwhm=4.0)
    return truth


def test_neighbour_contrast_of_known_truth():
    truth = _neighbour_truth()
    got = metrics.neighbour_contrast(truth)
    assert got[:4] == pytest.approx([-np.inf, 2.0, -0.5, 4.0])
    assert np.isnan(got[4:]).all()  # only transients get a value
    # a wider neighbourhood reaches the star 9 px from the first; no FWHM in the truth: no value at all
    assert metrics.neighbour_contrast(truth, radius_fwhm=2.5)[0] == pytest.approx(1.0)
    truth.meta.pop("search_fwhm")
    assert np.isnan(metrics.neighbour_contrast(truth)).all()


def test_completeness_and_mode_difference_by_neighbour():
    truth = {"c": _neighbour_truth()}
    # dia selects all four transients; direct the isolated one and the one beside a fainter star
    ref = Table({"truth_id": [1, 2, 3, 4], "score": [0.9, 0.9, 0.9, 0.9], "truth_kind": ["transient"] * 4})
    oth = Table({"truth_id": [1, 2, 3], "score": [0.9, 0.2, 0.9], "truth_kind": ["transient"] * 3})
    curves = metrics.completeness_curves({"c": oth}, truth, 0.5, edge=25)
    assert [(b["lo"], b["n"], b["n_completeness"], b["n_detected"]) for b in curves["by_neighbour"]] == [
        (-np.inf, 2, 2, 2), (0.0, 0, 0, 0), (1.0, 0, 0, 0), (2.0, 1, 0, 1), (3.0, 1, 0, 0)]
    r = metrics.compare_modes(metrics.transient_outcomes({"c": ref}, truth, edge=25),
                              metrics.transient_outcomes({"c": oth}, truth, edge=25), 0.5, 0.5, n_boot=20)
    d = [row["difference"] for row in r["by_neighbour"]]
    assert [(x["n"], x["k_a"], x["k_b"]) if x else None for x in d] == [(2, 2, 2), None, None, (1, 0, 1), (1, 0, 1)]
    g = r["neighbour_groups"]
    assert (g["isolated"]["difference"], g["outshone"]["difference"]) == (0.0, -1.0)
    assert (g["outshone"]["n"], g["outshone"]["only_b"]) == (2, 2)
    # a truth without a FWHM: no bins, no groups, and the report leaves the table out
    bare = _neighbour_truth()
    bare.meta.pop("search_fwhm")
    assert metrics.completeness_curves({"c": oth}, {"c": bare}, 0.5, edge=25)["by_neighbour"] == []
    r2 = metrics.compare_modes(metrics.transient_outcomes({"c": ref}, {"c": bare}, edge=25),
                               metrics.transient_outcomes({"c": oth}, {"c": bare}, edge=25), 0.5, 0.5, n_boot=20)
    assert r2["by_neighbour"] == [] and r2["neighbour_groups"] == {}


def test_report_shows_completeness_by_neighbour(bench):
    """The report's neighbour table and answer sentence carry report.json's numbers (the bench's truth has a FWHM)."""
    from benchmarks.report import _neighbour_label, answer

    out, _ = bench
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    e2e = {r["mode"]: r["end_to_end"] for r in data["runs"] if r["workers"] == 2}
    cmp = data["comparison"]["cpu"]
    assert "| brightest neighbour | transients |" in md
    for i, bn in enumerate(e2e["dia"]["by_neighbour"]):
        assert bn["n"] == e2e["direct"]["by_neighbour"][i]["n"]
        d = cmp["by_neighbour"][i]["difference"]
        assert (d is None) == (bn["n"] == 0)
        if bn["n"]:
            line = next(row for row in md.split("\n") if row.startswith(f"| {_neighbour_label(bn['lo'], bn['hi'])} |"))
            assert f"| {bn['n']} |" in line and f"{100 * d['difference']:+.1f} [" in line
    assert sum(bn["n"] for bn in e2e["dia"]["by_neighbour"]) == cmp["n_transients"]
    iso = cmp["neighbour_groups"]["isolated"]
    assert f"on the {iso['n']} with no brighter neighbour direct selects {iso['k_a'] / iso['n']:.1%}" in \
        data["answer"]["text"]
    no_fwhm = json.loads(json.dumps(data))
    no_fwhm["comparison"]["cpu"]["neighbour_groups"] = {}
    assert "brightest star, galaxy or variable" not in answer(no_fwhm)["text"]


def test_answer_follows_the_numbers(bench):
    """The first paragraph of report.md is the answer, its numbers are report.json's, and the
    verdict changes with them (no wording fixed in advance)."""
    from benchmarks.report import _pct_ci, answer

    out, _ = bench
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text().split("\n")
    first = next(line for line in md[1:] if line.strip())
    assert first.startswith("**Answer.**") and first == data["answer"]["text"]
    h, cmp = data["headline"]["modes"], data["comparison"]["cpu"]
    dia = next(r for r in data["runs"] if r["mode"] == "dia" and r["workers"] == 2)["end_to_end"]
    direct = next(r for r in data["runs"] if r["mode"] == "direct" and r["workers"] == 2)["end_to_end"]
    for piece in (f"{h['direct']['wall_s_per_ccd']:.2f} s per CCD", f"{h['dia']['wall_s_per_ccd']:.2f} s with it",
                  f"dia / direct = {data['ratio']['cpu']['wall']:.2f}",
                  f"In CPU time: {h['direct']['cpu_s_per_ccd']:.2f} against {h['dia']['cpu_s_per_ccd']:.2f} s per CCD, "
                  f"ratio {data['ratio']['cpu']['cpu']:.2f}",
                  f"direct selects {_pct_ci(direct['completeness'], direct['completeness_ci'])}",
                  f"dia {_pct_ci(dia['completeness'], dia['completeness_ci'])}",
                  f"{100 * (direct['completeness'] - dia['completeness']):+.1f} points",
                  f"direct {direct['false_positives_per_ccd']:.2f} [{direct['false_positives_per_ccd_ci'][0]:.2f}",
                  f"dia {dia['false_positives_per_ccd']:.2f} [{dia['false_positives_per_ccd_ci'][0]:.2f}",
                  f"{direct['false_positives_per_ccd'] - dia['false_positives_per_ccd']:+.2f} per CCD",
                  f"{cmp['completeness']['interval'][0] * 100:+.1f}, {cmp['completeness']['interval'][1] * 100:+.1f}]"):
        assert piece in first, piece
    if dia["m50"] is not None and direct["m50"] is not None:
        assert f"{direct['m50']:.2f} (direct) against {dia['m50']:.2f} (dia)" in first
    saving = f"saves {h['dia']['wall_s_per_ccd'] - h['direct']['wall_s_per_ccd']:.2f} s per CCD"
    per_ccd = list(data["ratio"]["cpu"]["per_ccd"].values())
    assert (saving in first) == (data["ratio"]["cpu"]["wall"] > 1 and min(per_ccd) > 1)
    # the steady-state cost is stated when the runs give one, from their cost summaries
    main_runs = {r["mode"]: r for r in data["runs"] if r["workers"] == 2}
    steady = {m: (r["cost"].get("steady") or {}).get("wall_per_ccd") for m, r in main_runs.items()}
    assert ("In steady state" in first) == all(v is not None and math.isfinite(v) for v in steady.values())
    given = json.loads(json.dumps(data))
    for r in given["runs"]:
        if r["workers"] == 2:
            r["cost"]["steady"] = {"wall_per_ccd": 2.0 if r["mode"] == "dia" else 1.25}
    stated = answer(given)
    assert stated["steady_ratio"] == pytest.approx(1.6)
    assert ("In steady state (each worker's first run of each stage left out, as in a long run): 1.25 against "
            "2.00 s per CCD, ratio 1.60.") in stated["text"]
    # the numbers in the first paragraph are those of report.json (the paired counts agree with the runs)
    assert cmp["completeness"]["k_a"] == direct["n_selected"] and cmp["completeness"]["k_b"] == dia["n_selected"]
    assert cmp["false_positives_per_ccd"]["k_a"] == direct["n_false_positives"]
    # the verdict is derived: flip the significance and the cost and it says the opposite
    sig = cmp["completeness"]["significant"]
    assert ("a significant" in data["answer"]["verdict"]) == sig
    flipped = json.loads(json.dumps(data))
    c = flipped["comparison"]["cpu"]["completeness"]
    c["significant"], c["interval"] = (False, [c["difference"] - 0.5, c["difference"] + 0.5]) if sig else \
        (True, [c["difference"] - 1e-3, c["difference"] - 1e-4])
    v = answer(flipped)["verdict"]
    # the completeness clause only (the false-positive clause may say "not significantly different")
    assert ("completeness change" in v and "is not significant" in v) == sig
    assert ("a significant" in v) == (not sig)
    f = flipped["comparison"]["cpu"]["false_positives_per_ccd"]
    f.update(significant=False)
    c.update(significant=False, interval=[-0.5, 0.5])
    flipped["ratio"]["cpu"].update(wall=2.0, cpu=1.9, per_ccd={"a": 1.8, "b": 2.2})
    assert answer(flipped)["verdict"].endswith("no measurable loss of accuracy on this field.")
    assert "direct is 2.00x cheaper per CCD" in answer(flipped)["verdict"]
    flipped["ratio"]["cpu"].update(wall=3.0, cpu=1.2)  # a loaded machine: wall and CPU disagree, both are said
    assert "direct is 1.20x (CPU) to 3.00x (wall) cheaper per CCD" in answer(flipped)["verdict"]
    assert "wall and CPU ratios disagree" in answer(flipped)["text"]
    flipped["ratio"]["cpu"].update(wall=0.8, cpu=0.8, per_ccd={"a": 0.7, "b": 0.9})
    assert "not cheaper" in answer(flipped)["verdict"]
    assert answer(flipped)["verdict"].endswith("skipping DIA brings no saving here.")
    # a 3% saving with CCDs on both sides of 1 is no saving: the modes cost the same
    flipped["ratio"]["cpu"].update(wall=1.03, cpu=1.04, per_ccd={"a": 0.9, "b": 1.17})
    same = answer(flipped)
    assert "direct costs the same as dia" in same["verdict"] and same["same_cost"]
    assert "cost the same within the scatter" in same["text"] and "saves" not in same["text"]
    assert same["verdict"].endswith("skipping DIA brings no saving here.")


def test_report_curves_and_kinds_agree_with_the_runs(bench):
    out, data = bench
    for run in data["runs"]:
        e = run["end_to_end"]
        c = e["operating_curve"]
        i = c["operating_index"]
        assert c["threshold"][i] == data["config"]["score_threshold"]
        assert (c["n_selected"][i], c["n_false_positives"][i]) == (e["n_selected"], e["n_false_positives"])
        assert c["n_selected"][0] == e["n_detected"]  # threshold 0: every detected transient
        assert sum(r["n"] for r in e["false_positives_by_kind"]) == e["n_false_positives"]
        assert e["completeness_ci"][0] <= e["completeness"] <= e["completeness_ci"][1]
    md = (out / "report.md").read_text()
    assert "## End-to-end accuracy" in md and "### Operating curves" in md and "### False positives by kind" in md
    assert "Wilson score interval" in md and "95%" in md
    assert {"operating_curve", "fp_by_kind", "completeness", "roc"} <= set(data["figures"])


def test_run_table_reaches_both_modes_runs_and_is_checked(tmp_path, monkeypatch):
    """``pipeline benchmark --config FILE``: its [run] table sets the RunConfig of both modes' runs (the dense
    direct detector, say); mode, device and threshold stay the benchmark's; a bad field is refused up front."""
    from benchmarks import suite
    from pipeline.cli import main

    cfg = suite.BenchmarkConfig(run={"direct": {"selection": "dense"}, "model_dia": "pair"}, score_threshold=0.7)
    dia, direct = (suite.run_config_of(cfg, mode, "cpu") for mode in ("dia", "direct"))
    assert direct.direct.selection == "dense" and direct.model == "pair-dense" and direct.score_threshold == 0.7
    assert dia.mode == "dia" and dia.model == "pair" and suite.run_config_of(suite.BenchmarkConfig(), "direct",
                                                                              "cpu").direct.selection == "flux"
    with pytest.raises(ValueError, match="benchmark's own"):
        suite.BenchmarkConfig(run={"mode": "dia"})
    with pytest.raises(ValueError, match="selection"):
        suite.BenchmarkConfig(run={"direct": {"selection": "nope"}})

    seen = {}

    class Stop(Exception):
        pass

    def fake(config, out, manifest=None, log=None):
        seen["run"] = config.run
        raise Stop

    monkeypatch.setattr(suite, "run_benchmark", fake)
    toml = tmp_path / "dense.toml"
    toml.write_text('[run.direct]\nselection = "dense"\n')
    with pytest.raises(Stop):
        main(["benchmark", "--out", str(tmp_path / "o"), "--config", str(toml), "--quiet"])
    assert seen["run"] == {"direct": {"selection": "dense"}}
    toml.write_text('[run.direct]\nselection = "nope"\n')
    assert main(["benchmark", "--out", str(tmp_path / "o"), "--config", str(toml), "--quiet"]) == 2


def test_trained_on_names_every_part_of_a_concatenated_set():
    """benchmarks.suite._trained_on: the provenance of weights trained on a set made of several (pair-dense:
    the direct stream + stamps mined off the search peaks) names each part."""
    from benchmarks.suite import _trained_on

    base = {"stream": "direct", "source": "simulated", "instrument": "decam",
            "dataset_config": {"n_ccds": 96, "seed": 1000}}
    mined = {"stream": "direct", "source": "simulated", "simulation_seeds": [1500], "offpeak": {"ccds": 40}}
    meta = {"provenance": {"train": {"n": 43473, "attrs": dict(base, concatenated=[base, mined])}}}
    assert _trained_on(meta) == ("43473 direct-stream stamps from 96 DECam simulated CCDs, seed 1000 + 40 simulated "
                                 "CCDs off the search peaks, seed 1500")
    assert _trained_on({"provenance": {"train": {"n": 5, "attrs": base}}}) == ("5 direct-stream stamps from 96 DECam "
                                                                                 "simulated CCDs, seed 1000")
    assert _trained_on({}) == "unrecorded"
