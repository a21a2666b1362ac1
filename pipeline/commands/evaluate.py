"""``pipeline evaluate``: metrics of a trained CNN on a labelled stamp set (JSON, ROC PNG, summary)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import SEED_NOTE, add_device_argument

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pipeline evaluate``."""
    parser.add_argument("--model", required=True,
                        help="training folder, weights file (.pt) or shipped model name")
    parser.add_argument("--data", required=True,
                        help="stamp set (.npz) or a DES autoScan folder. It must be held out: a warning (stderr "
                             "and evaluation.json) flags stamps from simulated CCDs the model was trained or "
                             "validated on. " + SEED_NOTE)
    parser.add_argument("--split", default="test",
                        help="split to evaluate (train/val/test, or 'all'; default test)")
    parser.add_argument("--out", default=None, help="folder for evaluation.json and roc.png (default: print only)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold for 'real' (default 0.5)")
    add_device_argument(parser, "auto", "where the CNN scores (default auto)")
    parser.add_argument("--batch-size", type=int, default=1024, help="stamps per forward pass (default 1024)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def main(args: argparse.Namespace) -> int:
    """Run ``pipeline evaluate``.

    Exit status 0 also when the set overlaps the model's training data: the warning is printed
    (stderr, and at the top of the summary) and recorded in ``evaluation.json``.
    """
    import warnings

    from classifier.evaluate import EvaluationConfig, TrainingDataOverlapWarning, evaluate_model, plot_roc
    from classifier.infer import Scorer
    from pipeline.commands.train import load_stamp_data

    try:
        data = load_stamp_data(args.data)
        if args.split != "all":
            data = data.select(args.split)
        scorer = Scorer(args.model, device=args.device, batch_size=args.batch_size, threads=args.threads)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pipeline evaluate: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():  # printed below, in the command's own words
        warnings.simplefilter("ignore", TrainingDataOverlapWarning)
        result = evaluate_model(scorer, data, EvaluationConfig(threshold=args.threshold))
    print(f"{scorer.name} ({scorer.path}) on {args.data} [{args.split}]")
    print(result.summary())
    overlap = result.training_overlap or {}
    if overlap.get("note"):
        print(f"training data: {overlap['note']}")
    for text in result.warnings:
        print(f"pipeline evaluate: WARNING: {text}", file=sys.stderr)
    if args.out:
        from pipeline.io import atomic_path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model": scorer.describe(), "data": str(args.data), "split": args.split,
                   "data_attrs": data.attrs, **result.to_dict()}
        with atomic_path(out / "evaluation.json") as tmp:
            Path(tmp).write_text(json.dumps(payload, indent=1, default=str))
        title = f"{scorer.name}: {len(data)} stamps ({args.split})"
        if result.warnings:
            title += " - NOT held out"
        plot_roc({scorer.name: result}, out / "roc.png", title=title)
        print(f"wrote {out / 'evaluation.json'} and {out / 'roc.png'}")
    return 0
