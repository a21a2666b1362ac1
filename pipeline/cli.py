"""The ``pipeline`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``.  Only the chosen subcommand's module is imported: ``pipeline --help``
lists the subcommands from :data:`COMMANDS` without importing any of them, and
``pipeline run ...`` imports ``pipeline.commands.run`` alone.  Command modules keep their
top-level imports light (heavy ones happen inside ``main``).

This module also holds what every subcommand shares, so the vocabulary is one:

* ``--device {auto,cpu,gpu}`` (:func:`add_device_argument`; ``cuda`` is a deprecated alias of
  ``gpu``), each command choosing and stating its default;
* ``--quiet`` for "no progress bars or progress lines" (:func:`add_quiet_argument`;
  ``--no-progress`` is a hidden alias);
* the seeds (:data:`SEEDS`, :data:`SEED_NOTE`): which simulation seed the shipped weights were
  trained on and which seeds the commands' defaults use, all held out.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS", "build_parser", "package_version", "parse_shape", "add_device_argument",
           "add_quiet_argument", "device_type", "DEVICES", "SEEDS", "SEED_NOTE", "TRAINING_SEED"]

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
    "vet": ("pipeline.commands.vet", "an HTML page to vet a run's candidates by eye"),
    "score-alerts": ("pipeline.commands.score_alerts", "score ZTF / Rubin alert cutouts with the CNNs"),
    "import-keras": ("pipeline.commands.import_keras", "convert the paper's Keras checkpoints to weights"),
}

#: Device names of every ``--device`` option: auto = the GPU when one is usable, else the CPU.
DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")

#: The simulation seed of the survey the shipped CNN weights were trained on
#: (``classifier/weights/make_weights.sh``: CCDs 0-149, whole CCDs split 70/10/20 train/val/test).
TRAINING_SEED = 1000

#: Simulation seeds with a fixed meaning.  CCD ``k`` of a simulation depends only on ``(seed, k)``
#: (independent streams spawned from the seed), so two different seeds share no CCD.
SEEDS: dict[int, str] = {
    0: "pipeline simulate (default)",
    TRAINING_SEED: "TRAINING survey of the shipped weights (CCDs 0-149; its test-split CCDs are held out)",
    2000: "held-out survey of the accuracy table in classifier/weights/README.md",
    2026: "pipeline run: the embedded default field (held out)",
    3000: "pipeline dataset (default; held out)",
    9000: "pipeline benchmark (default; held out)",
}

#: One sentence for every ``--seed`` help text.
SEED_NOTE = (f"The shipped weights were trained on simulation seed {TRAINING_SEED} (CCDs 0-149): use another "
             "seed for an honest held-out evaluation; the defaults of simulate (0), run (2026), dataset (3000) "
             "and benchmark (9000) are all held out. CCD k depends only on (seed, k).")


def package_version() -> str:
    """The installed version of the ``transient-pipeline`` distribution (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transient-pipeline")
    except PackageNotFoundError:
        return "unknown (package not installed; pip install -e .)"


class _VersionAction(argparse.Action):
    """``--version``: print the installed package version and exit (looked up only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} (transient-pipeline) {package_version()}")
        parser.exit()


def parse_shape(text: str) -> tuple[int, int]:
    """Parse ``NYxNX`` (e.g. ``4096x2048``) into ``(ny, nx)``; both sides must be >= 64."""
    try:
        ny, nx = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected NYxNX such as 512x512, got {text!r}") from None
    if ny < 64 or nx < 64:
        raise argparse.ArgumentTypeError(f"--shape: both sides must be >= 64, got {text!r}")
    return ny, nx


def device_type(text: str) -> str:
    """argparse type of ``--device``: lower-cased; the deprecated ``cuda`` becomes ``gpu`` (with a note)."""
    name = str(text).strip().lower()
    if name == "cuda":
        print("pipeline: --device cuda is deprecated and will be removed; use --device gpu", file=sys.stderr)
        return "gpu"
    return name


def add_device_argument(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """Add ``--device {auto,cpu,gpu}``; ``help`` says what the command runs there and its default.

    ``cuda`` is still accepted (a deprecated, hidden alias of ``gpu``).
    """
    parser.add_argument("--device", type=device_type, choices=DEVICES, default=default,
                        metavar="{" + ",".join(DEVICES) + "}",
                        help=help + " (auto: the GPU when one is usable, else the CPU)")


def add_quiet_argument(parser: argparse.ArgumentParser, what: str = "progress bars") -> None:
    """Add ``--quiet`` (no progress output) and its hidden alias ``--no-progress``."""
    parser.add_argument("--quiet", action="store_true", help=f"no {what}")
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def build_parser(commands: list[str] | tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The top-level parser.

    Parameters
    ----------
    commands : sequence of str, optional
        Subcommands whose module is imported and whose options are defined (default: all).
        The others are listed by name and one-line help only, so building the parser for
        ``pipeline --help`` or for one subcommand imports no other subcommand's module.
    """
    full = set(COMMANDS) if commands is None else set(commands)
    seeds = "\n".join(f"  {seed:<5d} {use}" for seed, use in SEEDS.items())
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Transient detection with (dia) and without (direct) difference imaging.",
        epilog=f"simulation seeds (CCD k depends only on (seed, k)):\n{seeds}\n\n"
               "Run 'pipeline COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the installed package version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in full:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word not starting with ``-`` (the top level takes
    no option with a value), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    parser = build_parser([command] if command else [])
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
