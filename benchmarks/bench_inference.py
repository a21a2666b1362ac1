"""Inference speed of each CNN on CPU: stamps/s including normalisation.

Run: ``python benchmarks/bench_inference.py [--threads 2] [--batch 1024] [--repeat 7]``.
Untrained weights (speed does not depend on their values).  For each model and precision it
times ``Scorer.score`` (the inference form of the model on small chunks) and, as the baseline in
the same run, one eval-mode ``forward`` over the whole batch (what the scorer did before), and
prints the median rates and their ratio; JSON to ``--out`` if given.  Targets (issue 4, 2 CPU
threads): triplet-paper >= 5,000 stamps/s, pair-paper >= 20,000 stamps/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metrics import median_seconds  # noqa: E402
from classifier.infer import Scorer, torch_threads  # noqa: E402
from classifier.models import MODELS, get_spec, prepare_input  # noqa: E402
from classifier.synthetic import make_synthetic_set  # noqa: E402
from classifier.train import save_weights  # noqa: E402

TARGETS = {"triplet-paper": 5000, "pair-paper": 20000}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--precision", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # the scorer and the baseline both run with --threads; the caller's torch setting is restored
    with torch_threads(args.threads):
        rows = _measure(args)
    info = {"threads": args.threads, "batch": args.batch, "chunk": args.chunk, "repeat": args.repeat,
            "torch": torch.__version__, "numpy": np.__version__, "cpu": platform.processor() or platform.machine(),
            "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    return 0


def _measure(args) -> list[dict]:
    """Time every requested model and precision (scorer and whole-batch baseline); one row each."""
    stamps = make_synthetic_set(args.batch, seed=0).stamps
    tmp = Path(__import__("tempfile").mkdtemp())
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        path = save_weights(get_spec(name).builder(), get_spec(name), tmp / f"{name}.pt")
        for prec in args.precision:
            scorer = Scorer(path, batch_size=args.batch, precision=prec, cpu_chunk=args.chunk)

            @torch.inference_mode()
            def baseline(stamps=stamps, scorer=scorer):
                x = torch.as_tensor(prepare_input(stamps, scorer.spec)).to(scorer._dtype)
                logits = scorer.net(x.contiguous(memory_format=torch.channels_last))
                return torch.softmax(logits.float(), dim=1)[:, 1].numpy()

            fast = median_seconds(lambda scorer=scorer: scorer.score(stamps), args.repeat)
            base = median_seconds(baseline, args.repeat)
            rate, base_rate = args.batch / fast, args.batch / base
            row = {"model": name, "precision": prec, "median_s": fast, "stamps_per_s": rate,
                   "baseline_median_s": base, "baseline_stamps_per_s": base_rate, "speed_up": base / fast,
                   "target": TARGETS.get(name)}
            rows.append(row)
            tgt = f"(target {TARGETS[name]})" if name in TARGETS else ""
            print(f"{name:14s} {prec:9s} {rate:8.0f} stamps/s  "
                  f"(baseline {base_rate:7.0f}/s, x{base / fast:4.2f})  {tgt}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
