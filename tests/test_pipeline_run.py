"""``pipeline run`` end to end: both modes against truth, failures, resume, LocalCluster, SLURM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from slurm_local import LocalSlurm, slurm_available

from pipeline.cluster import SchedulerConfig
from pipeline.config import RunConfig
from pipeline.io import read_manifest
from pipeline.runner import EXIT_SOME_FAILED, run_pipeline

THREADS = SchedulerConfig(kind="threads", workers=2)


def _run(entries, out, mode="dia", scheduler=THREADS, **kwargs):
    return run_pipeline(entries, RunConfig(mode=mode), out, scheduler, progress=False, **kwargs)


@pytest.fixture(scope="module")
def dia_run(sim_field, tmp_path_factory):
    out = tmp_path_factory.mktemp("dia")
    return _run(read_manifest(sim_field), out, "dia")


@pytest.fixture(scope="module")
def direct_run(sim_field, tmp_path_factory):
    out = tmp_path_factory.mktemp("direct")
    return _run(read_manifest(sim_field), out, "direct")


@pytest.mark.parametrize("mode", ["dia", "direct"])
def test_end_to_end_against_truth(mode, request):
    result = request.getfixturevalue(f"{mode}_run")
    assert result.exit_status == 0 and result.n_failed == 0
    cat = Table.read(result.out_dir / "candidates.fits")
    import pyarrow.parquet as pq

    parquet = pq.read_table(result.out_dir / "candidates.parquet")
    assert parquet.num_rows == len(cat) and set(parquet.column_names) == set(cat.colnames)
    assert set(cat["mode"]) == {mode}
    for col in ("ccd", "x", "y", "ra", "dec", "flux", "snr", "score", "mode", "model", "truth_id", "truth_kind",
                "truth_mag"):
        assert col in cat.colnames
    run = json.loads((result.out_dir / "run.json").read_text())
    tot = run["truth_summary"]
    assert tot["n_transients"] >= 20
    # the operating point finds most transients and rejects most bogus candidates
    assert tot["completeness"] >= 0.6
    assert tot["false_positives_per_ccd"] <= 0.5 * tot["n_candidates"] / run["n_ccds"]
    # the CNN at least doubles the purity of the raw candidate list
    assert tot["purity"] >= min(0.9, 2 * tot["n_detected"] / tot["n_candidates"])
    # scores separate real from bogus among the candidates
    real = np.char.strip(np.asarray(cat["truth_kind"]).astype(str)) == "transient"
    assert real.sum() >= tot["n_detected"]  # edge transients are in the catalog, not in the count
    assert np.median(np.asarray(cat["score"])[real]) > 0.5 > np.median(np.asarray(cat["score"])[~real])
    stages = set(run["stage_wall_s"])
    expected = {"load", "align", "subtract", "detect", "stamps", "score", "write"} if mode == "dia" else \
        {"load", "detect", "stamps", "score", "write"}
    assert stages == expected
    assert all(c["status"] == "done" for c in run["ccds"])
    assert run["versions"]["numpy"] and run["config"]["mode"] == mode


def _bad_field(sim_field: Path, out: Path) -> Path:
    """The simulated field plus four broken CCDs: unreadable, no overlap, too few stars, all NaN."""
    src = sim_field.parent
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    (out / "garbage.fits").write_bytes(b"this is not a FITS file" * 100)
    # no overlap: the template of ccd01 moved 3 degrees away
    with fits.open(out / "ccd01_template.fits") as h:
        for hdu in h[1:]:
            hdu.header["CRVAL1"] = hdu.header["CRVAL1"] + 3.0
        h.writeto(out / "far_template.fits")
    # too few stars: a template/search pair of (nearly) empty sky
    with fits.open(out / "ccd00_search.fits") as h:
        rng = np.random.default_rng(0)
        h["IMAGE"].data = (h["IMAGE"].header["SKYLEVEL"] + rng.normal(0, 5, h["IMAGE"].data.shape)).astype(np.float32)
        h["MASK"].data[:] = 0
        h.writeto(out / "empty_search.fits")
    with fits.open(out / "ccd00_template.fits") as h:
        h["IMAGE"].data = (h["IMAGE"].header["SKYLEVEL"] + rng.normal(0, 2, h["IMAGE"].data.shape)).astype(np.float32)
        h["MASK"].data[:] = 0
        h.writeto(out / "empty_template.fits")
    with fits.open(out / "ccd00_search.fits") as h:
        h["IMAGE"].data[:] = np.nan
        h.writeto(out / "nan_search.fits")
    rows = [("ccd00", "ccd00_search.fits", "ccd00_template.fits", "ccd00_truth.ecsv"),
            ("unreadable", "garbage.fits", "ccd00_template.fits", ""),
            ("nooverlap", "ccd01_search.fits", "far_template.fits", ""),
            ("fewstars", "empty_search.fits", "empty_template.fits", ""),
            ("allnan", "nan_search.fits", "ccd00_template.fits", "")]
    t = Table(rows=rows, names=("ccd", "search", "template", "truth"))
    t.write(out / "manifest.ecsv", format="ascii.ecsv", overwrite=True)
    return out / "manifest.ecsv"


def test_bad_ccds_are_isolated_and_reported(sim_field, tmp_path):
    manifest = _bad_field(sim_field, tmp_path / "bad")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--mode", "dia", "--input", str(manifest),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    by = {c["ccd"]: c for c in run["ccds"]}
    assert by["ccd00"]["status"] == "done"
    assert by["unreadable"]["failed_stage"] == "load" and "garbage.fits" in by["unreadable"]["error"]
    assert by["nooverlap"]["failed_stage"] == "align" and "no overlap" in by["nooverlap"]["error"]
    assert by["fewstars"]["failed_stage"] == "subtract" and "too few usable kernel-fit stars" in by["fewstars"]["error"]
    assert by["allnan"]["failed_stage"] == "load" and "no finite pixels" in by["allnan"]["error"]
    assert "FAILED" in proc.stdout and "4 failed" in proc.stdout
    # nothing half-written: only complete files, no temporaries
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    cat = Table.read(out / "candidates.fits")
    assert set(cat["ccd"]) == {"ccd00"}


def test_resume_after_interrupted_run_gives_the_same_catalog(sim_field, tmp_path, dia_run):
    """Kill a run after its first CCD is written, resume it, compare with the uninterrupted run."""
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--mode", "dia", "--input", str(sim_field),
           "--out", str(out), "--no-progress", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = out / "ccds" / "ccd00.json"
    deadline = time.time() + 300
    while not status.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert status.exists()
    assert not (out / "run.json").exists()  # it really was interrupted
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert {c["ccd"]: c["resumed"] for c in run["ccds"]}["ccd00"] is True
    a = Table.read(out / "candidates.fits")
    b = Table.read(dia_run.out_dir / "candidates.fits")
    assert len(a) == len(b)
    for col in ("x", "y", "flux", "score"):
        np.testing.assert_allclose(np.asarray(a[col]), np.asarray(b[col]), rtol=1e-5)
    for col in ("ccd", "truth_id"):
        assert list(a[col]) == list(b[col])


def test_local_cluster_matches_threads_and_survives_a_killed_worker(sim_field, tmp_path, dia_run):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="localhost:0") as cluster, \
            Client(cluster) as client:
        holder = {}

        def go():
            holder["result"] = run_pipeline(read_manifest(sim_field), RunConfig(mode="dia"), tmp_path / "lc",
                                             SchedulerConfig(kind="local", retries=3), progress=False, client=client)

        thread = threading.Thread(target=go)
        thread.start()
        # kill one worker process as soon as it is busy with a task
        deadline = time.time() + 120
        killed = False
        while time.time() < deadline and not killed:
            processing = client.processing()
            busy = [w for w, tasks in processing.items() if tasks]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)  # the nanny restarts it; its tasks are retried
                killed = True
            time.sleep(0.05)
        thread.join(timeout=600)
    result = holder["result"]
    assert killed and result.exit_status == 0
    a = Table.read(result.out_dir / "candidates.fits")
    b = Table.read(dia_run.out_dir / "candidates.fits")
    assert len(a) == len(b)
    np.testing.assert_allclose(np.asarray(a["score"]), np.asarray(b["score"]), rtol=1e-4, atol=1e-5)


@pytest.mark.slurm
def test_slurm_workflow_submits_jobs_and_cleans_up(sim_field, tmp_path):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    slurm = LocalSlurm(tmp_path / "slurm")
    slurm.start()
    try:
        workflow = tmp_path / "slurm.toml"
        workflow.write_text(f"""
