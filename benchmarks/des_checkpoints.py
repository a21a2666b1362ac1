"""The paper's DES-trained checkpoints vs our shipped paper models on simulated dia-stream stamps.

Run::

    pipeline dataset --out /tmp/h6data --ccds 20 --seed 3000 --density-factor 12 --fractions 0,0,1 --streams dia
    python benchmarks/des_checkpoints.py --data /tmp/h6data/dia.npz \\
        --des-triplet des-triplet.pt --des-pair des-pair.pt --out des_checkpoints.json

``--des-triplet`` / ``--des-pair`` are weights files written by ``pipeline import-keras`` from the
authors' ``model_checkpoint_AAD_3s3DH.h5`` / ``model_checkpoint_CCC_3s2DH.h5`` (or give the
``.h5`` files themselves: they are converted in memory).  Every model scores the same stamps; the
report gives accuracy at 0.5 and ROC AUC with sample sizes, overall, per S/N bin and per kind
(for a bogus kind the AUC is that kind against all real stamps), and the machine and versions.
Use stamp sets from seeds the shipped weights never saw (they were trained on seed 1000).

Before/after a change of the simulation or the pipeline (issue #11, item 6)::

    python benchmarks/des_checkpoints.py --data after3000/dia.npz after4000/dia.npz \
        --before before3000/dia.npz before4000/dia.npz --des-triplet des-triplet.pt --des-pair des-pair.pt \
        --by-convolved --out des_check.json

scores both streams with every model (the DES checkpoints and ours) and adds a before/after table
(accuracy and AUC with sample sizes), so that a change that helps the DES models only by removing
cases that are hard for our models too shows up in our models' columns.  ``--drop-flags MASKED``
leaves out candidates with those flags and re-balances the classes (what a stream built with
MASKED candidates dropped would hold, up to the random draw); ``--by-convolved`` splits the
figures by which image the PSF matching convolved (from each CCD's simulated seeing: the image
with the narrower PSF, as ``psf_match.convolve = "auto"`` decides).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.data import StampSet  # noqa: E402
from classifier.evaluate import EvaluationConfig, accuracy, roc_auc  # noqa: E402
from classifier.infer import Scorer  # noqa: E402

__all__ = ["BenchConfig", "compare_models", "convolved_image", "load_stream", "refine_kinds", "main"]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Parameters of :func:`compare_models`.

    Attributes
    ----------
    threshold : float
        P(real) at and above which a stamp is called real (default 0.5).
    snr_bins : tuple of float
        Edges of the S/N bins (default those of :class:`classifier.evaluate.EvaluationConfig`).
    min_auc_class : int
        Fewest stamps of each class for a per-bin AUC to be reported (default 20; else None).
    """

    threshold: float = 0.5
    snr_bins: tuple[float, ...] = EvaluationConfig().snr_bins
    min_auc_class: int = 20


def _auc(labels: np.ndarray, scores: np.ndarray, min_class: int) -> float | None:
    n_real = int((labels == 1).sum())
    if n_real < min_class or labels.size - n_real < min_class:
        return None
    return float(roc_auc(labels, scores))


