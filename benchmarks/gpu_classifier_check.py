"""GPU check of the CNNs (NumPy + torch only): inference stamps/s and training samples/s.

Run on a GPU machine: ``python benchmarks/gpu_classifier_check.py`` (``--device cpu --batch 256
--iters 2`` for a quick CPU run).  Inference: batch 4096 of random stamps per model, after
warm-up, including normalisation on the device; training: a few optimiser steps of each model
at its recipe's batch size.  Writes ``gpu_classifier_check.json`` to ``$OUT`` when set.
Takes well under a minute on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier.models import MODELS, build_model, get_spec, prepare_input  # noqa: E402
from classifier.train import TrainConfig  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=20)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    stamps = torch.from_numpy(rng.normal(100.0, 10.0, size=(args.batch, 3, 51, 51)).astype(np.float32)).to(dev)
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "batch": args.batch, "inference": {}, "training": {}}
    for name in MODELS:
        spec = get_spec(name)
        torch.manual_seed(0)
        for prec, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            net = build_model(name).eval().to(dev, dtype=dtype).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                def run(spec=spec, dtype=dtype, net=net):
                    x = prepare_input(stamps, spec).to(dtype).contiguous(memory_format=torch.channels_last)
                    return torch.softmax(net(x).float(), 1)[:, 1]
                for _ in range(3):
                    run()
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    p = run()
                _sync(dev)
                dt = (time.perf_counter() - t0) / args.iters
            assert torch.isfinite(p).all()
            out["inference"][f"{name}/{prec}"] = args.batch / dt
            print(f"inference {name:14s} {prec:9s} {args.batch / dt:12.0f} stamps/s")
        # training speed at the recipe's batch size (float32)
        cfg = TrainConfig.for_model(name)
        net = build_model(name).train().to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr) if cfg.optimizer == "sgd" else \
            torch.optim.AdamW(net.parameters(), lr=cfg.lr)
        bs = min(cfg.batch_size, args.batch)
        x = prepare_input(stamps[:bs], spec)
        y = torch.randint(0, 2, (bs,), device=dev)
        for step in range(args.train_steps + 3):
            if step == 3:
                _sync(dev)
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(dev)
        rate = args.train_steps * bs / (time.perf_counter() - t0)
        out["training"][name] = rate
        print(f"training  {name:14s} batch {bs:4d} {rate:12.0f} samples/s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_classifier_check.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
