"""``pipeline train``: train a real-bogus CNN on a labelled stamp set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import TRAINING_SEED, add_device_argument, add_quiet_argument

__all__ = ["add_arguments", "main", "load_stamp_data", "balanced_subset"]


def load_stamp_data(path: str | Path, seed: int = 0):
    """A StampSet from a ``.npz`` stamp set or a DES autoScan folder (detected)."""
    from classifier.data import StampSet

    path = Path(path)
    if path.is_dir():
        from classifier.autoscan import load_autoscan

        return load_autoscan(path, seed=seed)
    return StampSet.load(path)


def _models() -> list[str]:
    # the keys of classifier.models.MODELS, listed here so `pipeline --help` does not import torch
    return ["triplet-paper", "pair-paper", "triplet", "pair", "pair-sky", "pair-sky-lite"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pipeline train``."""
    parser.add_argument("--model", required=True, choices=_models(), help="model to train")
    parser.add_argument("--data", required=True,
                        help="stamp set (.npz with a split column: train/val) or a DES autoScan folder")
    parser.add_argument("--out", required=True, help="output folder (model.pt, last.pt, history.json)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the model's recipe)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="mini-batch size (default: the model's recipe; paper: 200)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's recipe)")
    parser.add_argument("--patience", type=int, default=None,
                        help="early-stopping patience in epochs (default: the model's recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    add_device_argument(parser, "auto", "where to train (default auto: training is the one job where a GPU pays "
                        "off most, and CPU and GPU weights are equally valid)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed: weight initialisation, batch order, augmentation, the --max-train subset "
                             "and the split of a DES autoScan folder (default 0, as the shipped weights). Not a "
                             f"simulation seed: the shipped weights' training stamps came from simulation seed "
                             f"{TRAINING_SEED} (pipeline dataset --seed)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="train on a random class-balanced subset of at most this many stamps (seeded)")
    add_quiet_argument(parser, "progress bars or per-epoch lines")


def balanced_subset(stamps, n: int, seed: int):
    """At most ``n`` stamps, half real and half bogus where possible, drawn with ``seed``."""
    import numpy as np

    if n >= len(stamps):
        return stamps
    rng = np.random.default_rng(seed)
    keep = []
    for label in (0, 1):
        idx = np.flatnonzero(stamps.labels == label)
        keep.append(rng.choice(idx, min(idx.size, n // 2), replace=False))
    return stamps.subset(np.sort(np.concatenate(keep)))


def main(args: argparse.Namespace) -> int:
    """Run ``pipeline train``."""
    from classifier.infer import torch_device
    from classifier.train import TrainConfig, train_model

    try:
        torch_device(args.device)  # no GPU for --device gpu: say so before loading anything
        data = load_stamp_data(args.data, args.seed)
        train, val = data.select("train"), data.select("val")
        if args.max_train:
            train = balanced_subset(train, args.max_train, args.seed)
        config = TrainConfig.for_model(args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       patience=args.patience, seed=args.seed, threads=args.threads,
                                       progress=not args.quiet)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pipeline train: {exc}", file=sys.stderr)
        return 2
    print(f"training {args.model} on {len(train)} stamps (val {len(val)}) from {args.data}", file=sys.stderr)
    result = train_model(args.model, train, val, config, args.out, device=args.device, resume=args.resume)
    summary = {"model": str(result.model_path), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "stopped_early": result.stopped_early, **result.val_metrics}
    print(json.dumps(summary, indent=1))
    return 0
