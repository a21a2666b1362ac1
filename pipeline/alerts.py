"""Real alert packets (ZTF, Rubin): read them and cut their cutouts into model stamps.

A packet file is an Avro object container file holding one or more alert records:

* **ZTF** (schema ``ztf.alert``, https://github.com/ZwickyTransientFacility/ztf-avro-alert):
  ``candid``, ``objectId``, ``candidate`` (``rb``, ``drb``, ``isdiffpos``, ``magpsf``, ``xpos``,
  ``ypos``, ...) and ``cutoutScience`` / ``cutoutTemplate`` / ``cutoutDifference``, each a record
  ``{fileName, stampData}`` whose ``stampData`` is a gzipped FITS file, normally 63 x 63 px centred
  on the candidate (pixel 31, 0-based) and cut short where it meets the CCD-quadrant edge; blank
  pixels hold about -3.4e38 or NaN.  The difference cutout comes from the subtraction in which the
  candidate is *positive*: ``..._scimref.fits.gz`` (science - reference) when ``isdiffpos`` is
  ``t``/``1``, ``..._refmsci.fits.gz`` (reference - science) when it is ``f``/``0``.
* **Rubin** (schema ``lsst.vN_M.alert``, https://github.com/lsst/alert_packet): ``diaSourceId``,
  ``diaSource`` (``reliability``, ``isNegative``, ``psfFlux``, ``ra``, ``dec``, ``diaObjectId``,
  ...), and the three cutouts as plain FITS bytes (image in the primary HDU, variance and PSF in
  extensions; gzipped bytes are accepted too), of varying, often even, sizes.  Their WCS reference
  point is the DIASource position; the difference is always science - template, so a negative
  DIASource is negative in it.

:func:`read_alert_file` turns records into :class:`Alert` objects (cutouts as float32 with blank
values as NaN, and the position of the alert in each cutout); :func:`alert_stamps` places each
cutout on the models' 51 x 51 grid with the alert on the centre pixel (:func:`fit_stamp`) and
orients negative alerts (:class:`AlertStampConfig`).  The readers are I/O; ``fit_stamp``,
``clean_blanks`` and ``cutout_centre`` are pure array functions.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from classifier.data import CHANNELS

from .stamps import STAMP_SIZE

__all__ = [
    "Alert",
    "AlertError",
    "AlertStampConfig",
    "AlertStamps",
    "NEGATIVE_POLICIES",
    "CUTOUT_FIELDS",
    "read_alert_file",
    "parse_alert",
    "decode_cutout",
    "clean_blanks",
    "cutout_centre",
    "fit_stamp",
    "alert_stamps",
]

#: Alert fields holding the cutouts, by role.
CUTOUT_FIELDS: dict[str, str] = {"science": "cutoutScience", "template": "cutoutTemplate",
                                 "difference": "cutoutDifference"}

#: How :func:`alert_stamps` presents an alert whose source is fainter in the science image than in
#: the template (ZTF ``isdiffpos`` f/0, Rubin ``isNegative``); see :class:`AlertStampConfig`.
NEGATIVE_POLICIES = ("swap", "positive", "observed")


class AlertError(ValueError):
    """An alert packet file or record that cannot be read; the message names the file and record."""


@dataclass(frozen=True)
class AlertStampConfig:
    """How alert cutouts become model stamps.

    Attributes
    ----------
    size : int
        Side of the model stamps (default 51, :data:`pipeline.stamps.STAMP_SIZE`; odd).
    blank_abs : float
        Pixels with ``|value| >= blank_abs`` are blank (ZTF writes about -3.4e38 there) and become
        NaN, like non-finite pixels (default 1e30).
    ztf_cutout_side : int
        Side of a full ZTF cutout (default 63).  A cutout shorter than this along an axis, with the
        candidate (``xpos`` / ``ypos``) within half a cutout of a quadrant edge, was cut short by
        that edge, which tells where the candidate is in it (:func:`cutout_centre`).
    ztf_quadrant_shape : (int, int)
        ZTF CCD-quadrant size (ny, nx) in pixels (default 3080 x 3072).
    negative : {"swap", "positive", "observed"}
        Negative alerts (the source is fainter in the science image than in the template):
        ``"swap"`` (default) presents them as the time-reversed pair -- search = template cutout,
        template = science cutout, difference = template - science -- so that every alert looks
        like the brightening transients the models were trained on, with the three channels
        consistent (difference = search - template) and the transient positive.  ``"positive"``
        keeps search = science and template = template and makes the difference template -
        science (the transient positive, the channels no longer consistent).  ``"observed"``
        keeps the images as observed: difference = science - template, the transient negative.
        Positive alerts always get search = science, template = template, difference = science -
        template.
    """

    size: int = STAMP_SIZE
    blank_abs: float = 1e30
    ztf_cutout_side: int = 63
    ztf_quadrant_shape: tuple[int, int] = (3080, 3072)
    negative: str = "swap"

    def __post_init__(self) -> None:
        if self.size < 3 or self.size % 2 != 1:
            raise ValueError(f"AlertStampConfig.size must be odd and >= 3, got {self.size}")
        if not self.blank_abs > 0:
            raise ValueError(f"AlertStampConfig.blank_abs must be > 0, got {self.blank_abs}")
        if self.ztf_cutout_side < 1:
            raise ValueError(f"AlertStampConfig.ztf_cutout_side must be >= 1, got {self.ztf_cutout_side}")
        if self.negative not in NEGATIVE_POLICIES:
            raise ValueError(f"AlertStampConfig.negative must be one of {NEGATIVE_POLICIES}, got {self.negative!r}")


@dataclass(frozen=True)
class Alert:
    """One alert: identifiers, the three cutouts and the alert's own classification fields.

    Attributes
    ----------
    path : str
        The packet file.
    record : int
        Index of the record in the file (0-based).
    survey : {"ztf", "rubin"}
    candid : int or None
        ZTF candidate id (None for Rubin).
    object_id : str or None
        ZTF ``objectId``; Rubin ``diaObjectId`` as text.
    dia_source_id : int or None
        Rubin ``diaSourceId`` (None for ZTF).
    science, template, difference : ndarray (ny, nx) float32
        The cutouts as delivered, blank pixels NaN; the difference in the orientation the packet
        gives it (see ``template_minus_science``).
    centres : dict role -> (row, col)
        0-based position of the alert in each cutout (:func:`cutout_centre`).
    negative : bool
        The source is fainter in the science image than in the template.
    template_minus_science : bool
        The delivered difference cutout is template - science (ZTF negative alerts); otherwise
        science - template.
    rb, drb : float
        ZTF real-bogus scores (NaN when absent).
    reliability : float
        Rubin reliability (NaN when absent).
    isdiffpos : str
        ZTF ``isdiffpos`` as given ("" for Rubin).
    magpsf : float
        ZTF PSF magnitude (NaN for Rubin).
    notes : tuple of str
        What was noticed or assumed while reading.
    """

    path: str
    record: int
    survey: str
    candid: int | None
    object_id: str | None
    dia_source_id: int | None
    science: np.ndarray = field(repr=False)
    template: np.ndarray = field(repr=False)
    difference: np.ndarray = field(repr=False)
    centres: dict[str, tuple[float, float]]
    negative: bool
    template_minus_science: bool
    rb: float = math.nan
    drb: float = math.nan
    reliability: float = math.nan
    isdiffpos: str = ""
    magpsf: float = math.nan
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``file[record] (candid ...)`` for messages."""
        ident = (f"candid {self.candid}" if self.candid is not None
                 else f"diaSourceId {self.dia_source_id}" if self.dia_source_id is not None else "no id")
        return f"{self.path}[record {self.record}] ({ident})"

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Shape of each cutout, by role."""
        return {role: tuple(getattr(self, role).shape) for role in CUTOUT_FIELDS}


# ----------------------------------------------------------------------------- pure array functions


def clean_blanks(image: np.ndarray, blank_abs: float = 1e30) -> np.ndarray:
    """A float32 copy of ``image`` with blank pixels (non-finite or ``|value| >= blank_abs``) as NaN.

    Parameters
    ----------
    image : array_like
        Cutout pixels (any real dtype, any byte order).
    blank_abs : float
        Magnitude from which a value counts as a blank fill value (ZTF: about -3.4e38).

    Returns
    -------
    ndarray float32
    """
    a = np.array(image, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore"):
        a[~np.isfinite(a) | (np.abs(a) >= blank_abs)] = np.nan
    return a


def cutout_centre(shape: tuple[int, int], pos: tuple[float, float] | None = None, nominal: int | None = None,
                  detector_shape: tuple[int, int] | None = None) -> tuple[float, float]:
    """0-based (row, col) of the alert in a cutout cut around it.

    Parameters
    ----------
    shape : (ny, nx)
        Cutout shape.
    pos : (y, x), optional
        1-based position of the alert on the detector (ZTF ``ypos``, ``xpos``).
    nominal : int, optional
        Side of an uncut cutout (ZTF: 63).
    detector_shape : (ny, nx), optional
        Detector size in pixels (ZTF quadrant: 3080 x 3072), to recognise a cutout cut short by
        the high edge.

    Returns
    -------
    (row, col) : tuple of float

    Notes
    -----
    A cutout is centred on the alert's pixel: the centre is pixel ``n // 2`` along an axis of ``n``
    pixels (31 of 63; for an even side, the upper of the two middle pixels, 15 of 30).  The
    exception is an axis shorter than ``nominal`` whose alert lies within ``h = nominal // 2``
    pixels of a detector edge (a cutout cut short by the edge): near the low edge (``pos - 1 < h``)
    the low side was lost and the alert is at ``n - 1 - h``; near the high edge (``pos - 1 >
    detector - 1 - h``) the high side was lost and it is at ``h``.
    """
    centre = []
    for axis, n in enumerate(shape):
        c = float(n // 2)
        p = None if pos is None or pos[axis] is None or not math.isfinite(pos[axis]) else float(pos[axis]) - 1
        if nominal is not None and n < nominal and p is not None:
            half = nominal // 2
            if p < half:
                c = float(n - 1 - half)
            elif detector_shape is not None and p > detector_shape[axis] - 1 - half:
                c = float(half)
        centre.append(c)
    return centre[0], centre[1]


def fit_stamp(image: np.ndarray, centre: tuple[float, float], size: int = STAMP_SIZE) -> np.ndarray:
    """Place ``image`` on a ``size`` x ``size`` grid with pixel ``centre`` on the middle pixel.

    A larger cutout is cropped, a smaller one padded with NaN (missing pixels); both at once when
    the centre is off-centre.  ``centre`` is rounded to the nearest pixel (halves up), so the
    image is shifted by whole pixels and never resampled.

    Parameters
    ----------
    image : ndarray (ny, nx)
    centre : (row, col)
        0-based position that becomes pixel ``(size // 2, size // 2)``.
    size : int
        Odd stamp side (default 51).

    Returns
    -------
    ndarray (size, size) float32
    """
    if size < 3 or size % 2 != 1:
        raise ValueError(f"fit_stamp: size must be odd and >= 3, got {size}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"fit_stamp: need a 2-D image, got shape {image.shape}")
    half = size // 2
    out = np.full((size, size), np.nan, np.float32)
    src, dst = [], []
    for c, n in zip(centre, image.shape):
        start = int(math.floor(float(c) + 0.5)) - half  # image index of stamp pixel 0
        lo, hi = max(start, 0), min(start + size, n)
        if hi <= lo:  # no overlap: an all-NaN stamp
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[dst[0], dst[1]] = image[src[0], src[1]]
    return out


# ----------------------------------------------------------------------------- stamps


@dataclass(frozen=True)
class AlertStamps:
    """Model stamps of a list of alerts.

    Attributes
    ----------
    data : ndarray (N, 3, size, size) float32
        Channels :data:`classifier.data.CHANNELS` (template, search, difference); NaN = missing.
    channels : tuple of str
    swapped : ndarray (N,) bool
        Search and template exchanged (negative alert, policy ``"swap"``).
    diff_sign : ndarray (N,) int8
        Factor (+1 / -1) applied to the delivered difference cutout.
    nan_fraction : ndarray (N,) float32
        Fraction of the stamp's pixels (all channels) that are missing.
    """

    data: np.ndarray
    channels: tuple[str, ...]
    swapped: np.ndarray
    diff_sign: np.ndarray
    nan_fraction: np.ndarray


def alert_stamps(alerts: list[Alert], config: AlertStampConfig = AlertStampConfig()) -> AlertStamps:
    """Cut the model stamps of ``alerts`` (alert on the centre pixel; negative alerts per ``config``).

    Parameters
    ----------
    alerts : list of Alert
    config : AlertStampConfig

    Returns
    -------
    AlertStamps
    """
    n, size = len(alerts), config.size
    data = np.empty((n, len(CHANNELS), size, size), np.float32)
    swapped = np.zeros(n, bool)
    diff_sign = np.ones(n, np.int8)
    for i, a in enumerate(alerts):
        planes = {role: fit_stamp(getattr(a, role), a.centres[role], size) for role in CUTOUT_FIELDS}
        to_sci_minus_ref = -1 if a.template_minus_science else 1  # delivered -> science - template
        sign, search, template = to_sci_minus_ref, planes["science"], planes["template"]
        if a.negative and config.negative == "swap":
            sign, search, template, swapped[i] = -sign, template, search, True
        elif a.negative and config.negative == "positive":
            sign = -sign
        diff_sign[i] = sign
        by_channel = {"template": template, "search": search, "difference": sign * planes["difference"]}
        for k, ch in enumerate(CHANNELS):
            data[i, k] = by_channel[ch]
    nan_fraction = np.isnan(data).reshape(n, -1).mean(axis=1).astype(np.float32) if n else np.zeros(0, np.float32)
    return AlertStamps(data=data, channels=CHANNELS, swapped=swapped, diff_sign=diff_sign, nan_fraction=nan_fraction)


# ----------------------------------------------------------------------------- reading


def decode_cutout(payload: Any, where: str, blank_abs: float = 1e30) -> tuple[np.ndarray, Any, str]:
    """Pixels, FITS header and file name of one cutout field.

    Parameters
    ----------
    payload : bytes or dict
        Rubin: FITS bytes; ZTF: ``{"fileName": ..., "stampData": gzipped FITS bytes}``.
        Gzipped and plain FITS bytes are both accepted (told apart by the gzip magic number).
    where : str
        Names the file, record and field in error messages.
    blank_abs : float
        See :func:`clean_blanks`.

    Returns
    -------
    image : ndarray float32 (blank pixels NaN)
    header : astropy.io.fits.Header
        Header of the HDU the image came from (the first HDU with 2-D data).
    file_name : str
        ZTF ``fileName`` ("" for Rubin).

    Raises
    ------
    AlertError
        Absent cutout, corrupt gzip, not FITS, or no 2-D image in it.
    """
    from astropy.io import fits

    file_name = ""
    if isinstance(payload, dict):
        file_name = str(payload.get("fileName") or "")
        payload = payload.get("stampData")
    if payload is None:
        raise AlertError(f"{where}: the cutout is absent (null)")
    data = bytes(payload)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise AlertError(f"{where}: stampData is not valid gzip ({exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ZTF cutouts carry a non-standard SIMPLE card
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.is_image and hdu.data is not None and np.ndim(hdu.data) == 2:
                        return clean_blanks(hdu.data, blank_abs), hdu.header.copy(), file_name
    except Exception as exc:  # astropy raises OSError, TypeError, ValueError... on bad bytes
        raise AlertError(f"{where}: not a readable FITS file ({type(exc).__name__}: {exc})") from None
    raise AlertError(f"{where}: the FITS file holds no 2-D image")


def _float(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _wcs_centre(header: Any, ra: float, dec: float, shape: tuple[int, int]) -> tuple[float, float] | None:
    """(row, col) of (ra, dec) through the cutout's WCS, or None when there is no usable WCS."""
    if "CRPIX1" not in header or not (math.isfinite(ra) and math.isfinite(dec)):
        return None
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x, y = WCS(header, naxis=2).all_world2pix(ra, dec, 0)
    except Exception:  # noqa: BLE001 - any WCS failure means: fall back to the geometric centre
        return None
    x, y = float(x), float(y)
    if not (math.isfinite(x) and math.isfinite(y)) or not (-0.5 <= x < shape[1] - 0.5 and -0.5 <= y < shape[0] - 0.5):
        return None
    return y, x


def parse_alert(record: dict, path: str, index: int, config: AlertStampConfig = AlertStampConfig()) -> Alert:
    """Turn one deserialised ZTF or Rubin alert record into an :class:`Alert`.

    Raises
    ------
    AlertError
        Naming the file, record and field: neither layout, or a cutout that cannot be read.
    """
    where = f"{path}[record {index}]"
    if not isinstance(record, dict):
        raise AlertError(f"{where}: not an alert record ({type(record).__name__})")
    notes: list[str] = []
    if isinstance(record.get("candidate"), dict):
        survey = "ztf"
        cand = record["candidate"]
        candid = record.get("candid", cand.get("candid"))
        where = f"{where} (candid {candid})"
        cutouts = {role: decode_cutout(record.get(fname), f"{where} {fname}", config.blank_abs)
                   for role, fname in CUTOUT_FIELDS.items()}
        isdiffpos = str(cand.get("isdiffpos") or "")
        if isdiffpos not in ("t", "f", "1", "0"):
            notes.append(f"isdiffpos {isdiffpos!r} not t/f/1/0: taken as positive")
        negative = isdiffpos in ("f", "0")
        name = cutouts["difference"][2].lower()
        if "refmsci" in name or "scimref" in name:
            tms = "refmsci" in name
            if tms != negative:
                notes.append(f"difference file name {cutouts['difference'][2]} contradicts isdiffpos "
                             f"{isdiffpos!r}: orientation taken from the file name")
        else:
            tms = negative  # ZTF ships the subtraction in which the candidate is positive
        pos = (_float(cand.get("ypos")), _float(cand.get("xpos")))
        centres = {}
        for role, (img, _, _) in cutouts.items():
            centres[role] = cutout_centre(img.shape, pos, config.ztf_cutout_side, config.ztf_quadrant_shape)
            if centres[role] != cutout_centre(img.shape):
                notes.append(f"{role} {img.shape[0]}x{img.shape[1]} cut short by the quadrant edge: alert at "
                             f"pixel ({centres[role][0]:g}, {centres[role][1]:g}) from xpos/ypos")
        fields = dict(candid=None if candid is None else int(candid),
                      object_id=None if record.get("objectId") is None else str(record["objectId"]),
                      dia_source_id=None, rb=_float(cand.get("rb")), drb=_float(cand.get("drb")),
                      isdiffpos=isdiffpos, magpsf=_float(cand.get("magpsf")))
    elif isinstance(record.get("diaSource"), dict):
        survey = "rubin"
        src = record["diaSource"]
        dsid = record.get("diaSourceId", src.get("diaSourceId"))
        where = f"{where} (diaSourceId {dsid})"
        cutouts = {role: decode_cutout(record.get(fname), f"{where} {fname}", config.blank_abs)
                   for role, fname in CUTOUT_FIELDS.items()}
        if src.get("isNegative") is not None:
            negative = bool(src["isNegative"])
        else:
            negative = _float(src.get("psfFlux")) < 0
        tms = False  # Rubin differences are science - template
        ra, dec = _float(src.get("ra")), _float(src.get("dec"))
        centres = {}
        for role, (img, header, _) in cutouts.items():
            c = _wcs_centre(header, ra, dec, img.shape)
            if c is None:
                c = cutout_centre(img.shape)
                notes.append(f"{role}: no usable WCS, alert taken at the cutout centre")
            centres[role] = c
        obj = src.get("diaObjectId")
        if obj is None and isinstance(record.get("diaObject"), dict):
            obj = record["diaObject"].get("diaObjectId")
        fields = dict(candid=None, object_id=None if obj is None else str(obj),
                      dia_source_id=None if dsid is None else int(dsid),
                      reliability=_float(src.get("reliability")))
    else:
        raise AlertError(f"{where}: neither a ZTF alert (no 'candidate' record) nor a Rubin alert "
                         f"(no 'diaSource' record); fields: {sorted(record)[:12]}")
    return Alert(path=path, record=index, survey=survey, science=cutouts["science"][0],
                 template=cutouts["template"][0], difference=cutouts["difference"][0], centres=centres,
                 negative=negative, template_minus_science=tms, notes=tuple(notes), **fields)


def read_alert_file(path: str | Path,
                    config: AlertStampConfig = AlertStampConfig()) -> tuple[list[Alert], list[AlertError]]:
    """Read every alert record of an Avro packet file.

    A record that cannot be read is skipped and reported; the others are kept.  A file cut short
    keeps the records before the damage.

    Parameters
    ----------
    path : str or Path
        Avro object container file (``fastavro``) of ZTF or Rubin alerts.
    config : AlertStampConfig

    Returns
    -------
    alerts : list of Alert
    errors : list of AlertError
        One per record (or damaged tail) that could not be read, naming file and record.

    Raises
    ------
    AlertError
        The file is missing or is not an Avro container file.
    """
    import fastavro

    path = Path(path)
    if not path.is_file():
        raise AlertError(f"{path}: alert file does not exist")
    alerts: list[Alert] = []
    errors: list[AlertError] = []
    with open(path, "rb") as fh:
        if fh.read(4) != b"Obj\x01":
            raise AlertError(f"{path}: not an Avro object container file (no 'Obj\\x01' magic); a Kafka "
                             "message (Confluent wire format) must be saved with its writer schema first")
        fh.seek(0)
        try:
            reader = fastavro.reader(fh)
        except Exception as exc:  # noqa: BLE001 - a damaged header
            raise AlertError(f"{path}: cannot read the Avro header ({type(exc).__name__}: {exc})") from None
        index = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt block: keep what was read
                after = f"after record {index - 1}" if index else "before the first record"
                errors.append(AlertError(f"{path}: unreadable {after} ({type(exc).__name__}: {exc}); "
                                         "the rest of the file is lost"))
                break
            try:
                alerts.append(parse_alert(record, str(path), index, config))
            except AlertError as exc:
                errors.append(exc)
            index += 1
    return alerts, errors

