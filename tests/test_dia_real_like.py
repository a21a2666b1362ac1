"""dia on a small, sparse, real-like pair: 256 x 256 sky-subtracted stacks with 9 stars and correlated noise.

Modelled on a real DECam pair of stacks (SFFT test data) on which the previous defaults failed with
"too few usable kernel-fit stars": the kernel-star S/N cut now adapts down to ``min_peak_snr_floor``
and the spatial / background orders fall back with the number of usable stars.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf

from dia import PsfMatchConfig, StarSelectionError, subtract
from dia.stars import choose_orders

SHAPE = (256, 256)
SEARCH_FWHM, TEMPLATE_FWHM = 3.9, 5.2
SEARCH_NOISE, TEMPLATE_NOISE = 18.0, 8.0  # per pixel [ADU], after the correlation
GAIN = 4.0
SMOOTH = 0.8  # [px] Gaussian that correlates the white noise (stacking, resampling)
# (x, y, flux in search ADU): 3 bright, 4 moderate, 2 close to the border; the template has the same fluxes
STARS = np.array([(100, 73, 3.0e5), (57, 180, 8.0e5), (178, 202, 1.0e5), (104, 233, 1.0e5), (124, 210, 3.0e4),
                  (69, 123, 1.6e4), (236, 158, 1.6e4), (5, 126, 3.0e5), (250, 103, 2.0e4)])
TRANSIENT = (130.0, 130.0, 2.0e4)  # in the search only


def _render(xs, ys, fluxes, fwhm, hw=20):
    """Pixel-integrated Gaussian point sources."""
    img = np.zeros(SHAPE)
    s = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    for x0, y0, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x0)), int(round(y0))
        x1, x2 = max(ix - hw, 0), min(ix + hw + 1, SHAPE[1])
        y1, y2 = max(iy - hw, 0), min(iy + hw + 1, SHAPE[0])
        px = np.diff(erf((np.arange(x1, x2 + 1) - 0.5 - x0) / (math.sqrt(2) * s))) / 2
        py = np.diff(erf((np.arange(y1, y2 + 1) - 0.5 - y0) / (math.sqrt(2) * s))) / 2
        img[y1:y2, x1:x2] += f * np.outer(py, px)
    return img


def _correlated(rng, sigma):
    """White noise smoothed by a Gaussian of SMOOTH px, scaled to per-pixel std ``sigma``."""
    white = rng.normal(size=SHAPE)
    field = ndimage.gaussian_filter(white, SMOOTH, mode="wrap")
    return field * (sigma / field.std())


def make_real_like_pair(seed=5):
    """Search (sharper, noisier per pixel, with a transient) and template; variance = sky + source / gain."""
    rng = np.random.default_rng(seed)
    x, y, f = STARS.T
    s_model = _render(np.r_[x, TRANSIENT[0]], np.r_[y, TRANSIENT[1]], np.r_[f, TRANSIENT[2]], SEARCH_FWHM)
    t_model = _render(x, y, f, TEMPLATE_FWHM)
    planes = {}
    for name, model, sigma in (("search", s_model, SEARCH_NOISE), ("template", t_model, TEMPLATE_NOISE)):
        var = sigma**2 + np.maximum(model, 0) / GAIN
        source_noise = rng.normal(size=SHAPE) * np.sqrt(np.maximum(model, 0) / GAIN)
        planes[name] = (model + _correlated(rng, sigma) + source_noise).astype(np.float32)
        planes[name + "_variance"] = var.astype(np.float32)
        planes[name + "_mask"] = np.zeros(SHAPE, np.int32)
    return planes


def _run(planes, config):
    return subtract(planes["search"], planes["search_variance"], planes["search_mask"], planes["template"],
                    planes["template_variance"], planes["template_mask"], search_fwhm=SEARCH_FWHM,
                    template_fwhm=TEMPLATE_FWHM, config=config)


def _blank(planes, diff):
    """Pixels away from every source (both models), unflagged."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    near = np.zeros(SHAPE, bool)
    for x0, y0, _ in list(STARS) + [TRANSIENT]:
        near |= (xx - x0) ** 2 + (yy - y0) ** 2 < 20**2
    return ~near & (diff.mask == 0)


def _robust_std(v):
    return 1.4826 * float(np.median(np.abs(v - np.median(v))))


@pytest.fixture(scope="module")
def pair():
    return make_real_like_pair()


@pytest.fixture(scope="module")
def diff(pair):
    return _run(pair, PsfMatchConfig())


