"""Labelled stamp sets: arrays, labels and per-stamp metadata in one compressed file.

A :class:`StampSet` is what every part of the classifier exchanges: the data set builders
(simulated dia / direct streams, DES autoScan) produce one, training, evaluation and saliency
consume one.  Stamps are float32 ``(N, C, 51, 51)`` in the canonical channel order
``template, search, difference`` (NaN = missing pixel); labels are int8, 1 = real, 0 = bogus.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["StampSet", "CHANNELS", "META_COLUMNS", "SPLITS", "ccd_split_assignment", "simulated_ccd",
           "simulation_seeds"]

#: Canonical channel order of stamp arrays.
CHANNELS: tuple[str, ...] = ("template", "search", "difference")

#: Metadata columns every set carries (filled with defaults when a builder has no value).
META_COLUMNS: dict[str, Any] = {
    "ccd": "", "x": np.nan, "y": np.nan, "mag": np.nan, "snr": np.nan,
    "kind": "", "truth_id": -1, "split": "",
}

#: Split names used by :meth:`StampSet.split_by_ccd` and :meth:`StampSet.select`.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Name of a simulated CCD in a stamp set's ``ccd`` column: ``s<seed>-ccd<index>`` (``s1000-ccd07``).
_SIMULATED_CCD = re.compile(r"^s(\d+)-ccd(\d+)$")

_META_DTYPES = {"ccd": str, "kind": str, "split": str, "truth_id": np.int64,
                "x": np.float64, "y": np.float64, "mag": np.float64, "snr": np.float64}


def _as_column(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"StampSet.meta[{name!r}] must be 1-D of length {n}, got shape {arr.shape}")
    dtype = _META_DTYPES.get(name)
    if dtype is str:
        return arr.astype(str)
    if dtype is not None:
        return arr.astype(dtype)
    return arr


@dataclasses.dataclass
class StampSet:
    """A labelled set of stamps with per-stamp metadata.

    Attributes
    ----------
    stamps : ndarray (N, C, 51, 51) float32
        Stamps in the order given by ``channels`` (canonical: template, search, difference);
        NaN marks missing pixels.
    labels : ndarray (N,) int8
        1 = real, 0 = bogus.
    meta : dict of str -> ndarray (N,)
        Per-stamp columns; at least ``ccd`` (str), ``x``, ``y``, ``mag`` (NaN if none), ``snr``,
        ``kind`` (str: transient, star, cosmic_ray, ...), ``truth_id`` (int, -1 if none) and
        ``split`` (str: train / val / test, empty before splitting).  Missing ones are added
        with defaults.
    channels : tuple of str
        Names of the stamp channels.
    attrs : dict
        JSON-able provenance (stream ``dia`` / ``direct`` / ``autoscan``, seeds, configs).
    """

    stamps: np.ndarray
    labels: np.ndarray
    meta: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    channels: tuple[str, ...] = CHANNELS
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stamps = np.asarray(self.stamps, dtype=np.float32)
        if self.stamps.ndim != 4:
            raise ValueError(f"StampSet.stamps must be (N, C, H, W), got shape {self.stamps.shape}")
        n, c = self.stamps.shape[:2]
        self.labels = np.asarray(self.labels)
        if self.labels.shape != (n,):
            raise ValueError(f"StampSet.labels must have shape ({n},), got {self.labels.shape}")
        if n and not np.isin(self.labels, (0, 1)).all():
            raise ValueError("StampSet.labels must be 0 (bogus) or 1 (real)")
        self.labels = self.labels.astype(np.int8)
        self.channels = tuple(str(ch) for ch in self.channels)
        if len(self.channels) != c:
            raise ValueError(f"StampSet.channels names {len(self.channels)} channels, stamps have {c}")
        meta = {k: _as_column(k, v, n) for k, v in dict(self.meta).items()}
        for name, default in META_COLUMNS.items():
            if name not in meta:
                meta[name] = _as_column(name, np.full(n, default), n)
        self.meta = meta
        self.attrs = dict(self.attrs)

    def __len__(self) -> int:
        return int(self.stamps.shape[0])

    def stamps_for(self, scheme: str) -> np.ndarray:
        """The stamps as a model of normalisation ``scheme`` reads them.

        As stored for every scheme but ``"sky"``, which reads template and search in sky units
        (:func:`classifier.normalize.sky_units`): each minus its ``sky_<channel>`` column, over ``sky_noise``
        (the pipeline's dataset builder writes these columns for every stream it cuts, from the whole frames).
        A difference channel is left as stored (the scheme normalises it on its own).
        """
        if scheme != "sky":
            return self.stamps
        from .normalize import sky_units

        need = [f"sky_{c}" for c in self.channels if c != "difference"] + ["sky_noise"]
        missing = [c for c in need if c not in self.meta]
        if missing:
            raise ValueError(f"this stamp set has no {', '.join(missing)} column(s): a model of the 'sky' "
                             f"normalisation needs each image's sky and the search's sky noise at every stamp "
                             f"(sets written by `pipeline dataset` since pair-sky have them; rebuild the set)")
        sky = np.stack([np.asarray(self.meta[f"sky_{c}"], np.float32) if c != "difference"
                        else np.zeros(len(self), np.float32) for c in self.channels], axis=1)
        return sky_units(self.stamps, sky, np.asarray(self.meta["sky_noise"], np.float32))

    # ------------------------------------------------------------------ selection

    def subset(self, index: Any) -> "StampSet":
        """Return the stamps selected by a boolean mask or an integer index array."""
        index = np.asarray(index)
        if index.dtype == bool and index.shape != (len(self),):
            raise ValueError(f"boolean index must have shape ({len(self)},), got {index.shape}")
        return StampSet(self.stamps[index], self.labels[index],
                        {k: v[index] for k, v in self.meta.items()}, self.channels, dict(self.attrs))

    def select(self, split: str) -> "StampSet":
        """Return the stamps whose ``split`` column equals ``split`` (train / val / test)."""
        mask = self.meta["split"] == split
        if not mask.any():
            present = sorted(set(self.meta["split"].tolist()))
            raise ValueError(f"no stamps in split {split!r}; splits present: {present}")
        return self.subset(mask)

    @staticmethod
    def concatenate(sets: Sequence["StampSet"]) -> "StampSet":
        """Concatenate sets with the same channels; metadata columns are those common to all."""
        sets = list(sets)
        if not sets:
            raise ValueError("StampSet.concatenate needs at least one set")
        channels = sets[0].channels
        for s in sets[1:]:
            if s.channels != channels:
                raise ValueError(f"cannot concatenate sets with channels {channels} and {s.channels}")
        keys = [k for k in sets[0].meta if all(k in s.meta for s in sets)]
        meta = {k: np.concatenate([s.meta[k] for s in sets]) for k in keys}
        attrs = dict(sets[0].attrs)
        if len(sets) > 1:
            attrs["concatenated"] = [s.attrs for s in sets]
            seeds = sorted({int(v) for s in sets for v in s.attrs.get("simulation_seeds", [])})
            if seeds:
                attrs["simulation_seeds"] = seeds
        return StampSet(np.concatenate([s.stamps for s in sets]),
                        np.concatenate([s.labels for s in sets]), meta, channels, attrs)

    def balance(self, seed: int = 0) -> "StampSet":
        """Equal numbers of real and bogus stamps, by randomly downsampling the majority class.

        The kept stamps stay in their original order.
        """
        rng = np.random.default_rng(seed)
        real = np.flatnonzero(self.labels == 1)
        bogus = np.flatnonzero(self.labels == 0)
        n = min(real.size, bogus.size)
        if n == 0:
            raise ValueError(f"cannot balance: {real.size} real and {bogus.size} bogus stamps")
        keep = np.concatenate([rng.choice(real, n, replace=False) if real.size > n else real,
                               rng.choice(bogus, n, replace=False) if bogus.size > n else bogus])
        out = self.subset(np.sort(keep))
        out.attrs["balance_seed"] = int(seed)
        return out

    def split_by_ccd(self, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> "StampSet":
        """Assign whole CCDs to train / val / test so no CCD appears in two splits.

        CCDs are shuffled with ``seed`` and assigned greedily so each split's stamp count comes
        as close as possible to its fraction.  Returns a copy with the ``split`` column filled.
        """
        fr = np.asarray(fractions, dtype=float)
        if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
            raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
        fr = fr / fr.sum()
        ccds, counts = np.unique(self.meta["ccd"], return_counts=True)
        if ccds.size < int((fr > 0).sum()):
            raise ValueError(f"need at least {int((fr > 0).sum())} distinct CCDs to split, got {ccds.size}")
        order = np.random.default_rng(seed).permutation(ccds.size)
        target = fr * len(self)
        filled = np.zeros(3)
        assign: dict[str, str] = {}
        # first make sure every split with a positive fraction gets one CCD, then greedy fill
        active = [i for i in range(3) if fr[i] > 0]
        for pos, j in enumerate(order):
            if pos < len(active):
                k = active[pos]
            else:
                k = int(np.argmax(np.where(fr > 0, (target - filled) / np.maximum(target, 1e-9), -np.inf)))
            assign[str(ccds[j])] = SPLITS[k]
            filled[k] += counts[j]
        out = self.subset(np.arange(len(self)))
        out.meta["split"] = np.array([assign[c] for c in self.meta["ccd"]], dtype=str)
        out.attrs["split"] = {"method": "ccd", "fractions": fr.tolist(), "seed": int(seed)}
        return out

    def split_random(self, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> "StampSet":
        """Assign stamps to train / val / test at random, class by class (each split stays balanced
        if the set is).  This is the paper's split of the DES autoScan set."""
        fr = np.asarray(fractions, dtype=float)
        if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
            raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
        fr = fr / fr.sum()
        rng = np.random.default_rng(seed)
        split = np.empty(len(self), dtype=object)
        for label in (0, 1):
            idx = rng.permutation(np.flatnonzero(self.labels == label))
            edges = np.round(np.cumsum(fr) * idx.size).astype(int)
            for k, part in enumerate(np.split(idx, edges[:2])):
                split[part] = SPLITS[k]
        out = self.subset(np.arange(len(self)))
        out.meta["split"] = split.astype(str)
        out.attrs["split"] = {"method": "random", "fractions": fr.tolist(), "seed": int(seed)}
        return out

    # ------------------------------------------------------------------ I/O

    def save(self, path: str | Path) -> Path:
        """Write the set to one compressed ``.npz`` file (temp name, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {"stamps": self.stamps, "labels": self.labels,
                  "channels": np.array(self.channels, dtype=str),
                  "attrs_json": np.array(json.dumps(self.attrs, default=_json_default))}
        for k, v in self.meta.items():
            arrays[f"meta__{k}"] = v
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StampSet":
        """Read a set written by :meth:`save`; errors name the file and what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"stamp set file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = set(npz.files)
                missing = [k for k in ("stamps", "labels", "channels") if k not in names]
                if missing:
                    raise ValueError(f"{path}: not a stamp set, missing array(s) {', '.join(missing)}")
                stamps = npz["stamps"]
                labels = npz["labels"]
                channels = tuple(npz["channels"].tolist())
                attrs = json.loads(str(npz["attrs_json"])) if "attrs_json" in names else {}
                meta = {k[len("meta__"):]: npz[k] for k in sorted(names) if k.startswith("meta__")}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
            if str(exc).startswith(str(path)):
                raise
            raise ValueError(f"{path}: corrupt or unreadable stamp set ({exc})") from None
        try:
            return cls(stamps, labels, meta, channels, attrs)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def summary(self) -> dict[str, Any]:
        """Counts per split and class (JSON-able), for logs and provenance."""
        out: dict[str, Any] = {"n": len(self), "real": int((self.labels == 1).sum()),
                               "bogus": int((self.labels == 0).sum()), "channels": list(self.channels)}
        for split in sorted(set(self.meta["split"].tolist()) - {""}):
            m = self.meta["split"] == split
            out[split] = {"n": int(m.sum()), "real": int((self.labels[m] == 1).sum())}
        return out


def simulated_ccd(name: str) -> tuple[int, int] | None:
    """``(seed, index)`` of a simulated CCD named ``s<seed>-ccd<index>``; None for any other name."""
    m = _SIMULATED_CCD.match(str(name))
    return (int(m.group(1)), int(m.group(2))) if m else None


def simulation_seeds(stamps: StampSet) -> list[int]:
    """The simulation seeds a stamp set was cut from, sorted.

    Read from ``attrs["simulation_seeds"]`` (written by the data set builder, also in the
    ``attrs`` of concatenated parts) and from the ``ccd`` column's ``s<seed>-ccd<index>`` names,
    so sets written before the seeds were recorded are covered too.  Empty for sets that were
    not simulated (DES autoScan).
    """
    seeds: set[int] = set()
    todo = [stamps.attrs]
    while todo:
        attrs = todo.pop()
        seeds.update(int(v) for v in attrs.get("simulation_seeds", []))
        todo.extend(a for a in attrs.get("concatenated", []) if isinstance(a, dict))
    for name in np.unique(stamps.meta["ccd"]).tolist():
        parsed = simulated_ccd(name)
        if parsed is not None:
            seeds.add(parsed[0])
    return sorted(seeds)


def ccd_split_assignment(n_ccds: int, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                         split_seed: int = 0) -> np.ndarray:
    """Split (train / val / test) of each of ``n_ccds`` simulated CCDs, by CCD index.

    The rule of the simulated data set builder (:func:`pipeline.datasets.build_datasets`): the
    indices are shuffled with ``split_seed`` and cut at the cumulative ``fractions``.  Kept here
    so that the CCDs a model was trained on can be recovered from its recorded data set config.

    Returns
    -------
    ndarray (n_ccds,) of str
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    fr = fr / fr.sum()
    order = np.random.default_rng(split_seed).permutation(n_ccds)
    edges = np.round(np.cumsum(fr) * n_ccds).astype(int)
    out = np.empty(n_ccds, dtype="U5")
    for k, part in enumerate(np.split(order, edges[:2])):
        out[part] = SPLITS[k]
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
