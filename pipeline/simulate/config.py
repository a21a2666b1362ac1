"""Instrument presets and the simulation configuration.

Depth calibration (documented numbers, checked by ``tests/test_simulate.py``
and printed by ``benchmarks/bench_simulate.py``):

* DECam r band, 90 s: ``zp_e1s = 26.9`` (MAGZERO ~ 31.8 in electrons for
  90 s, ~ 30.3 in ADU at gain 4), dark sky r = 20.9 mag/arcsec^2 (~ 300-600
  ADU/px with moon and airmass).  Search 5-sigma point-source limit: median
  r = 23.5 (10-90%: 23.1-23.7) over the drawn seeing (median 1.16").
* ZTF r band, 30 s: ``zp_e1s = 24.3``, sky 20.5 -> median 5-sigma 20.8 at 1.9".
* LSSTCam r band, 30 s visit: ``zp_e1s = 28.3``, sky 21.2 -> median 5-sigma 24.25.

Templates are coadds of ``N`` frames chosen so that the template is
``template_depth_mag`` (1.0-1.5 mag by default) deeper than one frame in the
same conditions.
"""

from __future__ import annotations

import dataclasses

__all__ = ["InstrumentPreset", "INSTRUMENTS", "SimulationConfig"]


@dataclasses.dataclass(frozen=True)
class InstrumentPreset:
    """Fixed properties of an instrument and its typical observing conditions.

    Attributes
    ----------
    name : str
        Value of the ``INSTRUME`` keyword.
    pixel_scale : float
        Arcsec per pixel.
    shape : tuple of int
        CCD shape ``(ny, nx)``.
    gain : float
        e-/ADU.
    read_noise : float
        e- per pixel per read.
    saturation : float
        Saturation level (ADU).
    seeing_median : float
        Median search-image seeing FWHM (arcsec).
    seeing_range : tuple of float
        Clip range of the search seeing (arcsec).
    band : str
        Filter.
    exptime : float
        Search exposure time (s); template frames have the same length.
    zp_e1s : float
        AB magnitude giving 1 e-/s at airmass 1 with clear sky.
    sky_mag : float
        Dark-sky brightness (mag/arcsec^2).
    extinction : float
        Extinction coefficient (mag/airmass).
    """

    name: str
    pixel_scale: float
    shape: tuple[int, int]
    gain: float
    read_noise: float
    saturation: float
    seeing_median: float
    seeing_range: tuple[float, float]
    band: str
    exptime: float
    zp_e1s: float
    sky_mag: float
    extinction: float = 0.10


