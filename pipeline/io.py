"""Exposure I/O: FITS exposures in the layouts survey pipelines ship, manifests, atomic writes.

Layouts read by :func:`read_exposure`:

1. Multi-extension file with ``IMAGE``/``SCI``, ``VARIANCE``/``VAR`` (or
   ``WEIGHT``/``WHT``/``IVAR``, inverse variance) and ``MASK``/``DQ``/``BPM``
   HDUs -- what :func:`write_exposure` and the simulator write.
2. Separate image, mask and weight files, as the DECam community pipeline
   ships them (``*_ooi_*``, ``*_ood_*``, ``*_oow_*``): pass ``mask_path`` and
   ``weight_path`` (or ``variance_path``); ``hdu`` selects the CCD extension
   in all three.
3. A bare image HDU: the variance is then estimated as HOTPANTS does, from
   the image, the gain and the read noise (``GAIN``/``GAINA``/``GAINB``,
   ``RDNOISE``/``RDNOISEA``/``RDNOISEB``), and saturated pixels
   (``SATURATE``/``SATURATA``/``SATURATB``) are masked.

All images are in ADU, variances in ADU^2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import functools
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from dia.masks import MaskBits, mask_header_cards
from pipeline.stamps import STAMP_SIZE

__all__ = [
    "Exposure",
    "InputError",
    "read_exposure",
    "observation_mjd",
    "write_exposure",
    "atomic_path",
    "read_manifest",
    "PairEntry",
    "MANIFEST_COLUMNS",
    "write_difference",
    "validate_ccd_id",
    "check_ccd_ids",
    "remove_orphan_temporaries",
    "write_catalog",
    "read_catalog",
    "inputs_table",
    "package_version",
    "write_stamps",
    "read_stamps",
    "CATALOG_EXTNAME",
    "INPUTS_EXTNAME",
    "PROVENANCE_CARDS",
    "STAMPS_EXTNAME",
    "STAMP_IDS_EXTNAME",
    "STAMPS_SUFFIX",
    "CCD_ID_PATTERN",
    "MIN_IMAGE_SIDE",
]

IMAGE_HDU_NAMES = ("IMAGE", "SCI", "SCIENCE")
VARIANCE_HDU_NAMES = ("VARIANCE", "VAR")
WEIGHT_HDU_NAMES = ("WEIGHT", "WHT", "IVAR", "INVVAR")
MASK_HDU_NAMES = ("MASK", "DQ", "BPM", "FLAGS")


#: Smallest image side (pixels): one candidate stamp must fit.
MIN_IMAGE_SIDE = STAMP_SIZE

#: What a CCD identifier may look like.  It names the CCD's output files, so it must be a
#: plain file name: letters, digits and ``. _ + -``, not starting with a dot or a dash.
CCD_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
#: Longest CCD identifier (file names of 255 bytes must hold it with prefixes and suffixes).
CCD_ID_MAX_LENGTH = 64


class InputError(ValueError):
    """Bad input data: the message names the file, the HDU and the problem."""


@dataclasses.dataclass
class Exposure:
    """One CCD exposure: pixels, noise model, mask, WCS and observing metadata.

    Attributes
    ----------
    image : ndarray (ny, nx) float32
        Pixel values in ADU (sky not subtracted unless ``sky_level`` is 0).
    variance : ndarray (ny, nx) float32
        Per-pixel variance in ADU^2.
    mask : ndarray (ny, nx) int32
        Bit flags, see :class:`dia.masks.MaskBits`.
    wcs : astropy.wcs.WCS
        Celestial WCS of the pixel grid.
    fwhm : float
        PSF FWHM in pixels (NaN if unknown; estimate it before PSF matching).
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons.
    saturation : float
        Saturation level in ADU.
    zero_point : float
        Photometric zero point: ``mag = zero_point - 2.5 log10(flux_ADU)``.
    band : str
        Filter name.
    exptime : float
        Exposure time in seconds.
    mjd : float
        Modified Julian Date (UTC) of the exposure: ``MJD-OBS``, else ``DATE-OBS`` converted
        (NaN when the header has neither).
    mag_system : str
        Magnitude system of ``zero_point`` (``MAGSYS`` card, e.g. ``AB``; ``''`` unknown).
    sky_level : float
        Mean sky level in ADU.
    instrument : str
        Instrument name (``DECam``, ``ZTF``, ``LSSTCam``...).
    name : str
        Identifier (file name and HDU for real data).
    ccd : str
        CCD identifier.
    header : astropy.io.fits.Header
        Other metadata carried along (written back out on save).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS
    fwhm: float = float("nan")
    gain: float = 1.0
    read_noise: float = 0.0
    saturation: float = float("inf")
    zero_point: float = 25.0
    band: str = ""
    exptime: float = 1.0
    mjd: float = float("nan")
    mag_system: str = ""
    sky_level: float = 0.0
    instrument: str = ""
    name: str = ""
    ccd: str = ""
    header: fits.Header = dataclasses.field(default_factory=fits.Header)
    provenance: dict = dataclasses.field(default_factory=dict)
    """Where the noise model and metadata came from (``{"zero_point": "MAGZERO", "fwhm":
    "measured from the stars", "variance": "VARIANCE HDU", ...}``): recorded in each CCD's status."""

    def __post_init__(self) -> None:
        shapes = {"image": self.image.shape, "variance": self.variance.shape, "mask": self.mask.shape}
        if len(set(shapes.values())) != 1 or len(self.image.shape) != 2:
            raise InputError(f"{self.name or 'exposure'}: planes must be 2-D and agree in shape, got {shapes}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the pixel grid."""
        return self.image.shape  # type: ignore[return-value]

    @property
    def has_zero_point(self) -> bool:
        """True unless the zero point is :func:`read_exposure`'s stand-in for a header without one.

        A file with no zero-point keyword is read with ``zero_point = 25`` (so that the template
        and search scales still agree); magnitudes on that number would be invented.
        """
        return bool(np.isfinite(self.zero_point)) and not str(self.provenance.get("zero_point", "")).startswith(
            "default")

    def flux_to_mag(self, flux: np.ndarray | float) -> np.ndarray:
        """Magnitude of a flux in ADU on this exposure's zero point."""
        return self.zero_point - 2.5 * np.log10(np.asarray(flux, dtype=float))

    def mag_to_flux(self, mag: np.ndarray | float) -> np.ndarray:
        """Flux in ADU of a magnitude on this exposure's zero point."""
        return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - self.zero_point))


# ----------------------------------------------------------------------------- writing


#: Suffix of the temporary files :func:`atomic_path` writes (``.<name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no other way to read it; set it straight back
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Nothing is left half-written: on error the temporary file is removed and
    ``path`` is untouched.  The file gets the permissions a plain ``open`` would
    give it (``0666`` less the umask), not ``mkstemp``'s private ``0600``.  A kill
    between creation and rename can leave ``.<name>.*.tmp``; :func:`remove_orphan_temporaries`
    cleans those up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _writeto(hdul: fits.HDUList, path: Path, **kwargs) -> None:
    """``hdul.writeto(path)``, a full disk always reported as ``ENOSPC`` ("No space left on device").

    astropy checks the free space itself before writing a large data part and raises a plain
    ``OSError("Not enough space on disk: ...")`` without an errno; the caller's messages and
    checks key on the errno.
    """
    try:
        hdul.writeto(path, **kwargs)
    except OSError as exc:
        if exc.errno is None and "not enough space" in str(exc).lower():
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({exc})", str(path)) from None
        raise


