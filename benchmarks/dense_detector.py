"""The two-image CNN as a dense detector over aligned exposures, measured against truth (issue #13).

Usage (from the repository root)::

    python -m benchmarks.dense_detector --input MANIFEST [--run DIRECT_RUN_DIR] [--model pair-direct]
                                        [--map-threshold 0.99] [--threads 2] [--out DIR]

For every CCD pair of ``--input`` (a manifest with truth, e.g. the benchmark field written by
``pipeline simulate``) the script

1. reads both exposures, masks cosmic rays and resamples the template onto the search pixels (the
   steps of the pipeline; no PSF matching, no difference image);
2. normalises the two images as the ``shared`` scheme normalises a stamp -- each minus its smooth
   sky, both divided by the search image's sky noise, then ``asinh`` -- with per-CCD maps
   (:func:`normalized_planes`; a stamp uses its own clipped statistics instead, so map values are
   close to, not equal to, stamp scores);
3. slides the network over the frame in its fully convolutional form
   (:func:`benchmarks.dense_map_cost.dense_network`) at a stride of 4 pixels: four passes at the
   network's stride of 8, offset by 0 and 4 pixels on each axis (:func:`dense_logit_map`);
4. takes the map's local maxima above each threshold as candidates and matches them to the truth
   (a transient is found when a peak lies within ``--radius`` pixels: the 4-pixel grid puts a
   peak up to 2.8 pixels from the source).

It also scores a stamp centred on every transient's true position (the pipeline's stamps and
scorer): what the network says when it is shown the right place, an upper bound on any detector
that uses it.  With ``--run`` (a ``pipeline run --mode direct`` of the same manifest) it adds the
map's peaks above ``--map-threshold`` that are more than 3 pixels from every candidate of that run,
each moved to the best-scoring of the 5 x 5 stamp positions around it, and reports found
transients and false positives per CCD of the run alone and of the union, with the pipeline's truth
matching.  Writes ``report.json`` and ``report.md`` in ``--out`` (atomically) and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dense_map_cost import STRIDE, dense_network  # noqa: E402

__all__ = ["GRID", "normalized_planes", "dense_logit_map", "map_peaks", "main"]

#: Spacing in pixels of the map :func:`dense_logit_map` returns (two phases per axis of the network's stride).
GRID = STRIDE // 2
#: Side of the network's window: a stamp.
_WINDOW = 51


def normalized_planes(search: np.ndarray, template: np.ndarray, search_background: np.ndarray,
                      template_background: np.ndarray, search_noise: np.ndarray) -> dict[str, np.ndarray]:
    """The ``shared`` normalisation of :mod:`classifier.normalize` with per-pixel maps instead of per-stamp values.

    Parameters
    ----------
    search, template : ndarray (ny, nx)
        The search image and the template resampled onto its pixels and scaled to its zero point.
    search_background, template_background : ndarray (ny, nx)
        Smooth sky of each.
    search_noise : ndarray (ny, nx)
        Sky noise of the search image (standard deviation, > 0).

    Returns
    -------
    dict
        ``{"template": ..., "search": ...}``: ``asinh((image - sky) / noise)``, float32, non-finite pixels 0.
    """
    out = {}
    for name, image, sky in (("template", template, template_background), ("search", search, search_background)):
        plane = np.arcsinh((np.asarray(image, np.float32) - sky) / search_noise).astype(np.float32)
        out[name] = np.where(np.isfinite(plane), plane, np.float32(0))
    return out


def dense_logit_map(net: torch.nn.Module, frame: np.ndarray, tile: int = 512) -> np.ndarray:
    """Logit of "real" of a stamp centred on every :data:`GRID`-th pixel of ``frame``.

    Parameters
    ----------
    net : torch.nn.Module
        :func:`benchmarks.dense_map_cost.dense_network` of a stamp network (output stride 8).
    frame : ndarray (C, ny, nx)
        Normalised planes in the network's channel order; zero beyond the frame (as a stamp's padding).
    tile : int
        Output pixels per tile side (a multiple of 8); bounds the memory of one pass.  A window on a tile's
        edge sees zeros where its neighbours in the frame hold data (its layers pad with zeros, as on a stamp),
        so tiles change those windows' values slightly (by ~0.01 in logit with random weights).

    Returns
    -------
    ndarray (ceil(ny / GRID), ceil(nx / GRID)) float32
        ``out[i, j]`` is the logit difference (real minus bogus) of the window centred at pixel
        ``(GRID * i, GRID * j)``.
    """
    c, ny, nx = frame.shape
    half = _WINDOW // 2
    padded = np.pad(np.asarray(frame, np.float32), ((0, 0), (half, half + STRIDE), (half, half + STRIDE)))
    out = np.full((-(-ny // GRID), -(-nx // GRID)), np.nan, np.float32)
    step = max(1, tile // STRIDE)
    with torch.inference_mode():
        for py in range(0, STRIDE, GRID):
            for px in range(0, STRIDE, GRID):
                phase = torch.from_numpy(np.ascontiguousarray(padded[:, py:, px:]))[None]
                phase = phase.to(memory_format=torch.channels_last)
                n_y, n_x = -(-(ny - py) // STRIDE), -(-(nx - px) // STRIDE)
                cells = np.empty((n_y, n_x), np.float32)
                for y0 in range(0, n_y, step):
                    for x0 in range(0, n_x, step):
                        y1, x1 = min(y0 + step, n_y), min(x0 + step, n_x)
                        # window of output cell i starts at 8 i in this phase and spans 51 pixels
                        rows = slice(STRIDE * y0, STRIDE * (y1 - 1) + _WINDOW)
                        win = phase[:, :, rows, STRIDE * x0:STRIDE * (x1 - 1) + _WINDOW]
                        logits = net(win)[0]
                        cells[y0:y1, x0:x1] = (logits[1] - logits[0]).numpy()[: y1 - y0, : x1 - x0]
                out[py // GRID::STRIDE // GRID, px // GRID::STRIDE // GRID] = cells
    return out


def map_peaks(logits: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima (3 x 3 on the map's grid) of a :func:`dense_logit_map` whose score is >= ``threshold``.

    Returns pixel ``x``, ``y`` (multiples of :data:`GRID`) and the score (probability of "real").
    """
    if not 0 < threshold < 1:
        raise ValueError(f"map_peaks: threshold must lie in (0, 1), got {threshold}")
    cut = np.log(threshold / (1 - threshold))
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    peak = (finite == ndimage.maximum_filter(finite, 3, mode="constant", cval=-np.inf)) & (finite >= cut)
    iy, ix = np.nonzero(peak)
    return (ix * GRID).astype(float), (iy * GRID).astype(float), 1.0 / (1.0 + np.exp(-finite[iy, ix].astype(float)))