def _metrics(labels: np.ndarray, scores: np.ndarray, meta: dict[str, np.ndarray], config: BenchConfig) -> dict:
    """Overall, per-S/N-bin and per-kind accuracy and AUC of one model's scores."""
    thr = config.threshold
    out: dict[str, Any] = {"n": int(labels.size), "n_real": int(labels.sum()),
                           "accuracy": float(accuracy(labels, scores, thr)), "roc_auc": float(roc_auc(labels, scores)),
                           "real_efficiency": float((scores[labels == 1] >= thr).mean()),
                           "bogus_rejection": float((scores[labels == 0] < thr).mean())}
    snr = np.asarray(meta["snr"], dtype=float)
    rows = []
    for lo, hi in zip(config.snr_bins[:-1], config.snr_bins[1:]):
        m = (snr >= lo) & (snr < hi)
        if not m.any():
            continue
        rows.append({"lo": lo, "hi": hi, "n": int(m.sum()), "n_real": int(labels[m].sum()),
                     "accuracy": float(accuracy(labels[m], scores[m], thr)),
                     "roc_auc": _auc(labels[m], scores[m], config.min_auc_class)})
    out["per_snr"] = rows
    kinds = np.asarray(meta["kind"]).astype(str)
    real = labels == 1
    rows = []
    for kind in sorted(set(kinds.tolist())):
        m = kinds == kind
        row = {"kind": kind, "n": int(m.sum()), "label": "real" if bool(real[m].all()) else "bogus",
               "accuracy": float(accuracy(labels[m], scores[m], thr))}
        if row["label"] == "bogus":  # this kind against every real stamp
            sel = m | real
            row["roc_auc_vs_real"] = _auc(labels[sel], scores[sel], 1)
        rows.append(row)
    out["per_kind"] = rows
    if "convolved" in meta:
        conv = np.asarray(meta["convolved"]).astype(str)
        rows = []
        for which in sorted(set(conv.tolist())):
            m = conv == which
            rows.append({"convolved": which, "n": int(m.sum()), "n_real": int(labels[m].sum()),
                         "n_ccds": int(len(set(np.asarray(meta["ccd"])[m].tolist()))),
                         "accuracy": float(accuracy(labels[m], scores[m], thr)),
                         "roc_auc": _auc(labels[m], scores[m], config.min_auc_class)})
        out["per_convolved"] = rows
    return out


def compare_models(stamps: StampSet, models: dict[str, str | Path], config: BenchConfig = BenchConfig(),
                   threads: int | None = None) -> dict[str, dict]:
    """Score ``stamps`` with each weights file of ``models`` (label -> path) and compute the metrics."""
    results = {}
    for label, path in models.items():
        scorer = Scorer(path, threads=threads)
        scores = scorer.score(stamps.stamps, stamps.channels)
        res = _metrics(stamps.labels, scores, stamps.meta, config)
        res["model"] = scorer.name
        res["weights"] = str(path)
        res["trained_on"] = scorer.metadata.get("trained_on", "simulated dia stream (shipped)")
        results[label] = res
    return results


def convolved_image(ccd: str, instrument: str = "decam") -> str:
    """Which image ``psf_match.convolve = "auto"`` convolves on simulated CCD ``s<seed>-ccd<k>``.

    From the simulated seeing (the narrower PSF is convolved); the seeing is drawn before
    anything that depends on the CCD shape, so a small CCD of the same seed and index has it.
    """
    from pipeline.simulate import SimulationConfig, simulate_pair

    seed, index = ccd[1:].split("-ccd")
    meta = simulate_pair(SimulationConfig(instrument=instrument, shape=(64, 64)), int(seed), int(index)).truth.meta
    return "search" if meta["search_fwhm"] < meta["template_fwhm"] else "template"


