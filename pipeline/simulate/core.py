"""The survey simulator: one search/template CCD pair with ground truth, and writing many to disk.

Model (all magnitudes AB in the preset's band):

* Each exposure draws its conditions: seeing (log-normal around the preset
  median; the template median is ``template_seeing_factor`` times better),
  Moffat beta, sky brightness, airmass and clouds (so the two zero points
  differ), a TAN WCS.  The template is the mean of ``N`` frames, ``N`` set by
  ``template_depth_mag``; its GAIN is ``N gain`` and RDNOISE ``sqrt(N) rn``
  so that ``variance = model / GAIN + (RDNOISE / GAIN)^2`` holds for both.
* Template WCS = search WCS with the grid shifted by ``(dx, dy)`` at the CCD
  centre and rotated by ``rot``: ``p_t = R(rot) (p_s - c) + c + (dx, dy)``
  (``c`` the CCD centre, same CRVAL, ``CD_t = CD_s R(-rot)``).
* Scene (stars with power-law counts, Sersic galaxies) fixed on the sky,
  rendered through each image's WCS, PSF and zero point.  Point sources are
  pixel-integrated Moffat stamps with the local PSF; galaxies are intrinsic
  Sersic images convolved with the PSF at a grid of nodes, blended bilinearly.
* Optionally (``star_shift_rms``, ``high_pm_fraction``), each star's template position is shifted
  from its search position (chromatic refraction, proper motion, astrometric noise), so that
  bright stars leave misregistration dipoles in the difference (:func:`star_shifts`).
* Transients (search only) and variable stars; artifacts (cosmic rays, hot
  pixels, bad columns in the search; satellites in either; saturation with
  bleed trails in both).
* Noise: Poisson in electrons on sky + sources, Gaussian read noise, in ADU.
* Headers: ``MAGZERO`` is an AB zero point (``MAGSYS = 'AB'``); ``DATE-OBS`` (ISO, UTC) and
  ``MJD-OBS`` date the search, the template earlier (:func:`epochs`).

Truth S/N (column ``snr``) of point sources is the PSF-optimal S/N in the
search image alone, ``snr = flux * sqrt(sum_i p_i^2 / V_i)``, with ``p`` the
unit-sum rendered PSF stamp and ``V`` the search variance plane (sky, all
sources including the transient itself and its host, read noise).  The
5-sigma limit ``m5`` in the meta is the magnitude with ``snr = 5`` at the
CCD centre on blank sky.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.table import Table
from astropy.wcs import WCS

from dia.masks import MaskBits
from pipeline.config import config_to_dict
from pipeline.io import Exposure, atomic_path, write_exposure

from . import artifacts
from .config import INSTRUMENTS, InstrumentPreset, SimulationConfig
from .render import PsfField, convolve_varying, point_stamps, render_points, render_sersic

__all__ = ["SimulatedPair", "simulate_pair", "write_simulation", "TRUTH_COLUMNS", "ccd_name", "epochs", "star_shifts"]

#: Truth table columns and their meaning (units in the column meta).
TRUTH_COLUMNS = {
    "id": "unique id within the CCD",
    "kind": "transient, variable, star, galaxy, cosmic_ray, hot_pixel, bad_column, satellite, bleed",
    "ra": "right ascension (deg)",
    "dec": "declination (deg)",
    "x": "0-based column on the search grid (px)",
    "y": "0-based row on the search grid (px)",
    "mag": "AB magnitude in the search image (NaN for artifacts)",
    "flux": "total flux in the search image (ADU; template ADU for template-only artifacts)",
    "snr": "PSF-optimal S/N in the search image alone (point sources; NaN otherwise)",
    "host_id": "id of the host galaxy (-1 if none)",
    "dflux": "search minus template flux on the search scale (ADU): transients and variables",
    "image": "where the object is: both, search or template",
    "length": "extent of trails, tracks and columns (px; 0 for sources)",
    "flagged": "artifact flagged in the mask (BAD or SAT)",
}

_UNITS = {"ra": "deg", "dec": "deg", "x": "pix", "y": "pix", "mag": "mag", "flux": "adu", "dflux": "adu",
          "length": "pix"}


def ccd_name(index: int) -> str:
    """File-name stem of CCD ``index``: ``ccd00``, ``ccd01``..."""
    return f"ccd{index:02d}"


@dataclasses.dataclass
class SimulatedPair:
    """A simulated CCD pair.

    Attributes
    ----------
    search, template : Exposure
        The two exposures (ADU), each on its own WCS.
    truth : astropy.table.Table
        Ground truth on the search grid (:data:`TRUTH_COLUMNS`); per-CCD facts in ``truth.meta``.
    search_model, template_model : ndarray
        Noiseless expected images (sky + sources + satellites, ADU), before artifacts and clipping.
    search_psf, template_psf : PsfField
        The spatially varying PSF of each image (in its own pixel frame).
    """

    search: Exposure
    template: Exposure
    truth: Table
    search_model: np.ndarray
    template_model: np.ndarray
    search_psf: PsfField
    template_psf: PsfField


def _rng(seed: int, ccd_index: int) -> np.random.Generator:
    # the same stream as SeedSequence(seed).spawn(n)[ccd_index], whatever n
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(ccd_index,)))


def epochs(config: SimulationConfig, seed: int, ccd_index: int) -> dict[str, float]:
    """MJDs (UTC, whole seconds) of the search and template exposures of CCD ``ccd_index``.

    The search epoch is uniform in ``config.search_mjd_range``; the template (coadd) is dated
    ``config.template_lead_days`` earlier.  Drawn from a stream of their own (``(seed,
    ccd_index, 1)``), so that adding epochs changed no pixel of the simulation.
    """
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(ccd_index, 1)))
    search = float(rng.uniform(*config.search_mjd_range))
    template = search - float(rng.uniform(*config.template_lead_days))
    return {label: round(mjd * 86400.0) / 86400.0 for label, mjd in (("search", search), ("template", template))}


def star_shifts(config: SimulationConfig, seed: int, ccd_index: int, n: int) -> np.ndarray:
    """Template-minus-search position shifts (arcsec, shape ``(n, 2)``) of the ``n`` stars of a CCD.

    Gaussian per axis with ``config.star_shift_rms``, plus, for a fraction
    ``config.high_pm_fraction`` of the stars, a shift uniform in ``config.high_pm_shift_range``
    in a random direction.  Drawn from a stream of its own (``(seed, ccd_index, 2)``), so that
    turning the shifts on changes no other draw of the simulation; all zeros by default.
    """
    out = np.zeros((n, 2))
    if n == 0 or (config.star_shift_rms <= 0 and config.high_pm_fraction <= 0):
        return out
    if config.star_shift_rms < 0 or not 0 <= config.high_pm_fraction <= 1:
        raise ValueError("SimulationConfig.star_shift_rms must be >= 0 and high_pm_fraction in [0, 1], got "
                         f"{config.star_shift_rms}, {config.high_pm_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(ccd_index, 2)))
    out += rng.normal(0.0, config.star_shift_rms, (n, 2))
    fast = rng.random(n) < config.high_pm_fraction
    size = rng.uniform(*config.high_pm_shift_range, n)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    out[fast, 0] += (size * np.cos(angle))[fast]
    out[fast, 1] += (size * np.sin(angle))[fast]
    return out


def _date_obs(mjd: float) -> str:
    """ISO time (UTC, milliseconds) of an MJD, the value of a ``DATE-OBS`` card."""
    from astropy.time import Time

    return Time(mjd, format="mjd", scale="utc").isot


def _make_wcs(shape, scale_deg, ra, dec, pa_deg, crpix):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]  # FITS is 1-based
    c, s = np.cos(np.radians(pa_deg)), np.sin(np.radians(pa_deg))
    w.wcs.cd = scale_deg * np.array([[-c, s], [s, c]])  # east left, north up, rotated by pa
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (shape[1], shape[0])
    return w


def _counts_mags(rng, n_at_24, slope, m_bright, m_faint):
    """Draw magnitudes from ``dN/dm ∝ 10**(slope m)`` with ``N(<24) = n_at_24``; Poisson total."""
    if m_faint <= m_bright:
        return np.zeros(0)
    expected = n_at_24 * (10 ** (slope * (m_faint - 24)) - 10 ** (slope * (m_bright - 24)))
    n = rng.poisson(max(expected, 0.0))
    u = rng.random(n)
    lo, hi = 10 ** (slope * m_bright), 10 ** (slope * m_faint)
    return np.log10(lo + u * (hi - lo)) / slope


@dataclasses.dataclass
class _Conditions:
    seeing: float
    fwhm: float
    zp: float
    sky: float
    sky_mag: float
    airmass: float
    gain: float
    read_noise: float
    exptime: float
    ncombine: int
    psf: PsfField

    @property
    def sky_var(self) -> float:
        return self.sky / self.gain + (self.read_noise / self.gain) ** 2


def _draw_conditions(rng, cfg: SimulationConfig, preset: InstrumentPreset, shape, template: bool) -> _Conditions:
    med = preset.seeing_median * (cfg.template_seeing_factor if template else 1.0)
    lo, hi = preset.seeing_range
    seeing = float(np.clip(med * np.exp(rng.normal(0, cfg.seeing_scatter)), lo * (0.85 if template else 1), hi))
    airmass = float(rng.uniform(*cfg.airmass_range))
    loss = preset.extinction * airmass + float(rng.uniform(*cfg.cloud_range))
    sky_mag = preset.sky_mag + float(rng.uniform(*cfg.sky_mag_range))
    ncombine = 1
    gain, rn = preset.gain, preset.read_noise
    if template:
        depth = float(rng.uniform(*cfg.template_depth_mag))
        ncombine = max(2, int(round(10 ** (0.8 * depth))))
        gain, rn = gain * ncombine, rn * np.sqrt(ncombine)
    # mean-of-frames image: same ADU scale as one frame
    zp = preset.zp_e1s + 2.5 * np.log10(preset.exptime) - 2.5 * np.log10(preset.gain) - loss
    sky = 10 ** (-0.4 * (sky_mag - zp)) * preset.pixel_scale**2
    fwhm = seeing / preset.pixel_scale
    e = rng.uniform(0, cfg.ellipticity_max)
    phi = rng.uniform(0, np.pi)
    psf = PsfField(
        shape=tuple(shape), fwhm0=fwhm, beta=float(rng.uniform(*cfg.beta_range)),
        fwhm_coeffs=tuple(float(v) for v in rng.normal(0, cfg.psf_variation / 2, 5)),
        e1_0=float(e * np.cos(2 * phi)), e2_0=float(e * np.sin(2 * phi)),
        e1_grad=tuple(float(v) for v in rng.normal(0, cfg.ellipticity_gradient / 2, 2)),
        e2_grad=tuple(float(v) for v in rng.normal(0, cfg.ellipticity_gradient / 2, 2)),
    )
    return _Conditions(seeing=seeing, fwhm=fwhm, zp=float(zp), sky=float(sky), sky_mag=sky_mag, airmass=airmass,
                       gain=gain, read_noise=float(rn), exptime=preset.exptime * ncombine, ncombine=ncombine, psf=psf)


def _limit(cond: _Conditions, shape) -> tuple[float, float]:
    """(5-sigma flux in ADU, 5-sigma magnitude) of a point source at the CCD centre on blank sky."""
    ny, nx = shape
    k = cond.psf.kernel((nx - 1) / 2, (ny - 1) / 2, int(np.ceil(4 * cond.fwhm)))
    f5 = 5.0 * np.sqrt(cond.sky_var / np.sum(k**2))
    return float(f5), float(cond.zp - 2.5 * np.log10(f5))


def _render(shape, cond: _Conditions, f5, pts, gals, cfg: SimulationConfig) -> np.ndarray:
    """Noiseless model (ADU, float64): sky + point sources + PSF-convolved galaxies."""
    ny, nx = shape
    model = np.zeros(shape)
    px, py, pflux = pts
    render_points(shape, cond.psf, px, py, pflux, f5, out=model)
    gx, gy, gflux, gre, gn, gq, gth = gals
    if len(gx):
        pad = int(np.ceil(4 * cond.fwhm * 1.2))
        intrinsic = render_sersic((ny + 2 * pad, nx + 2 * pad), gx + pad, gy + pad, gflux, gre, gn, gq, gth)
        model += convolve_varying(intrinsic, cond.psf, shape, pad, cfg.psf_node_spacing)
    model += cond.sky
    return model


def _observe(model, cond: _Conditions, rng):
    """Noisy image (Poisson electrons + read noise, ADU) and expected variance plane."""
    g = cond.gain
    electrons = rng.poisson(np.clip(model, 0, None) * g).astype(np.float32)
    electrons += rng.standard_normal(model.shape, dtype=np.float32) * np.float32(cond.read_noise)
    image = electrons / np.float32(g)
    variance = (np.clip(model, 0, None) / g + (cond.read_noise / g) ** 2).astype(np.float32)
    return image, variance


def simulate_pair(config: SimulationConfig | None = None, seed: int = 0, ccd_index: int = 0) -> SimulatedPair:
    """Simulate one search/template CCD pair with ground truth (pure: no files).

    Parameters
    ----------
    config : SimulationConfig, optional
        Simulation parameters (default: ``SimulationConfig()``, DECam).
    seed : int
        Seed of the run; CCD ``k`` uses the stream spawned from ``(seed, k)``,
        so it is identical whether one or many CCDs are made.
    ccd_index : int
        Index of the CCD in the run.

    Returns
    -------
    SimulatedPair
    """
    cfg = config or SimulationConfig()
    key = cfg.instrument.lower()
    if key not in INSTRUMENTS:
        raise ValueError(f"SimulationConfig.instrument: unknown instrument {cfg.instrument!r}; "
                         f"choose one of {sorted(INSTRUMENTS)}")
    preset = INSTRUMENTS[key]
    shape = tuple(int(v) for v in (cfg.shape or preset.shape))
    if len(shape) != 2 or min(shape) < 64:
        raise ValueError(f"SimulationConfig.shape: need (ny, nx) with both >= 64, got {cfg.shape}")
    ny, nx = shape
    rng = _rng(seed, ccd_index)
    scale = preset.pixel_scale
    centre = np.array([(nx - 1) / 2, (ny - 1) / 2])

    # ---- conditions, PSFs, WCS
    cs = _draw_conditions(rng, cfg, preset, shape, template=False)
    ct = _draw_conditions(rng, cfg, preset, shape, template=True)
    f5s, m5s = _limit(cs, shape)
    f5t, m5t = _limit(ct, shape)
    ra0 = float(rng.uniform(0, 360))
    dec0 = float(np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-65)), np.sin(np.radians(30))))))
    pa = float(rng.uniform(-1, 1))
    offset = rng.uniform(-cfg.max_offset, cfg.max_offset, 2)
    rot = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    wcs_s = _make_wcs(shape, scale / 3600, ra0, dec0, pa, centre)
    wcs_t = _make_wcs(shape, scale / 3600, ra0, dec0, pa - rot, centre + offset)
    # check of the convention p_t = R(rot) (p_s - c) + c + offset is in the tests

    def s2t(x, y):
        return wcs_t.world_to_pixel(wcs_s.pixel_to_world(x, y))

    def t2s(x, y):
        return wcs_s.world_to_pixel(wcs_t.pixel_to_world(x, y))

    # ---- scene (fixed on the sky; drawn in search pixel coordinates over the union footprint)
    margin = cfg.max_offset + np.radians(cfg.max_rotation) * np.hypot(nx, ny) / 2 + 30
    ext_area = (nx + 2 * margin) * (ny + 2 * margin) * (scale / 60) ** 2  # arcmin^2
    ccd_area = nx * ny * (scale / 60) ** 2
    m_faint = m5s + cfg.faint_limit_offset

    def positions(n):
        return rng.uniform(-margin, nx - 1 + margin, n), rng.uniform(-margin, ny - 1 + margin, n)

    star_density = float(np.exp(rng.uniform(*np.log(cfg.star_density_range))))
    star_mag = _counts_mags(rng, star_density * ext_area, cfg.star_slope, cfg.star_mag_bright, m_faint)
    star_x, star_y = positions(len(star_mag))
    gal_mag = _counts_mags(rng, cfg.galaxy_density * ext_area, cfg.galaxy_slope, cfg.galaxy_mag_bright, m_faint)
    ng = len(gal_mag)
    gal_x, gal_y = positions(ng)
    gal_re = (cfg.galaxy_re_at_20 * 10 ** (-0.1 * (gal_mag - 20)) * np.exp(rng.normal(0, cfg.galaxy_re_scatter, ng))
              / scale)
    disky = rng.random(ng) < 0.65
    n_lo, n_hi = cfg.galaxy_n_range
    gal_n = np.where(disky, rng.uniform(n_lo, min(1.5, n_hi), ng), rng.uniform(max(2.0, n_lo), n_hi, ng))
    gal_q = rng.uniform(cfg.galaxy_q_min, 1.0, ng)
    gal_th = rng.uniform(0, np.pi, ng)

    def inside(x, y, m=0.0):
        return (x >= m - 0.5) & (x <= nx - 0.5 - m) & (y >= m - 0.5) & (y <= ny - 0.5 - m)

    # ---- variable stars (template shows star_mag, search star_mag + dmag)
    star_dmag = np.zeros(len(star_mag))
    cand = np.flatnonzero(inside(star_x, star_y, cfg.edge_margin) & (star_mag > 16) & (star_mag < m5s))
    nvar = rng.binomial(len(cand), cfg.variable_fraction) if len(cand) else 0
    var_idx = rng.choice(cand, nvar, replace=False) if nvar else np.zeros(0, int)
    star_dmag[var_idx] = rng.uniform(*cfg.variable_dmag_range, nvar) * rng.choice([-1.0, 1.0], nvar)

    # ---- transients
    n_tr = int(round(cfg.transient_density * ccd_area))
    tr_mag = rng.uniform(cfg.transient_mag_bright, m5s + cfg.transient_faint_offset, n_tr)
    hosts = np.flatnonzero(inside(gal_x, gal_y, cfg.edge_margin) & (gal_mag < cfg.host_mag_faint))
    hosted = rng.random(n_tr) >= cfg.hostless_fraction
    tr_x, tr_y = np.zeros(n_tr), np.zeros(n_tr)
    tr_host = np.full(n_tr, -1)
    lo_m = cfg.edge_margin
    for i in range(n_tr):
        if hosted[i] and len(hosts):
            h = int(rng.choice(hosts))
            for _ in range(20):
                # radius distributed as the Sersic light: b (r/re)^(1/n) ~ Gamma(2n)
                g = rng.gamma(2 * gal_n[h])
                r = gal_re[h] * (g / (2 * gal_n[h] - 1 / 3)) ** gal_n[h]
                phi = rng.uniform(0, 2 * np.pi)
                u, v = r * np.cos(phi), r * gal_q[h] * np.sin(phi)
                c, s = np.cos(gal_th[h]), np.sin(gal_th[h])
                x, y = gal_x[h] + c * u - s * v, gal_y[h] + s * u + c * v
                if inside(np.array(x), np.array(y), lo_m):
                    break
            else:
                x, y = gal_x[h], gal_y[h]
            tr_x[i], tr_y[i], tr_host[i] = x, y, h
        else:
            tr_x[i] = rng.uniform(lo_m, nx - 1 - lo_m)
            tr_y[i] = rng.uniform(lo_m, ny - 1 - lo_m)

    # ---- render both images
    stx, sty = s2t(star_x, star_y)
    shift = star_shifts(cfg, seed, ccd_index, len(star_x)) / scale  # arcsec -> template px
    stx, sty = stx + shift[:, 0], sty + shift[:, 1]
    gtx, gty = s2t(gal_x, gal_y)
    flux_s = lambda m: 10 ** (-0.4 * (m - cs.zp))  # noqa: E731
    flux_t = lambda m: 10 ** (-0.4 * (m - ct.zp))  # noqa: E731
    pts_s = (np.concatenate([star_x, tr_x]), np.concatenate([star_y, tr_y]),
             np.concatenate([flux_s(star_mag + star_dmag), flux_s(tr_mag)]))
    pts_t = (stx, sty, flux_t(star_mag))
    model_s = _render(shape, cs, f5s, pts_s, (gal_x, gal_y, flux_s(gal_mag), gal_re, gal_n, gal_q, gal_th), cfg)
    model_t = _render(shape, ct, f5t, pts_t,
                      (gtx, gty, flux_t(gal_mag), gal_re, gal_n, gal_q, gal_th + np.radians(rot)), cfg)

    records = []  # artifacts: dicts with image coordinates of their own image
    mjds = epochs(cfg, seed, ccd_index)
    for cond, model, label in ((cs, model_s, "search"), (ct, model_t, "template")):
        if rng.random() < cfg.satellite_probability:
            peak = rng.uniform(2, 30) * np.sqrt(cond.sky_var)
            width = cond.fwhm / 2.355 * rng.uniform(1.0, 2.0)
            rec = artifacts.satellite_trail(shape, width, peak, rng, model)
            rec["image"] = label
            rec.pop("angle")
            records.append(rec)

    exposures = {}
    for cond, model, label, m5 in ((cs, model_s, "search", m5s), (ct, model_t, "template", m5t)):
        sat_map, bleeds = artifacts.saturate_and_bleed(model, preset.saturation)
        for rec in bleeds:
            rec["image"] = label
        records.extend(bleeds)
        image, variance = _observe(model, cond, rng)
        mask = np.zeros(shape, dtype=np.int32)
        if label == "search":
            n_cr = rng.poisson(cfg.cosmic_ray_density * ccd_area * preset.exptime / 90.0)
            recs = artifacts.add_cosmic_rays(image, n_cr, cfg.cosmic_ray_track_fraction, preset.gain, rng)
            mpix = nx * ny / 1e6
            recs += artifacts.add_hot_pixels(image, mask, rng.poisson(cfg.hot_pixel_rate * mpix),
                                             cfg.defect_flagged_fraction, preset.saturation, rng)
            recs += artifacts.add_bad_columns(image, mask, rng.poisson(cfg.bad_column_rate * mpix),
                                              cfg.defect_flagged_fraction, rng)
            for rec in recs:
                rec["image"] = "search"
            records.extend(recs)
        image[sat_map] = preset.saturation
        over = image >= preset.saturation
        image[over] = preset.saturation
        mask[sat_map | over] |= MaskBits.SAT
        e = cfg.edge_width
        if e > 0:
            mask[:e, :] |= MaskBits.EDGE
            mask[-e:, :] |= MaskBits.EDGE
            mask[:, :e] |= MaskBits.EDGE
            mask[:, -e:] |= MaskBits.EDGE
        header = fits.Header()
        header["SEEING"] = (round(cond.seeing, 4), "[arcsec] PSF FWHM at the CCD centre")
        header["PSFBETA"] = (round(cond.psf.beta, 4), "Moffat beta of the PSF")
        header["AIRMASS"] = (round(cond.airmass, 4), "airmass")
        header["SKYBRITE"] = (round(cond.sky_mag, 4), "[mag/arcsec2] sky brightness")
        header["MAGLIM"] = (round(m5, 4), "[mag] point-source 5-sigma limit at CCD centre")
        header["NCOMBINE"] = (cond.ncombine, "number of frames averaged")
        header["SIMSEED"] = (int(seed), "simulation seed")
        header["SIMCCD"] = (int(ccd_index), "simulation CCD index")
        header["SIMTYPE"] = (label, "search or template")
        header["DATE-OBS"] = (_date_obs(mjds[label]), "UTC start" if label == "search" else "UTC epoch of the coadd")
        header["TIMESYS"] = ("UTC", "time scale of DATE-OBS and MJD-OBS")
        exposures[label] = Exposure(
            image=image.astype(np.float32), variance=variance, mask=mask, wcs=wcs_s if label == "search" else wcs_t,
            fwhm=float(cond.fwhm), gain=float(cond.gain), read_noise=float(cond.read_noise),
            saturation=float(preset.saturation), zero_point=float(cond.zp), band=preset.band,
            exptime=float(cond.exptime), mjd=mjds[label], mag_system="AB",
            sky_level=float(cond.sky), instrument=preset.name,
            name=f"{ccd_name(ccd_index)}_{label}", ccd=ccd_name(ccd_index), header=header,
        )

    # ---- truth
    search = exposures["search"]
    rows = {k: [] for k in TRUTH_COLUMNS}

    def add(kind, x, y, mag, flux, snr, host, dflux, image, length=0.0, flagged=False):
        n = len(np.atleast_1d(x))
        for col, val in (("kind", kind), ("x", x), ("y", y), ("mag", mag), ("flux", flux), ("snr", snr),
                         ("host_id", host), ("dflux", dflux), ("image", image), ("length", length),
                         ("flagged", flagged)):
            rows[col].append(np.broadcast_to(np.asarray(val), (n,)))

    # point-source S/N on the search variance plane
    def psf_snr(x, y, flux):
        out = np.empty(len(x))
        for i, (st, iy0, ix0) in enumerate(point_stamps(cs.psf, x, y, flux, f5s)):
            S = st.shape[0]
            yy, xx = np.mgrid[iy0:iy0 + S, ix0:ix0 + S]
            ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            out[i] = flux[i] * np.sqrt(np.sum(st[ok] ** 2 / search.variance[yy[ok], xx[ok]]))
        return out

    nan = np.nan
    gal_in = np.flatnonzero(inside(gal_x, gal_y))
    gal_id = np.full(ng, -1)
    gal_id[gal_in] = np.arange(len(gal_in))
    add("galaxy", gal_x[gal_in], gal_y[gal_in], gal_mag[gal_in], flux_s(gal_mag[gal_in]), nan, -1, 0.0, "both")
    host_ids = np.array([gal_id[h] if h >= 0 else -1 for h in tr_host], dtype=np.int64)
    ftr = flux_s(tr_mag)
    add("transient", tr_x, tr_y, tr_mag, ftr, psf_snr(tr_x, tr_y, ftr), host_ids, ftr, "search")
    st_in = np.flatnonzero(inside(star_x, star_y))
    is_var = np.zeros(len(star_mag), bool)
    is_var[var_idx] = True
    fst = flux_s(star_mag[st_in] + star_dmag[st_in])
    add(np.where(is_var[st_in], "variable", "star"), star_x[st_in], star_y[st_in], star_mag[st_in] + star_dmag[st_in],
        fst, psf_snr(star_x[st_in], star_y[st_in], fst), -1, fst - flux_s(star_mag[st_in]), "both")
    for rec in records:
        x, y = rec["x"], rec["y"]
        if rec["image"] == "template":
            x, y = (float(v) for v in t2s(x, y))
        add(rec["kind"], x, y, nan, rec["flux"], nan, -1, 0.0, rec["image"], rec["length"], rec["flagged"])
    cols = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items() if k != "id"}
    ntot = len(cols["x"])
    # ids: galaxies first (host ids refer to them), then the rest in order
    cols["id"] = np.arange(ntot)
    sky = wcs_s.pixel_to_world(cols["x"], cols["y"])
    cols["ra"], cols["dec"] = sky.ra.deg, sky.dec.deg
    truth = Table()
    for name, desc in TRUTH_COLUMNS.items():
        data = cols[name]
        if name in ("id", "host_id"):
            data = data.astype(np.int64)
        elif name in ("kind", "image"):
            data = data.astype(str)
        elif name == "flagged":
            data = data.astype(bool)
        else:
            data = data.astype(np.float64)
        truth[name] = data
        truth[name].description = desc
        if name in _UNITS:
            truth[name].unit = _UNITS[name]
    truth.meta.update({
        "instrument": preset.name, "band": preset.band, "seed": int(seed), "ccd_index": int(ccd_index),
        "ccd": ccd_name(ccd_index), "shape": [ny, nx], "pixel_scale": preset.pixel_scale,
        "search_seeing": cs.seeing, "template_seeing": ct.seeing,
        "search_fwhm": cs.fwhm, "template_fwhm": ct.fwhm,
        "search_beta": cs.psf.beta, "template_beta": ct.psf.beta,
        "search_zp": cs.zp, "template_zp": ct.zp, "search_sky": cs.sky, "template_sky": ct.sky,
        "search_m5": m5s, "template_m5": m5t, "template_ncombine": ct.ncombine,
        "search_mjd": mjds["search"], "template_mjd": mjds["template"], "mag_system": "AB",
        "template_offset_x": float(offset[0]), "template_offset_y": float(offset[1]),
        "template_rotation_deg": rot,
        "offset_convention": "p_template = R(rot) (p_search - c) + c + offset, c = CCD centre",
        "star_density": star_density, "n_transients": n_tr,
        "snr_formula": "flux * sqrt(sum_i p_i^2 / V_i), p unit-sum PSF stamp, V search variance plane",
        "config": config_to_dict(cfg),
    })
    return SimulatedPair(search=exposures["search"], template=exposures["template"], truth=truth,
                         search_model=model_s.astype(np.float32), template_model=model_t.astype(np.float32),
                         search_psf=cs.psf, template_psf=ct.psf)


def write_simulation(out_dir: str | Path, n_ccds: int = 1, seed: int = 0,
                     config: SimulationConfig | None = None, *, progress=None) -> Path:
    """Simulate ``n_ccds`` CCD pairs and write them with a manifest.

    Writes ``ccdNN_search.fits``, ``ccdNN_template.fits`` (via
    :func:`pipeline.io.write_exposure`), ``ccdNN_truth.ecsv`` and
    ``manifest.ecsv`` (columns ``ccd, search, template, truth``, paths
    relative to ``out_dir``), each atomically.

    Parameters
    ----------
    out_dir : path
        Output folder (created).
    n_ccds : int
        Number of CCD pairs.
    seed : int
        Run seed; CCD ``k`` depends only on ``(seed, k)``.
    config : SimulationConfig, optional
    progress : callable, optional
        Called as ``progress(index, pair, seconds)`` after each CCD.

    Returns
    -------
    Path
        The manifest.
    """
    if n_ccds < 1:
        raise ValueError(f"n_ccds must be >= 1, got {n_ccds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n_ccds):
        t0 = time.perf_counter()
        pair = simulate_pair(config, seed, k)
        stem = ccd_name(k)
        with warnings.catch_warnings():
            # pipeline.io's MAGZERO comment is one character too long for a card; astropy truncates it
            warnings.filterwarnings("ignore", message="Card is too long", category=VerifyWarning)
            write_exposure(pair.search, out / f"{stem}_search.fits")
            write_exposure(pair.template, out / f"{stem}_template.fits")
        with atomic_path(out / f"{stem}_truth.ecsv") as tmp:
            pair.truth.write(tmp, format="ascii.ecsv", overwrite=True)
        rows.append((stem, f"{stem}_search.fits", f"{stem}_template.fits", f"{stem}_truth.ecsv"))
        if progress is not None:
            progress(k, pair, time.perf_counter() - t0)
    manifest = Table(rows=rows, names=("ccd", "search", "template", "truth"), dtype=(str, str, str, str))
    manifest.meta["comment"] = "pairs of simulated exposures; paths relative to this file"
    manifest.meta["seed"] = int(seed)
    path = out / "manifest.ecsv"
    with atomic_path(path) as tmp:
        manifest.write(tmp, format="ascii.ecsv", overwrite=True)
    return path
