"""Classifier metrics: pure functions of (labels, scores, metadata).

Labels are 1 = real, 0 = bogus; scores are P(real).  A candidate is called real when its
score is >= the threshold (default 0.5).  The missed-detection rate (MDR) at a false-positive
rate (FPR) f is 1 - TPR at the most permissive threshold whose FPR is still <= f.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier.data import SPLITS, StampSet, ccd_split_assignment, simulated_ccd, simulation_seeds
from classifier.plotting import new_figure, save_figure

if TYPE_CHECKING:
    from classifier.infer import Scorer

__all__ = ["roc_auc", "roc_curve", "confusion_matrix", "accuracy", "missed_detection_rate",
           "EvaluationConfig", "EvaluationResult", "evaluate_scores", "evaluate_model", "plot_roc",
           "training_data", "training_overlap", "TrainingDataOverlapWarning"]


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (bogus) or 1 (real)")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels, scores


def accuracy(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of candidates classified correctly with ``score >= threshold`` -> real."""
    labels, scores = _check(labels, scores)
    if labels.size == 0:
        return float("nan")
    return float(np.mean((scores >= threshold) == (labels == 1)))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random real > score of a random bogus), ties 1/2.

    Computed from average ranks (Mann-Whitney U); NaN if a class is absent.
    """
    labels, scores = _check(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average rank (1-based) of each tie group
    first = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], s.size]
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = avg_rank[group]
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        For each distinct score t (descending), the rates of ``score >= t``; the first point is
        (0, 0) with threshold +inf.
    """
    labels, scores = _check(labels, scores)
    n_pos = max(int(labels.sum()), 1)
    n_neg = max(labels.size - int(labels.sum()), 1)
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True] if s.size else np.zeros(0, bool)
    tp = np.cumsum(lab)[last]
    fp = np.cumsum(1 - lab)[last]
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]])


