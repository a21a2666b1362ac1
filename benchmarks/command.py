"""``pipeline benchmark``: cost versus accuracy of the dia and direct modes on one held-out field.

Writes ``report.md``, ``report.html`` (self-contained) and ``report.json`` in ``--out``; see
:mod:`benchmarks.suite` for what is measured and ``benchmarks/README.md`` for the latest table.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import SEED_NOTE, add_device_argument, add_quiet_argument, parse_shape

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline benchmark``."""
    parser.add_argument("--out", required=True,
                        help="output folder (report.md, report.html, report.json, runs/, plots/)")
    parser.add_argument("--ccds", type=int, default=4, help="simulated CCD pairs (default 4)")
    parser.add_argument("--instrument", choices=("decam", "ztf", "lsst"), default="decam",
                        help="simulated instrument (default decam: 4096 x 2048 CCDs)")
    parser.add_argument("--shape", type=parse_shape, default=None, help="CCD shape NYxNX (default: the instrument's)")
    add_device_argument(parser, "cpu", "gpu: also run both modes on the GPU, beside the CPU runs (default cpu: "
                        "CPU runs only, so the report does not depend on the machine having a GPU)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers, one thread each (default 2)")
    parser.add_argument("--input", default=None, help="manifest of CCD pairs to use instead of simulating")
    parser.add_argument("--seed", type=int, default=9000,
                        help="simulation seed of the benchmark field (default 9000, held out). " + SEED_NOTE)
    parser.add_argument("--density-factor", type=float, default=1.0,
                        help="multiply the simulated transient density (default 1)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold of both modes (default 0.5)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the run on the other worker count")
    parser.add_argument("--config", default=None,
                        help="TOML file whose [run] table (or top level) sets RunConfig fields of both modes' runs, "
                             "e.g. [run.direct] selection = \"dense\" (mode, device and threshold: the options above)")
    add_quiet_argument(parser, "progress lines")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; print the headline table and where the reports are."""
    from pathlib import Path

    from benchmarks.report import headline_markdown
    from benchmarks.suite import BenchmarkConfig, run_benchmark
    from pipeline.config import resolve_device
    from pipeline.io import InputError

    device, why = resolve_device(args.device)
    if args.device == "auto" and not args.quiet:
        print(f"--device auto: {device} ({why})", flush=True)
    from pipeline.config import load_toml, run_table

    try:
        run = run_table(load_toml(args.config), "run", args.config) if args.config else None
        config = BenchmarkConfig(n_ccds=args.ccds, instrument=args.instrument,
                                 shape=tuple(args.shape) if args.shape else None, seed=args.seed,
                                 density_factor=args.density_factor, device=device, workers=args.workers,
                                 scaling=not args.no_scaling, score_threshold=args.threshold, run=run)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pipeline benchmark: {exc}", file=sys.stderr)
        return 2
    if args.input and not Path(args.input).is_file():
        print(f"pipeline benchmark: --input {args.input}: no such manifest", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    try:
        data = run_benchmark(config, args.out, manifest=args.input, log=log)
    except InputError as exc:
        print(f"pipeline benchmark: {exc}", file=sys.stderr)
        return 2
    print(headline_markdown(data))
    out = Path(args.out)
    print(f"reports: {out / 'report.html'}, {out / 'report.md'}, {out / 'report.json'}")
    failed = sum(r["n_failed"] for r in data["runs"])
    return 3 if failed else 0
