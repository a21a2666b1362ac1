"""What a dense CNN score map over a whole CCD pair would cost, against scoring stamps at peaks.

Usage (from the repository root)::

    python -m benchmarks.dense_map_cost [--model pair-direct] [--shape 4096x2048] [--threads 2]
                                        [--device cpu|cuda] [--stamps 190,2150] [--repeats 3] [--out DIR]

Issue #13 asks whether the direct mode's two-image CNN can itself be the detector, evaluated
densely over the aligned template and the search.  Our two-image network (``StampNet``: three
3 x 3 stages with 2 x 2 pooling, then a dense head over the 6 x 6 x 64 features of a 51 x 51
stamp) is already fully convolutional up to its head: :func:`dense_network` turns the head's first
``Linear`` into a 6 x 6 convolution and its second into a 1 x 1, so that the network slides over a
frame and gives one score per 8 x 8 pixels.  On a single 51 x 51 stamp the two give the same
logits (tested); inside a larger frame each window also sees the pixels around it where the stamp
saw zero padding, so the values are close to, not equal to, the stamp scores.

The script times, alternately and ``--repeats`` times each, the dense map over a ``--shape``
two-channel frame (in tiles of ``--tile`` pixels with a 24-pixel halo, about the network's half window)
and the network's inference form (:class:`classifier.infer.Scorer`, normalisation included) on
``--stamps`` stamps: ~190 per DECam CCD are the direct mode's candidates after its flux cut, ~2,150
are all the search image's peaks (``DirectDetectConfig.selection = "cnn"``).  The dense timing is
the network alone: the aligned template and the per-pixel normalisation it also needs are not
counted, so it is a lower bound.  Writes ``report.json`` and ``report.md`` in ``--out``
(atomically) and prints the table.  Weights are the shipped ones (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metrics import median_seconds  # noqa: E402
from benchmarks.report import write_json_and_markdown  # noqa: E402
from classifier.dense import STRIDE, dense_network  # noqa: E402
from classifier.infer import Scorer, preset_weights, torch_threads  # noqa: E402
from classifier.models import StampNet  # noqa: E402

__all__ = ["dense_map", "main"]

#: The halo of each tile: half the network's 51-pixel window (25) rounded down to a multiple of the stride, so that
#: tiles start on the output grid (the outermost column of context is cut at tile edges: a cost measurement).
HALO = 24


def dense_map(net: nn.Sequential, frame: torch.Tensor, tile: int = 512) -> list[torch.Tensor]:
    """The dense logits of ``frame`` (``(1, C, ny, nx)``), tile by tile with a :data:`HALO`-pixel
    halo; returns the per-tile maps (their stitching is not part of the cost measured)."""
    _, _, ny, nx = frame.shape
    maps = []
    with torch.inference_mode():
        for y0 in range(0, ny, tile):
            for x0 in range(0, nx, tile):
                window = frame[:, :, max(0, y0 - HALO):y0 + tile + HALO, max(0, x0 - HALO):x0 + tile + HALO]
                maps.append(net(window))
    return maps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pair-direct", help="a shipped StampNet model (default pair-direct)")
    ap.add_argument("--shape", default="4096x2048", help="frame NYxNX (default 4096x2048, a DECam CCD)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--stamps", default="190,2150", help="stamp counts to score, comma-separated")
    ap.add_argument("--tile", type=int, default=512, help="tile side of the dense map (default 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for report.json and report.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dense_map_cost: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    ny, nx = (int(v) for v in args.shape.lower().split("x"))
    weights, _ = preset_weights(args.model, "")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    with torch_threads(args.threads):
        scorer = Scorer(weights, device=args.device, threads=args.threads)
        if not isinstance(scorer.net, StampNet):
            print(f"dense_map_cost: {args.model} is not a StampNet", file=sys.stderr)
            return 2
        net = dense_network(scorer.net).to(device)
        channels = len(scorer.spec.channels)
        rng = np.random.default_rng(0)
        frame = torch.from_numpy(rng.normal(0, 1, (1, channels, ny, nx)).astype(np.float32)).to(device)
        frame = frame.to(memory_format=torch.channels_last)  # the layout the scorer's network runs in
        dense_s = median_seconds(lambda: dense_map(net, frame, args.tile), args.repeats, sync)
        rows = [{"what": f"dense map {ny} x {nx}, stride {STRIDE}, tiles {args.tile}",
                 "seconds": dense_s, "per_s": ny * nx / dense_s, "unit": "pixels"}]
        for n in (int(v) for v in args.stamps.split(",") if v):
            stamps = rng.normal(0, 10, (n, channels, 51, 51)).astype(np.float32)
            s = median_seconds(lambda st=stamps: scorer.score(st), args.repeats, sync)
            rows.append({"what": f"{n} stamps (Scorer.score, normalisation included)",
                         "seconds": s, "per_s": n / s, "unit": "stamps"})
    info = {"model": args.model, "device": args.device, "threads": args.threads, "shape": [ny, nx],
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "repeats": args.repeats, "results": rows}
    lines = [f"# Dense score map against stamps: {args.model} on {args.device} ({args.threads} threads)", "",
             "| what | median s | rate |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['seconds']:.3f} | {r['per_s']:,.0f} {r['unit']}/s |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_json_and_markdown(info, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
