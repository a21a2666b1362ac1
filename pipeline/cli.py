"""The ``pipeline`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``main(args) -> int``; heavy imports happen inside ``main`` so that
``pipeline --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("pipeline.simulate.command", "simulate search/template CCD pairs with ground truth"),
    "subtract": ("pipeline.commands.subtract", "PSF-match and subtract a template from a search exposure"),
    "run": ("pipeline.commands.run", "run the transient pipeline (dia or direct mode) on CCD pairs"),
    "dataset": ("pipeline.commands.dataset", "cut labelled stamp sets from simulated CCDs"),
    "train": ("pipeline.commands.train", "train a real-bogus CNN"),
    "evaluate": ("pipeline.commands.evaluate", "evaluate a trained CNN on a labelled stamp set"),
    "saliency": ("pipeline.commands.saliency", "saliency maps and per-stamp saliency fractions"),
    "benchmark": ("benchmarks.command", "cost-versus-accuracy benchmark of both modes"),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Transient detection with (dia) and without (direct) difference imaging.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