def remove_orphan_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete temporaries left by :func:`atomic_path` after a kill; return what was removed.

    Only call this while no other process writes into ``folder`` (``pipeline run`` holds the
    output folder's lock when it does).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".*{TEMP_SUFFIX}"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = []
    for p in found:
        if p.is_file() and p.name.count(".") >= 3:  # .<name>.<random>.tmp
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


_META_KEYS = {
    "GAIN": ("gain", "[e-/ADU] gain"),
    "RDNOISE": ("read_noise", "[e-] read noise"),
    "SATURATE": ("saturation", "[ADU] saturation level"),
    "MAGZERO": ("zero_point", "[mag] mag = MAGZERO - 2.5 log10(ADU)"),
    "FWHM": ("fwhm", "[pix] PSF FWHM"),
    "SKYLEVEL": ("sky_level", "[ADU] mean sky level"),
    "EXPTIME": ("exptime", "[s] exposure time"),
    "MJD-OBS": ("mjd", "[d] MJD (UTC) of the exposure"),
    "MAGSYS": ("mag_system", "magnitude system of MAGZERO"),
    "BAND": ("band", "filter band"),
    "INSTRUME": ("instrument", "instrument"),
    "CCDNAME": ("ccd", "CCD identifier"),
}


def _meta_header(exposure: Exposure) -> fits.Header:
    hdr = fits.Header()
    skip = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "EXTNAME", "COMMENT", "HISTORY", "",
            "XTENSION", "PCOUNT", "GCOUNT", "BUNIT"}
    wcs_keys = set(exposure.wcs.to_header(relax=True).keys())
    for card in exposure.header.cards:
        if card.keyword not in skip and card.keyword not in wcs_keys:
            hdr.append(card)  # cards as they are: HIERARCH keys stay HIERARCH
    for key, (attr, comment) in _META_KEYS.items():
        value = getattr(exposure, attr)
        if isinstance(value, float) and not np.isfinite(value):
            continue
        if key == "MAGSYS" and not value:  # an unknown system is no card, not MAGSYS = ''
            continue
        hdr[key] = (value, comment)
    return hdr


