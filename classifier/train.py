"""Training of the real-bogus CNNs: seeded, resumable, early-stopped on validation loss.

``train_model`` writes into ``out_dir``:

* ``model.pt`` - the best-validation weights: ``{"state_dict", "metadata"}`` (metadata is
  JSON-able: model spec, normalisation, channels, training config, training-set provenance,
  validation metrics), loadable with ``torch.load(..., weights_only=True)`` and by
  :class:`classifier.infer.Scorer`;
* ``last.pt`` - the state after the last finished epoch (model, optimiser, scheduler, epoch,
  early-stopping state, RNG states) so a killed run resumes with ``resume=True`` and ends with
  the same weights as an uninterrupted run (on CPU);
* ``history.json`` - per-epoch train/val loss and accuracy.

Recipes (:meth:`TrainConfig.for_model`): the paper's for the paper models (SGD, lr 0.01, batch
200, constant rate, early stopping); AdamW + cosine decay + dihedral augmentation for ours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .data import StampSet, simulated_ccd, simulation_seeds
from .infer import torch_device, torch_threads
from .models import ModelSpec, build_model, get_spec, prepare_input

__all__ = ["TrainConfig", "TrainResult", "train_model", "dihedral_augment", "resolve_device",
           "save_weights", "training_provenance"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training recipe.

    Attributes
    ----------
    epochs : int
        Maximum number of epochs (default 100).
    batch_size : int
        Mini-batch size (paper: 200).
    optimizer : {"sgd", "adamw"}
        Optimiser (paper: plain SGD).
    lr : float
        Learning rate (paper: 0.01).
    momentum : float
        SGD momentum (paper: 0).
    weight_decay : float
        Weight decay (0 for the paper recipe).
    schedule : {"constant", "cosine"}
        Learning-rate schedule over ``epochs`` (cosine decays to 1% of ``lr``).
    patience : int
        Early stopping: stop after this many epochs without a validation-loss improvement.
    min_delta : float
        Smallest validation-loss decrease counted as an improvement.
    augment : bool or None
        Random flips and 90-degree rotations of every stamp; None = the model's default.
    seed : int
        Seed of initialisation, shuffling, augmentation and dropout.
    threads : int or None
        torch CPU threads while :func:`train_model` runs (None: all cores, ``os.cpu_count()``),
        the caller's setting restored afterwards.  Set deliberately because a Dask nanny sets
        ``OMP_NUM_THREADS=1``.
    eval_batch_size : int
        Batch size of the validation passes.
    progress : bool
        Show a tqdm progress bar.
    """

    epochs: int = 100
    batch_size: int = 200
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    patience: int = 5
    min_delta: float = 0.0
    augment: bool | None = None
    seed: int = 0
    threads: int | None = None
    eval_batch_size: int = 2048
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"TrainConfig.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("TrainConfig.epochs, batch_size and patience must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"TrainConfig.threads must be >= 1, got {self.threads}")

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The default recipe of model ``name`` with ``overrides`` (None values ignored)."""
        spec = get_spec(name)
        if spec.name.endswith("-paper"):
            base: dict[str, Any] = dict(epochs=100, batch_size=200, optimizer="sgd", lr=0.01, momentum=0.0,
                                        weight_decay=0.0, schedule="constant", patience=5)
        else:
            base = dict(epochs=40, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                        schedule="cosine", patience=8)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    out_dir: Path
    model_path: Path
    best_epoch: int
    best_val_loss: float
    val_metrics: dict[str, float]
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"`` / ``"gpu"`` as asked.

    The same mapping as :func:`classifier.infer.torch_device` (``"cuda"`` is accepted too).
    """
    return torch_device(device)


def training_provenance(train: StampSet, val: StampSet) -> dict[str, Any]:
    """What the weights record about their data (JSON-able).

    The training set's ``attrs`` and counts, the validation counts, and -- so that an
    evaluation can tell held-out data from seen data -- the simulation seeds and the simulated
    CCDs (``s<seed>-ccd<index>``) of the train and val stamps together (validation chose the
    epoch, so its CCDs count as seen).
    """
    names = np.union1d(np.unique(train.meta["ccd"]), np.unique(val.meta["ccd"])).tolist()
    return {"train": {"attrs": train.attrs, **train.summary()}, "val": val.summary(),
            "simulation_seeds": sorted(set(simulation_seeds(train)) | set(simulation_seeds(val))),
            "training_ccds": [n for n in names if simulated_ccd(n) is not None]}


