"""``pipeline saliency``: vanilla-gradient saliency maps, per-stamp fractions and the TP/FP/TN/FN table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import add_device_argument

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pipeline saliency``."""
    parser.add_argument("--model", required=True, help="training folder, weights file or shipped model name")
    parser.add_argument("--data", required=True, help="stamp set (.npz) or a DES autoScan folder")
    parser.add_argument("--out", required=True, help="folder for saliency.json and saliency_gallery.png")
    parser.add_argument("--split", default="test", help="split to use (or 'all'; default test)")
    parser.add_argument("--n", type=int, default=2000, help="number of objects (first N of the split; default 2000)")
    parser.add_argument("--gallery", type=int, default=8, help="objects shown in the PNG gallery (default 8)")
    add_device_argument(parser, "cpu", "where the gradients are computed (default cpu, the reference)")


def main(args: argparse.Namespace) -> int:
    """Run ``pipeline saliency``."""
    import numpy as np

    from classifier.infer import load_weights, torch_device
    from classifier.saliency import plot_saliency_gallery, saliency_maps, saliency_table
    from pipeline.commands.train import load_stamp_data
    from pipeline.io import atomic_path

    try:
        data = load_stamp_data(args.data)
        if args.split != "all":
            data = data.select(args.split)
        net, spec, _meta, path = load_weights(args.model)
        device = torch_device(args.device)
        data = data.subset(np.arange(min(args.n, len(data))))
        model_stamps = data.stamps_for(spec.scheme)  # sky units for a "sky" model
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pipeline saliency: {exc}", file=sys.stderr)
        return 2
    result = saliency_maps(net, spec, model_stamps, data.channels, device=device)
    table = saliency_table(result, data.labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": spec.name, "weights": str(path), "n": len(data), "channels": list(result.channels),
               "table": table, "mean_fractions": dict(zip(result.channels, result.fractions.mean(0).tolist()))}
    with atomic_path(out / "saliency.json") as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1))
    # gallery: a few of each outcome class where available
    pred = result.scores >= 0.5
    order = np.concatenate([np.flatnonzero(m)[:max(1, args.gallery // 4)] for m in
                            (pred & (data.labels == 1), pred & (data.labels == 0),
                             ~pred & (data.labels == 0), ~pred & (data.labels == 1))])
    from classifier.saliency import SaliencyResult

    sub = SaliencyResult(result.maps[order], result.fractions[order], result.scores[order], result.channels)
    plot_saliency_gallery(data.stamps[order], sub, data.labels[order], out / "saliency_gallery.png",
                          data.channels, n_max=args.gallery, title=f"{spec.name}: TP, FP, TN, FN examples")
    print(f"{spec.name}: mean saliency fractions over {len(data)} objects")
    print(f"{'class':6s} {'n':>6s} " + " ".join(f"{c:>10s}" for c in result.channels))
    for cls, row in table.items():
        vals = " ".join(f"{row[c]:10.3f}" if row[c] is not None else f"{'-':>10s}" for c in result.channels)
        print(f"{cls:6s} {row['n']:6d} {vals}")
    print(f"wrote {out / 'saliency.json'} and {out / 'saliency_gallery.png'}")
    return 0
