"""ds9 region files of a run's candidates, one per CCD, written with the astropy ``regions`` package.

Each candidate becomes a circle with a text label ``<id> <score>``:

* in ``image`` coordinates of the search exposure (``OUT/regions/<ccd>.reg``).  The catalog's
  ``x``, ``y`` are 0-based NumPy indices; ds9 and FITS count pixels from 1, so a candidate at
  ``x = 10`` is written as ``circle(11, ...)``.  ``regions`` does that shift itself when it
  writes a :class:`~regions.PixCoord` (0-based) in the ``image`` frame, and undoes it on reading.
* in ``icrs`` sky coordinates (``OUT/regions/sky/<ccd>.reg``) for the candidates whose
  ``ra``/``dec`` are finite, so the regions can be laid over any exposure of the field.

Colour scale (:data:`SCORE_COLOURS`, ds9 colour names): score < 0.25 red, 0.25-0.5 yellow,
0.5-0.75 cyan, >= 0.75 green; a missing (NaN) score white.  Candidates below the score
threshold are drawn dashed and one pixel wide; those at or above it solid and two pixels wide.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from astropy.table import Table

from pipeline.io import InputError, atomic_path, read_catalog, validate_ccd_id

__all__ = [
    "RegionConfig",
    "SCORE_COLOURS",
    "NAN_COLOUR",
    "score_colour",
    "candidate_regions",
    "write_regions",
    "write_ccd_regions",
    "write_run_regions",
    "run_ccds",
]

#: (lower score edge, ds9 colour) bins, ascending: a score takes the colour of the last edge it reaches.
SCORE_COLOURS: tuple[tuple[float, str], ...] = ((0.0, "red"), (0.25, "yellow"), (0.5, "cyan"), (0.75, "green"))
#: Colour of a candidate without a score (NaN).
NAN_COLOUR = "white"


@dataclasses.dataclass(frozen=True)
class RegionConfig:
    """How candidates are drawn.

    Attributes
    ----------
    radius_px : float
        Circle radius in pixels of the search exposure (default 6: a bit more than one FWHM of
        typical DECam seeing, so the circle surrounds the source without hiding it).
    radius_arcsec : float
        Circle radius of the sky variant in arcseconds (default 1.6: 6 DECam pixels).
    colours : tuple of (float, str)
        Score bins, see :data:`SCORE_COLOURS`.
    nan_colour : str
        Colour of candidates without a score (default ``"white"``).
    width_above, width_below : int
        Line width of candidates at/above and below the threshold (defaults 2 and 1).
    font : str
        ds9 font of the labels (default ``"helvetica 9 normal roman"``).
    precision : int
        Decimal places of pixel coordinates (default 4); the sky variant uses 10 in degrees (radii too).
    """

    radius_px: float = 6.0
    radius_arcsec: float = 1.6
    colours: tuple[tuple[float, str], ...] = SCORE_COLOURS
    nan_colour: str = NAN_COLOUR
    width_above: int = 2
    width_below: int = 1
    font: str = "helvetica 9 normal roman"
    precision: int = 4

    def __post_init__(self) -> None:
        if not self.radius_px > 0 or not self.radius_arcsec > 0:
            raise ValueError(f"RegionConfig radii must be > 0, got radius_px={self.radius_px}, "
                             f"radius_arcsec={self.radius_arcsec}")
        edges = [e for e, _ in self.colours]
        if not edges or edges != sorted(edges):
            raise ValueError(f"RegionConfig.colours must be non-empty with ascending edges, got {self.colours}")


def score_colour(score: float, colours: tuple[tuple[float, str], ...] = SCORE_COLOURS,
                 nan_colour: str = NAN_COLOUR) -> str:
    """The colour of a score: the colour of the highest bin edge it reaches.

    Parameters
    ----------
    score : float
        CNN score (NaN when unscored).
    colours : tuple of (float, str)
        Ascending ``(edge, colour)`` bins; scores below the first edge take the first colour.
    nan_colour : str
        Colour of a NaN score.

    Returns
    -------
    str
        A ds9 colour name.
    """
    if score is None or not math.isfinite(float(score)):
        return nan_colour
    chosen = colours[0][1]
    for edge, colour in colours:
        if float(score) >= edge:
            chosen = colour
    return chosen


def _values(table: Table, name: str, fill: float = np.nan) -> np.ndarray:
    """A column as a plain float array (masked cells -> ``fill``; absent column -> all ``fill``)."""
    if name not in table.colnames:
        return np.full(len(table), fill, dtype=float)
    return np.ma.filled(np.ma.asarray(table[name], dtype=float), fill)


def candidate_regions(table: Table, *, threshold: float, frame: str = "image",
                      config: RegionConfig = RegionConfig()) -> list:
    """One labelled circle region per candidate (pure: builds ``regions`` objects, writes nothing).

    Parameters
    ----------
    table : astropy.table.Table
        Candidates with ``id``, ``x``, ``y`` (0-based), ``score`` and, for the sky frame, ``ra``/``dec``.
    threshold : float
        Score threshold: candidates below it (or unscored) are drawn dashed and thinner.
    frame : {"image", "icrs"}
        ``image``: :class:`~regions.CirclePixelRegion` at ``(x, y)``; ``icrs``:
        :class:`~regions.CircleSkyRegion` at ``(ra, dec)``, skipping rows with non-finite sky positions.
    config : RegionConfig
        Radius, colours, line widths.

    Returns
    -------
    list of regions.Region
        In table order.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from regions import CirclePixelRegion, CircleSkyRegion, PixCoord

    if frame not in ("image", "icrs"):
        raise ValueError(f"frame must be 'image' or 'icrs', got {frame!r}")
    need = ("id", "x", "y") if frame == "image" else ("id", "ra", "dec")
    missing = [c for c in need if c not in table.colnames]
    if missing:
        raise InputError(f"candidate table lacks column(s) {missing} needed for {frame} regions")
    ids = np.ma.filled(np.ma.asarray(table["id"]), -1)
    score = _values(table, "score")
    x, y = _values(table, "x"), _values(table, "y")
    ra, dec = _values(table, "ra"), _values(table, "dec")
    out = []
    for i in range(len(table)):
        s = float(score[i])
        above = math.isfinite(s) and s >= threshold
        visual = {"color": score_colour(s, config.colours, config.nan_colour), "font": config.font,
                  "linewidth": config.width_above if above else config.width_below}
        if not above:
            visual["linestyle"] = "dashed"
        label = f"{int(ids[i])} {s:.3f}" if math.isfinite(s) else f"{int(ids[i])} -"
        meta = {"text": label}
        if frame == "image":
            if not (math.isfinite(x[i]) and math.isfinite(y[i])):
                continue
            region = CirclePixelRegion(PixCoord(float(x[i]), float(y[i])), radius=config.radius_px,
                                       meta=meta, visual=visual)
        else:
            if not (math.isfinite(ra[i]) and math.isfinite(dec[i])):
                continue
            region = CircleSkyRegion(SkyCoord(float(ra[i]) * u.deg, float(dec[i]) * u.deg, frame="icrs"),
                                     radius=config.radius_arcsec * u.arcsec, meta=meta, visual=visual)
        out.append(region)
    return out


