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
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from dia.masks import MaskBits, mask_header_cards

__all__ = [
    "Exposure",
    "InputError",
    "read_exposure",
    "write_exposure",
    "atomic_path",
    "read_manifest",
    "PairEntry",
    "MANIFEST_COLUMNS",
    "write_difference",
]

IMAGE_HDU_NAMES = ("IMAGE", "SCI", "SCIENCE")
VARIANCE_HDU_NAMES = ("VARIANCE", "VAR")
WEIGHT_HDU_NAMES = ("WEIGHT", "WHT", "IVAR", "INVVAR")
MASK_HDU_NAMES = ("MASK", "DQ", "BPM", "FLAGS")


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
    sky_level: float = 0.0
    instrument: str = ""
    name: str = ""
    ccd: str = ""
    header: fits.Header = dataclasses.field(default_factory=fits.Header)

    def __post_init__(self) -> None:
        shapes = {"image": self.image.shape, "variance": self.variance.shape, "mask": self.mask.shape}
        if len(set(shapes.values())) != 1 or len(self.image.shape) != 2:
            raise InputError(f"{self.name or 'exposure'}: planes must be 2-D and agree in shape, got {shapes}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the pixel grid."""
        return self.image.shape  # type: ignore[return-value]

    def flux_to_mag(self, flux: np.ndarray | float) -> np.ndarray:
        """Magnitude of a flux in ADU on this exposure's zero point."""
        return self.zero_point - 2.5 * np.log10(np.asarray(flux, dtype=float))

    def mag_to_flux(self, mag: np.ndarray | float) -> np.ndarray:
        """Flux in ADU of a magnitude on this exposure's zero point."""
        return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - self.zero_point))


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Nothing is left half-written: on error the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_META_KEYS = {
    "GAIN": ("gain", "[e-/ADU] gain"),
    "RDNOISE": ("read_noise", "[e-] read noise"),
    "SATURATE": ("saturation", "[ADU] saturation level"),
    "MAGZERO": ("zero_point", "[mag] mag = MAGZERO - 2.5 log10(ADU)"),
    "FWHM": ("fwhm", "[pix] PSF FWHM"),
    "SKYLEVEL": ("sky_level", "[ADU] mean sky level"),
    "EXPTIME": ("exptime", "[s] exposure time"),
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
        hdus.writeto(tmp, overwrite=True, output_verify="silentfix")
    return path


# ----------------------------------------------------------------------------- reading


def _open(path: Path, role: str) -> fits.HDUList:
    if not path.exists():
        raise InputError(f"{path}: {role} file does not exist")
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
        return hdul
    except Exception as exc:  # astropy raises OSError, TypeError, ValueError...
        raise InputError(f"{path}: cannot read {role} file as FITS ({type(exc).__name__}: {exc})") from None


def _find_hdu(hdul: fits.HDUList, names: tuple[str, ...]) -> int | None:
    for i, hdu in enumerate(hdul):
        if hdu.name.upper() in names and hdu.data is not None:
            return i
    return None


def _first_image_hdu(hdul: fits.HDUList) -> int | None:
    for i, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and hdu.data is not None:
            if hdu.data.ndim == 2:
                return i
    return None


def _select(hdul: fits.HDUList, hdu: int | str | None, path: Path, role: str) -> int:
    if hdu is not None:
        try:
            idx = hdul.index_of(hdu)
        except (KeyError, IndexError):
            names = [h.name for h in hdul]
            raise InputError(f"{path}: HDU {hdu!r} not found ({role}); file has HDUs {names}") from None
        if hdul[idx].data is None or hdul[idx].data.ndim != 2:
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


def estimate_variance(image: np.ndarray, gain: float, read_noise: float) -> np.ndarray:
    """Per-pixel variance (ADU^2) of a bare image, as HOTPANTS estimates it.

    Sky noise is measured robustly (MAD) so that sky-subtracted images work;
    sources add their Poisson variance ``(image - sky) / gain``.
    """
    finite = np.isfinite(image)
    sample = image[finite][:: max(1, finite.sum() // 200_000)]
    sky = float(np.median(sample))
    sky_var = float((1.4826 * np.median(np.abs(sample - sky))) ** 2)
    floor = (read_noise / gain) ** 2 if gain > 0 else 0.0
    sky_var = max(sky_var, floor)
    source = np.clip(np.nan_to_num(image - sky), 0, None) / max(gain, 1e-12)
    return (sky_var + source).astype(np.float32)


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
        image = np.asarray(img_hdu.data, dtype=np.float32)
        headers = [img_hdu.header, hdul[0].header]
        if not np.isfinite(image).any():
            raise InputError(f"{path}[{label}]: image has no finite pixels (all NaN/inf)")
        wcs = _celestial_wcs(img_hdu.header, path, label)

        gain = float(_header_value(headers, ("GAIN", "GAINA", "EGAIN"), 1.0))
        read_noise = float(_header_value(headers, ("RDNOISE", "RDNOISEA", "READNOIS", "RON"), 0.0))
        saturation = float(_header_value(headers, ("SATURATE", "SATURATA", "SATURATB", "SATLEVEL"), np.inf))

        variance = None
        mask = None
        var_idx = _find_hdu(hdul, VARIANCE_HDU_NAMES) if variance_path is None and weight_path is None else None
        wht_idx = _find_hdu(hdul, WEIGHT_HDU_NAMES) if variance_path is None and weight_path is None else None
        if var_idx is not None:
            variance = _plane(hdul, var_idx, image.shape, path, "variance").astype(np.float32)
        elif wht_idx is not None:
            variance = _weight_to_variance(_plane(hdul, wht_idx, image.shape, path, "weight"))
        msk_idx = _find_hdu(hdul, MASK_HDU_NAMES) if mask_path is None else None
        own_mask = msk_idx is not None and hdul[msk_idx].header.get("MP_BAD") is not None
        if msk_idx is not None:
            mask = _plane(hdul, msk_idx, image.shape, path, "mask")
        meta_hdr = img_hdu.header.copy()

    if variance_path is not None:
        variance = _read_plane(Path(variance_path), hdu, image.shape, "variance").astype(np.float32)
    elif weight_path is not None:
        variance = _weight_to_variance(_read_plane(Path(weight_path), hdu, image.shape, "weight"))
    if mask_path is not None:
        mask = _read_plane(Path(mask_path), hdu, image.shape, "mask")
        own_mask = False

    out_mask = np.zeros(image.shape, dtype=np.int32)
    if mask is not None:
        mask = np.nan_to_num(np.asarray(mask), nan=1).astype(np.int64)
        if own_mask:
            out_mask |= mask.astype(np.int32)
        else:  # foreign data-quality plane: any non-zero value is a bad pixel
            out_mask[mask != 0] |= MaskBits.BAD
    bad = ~np.isfinite(image)
    if np.isfinite(saturation):
        out_mask[image >= saturation] |= MaskBits.SAT
    if variance is None:
        variance = estimate_variance(image, gain, read_noise)
    bad |= ~np.isfinite(variance) | (variance <= 0)
    out_mask[bad] |= MaskBits.NO_DATA
    image = np.where(bad, 0.0, image).astype(np.float32)
    variance = np.where(bad, np.float32(np.nanmax(np.where(bad, np.nan, variance)) if (~bad).any() else 1.0), variance)
    if not (~bad).any():
        raise InputError(f"{path}[{label}]: no usable pixels (all NaN or zero weight)")

    def meta(keys, default, cast=float):
        value = _header_value(headers, keys, default)
        try:
            return cast(value)
        except (TypeError, ValueError):
            return default

    return Exposure(
        image=image,
        variance=variance.astype(np.float32),
        mask=out_mask,
        wcs=wcs,
        fwhm=meta(("FWHM", "PSF_FWHM", "FWHMPIX"), float("nan")),
        gain=gain,
        read_noise=read_noise,
        saturation=saturation,
        zero_point=meta(("MAGZERO", "MAGZPT", "ZP", "PHOTZP", "MAGZP"), 25.0),
        band=meta(("BAND", "FILTER"), "", str).split(" ")[0],
        exptime=meta(("EXPTIME", "EXPOSURE"), 1.0),
        sky_level=meta(("SKYLEVEL", "AVSKY", "SKYBRITE"), 0.0),
        instrument=meta(("INSTRUME",), "", str),
        name=name or f"{path.name}[{label}]",
        ccd=meta(("CCDNAME", "CCDNUM", "DETPOS"), "", str),
        header=meta_hdr,
    )


def _plane(hdul: fits.HDUList, idx: int, shape, path: Path, role: str) -> np.ndarray:
    data = hdul[idx].data
    if data is None or data.shape != shape:
        got = None if data is None else data.shape
        raise InputError(f"{path}[{hdul[idx].name or idx}]: {role} plane has shape {got}, image has {shape}")
    return np.asarray(data)


def _read_plane(path: Path, hdu, shape, role: str) -> np.ndarray:
    hdul = _open(path, role)
    with hdul:
        idx = _select(hdul, hdu, path, role) if hdu is not None else _first_image_hdu(hdul)
        if idx is None:
            raise InputError(f"{path}: no 2-D {role} HDU found")
        return _plane(hdul, idx, shape, path, role)


def _weight_to_variance(weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(weight > 0, 1.0 / weight, np.inf)
    return var.astype(np.float32)


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

    def load(self) -> tuple[Exposure, Exposure]:
        """Read the search and template exposures."""

        def hdu(value):
            if value is None:
                return None
            return int(value) if str(value).isdigit() else str(value)

        search = read_exposure(self.search, hdu=hdu(self.search_hdu), mask_path=self.search_mask,
                               weight_path=self.search_weight)
        template = read_exposure(self.template, hdu=hdu(self.template_hdu), mask_path=self.template_mask,
                                 weight_path=self.template_weight)
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
    base = path.parent
    entries = []
    seen = set()
    for row in table:
        def cell(name):
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
        if ccd is None or ccd in seen:
            raise InputError(f"{path}: ccd identifiers must be present and unique (problem at {ccd!r})")
        seen.add(ccd)
        entries.append(
            PairEntry(
                ccd=ccd, search=as_path("search"), template=as_path("template"), truth=as_path("truth"),
                search_hdu=cell("search_hdu"), template_hdu=cell("template_hdu"),
                search_mask=as_path("search_mask"), search_weight=as_path("search_weight"),
                template_mask=as_path("template_mask"), template_weight=as_path("template_weight"),
            )
        )
    if unknown:
        warnings.warn(f"{path}: ignoring unknown manifest column(s) {unknown}", stacklevel=2)
    return entries


def _summary_cards(obj, prefix: str) -> list[tuple[str, Any, str]]:
    """Scalar fields of a (dataclass) result as HIERARCH header cards."""
    cards = []
    if obj is None:
        return cards
    fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    for key, value in fields.items():
        if isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif isinstance(value, (int, np.integer)):
            value = int(value)
        elif isinstance(value, (float, np.floating)):
            value = float(value)
            if not np.isfinite(value):
                continue
        elif isinstance(value, str) and len(value) < 60:
            pass
        elif isinstance(value, (tuple, list)) and len(value) <= 8 and all(isinstance(v, (int, float, np.number)) for v in value):
            value = ",".join(f"{float(v):.4g}" for v in value)
        elif isinstance(value, dict) and len(value) <= 10 and all(isinstance(v, (int, np.integer)) for v in value.values()):
            value = ",".join(f"{k}={int(v)}" for k, v in value.items())[:60]
        else:
            continue
        cards.append((f"HIERARCH {prefix} {key.upper()}", value, ""))
    return cards


def write_difference(difference, search: Exposure, path: str | Path) -> Path:
    """Write a difference image (IMAGE, VARIANCE, MASK on the search WCS) with the kernel summary.

    The header carries the search exposure's metadata, which image was
    convolved, and the scalar fields of the kernel solution and fit
    statistics as ``HIERARCH DIA ...`` cards.  Atomic.
    """
    diff = difference.to_numpy() if hasattr(difference, "to_numpy") else difference
    exposure = dataclasses.replace(
        search, image=np.asarray(diff.image, np.float32), variance=np.asarray(diff.variance, np.float32),
        mask=np.asarray(diff.mask, np.int32), name=f"difference of {search.name}", header=search.header.copy(),
    )
    hdr = exposure.header
    hdr["IMAGETYP"] = ("difference", "search minus PSF-matched template")
    hdr["CONVOLV"] = (str(diff.convolved), "which image was convolved with the kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long keys become HIERARCH cards
        for key, value, comment in _summary_cards(getattr(diff, "solution", None), "DIA KERNEL") + \
                _summary_cards(getattr(diff, "stats", None), "DIA FIT"):
            hdr[key] = value
    return write_exposure(exposure, path)
