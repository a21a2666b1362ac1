"""``pipeline dataset``: labelled stamp sets (dia and direct streams) from simulated CCDs."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import SEED_NOTE, add_quiet_argument, parse_shape

__all__ = ["add_arguments", "main", "DEFAULT_SEED"]

#: Default simulation seed: held out (the shipped weights were trained on seed 1000).
DEFAULT_SEED = 3000

#: Exit status when a requested stream yields no stamps (e.g. every CCD failed); as ``pipeline run``'s 4.
EXIT_ALL_FAILED = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline dataset``."""
    parser.add_argument("--out", required=True, help="output folder: <stream>.npz and dataset.json")
    parser.add_argument("--ccds", type=int, default=40, help="simulated CCD pairs (default 40)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"simulation seed (default {DEFAULT_SEED}, held out). {SEED_NOTE} "
                             "Evaluating a model on CCDs it was trained on gives meaningless scores; "
                             "pipeline evaluate warns when it sees that.")
    parser.add_argument("--instrument", choices=("decam", "ztf", "lsst"), default="decam",
                        help="simulator preset of the CCDs: pixel scale, PSF, depth, noise (default decam; the "
                             "shipped weights of each preset were trained on its own simulations)")
    parser.add_argument("--shape", type=parse_shape, default=None,
                        help="CCD shape NYxNX (default: 2048x2048, half a CCD, for decam; the preset's CCD shape, "
                             "3080x3072 for ztf and 4096x4096 for lsst, otherwise)")
    parser.add_argument("--variables", choices=("bogus", "real"), default="bogus",
                        help="label of candidates on variable stars (default bogus, as in the DES autoScan "
                             "training set: a transient search wants new sources, and a star's variability is "
                             "known from its history; real: any astrophysical change is real, as ZTF's rb/drb "
                             "scores define it, for models compared with or used on ZTF alerts)")
    parser.add_argument("--density-factor", type=float, default=8.0,
                        help="transient density multiplier (default 8; the shipped weights used 12)")
    parser.add_argument("--hard-bogus", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of the bogus kept per CCD that are the largest brightenings in forced "
                             "photometry, the rest at random (default 0, as for every shipped weight: "
                             "DatasetConfig.hard_bogus_fraction)")
    parser.add_argument("--streams", default="dia,direct", help="comma-separated: dia, direct (default both)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--fractions", default="0.7,0.1,0.2",
                        help="train,val,test fractions of the CCDs (default 0.7,0.1,0.2; 0,0,1 for a test-only set)")
    parser.add_argument("--config", default=None, help="TOML with RunConfig parameters used for the candidate stages")
    parser.add_argument("--sim-config", default=None,
                        help="TOML with SimulationConfig parameters (as pipeline simulate --config), e.g. "
                             "star_shift_rms = 0.03 for misregistration dipoles of stars; --instrument, --shape and "
                             "--density-factor still apply")
    add_quiet_argument(parser, "progress bar")


def main(args: argparse.Namespace) -> int:
    """Build the stamp sets and write them with a JSON report.

    Exit status: 0 the sets were written (CCDs that failed are listed on stderr, one line each,
    and in ``dataset.json``); 2 bad arguments; 4 a requested stream yielded no stamps (every
    CCD's error is listed; the streams that did yield stamps are written, with ``dataset.json``).
    """
    import json
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from pipeline.config import RunConfig, config_from_dict, load_toml
    from pipeline.datasets import DatasetConfig, DatasetError, build_datasets, failed_ccds
    from pipeline.io import atomic_path

    streams = tuple(s.strip() for s in args.streams.split(",") if s.strip())
    bad = [s for s in streams if s not in ("dia", "direct")]
    if bad or not streams:
        print(f"pipeline dataset: unknown stream(s) {bad or args.streams!r}; use dia, direct", file=sys.stderr)
        return 2
    if args.ccds < 1:
        print(f"pipeline dataset: --ccds must be >= 1, got {args.ccds}", file=sys.stderr)
        return 2
    run_config = RunConfig()
    if args.config:
        data = load_toml(args.config)
        run_config = config_from_dict(RunConfig, data.get("run", data), where=args.config)
    simulation = None
    if args.sim_config:
        from pipeline.simulate import SimulationConfig

        data = load_toml(args.sim_config)
        simulation = config_from_dict(SimulationConfig, data.get("simulation", data), where=args.sim_config)
    try:
        fractions = tuple(float(v) for v in args.fractions.split(","))
        if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
            raise ValueError
    except ValueError:
        print(f"pipeline dataset: --fractions must be three non-negative numbers, got {args.fractions!r}",
              file=sys.stderr)
        return 2
    config = DatasetConfig(n_ccds=args.ccds, seed=args.seed, shape=tuple(args.shape) if args.shape else None,
                           transient_density_factor=args.density_factor, workers=args.workers,
                           fractions=fractions, instrument=args.instrument, variables=args.variables,
                           hard_bogus_fraction=args.hard_bogus, simulation=simulation)
    out = Path(args.out)
    t0 = time.perf_counter()
    bar = tqdm(total=config.n_ccds, desc="CCDs", unit="ccd", disable=args.quiet)
    problem = None
    try:
        result = build_datasets(config, run_config, streams, progress=lambda r: bar.update(1))
        report = result.pop("report")
    except DatasetError as exc:  # a stream yielded nothing: keep the streams that did, then fail
        result, report, problem = exc.sets, exc.report, str(exc)
    finally:
        bar.close()
    summary = {}
    for stream, stamps in result.items():
        path = stamps.save(out / f"{stream}.npz")
        summary[stream] = stamps.summary()
        print(f"{stream}: {path} {json.dumps(summary[stream])}")
    report["summary"] = summary
    report["seconds"] = time.perf_counter() - t0
    if problem:
        report["error"] = problem
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    for line in failed_ccds(report):
        print(f"pipeline dataset: failed: {line}", file=sys.stderr)
    failed = sum(bool(r["errors"]) for r in report["ccds"])
    if problem:
        print(f"pipeline dataset: {problem}; {failed} of {config.n_ccds} CCDs failed (listed above and in "
              f"{out / 'dataset.json'})", file=sys.stderr)
        return EXIT_ALL_FAILED
    print(f"{config.n_ccds} {config.instrument} CCDs {config.shape[0]}x{config.shape[1]} (seed {config.seed}, "
          f"variable stars {config.variables}) in {report['seconds']:.0f} s; "
          + (f"{failed} with a failed stream (listed above and in {out / 'dataset.json'})" if failed
             else "none failed"))
    return 0
