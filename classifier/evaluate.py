"""Classifier metrics: pure functions of (labels, scores, metadata).

Labels are 1 = real, 0 = bogus; scores are P(real).  A candidate is called real when its
score is >= the threshold (default 0.5).  The missed-detection rate (MDR) at a false-positive
rate (FPR) f is 1 - TPR at the most permissive threshold whose FPR is still <= f.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from classifier.plotting import new_figure, save_figure

__all__ = ["roc_auc", "roc_curve", "confusion_matrix", "accuracy", "missed_detection_rate",
           "EvaluationConfig", "EvaluationResult", "evaluate_scores", "plot_roc"]


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

    def to_dict(self, with_roc: bool = True) -> dict[str, Any]:
        """JSON-able dict (NaN -> None); the ROC points only when ``with_roc``."""
        d = dataclasses.asdict(self)
        if not with_roc:
            d.pop("roc")
        return _clean(d)

    def summary(self) -> str:
        """A few human-readable lines."""
        c = self.confusion
        lines = [f"n = {self.n} ({self.n_real} real), accuracy = {self.accuracy:.4f}, "
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