def dihedral_augment(x: torch.Tensor, generator: torch.Generator, n_panels: int = 1) -> torch.Tensor:
    """Apply one of the 8 flip/rotation symmetries of the square, chosen per sample.

    For side-by-side inputs (``n_panels`` > 1 panels along the width) every panel gets the same
    transform of its own 51 x 51 square.
    """
    n = x.shape[0]
    if n_panels > 1:
        c, h, w = x.shape[1:]
        x = x.reshape(n, c, h, n_panels, w // n_panels).permute(0, 1, 3, 2, 4).reshape(n, c * n_panels, h, -1)
    code = torch.randint(0, 8, (n,), generator=generator, device="cpu").to(x.device)
    out = x.clone()
    for k in range(8):
        m = code == k
        if not bool(m.any()) or k == 0:
            continue
        y = x[m]
        if k >= 4:
            y = torch.flip(y, dims=(-1,))
        y = torch.rot90(y, k % 4, dims=(-2, -1))
        out[m] = y
    if n_panels > 1:
        c = out.shape[1] // n_panels
        h = out.shape[2]
        out = out.reshape(n, c, n_panels, h, -1).permute(0, 1, 3, 2, 4).reshape(n, c, h, -1)
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def save_weights(model: nn.Module, spec: ModelSpec, path: str | Path, **metadata: Any) -> Path:
    """Write ``{"state_dict", "metadata"}`` for :class:`classifier.infer.Scorer` (atomically)."""
    path = Path(path)
    meta = _jsonable({"format": "transient-pipeline-cnn/1", "model": spec.metadata(),
                      "torch_version": torch.__version__, **metadata})
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({"state_dict": state, "metadata": meta}, path)
    return path


@torch.inference_mode()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
              device: torch.device) -> tuple[float, np.ndarray]:
    model.eval()
    losses, scores = [], []
    for i in range(0, x.shape[0], batch):
        logits = model(x[i:i + batch].to(device, non_blocking=True))
        yb = y[i:i + batch].to(device)
        losses.append(nn.functional.cross_entropy(logits, yb, reduction="sum").item())
        scores.append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
    return sum(losses) / max(x.shape[0], 1), np.concatenate(scores) if scores else np.zeros(0)


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_model(name: str, train: StampSet, val: StampSet, config: TrainConfig | None = None,
                out_dir: str | Path = "model", device: str = "auto", resume: bool = False,
                callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train model ``name`` on ``train``, early-stopping on ``val``; write weights to ``out_dir``.

    Parameters
    ----------
    name : str
        A registered model (``triplet-paper``, ``pair-paper``, ``triplet``, ``pair``).
    train, val : StampSet
        Labelled stamps (canonical channels).
    config : TrainConfig, optional
        Defaults to ``TrainConfig.for_model(name)``.
    out_dir : path
        Where ``model.pt``, ``last.pt`` and ``history.json`` go.
    device : {"auto", "cpu", "gpu"}
        Where to train (:func:`classifier.infer.torch_device`; ``"cuda"`` is accepted too).
    resume : bool
        Continue from ``out_dir/last.pt`` if it exists (a finished run is returned as is).
    callback : callable, optional
        Called as ``callback(epoch, record)`` after each epoch's checkpoint is written.

    Returns
    -------
    TrainResult
    """
    config = config or TrainConfig.for_model(name)
    # torch's thread count is process-wide: hold it for this call only, then restore the caller's
    # the seeded global RNG (weight initialisation) is used inside a fork, so the caller's torch
    # random state is the same afterwards
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch_threads(config.threads or os.cpu_count() or 1), torch.random.fork_rng(devices=cuda):
        return _train_model(name, train, val, config, out_dir, device, resume, callback)


def _train_model(name: str, train: StampSet, val: StampSet, config: TrainConfig, out_dir: str | Path,
                 device: str, resume: bool, callback: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    """The body of :func:`train_model`, run with its thread setting."""
    from tqdm.auto import tqdm

    from .evaluate import roc_auc

    spec = get_spec(name)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs non-empty train and val sets (got {len(train)} and {len(val)})")
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, model_path, hist_path = out / "last.pt", out / "model.pt", out / "history.json"
    augment = spec.augment if config.augment is None else config.augment
    n_panels = len(spec.panels) if spec.layout == "side-by-side" else 1

    x_train = torch.from_numpy(prepare_input(train.stamps_for(spec.scheme), spec, train.channels))
    y_train = torch.from_numpy(train.labels.astype(np.int64))
    x_val = torch.from_numpy(prepare_input(val.stamps_for(spec.scheme), spec, val.channels))
    y_val = torch.from_numpy(val.labels.astype(np.int64))
    if dev.type == "cuda":  # stamps are small: keep the whole set on the GPU when it fits
        x_train, y_train, x_val, y_val = (t.to(dev) for t in (x_train, y_train, x_val, y_val))

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    model = build_model(name).to(dev)
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                                     weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs, eta_min=config.lr * 0.01)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)

    cfg_dict = dataclasses.asdict(config)
    state: dict[str, Any] = {"epoch": 0, "best_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0,
                             "history": [], "stopped": False, "val_metrics": {}}
    if resume and last_path.exists():
        try:
            ckpt = torch.load(last_path, map_location=dev, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise ValueError(f"{last_path}: cannot read the checkpoint to resume from ({exc})") from None
        if ckpt.get("model") != name:
            raise ValueError(f"{last_path}: checkpoint is of model {ckpt.get('model')!r}, not {name!r}")
        # With a constant learning rate the epoch limit only says where to stop, so a finished or
        # interrupted run may be extended; a cosine schedule depends on it and may not.
        free = {"progress", "threads"} | ({"epochs"} if config.schedule == "constant" else set())
        changed = {k for k in cfg_dict if k not in free and ckpt["config"].get(k) != cfg_dict[k]}
        if changed:
            raise ValueError(f"{last_path}: cannot resume with a different config ({', '.join(sorted(changed))})")
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], gen, dev)
        state = json.loads(ckpt["state_json"])

    provenance = training_provenance(train, val)
    bs = config.batch_size
    n = x_train.shape[0]
    t0 = time.perf_counter()
    while not state["stopped"] and state["epoch"] < config.epochs:
        epoch = state["epoch"]
        model.train()
        perm = torch.randperm(n, generator=gen)
        if dev.type == "cuda":
            perm = perm.to(dev)
        total, correct, seen = 0.0, 0, 0
        bar = tqdm(range(0, n, bs), desc=f"{name} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not config.progress, unit="batch")
        for i in bar:
            idx = perm[i:i + bs]
            xb = x_train[idx].to(dev, non_blocking=True)
            yb = y_train[idx].to(dev, non_blocking=True)
            if augment:
                xb = dihedral_augment(xb, gen, n_panels)
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * yb.shape[0]
            correct += int((logits.argmax(1) == yb).sum())
            seen += yb.shape[0]
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        sched.step()
        val_loss, val_scores = _evaluate(model, x_val, y_val, config.eval_batch_size, dev)
        yv = val.labels
        record = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                  "val_loss": val_loss, "val_accuracy": float(np.mean((val_scores >= 0.5) == (yv == 1))),
                  "val_auc": roc_auc(yv, val_scores), "lr": opt.param_groups[0]["lr"],
                  "elapsed_s": time.perf_counter() - t0}
        state["history"].append(record)
        if val_loss < state["best_loss"] - config.min_delta:
            state.update(best_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0,
                         val_metrics={k: record[k] for k in ("val_loss", "val_accuracy", "val_auc")})
            save_weights(model, spec, model_path, config=cfg_dict, epoch=epoch + 1, val_metrics=state["val_metrics"],
                         provenance=provenance)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["stopped"] = state["bad_epochs"] >= config.patience
        if config.progress:
            tqdm.write(f"{name} epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
                       f"val loss {val_loss:.4f} val acc {record['val_accuracy']:.4f}"
                       + (" *" if state["best_epoch"] == epoch + 1 else ""))
        _atomic_torch_save({"model": name, "config": cfg_dict, "state_dict": model.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "rng": _rng_state(gen, dev), "state_json": json.dumps(state)}, last_path)
        tmp = hist_path.with_name(f".{hist_path.name}.tmp")
        tmp.write_text(json.dumps(state["history"], indent=1))
        os.replace(tmp, hist_path)
        if callback is not None:
            callback(epoch + 1, record)
    return TrainResult(out, model_path, state["best_epoch"], state["best_loss"], state["val_metrics"],
                       state["epoch"], state["stopped"], state["history"])