[scheduler]
kind = "slurm"
jobs = 1
threads_per_worker = 1
dashboard_address = "localhost:0"

[scheduler.cluster]
queue = "debug"
cores = 1
processes = 1
memory = "3GB"
walltime = "00:15:00"
log_directory = "{tmp_path / 'logs'}"
python = "{sys.executable}"
scheduler_options = {{ host = "127.0.0.1" }}

[run]
mode = "direct"
""")
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--workflow", str(workflow),
                               "--input", str(sim_field), "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, timeout=600, env=slurm.env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert run["scheduler"]["kind"] == "slurm" and run["n_failed"] == 0
        workers = {c["worker"] for c in run["ccds"]}
        assert all(w and w.startswith("tcp://") for w in workers)  # ran on SLURM-launched workers
        logs = list((tmp_path / "logs").glob("*"))
        assert logs  # the worker job really ran under SLURM
        assert slurm.jobs_after_draining() == []
    finally:
        slurm.stop()


def test_graph_tasks_are_named_by_stage_and_ccd_and_gpu_stages_carry_the_resource(sim_field, tmp_path):
    from pipeline.graph import build_graph

    entries = read_manifest(sim_field)
    finals = build_graph(entries, RunConfig(mode="dia", device="gpu"), tmp_path)
    layers = finals["ccd00"].__dask_graph__().layers
    assert list(layers) == [f"{s}-ccd00" for s in ("load", "align", "subtract", "detect", "stamps", "score", "write")]
    gpu = {name for name, layer in layers.items() if (layer.annotations or {}).get("resources") == {"GPU": 1}}
    assert gpu == {"subtract-ccd00", "score-ccd00"}
    direct = build_graph(entries, RunConfig(mode="direct"), tmp_path)["ccd01"].__dask_graph__().layers
    assert list(direct) == [f"{s}-ccd01" for s in ("load", "detect", "stamps", "score", "write")]
    assert not any(layer.annotations for layer in direct.values())


def test_reading_the_truth_is_timed_apart_from_the_load_stage(sim_field, tmp_path, monkeypatch):
    """A survey's pipeline reads no truth table: the simulator's is read in the load stage but its time is
    recorded as evaluation (``evaluation_s``), not as the stage's cost, and the truth still reaches the catalog."""
    from pipeline import graph

    real_read = graph.read_truth

    def slow_read(path):
        time.sleep(0.5)
        return real_read(path)

    monkeypatch.setattr(graph, "read_truth", slow_read)
    entry = read_manifest(sim_field)[0]
    config = RunConfig(mode="direct")
    state = graph.run_stage("load", graph.CcdState.start(entry, "h"), config, str(tmp_path), "h")
    assert state.status != "failed", state.traceback
    assert state.pair.truth is not None and len(state.pair.truth) > 0
    spent = state.evaluation_s["load"]
    assert spent["wall"] >= 0.5 and spent["cpu"] < spent["wall"]  # sleeping costs wall time, not CPU
    assert 0 < state.wall["load"] < spent["wall"]  # the small frames load in far less than the sleep
    assert state.cpu["load"] > 0
    record = graph.status_record(state, "h")
    assert record["evaluation_s"] == state.evaluation_s and record["wall_s"]["load"] == state.wall["load"]


