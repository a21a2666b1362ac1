"""Tests of dia/: Alard-Lupton PSF matching and subtraction on synthetic star fields made here."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.special import erf

from dia import MaskBits, PsfMatchConfig, StarSelectionError, estimate_fwhm, subtract
from dia.backend import get_backend
from dia.basis import make_basis
from dia.subtract import subtract_on_backend

SIG = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _render(shape, xs, ys, fluxes, fwhm_at, hw=15):
    """Pixel-integrated Gaussian stars; the FWHM varies over the image as ``fwhm_at(x, y)``."""
    ny, nx = shape
    img = np.zeros(shape)
    for x0, y0, f in zip(xs, ys, fluxes):
        s = fwhm_at(x0, y0) * SIG
        ix, iy = int(round(x0)), int(round(y0))
        x1, x2 = max(ix - hw, 0), min(ix + hw + 1, nx)
        y1, y2 = max(iy - hw, 0), min(iy + hw + 1, ny)
        ex = np.arange(x1, x2 + 1) - 0.5 - x0
        ey = np.arange(y1, y2 + 1) - 0.5 - y0
        px = np.diff(erf(ex / (math.sqrt(2) * s))) / 2
        py = np.diff(erf(ey / (math.sqrt(2) * s))) / 2
        img[y1:y2, x1:x2] += f * np.outer(py, px)
    return img


@dataclasses.dataclass
class Pair:
    search: np.ndarray
    search_var: np.ndarray
    search_mask: np.ndarray
    template: np.ndarray
    template_var: np.ndarray
    template_mask: np.ndarray
    search_fwhm: float
    template_fwhm: float
    star_xy: np.ndarray
    star_flux: np.ndarray  # in search ADU
    trans_xy: np.ndarray
    trans_flux: np.ndarray  # in search ADU
    search_fwhm_at: object
    template_fwhm_at: object


def make_pair(seed=1, shape=(512, 512), search_fwhm=4.0, template_fwhm=2.8, template_scale=1.4, n_stars=260, n_trans=6,
              saturation=30000.0):
    """A search/template pair with known truth.

    Stars with log-uniform fluxes, PSF widths that vary linearly across the
    image (differently in the two images), template flux scale ``template_scale``
    and a sky gradient, Gaussian noise with the variance stored in the variance
    plane, saturated pixels clipped and flagged SAT, transients in the search only.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    xs = rng.uniform(5, nx - 5, n_stars)
    ys = rng.uniform(5, ny - 5, n_stars)
    flux = np.exp(rng.uniform(np.log(300), np.log(3e5), n_stars))
    # transients away from the stars
    tx, ty = [], []
    while len(tx) < n_trans:
        x, y = rng.uniform(40, nx - 40), rng.uniform(40, ny - 40)
        if np.min(np.hypot(xs - x, ys - y)) > 15 and all(np.hypot(x - a, y - b) > 30 for a, b in zip(tx, ty)):
            tx.append(x)
            ty.append(y)
    tflux = rng.uniform(3000, 12000, n_trans)

    def s_fwhm(x, y):
        return search_fwhm * (1 + 0.08 * (2 * x / nx - 1) - 0.05 * (2 * y / ny - 1))

    def t_fwhm(x, y):
        return template_fwhm * (1 - 0.04 * (2 * x / nx - 1) + 0.08 * (2 * y / ny - 1))

    yy, xx = np.mgrid[0:ny, 0:nx]
    s_model = _render(shape, xs, ys, flux, s_fwhm) + _render(shape, tx, ty, tflux, s_fwhm) + 300.0
    t_model = template_scale * _render(shape, xs, ys, flux, t_fwhm) + 500.0 + 0.1 * xx - 0.05 * yy
    s_var = s_model / 1.0 + 25.0
    t_var = t_model / 4.0 + 6.0
    s_img = s_model + rng.normal(size=shape) * np.sqrt(s_var)
    t_img = t_model + rng.normal(size=shape) * np.sqrt(t_var)
    masks = []
    for img in (s_img, t_img):
        m = np.zeros(shape, np.int32)
        sat = img >= saturation
        m[sat] = MaskBits.SAT
        img[sat] = saturation
        masks.append(m)
    return Pair(
        s_img.astype(np.float32), s_var.astype(np.float32), masks[0],
        t_img.astype(np.float32), t_var.astype(np.float32), masks[1],
        search_fwhm, template_fwhm, np.column_stack([xs, ys]), flux, np.column_stack([tx, ty]), tflux, s_fwhm, t_fwhm,
    )