def write_exposure(exposure: Exposure, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write an exposure as a multi-extension FITS file (IMAGE, VARIANCE, MASK).

    The observing metadata go into the primary header and the IMAGE header;
    every image HDU carries the WCS; the MASK header documents its bits.
    Written to a temporary name, then renamed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists and overwrite=False")
    meta = _meta_header(exposure)
    wcs_hdr = exposure.wcs.to_header(relax=True)
    primary = fits.PrimaryHDU(header=meta.copy())
    img_hdr = meta.copy()
    img_hdr.update(wcs_hdr)
    img_hdr["BUNIT"] = "adu"
    var_hdr = wcs_hdr.copy()
    var_hdr["BUNIT"] = "adu2"
    mask_hdr = wcs_hdr.copy()
    for key, value, comment in mask_header_cards():
        mask_hdr[key] = (value, comment)
    hdus = fits.HDUList(
        [
            primary,
            fits.ImageHDU(np.asarray(exposure.image, dtype=np.float32), header=img_hdr, name="IMAGE"),
            fits.ImageHDU(np.asarray(exposure.variance, dtype=np.float32), header=var_hdr, name="VARIANCE"),
            fits.ImageHDU(np.asarray(exposure.mask, dtype=np.int32), header=mask_hdr, name="MASK"),
        ]
    )
    with atomic_path(path) as tmp:
        _writeto(hdus, tmp, overwrite=True, output_verify="silentfix")
    return path


#: EXTNAME of a catalog's candidate table.
CATALOG_EXTNAME = "CANDIDATES"
#: EXTNAME of a catalog's table of the input files of its CCDs.
INPUTS_EXTNAME = "INPUTS"
#: Columns of the INPUTS table: the manifest fields that name a CCD's input images.
INPUT_COLUMNS = ("ccd", "search", "search_hdu", "template", "template_hdu")
#: Provenance cards of a catalog's primary header: keyword -> (provenance key, comment).
PROVENANCE_CARDS = {
    "SOFTNAME": ("software", "software that wrote this catalog"),
    "SOFTVERS": ("version", "its package version"),
    "MODE": ("mode", "pipeline mode: dia or direct"),
    "MODEL": ("model", "CNN model name or weights file"),
    "WGTSHA": ("weights_sha256", "SHA-256 of the CNN weights file"),
    "CFGHASH": ("config_hash", "science config + weights hash (run.json)"),
    "DATE": ("date", "UTC time this file was written"),
    "MANIFEST": ("manifest", "input manifest of the run"),
}
#: Header keywords :func:`write_catalog` writes itself (stale copies in a table's meta are dropped).
_CATALOG_KEYS = re.compile(r"(FLAG\d+|TCOMM\d+|EXTNAME|MAGSYS|NOISESCL|CHECKSUM|DATASUM)")


def package_version() -> str:
    """Version of the installed ``transient-pipeline`` package (``'unknown'`` if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transient-pipeline")
    except PackageNotFoundError:
        return "unknown"


def inputs_table(entries) -> Table:
    """The INPUTS table of a catalog: one row per CCD, its search and template files and HDUs.

    Parameters
    ----------
    entries : iterable of PairEntry
    """
    rows = {c: [] for c in INPUT_COLUMNS}
    for e in entries:
        for c in INPUT_COLUMNS:
            value = getattr(e, c)
            rows[c].append("" if value is None else str(value))
    table = Table()
    for c in INPUT_COLUMNS:
        width = max([1, *(len(v) for v in rows[c])])
        table[c] = np.array(rows[c], dtype=f"U{width}")
        table[c].description = {"ccd": "CCD pair identifier", "search": "search exposure file",
                                "search_hdu": "its image HDU ('' = found by name)",
                                "template": "template exposure file",
                                "template_hdu": "its image HDU ('' = found by name)"}[c]
    return table


def _set_card(header: fits.Header, key: str, value: str, comment: str) -> None:
    """``header[key] = (value, comment)``, the comment on a COMMENT card of its own when the two
    do not fit on one card (a value of 50 to 68 characters, say a SHA-256) -- never truncated."""
    if len(value) <= 68 and len(value) + len(comment) > 62:
        header[key] = value
        header.add_comment(f"{key}: {comment}")
    else:
        header[key] = (value, comment)


def _card_text(value: str, width: int = 47) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


def write_catalog(table: Table, path: str | Path, *, provenance: dict | None = None,
                  inputs: Table | None = None) -> Path:
    """Write a candidate catalog as FITS with ``CHECKSUM``/``DATASUM`` cards (atomic).

    Layout: a PRIMARY HDU whose header holds the provenance (:data:`PROVENANCE_CARDS`: software
    version, mode, model, weights SHA-256, configuration hash, date of writing, input manifest);
    HDU 1 ``CANDIDATES``, the candidate table, whose header names every flag bit
    (``FLAGn = '<name>' / <meaning>``, from :func:`pipeline.detect.flag_bits`), states the
    magnitude system (``MAGSYS``, from the table's meta; ``UNKNOWN`` when absent) and carries each
    column's description in ``TCOMMn`` (units in ``TUNITn``); and, when ``inputs`` is given,
    HDU 2 ``INPUTS`` (:func:`inputs_table`).  The checksums let :func:`read_catalog` tell a
    catalog damaged after it was written from a good one, which a successful parse alone cannot.

    Parameters
    ----------
    table : astropy.table.Table
        The candidates.
    path : path
    provenance : dict, optional
        Keys of :data:`PROVENANCE_CARDS` (``version`` defaults to :func:`package_version`,
        ``date`` to now); missing or empty ones are left out.
    inputs : Table, optional
        The INPUTS table.
    """
    from pipeline.detect import flag_bits

    primary = fits.PrimaryHDU()
    prov = {"software": "transient-pipeline", "version": package_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}
    prov.update({k: v for k, v in (provenance or {}).items() if v not in (None, "")})
    for key, (name, comment) in PROVENANCE_CARDS.items():
        if name in prov:
            _set_card(primary.header, key, str(prov[name]), comment)
    if inputs is not None:
        primary.header["NCCDS"] = (len(inputs), "CCDs in this catalog (INPUTS HDU)")
    meta_table = table.copy(copy_data=False)
    magsys = str(meta_table.meta.get("MAGSYS", "") or "UNKNOWN")
    for key in [k for k in meta_table.meta if _CATALOG_KEYS.fullmatch(str(k).upper())]:
        del meta_table.meta[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long meta keys become HIERARCH cards
        hdu = fits.table_to_hdu(meta_table)
    hdu.name = CATALOG_EXTNAME
    hdr = hdu.header
    hdr["MAGSYS"] = (magsys, "system of mag (the zero point's)")
    for bit, name, description in flag_bits():
        hdr[f"FLAG{bit}"] = (name, _card_text(description))
    for k, name in enumerate(table.colnames, start=1):
        description = getattr(table[name], "description", None)
        if description:
            hdr.insert(f"TFORM{k}", (f"TCOMM{k}", str(description)), after=True)
    hdus = [primary, hdu]
    if inputs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            inp = fits.table_to_hdu(inputs)
        inp.name = INPUTS_EXTNAME
        for k, name in enumerate(inputs.colnames, start=1):
            description = getattr(inputs[name], "description", None)
            if description:
                inp.header.insert(f"TFORM{k}", (f"TCOMM{k}", str(description)), after=True)
        hdus.append(inp)
    with atomic_path(path) as tmp:
        _writeto(fits.HDUList(hdus), tmp, checksum=True)
    return Path(path)


def _catalog_hdu(hdul: fits.HDUList) -> int:
    """Index of the candidate table: the ``CANDIDATES`` HDU, or HDU 1 of a catalog written before it had a name."""
    for i, hdu in enumerate(hdul):
        if hdu.name.upper() == CATALOG_EXTNAME:
            return i
    return 1


def _table_with_descriptions(hdu) -> Table:
    """A FITS table HDU as a Table, its ``TCOMMn`` cards back as column descriptions."""
    table = Table.read(hdu, format="fits")
    for k, name in enumerate(table.colnames, start=1):
        key = f"TCOMM{k}"
        if key in hdu.header:
            table[name].description = str(hdu.header[key])
        table.meta.pop(key, None)
    for key in ("EXTNAME", "CHECKSUM", "DATASUM"):  # the file's, not the table's
        table.meta.pop(key, None)
    return table


def read_catalog(path: str | Path, *, with_inputs: bool = False) -> Table | tuple[Table, Table | None]:
    """Read a catalog written by :func:`write_catalog`, verifying the checksums of all its HDUs.

    Column units and descriptions come back (``TUNITn``, ``TCOMMn``); the header cards of
    the candidate table (``MAGSYS``, ``FLAGn``) are in ``meta``.  Catalogs written before
    the table had an EXTNAME (HDU 1) are read too.

    Parameters
    ----------
    path : path
    with_inputs : bool
        Also return the INPUTS table (None when the catalog has none).

    Returns
    -------
    Table, or (Table, Table or None) with ``with_inputs``

    Raises
    ------
    InputError
        Missing, unreadable, or damaged (checksum mismatch) -- naming the file.
    """
    path = Path(path)
    inputs = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, checksum=True, memmap=False) as hdul:
                hdul.readall()  # every HDU's checksum is verified as it is read
                idx = _catalog_hdu(hdul)
                table = _table_with_descriptions(hdul[idx])
                if with_inputs and INPUTS_EXTNAME in [h.name.upper() for h in hdul]:
                    inputs = _table_with_descriptions(hdul[INPUTS_EXTNAME])
    except Exception as exc:  # missing, truncated, not FITS, no table HDU
        raise InputError(f"{path}: cannot read the catalog ({type(exc).__name__}: {exc})") from None
    damaged = [str(w.message) for w in caught if "verification failed" in str(w.message).lower()
               or "truncated" in str(w.message).lower()]
    if damaged:
        raise InputError(f"{path}: the catalog is damaged ({damaged[0]})")
    return (table, inputs) if with_inputs else table


# ----------------------------------------------------------------------------- stamps files

#: A CCD's stamps file is ``ccds/<ccd><STAMPS_SUFFIX>`` (next to its catalog ``ccds/<ccd>.fits``).
STAMPS_SUFFIX = "_stamps.fits"
#: EXTNAME of the stamp cube and of the id table of a stamps file.
STAMPS_EXTNAME = "STAMPS"
STAMP_IDS_EXTNAME = "IDS"


def write_stamps(stamps, ids, path: str | Path, *, bunit: str = "adu", cards: dict | None = None) -> Path:
    """Write the stamps a CCD's candidates were scored on (atomic, with checksums).

    Layout (what ``pipeline vet`` reads): HDU 0 an empty primary; HDU 1 ``STAMPS``, a float32
    image of shape ``(N, C, 51, 51)`` (NumPy order; NaN where there are no data) with
    ``CHANNELS`` (comma-separated channel names in array order) and ``BUNIT``; HDU 2 ``IDS``,
    a table with the int64 column ``id``: the catalog ``id`` of each stamp row.  Written for
    ``N = 0`` too.

    Parameters
    ----------
    stamps : pipeline.stamps.Stamps
    ids : array_like of int, length N
        Catalog ids, in stamp order.
    path : path
    bunit : str
        Unit of the pixel values.
    cards : dict, optional
        More cards for the STAMPS header: ``{key: (value, comment)}``.
    """
    data = np.asarray(stamps.data, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if data.ndim != 4 or data.shape[0] != ids.size:
        raise ValueError(f"{path}: stamps of shape {data.shape} do not match {ids.size} ids")
    if len(stamps.channels) != data.shape[1]:
        raise ValueError(f"{path}: {data.shape[1]} stamp planes but channels {stamps.channels}")
    cube = fits.ImageHDU(data, name=STAMPS_EXTNAME)
    cube.header["CHANNELS"] = (",".join(stamps.channels), "stamp planes in array order")
    cube.header["BUNIT"] = (bunit, "pixel unit")
    for key, value in (cards or {}).items():
        cube.header[key] = value
    id_hdu = fits.BinTableHDU(Table({"id": ids}), name=STAMP_IDS_EXTNAME)
    id_hdu.header.insert("TFORM1", ("TCOMM1", "catalog id of each stamp row"), after=True)
    with atomic_path(path) as tmp:
        _writeto(fits.HDUList([fits.PrimaryHDU(), cube, id_hdu]), tmp, checksum=True)
    return Path(path)


def read_stamps(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], fits.Header]:
    """Read a stamps file of :func:`write_stamps`: ``(data (N, C, S, S), ids (N,), channels, header)``.

    Raises
    ------
    InputError
        Missing, unreadable, damaged (checksum), or inconsistent (ids and stamps disagree).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, checksum=True, memmap=False) as hdul:
                hdul.readall()
                hdr = hdul[STAMPS_EXTNAME].header.copy()
                shape = tuple(int(hdr[f"NAXIS{k}"]) for k in range(int(hdr["NAXIS"]), 0, -1))
                raw = hdul[STAMPS_EXTNAME].data
                data = np.zeros(shape, np.float32) if raw is None or raw.size == 0 else np.asarray(raw, np.float32)
                ids = np.asarray(hdul[STAMP_IDS_EXTNAME].data["id"], dtype=np.int64) \
                    if hdul[STAMP_IDS_EXTNAME].data is not None else np.zeros(0, np.int64)
    except Exception as exc:
        raise InputError(f"{path}: cannot read the stamps file ({type(exc).__name__}: {exc})") from None
    damaged = [str(w.message) for w in caught if "verification failed" in str(w.message).lower()
               or "truncated" in str(w.message).lower()]
    if damaged:
        raise InputError(f"{path}: the stamps file is damaged ({damaged[0]})")
    if data.ndim != 4 or data.shape[0] != ids.size:
        raise InputError(f"{path}[{STAMPS_EXTNAME}]: stamps of shape {data.shape} but {ids.size} ids")
    channels = tuple(c for c in str(hdr.get("CHANNELS", "")).split(",") if c)
    if len(channels) != data.shape[1]:
        raise InputError(f"{path}[{STAMPS_EXTNAME}]: CHANNELS = {hdr.get('CHANNELS')!r} does not name the "
                         f"{data.shape[1]} planes")
    return data, ids, channels, hdr


# ----------------------------------------------------------------------------- reading


def _open(path: Path, role: str) -> fits.HDUList:
    if not path.exists():
        raise InputError(f"{path}: {role} file does not exist")
    try:
        # memory-mapped: each plane is converted from the mapped file into its native array in one pass
        # (:func:`_native`), instead of being read into a buffer and then byte-swapped (measured on DECam pairs in a
        # long run: 0.071-0.078 s a pair against 0.096-0.135)
        hdul = fits.open(path, memmap=True)
        hdul.verify("silentfix")
        return hdul
    except Exception as exc:  # astropy raises OSError, TypeError, ValueError...
        raise InputError(f"{path}: cannot read {role} file as FITS ({type(exc).__name__}: {exc})") from None


def _is_2d_image(hdu) -> bool:
    """An image HDU with a 2-D data part, decided from the header (without reading the data)."""
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return False
    return int(hdu.header.get("NAXIS", 0)) == 2 and all(int(hdu.header.get(f"NAXIS{i}", 0)) > 0 for i in (1, 2))


def _native(data: np.ndarray) -> np.ndarray:
    """``data`` in native byte order, without a copy where possible.

    FITS stores big-endian numbers and astropy hands them back as such; every NumPy
    operation on them pays a conversion.  A memory-mapped (or read-only) array, as
    :func:`_open` gives, is converted into a new array in one pass; an array that owns its
    (writable, in-memory) buffer -- a compressed file's, say -- is byte-swapped in place, with
    no second full-frame allocation, and viewed as native.  The result is always writable:
    :func:`read_exposure` works on it in place.
    """
    data = np.asarray(data)
    if data.dtype.isnative:
        return data if data.flags.writeable else data.copy()  # the caller works on it in place
    native = data.dtype.newbyteorder("=")
    base = data
    while isinstance(base.base, np.ndarray):
        base = base.base
    if data.flags.writeable and base.flags.owndata and not isinstance(base, np.memmap):
        return data.byteswap(inplace=True).view(native)
    return data.astype(native)


def _hdu_data(hdul: fits.HDUList, idx: int, path: Path, role: str) -> np.ndarray:
    """The data of HDU ``idx`` in native byte order (:func:`_native`); a truncated or corrupt
    data part names the file and HDU.

    The HDU forgets its data afterwards (the caller owns the array, which may have been
    byte-swapped in place; and a memory map of the file is released with it), so reading the
    same HDU twice reads the file twice.
    """
    hdu = hdul[idx]
    try:
        data = hdu.data
        if data is None:
            raise ValueError("the HDU has no data")
        data = _native(data)
    except Exception as exc:  # astropy raises ValueError, OSError, TypeError... on a short file
        label = hdu.name or str(idx)
        raise InputError(f"{path}[{label}]: cannot read the {role} data ({type(exc).__name__}: {exc}); "
                         f"the file is probably truncated or corrupt") from None
    with contextlib.suppress(AttributeError):
        del hdu.data  # its buffer is the caller's now
    return data


def _find_hdu(hdul: fits.HDUList, names: tuple[str, ...]) -> int | None:
    for i, hdu in enumerate(hdul):
        if hdu.name.upper() in names and _is_2d_image(hdu):
            return i
    return None


def _first_image_hdu(hdul: fits.HDUList) -> int | None:
    for i, hdu in enumerate(hdul):
        if _is_2d_image(hdu):
            return i
    return None


def _select(hdul: fits.HDUList, hdu: int | str | None, path: Path, role: str) -> int:
    if hdu is not None:
        try:
            idx = hdul.index_of(hdu)
            target = hdul[idx]  # an index past the end raises here, not in index_of
        except (KeyError, IndexError):
            names = [h.name for h in hdul]
            raise InputError(f"{path}: HDU {hdu!r} not found ({role}); file has HDUs {names}") from None
        if not _is_2d_image(target):
            raise InputError(f"{path}[{hdu}]: HDU holds no 2-D image ({role})")
        return idx
    idx = _find_hdu(hdul, IMAGE_HDU_NAMES)
    if idx is None:
        idx = _first_image_hdu(hdul)
    if idx is None:
        raise InputError(f"{path}: no 2-D image HDU found ({role}); HDUs are {[h.name for h in hdul]}")
    return idx


def _header_value(headers: list[fits.Header], keys: tuple[str, ...], default=None, average_pairs=True):
    """First value of ``keys`` in ``headers``; amplifier pairs (GAINA/GAINB) are averaged."""
    for hdr in headers:
        for key in keys:
            if key in hdr and hdr[key] not in (None, ""):
                if average_pairs and key.endswith("A") and key[:-1] + "B" in hdr:
                    try:
                        return 0.5 * (float(hdr[key]) + float(hdr[key[:-1] + "B"]))
                    except (TypeError, ValueError):
                        pass
                return hdr[key]
    return default


def _celestial_wcs(header: fits.Header, path: Path, hdu_label: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except Exception as exc:
            raise InputError(f"{path}[{hdu_label}]: invalid WCS ({exc})") from None
    if not wcs.has_celestial:
        raise InputError(f"{path}[{hdu_label}]: no celestial WCS in the header (need CTYPE1/2, CRVAL, CD or CDELT)")
    return wcs.celestial


#: BUNIT values (compared in lower case) of pixels in counts, to which a GAIN applies
COUNT_UNITS = ("", "adu", "adus", "count", "counts", "ct", "cts", "dn", "data number", "electron", "electrons", "e-",
               "e", "photon", "photons")


def estimate_variance(image: np.ndarray, gain: float | None, read_noise: float, *, cell: int = 64) -> np.ndarray:
    """Per-pixel variance of a bare image [image units^2].

    The sky noise is measured from the image itself and allowed to vary over it
    (:func:`sky_variance_map`: the sigma-clipped MAD of the pixels in cells of ``cell`` px, sources
    clipped, so that sky-subtracted and crowded images work).  With a ``gain`` (image in counts),
    as HOTPANTS does: at least the read noise, plus the sources' Poisson variance
    ``(image - sky) / gain``.

    With ``gain=None`` (no usable GAIN: no keyword, or pixels not in counts such as JWST's MJy/sr),
    the sky noise only.  Without a gain the sources' Poisson
    variance cannot be told from the data of one image, so it is left out: the variance is right on
    the sky (where detection thresholds matter) and too small on bright sources, whose significance
    is then overestimated.
    """
    sky_var = sky_variance_map(image, cell=cell)
    if gain is None:
        return sky_var
    finite = np.isfinite(image)
    sample = image[finite][:: max(1, finite.sum() // 200_000)]
    sky = float(np.median(sample))
    floor = (read_noise / gain) ** 2 if gain > 0 else 0.0
    np.maximum(sky_var, np.float32(floor), out=sky_var)
    sky_var += (np.clip(np.nan_to_num(image - sky), 0, None) / max(gain, 1e-12)).astype(np.float32)
    return sky_var


def sky_variance_map(image: np.ndarray, *, cell: int = 64, clip: float = 3.0) -> np.ndarray:
    """Sky variance of an image from its own pixels, per cell (see :func:`estimate_variance` with ``gain=None``).

    Sources are left out where the image smoothed by a 1.5 px Gaussian is above 3 x its robust noise
    (grown by 4 px; faint wings and halos); each cell's noise is then the MAD of its finite pixels (at
    most ~32 x 32 samples per cell), iterated three times with pixels beyond ``clip`` x that noise of the
    median left out; cells with fewer than 16 samples take the median of the others.  float32, the
    image's shape.
    """
    import scipy.ndimage

    ny, nx = image.shape
    cell = int(max(8, min(cell, ny, nx)))
    step = max(1, cell // 32)
    sub = np.asarray(image[::step, ::step], dtype=np.float64)
    # faint source light (wings, halos) is below any per-pixel clip: left out where the image smoothed by a
    # 1.5 px Gaussian is above 3 x its own robust noise, grown by 4 px
    finite = np.isfinite(sub)
    if finite.sum() > 100:
        level = float(np.median(sub[finite]))
        smooth = scipy.ndimage.gaussian_filter(np.where(finite, sub - level, 0.0), 1.5 / step)
        s_noise = 1.4826 * float(np.median(np.abs(smooth[finite] - np.median(smooth[finite]))))
        if s_noise > 0:
            sources = scipy.ndimage.binary_dilation(smooth > np.median(smooth[finite]) + 3 * s_noise,
                                                    iterations=max(1, 4 // step))
            if (finite & ~sources).sum() > 0.2 * finite.sum():
                sub = np.where(sources, np.nan, sub)
    b = -(-cell // step)
    by, bx = -(-sub.shape[0] // b), -(-sub.shape[1] // b)
    cells = np.full((by * b, bx * b), np.nan)
    cells[: sub.shape[0], : sub.shape[1]] = np.where(np.isfinite(sub), sub, np.nan)
    cells = cells.reshape(by, b, bx, b).transpose(0, 2, 1, 3).reshape(by, bx, b * b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells
        for _ in range(3):
            med = np.nanmedian(cells, axis=-1, keepdims=True)
            sig = 1.4826 * np.nanmedian(np.abs(cells - med), axis=-1, keepdims=True)
            cells = np.where(np.abs(cells - med) <= clip * sig, cells, np.nan)
        # (clipping a Gaussian at 3 sigma lowers its MAD by ~0.3% per pass: left as is)
        sig = 1.4826 * np.nanmedian(np.abs(cells - np.nanmedian(cells, axis=-1, keepdims=True)), axis=-1)
    n = np.isfinite(cells).sum(axis=-1)
    ok = (n >= 16) & np.isfinite(sig) & (sig > 0)
    if not ok.any():
        raise ValueError("sky_variance_map: no cell with enough finite pixels to measure the sky noise")
    sig = np.where(ok, sig, np.median(sig[ok]))
    if min(by, bx) >= 3:
        sig = scipy.ndimage.median_filter(sig, size=3, mode="nearest")
    var = sig**2
    full = scipy.ndimage.zoom(var, (ny / by, nx / bx), order=1, mode="nearest", grid_mode=True)
    out = np.empty((ny, nx), np.float32)
    out[...] = full[:ny, :nx] if full.shape[0] >= ny and full.shape[1] >= nx else np.median(var)
    return out


def observation_mjd(headers) -> tuple[float, str]:
    """MJD (UTC) of an exposure from its header(s), and where it came from.

    ``MJD-OBS`` if present, else ``DATE-OBS`` (ISO date and time; a date alone is completed
    with ``TIME-OBS`` or ``UTC-OBS`` when present) converted with :mod:`astropy.time` in the
    ``TIMESYS`` scale (default UTC).  Returns ``(nan, reason)`` when neither card is usable.

    Parameters
    ----------
    headers : astropy.io.fits.Header or list of them
        Searched in order (image HDU first, then the primary header).
    """
    from astropy.time import Time

    if isinstance(headers, fits.Header):
        headers = [headers]
    for hdr in headers:
        value = hdr.get("MJD-OBS")
        if value not in (None, ""):
            try:
                mjd = float(value)
            except (TypeError, ValueError):
                continue
            if np.isfinite(mjd):
                return mjd, "MJD-OBS"
    for hdr in headers:
        date = hdr.get("DATE-OBS")
        if not isinstance(date, str) or not date.strip():
            continue
        date = date.strip()
        if "T" not in date:
            clock = hdr.get("TIME-OBS", hdr.get("UTC-OBS"))
            if isinstance(clock, str) and clock.strip():
                date = f"{date}T{clock.strip()}"
        scale = str(hdr.get("TIMESYS", "UTC")).strip().lower() or "utc"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ERFA's "dubious year" for far dates
                t = Time(date, format="isot" if "T" in date else None, scale=scale)
                mjd = float(t.utc.mjd)
        except Exception:
            continue
        if np.isfinite(mjd):
            return mjd, f"DATE-OBS ({scale.upper()})"
    return float("nan"), "unknown (no usable MJD-OBS or DATE-OBS keyword)"


def read_exposure(
    path: str | Path,
    *,
    hdu: int | str | None = None,
    mask_path: str | Path | None = None,
    weight_path: str | Path | None = None,
    variance_path: str | Path | None = None,
    name: str | None = None,
) -> Exposure:
    """Read an exposure from FITS in any of the module's layouts.

    Parameters
    ----------
    path : path
        Image file (multi-extension or bare).
    hdu : int or str, optional
        Image HDU (index or EXTNAME); also the extension read from
        ``mask_path``/``weight_path``/``variance_path`` when they are
        multi-extension files.  Default: ``IMAGE``/``SCI`` or the first 2-D HDU.
    mask_path, weight_path, variance_path : path, optional
        Separate mask (non-zero = bad), inverse-variance weight, or variance files.
    name : str, optional
        Identifier; default ``path[hdu]``.

    Returns
    -------
    Exposure

    Raises
    ------
    InputError
        Unreadable file, missing HDU, no celestial WCS, all-NaN image, shapes
        that disagree -- always naming the file and HDU.
    """
    path = Path(path)
    hdul = _open(path, "image")
    with hdul:
        idx = _select(hdul, hdu, path, "image")
        img_hdu = hdul[idx]
        label = img_hdu.name or str(idx)
        image = _hdu_data(hdul, idx, path, "image").astype(np.float32, copy=False)
        headers = [img_hdu.header, hdul[0].header]
        bad = ~np.isfinite(image)
        if bad.all():
            raise InputError(f"{path}[{label}]: image has no finite pixels (all NaN/inf)")
        wcs = _celestial_wcs(img_hdu.header, path, label)

        provenance: dict[str, str] = {}

        def number(keys, default, what=None):
            value = _header_value(headers, keys, None)
            if what is not None:
                found = next((k for h in headers for k in keys if k in h and h[k] not in (None, "")), None)
                provenance[what] = found if found else f"default {default} (no {'/'.join(keys)} keyword)"
            if value is None:
                return default
            try:
                return float(value)
            except (TypeError, ValueError):
                raise InputError(f"{path}[{label}]: header keyword {'/'.join(keys)} = {value!r} "
                                 "is not a number") from None

        gain = number(("GAIN", "GAINA", "EGAIN"), 1.0, "gain")
        read_noise = number(("RDNOISE", "RDNOISEA", "READNOIS", "RON"), 0.0)
        saturation = number(("SATURATE", "SATURATA", "SATURATB", "SATLEVEL"), np.inf)
        if not gain > 0:
            raise InputError(f"{path}[{label}]: GAIN = {gain} must be positive (electrons per ADU)")

        variance = None
        mask = None
        var_idx = _find_hdu(hdul, VARIANCE_HDU_NAMES) if variance_path is None and weight_path is None else None
        wht_idx = _find_hdu(hdul, WEIGHT_HDU_NAMES) if variance_path is None and weight_path is None else None
        if var_idx is not None:
            variance = _plane(hdul, var_idx, image.shape, path, "variance").astype(np.float32, copy=False)
            provenance["variance"] = f"{hdul[var_idx].name} HDU"
        elif wht_idx is not None:
            variance = _weight_to_variance(_plane(hdul, wht_idx, image.shape, path, "weight"))
            provenance["variance"] = f"inverse of the {hdul[wht_idx].name} HDU"
        msk_idx = _find_hdu(hdul, MASK_HDU_NAMES) if mask_path is None else None
        own_mask = msk_idx is not None and hdul[msk_idx].header.get("MP_BAD") is not None
        if msk_idx is not None:
            mask = _plane(hdul, msk_idx, image.shape, path, "mask")
        meta_hdr = img_hdu.header.copy()

    if variance_path is not None:
        variance = _read_plane(Path(variance_path), hdu, image.shape, "variance").astype(np.float32, copy=False)
        provenance["variance"] = f"file {variance_path}"
    elif weight_path is not None:
        variance = _weight_to_variance(_read_plane(Path(weight_path), hdu, image.shape, "weight"))
        provenance["variance"] = f"inverse of weight file {weight_path}"
    if mask_path is not None:
        mask = _read_plane(Path(mask_path), hdu, image.shape, "mask")
        own_mask = False

    # The planes read above are this function's own native arrays (_hdu_data): they are
    # worked on in place, with no full-frame copy and no float64 temporary.
    if mask is not None and own_mask and mask.dtype == np.int32:
        out_mask = mask  # our own bits, already int32: used as they are
    else:
        out_mask = np.zeros(image.shape, dtype=np.int32)
        if mask is not None:
            if mask.dtype.kind not in "iub":  # a float plane: NaN counts as bad, values truncated to integers
                mask = np.nan_to_num(mask, nan=1).astype(np.int64)
            if own_mask:
                out_mask |= mask.astype(np.int32, copy=False)
            else:  # foreign data-quality plane: any non-zero value is a bad pixel
                out_mask[mask != 0] |= MaskBits.BAD
    mask = None
    if np.isfinite(saturation):
        np.bitwise_or(out_mask, np.int32(MaskBits.SAT), out=out_mask, where=image >= saturation)
    if variance is None:
        unit = str(_header_value(headers, ("BUNIT",), "") or "").strip()
        counts = unit.lower() in COUNT_UNITS
        if counts and not provenance["gain"].startswith("default"):
            variance = estimate_variance(image, gain, read_noise)
            provenance["variance"] = "estimated from the image, GAIN and RDNOISE"
        else:
            variance = estimate_variance(image, None, read_noise)
            why = f"BUNIT = {unit!r} is not in counts" if not counts else "no GAIN keyword"
            provenance["variance"] = (f"sky only, measured from the image (clipped MAD per 64 px cell; {why}, so "
                                      "no source Poisson term)")
    bad |= ~np.isfinite(variance)
    bad |= variance <= 0
    np.bitwise_or(out_mask, np.int32(MaskBits.NO_DATA), out=out_mask, where=bad)
    any_bad = bool(bad.any())
    if any_bad and bad.all():
        raise InputError(f"{path}[{label}]: no usable pixels (all NaN or zero weight)")
    flagged = int(MaskBits.SAT | MaskBits.BAD)
    sparse = (slice(None, None, 7), slice(None, None, 7))  # a usable pixel is usually found in a sparse look
    if not ((~bad[sparse] & ((out_mask[sparse] & flagged) == 0)).any()
            or (~bad & ((out_mask & flagged) == 0)).any()):
        n = image.size
        sat = int(((out_mask & int(MaskBits.SAT)) != 0).sum())
        badpix = int(((out_mask & int(MaskBits.BAD)) != 0).sum())
        raise InputError(f"{path}[{label}]: no usable pixels: {sat / n:.0%} at or above the saturation level "
                         f"(SATURATE = {saturation:g} ADU), {badpix / n:.0%} flagged bad by the mask")
    if any_bad:  # no data: image 0, variance the largest good one
        image[bad] = 0.0
        variance[bad] = np.max(variance, where=~bad, initial=-np.inf)
    del bad

    def meta(keys, default, cast=str):
        value = _header_value(headers, keys, default)
        return default if value is None else cast(value)

    if min(image.shape) < MIN_IMAGE_SIDE:  # last, so that the other checks keep their own messages
        raise InputError(f"{path}[{label}]: image is {image.shape[0]} x {image.shape[1]} pixels, smaller than "
                         f"one {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} candidate stamp")
    fwhm = number(("FWHM", "PSF_FWHM", "FWHMPIX"), float("nan"), "fwhm")
    if np.isfinite(fwhm) and fwhm <= 0:
        raise InputError(f"{path}[{label}]: FWHM = {fwhm} must be a positive number of pixels (or absent)")
    zero_point = number(("MAGZERO", "MAGZPT", "ZP", "PHOTZP", "MAGZP"), 25.0, "zero_point")
    if not np.isfinite(zero_point):
        raise InputError(f"{path}[{label}]: zero point {zero_point} is not finite")
    mjd, provenance["mjd"] = observation_mjd(headers)
    return Exposure(
        image=image,
        variance=variance.astype(np.float32, copy=False),
        mask=out_mask,
        wcs=wcs,
        fwhm=fwhm,
        gain=gain,
        read_noise=read_noise,
        saturation=saturation,
        zero_point=zero_point,
        band=meta(("BAND", "FILTER"), "", str).split(" ")[0],
        exptime=number(("EXPTIME", "EXPOSURE"), 1.0),
        mjd=mjd,
        mag_system=meta(("MAGSYS", "PHOTSYS"), "", str).strip(),
        sky_level=number(("SKYLEVEL", "AVSKY", "SKYBRITE"), 0.0),
        instrument=meta(("INSTRUME",), "", str),
        name=name or f"{path.name}[{label}]",
        ccd=meta(("CCDNAME", "CCDNUM", "DETPOS"), "", str),
        header=meta_hdr,
        provenance=provenance,
    )


def _plane(hdul: fits.HDUList, idx: int, shape, path: Path, role: str) -> np.ndarray:
    data = _hdu_data(hdul, idx, path, role)
    if data.shape != shape:
        raise InputError(f"{path}[{hdul[idx].name or idx}]: {role} plane has shape {data.shape}, image has {shape}")
    return data


def _read_plane(path: Path, hdu, shape, role: str) -> np.ndarray:
    hdul = _open(path, role)
    with hdul:
        idx = _select(hdul, hdu, path, role) if hdu is not None else _first_image_hdu(hdul)
        if idx is None:
            raise InputError(f"{path}: no 2-D {role} HDU found")
        return _plane(hdul, idx, shape, path, role)


def _weight_to_variance(weight: np.ndarray) -> np.ndarray:
    """``1 / weight`` as float32 variance, ``inf`` where the weight is not positive.

    A float32 weight is inverted in float32 (IEEE division correctly rounded: the same
    numbers as dividing in float64 and rounding), other types in float64.
    """
    weight = np.asarray(weight)
    if weight.dtype != np.float32:
        weight = weight.astype(np.float64)
    var = np.full(weight.shape, np.inf, dtype=weight.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(1.0, weight, out=var, where=weight > 0)
    return var.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- manifests

#: Manifest columns: required ones first.  Paths are relative to the manifest's folder.
MANIFEST_COLUMNS = {
    "ccd": "CCD pair identifier (unique in the manifest)",
    "search": "search exposure FITS file",
    "template": "template exposure FITS file",
    "truth": "(optional) truth table (ECSV) on the search grid",
    "search_hdu": "(optional) HDU of the search image (index or EXTNAME)",
    "template_hdu": "(optional) HDU of the template image",
    "search_mask": "(optional) separate search mask file (non-zero = bad)",
    "search_weight": "(optional) separate search inverse-variance file",
    "template_mask": "(optional) separate template mask file",
    "template_weight": "(optional) separate template inverse-variance file",
    "search_variance": "(optional) separate search variance file (instead of a weight file)",
    "template_variance": "(optional) separate template variance file (instead of a weight file)",
}


@dataclasses.dataclass(frozen=True)
class PairEntry:
    """One row of a manifest: a search/template pair of one CCD, with absolute paths."""

    ccd: str
    search: Path
    template: Path
    truth: Path | None = None
    search_hdu: str | None = None
    template_hdu: str | None = None
    search_mask: Path | None = None
    search_weight: Path | None = None
    template_mask: Path | None = None
    template_weight: Path | None = None
    search_variance: Path | None = None
    template_variance: Path | None = None
    manifest: Path | None = dataclasses.field(default=None, compare=False)
    """The manifest the row was read from (recorded in the catalogs; not an input of the CCD)."""

    def load(self) -> tuple[Exposure, Exposure]:
        """Read the search and template exposures."""

        def hdu(value):
            if value is None:
                return None
            return int(value) if str(value).isdigit() else str(value)

        search = read_exposure(self.search, hdu=hdu(self.search_hdu), mask_path=self.search_mask,
                               weight_path=self.search_weight, variance_path=self.search_variance)
        template = read_exposure(self.template, hdu=hdu(self.template_hdu), mask_path=self.template_mask,
                                 weight_path=self.template_weight, variance_path=self.template_variance)
        if not search.ccd:
            search.ccd = self.ccd
        return search, template


def read_manifest(path: str | Path) -> list[PairEntry]:
    """Read a manifest (ECSV, or any table astropy reads) of search/template pairs.

    Required columns: ``ccd``, ``search``, ``template``; optional ones are
    listed in :data:`MANIFEST_COLUMNS`.  Relative paths are taken relative to
    the manifest's folder.  Empty or masked optional cells mean "absent".
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: manifest does not exist")
    try:
        table = Table.read(path, format="ascii.ecsv") if path.suffix == ".ecsv" else Table.read(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read manifest ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("ccd", "search", "template") if c not in table.colnames]
    if missing:
        raise InputError(f"{path}: manifest lacks required column(s) {missing}; has {table.colnames}")
    unknown = [c for c in table.colnames if c not in MANIFEST_COLUMNS]
    if len(table) == 0:
        raise InputError(f"{path}: manifest has no rows (no CCD pairs to process)")
    base = path.parent
    entries = []
    seen: dict[str, int] = {}
    problems = []
    for line, row in enumerate(table, start=1):
        def cell(name, row=row):
            if name not in table.colnames:
                return None
            value = row[name]
            if np.ma.is_masked(value) or str(value).strip() in ("", "--", "None"):
                return None
            return str(value).strip()

        def as_path(name):
            value = cell(name)
            if value is None:
                return None
            p = Path(value)
            return p if p.is_absolute() else base / p

        ccd = cell("ccd")
        problem = _ccd_id_problem(ccd, seen, line)
        if problem:
            problems.append(f"row {line}: {problem}")
            continue
        for role in ("search", "template"):
            if cell(role) is None:
                problems.append(f"row {line} (ccd {ccd!r}): no {role} file")
        entries.append(
            PairEntry(
                ccd=ccd, search=as_path("search"), template=as_path("template"), truth=as_path("truth"),
                search_hdu=cell("search_hdu"), template_hdu=cell("template_hdu"),
                search_mask=as_path("search_mask"), search_weight=as_path("search_weight"),
                template_mask=as_path("template_mask"), template_weight=as_path("template_weight"),
                search_variance=as_path("search_variance"), template_variance=as_path("template_variance"),
                manifest=path.resolve(),
            )
        )
    if problems:
        raise InputError(f"{path}: bad manifest row(s): " + "; ".join(problems[:10])
                         + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown manifest column(s) {unknown}", stacklevel=2)
    return entries


def _ccd_id_problem(ccd, seen: dict[str, int], position: int) -> str | None:
    """What is wrong with the id at ``position`` (unsafe, or a repeat ignoring case), else None.

    ``seen`` maps the lower-cased ids accepted so far to their positions and is updated.
    """
    try:
        validate_ccd_id(ccd)
    except InputError as exc:
        return str(exc)
    if ccd.lower() in seen:  # case-insensitive: the per-CCD files must not collide on any file system
        return f"ccd {ccd!r} repeats row {seen[ccd.lower()]} (identifiers must be unique, ignoring case)"
    seen[ccd.lower()] = position
    return None


def check_ccd_ids(ids) -> None:
    """Raise :class:`InputError` unless ``ids`` is a non-empty list of safe ids, unique ignoring case."""
    ids = list(ids)
    if not ids:
        raise InputError("no CCD pairs to process (the manifest is empty)")
    seen: dict[str, int] = {}
    problems = [f"CCD {k}: {p}" for k, ccd in enumerate(ids, start=1) if (p := _ccd_id_problem(ccd, seen, k))]
    stem = STAMPS_SUFFIX.removesuffix(".fits")
    for k, ccd in enumerate(ids, start=1):  # ccds/<a>_stamps.fits is CCD a's stamps: no CCD may be named so
        if isinstance(ccd, str) and ccd.lower().endswith(stem) and ccd.lower().removesuffix(stem) in seen:
            problems.append(f"CCD {k}: ccd {ccd!r} would overwrite the stamps file of CCD "
                            f"{ids[seen[ccd.lower().removesuffix(stem)] - 1]!r} (ccds/<ccd>{STAMPS_SUFFIX})")
    if problems:
        raise InputError("bad CCD identifier(s): " + "; ".join(problems[:10]))


def validate_ccd_id(ccd) -> str:
    """Return ``ccd`` if it is a safe CCD identifier, else raise :class:`InputError`.

    A CCD identifier becomes file names under the output folder (``ccds/<ccd>.fits``), so it
    must be a plain name (:data:`CCD_ID_PATTERN`, at most :data:`CCD_ID_MAX_LENGTH` characters):
    no path separators, no ``..``, no leading dot or dash, no spaces or control characters.
    """
    if not isinstance(ccd, str) or not ccd:
        raise InputError(f"ccd identifier must be a non-empty string, got {ccd!r}")
    if len(ccd) > CCD_ID_MAX_LENGTH:
        raise InputError(f"ccd identifier {ccd[:20]!r}... is {len(ccd)} characters long; at most "
                         f"{CCD_ID_MAX_LENGTH} allowed")
    if not CCD_ID_PATTERN.fullmatch(ccd) or ".." in ccd:
        raise InputError(f"ccd identifier {ccd!r} is not a plain file name: use letters, digits and . _ + - "
                         f"(not starting with . or -, no '..', no '/' or spaces)")
    return ccd


def _summary_cards(obj, prefix: str, max_items: int = 16) -> list[tuple[str, Any]]:
    """Scalar fields of a (dataclass) result as ``HIERARCH`` cards, nothing truncated.

    Nested dataclasses and dicts become longer keys (``DIA FIT REJECTED EDGE``), short
    sequences one card per element (``DIA KERNEL SIGMAS 1``); floats keep full precision and
    long strings continue on CONTINUE cards.  Arrays longer than ``max_items`` (the kernel
    basis images and coefficients) are not header material and are left out; non-finite
    floats are left out too (FITS headers cannot hold them).
    """
    cards: list[tuple[str, Any]] = []
    if obj is None:
        return cards
    if dataclasses.is_dataclass(obj):
        items = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif isinstance(obj, dict):
        items = dict(obj)
    else:
        return cards
    for key, value in items.items():
        name = f"{prefix} {str(key).upper()}"
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            cards += _summary_cards(value, name, max_items)
            continue
        if isinstance(value, np.ndarray):
            if value.size > max_items:
                continue
            value = value.ravel().tolist()
        if isinstance(value, (tuple, list)):
            if len(value) <= max_items and all(isinstance(v, (int, float, np.number, str, bool)) for v in value):
                cards += _summary_cards({str(i + 1): v for i, v in enumerate(value)}, name, max_items)
            continue
        if isinstance(value, (bool, np.bool_)):
            cards.append((f"HIERARCH {name}", bool(value)))
        elif isinstance(value, (int, np.integer)):
            cards.append((f"HIERARCH {name}", int(value)))
        elif isinstance(value, (float, np.floating)):
            if np.isfinite(value):
                cards.append((f"HIERARCH {name}", float(value)))
        elif isinstance(value, str):
            cards.append((f"HIERARCH {name}", value))
    return cards


def write_difference(difference, search: Exposure, path: str | Path, *, template_fwhm: float | None = None,
                     template_fwhm_source: str | None = None, registration=None) -> Path:
    """Write a difference image (IMAGE, VARIANCE, MASK on the search WCS) with the kernel summary.

    The header carries the search exposure's metadata, which image was convolved and the
    PSF FWHMs (search pixels) of both images and of the convolved one, and the scalar fields
    of the kernel solution and fit statistics as ``HIERARCH DIA ...`` cards (none truncated).
    Atomic.

    Parameters
    ----------
    difference : dia.Difference
    search : Exposure
        The search exposure (its WCS and metadata are the difference's).
    path : path
    template_fwhm : float, optional
        The template's FWHM in search pixels (``AlignedPair.template.fwhm``).
    template_fwhm_source : str, optional
        Where the template's FWHM came from (its ``provenance["fwhm"]``); written as ``TFWHMSRC``
        beside ``SFWHMSRC``, the search's.
    registration : pipeline.align.RegistrationCheck, optional
        The alignment's registration check: the template's measured shift against its WCS and whether
        it was applied (``REGSHFTX``, ``REGSHFTY``, ``REGSHFTE``, ``REGAPPLD``, ``REGNSTAR``).
    """
    diff = difference.to_numpy() if hasattr(difference, "to_numpy") else difference
    exposure = dataclasses.replace(
        search, image=np.asarray(diff.image, np.float32), variance=np.asarray(diff.variance, np.float32),
        mask=np.asarray(diff.mask, np.int32), name=f"difference of {search.name}", header=search.header.copy(),
    )
    hdr = exposure.header
    hdr["IMAGETYP"] = ("difference", "search minus PSF-matched template")
    hdr["CONVOLV"] = (str(diff.convolved), "which image was convolved with the kernel")
    fwhms = {"search": float(search.fwhm),
             "template": float(template_fwhm) if template_fwhm is not None else float("nan")}
    for key, value, comment in (("SFWHM", fwhms["search"], "[pix] search PSF FWHM"),
                                ("TFWHM", fwhms["template"], "[pix] template FWHM, search px"),
                                ("CONVFWHM", fwhms.get(str(diff.convolved), float("nan")),
                                 "[pix] FWHM of the convolved image")):
        if np.isfinite(value):
            hdr[key] = (value, comment)
    hdr["DECORREL"] = (bool(getattr(diff, "decorrelated", False)), "noise decorrelation applied")
    if registration is not None and registration.n_shift:
        hdr["REGSHFTX"] = (round(float(registration.shift_x_px), 4), "[pix] template shift vs its WCS, x")
        hdr["REGSHFTY"] = (round(float(registration.shift_y_px), 4), "[pix] template shift vs its WCS, y")
        hdr["REGSHFTE"] = (round(float(registration.shift_err_px), 4), "[pix] standard error of the shift")
        hdr["REGNSTAR"] = (int(registration.n_shift), "stars the shift was measured on")
        hdr["REGAPPLD"] = (bool(registration.applied), "shift added to the template WCS CRPIX")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long keys become HIERARCH cards
        for key, source, comment in (("SFWHMSRC", search.provenance.get("fwhm"), "SFWHM source"),
                                     ("TFWHMSRC", template_fwhm_source, "TFWHM source")):
            if source:
                hdr[key] = (str(source), comment)  # long values continue on CONTINUE cards
        for key, value in _summary_cards(getattr(diff, "solution", None), "DIA KERNEL") + \
                _summary_cards(getattr(diff, "stats", None), "DIA FIT"):
            hdr[key] = value
    return write_exposure(exposure, path)
