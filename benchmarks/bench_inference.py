"""Inference speed of each CNN on CPU: stamps/s including normalisation.

Run: ``python benchmarks/bench_inference.py [--threads 2] [--batch 1024] [--repeat 5]``.
Untrained weights (speed does not depend on their values).  Prints a table and writes JSON
to ``--out`` if given.  Targets (issue 4, 2 CPU threads): triplet-paper >= 5,000 stamps/s,
pair-paper >= 20,000 stamps/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.infer import Scorer  # noqa: E402
from classifier.models import MODELS, get_spec  # noqa: E402
from classifier.synthetic import make_synthetic_set  # noqa: E402
from classifier.train import save_weights  # noqa: E402

TARGETS = {"triplet-paper": 5000, "pair-paper": 20000}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--precision", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stamps = make_synthetic_set(args.batch, seed=0).stamps
    tmp = Path(__import__("tempfile").mkdtemp())
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        path = save_weights(get_spec(name).builder(), get_spec(name), tmp / f"{name}.pt")
        for prec in args.precision:
            scorer = Scorer(path, batch_size=args.batch, precision=prec, cpu_chunk=args.chunk)
            scorer.score(stamps)  # warm-up
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                scorer.score(stamps)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rate = args.batch / med
            row = {"model": name, "precision": prec, "median_s": med, "stamps_per_s": rate,
                   "target": TARGETS.get(name)}
            rows.append(row)
            tgt = f"(target {TARGETS[name]})" if name in TARGETS else ""
            print(f"{name:14s} {prec:9s} {rate:10.0f} stamps/s  median {med * 1e3:7.1f} ms / {args.batch} {tgt}")
    info = {"threads": args.threads, "batch": args.batch, "repeat": args.repeat, "torch": torch.__version__,
            "numpy": np.__version__, "cpu": platform.processor() or platform.machine(), "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
