"""``pipeline run``: the transient pipeline on CCD pairs, in dia or direct mode, as a Dask graph."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli import SEED_NOTE, add_device_argument, add_quiet_argument, parse_shape

__all__ = ["add_arguments", "main", "DEFAULT_FIELD"]

#: The embedded default field: simulated on the fly when no --input is given.
DEFAULT_FIELD = {"ccds": 2, "seed": 2026, "instrument": "decam", "shape": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline run``."""
    parser.add_argument("--mode", choices=("dia", "direct"), default=None, help="pipeline mode (default dia)")
    parser.add_argument("--input", default=None,
                        help="manifest of CCD pairs (ECSV; see README). Default: simulate a small field on the fly")
    parser.add_argument("--out", required=True, help="output folder")
    add_device_argument(parser, None, "where the subtraction (NumPy or CuPy) and the CNN (torch) run; default: the "
                        "workflow's or config file's device, else cpu, whose results are the reference")
    parser.add_argument("--scheduler", default=None,
                        help="threads (default), local (LocalCluster + dashboard) or tcp://HOST:PORT")
    parser.add_argument("--workers", type=int, default=None, help="workers / threads (default 2)")
    parser.add_argument("--workflow", default=None, help="workflow TOML (workflows/*.toml): scheduler + run settings")
    parser.add_argument("--config", default=None, help="TOML with RunConfig parameters (a [run] table or top level)")
    parser.add_argument("--model", default=None,
                        help="model name or weights file of this mode (default: triplet in dia, pair-direct in "
                             "direct). A shipped name is read from the weights of the data's instrument preset "
                             "when they exist (triplet on ZTF data: classifier/weights/triplet-ztf.pt); a file is "
                             "used as given")
    parser.add_argument("--threshold", type=float, default=None, help="score threshold (default 0.5)")
    parser.add_argument("--resume", action="store_true", help="skip CCDs whose outputs are complete")
    parser.add_argument("--save-diff", action="store_true", help="keep difference images (dia mode)")
    parser.add_argument("--no-stamps", action="store_true",
                        help="do not keep the scored stamps (ccds/<ccd>_stamps.fits, used by `pipeline vet`)")
    parser.add_argument("--ccds", type=int, default=None,
                        help=f"embedded default field: CCD pairs (default {DEFAULT_FIELD['ccds']})")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"embedded default field: simulation seed (default {DEFAULT_FIELD['seed']}, held out). "
                             + SEED_NOTE)
    parser.add_argument("--instrument", choices=("decam", "ztf", "lsst"), default=None,
                        help="instrument preset: of the embedded default field's simulation (default decam) and of "
                             "the shipped weights a --model name stands for (an error when that preset has none). "
                             "Default: from the search exposures' INSTRUME (DECam, ZTF, LSSTCam; any other: the "
                             "DECam weights, with a warning)")
    parser.add_argument("--shape", type=parse_shape, default=None,
                        help="embedded default field: CCD shape NYxNX (default: the instrument's)")
    add_quiet_argument(parser, "progress bar")


def _run_config(args):
    import dataclasses

    from pipeline.cluster import SchedulerConfig, load_workflow
    from pipeline.config import RunConfig, config_from_dict, load_toml, run_table

    overrides: dict = {}
    scheduler = SchedulerConfig()
    if args.workflow:
        scheduler, overrides = load_workflow(args.workflow)
    if args.config:
        overrides.update(run_table(load_toml(args.config), "run", args.config))
    config = config_from_dict(RunConfig, overrides, where=f"{args.config or args.workflow} [run]"
                              if (args.config or args.workflow) else "")
    changes = {}
    if args.mode:
        changes["mode"] = args.mode
    if args.device:
        from pipeline.config import resolve_device

        changes["device"], why = resolve_device(args.device)
        if args.device == "auto":
            print(f"--device auto: {changes['device']} ({why})", flush=True)
    if args.threshold is not None:
        changes["score_threshold"] = args.threshold
    if args.save_diff:
        changes["save_diff"] = True
    if args.no_stamps:
        changes["save_stamps"] = False
    if args.model:
        changes["model_dia" if (args.mode or config.mode) == "dia" else "model_direct"] = args.model
    if args.instrument:
        changes["instrument"] = args.instrument
    config = dataclasses.replace(config, **changes)
    sched = {}
    if args.scheduler:
        if args.scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            sched.update(kind="address", address=args.scheduler)
        elif args.scheduler in ("threads", "local"):
            sched["kind"] = args.scheduler
        else:
            raise SystemExit("pipeline run: --scheduler must be threads, local or tcp://HOST:PORT, "
                             f"got {args.scheduler!r}")
    if args.workers:
        sched["workers"] = args.workers
    if config.device == "gpu" and scheduler.gpus_per_worker == 0 and (sched.get("kind", scheduler.kind) == "local"):
        sched["gpus_per_worker"] = 1
    scheduler = dataclasses.replace(scheduler, **sched)
    return config, scheduler


