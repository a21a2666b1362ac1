"""``pipeline benchmark``: the report's numbers agree with the runs it made (not their size)."""

from __future__ import annotations

import base64
import json
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
            trained_stream = "direct" if row["model"] == "pair-direct" else "dia"
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
    assert run.stdout.split() == ["svg", "False", "3"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*.png"))) == 4