def swapped(p: Pair) -> Pair:
    """The same field with the roles swapped: the template now has the wider PSF."""
    return make_pair(seed=2, search_fwhm=2.8, template_fwhm=4.0, template_scale=0.7)


def run(p: Pair, **cfg):
    return subtract(p.search, p.search_var, p.search_mask, p.template, p.template_var, p.template_mask,
                    search_fwhm=p.search_fwhm, template_fwhm=p.template_fwhm, config=PsfMatchConfig(**cfg))


def _blank(p: Pair, d, radius=14.0):
    ny, nx = d.image.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ok = d.mask == 0
    pts = np.vstack([p.star_xy, p.trans_xy])
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(pts).query(np.column_stack([xx.ravel(), yy.ravel()]))
    return ok & (dist.reshape(ny, nx) > radius)


def _aperture(d, x, y, r):
    ny, nx = d.image.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ap = np.hypot(xx - x, yy - y) <= r
    return float(d.image[ap].sum()), ap


def _blank_aperture_std(p, d, r, n=300, seed=5):
    """Empirical std of aperture sums on blank sky (includes the noise correlation of the convolution)."""
    rng = np.random.default_rng(seed)
    blank = _blank(p, d, radius=r + 8)
    ny, nx = d.image.shape
    sums = []
    tries = 0
    while len(sums) < n and tries < 20000:
        tries += 1
        x, y = rng.integers(r + 1, nx - r - 1), rng.integers(r + 1, ny - r - 1)
        if blank[y, x]:
            sl = (slice(y - int(r), y + int(r) + 1), slice(x - int(r), x + int(r) + 1))
            if blank[sl].all():
                sums.append(_aperture(d, x, y, r)[0])
    assert len(sums) > 50
    return float(np.std(sums))


def check_quality(p: Pair, d, fwhm_out):
    """(a) blank-sky normalised noise, (b) bright-star residuals, (c) transient fluxes."""
    blank = _blank(p, d)
    z = d.image[blank] / np.sqrt(d.variance[blank])
    assert 0.95 <= np.std(z) <= 1.10, np.std(z)
    assert abs(np.mean(z)) < 0.05, np.mean(z)

    r = 2.0 * fwhm_out
    sig_ap = _blank_aperture_std(p, d, r)
    ny, nx = d.image.shape
    # (b) brightest stars whose aperture is unmasked
    order = np.argsort(-p.star_flux)
    checked = 0
    for i in order:
        x, y = p.star_xy[i]
        if not (r + 2 < x < nx - r - 2 and r + 2 < y < ny - r - 2):
            continue
        res, ap = _aperture(d, x, y, r)
        if (d.mask[ap] != 0).any():
            continue
        # noise: blank-sky aperture noise plus the star's own extra variance
        extra = float(d.variance[ap].sum() - np.median(d.variance[blank]) * ap.sum())
        sigma = math.sqrt(sig_ap**2 + max(extra, 0.0) * (sig_ap**2 / (np.median(d.variance[blank]) * ap.sum())))
        assert abs(res) < 0.02 * p.star_flux[i], (res, p.star_flux[i])
        assert abs(res) < 4.0 * sigma, (res, sigma, p.star_flux[i])
        checked += 1
        if checked == 5:
            break
    assert checked == 5
    # (c) transients: aperture flux in search ADU within 3 sigma of the truth
    for (x, y), f in zip(p.trans_xy, p.trans_flux):
        got, ap = _aperture(d, x, y, r)
        # aperture loss of a Gaussian of the difference's PSF width inside radius r
        s = fwhm_out * SIG
        frac = 1 - math.exp(-0.5 * (r / s) ** 2)
        sigma = math.sqrt(sig_ap**2 + f * frac)
        assert abs(got - f * frac) < 3.0 * sigma, (got, f * frac, sigma)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def diff(pair):
    return run(pair)


