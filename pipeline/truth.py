"""Matching candidates to simulated truth and scoring a run against it.

A candidate is *real* when it lies within ``radius`` pixels (default 2, the
classifier issue's rule) of an injected transient; otherwise it is matched,
for bookkeeping, to the nearest other truth object within the radius (star,
galaxy, cosmic ray, ...) or to nothing.  Each transient is credited to at most
one candidate (the nearest), so completeness counts objects, not detections.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

__all__ = ["MatchConfig", "match_truth", "CompletenessSummary", "summarize_against_truth", "REAL_KIND", "read_truth",
           "TRUTH_COLUMNS", "VARIABLE_KIND", "VARIABLE_POLICIES", "candidate_labels"]

#: The only truth kind that counts as real.
REAL_KIND = "transient"

#: Truth kind of a catalogued star whose brightness changed between the epochs.
VARIABLE_KIND = "variable"

#: Label policies for candidates on variable stars (:func:`candidate_labels`).
VARIABLE_POLICIES = ("bogus", "real")

#: Columns a truth table must have (the simulator writes more).
TRUTH_COLUMNS = ("id", "kind", "x", "y", "mag")


def read_truth(path) -> Table:
    """Read a truth table (ECSV, the simulator's format), checking its columns.

    Raises
    ------
    pipeline.io.InputError
        Naming the file and the problem: missing, not an ECSV table (a FITS file given by
        mistake, say), or lacking the columns matching needs.
    """
    from pathlib import Path

    from pipeline.io import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: truth table does not exist")
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # UnicodeDecodeError for binary files, InconsistentTableError, ValueError...
        raise InputError(f"{path}: cannot read the truth table as ECSV ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    missing = [c for c in TRUTH_COLUMNS if c not in table.colnames]
    if missing:
        raise InputError(f"{path}: truth table lacks column(s) {missing}; has {table.colnames}")
    return table


def candidate_labels(truth_kind, variables: str = "bogus") -> np.ndarray:
    """Training labels (1 real, 0 bogus) of candidates from their matched truth kind.

    Parameters
    ----------
    truth_kind : array_like of str
        The ``truth_kind`` column written by :func:`match_truth`.
    variables : {"bogus", "real"}
        Label of candidates on a variable star (kind ``"variable"``: a catalogued star that
        brightened or faded between template and search).  ``"bogus"`` (default): only new
        sources (kind ``"transient"``) are real, as in the DES autoScan training set the paper's
        models follow, because a transient search wants new sources and a star's variability is
        known from its history.  ``"real"``: any astrophysical change is real, as ZTF's
        real-bogus scores (``rb``, ``drb``) define it, so a model meant to be compared with or
        used on ZTF alerts should be trained that way.

    Returns
    -------
    ndarray of int8
    """
    if variables not in VARIABLE_POLICIES:
        raise ValueError(f"variables must be one of {VARIABLE_POLICIES}, got {variables!r}")
    kind = np.asarray(truth_kind).astype(str)
    real = kind == REAL_KIND
    if variables == "real":
        real |= kind == VARIABLE_KIND
    return real.astype(np.int8)


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """Parameters of truth matching.

    Attributes
    ----------
    radius : float
        Matching radius in search pixels (default 2).
    artifact_radius : float
        Larger radius for extended artifacts whose truth position is a single
        representative pixel (satellite trails, bad columns, bleed trails; default 0 = use ``radius``).
    """

    radius: float = 2.0
    artifact_radius: float = 0.0


def match_truth(candidates: Table, truth: Table, config: MatchConfig = MatchConfig()) -> Table:
    """Add ``truth_id``, ``truth_kind``, ``truth_mag`` and ``truth_sep`` columns to a candidate table.

    Transients take precedence: a candidate within the radius of a transient
    is matched to the nearest transient (each transient credited to its nearest
    candidate only; other candidates near it are matched to the next-best
    non-transient object or to nothing).
    """
    out = candidates.copy()
    n = len(out)
    tid = np.full(n, -1, np.int64)
    kind = np.full(n, "", dtype="U16")
    mag = np.full(n, np.nan)
    sep = np.full(n, np.nan)
    if n and len(truth):
        xy = np.column_stack([np.asarray(out["x"], float), np.asarray(out["y"], float)])
        kinds = np.asarray(truth["kind"]).astype(str)
        txy = np.column_stack([np.asarray(truth["x"], float), np.asarray(truth["y"], float)])
        is_real = kinds == REAL_KIND
        if is_real.any():
            real_idx = np.flatnonzero(is_real)
            d, j = cKDTree(txy[is_real]).query(xy, k=1, distance_upper_bound=config.radius)
            hit = np.isfinite(d)
            # credit each transient to its nearest candidate only
            order = np.argsort(d[hit], kind="stable")
            cand = np.flatnonzero(hit)[order]
            _, first = np.unique(j[hit][order], return_index=True)
            winners = cand[first]
            tid[winners] = np.asarray(truth["id"])[real_idx[j[winners]]]
            kind[winners] = REAL_KIND
            mag[winners] = np.asarray(truth["mag"], float)[real_idx[j[winners]]]
            sep[winners] = d[winners]
        rest = np.flatnonzero(tid < 0)
        other = ~is_real
        if rest.size and other.any():
            oidx = np.flatnonzero(other)
            radius = max(config.radius, config.artifact_radius)
            d, j = cKDTree(txy[other]).query(xy[rest], k=1, distance_upper_bound=radius)
            hit = np.isfinite(d)
            sel = rest[hit]
            tid[sel] = np.asarray(truth["id"])[oidx[j[hit]]]
            kind[sel] = kinds[oidx[j[hit]]]
            mag[sel] = np.asarray(truth["mag"], float)[oidx[j[hit]]]
            sep[sel] = d[hit]
    out["truth_id"] = tid
    out["truth_kind"] = kind
    out["truth_mag"] = mag
    out["truth_sep"] = sep
    return out


@dataclasses.dataclass
class CompletenessSummary:
    """Completeness and false positives of one CCD (or a whole run) at a score threshold."""

    n_transients: int
    n_detected: int
    n_selected: int
    n_false_positives: int
    n_candidates: int
    completeness_detected: float
    completeness: float
    purity: float

    def as_dict(self) -> dict:
        """JSON-able dict."""
        return dataclasses.asdict(self)


def summarize_against_truth(candidates: Table, truth: Table, score_threshold: float,
                            edge: int = 0, shape: tuple[int, int] | None = None) -> CompletenessSummary:
    """Completeness (detected and selected by score) and false positives against truth.

    Parameters
    ----------
    candidates : Table
        Candidates with truth columns (:func:`match_truth`) and a ``score`` column.
    truth : Table
        Truth table of the CCD(s).
    score_threshold : float
        Operating threshold on ``score``.
    edge : int
        Transients closer than this to the border of ``shape`` are not counted
        (they cannot give a full stamp); 0 counts all.
    shape : (ny, nx), optional
        Image shape, needed when ``edge > 0``.
    """
    kinds = np.asarray(truth["kind"]).astype(str)
    real = kinds == REAL_KIND
    if edge and shape is not None:
        x = np.asarray(truth["x"], float)
        y = np.asarray(truth["y"], float)
        real &= (x >= edge) & (x < shape[1] - edge) & (y >= edge) & (y < shape[0] - edge)
    real_ids = set(np.asarray(truth["id"])[real].tolist())
    is_real = np.asarray(candidates["truth_kind"]).astype(str) == REAL_KIND if len(candidates) else np.zeros(0, bool)
    ids = np.asarray(candidates["truth_id"]) if len(candidates) else np.zeros(0, int)
    counted = np.array([i in real_ids for i in ids], bool) if len(candidates) else np.zeros(0, bool)
    score = np.asarray(candidates["score"], float) if len(candidates) else np.zeros(0)
    selected = score >= score_threshold
    n_tr = len(real_ids)
    n_det = int((is_real & counted).sum())
    n_sel = int((is_real & counted & selected).sum())
    n_fp = int((selected & ~is_real).sum())
    n_pos = int(selected.sum())
    return CompletenessSummary(
        n_transients=n_tr, n_detected=n_det, n_selected=n_sel, n_false_positives=n_fp,
        n_candidates=len(candidates),
        completeness_detected=n_det / n_tr if n_tr else float("nan"),
        completeness=n_sel / n_tr if n_tr else float("nan"),
        purity=(n_pos - n_fp) / n_pos if n_pos else float("nan"),
    )
