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

__all__ = ["BenchConfig", "compare_models", "main"]


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
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)

    sets = [StampSet.load(p) for p in args.data]
    if args.split != "all":
        sets = [s.select(args.split) for s in sets]
    stamps = StampSet.concatenate(sets) if len(sets) > 1 else sets[0]
    with tempfile.TemporaryDirectory() as tmp:
        models = {"DES triplet (AAD_3s3DH)": _weights(args.des_triplet, "triplet-paper", Path(tmp)),
                  "DES pair (CCC_3s2DH)": _weights(args.des_pair, "pair-paper", Path(tmp))}
        models.update({f"ours {m}": m for m in args.ours})
        results = compare_models(stamps, models, BenchConfig(), args.threads)
    seeds = sorted({int(s.attrs.get("dataset_config", {}).get("seed", -1)) for s in sets})
    report = {"data": [str(p) for p in args.data], "split": args.split, "n": len(stamps),
              "n_real": int(stamps.labels.sum()), "seeds": seeds,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                          "cpu": platform.processor() or platform.machine()},
              "results": results}
    print(_table(results))
    if args.out:
        from pipeline.io import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