def test_basis_sums_and_size():
    cfg = PsfMatchConfig()
    b = make_basis(4.0, 2.8, cfg)
    assert b.n_basis == 15 + 6 + 6
    assert abs(b.images[0].sum() - 1) < 1e-12
    assert np.all(np.abs(b.images[1:].sum(axis=(1, 2))) < 1e-10)
    assert b.size % 2 == 1 and 21 <= b.size <= 35
    # widths from the PSFs: sigma_K = sqrt(s_wide^2 - s_narrow^2), beta = 2 steps
    sk = math.sqrt((4.0 * SIG) ** 2 - (2.8 * SIG) ** 2)
    assert b.sigmas[1] == pytest.approx(max(sk / 2, 0.7) * 2)
    wide = make_basis(12.0, 3.0, cfg)
    assert wide.size == 35
    hot = make_basis(4.0, 2.8, PsfMatchConfig(kernel_sigmas=(0.7, 1.5, 3.0), kernel_degrees=(6, 4, 2), kernel_size=21))
    assert hot.n_basis == 49 and hot.size == 21


def test_quality_template_convolved(pair, diff):
    assert diff.convolved == "template"
    assert diff.stats.used >= 10
    check_quality(pair, diff, pair.search_fwhm)
    assert set(diff.timings) >= {"select", "fit", "convolve", "variance"}


def test_hotpants_basis_configuration(pair):
    """A HOTPANTS-like fixed basis (49 functions) is a configuration, not another code path."""
    d = run(pair, kernel_sigmas=(0.7, 1.5, 3.0), kernel_degrees=(6, 4, 2), kernel_size=21)
    assert d.solution.basis.n_basis == 49 and d.solution.coefficients.shape == (49, 6)
    check_quality(pair, d, pair.search_fwhm)


def test_photometric_scale_and_spatial_kernel(pair, diff):
    sol = diff.solution
    # template fluxes are 1.4 x search: the kernel sum must be 1/1.4
    assert sol.kernel_sum_centre == pytest.approx(1 / 1.4, rel=0.01)
    # the kernel at two corners differs as the truth does: its second moment is
    # sigma_S^2 - sigma_T^2, which varies across the image
    ny, nx = pair.search.shape
    for x, y in ((60, 60), (nx - 60, ny - 60)):
        k = sol.kernel_at(x, y)
        hw = k.shape[0] // 2
        u = np.arange(-hw, hw + 1)
        m2 = (k * (u[None, :] ** 2 + u[:, None] ** 2)).sum() / k.sum() / 2
        truth = (pair.search_fwhm_at(x, y) * SIG) ** 2 - (pair.template_fwhm_at(x, y) * SIG) ** 2
        assert m2 == pytest.approx(truth, rel=0.1)
    k1, k2 = sol.kernel_at(60, 60), sol.kernel_at(nx - 60, ny - 60)
    assert np.abs(k1 - k2).max() > 0.05 * k1.max()


def test_mask_is_or_and_grown(pair, diff):
    assert diff.mask.dtype == np.int32
    sat_t = (pair.template_mask & MaskBits.SAT) != 0
    assert np.all((diff.mask[sat_t] & MaskBits.SAT) != 0)
    assert np.all((diff.mask[(pair.search_mask & MaskBits.SAT) != 0] & MaskBits.SAT) != 0)
    hw = diff.solution.basis.half_width
    ys, xs = np.nonzero(sat_t)
    y, x = ys[0], xs[0]
    assert diff.mask[min(y + hw, 511), x] & MaskBits.CONVOLVED
    assert diff.mask[0, 256] & MaskBits.CONVOLVED  # the border is incomplete


