"""``pipeline import-keras``: the paper's Keras checkpoints (HDF5) as our weights files.

    pipeline import-keras model_checkpoint_AAD_3s3DH.h5 --model triplet-paper --out des-triplet.pt
    pipeline import-keras model_checkpoint_CCC_3s2DH.h5 --model pair-paper --out des-pair.pt

The written file is an ordinary weights file: every command that takes ``--model FILE.pt`` uses it.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline import-keras``."""
    parser.add_argument("checkpoint", help="Keras 2 HDF5 checkpoint (full model or save_weights file)")
    parser.add_argument("--model", required=True, choices=("triplet-paper", "pair-paper"),
                        help="our architecture the checkpoint is an instance of")
    parser.add_argument("--out", required=True, help="weights file to write (.pt)")
    parser.add_argument("--real-column", type=int, choices=(0, 1), default=0,
                        help="column of the Keras softmax that means real (default 0, as in the paper's code)")


def main(args: argparse.Namespace) -> int:
    """Convert, write atomically, read the result back through the scorer's loader, print a summary."""
    from pathlib import Path

    from classifier.infer import WeightsError, load_weights
    from classifier.keras_import import KerasImportConfig, KerasImportError, convert_keras_checkpoint
    from classifier.models import build_model, get_spec
    from classifier.train import save_weights

    out = Path(args.out)
    try:
        if out.resolve() == Path(args.checkpoint).resolve():
            raise KerasImportError(f"{out}: --out is the checkpoint itself")
        state, metadata = convert_keras_checkpoint(args.checkpoint, args.model,
                                                   KerasImportConfig(real_column=args.real_column))
        net = build_model(args.model)
        net.load_state_dict(state, strict=True)
        save_weights(net, get_spec(args.model), out, **metadata)
        load_weights(out)  # the file every command will read: check it loads as one
    except ImportError as exc:  # h5py missing
        print(f"pipeline import-keras: {exc} (h5py is needed to read Keras HDF5 files)", file=sys.stderr)
        return 2
    except (KerasImportError, WeightsError) as exc:
        print(f"pipeline import-keras: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pipeline import-keras: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    src = metadata["source"]
    conv = metadata["conversion"]
    print(f"{out}: {args.model} ({conv['parameters']:,} parameters) from {src['file']} "
          f"(sha256 {src['sha256'][:12]}, {src['format']}, Keras {src['keras_version'] or '?'}); "
          f"{conv['class_order']}; trained on {metadata['trained_on']}")
    return 0