_WAVE_EVENTS: list[tuple[str, str, str]] = []  # (ccd, stage, start|end) in the order they happened


def _wave_stage(name, ccd, previous, fail=False):
    """A stage of the waves test (module level: the in-process cluster still pickles the task)."""
    _WAVE_EVENTS.append((ccd, name, "start"))
    time.sleep(0.05)
    if fail:
        raise RuntimeError(f"{ccd} broke")
    _WAVE_EVENTS.append((ccd, name, "end"))
    return (previous or 0) + 1


def test_compute_in_waves_keeps_one_ccd_per_thread_and_isolates_failures():
    """runner.compute_in_waves: with one thread, a CCD's chain starts only when the previous one has ended (a
    worker never holds two CCDs' frames), every chain is computed once, and a failing chain fails no other."""
    import dask
    from distributed import Client, LocalCluster

    from pipeline.runner import compute_in_waves

    events = _WAVE_EVENTS
    events.clear()
    stage = _wave_stage
    chains = {}
    for k in range(4):
        ccd = f"ccd{k:02d}"
        state = None
        for name in ("load", "align", "write"):
            state = dask.delayed(stage, pure=False)(name, ccd, state, fail=(ccd == "ccd01" and name == "align"),
                                                    dask_key_name=f"{name}-{ccd}")
        chains[ccd] = state
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        results = {}
        for ccd, fut in compute_in_waves(client, chains, slots=1):
            results[ccd] = fut.exception() or fut.result()
    assert sorted(results) == sorted(chains)
    assert isinstance(results["ccd01"], RuntimeError)
    assert all(results[c] == 3 for c in chains if c != "ccd01")
    # chains in sequence: the CCD whose load comes next starts after every task of the previous CCD
    order = [ccd for ccd, name, what in events if name == "load" and what == "start"]
    assert len(order) == 4 and len(set(order)) == 4
    for before, after in zip(order, order[1:]):
        last_of_before = max(i for i, e in enumerate(events) if e[0] == before)
        first_of_after = min(i for i, e in enumerate(events) if e[0] == after)
        assert last_of_before < first_of_after, (before, after, events)