def test_swapped_psfs_both_directions():
    p = swapped(None)
    auto = run(p)
    assert auto.convolved == "search"
    check_quality(p, auto, p.template_fwhm)
    # flux scale 0.7 means the kernel taking the search to the template sums to 0.7
    assert auto.solution.kernel_sum_centre == pytest.approx(0.7, rel=0.02)
    # forcing the template to be convolved with its wider PSF is a deconvolution: the fit
    # must still run, but quality is not physically meaningful; only check it runs
    forced = run(p, convolve="template")
    assert forced.convolved == "template"
    assert np.isfinite(forced.image[forced.mask == 0]).all()


def test_forced_search_on_normal_pair(pair):
    # search convolved although its PSF is the wider one: a mild deconvolution; noise and
    # transient fluxes stay on the search scale
    d = run(pair, convolve="search")
    assert d.convolved == "search"
    blank = _blank(pair, d)
    z = d.image[blank] / np.sqrt(d.variance[blank])
    assert abs(np.mean(z)) < 0.1


def test_too_few_stars_and_bad_inputs(pair):
    rng = np.random.default_rng(3)
    shape = (256, 256)

    def sky():
        return (100 + rng.normal(size=shape) * 10).astype(np.float32)

    var = np.full(shape, 100, np.float32)
    m = np.zeros(shape, np.int32)
    with pytest.raises(StarSelectionError) as exc:
        subtract(sky(), var, m, sky(), var, m, search_fwhm=3.0, template_fwhm=2.0)
    msg = str(exc.value)
    assert "too few usable kernel-fit stars" in msg and "found" in msg
    # a few stars, most saturated: reasons are counted
    p = make_pair(seed=4, n_stars=12, saturation=2000.0)
    with pytest.raises(StarSelectionError) as exc:
        run(p)
    assert "saturated:" in str(exc.value)
    assert exc.value.rejected["saturated"] > 0
    allm = np.full(pair.search.shape, MaskBits.NO_DATA, np.int32)
    with pytest.raises(ValueError, match="template: every pixel is masked"):
        subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var, allm,
                 search_fwhm=4, template_fwhm=2.8)
    with pytest.raises(ValueError, match="template_variance has shape"):
        subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var[:10],
                 pair.template_mask, search_fwhm=4, template_fwhm=2.8)
    with pytest.raises(ValueError, match="search_fwhm must be a positive"):
        subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var, pair.template_mask,
                 search_fwhm=0, template_fwhm=2.8)
    with pytest.raises(ValueError, match="device must be"):
        subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var, pair.template_mask,
                 search_fwhm=4, template_fwhm=2.8, device="tpu")


def test_gpu_without_cupy_is_clear(pair):
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install transient-pipeline\[gpu\]"):
            subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var,
                     pair.template_mask, search_fwhm=4, template_fwhm=2.8, device="gpu")
    else:
        pytest.skip("CuPy is installed")


def _planes(p: Pair) -> dict:
    return dict(search=p.search, search_variance=p.search_var, search_mask=p.search_mask, template=p.template,
                template_variance=p.template_var, template_mask=p.template_mask)


@pytest.mark.parametrize("band_rows", [None, 100])
def test_one_fft_per_spatial_term(pair, band_rows):
    """Full-frame cost per band.

    reference: 1 forward + one 2-D inverse per spatial term for the image, 2 for the variance;
    fused: 1 forward, one inverse along y per spatial term, one inverse along x per power of x
    (3 for spatial order 2), 2 for the variance.
    """
    from dia.fused import band_layout

    for path in ("reference", "fused"):
        calls = []
        be = get_backend("cpu")
        be.fft_hook = calls.append
        cfg = PsfMatchConfig(path=path, fft_band_rows=band_rows)
        d = subtract_on_backend(be, _planes(pair), search_fwhm=4.0, template_fwhm=2.8, config=cfg)
        n_spatial = len(d.solution.spatial_terms)
        assert n_spatial == 6
        n_bands = calls.count("image-forward")
        assert calls.count("variance-forward") == calls.count("variance-term") == n_bands
        if path == "reference":
            assert n_bands == math.ceil(pair.search.shape[0] / (band_rows or pair.search.shape[0]))
            assert calls.count("image-term") == n_spatial * n_bands
            assert len(calls) == (n_spatial + 3) * n_bands
        else:
            rows, _ = band_layout(pair.search.shape[0], band_rows, d.solution.basis.half_width)
            assert n_bands == math.ceil(pair.search.shape[0] / rows) == math.ceil(pair.search.shape[0]
                                                                                  / (band_rows or 512))
            assert calls.count("image-term-y") == n_spatial * n_bands
            assert calls.count("image-term-x") == 3 * n_bands  # powers 0, 1, 2 of xn
            assert len(calls) == (n_spatial + 3 + 3) * n_bands
        assert d.solution.basis.n_basis == 27  # far fewer FFTs than basis functions


