"""DES autoScan loader (Goldstein et al. 2015 release), so users can train on real data.

Layout: 51 x 51 stamps named ``srch<ID>``, ``temp<ID>``, ``diff<ID>`` (``.fits``, ``.fits.gz`` or
``.gif``) anywhere in a folder tree, and labels in ``autoscan_features.3.csv`` (comment lines
start with ``#``; columns include ``ID`` and ``OBJECT_TYPE``: 0 = real, 1 = bogus; ``CCDID``,
``SNR`` and ``MAG`` are used when present).

Objects with all three stamps and a label are kept.  Following the paper, the set is balanced
by randomly downsampling the majority class and split at random, object by object, into
train / val / test (``split="random"``, fractions 0.7 / 0.1 / 0.2 by default; each split is
balanced).  ``split="ccd"`` keeps whole CCDs (``ccd`` = ``CCDID``, or groups of 1000
consecutive IDs when the CSV has no CCD column) in one split instead.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import CHANNELS, StampSet

__all__ = ["load_autoscan", "read_autoscan_labels", "find_autoscan_stamps", "LABELS_FILE"]

#: Name of the autoScan label table.
LABELS_FILE = "autoscan_features.3.csv"

_PATTERN = re.compile(r"^(srch|temp|diff)(\d+)\.(fits|fits\.gz|fit|gif)$", re.IGNORECASE)
_PREFIX = {"temp": "template", "srch": "search", "diff": "difference"}


def read_autoscan_labels(path: str | Path) -> dict[str, np.ndarray]:
    """Read the label CSV: lines starting with ``#`` skipped; returns columns as arrays.

    ``ID`` (int64) and ``OBJECT_TYPE`` (int) must be present; ``CCDID``, ``SNR``, ``MAG`` are kept
    when present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoScan label file not found: {path}")
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(line for line in fh if line.strip() and not line.lstrip().startswith("#"))]
    if not rows:
        raise ValueError(f"{path}: no header line after the comment lines")
    header = [h.strip().upper() for h in rows[0]]
    for need in ("ID", "OBJECT_TYPE"):
        if need not in header:
            raise ValueError(f"{path}: column {need!r} missing (columns: {', '.join(header[:12])}...)")
    cols: dict[str, np.ndarray] = {}
    body = [r for r in rows[1:] if len(r) == len(header)]
    if len(body) != len(rows) - 1:
        raise ValueError(f"{path}: {len(rows) - 1 - len(body)} line(s) have the wrong number of fields")
    for name, dtype in (("ID", np.int64), ("OBJECT_TYPE", np.int64), ("CCDID", np.int64),
                        ("SNR", np.float64), ("MAG", np.float64)):
        if name in header:
            j = header.index(name)
            try:
                cols[name] = np.array([float(r[j]) for r in body]).astype(dtype)
            except ValueError as exc:
                raise ValueError(f"{path}: column {name} is not numeric ({exc})") from None
    bad = ~np.isin(cols["OBJECT_TYPE"], (0, 1))
    if bad.any():
        raise ValueError(f"{path}: OBJECT_TYPE must be 0 (real) or 1 (bogus); "
                         f"found {np.unique(cols['OBJECT_TYPE'][bad])}")
    return cols