def write_regions(table: Table, path: str | Path, *, threshold: float, frame: str = "image",
                  config: RegionConfig = RegionConfig()) -> Path:
    """Write one CCD's candidates as a ds9 region file (atomically).

    Parameters
    ----------
    table : astropy.table.Table
        The CCD's candidates (see :func:`candidate_regions`).
    path : str or Path
        Output ``.reg`` file.
    threshold : float
        Score threshold (below: dashed, thinner).
    frame : {"image", "icrs"}
        Pixel coordinates of the search exposure (1-based in the file) or ICRS sky coordinates.
    config : RegionConfig
        Drawing parameters.

    Returns
    -------
    Path
        ``path``.
    """
    from regions import Regions

    regs = candidate_regions(table, threshold=threshold, frame=frame, config=config)
    if regs:
        text = Regions(regs).serialize(format="ds9", precision=config.precision if frame == "image" else 10)
    else:  # regions serialises an empty list to nothing: keep a valid, empty ds9 file
        text = f"# Region file format: DS9 astropy/regions\n{frame}\n"
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def run_ccds(out_dir: str | Path) -> list[str]:
    """The CCDs of a run folder with a catalog: from ``run.json`` if written, else from ``ccds/*.json``.

    The status records are used while a run is still writing (``run.json`` comes last).
    """
    out_dir = Path(out_dir)
    run_json = out_dir / "run.json"
    if run_json.exists():
        try:
            records = json.loads(run_json.read_text()).get("ccds", [])
        except (OSError, ValueError) as exc:
            raise InputError(f"{run_json}: cannot read the run record ({exc})") from None
        names = [r.get("ccd", "") for r in records if isinstance(r, dict)]
    else:
        names = []
        for status in sorted((out_dir / "ccds").glob("*.json")):
            try:
                names.append(json.loads(status.read_text()).get("ccd", ""))
            except (OSError, ValueError):
                continue
    return [n for n in names if n and (out_dir / "ccds" / f"{n}.fits").exists()]


def write_ccd_regions(out_dir: str | Path, ccd: str, threshold: float,
                      config: RegionConfig = RegionConfig(), table: Table | None = None) -> list[Path]:
    """Write ``OUT/regions/<ccd>.reg`` (image) and ``OUT/regions/sky/<ccd>.reg`` (icrs) from the CCD's
    candidates: ``table`` when given (the run has them in memory), else ``OUT/ccds/<ccd>.fits``.

    Returns
    -------
    list of Path
        The files written (each atomically).
    """
    validate_ccd_id(ccd)
    out_dir = Path(out_dir)
    if table is None:
        table = read_catalog(out_dir / "ccds" / f"{ccd}.fits")
    image = write_regions(table, out_dir / "regions" / f"{ccd}.reg", threshold=threshold, frame="image",
                          config=config)
    sky = write_regions(table, out_dir / "regions" / "sky" / f"{ccd}.reg", threshold=threshold, frame="icrs",
                        config=config)
    return [image, sky]


def write_run_regions(out_dir: str | Path, threshold: float, ccds: list[str] | None = None,
                      config: RegionConfig = RegionConfig(), catalog: Table | None = None) -> list[Path]:
    """Write the region files of every CCD of a run (see :func:`write_ccd_regions`).

    Parameters
    ----------
    out_dir : str or Path
        The run folder (``OUT``).
    threshold : float
        Score threshold of the run.
    ccds : list of str, optional
        The CCDs; default :func:`run_ccds`.
    config : RegionConfig
        Drawing parameters.
    catalog : astropy.table.Table, optional
        The run's merged catalog (``ccd`` column): each CCD's rows are taken from it instead of
        reading ``OUT/ccds/<ccd>.fits`` again.

    Returns
    -------
    list of Path
        Every file written.
    """
    names = None  # an empty merged catalog may have no columns: read the CCDs' own then
    if catalog is not None and "ccd" in catalog.colnames:
        names = np.char.strip(np.asarray(catalog["ccd"]).astype(str))
    written: list[Path] = []
    for ccd in run_ccds(out_dir) if ccds is None else ccds:
        table = None if names is None else catalog[names == ccd]
        written += write_ccd_regions(out_dir, ccd, threshold, config, table=table)
    return written