def _agree(ref, new, bound=1e-3):
    """The fused path reproduces the reference: same mask, same stars, difference within float32 noise."""
    assert np.array_equal(ref.mask, new.mask)
    assert ref.stats.used == new.stats.used and ref.convolved == new.convolved
    assert np.allclose(ref.solution.coefficients, new.solution.coefficients, rtol=1e-6, atol=1e-8)
    ok = ref.mask == 0
    sigma = np.sqrt(ref.variance[ok])
    assert np.max(np.abs(new.image[ok] - ref.image[ok]) / sigma) < bound
    assert np.allclose(new.variance[ok], ref.variance[ok], rtol=1e-5)
    assert new.image.dtype == ref.image.dtype and new.mask.dtype == np.int32


@pytest.mark.parametrize("case", ["template", "search", "hotpants", "background_order_2", "band_rows_100", "odd_shape"])
def test_fused_path_equals_reference(pair, case):
    """Both implementations (PsfMatchConfig.path) give the same difference, variance and mask."""
    p, cfg = pair, {}
    if case == "search":
        p = swapped(None)
    elif case == "hotpants":
        cfg = dict(kernel_sigmas=(0.7, 1.5, 3.0), kernel_degrees=(6, 4, 2), kernel_size=21)
    elif case == "background_order_2":  # a background power of x with no spatial-kernel group of its own
        cfg = dict(spatial_order=1, background_order=2)
    elif case == "band_rows_100":
        cfg = dict(fft_band_rows=100)
    elif case == "odd_shape":  # shapes that are not multiples of the band or the background cells
        p, cfg = make_pair(seed=3, shape=(333, 611), n_stars=200), dict(fft_band_rows=100)
    ref, new = run(p, path="reference", **cfg), run(p, path="fused", **cfg)
    assert new.convolved == ("search" if case == "search" else "template")
    _agree(ref, new)


def test_fused_path_masks_and_non_finite_inputs(pair):
    """Flagged, NaN and infinite pixels in either image: the same mask and values in both paths."""
    p = dataclasses.replace(pair, template=pair.template.copy(), template_var=pair.template_var.copy(),
                            template_mask=pair.template_mask.copy(), search=pair.search.copy())
    p.template[100:104, 200:203] = np.nan  # in the convolved image
    p.template[300, 50] = np.inf
    p.template_var[400, 400] = np.nan
    p.template_mask[:, 5] |= MaskBits.BAD  # a bad column next to the border
    p.template_mask[250:260, 500:512] |= MaskBits.NO_DATA  # at the right edge
    p.template_mask[30, 30] |= MaskBits.SUSPECT  # not in grow_bits: not grown
    p.search[150, 150] = np.nan  # in the reference: NO_DATA there
    ref, new = run(p, path="reference"), run(p, path="fused")
    _agree(ref, new)
    assert new.mask[150, 150] & MaskBits.NO_DATA
    hw = new.solution.basis.half_width
    assert new.mask[102 + hw, 201] & MaskBits.CONVOLVED and not new.mask[102 + hw + 2, 201] & MaskBits.CONVOLVED
    assert new.mask[300, 50 - hw] & MaskBits.CONVOLVED
    assert not new.mask[30 + hw + 2, 30] & MaskBits.CONVOLVED
    assert np.all(new.mask[:, : 5 + hw + 1] & MaskBits.CONVOLVED)
    assert np.isfinite(new.image[new.mask == 0]).all()