def find_autoscan_stamps(root: str | Path) -> dict[int, dict[str, Path]]:
    """Walk ``root`` for stamp files: ``{ID: {"template": path, "search": path, "difference": path}}``.

    When an ID has the same stamp in several formats, FITS is preferred over GIF.
    """
    found: dict[int, dict[str, Path]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for fname in files:
            m = _PATTERN.match(fname)
            if not m:
                continue
            kind, oid = _PREFIX[m.group(1).lower()], int(m.group(2))
            entry = found.setdefault(oid, {})
            path = Path(dirpath) / fname
            if kind not in entry or entry[kind].suffix.lower() == ".gif":
                entry[kind] = path
    return found


def _read_stamp(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
        else:
            from astropy.io import fits

            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if h.data is not None), None)
                if hdu is None:
                    raise ValueError("no image data in any HDU")
                arr = np.asarray(hdu.data, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - report any reader failure with the file name
        raise ValueError(f"{path}: cannot read stamp ({exc})") from None
    if arr.shape != (51, 51):
        raise ValueError(f"{path}: stamp must be 51 x 51, got {arr.shape}")
    return arr


def load_autoscan(root: str | Path, labels_file: str | Path | None = None, balance: bool = True,
                  split: str = "random", fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                  limit: int | None = None) -> StampSet:
    """Load the DES autoScan stamps under ``root`` as a balanced, split :class:`StampSet`.

    Parameters
    ----------
    root : path
        Top of the stamp folder tree.
    labels_file : path, optional
        The label CSV; default: ``autoscan_features.3.csv`` found anywhere under ``root``.
    balance : bool
        Downsample the majority class (seeded) to equal real and bogus counts.
    split : {"random", "ccd", "none"}
        The paper's random balanced split, a split by CCD, or no split.
    fractions : (train, val, test)
    seed : int
        Seed of balancing and splitting.
    limit : int, optional
        Read at most this many objects (a random seeded choice among the usable ones) - the
        full release has ~900,000.

    Returns
    -------
    StampSet
        Channels template, search, difference; labels 1 = real (OBJECT_TYPE 0); metadata ``ccd``,
        ``snr``, ``mag`` from the CSV when present, ``kind`` = ``real`` / ``bogus`` (the release has
        no artifact classes), ``truth_id`` = autoScan ID.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"autoScan folder not found: {root}")
    if labels_file is None:
        hits = sorted(root.rglob(LABELS_FILE))
        if not hits:
            raise FileNotFoundError(f"no {LABELS_FILE} under {root}; pass labels_file")
        labels_file = hits[0]
    cols = read_autoscan_labels(labels_file)
    stamps_found = find_autoscan_stamps(root)
    label_of = dict(zip(cols["ID"].tolist(), range(cols["ID"].size)))
    ids = sorted(i for i, e in stamps_found.items() if len(e) == 3 and i in label_of)
    if not ids:
        raise ValueError(f"{root}: no object has all three stamps (srch/temp/diff) and a label in {labels_file}")
    if limit is not None and limit < len(ids):
        ids = sorted(np.random.default_rng(seed).choice(ids, limit, replace=False).tolist())
    rows = np.array([label_of[i] for i in ids])
    stamps = np.empty((len(ids), 3, 51, 51), dtype=np.float32)
    for k, oid in enumerate(ids):
        for c, ch in enumerate(CHANNELS):
            stamps[k, c] = _read_stamp(stamps_found[oid][ch])
    labels = (cols["OBJECT_TYPE"][rows] == 0).astype(np.int8)
    n = len(ids)
    ids_arr = np.array(ids, dtype=np.int64)
    ccd = (np.char.add("ccd", cols["CCDID"][rows].astype(str)) if "CCDID" in cols
           else np.char.add("idgroup", (ids_arr // 1000).astype(str)))
    meta = {"ccd": ccd, "x": np.full(n, np.nan), "y": np.full(n, np.nan),
            "mag": cols["MAG"][rows] if "MAG" in cols else np.full(n, np.nan),
            "snr": cols["SNR"][rows] if "SNR" in cols else np.full(n, np.nan),
            "kind": np.where(labels == 1, "real", "bogus"), "truth_id": ids_arr, "split": np.full(n, "")}
    attrs = {"stream": "autoscan", "root": str(root), "labels_file": str(labels_file), "seed": int(seed),
             "n_found": len(stamps_found), "n_usable": n}
    out = StampSet(stamps, labels, meta, CHANNELS, attrs)
    if balance:
        out = out.balance(seed)
    if split == "random":
        out = out.split_random(fractions, seed)
    elif split == "ccd":
        out = out.split_by_ccd(fractions, seed)
    elif split != "none":
        raise ValueError(f"split must be 'random', 'ccd' or 'none', got {split!r}")
    return out
