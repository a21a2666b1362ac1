"""The two-image CNN as a dense detector over aligned exposures, measured against truth (issue #13).

Usage (from the repository root)::

    # measure: map peaks, end to end, and (with --run) added to a direct run's candidates
    python -m benchmarks.dense_detector --input MANIFEST [--run DIRECT_RUN_DIR] [--model pair-direct]
                                        [--map-threshold 0.85] [--threads 2] [--out DIR]
    # off-peak training stamps, mined with --model, prepended with an existing set
    python -m benchmarks.dense_detector --mine OUT.npz [--merge direct.npz] [--ccds 40] [--seed 1500]

Measuring, for every CCD pair of ``--input`` (a manifest with truth, e.g. the benchmark field written
by ``pipeline simulate``), the script

1. reads both exposures and masks cosmic rays, as a run's load stage;
2. computes the direct model's score map as ``selection = "dense"`` does (:func:`pipeline.steps.dense_map`):
   the template resampled onto the search pixels, both images normalised per pixel as the ``shared``
   scheme normalises a stamp (:func:`classifier.dense.normalized_planes`; a stamp uses its own clipped
   statistics instead, so map values are close to, not equal to, stamp scores), the network slid over
   them in its fully convolutional form every 4 pixels (:func:`classifier.dense.dense_logit_map`);
3. takes the map's local maxima, refined to a fraction of the grid (:func:`pipeline.detect.map_peaks`), as
   candidates: scored by the map itself ("map peaks"), and, for the peaks at or above
   ``--map-threshold``, by the network on stamps cut there as the pipeline cuts them ("end to
   end": the candidates a dense direct mode would write).

Every count uses the pipeline's truth matching (:func:`pipeline.truth.match_truth`).  It also
scores a stamp centred on every transient's true position: what the network says when it is shown
the right place, an upper bound on any detector that uses it.  With ``--run`` (a ``pipeline run
--mode direct`` of the same manifest) it adds the end-to-end candidates more than 3 pixels from
every candidate of that run and counts the union.  Writes ``report.json`` and ``report.md`` in
``--out`` (atomically) and prints the tables.

``--mine`` makes the training stamps such a detector needs and the direct stream lacks (its stamps
are all centred on search-image peaks), from ``--ccds`` simulated CCDs: every transient moved by up
to 2 px (real); the ``--model``'s own map peaks >= 0.5 more than 5 px from any transient (the 100
best and 50 of the rest per CCD) and random points 3-12 px from stars, galaxies and variables
brighter than mag 22 (bogus); with ``--random N``, N random points per CCD more than 5 px from any
transient (bogus: mostly blank sky, the bulk of a map's windows).  The last ``--val-ccds`` CCDs go to
the ``val`` split, the others to ``train``.  Train on it with ``pipeline train --model pair --data OUT.npz``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metrics import false_positives_by_kind  # noqa: E402
from benchmarks.report import write_json_and_markdown  # noqa: E402
from classifier.dense import GRID, WINDOW  # noqa: E402
from pipeline.detect import map_peaks  # noqa: E402

__all__ = ["main"]

def _counts(table, thresholds, column: str = "score") -> list[dict]:
    """Found transients and false positives per CCD of a candidate table with the pipeline's truth columns
    (``match_truth``: a transient is found by the nearest candidate within the match radius), the false
    positives by kind as the benchmark counts them (:func:`benchmarks.metrics.false_positives_by_kind`)."""
    n_ccd = max(1, len(set(table["ccd"])))
    score = np.asarray(table[column], float)
    real = np.asarray(table["truth_kind"]) == "transient"
    kinds = np.array([str(k) or "unmatched" for k in np.asarray(table["truth_kind"])[~real]])
    rows = []
    for thr in thresholds:
        hit = real & (score >= thr)
        found = len(set(zip(np.asarray(table["ccd"])[hit], np.asarray(table["truth_id"])[hit])))
        by_kind = false_positives_by_kind(kinds, score[~real], thr, n_ccd)
        rows.append({"threshold": thr, "found": found, "fp_per_ccd": int(np.sum(score[~real] >= thr)) / n_ccd,
                     "fp_by_kind_per_ccd": {r["kind"]: r["per_ccd"] for r in by_kind if r["n"]}})
    return rows


def _inside(x, y, shape, margin: int = WINDOW // 2 + 1):
    return (x >= margin) & (x < shape[1] - margin) & (y >= margin) & (y < shape[0] - margin)


def _mine(args, config) -> int:
    """``--mine``: off-peak training stamps from simulated CCDs (see the module notes)."""
    from astropy.table import Table

    from classifier.data import StampSet
    from pipeline import steps
    from pipeline.datasets import sky_columns
    from pipeline.simulate import SimulationConfig, ccd_name, simulate_pair

    base = SimulationConfig()
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    sim_config = dataclasses.replace(base, shape=shape, transient_density=base.transient_density * args.density_factor)
    sets = []
    for k in range(args.ccds):
        t0 = time.perf_counter()
        name = f"s{args.seed}-{ccd_name(k)}"
        sim = simulate_pair(sim_config, args.seed, k)
        pair, _ = steps.mask_cosmics(steps.LoadedPair(name, sim.search, sim.template, sim.truth), config)
        rng = np.random.default_rng([args.seed, k, 11])
        logits = steps.dense_map(pair, config)
        truth, shape_k = sim.truth, pair.search.shape
        tt = truth[(truth["kind"] == "transient") & ~truth["flagged"]]
        tx, ty = np.asarray(tt["x"], float), np.asarray(tt["y"], float)

        def away(x, y, tx=tx, ty=ty, r=5.0):  # farther than r px from every transient
            if not tx.size:
                return np.ones(x.size, bool)
            return np.hypot(x[:, None] - tx[None], y[:, None] - ty[None]).min(axis=1) > r

        # real: the transients, each moved by up to 2 px on each axis (the map's grid puts a window up to 2.8 px off)
        rx, ry = np.rint(tx + rng.uniform(-2, 2, tx.size)), np.rint(ty + rng.uniform(-2, 2, ty.size))
        keep = _inside(rx, ry, shape_k)
        rx, ry, rid = rx[keep], ry[keep], np.asarray(tt["id"])[keep]
        # bogus: the mining model's map peaks >= 0.5 away from transients (the 100 best, 50 of the rest at random)
        mx, my, mp = map_peaks(logits, 0.5, GRID, refine=False)
        keep = _inside(mx, my, shape_k) & away(mx, my)
        mx, my, mp = mx[keep], my[keep], mp[keep]
        order = np.argsort(-mp, kind="stable")
        rest = order[100:]
        pick = np.concatenate([order[:100], rng.choice(rest, min(50, rest.size), replace=False)])
        mx, my = mx[pick], my[pick]
        # bogus: the flanks of stars, galaxies and variables brighter than mag 22, 3-12 px from their centres
        src = truth[np.isin(truth["kind"], ["star", "galaxy", "variable"]) & (truth["mag"] < 22)]
        j = rng.choice(len(src), min(150, len(src)), replace=False) if len(src) else np.zeros(0, int)
        r, angle = rng.uniform(3, 12, j.size), rng.uniform(0, 2 * np.pi, j.size)
        fx = np.rint(np.asarray(src["x"], float)[j] + r * np.cos(angle))
        fy = np.rint(np.asarray(src["y"], float)[j] + r * np.sin(angle))
        keep = _inside(fx, fy, shape_k) & away(fx, fy)
        fx, fy, fkind = fx[keep], fy[keep], np.char.add("flank_", np.asarray(src["kind"])[j][keep].astype(str))
        # bogus (--random N): points anywhere on the CCD, mostly blank sky and faint sources, the bulk of the map's
        # windows (drawn after the rest, so that N = 0 leaves the other stamps as they were)
        qx = np.rint(rng.uniform(0, shape_k[1] - 1, args.random))
        qy = np.rint(rng.uniform(0, shape_k[0] - 1, args.random))
        keep = _inside(qx, qy, shape_k) & away(qx, qy)
        fx, fy = np.concatenate([fx, qx[keep]]), np.concatenate([fy, qy[keep]])
        fkind = np.concatenate([fkind, np.full(int(keep.sum()), "random")])
        x, y = np.concatenate([rx, mx, fx]), np.concatenate([ry, my, fy])
        labels = np.concatenate([np.ones(rx.size), np.zeros(mx.size + fx.size)]).astype(np.int8)
        kind = np.concatenate([np.full(rx.size, "transient"), np.full(mx.size, "map_peak"), fkind])
        stamps = steps.cut_pairs(Table({"x": x, "y": y}), pair, config, sky=True)
        split = "val" if k >= args.ccds - args.val_ccds else "train"
        meta = {"ccd": np.full(x.size, name), "x": x, "y": y, "kind": kind, "split": np.full(x.size, split),
                "truth_id": np.concatenate([rid, np.full(mx.size + fx.size, -1)]), **sky_columns(stamps)}
        sets.append(StampSet(stamps.data, labels, meta, stamps.channels,
                             {"stream": "direct", "source": "simulated", "simulation_seeds": [int(args.seed)],
                              "offpeak": {"model": str(args.model), "ccds": args.ccds, "shape": list(shape),
                                          "density_factor": args.density_factor, "val_ccds": args.val_ccds,
                                          "random": args.random}}))
        print(f"{name}: {rx.size} real, {mx.size} map peaks, {fx.size} flanks ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    mined = StampSet.concatenate(sets)
    if args.merge:
        mined = StampSet.concatenate([StampSet.load(args.merge), mined])
        mined.attrs["stream"] = "direct"
    mined.save(args.mine)
    print(f"{len(mined)} stamps ({int(mined.labels.sum())} real) -> {args.mine}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", help="manifest of CCD pairs with truth (the measurement)")
    ap.add_argument("--run", default=None, help="a direct-mode run of the same manifest: its candidates + the map's")
    ap.add_argument("--model", default="pair-direct", help="a two-image StampNet: shipped name or weights file")
    ap.add_argument("--thresholds", default="0.5,0.7,0.85,0.95", help="score thresholds, comma-separated")
    ap.add_argument("--map-threshold", type=float, default=0.85,
                    help="map peaks scored on stamps (end to end) or added to --run's (default 0.85)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", default=None, help="folder for report.json and report.md")
    ap.add_argument("--mine", default=None, help="instead: write off-peak training stamps to this .npz")
    ap.add_argument("--merge", default=None, help="--mine: a stamp set to prepend (e.g. the direct-stream set)")
    ap.add_argument("--ccds", type=int, default=40, help="--mine: simulated CCDs (default 40)")
    ap.add_argument("--seed", type=int, default=1500, help="--mine: simulation seed (default 1500)")
    ap.add_argument("--shape", default="2048x2048", help="--mine: CCD shape (default 2048x2048)")
    ap.add_argument("--density-factor", type=float, default=12.0, help="--mine: transient density factor (12)")
    ap.add_argument("--val-ccds", type=int, default=5, help="--mine: last CCDs in the val split (default 5)")
    ap.add_argument("--random", type=int, default=0,
                    help="--mine: random points per CCD as bogus, away from transients (default 0)")
    args = ap.parse_args(argv)
    if (args.input is None) == (args.mine is None):
        ap.error("give --input (measure) or --mine (make training stamps)")

    from astropy.table import Table, vstack

    from classifier.infer import torch_threads
    from pipeline import steps
    from pipeline.config import RunConfig
    from pipeline.io import read_manifest
    from pipeline.truth import match_truth

    thresholds = [float(v) for v in args.thresholds.split(",") if v]
    # the measured model is the run's direct model: the map (steps.dense_map) and the stamps' scores
    config = dataclasses.replace(RunConfig(), mode="direct", model_direct=args.model, torch_threads=args.threads)
    keep = ["ccd", "x", "y", "score", "truth_kind", "truth_id"]
    with torch_threads(args.threads):
        if args.mine:
            return _mine(args, config)
        entries = read_manifest(args.input)
        run = Table.read(Path(args.run) / "candidates.parquet") if args.run else None
        maps_alone, end_to_end, added, true_scores, timings = [], [], [], [], []
        n_transients = 0
        for entry in entries:
            pair = steps.load_pair(entry)
            if pair.truth is None:
                print(f"dense_detector: {entry.ccd} has no truth table", file=sys.stderr)
                return 2
            pair, _ = steps.mask_cosmics(pair, config)
            t0 = time.perf_counter()
            logits = steps.dense_map(pair, config)
            t1 = time.perf_counter()
            x, y, p = map_peaks(logits, min(min(thresholds), args.map_threshold), GRID)  # edges kept, as a run
            peaks = match_truth(Table({"x": x, "y": y, "score": p}), pair.truth)
            peaks["ccd"] = entry.ccd
            maps_alone.append(peaks[keep])
            cands = peaks[peaks["score"] >= args.map_threshold]
            cands = Table({"x": cands["x"], "y": cands["y"]})
            cands["score"] = steps.score_stamps(steps.cut_pairs(cands, pair, config), config) if len(cands) else []
            cands = match_truth(cands, pair.truth)
            cands["ccd"] = entry.ccd
            end_to_end.append(cands[keep])
            timings.append({"ccd": entry.ccd, "map_s": t1 - t0, "stamps_s": time.perf_counter() - t1})
            tt = pair.truth[(pair.truth["kind"] == "transient") & ~pair.truth["flagged"]]
            n_transients += len(tt)
            if len(tt):
                stamps = steps.cut_pairs(Table({"x": np.asarray(tt["x"], float), "y": np.asarray(tt["y"], float)}),
                                         pair, config)
                true_scores += steps.score_stamps(stamps, config).tolist()
            if run is not None:
                mine = run[run["ccd"] == entry.ccd]
                far = np.ones(len(cands), bool)
                if len(cands) and len(mine):
                    d = np.hypot(np.asarray(cands["x"])[None] - np.asarray(mine["x"], float)[:, None],
                                 np.asarray(cands["y"])[None] - np.asarray(mine["y"], float)[:, None])
                    far = d.min(axis=0) > 3
                added.append(cands[far])
            print(f"{entry.ccd}: map {t1 - t0:.2f} s (resampling and normalisation included), "
                  f"{len(cands)} candidates", flush=True)
    n_ccd = len(entries)
    report = {"model": str(args.model), "input": str(args.input), "ccds": n_ccd, "transients": n_transients,
              "grid_px": GRID, "map_threshold": args.map_threshold, "threads": args.threads, "timings": timings,
              "true_position_scores": {str(t): int(np.sum(np.asarray(true_scores) >= t)) for t in thresholds},
              "map_alone": _counts(vstack(maps_alone), thresholds),
              "end_to_end": _counts(vstack(end_to_end), thresholds),
              "candidates_per_ccd": sum(len(t) for t in end_to_end) / n_ccd}
    lines = [f"# The two-image CNN as a dense detector: {args.model}, {n_ccd} CCDs, {n_transients} transients", "",
             f"Map on a {GRID}-pixel grid, peaks refined to the parabola's vertex; median seconds per CCD for the "
             f"map (template resampling and normalisation included): "
             f"{np.median([t['map_s'] for t in timings]):.2f} ({args.threads} threads). End to end: the map's peaks "
             f">= {args.map_threshold:g} ({report['candidates_per_ccd']:.1f} per CCD) scored on stamps. Found: a "
             "transient matched by the pipeline's truth matching; FP: every other candidate at or above the threshold.",
             "", "| threshold | stamps at the true positions | map peaks: found | map peaks: FP per CCD | "
             "end to end: found | end to end: FP per CCD (by kind) |", "|---|---|---|---|---|---|"]
    for a, b in zip(report["map_alone"], report["end_to_end"]):
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in b["fp_by_kind_per_ccd"].items())
        lines.append(f"| {a['threshold']:g} | {report['true_position_scores'][str(a['threshold'])]} | {a['found']} | "
                     f"{a['fp_per_ccd']:.2f} | {b['found']} | {b['fp_per_ccd']:.2f} ({kinds}) |")
    if run is not None:
        union = vstack([run[keep]] + [a for a in added if len(a)])
        report["run"] = {"dir": str(args.run), "added_per_ccd": sum(len(a) for a in added) / n_ccd,
                         "run_alone": _counts(run, thresholds), "run_plus_map": _counts(union, thresholds)}
        lines += ["", f"Candidates of {args.run} (scores as in the run), and with the end-to-end candidates more "
                  f"than 3 px from them added ({report['run']['added_per_ccd']:.2f} per CCD):", "",
                  "| threshold | run: found | run: FP per CCD | run + map: found | run + map: FP per CCD |",
                  "|---|---|---|---|---|"]
        for a, b in zip(report["run"]["run_alone"], report["run"]["run_plus_map"]):
            lines.append(f"| {a['threshold']:g} | {a['found']} | {a['fp_per_ccd']:.2f} | {b['found']} | "
                         f"{b['fp_per_ccd']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_json_and_markdown(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