def test_running_or_equals_maximum_filter():
    """Mask growth by doubling ORs is exactly the box maximum filter (border counts as flagged or not)."""
    from scipy import ndimage

    from dia.fused import grow_mask_box, window_or

    rng = np.random.default_rng(11)
    for shape, density, hw in (((40, 57), 0.01, 3), ((64, 33), 0.002, 10), ((25, 25), 0.0, 12), ((30, 70), 0.05, 0)):
        flagged = rng.random(shape) < density
        for border in (True, False):
            want = ndimage.maximum_filter(flagged.astype(np.uint8), size=2 * hw + 1, mode="constant",
                                          cval=int(border)).astype(bool)
            assert np.array_equal(grow_mask_box(np, flagged, hw, border=border), want)
    a = rng.random((50, 9)) < 0.05
    for length in (1, 2, 3, 5, 8, 21):
        got = window_or(a, length, axis=0)
        want = np.array([a[k : k + length].any(axis=0) for k in range(a.shape[0] - length + 1)])
        assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="window length"):
        window_or(a, 0, axis=0)


def test_separable_stamp_convolutions_equal_fft(pair, diff):
    """The fit's stamp convolutions by 1-D matrix passes equal the FFT ones; a non-separable basis falls back."""
    from dia.basis import separable_basis
    from dia.fit import stamp_equations

    be = get_backend("cpu")
    basis = diff.solution.basis
    sep = separable_basis(basis)
    assert sep is not None and len(sep.factors) == 5 + 3 + 3
    outer = np.einsum("kv,ku->kvu", sep.fy, sep.fx)
    recon = sep.scale[:, None, None] * outer - sep.offset[:, None, None] * basis.images[0]
    assert np.max(np.abs(recon - basis.images)) < 1e-12
    rng = np.random.default_rng(2)
    ys, xs = rng.integers(30, 480, 40), rng.integers(30, 480, 40)
    args = (be, basis, pair.template, pair.template_var, pair.search, pair.search_var, pair.search_mask, ys, xs, 11)
    fft = stamp_equations(*args, method="fft")
    sepr = stamp_equations(*args, method="separable", chunk=16)
    for a, b in zip(fft, sepr):
        assert np.allclose(a, b, rtol=1e-9, atol=1e-9 * np.max(np.abs(a)))
    odd = dataclasses.replace(basis, images=basis.images + 1e-3 * rng.normal(size=basis.images.shape))
    assert separable_basis(odd) is None
    fallback = stamp_equations(be, odd, *args[2:], method="separable")
    assert np.allclose(fallback[0], stamp_equations(be, odd, *args[2:], method="fft")[0])


def test_strided_gather_and_peaks_with_non_finite_pixels(pair):
    """The NumPy stamp gather equals per-pixel indexing; NaN/inf pixels change no peak between the two finders."""
    from dia.stars import _gather, select_stars

    rng = np.random.default_rng(4)
    ys, xs = rng.integers(12, 500, 30), rng.integers(12, 500, 30)
    off = np.arange(-11, 12)
    want = pair.template[(ys[:, None] + off)[:, :, None], (xs[:, None] + off)[:, None, :]]
    assert np.array_equal(_gather(np, pair.template, ys, xs, 11), want)

    img = pair.template.copy()
    # an unsaturated star well inside the image: its brightest pixel, then its neighbours made non-finite
    k = int(np.argmin(np.abs(pair.star_flux - 2e4) + 1e9 * ((pair.star_xy < 30) | (pair.star_xy > 480)).any(axis=1)))
    cx, cy = np.round(pair.star_xy[k]).astype(int)
    dy, dx = np.unravel_index(np.argmax(img[cy - 2 : cy + 3, cx - 2 : cx + 3]), (5, 5))
    peak = (cy - 2 + dy, cx - 2 + dx)
    img[peak[0], peak[1] + 1] = np.inf  # a star's neighbour: that star stays a peak, inf is none
    img[peak[0] + 1, peak[1]] = np.nan
    from scipy.spatial import cKDTree

    far = cKDTree(pair.star_xy).query(np.array([[x, y] for y in range(20, 500, 7) for x in range(20, 500, 7)]))[0]
    blank = [(y, x) for (y, x), dist in zip([(y, x) for y in range(20, 500, 7) for x in range(20, 500, 7)], far)
             if dist > 20]
    img[blank[0][0] : blank[0][0] + 2, blank[0][1] : blank[0][1] + 2] = np.nan
    img[blank[-1]] = np.inf  # an isolated infinite pixel is not a peak
    be = get_backend("cpu")
    found = []
    for method, image in (("sparse", img), ("filter", img), ("sparse", pair.template)):
        s = select_stars(be, image, pair.template_var, pair.template_mask, pair.search, pair.search_var,
                         pair.search_mask, core_hw=11, kernel_hw=10, config=PsfMatchConfig(), peak_method=method)
        found.append(s)
    a, b, clean = found
    assert a.found == b.found == clean.found and a.rejected == b.rejected
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