def test_previous_defaults_fail_on_the_small_frame(pair):
    """The fixed cut (min_peak_snr 25) and no order fallback: 'too few usable kernel-fit stars'."""
    old = PsfMatchConfig(order_fallback=False, min_peak_snr_floor=25.0)
    with pytest.raises(StarSelectionError, match=r"too few usable kernel-fit stars.*psf_match\.min_stars") as exc:
        _run(pair, old)
    assert exc.value.usable < 10 and exc.value.rejected["edge"] >= 2


def test_new_defaults_fit_with_lowered_orders_and_record_them(diff):
    s = diff.stats
    assert 6 <= s.used <= 8  # 7 stars away from the border, 2 within the kernel + stamp margin
    assert s.rejected["edge"] >= 2
    assert (s.spatial_order, s.background_order) == (1, 1) == (diff.solution.spatial_order,
                                                               diff.solution.background_order)
    assert "min_stars" in s.fallback and "spatial_order 1" in s.fallback
    assert 10.0 <= s.peak_snr_cut < 25.0  # lowered, not below min_peak_snr_floor


def test_blank_sky_noise_and_transient(pair, diff):
    """Blank-sky D has the noise predicted for the fitted kernel; the transient keeps its flux.

    The input variance is right per pixel, but the noise is correlated (smoothed), so convolving it
    with the kernel gives more than sum(K^2) x variance (~1.25 x in std); the prediction here convolves
    fresh noise fields made the same way with the fitted kernel.  The variance plane accounts for it
    (``noise_correlation``, measured on the convolved image): D / sqrt(V) has a robust std of ~1.
    """
    blank = _blank(pair, diff)
    d, v = np.asarray(diff.image, float), np.asarray(diff.variance, float)
    sol = diff.solution
    kernel = sol.kernel_at(128, 128) / sol.kernel_sum_at(128, 128)
    rng = np.random.default_rng(99)
    pure = ndimage.convolve(_correlated(rng, SEARCH_NOISE), kernel, mode="wrap") - _correlated(rng, TEMPLATE_NOISE)
    assert diff.convolved == "search"
    assert 0.95 <= _robust_std(d[blank]) / _robust_std(pure) <= 1.10
    z = d[blank] / np.sqrt(v[blank])
    # the background re-fitted on the sky (background_fit="sky"): the stamp fit alone left ~0.2 sigma
    assert abs(float(np.median(z))) < 0.1
    assert 0.95 <= _robust_std(z) <= 1.10
    assert diff.stats.noise_correlation_factor > 1.2
    # without the correlation measurement the plane under-describes the noise by the white-noise prediction's factor
    plain = _run(pair, PsfMatchConfig(noise_correlation=False))
    zp = np.asarray(plain.image, float)[blank] / np.sqrt(np.asarray(plain.variance, float)[blank])
    white = ndimage.convolve(rng.normal(size=SHAPE) * SEARCH_NOISE, kernel, mode="wrap") + \
        rng.normal(size=SHAPE) * TEMPLATE_NOISE
    assert 0.95 <= _robust_std(zp) / (_robust_std(pure) / _robust_std(white)) <= 1.10
    # aperture flux of the transient (radius 3 FWHM of the search, local median subtracted)
    x0, y0, f0 = TRANSIENT
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    ap = (xx - x0) ** 2 + (yy - y0) ** 2 < (3 * SEARCH_FWHM) ** 2
    assert abs(d[ap].sum() - f0) < 0.1 * f0
    # bright-star residuals: small against the star's flux
    for x, y, f in STARS[:4]:
        ap = (xx - x) ** 2 + (yy - y) ** 2 < (3 * SEARCH_FWHM) ** 2
        assert abs(d[ap].sum()) < 0.02 * f


def test_choose_orders_follows_the_number_of_stars():
    c = PsfMatchConfig()
    assert choose_orders(10, c) == (2, 1, "")
    assert choose_orders(6, c)[:2] == (1, 1)
    assert choose_orders(5, c)[:2] == (0, 0)
    assert choose_orders(3, c)[:2] == (0, 0)
    assert choose_orders(2, c) is None
    assert choose_orders(9, PsfMatchConfig(order_fallback=False)) is None
    assert choose_orders(6, PsfMatchConfig(background_order=0))[:2] == (1, 0)


def test_too_few_stars_even_for_a_fallback_names_the_settings(pair):
    keep = {k: v.copy() for k, v in pair.items()}
    # blank out all but two stars in both images (masked as NO_DATA would hide them from the fit too)
    for x, y, _ in STARS[2:]:
        for name in ("search", "template"):
            keep[name][int(y) - 15 : int(y) + 16, int(x) - 15 : int(x) + 16] = 0.0
    with pytest.raises(StarSelectionError, match=r"fallback_min_stars.*\[.*min_peak_snr"):
        _run(keep, PsfMatchConfig())