def _found_and_fp(x, y, truth, radius: float) -> tuple[set, collections.Counter]:
    """Transient ids with a point within ``radius`` and the kinds of the nearest object of the other points."""
    tt = truth[(truth["kind"] == "transient") & ~truth["flagged"]]
    found, fp = set(), collections.Counter()
    if len(x) == 0:
        return found, fp
    tx, ty = np.asarray(tt["x"], float), np.asarray(tt["y"], float)
    d = np.hypot(x[None] - tx[:, None], y[None] - ty[:, None]) if len(tt) else np.full((0, len(x)), np.inf)
    found = {int(i) for i, row in zip(tt["id"], d) if row.min() <= radius}
    matched = d.min(axis=0) <= radius if len(tt) else np.zeros(len(x), bool)
    others = truth[truth["kind"] != "transient"]
    ox, oy = np.asarray(others["x"], float), np.asarray(others["y"], float)
    for k in np.nonzero(~matched)[0]:
        dist = np.hypot(ox - x[k], oy - y[k])
        j = int(np.argmin(dist)) if dist.size else -1
        fp[str(others["kind"][j]) if j >= 0 and dist[j] <= radius else "unmatched"] += 1
    return found, fp


def _run_counts(table, thresholds) -> list[dict]:
    """Found transients and false positives per CCD of a candidate table with the pipeline's truth columns."""
    n_ccd = max(1, len(set(table["ccd"])))
    rows = []
    for thr in thresholds:
        sel = np.asarray(table["score"]) >= thr
        real = sel & (np.asarray(table["truth_kind"]) == "transient")
        found = len(set(zip(np.asarray(table["ccd"])[real], np.asarray(table["truth_id"])[real])))
        fp = sel & ~real
        kinds = collections.Counter(str(k) or "unmatched" for k in np.asarray(table["truth_kind"])[fp])
        rows.append({"threshold": thr, "found": found, "fp_per_ccd": fp.sum() / n_ccd,
                     "fp_by_kind_per_ccd": {k: v / n_ccd for k, v in kinds.most_common()}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="manifest of CCD pairs with truth")
    ap.add_argument("--run", default=None, help="a direct-mode run of the same manifest: its candidates + the map's")
    ap.add_argument("--model", default="pair-direct", help="a shipped two-image StampNet (default pair-direct)")
    ap.add_argument("--thresholds", default="0.5,0.85,0.95,0.99", help="score thresholds, comma-separated")
    ap.add_argument("--map-threshold", type=float, default=0.99, help="map peaks added to --run's (default 0.99)")
    ap.add_argument("--radius", type=float, default=4.0, help="map peak to transient match radius, px (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", default=None, help="folder for report.json and report.md")
    args = ap.parse_args(argv)

    from astropy.table import Table, vstack

    from classifier.infer import Scorer, preset_weights, torch_threads
    from pipeline import steps
    from pipeline.config import RunConfig
    from pipeline.detect.background import estimate_background
    from pipeline.io import atomic_path, read_manifest
    from pipeline.truth import match_truth

    thresholds = [float(v) for v in args.thresholds.split(",") if v]
    config = dataclasses.replace(RunConfig(), mode="direct", model_direct=args.model, torch_threads=args.threads)
    entries = read_manifest(args.input)
    run = Table.read(Path(args.run) / "candidates.parquet") if args.run else None
    per_thr = {thr: {"found": set(), "fp": collections.Counter()} for thr in thresholds}
    true_scores, added, timings = [], [], []
    n_transients = 0
    with torch_threads(args.threads):
        scorer = Scorer(preset_weights(args.model, "")[0], device="cpu", threads=args.threads)
        net = dense_network(scorer.net)
        for entry in entries:
            pair = steps.load_pair(entry)
            if pair.truth is None:
                print(f"dense_detector: {entry.ccd} has no truth table", file=sys.stderr)
                return 2
            pair, _ = steps.mask_cosmics(pair, config)
            t0 = time.perf_counter()
            aligned = steps.align(pair, config)
            s = pair.search
            template = steps._calibrate(aligned.template.image, steps._zp_scale(s, pair.template))
            noise = np.sqrt(np.maximum(estimate_background(s.variance, s.mask), np.float32(1e-12)))
            planes = normalized_planes(s.image, template, estimate_background(s.image, s.mask),
                                       estimate_background(template, aligned.template.mask), noise)
            t1 = time.perf_counter()
            logits = dense_logit_map(net, np.stack([planes[c] for c in scorer.spec.channels]))
            t2 = time.perf_counter()
            timings.append({"ccd": entry.ccd, "prepare_s": t1 - t0, "map_s": t2 - t1})
            truth = pair.truth
            for thr in thresholds:
                x, y, _ = map_peaks(logits, thr)
                found, fp = _found_and_fp(x, y, truth, args.radius)
                per_thr[thr]["found"] |= {(entry.ccd, i) for i in found}
                per_thr[thr]["fp"].update(fp)
            tt = truth[(truth["kind"] == "transient") & ~truth["flagged"]]
            n_transients += len(tt)
            if len(tt):
                stamps = steps.cut_pairs(Table({"x": np.asarray(tt["x"], float), "y": np.asarray(tt["y"], float)}),
                                         pair, config)
                true_scores += steps.score_stamps(stamps, config).tolist()
            if run is not None:
                added.append(_added_candidates(run, entry.ccd, logits, pair, config, args.map_threshold,
                                               steps, match_truth))
            print(f"{entry.ccd}: prepare {t1 - t0:.2f} s, map {t2 - t1:.2f} s", flush=True)
    n_ccd = len(entries)
    report = {"model": args.model, "input": str(args.input), "ccds": n_ccd, "transients": n_transients,
              "grid_px": GRID, "radius_px": args.radius, "threads": args.threads, "timings": timings,
              "map_alone": [{"threshold": thr, "found": len(v["found"]), "fp_per_ccd": sum(v["fp"].values()) / n_ccd,
                             "fp_by_kind_per_ccd": {k: c / n_ccd for k, c in v["fp"].most_common()}}
                            for thr, v in per_thr.items()],
              "true_position_scores": {str(thr): int(np.sum(np.asarray(true_scores) >= thr)) for thr in thresholds}}
    lines = [f"# The two-image CNN as a dense detector: {args.model}, {n_ccd} CCDs, {n_transients} transients", "",
             f"Map on a {GRID}-pixel grid; median seconds per CCD: resampling + normalisation "
             f"{np.median([t['prepare_s'] for t in timings]):.2f}, map {np.median([t['map_s'] for t in timings]):.2f} "
             f"({args.threads} threads).", "",
             "| threshold | stamps at the true positions >= threshold | map peaks: transients found "
             f"(<= {args.radius:g} px) | map peaks: false positives per CCD (by nearest object) |", "|---|---|---|---|"]
    for row in report["map_alone"]:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in row["fp_by_kind_per_ccd"].items())
        lines.append(f"| {row['threshold']:g} | {report['true_position_scores'][str(row['threshold'])]} | "
                     f"{row['found']} | {row['fp_per_ccd']:.2f} ({kinds}) |")
    if run is not None:
        keep = ["ccd", "x", "y", "score", "truth_kind", "truth_id"]
        extra = vstack([a for a in added if len(a)]) if any(len(a) for a in added) else None
        union = vstack([run[keep], extra[keep]]) if extra is not None else run[keep]
        report["run"] = {"dir": str(args.run), "map_threshold": args.map_threshold,
                         "added_per_ccd": sum(len(a) for a in added) / n_ccd,
                         "run_alone": _run_counts(run, thresholds), "run_plus_map": _run_counts(union, thresholds)}
        lines += ["", f"Candidates of {args.run}, and with the map's peaks >= {args.map_threshold:g} added "
                  f"({report['run']['added_per_ccd']:.2f} per CCD; found = a candidate within the pipeline's "
                  "match radius of a transient):", "",
                  "| threshold | run: found | run: FP per CCD | run + map: found | run + map: FP per CCD |",
                  "|---|---|---|---|---|"]
        for a, b in zip(report["run"]["run_alone"], report["run"]["run_plus_map"]):
            lines.append(f"| {a['threshold']:g} | {a['found']} | {a['fp_per_ccd']:.2f} | {b['found']} | "
                         f"{b['fp_per_ccd']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "report.json") as tmp:
            Path(tmp).write_text(json.dumps(report, indent=2, default=float))
        with atomic_path(out / "report.md") as tmp:
            Path(tmp).write_text(text)
    return 0


def _added_candidates(run, ccd, logits, pair, config, map_threshold, steps, match_truth):
    """The map's peaks >= ``map_threshold`` more than 3 px from every candidate of ``run`` on ``ccd``, each at
    the best-scoring stamp position of the 5 x 5 pixels around it, with the pipeline's truth matching."""
    from astropy.table import Table

    x, y, _ = map_peaks(logits, map_threshold)
    cand = run[run["ccd"] == ccd]
    if len(x) and len(cand):
        d = np.hypot(x[None] - np.asarray(cand["x"], float)[:, None], y[None] - np.asarray(cand["y"], float)[:, None])
        x, y = x[d.min(axis=0) > 3], y[d.min(axis=0) > 3]
    ny, nx = pair.search.shape
    half = _WINDOW // 2
    inside = (x >= half) & (x < nx - half) & (y >= half) & (y < ny - half)
    x, y = x[inside], y[inside]
    if x.size == 0:
        return Table(names=["ccd", "x", "y", "score", "truth_kind", "truth_id"],
                     dtype=["U16", float, float, float, "U16", np.int64])
    offsets = np.arange(-2, 3, dtype=float)
    gx = np.broadcast_to(x[:, None, None] + offsets[None, None, :], (x.size, 5, 5)).ravel()
    gy = np.broadcast_to(y[:, None, None] + offsets[None, :, None], (x.size, 5, 5)).ravel()
    scores = steps.score_stamps(steps.cut_pairs(Table({"x": gx, "y": gy}), pair, config), config).reshape(x.size, -1)
    best = scores.argmax(axis=1)
    rows = np.arange(x.size)
    table = Table({"x": gx.reshape(x.size, -1)[rows, best], "y": gy.reshape(x.size, -1)[rows, best],
                   "score": scores[rows, best]})
    table = match_truth(table, pair.truth)
    table["ccd"] = ccd
    return table


if __name__ == "__main__":
    sys.exit(main())