def test_peak_methods_agree(pair):
    """The GPU default (full-frame maximum filter) and the CPU default (sparse) find the same stars."""
    from dia.stars import select_stars

    be = get_backend("cpu")
    args = (be, pair.template, pair.template_var, pair.template_mask, pair.search, pair.search_var, pair.search_mask)
    a = select_stars(*args, core_hw=11, kernel_hw=10, config=PsfMatchConfig(), peak_method="sparse")
    b = select_stars(*args, core_hw=11, kernel_hw=10, config=PsfMatchConfig(), peak_method="filter")
    assert a.found == b.found and a.rejected == b.rejected
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.y.size >= 20
    # spread over the image: every quadrant has stars
    quads = {(int(y >= 256), int(x >= 256)) for y, x in zip(a.y, a.x)}
    assert len(quads) == 4


def test_banded_equals_full_frame(pair):
    """Overlap-save bands give the full-frame convolution (to float32 rounding)."""
    full = run(pair, fft_band_rows=None)
    band = run(pair, fft_band_rows=100)
    ok = full.mask == 0
    scale = np.sqrt(np.median(full.variance[ok]))
    assert np.max(np.abs(full.image[ok] - band.image[ok])) < 1e-3 * scale
    assert np.allclose(full.variance[ok], band.variance[ok], rtol=1e-5)
    assert np.array_equal(full.mask, band.mask)


def test_small_solvers_and_block_median():
    """The host solvers (NumPy Cholesky on CPU, stacked LAPACK as used on GPU) and the sort-based block median."""
    from dia.fit import _ridge_solve
    from dia.stars import _block_median

    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 30, 30))
    a = a @ a.transpose(0, 2, 1) + 30 * np.eye(30)
    x = rng.normal(size=(5, 30))
    b = np.einsum("nij,nj->ni", a, x)
    for lapack in (False, True):
        assert np.allclose(_ridge_solve(a, b, 0.0, lapack), x, rtol=1e-6, atol=1e-8)
        assert np.allclose(_ridge_solve(a[0], b[0], 0.0, lapack), x[0], rtol=1e-6, atol=1e-8)
    cells = rng.normal(size=(6, 101)).astype(np.float32)
    cells[0, :40] = np.nan
    cells[1, :] = np.nan
    cells[2, :100] = np.nan
    med, n = _block_median(np, cells)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        ref = np.nanmedian(cells, axis=1)
    assert np.allclose(med, ref, equal_nan=True)
    assert list(n[:3]) == [61, 0, 1]


def test_estimate_fwhm(pair):
    got = estimate_fwhm(pair.search, pair.search_mask, saturation=30000)
    assert got == pytest.approx(pair.search_fwhm, rel=0.08)
    got_t = estimate_fwhm(pair.template, pair.template_mask, saturation=30000)
    assert got_t == pytest.approx(pair.template_fwhm, rel=0.08)
    with pytest.raises(ValueError, match="every pixel is masked"):
        estimate_fwhm(pair.search, np.full(pair.search.shape, MaskBits.BAD, np.int32))


