"""``pipeline simulate``: write simulated search/template CCD pairs, truth tables and a manifest."""

from __future__ import annotations

import argparse

from pipeline.cli import SEED_NOTE, parse_shape

__all__ = ["add_arguments", "main", "parse_shape"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline simulate``."""
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--ccds", type=int, default=1, help="number of CCD pairs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (default 0). " + SEED_NOTE)
    parser.add_argument("--instrument", choices=("decam", "ztf", "lsst"), default=None,
                        help="instrument preset (default decam, or the config file's)")
    parser.add_argument("--shape", type=parse_shape, default=None, help="CCD shape NYxNX (default: the preset's)")
    parser.add_argument("--config", default=None,
                        help="TOML file with SimulationConfig parameters (top level or a [simulation] table)")


def main(args: argparse.Namespace) -> int:
    """Run the simulation and print one summary line."""
    import dataclasses
    import time

    from pipeline.config import config_from_dict, load_toml

    from .config import SimulationConfig
    from .core import write_simulation

    if args.ccds < 1:
        print(f"pipeline simulate: --ccds must be >= 1, got {args.ccds}")
        return 2
    if args.config:
        data = load_toml(args.config)
        data = data.get("simulation", data)
        config = config_from_dict(SimulationConfig, data, where=str(args.config))
    else:
        config = SimulationConfig()
    if args.instrument:
        config = dataclasses.replace(config, instrument=args.instrument)
    if args.shape:
        config = dataclasses.replace(config, shape=args.shape)

    n_transients = 0
    t0 = time.perf_counter()

    def progress(k, pair, seconds):
        nonlocal n_transients
        n_transients += int((pair.truth["kind"] == "transient").sum())

    manifest = write_simulation(args.out, args.ccds, args.seed, config, progress=progress)
    elapsed = time.perf_counter() - t0
    print(f"simulated {args.ccds} {config.instrument} CCD pair(s), {n_transients} transients, seed {args.seed}, "
          f"in {elapsed:.1f} s ({elapsed / args.ccds:.1f} s/CCD) -> {manifest}")
    return 0