def missed_detection_rate(labels: np.ndarray, scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """Missed-detection rate (1 - TPR) at false-positive rate ``fpr``.

    Returns
    -------
    mdr, threshold : float
        The MDR at the lowest threshold whose FPR is <= ``fpr``, and that threshold.
    """
    f, t, thr = roc_curve(labels, scores)
    ok = np.flatnonzero(f <= fpr + 1e-12)
    k = ok[-1]
    return float(1.0 - t[k]), float(thr[k])


def confusion_matrix(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """Counts ``tp``, ``fp``, ``tn``, ``fn`` at ``threshold``."""
    labels, scores = _check(labels, scores)
    pred = scores >= threshold
    real = labels == 1
    return {"tp": int((pred & real).sum()), "fp": int((pred & ~real).sum()),
            "tn": int((~pred & ~real).sum()), "fn": int((~pred & real).sum())}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Parameters of :func:`evaluate_scores`.

    Attributes
    ----------
    threshold : float
        Score at and above which a candidate is called real (default 0.5).
    fpr_points : tuple of float
        False-positive rates at which the missed-detection rate is reported (default 1%, 3%).
    snr_bins : tuple of float
        Edges of the S/N bins of the per-S/N table (default 0, 5, 7, 10, 15, 20, 30, 50, 100, inf).
    """

    threshold: float = 0.5
    fpr_points: tuple[float, ...] = (0.01, 0.03)
    snr_bins: tuple[float, ...] = (0.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, float("inf"))


@dataclasses.dataclass
class EvaluationResult:
    """Metrics of one model on one labelled set (see :func:`evaluate_scores`)."""

    n: int
    n_real: int
    accuracy: float
    roc_auc: float
    confusion: dict[str, int]
    mdr: dict[str, float]
    mdr_threshold: dict[str, float]
    per_snr: list[dict[str, Any]]
    per_kind: list[dict[str, Any]]
    threshold: float
    roc: dict[str, list[float]] = dataclasses.field(repr=False, default_factory=dict)
    #: :func:`training_overlap` of the model and the set, when known (set by :func:`evaluate_model`)
    training_overlap: dict[str, Any] | None = None
    #: warnings about the evaluation itself (e.g. stamps the model was trained on)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self, with_roc: bool = True) -> dict[str, Any]:
        """JSON-able dict (NaN -> None); the ROC points only when ``with_roc``."""
        d = dataclasses.asdict(self)
        if not with_roc:
            d.pop("roc")
        return _clean(d)

    def summary(self) -> str:
        """A few human-readable lines."""
        c = self.confusion
        lines = [f"WARNING: {w}" for w in self.warnings]
        lines += [f"n = {self.n} ({self.n_real} real), accuracy = {self.accuracy:.4f}, "
                 f"ROC AUC = {self.roc_auc:.4f} (threshold {self.threshold})",
                 f"confusion: TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}",
                 "missed-detection rate: " + ", ".join(f"{v:.4f} at FPR {k}" for k, v in self.mdr.items())]
        lines.append("per S/N bin (real stamps: efficiency; all: accuracy):")
        for row in self.per_snr:
            if row["n"]:
                eff = "   -  " if row["efficiency"] is None or np.isnan(row["efficiency"]) \
                    else f"{row['efficiency']:.4f}"
                lines.append(f"  S/N {row['lo']:>5g}-{row['hi']:<5g} n={row['n']:6d} "
                             f"acc={row['accuracy']:.4f} eff={eff}")
        lines.append("per kind:")
        for row in self.per_kind:
            lines.append(f"  {row['kind']:<12s} n={row['n']:6d} acc={row['accuracy']:.4f}")
        return "\n".join(lines)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return None if not np.isfinite(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_scores(labels: np.ndarray, scores: np.ndarray, meta: dict[str, np.ndarray] | None = None,
                    config: EvaluationConfig = EvaluationConfig()) -> EvaluationResult:
    """All metrics of scores against labels, with per-S/N and per-kind breakdowns.

    Parameters
    ----------
    labels : ndarray (N,)
        1 = real, 0 = bogus.
    scores : ndarray (N,)
        P(real).
    meta : dict, optional
        Per-object columns; ``snr`` and ``kind`` are used for the breakdowns when present.
    config : EvaluationConfig
    """
    labels, scores = _check(labels, scores)
    meta = meta or {}
    thr = config.threshold
    correct = (scores >= thr) == (labels == 1)
    mdr, mdr_thr = {}, {}
    for f in config.fpr_points:
        mdr[f"{f:g}"], mdr_thr[f"{f:g}"] = missed_detection_rate(labels, scores, f)
    per_snr = []
    if "snr" in meta:
        snr = np.asarray(meta["snr"], dtype=float)
        edges = config.snr_bins
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (snr >= lo) & (snr < hi)
            r = m & (labels == 1)
            per_snr.append({"lo": lo, "hi": hi, "n": int(m.sum()), "n_real": int(r.sum()),
                            "accuracy": float(correct[m].mean()) if m.any() else float("nan"),
                            "efficiency": float((scores[r] >= thr).mean()) if r.any() else float("nan")})
    per_kind = []
    if "kind" in meta:
        kinds = np.asarray(meta["kind"]).astype(str)
        for k in sorted(set(kinds.tolist())):
            m = kinds == k
            per_kind.append({"kind": k, "n": int(m.sum()), "accuracy": float(correct[m].mean())})
    fpr, tpr, thresholds = roc_curve(labels, scores)
    if fpr.size > 2001:  # keep the JSON small: subsample the curve, keeping its ends
        keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, 2000).astype(int), fpr.size - 1])
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return EvaluationResult(
        n=int(labels.size), n_real=int(labels.sum()), accuracy=float(correct.mean()) if labels.size else float("nan"),
        roc_auc=roc_auc(labels, scores), confusion=confusion_matrix(labels, scores, thr),
        mdr=mdr, mdr_threshold=mdr_thr, per_snr=per_snr, per_kind=per_kind, threshold=thr,
        roc={"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": thresholds.tolist()})


class TrainingDataOverlapWarning(UserWarning):
    """The evaluated stamps come from simulated CCDs the model was trained or validated on."""


def _dataset_configs(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``dataset_config`` in a stamp set's ``attrs``, including those of concatenated parts."""
    out, todo = [], [attrs]
    while todo:
        a = todo.pop()
        if isinstance(a.get("dataset_config"), dict):
            out.append(a["dataset_config"])
        todo.extend(p for p in a.get("concatenated", []) if isinstance(p, dict))
    return out


def training_data(metadata: dict[str, Any]) -> dict[str, Any]:
    """The simulated data a model saw in training (train and val), from its weights' metadata.

    Weights written by :func:`classifier.train.train_model` record the CCDs themselves
    (``provenance.training_ccds``).  Older weights -- the shipped ones included -- record the
    data set config of their training set (seed, number of CCDs, split fractions and seed);
    the train and val CCDs are recovered from it with :func:`classifier.data.ccd_split_assignment`,
    the builder's own rule.

    Returns
    -------
    dict
        ``seeds`` (sorted simulation seeds), ``ccds`` (sorted ``[seed, index]`` pairs, or None
        when only the seeds are known) and ``source`` (how they were found; None when the
        weights record nothing about their data).
    """
    prov = metadata.get("provenance") or {}
    if prov.get("training_ccds") is not None:
        ccds = {p for p in (simulated_ccd(n) for n in prov["training_ccds"]) if p is not None}
        seeds = {int(v) for v in prov.get("simulation_seeds", [])} | {c[0] for c in ccds}
        return {"seeds": sorted(seeds), "ccds": sorted([list(c) for c in ccds]),
                "source": "training CCDs recorded with the weights"}
    attrs = (prov.get("train") or {}).get("attrs") or {}
    configs = _dataset_configs(attrs)
    seeds = {int(v) for v in attrs.get("simulation_seeds", [])} | {int(c["seed"]) for c in configs if "seed" in c}
    if not seeds:
        return {"seeds": [], "ccds": None, "source": None}
    ccds: set[tuple[int, int]] | None = set()
    for c in configs:
        try:
            split = ccd_split_assignment(int(c["n_ccds"]), c["fractions"], int(c.get("split_seed", 0)))
        except (KeyError, TypeError, ValueError):
            ccds = None
            break
        ccds.update((int(c["seed"]), k) for k in np.flatnonzero(split != SPLITS[2]).tolist())
    if not configs:
        ccds = None
    return {"seeds": sorted(seeds), "ccds": None if ccds is None else sorted([list(c) for c in ccds]),
            "source": "data set config recorded with the weights (train/val CCDs recovered from it)"
            if ccds is not None else "simulation seeds recorded with the weights"}


def training_overlap(metadata: dict[str, Any], data: StampSet, model: str = "the model") -> dict[str, Any]:
    """Which evaluated stamps come from simulated CCDs the model was trained or validated on.

    A simulated CCD is identified by ``(seed, index)``: CCD ``k`` of a simulation depends only on
    them, so a set cut again from the training seed repeats the training CCDs (same stars,
    galaxies and transients), even at another transient density.  Where the weights record which
    CCDs they saw, stamps are compared CCD by CCD (the test split of the training survey is held
    out); where only the seeds are known, a shared seed counts as overlap.

    Parameters
    ----------
    metadata : dict
        The weights' metadata (:attr:`classifier.infer.Scorer.metadata`).
    data : StampSet
        The evaluated stamps.
    model : str
        Name used in the messages.

    Returns
    -------
    dict
        ``checked`` (bool), ``training_seeds``, ``data_seeds``, ``shared_seeds``, ``n``,
        ``n_overlapping`` (stamps), ``overlapping_ccds`` (their CCD names), ``source``, and
        ``warning`` (a sentence when stamps overlap, else None) and ``note`` (else).
    """
    seen = training_data(metadata)
    data_seeds = simulation_seeds(data)
    out: dict[str, Any] = {"checked": False, "training_seeds": seen["seeds"], "data_seeds": data_seeds,
                           "shared_seeds": sorted(set(seen["seeds"]) & set(data_seeds)), "n": len(data),
                           "n_overlapping": 0, "overlapping_ccds": [], "source": seen["source"],
                           "warning": None, "note": None}
    if not seen["seeds"]:
        out["note"] = f"the weights of {model} record no simulated training data: overlap not checked"
        return out
    if not data_seeds:
        out["note"] = "the evaluated set is not simulated (no simulation seeds): overlap not checked"
        return out
    # CCD k of seed s is the same sky only within one instrument preset (the presets share CCD names)
    trained_on = str((((metadata.get("provenance") or {}).get("train") or {}).get("attrs") or {}).get(
        "instrument", "decam")).lower()
    evaluated_on = str(data.attrs.get("instrument", "decam")).lower()
    if trained_on != evaluated_on:
        out["note"] = (f"{model} was trained on {trained_on} simulations and the evaluated set is {evaluated_on}: "
                       "no shared CCDs")
        return out
    out["checked"] = True
    names = np.asarray(data.meta["ccd"]).astype(str)
    unique, inverse = np.unique(names, return_inverse=True)
    parsed = [simulated_ccd(n) for n in unique.tolist()]
    if seen["ccds"] is not None:
        seen_ccds = {tuple(c) for c in seen["ccds"]}
        hit = np.array([p is not None and p in seen_ccds for p in parsed], dtype=bool)
    else:
        hit = np.array([p is not None and p[0] in seen["seeds"] for p in parsed], dtype=bool)
    per_stamp = hit[inverse] if hit.size else np.zeros(len(data), bool)
    out["n_overlapping"] = int(per_stamp.sum())
    out["overlapping_ccds"] = unique[hit].tolist()
    if out["n_overlapping"]:
        ccds = out["overlapping_ccds"]
        shown = ", ".join(ccds[:5]) + (", ..." if len(ccds) > 5 else "")
        what = ("that" if seen["ccds"] is not None else "of a simulation seed that")
        out["warning"] = (
            f"{out['n_overlapping']} of {len(data)} evaluated stamps come from {len(ccds)} simulated CCD(s) "
            f"{what} {model} was trained or validated on ({shown}; training seed(s) "
            f"{', '.join(map(str, seen['seeds']))}): these metrics are NOT held out and overstate the model. "
            f"Evaluate on stamps simulated with another seed.")
    elif out["shared_seeds"]:
        out["note"] = (f"the set shares simulation seed(s) {', '.join(map(str, out['shared_seeds']))} with the "
                       f"training data of {model} but none of its training or validation CCDs: held out")
    else:
        out["note"] = (f"held out: simulation seed(s) {', '.join(map(str, data_seeds))}; {model} was trained on "
                       f"seed(s) {', '.join(map(str, seen['seeds']))}")
    return out


def evaluate_model(model: "Scorer | str | Path", data: StampSet, config: EvaluationConfig = EvaluationConfig(), *,
                   device: str = "auto", batch_size: int = 1024, threads: int | None = None) -> EvaluationResult:
    """Score a labelled stamp set with a model and evaluate it, checking that the set is held out.

    Parameters
    ----------
    model : Scorer, str or Path
        A loaded :class:`classifier.infer.Scorer`, or what it loads (weights file, training
        folder, shipped model name).
    data : StampSet
        Labelled stamps (select the split first).
    config : EvaluationConfig
    device, batch_size, threads
        For a scorer built here (see :class:`classifier.infer.Scorer`).

    Returns
    -------
    EvaluationResult
        With ``training_overlap`` (:func:`training_overlap`) filled in and, when stamps come
        from CCDs the model was trained on, that warning in ``warnings``; it is also issued as
        a :class:`TrainingDataOverlapWarning`.
    """
    from classifier.infer import Scorer

    scorer = model if isinstance(model, Scorer) else Scorer(model, device=device, batch_size=batch_size,
                                                            threads=threads)
    scores = scorer.score(data.stamps_for(scorer.spec.scheme), data.channels)
    result = evaluate_scores(data.labels, scores, data.meta, config)
    result.training_overlap = training_overlap(scorer.metadata, data, scorer.name)
    if result.training_overlap["warning"]:
        result.warnings.append(result.training_overlap["warning"])
        warnings.warn(result.training_overlap["warning"], TrainingDataOverlapWarning, stacklevel=2)
    return result


def plot_roc(results: dict[str, EvaluationResult] | EvaluationResult, path: str | Path,
             title: str = "ROC") -> Path:
    """Write a ROC plot (PNG) of one or several labelled results (``{label: result}``).

    The caller chooses the path; the file is written to a temporary name, then renamed.
    """
    if isinstance(results, EvaluationResult):
        results = {"model": results}
    path = Path(path)
    fig = new_figure((5, 5))  # no pyplot: the caller's backend is untouched
    ax = fig.subplots()
    for label, res in results.items():
        ax.plot(res.roc["fpr"], res.roc["tpr"], label=f"{label} (AUC {res.roc_auc:.4f}, acc {res.accuracy:.4f})")
    for f in (0.01, 0.03):
        ax.axvline(f, color="0.8", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