def test_decorrelation_whitens(pair):
    d = run(pair, decorrelate=True)
    assert d.decorrelated
    blank = _blank(pair, d, radius=18)
    z = d.image / np.sqrt(d.variance)
    zb = z[blank]
    assert 0.95 <= np.std(zb) <= 1.10
    # neighbour correlation of the noise: small after decorrelation
    zz = np.where(blank, z, np.nan)
    a, b = zz[:, :-1].ravel(), zz[:, 1:].ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    assert abs(np.corrcoef(a[ok], b[ok])[0, 1]) < 0.05


def _numpy_as_device():
    """A stand-in array module for the GPU code paths: NumPy under a name that is not ``numpy``, with
    CuPy's ``asnumpy`` and stream synchronisation (no CUDA needed)."""
    import types

    shim = types.ModuleType("fake_device_xp")
    shim.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.asnumpy = np.asarray
    stream = types.SimpleNamespace(synchronize=lambda: None)
    shim.cuda = types.SimpleNamespace(Stream=types.SimpleNamespace(null=stream))
    return shim


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_device_code_paths_on_a_numpy_stand_in(pair, diff, path):
    """The branches taken on a GPU (one band, all stamps in one chunk, full-frame peak filter, per-pixel
    gathers, LAPACK solves) run through ``xp`` and give the CPU result, for both implementations."""
    import scipy.fft
    import scipy.ndimage

    from dia.backend import Backend

    be = Backend("gpu", _numpy_as_device(), scipy.fft, scipy.ndimage)
    cfg = PsfMatchConfig(path=path)
    d = subtract_on_backend(be, _planes(pair), search_fwhm=4.0, template_fwhm=2.8, config=cfg)
    _agree(diff, d.to_numpy())
    assert set(d.timings) >= {"select", "fit", "convolve", "variance", "mask"}


def test_xp_generic_numpy_and_gpu_agree(pair, diff):
    """The CuPy path runs the same functions; here they run with xp=numpy, on GPU they are compared.

    float64: GPU and CPU agree to 1e-4 relative (to max(|D|, sigma)); float32 (the default) agrees
    to 1e-3 of the local noise (FFT rounding of ~1e5 ADU star pixels in float32).
    """
    be = get_backend("cpu")
    assert be.xp is np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip("CuPy with a CUDA device is not available")
    for cfg, bound, ref in ((PsfMatchConfig(float32=False), 1e-4, None), (PsfMatchConfig(), 1e-3, diff)):
        if ref is None:
            ref = subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var,
                           pair.template_mask, search_fwhm=4.0, template_fwhm=2.8, config=cfg)
        g = subtract(pair.search, pair.search_var, pair.search_mask, pair.template, pair.template_var,
                     pair.template_mask, search_fwhm=4.0, template_fwhm=2.8, config=cfg, device="gpu")
        assert isinstance(g.image, cupy.ndarray)
        g = g.to_numpy()
        ok = ref.mask == 0
        sigma = np.sqrt(ref.variance[ok])
        rel = np.abs(g.image[ok] - ref.image[ok]) / np.maximum(np.abs(ref.image[ok]), sigma)
        assert np.max(rel) < bound, (cfg.float32, np.max(rel))
        assert np.array_equal(g.mask, ref.mask)
        assert g.stats.used == ref.stats.used


def test_robust_std_recovers_a_gaussian_sigma_despite_outliers():
    from dia.stats import robust_std

    z = np.random.default_rng(3).normal(10.0, 2.5, 100_000)
    assert robust_std(z) == pytest.approx(2.5, rel=0.01)
    z[:3000] += 1e4  # 3% outliers (sources, cosmic rays): moves the sigma by ~4%, the plain std by a factor ~700
    assert robust_std(z) == pytest.approx(2.5, rel=0.06) and np.std(z) > 100
    assert np.isnan(robust_std(np.zeros(0)))
