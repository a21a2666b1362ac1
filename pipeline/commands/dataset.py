"""``pipeline dataset``: labelled stamp sets (dia and direct streams) from simulated CCDs."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline dataset``."""
    from pipeline.simulate.command import parse_shape

    parser.add_argument("--out", required=True, help="output folder: <stream>.npz and dataset.json")
    parser.add_argument("--ccds", type=int, default=40, help="simulated CCD pairs (default 40)")
    parser.add_argument("--seed", type=int, default=1000, help="simulation seed (default 1000)")
    parser.add_argument("--shape", type=parse_shape, default=(2048, 2048), help="CCD shape (default 2048x2048)")
    parser.add_argument("--density-factor", type=float, default=8.0, help="transient density multiplier (default 8)")
    parser.add_argument("--streams", default="dia,direct", help="comma-separated: dia, direct (default both)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--fractions", default="0.7,0.1,0.2",
                        help="train,val,test fractions of the CCDs (default 0.7,0.1,0.2; 0,0,1 for a test-only set)")
    parser.add_argument("--config", default=None, help="TOML with RunConfig parameters used for the candidate stages")


def main(args: argparse.Namespace) -> int:
    """Build the stamp sets and write them with a JSON report."""
    import json
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from pipeline.config import RunConfig, config_from_dict, load_toml
    from pipeline.datasets import DatasetConfig, build_datasets
    from pipeline.io import atomic_path

    streams = tuple(s.strip() for s in args.streams.split(",") if s.strip())
    bad = [s for s in streams if s not in ("dia", "direct")]
    if bad:
        print(f"pipeline dataset: unknown stream(s) {bad}; use dia, direct")
        return 2
    run_config = RunConfig()
    if args.config:
        data = load_toml(args.config)
        run_config = config_from_dict(RunConfig, data.get("run", data), where=args.config)
    try:
        fractions = tuple(float(v) for v in args.fractions.split(","))
        assert len(fractions) == 3 and min(fractions) >= 0 and sum(fractions) > 0
    except (ValueError, AssertionError):
        print(f"pipeline dataset: --fractions must be three non-negative numbers, got {args.fractions!r}")
        return 2
    config = DatasetConfig(n_ccds=args.ccds, seed=args.seed, shape=tuple(args.shape),
                           transient_density_factor=args.density_factor, workers=args.workers,
                           fractions=fractions)
    out = Path(args.out)
    t0 = time.perf_counter()
    bar = tqdm(total=config.n_ccds, desc="CCDs", unit="ccd")
    result = build_datasets(config, run_config, streams, progress=lambda r: bar.update(1))
    bar.close()
    report = result.pop("report")
    summary = {}
    for stream, stamps in result.items():
        path = stamps.save(out / f"{stream}.npz")
        summary[stream] = stamps.summary()
        print(f"{stream}: {path} {json.dumps(summary[stream])}")
    report["summary"] = summary
    report["seconds"] = time.perf_counter() - t0
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    failed = sum(bool(r["errors"]) for r in report["ccds"])
    print(f"{config.n_ccds} CCDs in {report['seconds']:.0f} s; {failed} with a failed stream")
    return 0
