"""A self-contained HTML vetting page of a run's candidates above the score threshold.

One file, nothing fetched from anywhere: inline CSS and vanilla JavaScript, stamps embedded as
base64 PNG.  Per candidate the page shows its stamps (template / search / difference, or
template / search in direct mode) and its catalog values; the table is sortable (click the score,
mag, snr or ccd header) and filterable (text, CCD, minimum score, flag, truth kind).

Stamps come from ``OUT/ccds/<ccd>_stamps.fits`` (read with :func:`pipeline.io.read_stamps`; HDU
``STAMPS``: float32 ``(N, C, 51, 51)`` raw stamps in image units, NaN where there are no data,
header ``CHANNELS`` the comma-separated channel names; HDU ``IDS``: int64 column ``id``, the
catalog ``id`` of each stamp), matched to the catalog by ``id``.  Display:

* template and search: ZScale limits of the stamp's finite pixels, then a mild ``asinh`` stretch,
  grey;
* difference: a symmetric diverging ``asinh`` scale about zero (blue negative, white zero, red
  positive), linear within ~2 robust sigma, saturating at the larger of the 99.5th percentile of
  ``|D|`` and 3 robust sigma;
* pixels without data (NaN): green, a colour neither scale uses;
* rows flipped so that y grows upwards, as ds9 shows an image.

The page's state can be set in the URL fragment, e.g. ``vet.html#sort=snr&dir=asc&minscore=0.9&
ccd=ccd01&flag=none&kind=transient&q=edge``; after every update the script writes the number of
rows shown into ``<body data-shown>`` and ``#nshown`` and the sort into ``<body data-sort>``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
from astropy.table import Table

from dia.stats import robust_std
from pipeline.io import STAMPS_SUFFIX, InputError, atomic_path, read_catalog, validate_ccd_id

__all__ = [
    "VetConfig",
    "VetError",
    "VetResult",
    "RunView",
    "StampSet",
    "NAN_RGB",
    "grey_rgb",
    "diverging_rgb",
    "stamp_rgb",
    "png_bytes",
    "flag_names",
    "load_stamp_set",
    "load_run",
    "select_candidates",
    "render_html",
    "write_vet_page",
]

#: Colour (RGB) of pixels without data in every stamp.
NAN_RGB = (0, 200, 0)
#: End colours of the difference scale (negative, positive); zero is white.
NEGATIVE_RGB = (33, 102, 172)
POSITIVE_RGB = (178, 24, 43)


class VetError(ValueError):
    """The folder cannot be vetted (not a run folder, no score column); the message names the file."""


@dataclasses.dataclass(frozen=True)
class VetConfig:
    """Parameters of the vetting page.

    Attributes
    ----------
    max_rows : int
        At most this many candidates on the page, the highest scores first (default 500: about
        13 MB of HTML with three noisy 51 x 51 stamps each, ~26 kB a candidate).
    display_px : int
        Displayed side of a stamp in CSS pixels (default 102: each 51-pixel stamp pixel drawn 2 x 2).
    zscale_contrast : float
        Contrast of the ZScale limits of template and search stamps (default 0.25, ds9's).
    asinh_a : float
        ``asinh`` softening of the grey stretch, in units of the ZScale range (default 0.5: nearly
        linear near the sky, compressing the top of the range).
    diff_percentile : float
        Percentile of ``|D|`` that sets the difference scale limit (default 99.5).
    diff_min_sigma : float
        The difference limit is at least this many robust sigma (default 3), so a blank difference
        shows noise, not amplified nothing.
    diff_soft_sigma : float
        Softening of the difference's ``asinh`` scale in robust sigma (default 2): linear within a
        few sigma, so noise and faint residuals stay visible next to a bright transient.
    """

    max_rows: int = 500
    display_px: int = 102
    zscale_contrast: float = 0.25
    asinh_a: float = 0.5
    diff_percentile: float = 99.5
    diff_min_sigma: float = 3.0
    diff_soft_sigma: float = 2.0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.display_px < 1:
            raise ValueError(f"VetConfig.max_rows and display_px must be >= 1, got {self.max_rows}, "
                             f"{self.display_px}")
        if not (0 < self.zscale_contrast <= 1 and self.asinh_a > 0 and 0 < self.diff_percentile <= 100
                and self.diff_min_sigma >= 0 and self.diff_soft_sigma > 0):
            raise ValueError(f"VetConfig stretch parameters out of range: {self}")


# ----------------------------------------------------------------------------- stamp pictures (pure)


def _with_nan(rgb: np.ndarray, nan: np.ndarray) -> np.ndarray:
    rgb[nan] = NAN_RGB
    return np.flipud(rgb)  # row 0 (lowest y) at the bottom, as ds9 draws it


def grey_rgb(stamp: np.ndarray, config: VetConfig = VetConfig()) -> np.ndarray:
    """Grey picture of a template or search stamp: ZScale limits, then an ``asinh`` stretch.

    Parameters
    ----------
    stamp : ndarray (H, W)
        Raw pixel values; NaN where there are no data.
    config : VetConfig
        ``zscale_contrast`` and ``asinh_a``.

    Returns
    -------
    ndarray (H, W, 3) uint8
        RGB, flipped so that y grows upwards; NaN pixels :data:`NAN_RGB`.
    """
    from astropy.visualization import ZScaleInterval

    data = np.asarray(stamp, dtype=float)
    nan = ~np.isfinite(data)
    good = data[~nan]
    level = np.full(data.shape, 0.5)
    if good.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lo, hi = ZScaleInterval(contrast=config.zscale_contrast).get_limits(good)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            lo, hi = float(good.min()), float(good.max())
        if hi > lo:
            v = np.clip((np.where(nan, lo, data) - lo) / (hi - lo), 0.0, 1.0)
            level = np.arcsinh(v / config.asinh_a) / np.arcsinh(1.0 / config.asinh_a)
    grey = np.round(255 * level).astype(np.uint8)
    return _with_nan(np.repeat(grey[:, :, None], 3, axis=2), nan)


def diverging_rgb(stamp: np.ndarray, config: VetConfig = VetConfig()) -> np.ndarray:
    """Picture of a difference stamp on a symmetric diverging ``asinh`` scale about zero.

    With ``sigma`` the robust (MAD) scatter of the stamp, ``L`` the larger of the
    ``diff_percentile`` of ``|D|`` and ``diff_min_sigma * sigma`` and ``s = diff_soft_sigma * sigma``,
    a pixel's strength is ``asinh(|D| / s) / asinh(L / s)`` clipped to 1: white at zero, towards
    blue for negative and red for positive values, ``+D`` and ``-D`` equally strong.

    Parameters
    ----------
    stamp : ndarray (H, W)
        Difference pixel values; NaN where there are no data.
    config : VetConfig
        ``diff_percentile``, ``diff_min_sigma`` and ``diff_soft_sigma``.

    Returns
    -------
    ndarray (H, W, 3) uint8
        RGB, flipped so that y grows upwards; NaN pixels :data:`NAN_RGB`.
    """
    data = np.asarray(stamp, dtype=float)
    nan = ~np.isfinite(data)
    good = data[~nan]
    limit, soft = 1.0, 1.0
    if good.size:
        sigma = robust_std(good)
        limit = max(float(np.percentile(np.abs(good), config.diff_percentile)), config.diff_min_sigma * sigma)
        if not (np.isfinite(limit) and limit > 0):
            limit = 1.0
        soft = config.diff_soft_sigma * sigma if sigma > 0 else limit
    d = np.where(nan, 0.0, data)
    t = np.clip(np.arcsinh(np.abs(d) / soft) / np.arcsinh(limit / soft), 0.0, 1.0)[:, :, None]
    white = np.full(3, 255.0)
    end = np.where((d < 0)[:, :, None], np.asarray(NEGATIVE_RGB, float), np.asarray(POSITIVE_RGB, float))
    rgb = np.round(white + t * (end - white)).astype(np.uint8)
    return _with_nan(rgb, nan)


def stamp_rgb(stamp: np.ndarray, channel: str, config: VetConfig = VetConfig()) -> np.ndarray:
    """Picture of one stamp channel: diverging for ``difference``, grey otherwise."""
    return diverging_rgb(stamp, config) if channel == "difference" else grey_rgb(stamp, config)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 picture as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def flag_names(value: int) -> list[str]:
    """Names of the :class:`pipeline.detect.CandidateFlags` bits set in ``value`` (unknown bits as ``bitN``)."""
    from pipeline.detect import CandidateFlags

    value = int(value)
    names = []
    for member in CandidateFlags:
        if value & int(member):
            names.append(member.name)
            value &= ~int(member)
    bit = 0
    while value > 0:
        if value & 1:
            names.append(f"bit{bit}")
        value >>= 1
        bit += 1
    return names


# ----------------------------------------------------------------------------- reading a run


@dataclasses.dataclass
class StampSet:
    """The stamps of one CCD: ``data[row_of[id]]`` is the ``(C, H, W)`` stack of candidate ``id``."""

    channels: tuple[str, ...]
    row_of: dict[int, int]
    data: np.ndarray
    path: Path


def load_stamp_set(path: str | Path, ids: list[int] | None = None) -> StampSet:
    """Read a CCD's stamps file with :func:`pipeline.io.read_stamps`, keeping only the stamps of ``ids``.

    Raises
    ------
    InputError
        Missing, unreadable, damaged or inconsistent file (the message names it and the HDU).
    """
    from pipeline.io import read_stamps

    data, all_ids, channels, _ = read_stamps(path)
    wanted = set(all_ids.tolist()) if ids is None else {int(i) for i in ids}
    rows = [r for r, i in enumerate(all_ids.tolist()) if i in wanted]
    return StampSet(tuple(channels), {int(all_ids[r]): k for k, r in enumerate(rows)},
                    np.ascontiguousarray(data[rows], dtype=np.float32), Path(path))


@dataclasses.dataclass
class RunView:
    """What the page needs of a run folder: its record (``run.json``) and merged candidates."""

    out_dir: Path
    record: dict
    table: Table

    @property
    def threshold(self) -> float:
        """The run's score threshold (``config.score_threshold``; 0.5 if the record lacks it)."""
        value = (self.record.get("config") or {}).get("score_threshold")
        return 0.5 if value is None else float(value)


def load_run(out_dir: str | Path) -> RunView:
    """Read ``run.json`` and ``candidates.fits`` of a run folder.

    Raises
    ------
    VetError
        ``out_dir`` is not a run folder (no ``run.json`` or ``candidates.fits``) or they cannot be read.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise VetError(f"{out_dir}: not a folder (expected the --out folder of `pipeline run`)")
    run_json, catalog = out_dir / "run.json", out_dir / "candidates.fits"
    for need in (run_json, catalog):
        if not need.exists():
            raise VetError(f"{out_dir}: not a pipeline run folder ({need.name} is missing)")
    try:
        record = json.loads(run_json.read_text())
    except (OSError, ValueError) as exc:
        raise VetError(f"{run_json}: cannot read the run record ({exc})") from None
    if not isinstance(record, dict):
        raise VetError(f"{run_json}: not a run record (a JSON object is expected)")
    try:
        table = read_catalog(catalog)
    except InputError as exc:
        raise VetError(str(exc)) from None
    for need in ("ccd", "id", "score"):
        if need not in table.colnames:
            raise VetError(f"{catalog}: no '{need}' column")
    return RunView(out_dir, record, table)


def _floats(table: Table, name: str) -> np.ndarray:
    if name not in table.colnames:
        return np.full(len(table), np.nan)
    try:
        return np.ma.filled(np.ma.asarray(table[name], dtype=float), np.nan)
    except (TypeError, ValueError):
        return np.full(len(table), np.nan)


def _strings(table: Table, name: str) -> list[str]:
    if name not in table.colnames:
        return [""] * len(table)
    col = table[name]
    values = np.ma.filled(col, "") if hasattr(col, "mask") else np.asarray(col)
    return [v.decode("utf-8", "replace").strip() if isinstance(v, bytes) else str(v).strip() for v in values]


def select_candidates(table: Table, threshold: float, max_rows: int) -> tuple[Table, int]:
    """Candidates with ``score >= threshold``, highest score first, at most ``max_rows``.

    Returns
    -------
    (Table, int)
        The rows to show and how many passed the threshold in all.
    """
    score = _floats(table, "score")
    keep = np.flatnonzero(score >= threshold)
    order = keep[np.argsort(-score[keep], kind="stable")]
    return table[order[:max_rows]], len(keep)


# ----------------------------------------------------------------------------- HTML


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "-"


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:.2em 0}
.summary{margin:.3em 0;line-height:1.5}
.summary b{font-weight:600}
#controls{position:sticky;top:0;background:#eef;padding:.5em;border:1px solid #ccd;z-index:2;
 display:flex;flex-wrap:wrap;gap:.8em;align-items:center}
table{border-collapse:collapse;margin-top:.5em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:middle;font-size:.9em;white-space:nowrap}
th{background:#f0f0f0}
th.sortable{cursor:pointer;text-decoration:underline dotted}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.stamps{text-align:left;white-space:nowrap}
figure{display:inline-block;margin:0 3px;text-align:center}
figcaption{font-size:.75em;color:#555}
img.stamp{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #999;display:block}
.nostamps{color:#a00;font-style:italic;text-align:center}
td.flags,td.kind,td.ccd,td.band{text-align:left}
.legend span{display:inline-block;width:1em;height:1em;vertical-align:middle;border:1px solid #999}
tr.hidden{display:none}
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var body = document.body;
  var tbody = document.querySelector("#cands tbody");
  var rows = Array.prototype.slice.call(tbody.rows);
  var q = document.getElementById("q"), ccd = document.getElementById("ccd");
  var minscore = document.getElementById("minscore"), minval = document.getElementById("minscore-val");
  var flag = document.getElementById("flag"), kind = document.getElementById("kind");
  var nshown = document.getElementById("nshown");
  var firstDir = {score: "desc", snr: "desc", mag: "asc", ccd: "asc"};
  var state = {sort: "score", dir: "desc"};

  function num(row, key) {
    var v = parseFloat(row.getAttribute("data-" + key));
    return isNaN(v) ? null : v;
  }
  function compare(a, b) {
    var s = state.dir === "asc" ? 1 : -1, r;
    if (state.sort === "ccd") {
      r = a.getAttribute("data-ccd").localeCompare(b.getAttribute("data-ccd"));
      if (r === 0) { r = num(a, "id") - num(b, "id"); }
      return s * r;
    }
    var x = num(a, state.sort), y = num(b, state.sort);
    if (x === null && y === null) { return 0; }
    if (x === null) { return 1; }   /* missing values last in both directions */
    if (y === null) { return -1; }
    return s * (x - y);
  }
  function sortRows() {
    var ordered = rows.slice().sort(compare);
    ordered.forEach(function (row) { tbody.appendChild(row); });
    document.querySelectorAll("th.sortable").forEach(function (th) {
      var key = th.getAttribute("data-key");
      th.setAttribute("aria-sort", key === state.sort ? (state.dir === "asc" ? "ascending" : "descending") : "none");
    });
    body.setAttribute("data-sort", state.sort + ":" + state.dir);
  }
  function matches(row) {
    var terms = q.value.toLowerCase().split(/\s+/).filter(Boolean);
    var text = row.getAttribute("data-text");
    for (var i = 0; i < terms.length; i++) { if (text.indexOf(terms[i]) < 0) { return false; } }
    if (ccd && ccd.value && row.getAttribute("data-ccd") !== ccd.value) { return false; }
    var s = num(row, "score");
    if (s === null || s < parseFloat(minscore.value) - 1e-9) { return false; }
    var flags = row.getAttribute("data-flags").split(" ").filter(Boolean);
    var f = flag ? flag.value : "";
    if (f === "none" && flags.length) { return false; }
    if (f === "any" && !flags.length) { return false; }
    if (f.indexOf("has:") === 0 && flags.indexOf(f.slice(4)) < 0) { return false; }
    if (f.indexOf("not:") === 0 && flags.indexOf(f.slice(4)) >= 0) { return false; }
    if (kind && kind.value && row.getAttribute("data-kind") !== (kind.value === "(none)" ? "" : kind.value)) {
      return false;
    }
    return true;
  }
  function filterRows() {
    var n = 0;
    rows.forEach(function (row) {
      var show = matches(row);
      row.classList.toggle("hidden", !show);
      if (show) { n += 1; }
    });
    nshown.textContent = String(n);
    body.setAttribute("data-shown", String(n));
    minval.textContent = parseFloat(minscore.value).toFixed(2);
  }
  function saveHash() {
    var p = new URLSearchParams();
    p.set("sort", state.sort); p.set("dir", state.dir);
    if (q.value) { p.set("q", q.value); }
    if (ccd && ccd.value) { p.set("ccd", ccd.value); }
    if (minscore.value !== minscore.getAttribute("min")) { p.set("minscore", minscore.value); }
    if (flag && flag.value) { p.set("flag", flag.value); }
    if (kind && kind.value) { p.set("kind", kind.value); }
    if (window.history && history.replaceState) { history.replaceState(null, "", "#" + p.toString()); }
  }
  function update(save) { sortRows(); filterRows(); if (save) { saveHash(); } }
  function setSelect(el, value) {
    if (!el || value === null) { return; }
    for (var i = 0; i < el.options.length; i++) { if (el.options[i].value === value) { el.value = value; } }
  }
  function readHash() {
    var p = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var key = p.get("sort");
    if (key && firstDir[key]) { state.sort = key; state.dir = firstDir[key]; }
    var dir = p.get("dir");
    if (dir === "asc" || dir === "desc") { state.dir = dir; }
    if (p.get("q") !== null) { q.value = p.get("q"); }
    setSelect(ccd, p.get("ccd")); setSelect(flag, p.get("flag")); setSelect(kind, p.get("kind"));
    var m = parseFloat(p.get("minscore"));
    if (!isNaN(m)) { minscore.value = String(m); }
  }
  document.querySelectorAll("th.sortable").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      if (state.sort === key) { state.dir = state.dir === "asc" ? "desc" : "asc"; }
      else { state.sort = key; state.dir = firstDir[key]; }
      update(true);
    });
  });
  [q, ccd, minscore, flag, kind].forEach(function (el) {
    if (el) { el.addEventListener("input", function () { update(true); }); }
  });
  window.addEventListener("hashchange", function () { readHash(); update(false); });
  readHash();
  update(false);
  body.setAttribute("data-ready", "1");
})();
"""


def _stamp_cell(ccd: str, cid: int, stamps: dict[str, StampSet | str], config: VetConfig) -> str:
    entry = stamps.get(ccd)
    if entry is None:
        return '<td class="stamps nostamps">no stamps</td>'
    if isinstance(entry, str):  # the reason the file could not be used
        return f'<td class="stamps nostamps" title="{_e(entry)}">no stamps (unreadable file)</td>'
    row = entry.row_of.get(cid)
    if row is None:
        return f'<td class="stamps nostamps">no stamps (id {cid} not in {_e(entry.path.name)})</td>'
    size = config.display_px
    figures = []
    for channel, plane in zip(entry.channels, entry.data[row]):
        png = base64.b64encode(png_bytes(stamp_rgb(plane, channel, config))).decode("ascii")
        figures.append(f'<figure><img class="stamp" alt="{_e(channel)} stamp" width="{size}" height="{size}" '
                       f'src="data:image/png;base64,{png}"><figcaption>{_e(channel)}</figcaption></figure>')
    return '<td class="stamps">' + "".join(figures) + "</td>"


def _summary(run: RunView, threshold: float, shown: int, n_above: int, per_ccd: dict[str, tuple[int, int]],
             n_without_stamps: int) -> str:
    rec = run.record
    models = sorted(set(_strings(run.table, "model")) - {""})
    model = ", ".join(models) or Path(str((rec.get("weights") or {}).get("path", "-"))).name
    items = [
        ("mode", rec.get("mode", "-")),
        ("model", model),
        ("run started", rec.get("started", "-")),
        ("score threshold", f"{threshold:g}"),
        ("candidates", len(run.table)),
        ("score \u2265 threshold", n_above),
        ("on this page", f"{shown}" + (f" (the {shown} highest scores; --max)" if shown < n_above else "")),
        ("CCDs", f"{rec.get('n_ccds', len(per_ccd))} ({rec.get('n_failed', 0)} failed)"),
    ]
    if n_without_stamps:
        items.append(("without stamps", n_without_stamps))
    truth = rec.get("truth_summary")
    if isinstance(truth, dict) and truth.get("n_transients"):
        items.append(("truth", f"completeness {truth.get('completeness', float('nan')):.1%} "
                               f"({truth.get('n_selected', '-')}/{truth.get('n_transients', '-')}), "
                               f"purity {truth.get('purity', float('nan')):.1%}, "
                               f"false positives per CCD {truth.get('false_positives_per_ccd', float('nan')):.2f}"))
    parts = [f"<b>{_e(k)}</b>: {_e(v)}" for k, v in items]
    ccds = "; ".join(f"{_e(c)} {a}/{t}" for c, (a, t) in per_ccd.items())
    return (f'<p class="summary">{" &middot; ".join(parts)}</p>'
            f'<p class="summary"><b>per CCD</b> (above threshold / all): {ccds}</p>')


def render_html(run: RunView, rows: Table, n_above: int, threshold: float,
                stamps: dict[str, StampSet | str], config: VetConfig = VetConfig()) -> str:
    """The vetting page as one HTML string.

    Parameters
    ----------
    run : RunView
        The run folder's record and candidates.
    rows : astropy.table.Table
        The candidates to show (see :func:`select_candidates`).
    n_above : int
        How many candidates passed the threshold in all.
    threshold : float
        The score threshold used.
    stamps : dict
        ``ccd -> StampSet`` for CCDs with stamps, ``ccd -> str`` (the reason) for an unusable
        stamps file; CCDs absent get the "no stamps" placeholder.
    config : VetConfig
        Display parameters.
    """
    n = len(rows)
    ccds, ids = _strings(rows, "ccd"), np.ma.filled(np.ma.asarray(rows["id"]), -1).astype(np.int64)
    x, y, ra, dec = (_floats(rows, c) for c in ("x", "y", "ra", "dec"))
    score, snr, mag, mag_err, mjd = (_floats(rows, c) for c in ("score", "snr", "mag", "mag_err", "mjd"))
    flags = np.ma.filled(np.ma.asarray(rows["flags"]), 0).astype(np.int64) if "flags" in rows.colnames \
        else np.zeros(n, np.int64)
    band = _strings(rows, "band")
    has_truth = "truth_kind" in rows.colnames
    kinds = _strings(rows, "truth_kind")
    tmag, tsep = _floats(rows, "truth_mag"), _floats(rows, "truth_sep")

    all_ccds = _strings(run.table, "ccd")
    all_score = _floats(run.table, "score")
    per_ccd: dict[str, tuple[int, int]] = {}
    for c, s in zip(all_ccds, all_score):
        a, t = per_ccd.get(c, (0, 0))
        per_ccd[c] = (a + int(s >= threshold), t + 1)

    body_rows = []
    n_without = 0
    for i in range(n):
        names = flag_names(int(flags[i]))
        cell = _stamp_cell(ccds[i], int(ids[i]), stamps, config)
        n_without += "nostamps" in cell[:40]
        text = " ".join([ccds[i], str(ids[i]), *names, kinds[i], band[i]]).lower()
        magtxt = (f"{mag[i]:.3f} \u00b1 {mag_err[i]:.3f}" if math.isfinite(mag[i]) and math.isfinite(mag_err[i])
                  else _num(mag[i], ".3f"))
        cells = [
            cell,
            f'<td class="ccd">{_e(ccds[i])}</td>',
            f"<td>{ids[i]}</td>",
            f"<td>{_num(x[i], '.2f')}</td>",
            f"<td>{_num(y[i], '.2f')}</td>",
            f"<td>{_num(ra[i], '.6f')}</td>",
            f"<td>{_num(dec[i], '.6f')}</td>",
            f"<td>{_num(score[i], '.4f')}</td>",
            f"<td>{_e(magtxt)}</td>",
            f"<td>{_num(snr[i], '.1f')}</td>",
            f'<td class="flags">{_e(" ".join(names) or "-")}</td>',
            f'<td class="band">{_e(band[i] or "-")}</td>',
            f"<td>{_num(mjd[i], '.5f')}</td>",
        ]
        if has_truth:
            cells += [f'<td class="kind">{_e(kinds[i] or "-")}</td>',
                      f"<td>{_num(tmag[i], '.2f')}</td>", f"<td>{_num(tsep[i], '.2f')}</td>"]
        attrs = {"data-ccd": ccds[i], "data-id": ids[i], "data-score": score[i], "data-mag": mag[i],
                 "data-snr": snr[i], "data-flags": " ".join(names), "data-kind": kinds[i], "data-text": text}
        attr_text = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
        body_rows.append(f"<tr {attr_text}>" + "".join(cells) + "</tr>")

    def th(label: str, key: str | None = None, tip: str = "") -> str:
        title = f' title="{_e(tip)}"' if tip else ""
        if key:
            return f'<th class="sortable" data-key="{key}" aria-sort="none"{title}>{_e(label)}</th>'
        return f"<th{title}>{_e(label)}</th>"

    head = [th("stamps", tip="green: no data; difference blue < 0 < red"), th("ccd", "ccd"), th("id"),
            th("x", tip="0-based pixel on the search grid"), th("y", tip="0-based pixel on the search grid"),
            th("ra"), th("dec"), th("score", "score"), th("mag", "mag"), th("snr", "snr"), th("flags"),
            th("band"), th("mjd")]
    if has_truth:
        head += [th("truth kind"), th("truth mag"), th("truth sep", tip="pixels")]

    from pipeline.detect import CandidateFlags

    flag_opts = ['<option value="">any flags</option>', '<option value="none">no flags</option>',
                 '<option value="any">some flag</option>']
    flag_opts += [f'<option value="has:{_e(m.name)}">has {_e(m.name)}</option>' for m in CandidateFlags]
    flag_opts += [f'<option value="not:{_e(m.name)}">without {_e(m.name)}</option>' for m in CandidateFlags]
    ccd_opts = ['<option value="">all CCDs</option>'] + [f'<option value="{_e(c)}">{_e(c)}</option>'
                                                        for c in per_ccd]
    controls = [
        '<label>filter <input id="q" type="search" placeholder="ccd, id, flag, kind"></label>',
        f'<label>CCD <select id="ccd">{"".join(ccd_opts)}</select></label>',
    ]
    lo = math.floor(min(threshold, 1.0) * 100) / 100 if math.isfinite(threshold) else 0.0
    hi = max(1.0, lo)
    controls.append(f'<label>min score <input id="minscore" type="range" min="{lo:g}" max="{hi:g}" step="0.01" '
                    f'value="{lo:g}"> <output id="minscore-val">{lo:.2f}</output></label>')
    controls.append(f'<label>flags <select id="flag">{"".join(flag_opts)}</select></label>')
    if has_truth:
        known = sorted({k for k in _strings(run.table, "truth_kind")} - {""})
        kind_opts = ['<option value="">all truth kinds</option>'] + [
            f'<option value="{_e(k)}">{_e(k)}</option>' for k in known] + ['<option value="(none)">(none)</option>']
        controls.append(f'<label>truth <select id="kind">{"".join(kind_opts)}</select></label>')
    controls.append(f'<span><span id="nshown">{n}</span> of {n} shown</span>')

    title = f"vet: {run.out_dir.name or run.out_dir}"
    legend = ('<p class="summary legend">Stamps: template/search grey (ZScale, asinh), difference '
              f'<span style="background:rgb{NEGATIVE_RGB}"></span> negative &ndash; '
              '<span style="background:#fff"></span> 0 &ndash; '
              f'<span style="background:rgb{POSITIVE_RGB}"></span> positive (symmetric); '
              f'<span style="background:rgb{NAN_RGB}"></span> no data; y up. Click score, mag, snr or ccd '
              'to sort.</p>')
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n",
        f'<body data-shown="{n}" data-total="{n}" data-sort="score:desc">\n',
        f"<h1>Candidate vetting: {_e(run.out_dir)}</h1>\n",
        _summary(run, threshold, n, n_above, per_ccd, n_without), "\n", legend, "\n",
        f'<div id="controls">{"".join(controls)}</div>\n',
        '<table id="cands"><thead><tr>', "".join(head), "</tr></thead>\n<tbody>\n",
        "\n".join(body_rows), "\n</tbody></table>\n",
        f"<script>{_SCRIPT}</script>\n</body></html>\n",
    ])