def main(args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary.

    Exit status: 0 all CCDs done; 3 some failed; 4 all failed; 2 nothing ran (bad arguments,
    configuration, manifest, model, output folder or cluster; one line on stderr); 5 the CCDs
    ran but the merged outputs could not be written (per-CCD results kept for ``--resume``).
    """
    import logging
    from pathlib import Path

    from classifier.infer import WeightsError
    from pipeline.cluster import ClusterStartError
    from pipeline.io import InputError, read_manifest
    from pipeline.outdir import OutputError, open_output_folder
    from pipeline.runner import (
        EXIT_OUTPUT,
        EXIT_SETUP,
        LOGGERS,
        RunSetupError,
        check_model,
        format_summary,
        run_pipeline,
    )

    def fail(exc: BaseException, status: int = EXIT_SETUP) -> int:
        print(f"pipeline run: {exc}", file=sys.stderr)
        return status

    for name in LOGGERS:  # the application decides: decisions go to OUT/run.log at INFO
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)
    # warnings also on the terminal (the run's file handler stops logging's last-resort printing)
    if not any(isinstance(h, _Terminal) for h in logging.getLogger("pipeline").handlers):
        terminal = _Terminal()
        terminal.setLevel(logging.WARNING)
        terminal.setFormatter(logging.Formatter("pipeline run: warning: %(message)s"))
        logging.getLogger("pipeline").addHandler(terminal)
    try:
        config, scheduler = _run_config(args)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    out = Path(args.out)
    entries = None
    try:
        if args.input:
            entries = read_manifest(args.input)
        check_model(config)
        folder = open_output_folder(out, subfolders=("ccds", "diff") if config.save_diff else ("ccds",))
    except (InputError, WeightsError, OutputError) as exc:
        return fail(exc)
    try:
        if entries is None:
            entries = _embedded_default(args, out)
        result = run_pipeline(entries, config, out, scheduler, resume=args.resume, progress=not args.quiet,
                              on_dashboard=lambda link: print(f"Dask dashboard: {link}", flush=True),
                              folder=folder, log_file="run.log")
    except (InputError, WeightsError, RunSetupError) as exc:
        return fail(exc)
    except OutputError as exc:
        return fail(exc, EXIT_OUTPUT)
    except ClusterStartError as exc:  # job submission failed, no worker came, scheduler unreachable
        return fail(f"{args.workflow}: {exc}" if args.workflow else exc)
    finally:
        folder.close()
    print(format_summary(result, config))
    return result.exit_status


class _Terminal(logging.StreamHandler):
    """Log records to whatever ``sys.stderr`` is when they are emitted."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _embedded_default(args, out):
    """Simulate the embedded default field into ``OUT/input`` (reused by ``--resume``); its manifest entries."""
    import dataclasses
    import time

    from pipeline.io import read_manifest
    from pipeline.simulate import SimulationConfig, write_simulation

    sim = SimulationConfig()
    if args.instrument:
        sim = dataclasses.replace(sim, instrument=args.instrument)
    if args.shape:
        sim = dataclasses.replace(sim, shape=args.shape)
    n = args.ccds or DEFAULT_FIELD["ccds"]
    seed = DEFAULT_FIELD["seed"] if args.seed is None else args.seed
    t0 = time.perf_counter()
    manifest = out / "input" / "manifest.ecsv"
    if not (args.resume and manifest.exists()):
        manifest = write_simulation(out / "input", n, seed, sim)
    print(f"embedded default field: {n} simulated {sim.instrument} CCD pair(s), seed {seed} "
          f"({time.perf_counter() - t0:.1f} s) -> {manifest}")
    return read_manifest(manifest)