def refine_kinds(stamps: StampSet, track_margin: float = 2.0, trail_halfwidth: float = 8.0,
                 residual_radius: float = 6.0) -> dict[str, int]:
    """Name the extended artifact behind each ``unmatched`` bogus stamp (in place; returns counts).

    Truth matching (:func:`pipeline.truth.match_truth`) places a cosmic-ray track at its
    brightest pixel, a bad column at its centre and a satellite trail at its point nearest the
    CCD centre, so detections further along them are ``unmatched``.  Each CCD is simulated
    again (same seed, index and data-set settings; the trails' angles are caught on the way)
    and an ``unmatched`` stamp becomes ``cosmic_ray`` within the track's length plus
    ``track_margin`` px of a cosmic ray, ``bad_column`` within ``track_margin`` px of a bad
    column segment, ``satellite`` within ``trail_halfwidth`` px of a search-image trail; failing
    those, the kind of the nearest star, variable or galaxy within ``residual_radius`` px (a
    subtraction residual such as a misregistration dipole, whose positive lobe lies about a FWHM
    from the source).
    """
    from pipeline.simulate import SimulationConfig, artifacts, simulate_pair

    ds = stamps.attrs.get("dataset_config") or {}
    kind = np.asarray(stamps.meta["kind"]).astype("U16")
    ccds = np.asarray(stamps.meta["ccd"]).astype(str)
    x, y = np.asarray(stamps.meta["x"], float), np.asarray(stamps.meta["y"], float)
    counts: dict[str, int] = {}
    original = artifacts.satellite_trail
    for ccd in sorted(set(ccds[kind == "unmatched"].tolist())):
        angles: list[float] = []

        def trail(*args, _angles=angles, **kwargs):
            rec = original(*args, **kwargs)
            _angles.append(rec["angle"])
            return rec

        seed, index = ccd[1:].split("-ccd")
        base = SimulationConfig(instrument=ds.get("instrument", "decam"))
        cfg = dataclasses.replace(base, shape=tuple(ds.get("shape", (2048, 2048))),
                                  transient_density=base.transient_density * ds.get("transient_density_factor", 8.0))
        artifacts.satellite_trail = trail
        try:
            truth = simulate_pair(cfg, int(seed), int(index)).truth
        finally:
            artifacts.satellite_trail = original
        tk = np.asarray(truth["kind"]).astype(str)
        img = np.asarray(truth["image"]).astype(str)
        sats = np.flatnonzero(tk == "satellite")  # in drawing order: angles[i] belongs to sats[i]
        sources = np.flatnonzero(np.isin(tk, ("star", "variable", "galaxy")))
        for i in np.flatnonzero((ccds == ccd) & (kind == "unmatched")):
            new = ""
            for j in np.flatnonzero(tk == "cosmic_ray"):
                if np.hypot(x[i] - truth["x"][j], y[i] - truth["y"][j]) <= truth["length"][j] + track_margin:
                    new = "cosmic_ray"
            for j in np.flatnonzero(tk == "bad_column"):
                if (abs(x[i] - truth["x"][j]) <= track_margin
                        and abs(y[i] - truth["y"][j]) <= truth["length"][j] / 2 + track_margin):
                    new = "bad_column"
            for j, angle in zip(sats, angles):
                if img[j] != "search":
                    continue
                a = np.radians(angle)
                if abs(-(x[i] - truth["x"][j]) * np.sin(a) + (y[i] - truth["y"][j]) * np.cos(a)) <= trail_halfwidth:
                    new = "satellite"
            if not new and sources.size:
                d = np.hypot(x[i] - np.asarray(truth["x"])[sources], y[i] - np.asarray(truth["y"])[sources])
                if d.min() <= residual_radius:
                    new = str(tk[sources[np.argmin(d)]])
            if new:
                kind[i] = new
                counts[new] = counts.get(new, 0) + 1
    stamps.meta["kind"] = kind
    return counts


def load_stream(paths: list[str], split: str = "test", drop_flags: int = 0, by_convolved: bool = False,
                seed: int = 0, refine: bool = False, variables: str = "as-built",
                drop_kinds: tuple[str, ...] = ()) -> StampSet:
    """Concatenated stamp sets of ``paths`` (one split), optionally without flagged candidates.

    ``drop_flags`` (CandidateFlags bits): stamps with any of them are left out and the classes
    re-balanced with ``seed``.  ``by_convolved`` adds a ``convolved`` metadata column
    (:func:`convolved_image`); ``refine`` names the artifacts behind ``unmatched`` stamps
    (:func:`refine_kinds`, per input set).  ``variables``: ``"as-built"`` keeps the labels of
    the stamp sets; ``"real"`` relabels candidates on variable stars real (ZTF's definition,
    :func:`pipeline.truth.candidate_labels`), ``"drop"`` leaves them out; either re-balances.
    ``drop_kinds``: bogus kinds left out (after ``refine``), e.g. ``satellite`` for what a
    pipeline that masks streaks would leave; re-balances.
    """
    if variables not in ("as-built", "real", "drop"):
        raise ValueError(f"variables must be 'as-built', 'real' or 'drop', got {variables!r}")
    sets = [StampSet.load(p) for p in paths]
    if split != "all":
        sets = [s.select(split) for s in sets]
    refined: dict[str, int] = {}
    if refine:
        for st in sets:
            for key, n in refine_kinds(st).items():
                refined[key] = refined.get(key, 0) + n
    stamps = StampSet.concatenate(sets) if len(sets) > 1 else sets[0]
    stamps.attrs["refined_kinds"] = refined
    stamps.attrs["seeds"] = sorted({int(s.attrs.get("dataset_config", {}).get("seed", -1)) for s in sets})
    keep = np.ones(len(stamps), bool)
    if drop_flags:
        keep &= (np.asarray(stamps.meta["flags"]) & int(drop_flags)) == 0
    on_variable = np.asarray(stamps.meta["kind"]).astype(str) == "variable"
    if variables == "drop":
        keep &= ~on_variable
    if drop_kinds:
        keep &= ~(np.isin(np.asarray(stamps.meta["kind"]).astype(str), list(drop_kinds)) & (stamps.labels == 0))
    elif variables == "real":
        stamps.labels = np.where(on_variable, 1, stamps.labels).astype(stamps.labels.dtype)
    if drop_flags or variables != "as-built" or drop_kinds:
        stamps = stamps.subset(keep).balance(seed)
    if by_convolved:
        ccds = np.asarray(stamps.meta["ccd"]).astype(str)
        instrument = (sets[0].attrs.get("dataset_config") or {}).get("instrument", "decam")
        which = {c: convolved_image(c, instrument) for c in sorted(set(ccds.tolist()))}
        stamps.meta["convolved"] = np.array([which[c] for c in ccds])
    return stamps