@dataclasses.dataclass
class VetResult:
    """What :func:`write_vet_page` wrote."""

    path: Path
    threshold: float
    n_shown: int
    n_above: int
    n_without_stamps: int
    stamp_problems: dict[str, str]


def write_vet_page(out_dir: str | Path, out: str | Path | None = None, *, threshold: float | None = None,
                   max_rows: int | None = None, config: VetConfig = VetConfig()) -> VetResult:
    """Write the vetting page of a run folder (atomically).

    Parameters
    ----------
    out_dir : str or Path
        The ``--out`` folder of ``pipeline run``.
    out : str or Path, optional
        The HTML file (default ``out_dir/vet.html``).
    threshold : float, optional
        Minimum score shown (default: the run's ``score_threshold``).
    max_rows : int, optional
        At most this many candidates, highest scores first (default ``config.max_rows``).
    config : VetConfig
        Display parameters.

    Returns
    -------
    VetResult
        The file, the threshold used, counts, and the stamps files that could not be used (``ccd -> reason``).

    Raises
    ------
    VetError
        ``out_dir`` is not a run folder.
    """
    run = load_run(out_dir)
    threshold = run.threshold if threshold is None else float(threshold)
    if not math.isfinite(threshold):
        raise VetError(f"the score threshold must be a number, got {threshold}")
    limit = config.max_rows if max_rows is None else int(max_rows)
    if limit < 1:
        raise VetError(f"--max must be >= 1, got {limit}")
    rows, n_above = select_candidates(run.table, threshold, limit)
    stamps: dict[str, StampSet | str] = {}
    problems: dict[str, str] = {}
    ccd_col = _strings(rows, "ccd")
    ids = np.ma.filled(np.ma.asarray(rows["id"]), -1).astype(np.int64)
    for ccd in dict.fromkeys(ccd_col):
        try:
            validate_ccd_id(ccd)  # it names a file: never follow a crafted one out of the folder
        except InputError as exc:
            stamps[ccd] = problems[ccd] = str(exc)
            continue
        path = run.out_dir / "ccds" / f"{ccd}{STAMPS_SUFFIX}"
        if not path.exists():
            continue
        try:
            stamps[ccd] = load_stamp_set(path, [int(i) for c, i in zip(ccd_col, ids) if c == ccd])
        except InputError as exc:
            stamps[ccd] = problems[ccd] = str(exc)
    page = render_html(run, rows, n_above, threshold, stamps, config)
    target = Path(out) if out is not None else run.out_dir / "vet.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    n_without = page.count('class="stamps nostamps"')
    return VetResult(target, threshold, len(rows), n_above, n_without, problems)