#: Instrument presets by lower-case name.
INSTRUMENTS: dict[str, InstrumentPreset] = {
    "decam": InstrumentPreset(
        name="DECam", pixel_scale=0.263, shape=(4096, 2048), gain=4.0, read_noise=7.0, saturation=45000.0,
        seeing_median=1.2, seeing_range=(0.85, 2.1), band="r", exptime=90.0, zp_e1s=26.9, sky_mag=20.9,
    ),
    "ztf": InstrumentPreset(
        name="ZTF", pixel_scale=1.01, shape=(3080, 3072), gain=6.2, read_noise=10.0, saturation=50000.0,
        seeing_median=2.0, seeing_range=(1.5, 3.0), band="r", exptime=30.0, zp_e1s=24.3, sky_mag=20.5,
    ),
    "lsst": InstrumentPreset(
        name="LSSTCam", pixel_scale=0.2, shape=(4096, 4096), gain=1.5, read_noise=6.0, saturation=90000.0,
        seeing_median=0.75, seeing_range=(0.5, 1.4), band="r", exptime=30.0, zp_e1s=28.3, sky_mag=21.2,
    ),
}


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Every parameter of the survey simulator, with documented defaults.

    Densities are per arcmin^2 of sky (so they scale with the CCD area);
    detector defects are per million pixels.  Magnitudes are AB in the
    preset's band.
    """

    instrument: str = "decam"
    """Preset name, a key of :data:`INSTRUMENTS`."""
    shape: tuple[int, int] | None = None
    """``(ny, nx)`` override of the CCD shape (None: the preset's)."""

    # --- observing conditions
    seeing_scatter: float = 0.2
    """Log-normal scatter (natural log) of the seeing around the preset median."""
    template_seeing_factor: float = 0.85
    """Median template seeing / median search seeing (< 1: usually better, sometimes worse)."""
    sky_mag_range: tuple[float, float] = (-0.6, 0.2)
    """Per-exposure sky brightness offset from the preset's dark sky (mag/arcsec^2; negative = brighter)."""
    airmass_range: tuple[float, float] = (1.0, 1.6)
    """Uniform range of airmass (extinction = preset coefficient x airmass)."""
    cloud_range: tuple[float, float] = (0.0, 0.15)
    """Uniform range of grey extinction by clouds (mag); makes the two zero points differ."""
    search_mjd_range: tuple[float, float] = (59945.0, 61041.0)
    """Uniform range of the search exposure's MJD (UTC; default 2023-01-01 to 2026-01-01)."""
    template_lead_days: tuple[float, float] = (30.0, 730.0)
    """Uniform range of how many days before the search the template coadd was taken."""
    template_depth_mag: tuple[float, float] = (1.0, 1.5)
    """How much deeper the template coadd is than one frame (mag); sets the number of coadded frames."""
    max_offset: float = 30.0
    """Maximum template pointing offset per axis (pixels)."""
    max_rotation: float = 0.5
    """Maximum template rotation relative to the search grid (degrees)."""

    # --- PSF
    beta_range: tuple[float, float] = (2.5, 4.5)
    """Uniform range of the Moffat beta, drawn per exposure."""
    ellipticity_max: float = 0.08
    """Maximum PSF ellipticity |e| at the CCD centre."""
    ellipticity_gradient: float = 0.03
    """Typical change of e1, e2 from the centre to a CCD edge."""
    psf_variation: float = 0.06
    """Typical fractional FWHM change from the centre to a CCD edge (quadratic polynomial)."""
    psf_node_spacing: int = 2048
    """Spacing (px) of the PSF nodes used to convolve extended sources (bilinear interpolation)."""

    # --- scene
    star_density_range: tuple[float, float] = (2.0, 20.0)
    """Log-uniform range of the density of stars brighter than mag 24 (per arcmin^2), drawn per CCD."""
    star_slope: float = 0.25
    """Star number-count slope d log10 N / dm."""
    star_mag_bright: float = 12.0
    """Brightest star magnitude."""
    galaxy_density: float = 14.0
    """Density of galaxies brighter than mag 24 (per arcmin^2)."""
    galaxy_slope: float = 0.35
    """Galaxy number-count slope d log10 N / dm."""
    galaxy_mag_bright: float = 16.5
    """Brightest galaxy magnitude."""
    faint_limit_offset: float = 1.5
    """Stars and galaxies are simulated down to the search 5-sigma limit plus this (mag)."""
    galaxy_re_at_20: float = 1.2
    """Median half-light radius (arcsec) of a mag-20 galaxy; scales as 10**(-0.1 (m - 20))."""
    galaxy_re_scatter: float = 0.3
    """Log-normal scatter (natural log) of galaxy sizes."""
    galaxy_n_range: tuple[float, float] = (0.5, 4.0)
    """Range of the Sersic index."""
    galaxy_q_min: float = 0.2
    """Minimum galaxy axis ratio."""

    # --- transients and variables
    transient_density: float = 0.25
    """Transients per arcmin^2 (~40 per DECam CCD)."""
    hostless_fraction: float = 0.2
    """Fraction of transients without a host."""
    host_mag_faint: float = 23.5
    """Faintest galaxy that may host a transient."""
    transient_mag_bright: float = 18.0
    """Brightest transient magnitude (uniform in magnitude down to the faint limit)."""
    transient_faint_offset: float = 0.7
    """Faintest transient = search 5-sigma limit + this (mag)."""
    variable_fraction: float = 0.02
    """Fraction of stars between mag 16 and the 5-sigma limit that vary between the epochs."""
    variable_dmag_range: tuple[float, float] = (0.1, 1.0)
    """Range of |mag change| of variable stars."""
    star_shift_rms: float = 0.0
    """RMS per axis (arcsec) of each star's position in the template relative to the search
    (default 0: stars sit at the same sky position in both).  Real stars move between epochs:
    differential chromatic refraction (tens of mas between stars of different colour at
    airmass 1.3 in r), proper motion over the 30-730 day baseline (~5-20 mas/yr for field stars)
    and the per-star noise of the astrometric solutions (~20-30 mas for DES single epochs).  A
    global registration cannot remove per-star shifts, so bright stars leave dipole residuals in
    the difference, as in real survey subtractions.  ``0.03`` is DECam-like.  Drawn from a random
    stream of its own, so this changes no other draw of the simulation."""
    high_pm_fraction: float = 0.0
    """Fraction of stars with a large template-to-search shift (high proper motion, default 0),
    drawn uniformly in ``high_pm_shift_range`` in a random direction, on top of ``star_shift_rms``."""
    high_pm_shift_range: tuple[float, float] = (0.1, 0.5)
    """Range (arcsec) of the shift of high-proper-motion stars (``high_pm_fraction``)."""
    edge_margin: int = 10
    """Transients are placed at least this far (px) from the CCD edge."""

    # --- artifacts
    cosmic_ray_density: float = 1.0
    """Cosmic rays per arcmin^2 in a 90 s search exposure (~160 per DECam CCD); scales with exptime."""
    cosmic_ray_track_fraction: float = 0.6
    """Fraction of cosmic rays that are tracks/worms (the rest 1-2 pixel hits)."""
    hot_pixel_rate: float = 5.0
    """Hot pixels per million pixels (search only; the template coadd rejects them)."""
    bad_column_rate: float = 0.25
    """Bad column segments per million pixels (search only)."""
    defect_flagged_fraction: float = 0.5
    """Fraction of hot pixels and bad columns flagged BAD in the mask."""
    satellite_probability: float = 0.08
    """Probability of a satellite trail in each exposure of a CCD (search and template separately)."""
    edge_width: int = 4
    """Width (px) of the EDGE-flagged border."""