def _weights(path: str, model: str, tmp: Path) -> Path:
    """A weights file for ``path``: itself, or converted in memory from a Keras ``.h5``."""
    p = Path(path)
    if p.suffix.lower() not in (".h5", ".hdf5"):
        return p
    from classifier.keras_import import convert_keras_checkpoint
    from classifier.models import build_model, get_spec
    from classifier.train import save_weights

    state, meta = convert_keras_checkpoint(p, model)
    net = build_model(model)
    net.load_state_dict(state)
    return save_weights(net, get_spec(model), tmp / f"{model}-des.pt", **meta)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "  -   " if v is None else f"{v:.{digits}f}"


def _table(results: dict[str, dict]) -> str:
    labels = list(results)
    lines = ["| model | n (real) | accuracy | ROC AUC | real eff. | bogus rej. |",
             "| --- | --- | --- | --- | --- | --- |"]
    for lab in labels:
        r = results[lab]
        lines.append(f"| {lab} | {r['n']} ({r['n_real']}) | {r['accuracy']:.4f} | {r['roc_auc']:.4f} | "
                     f"{r['real_efficiency']:.4f} | {r['bogus_rejection']:.4f} |")
    lines += ["", "Per S/N bin (accuracy / ROC AUC):", "",
              "| S/N | n (real) | " + " | ".join(labels) + " |", "| --- | --- |" + " --- |" * len(labels)]
    first = results[labels[0]]
    for i, row in enumerate(first["per_snr"]):
        cells = [f"{_fmt(results[lab]['per_snr'][i]['accuracy'], 3)} / {_fmt(results[lab]['per_snr'][i]['roc_auc'], 3)}"
                 for lab in labels]
        lines.append(f"| {row['lo']:g}-{row['hi']:g} | {row['n']} ({row['n_real']}) | " + " | ".join(cells) + " |")
    lines += ["", "Per kind (accuracy; bogus kinds: / ROC AUC against all real stamps):", "",
              "| kind | n | " + " | ".join(labels) + " |", "| --- | --- |" + " --- |" * len(labels)]
    for i, row in enumerate(first["per_kind"]):
        cells = []
        for lab in labels:
            k = results[lab]["per_kind"][i]
            cells.append(f"{k['accuracy']:.3f}" + (f" / {_fmt(k.get('roc_auc_vs_real'), 3)}"
                                                   if k["label"] == "bogus" else ""))
        lines.append(f"| {row['kind']} ({row['label']}) | {row['n']} | " + " | ".join(cells) + " |")
    if "per_convolved" in first:
        lines += ["", "Per convolved image (accuracy / ROC AUC):", "",
                  "| convolved | CCDs | n (real) | " + " | ".join(labels) + " |",
                  "| --- | --- | --- |" + " --- |" * len(labels)]
        for i, row in enumerate(first["per_convolved"]):
            cells = [f"{results[lab]['per_convolved'][i]['accuracy']:.3f} / "
                     f"{_fmt(results[lab]['per_convolved'][i]['roc_auc'], 3)}" for lab in labels]
            lines.append(f"| {row['convolved']} | {row['n_ccds']} | {row['n']} ({row['n_real']}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _before_after(before: dict[str, dict], after: dict[str, dict]) -> str:
    """One line per model: accuracy and AUC on the before and after streams."""
    lines = ["| model | before: n (real) | accuracy | ROC AUC | after: n (real) | accuracy | ROC AUC |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for lab in after:
        b, a = before[lab], after[lab]
        lines.append(f"| {lab} | {b['n']} ({b['n_real']}) | {b['accuracy']:.4f} | {b['roc_auc']:.4f} | "
                     f"{a['n']} ({a['n_real']}) | {a['accuracy']:.4f} | {a['roc_auc']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, help="labelled stamp set(s) (.npz from pipeline dataset)")
    ap.add_argument("--split", default="test", help="split to use (default test; 'all' for every stamp)")
    ap.add_argument("--des-triplet", required=True, help="imported DES triplet (.pt) or the authors' AAD .h5")
    ap.add_argument("--des-pair", required=True, help="imported DES pair (.pt) or the authors' CCC .h5")
    ap.add_argument("--ours", nargs="*", default=["triplet-paper", "pair-paper"],
                    help="our weights to compare with (shipped names or files; default the shipped paper models)")
    ap.add_argument("--before", nargs="+", default=None,
                    help="stamp set(s) of the stream before a change: scored too, with a before/after table")
    ap.add_argument("--drop-flags", nargs="*", default=[], metavar="FLAG",
                    help="leave out candidates with these CandidateFlags (e.g. MASKED) and re-balance")
    ap.add_argument("--by-convolved", action="store_true",
                    help="also split the figures by which image the PSF matching convolved (simulated seeing)")
    ap.add_argument("--variables", choices=("as-built", "real", "drop"), default="as-built",
                    help="label of candidates on variable stars: as in the stamp sets (default), real, or left out")
    ap.add_argument("--drop-kinds", nargs="*", default=[], metavar="KIND",
                    help="leave out bogus stamps of these kinds (after --refine-kinds) and re-balance")
    ap.add_argument("--refine-kinds", action="store_true",
                    help="name the cosmic-ray tracks, bad columns and satellite trails behind 'unmatched' stamps "
                         "(simulates every CCD again)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)

    from pipeline.detect import CandidateFlags

    try:
        drop = sum(int(CandidateFlags[name.upper()]) for name in args.drop_flags)
    except KeyError as exc:
        ap.error(f"--drop-flags: unknown flag {exc}; known: {[f.name for f in CandidateFlags]}")
    opts = dict(drop_flags=drop, by_convolved=args.by_convolved, refine=args.refine_kinds, variables=args.variables,
                drop_kinds=tuple(args.drop_kinds))
    streams = {"after": load_stream(args.data, args.split, **opts)}
    if args.before:
        streams = {"before": load_stream(args.before, args.split, **opts), **streams}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"DES triplet (AAD_3s3DH)": _weights(args.des_triplet, "triplet-paper", Path(tmp)),
                  "DES pair (CCC_3s2DH)": _weights(args.des_pair, "pair-paper", Path(tmp))}
        models.update({f"ours {m}": m for m in args.ours})
        scored = {key: compare_models(st, models, BenchConfig(), args.threads) for key, st in streams.items()}
    stamps, results = streams["after"], scored["after"]
    report = {"data": [str(p) for p in args.data], "split": args.split, "n": len(stamps),
              "n_real": int(stamps.labels.sum()), "seeds": stamps.attrs["seeds"], "drop_flags": args.drop_flags,
              "variables": args.variables, "drop_kinds": args.drop_kinds,
              "refined_kinds": stamps.attrs["refined_kinds"],
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                          "cpu": platform.processor() or platform.machine()},
              "results": results}
    if args.before:
        report["before"] = {"data": [str(p) for p in args.before], "n": len(streams["before"]),
                            "n_real": int(streams["before"].labels.sum()), "seeds": streams["before"].attrs["seeds"],
                            "refined_kinds": streams["before"].attrs["refined_kinds"],
                            "results": scored["before"]}
        print("Before:\n\n" + _table(scored["before"]) + "\n\nAfter:\n")
    print(_table(results))
    if args.before:
        print("\nBefore / after:\n\n" + _before_after(scored["before"], results))
    if args.out:
        from pipeline.io import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
