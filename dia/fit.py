"""Least-squares fit of a spatially varying Alard-Lupton kernel and differential background.

Model, for the image ``X`` to be convolved and the reference ``Y``::

    Y(x, y) ~ sum_k sum_s a_ks P_s(x, y) (b_k * X)(x, y) + sum_t c_t P_t(x, y)

with ``b_k`` the basis functions and ``P_s`` the spatial polynomials of the
normalised pixel coordinates.  Within one stamp the polynomials are taken at
the stamp centre, so each stamp contributes small normal equations
``M_i = C_i^T W_i C_i``, ``v_i = C_i^T W_i Y_i`` (``C_i`` the basis-convolved
stamp plus a constant column); the global system is the sum of
``M_i (x) p_i p_i^T``.  Per-stamp chi^2 of any trial solution is
``a^T M_i a - 2 a.v_i + Y_i^T W_i Y_i``, so clipping never revisits pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft

from .backend import Backend, StepClock
from .basis import KernelBasis, separable_basis, spatial_terms, spatial_vector
from .config import PsfMatchConfig
from .masks import BAD_FOR_FIT
from .stars import StarSelection, StarSelectionError, _absolute_min, _gather, choose_orders, describe_rejections

__all__ = ["KernelSolution", "FitStats", "fit_kernel", "stamp_equations"]

# plain int: CuPy kernels do not take enum scalars
_BAD = int(BAD_FOR_FIT)


@dataclasses.dataclass(frozen=True)
class KernelSolution:
    """A fitted spatially varying kernel and differential background.

    Attributes
    ----------
    basis : KernelBasis
        Basis (sigmas, degrees, half-width, images).
    spatial_order, background_order : int
        Polynomial orders in the normalised coordinates ``xn, yn`` in [-1, 1].
    shape : tuple
        ``(ny, nx)`` of the image the polynomials are normalised to.
    coefficients : numpy.ndarray
        ``(n_basis, n_spatial)``: kernel = sum_k sum_s coefficients[k, s] P_s b_k.
    background_coefficients : numpy.ndarray
        ``(n_background,)``: background = sum_t c_t P_t.
    kernel_sum_centre : float
        Kernel sum (photometric scale) at the image centre.
    """

    basis: KernelBasis
    spatial_order: int
    background_order: int
    shape: tuple[int, int]
    coefficients: np.ndarray
    background_coefficients: np.ndarray
    kernel_sum_centre: float

    @property
    def spatial_terms(self) -> list[tuple[int, int]]:
        return spatial_terms(self.spatial_order)

    @property
    def background_terms(self) -> list[tuple[int, int]]:
        return spatial_terms(self.background_order)

    def spatial_kernels(self) -> np.ndarray:
        """The ``n_spatial`` kernel images K_s = sum_k a_ks b_k, shape ``(n_spatial, size, size)``."""
        return np.einsum("ks,kuv->suv", self.coefficients, self.basis.images)

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The 2-D kernel at pixel position ``(x, y)``."""
        p = spatial_vector(x, y, self.shape, self.spatial_order)
        return np.einsum("s,suv->uv", p, self.spatial_kernels())

    def kernel_sum_at(self, x: float, y: float) -> float:
        """Photometric scale (kernel sum) at ``(x, y)``."""
        p = spatial_vector(x, y, self.shape, self.spatial_order)
        return float(self.coefficients[0] @ p * self.basis.images[0].sum())

    def background_at(self, x: float, y: float) -> float:
        """Differential background at ``(x, y)``."""
        p = spatial_vector(x, y, self.shape, self.background_order)
        return float(p @ self.background_coefficients)


@dataclasses.dataclass(frozen=True)
class FitStats:
    """Bookkeeping and quality of the kernel fit.

    ``found``: candidate peaks; ``selected``: stars fitted at first; ``used``:
    stars left after clipping; ``rejected``: count per reason (see
    ``dia.stars.REJECT_REASONS``; ``clipped`` = removed by the residual clip);
    ``chi2_median``/``chi2_max``: reduced chi^2 of the used stamps under the
    final spatial solution; ``residual_rms``: sqrt of their mean reduced chi^2;
    ``local_chi2_median``: the same for independent per-stamp fits;
    ``spatial_order``/``background_order``: the orders fitted and ``fallback`` why
    they are lower than configured (see ``PsfMatchConfig.order_fallback``);
    ``peak_snr_cut``: the star S/N cut applied.
    """

    found: int
    selected: int
    used: int
    rejected: dict[str, int]
    chi2_median: float
    chi2_max: float
    residual_rms: float
    local_chi2_median: float
    iterations: int
    spatial_order: int = -1
    """Spatial order of the kernel actually fitted (lower than configured after a fallback)."""
    background_order: int = -1
    """Order of the differential background actually fitted."""
    fallback: str = ""
    """Why the orders were lowered (empty: the configured orders were used)."""
    peak_snr_cut: float = float("nan")
    """Peak S/N cut the kernel-fit stars passed (``min_peak_snr`` unless lowered towards ``min_peak_snr_floor``)."""
    background: str = "stamps"
    """Where the differential background came from: ``"stamps"`` (the kernel fit's) or the sky re-fit's
    summary (``PsfMatchConfig.background_fit``; :mod:`dia.background`)."""
    noise_correlation_factor: float = 1.0
    """Factor applied to the convolved image's variance term for its correlated noise (1: white;
    ``PsfMatchConfig.noise_correlation``, :mod:`dia.noise`)."""
    variance_scale: float = 1.0
    """Factor applied to the decorrelated variance plane (``PsfMatchConfig.decorrelate_variance="measured"``:
    the measured variance of the decorrelated difference over the formula's, on unflagged pixels)."""


def _basis_fft(be: Backend, basis: KernelBasis, n: int):
    """rfft2 of the basis images placed with their centre at pixel (0, 0) (wrapped) on an n x n grid."""
    hw = basis.half_width
    pad = np.zeros((basis.n_basis, n, n))
    pad[:, : basis.size, : basis.size] = basis.images
    pad = np.roll(pad, (-hw, -hw), axis=(1, 2))
    return be.fft.rfft2(be.xp.asarray(pad))


def _band_matrices(factors: np.ndarray, full_size: int, core_size: int) -> np.ndarray:
    """``(full_size, n_factors * core_size)``: column ``f * core_size + q`` convolves with ``factors[f]``.

    ``(cut @ M)[r, f * cs + q] = sum_u factors[f, u] cut[r, q + 2 hw - u]``: the 1-D convolution of
    each row of a stamp cut with ``2 hw`` extra pixels per side, kept on the ``core_size`` core.
    """
    nf, size = factors.shape
    two_hw = size - 1
    m = np.zeros((full_size, nf, core_size))
    q = np.arange(core_size)
    for u in range(size):
        m[q + two_hw - u, :, q] = factors[:, u][None, :]
    return m.reshape(full_size, nf * core_size)


def _separable_convolutions(xp, sep, degrees, cut, core_size: int):
    """Basis-convolved stamp cores ``(k, n_basis, cs * cs)`` from cuts ``(k, F, F)``, by 1-D passes (matrix products).

    x pass: one product with the banded matrices of all distinct factors; y pass: per Gaussian and
    y power ``j``, one batched product with the x-filtered cuts of the powers ``i <= degree - j``
    it is paired with.  Then the normalisation ``scale * conv - offset * conv_0``.
    """
    k, full, _ = cut.shape
    cs = core_size
    mats = xp.asarray(_band_matrices(sep.factors, full, cs))  # (F, n_factors * cs)
    tx = (cut.reshape(k * full, full) @ mats).reshape(k, full, -1)  # rows filtered along x, (k, F, nf * cs)
    index = {(int(a), int(b)): n for n, (a, b) in enumerate(zip(sep.x_index, sep.y_index))}
    out = xp.empty((k, len(sep.scale), cs * cs), dtype=cut.dtype)
    base = 0
    for degree in degrees:
        nd = degree + 1
        for j in range(nd):
            m = nd - j  # x powers i = 0 .. degree - j go with y power j
            my_t = xp.ascontiguousarray(mats[:, (base + j) * cs : (base + j + 1) * cs].T)  # (cs, F)
            r = (my_t @ tx[:, :, base * cs : (base + m) * cs]).reshape(k, cs, m, cs)  # [stamp, p, i, q]
            for i in range(m):
                out[:, index[(base + i, base + j)]] = r[:, :, i, :].reshape(k, cs * cs)
        base += nd
    out[:, 0] *= float(sep.scale[0])
    out[:, 1:] *= xp.asarray(sep.scale[None, 1:, None])
    out[:, 1:] -= xp.asarray(sep.offset[None, 1:, None]) * out[:, :1]
    return out


def stamp_equations(be: Backend, basis: KernelBasis, conv_img, conv_var, ref_img, ref_var, ref_mask, ys, xs,
                    core_hw: int, chunk: int | None = None, method: str = "separable"):
    """Normal equations of every stamp (device work, small host results).

    ``method="separable"`` convolves the stamps with the basis by 1-D passes written as matrix
    products (the Gaussian x polynomial functions are outer products of 1-D factors); ``"fft"``
    (the reference) by batched FFTs.  A basis that is not separable always uses ``"fft"``.

    Returns ``M (n, m, m)``, ``v (n, m)``, ``c (n,)``, ``npix (n,)`` as NumPy
    float64, with ``m = n_basis + 1`` (last column: constant background).
    """
    xp = be.xp
    hw = basis.half_width
    full = core_hw + hw
    size = 2 * full + 1
    cs = 2 * core_hw + 1
    sep = separable_basis(basis) if method == "separable" else None
    if sep is None:
        n = scipy.fft.next_fast_len(size, real=True)
        fb = _basis_fft(be, basis, n)
    out_m, out_v, out_c, out_n = [], [], [], []
    # CPU: chunks keep the (stamps x basis x FFT grid) products cache-sized; GPU: one launch sequence
    chunk = chunk or (32 if be.name == "cpu" else max(len(ys), 1))
    kw = {"workers": be.workers} if be.name == "cpu" else {}
    for start in range(0, len(ys), chunk):
        yy = xp.asarray(ys[start : start + chunk])
        xx = xp.asarray(xs[start : start + chunk])
        cut = _gather(xp, conv_img, yy, xx, full).astype(xp.float64)
        k = cut.shape[0]
        design = xp.empty((k, basis.n_basis + 1, cs * cs))
        if sep is not None:
            design[:, : basis.n_basis] = _separable_convolutions(xp, sep, basis.degrees, cut, cs)
        else:
            fx = be.fft.rfft2(cut, s=(n, n), **kw)
            conv = be.fft.irfft2(fx[:, None] * fb[None], s=(n, n), **kw)[:, :, hw : hw + cs, hw : hw + cs]
            design[:, : basis.n_basis] = conv.reshape(k, basis.n_basis, cs * cs)
        design[:, basis.n_basis] = 1.0
        target = _gather(xp, ref_img, yy, xx, core_hw).astype(xp.float64).reshape(k, -1)
        var = (_gather(xp, ref_var, yy, xx, core_hw).astype(xp.float64)
               + _gather(xp, conv_var, yy, xx, core_hw).astype(xp.float64)).reshape(k, -1)
        good = (((_gather(xp, ref_mask, yy, xx, core_hw) & _BAD) == 0).reshape(k, -1) & xp.isfinite(target)
                & xp.isfinite(var) & (var > 0))
        w = xp.where(good, 1.0 / xp.where(good, var, 1.0), 0.0)
        target = xp.where(good, target, 0.0)
        dw = design * w[:, None, :]
        mm = dw @ design.transpose(0, 2, 1)  # batched matmul (cuBLAS on GPU)
        vv = (dw @ target[:, :, None])[:, :, 0]
        cc = (w * target * target).sum(axis=1)
        nn = good.sum(axis=1).astype(xp.float64)
        # one device->host copy per chunk
        packed = be.asnumpy(xp.concatenate([mm.reshape(k, -1), vv, cc[:, None], nn[:, None]], axis=1))
        m = mm.shape[1]
        out_m.append(packed[:, : m * m].reshape(k, m, m))
        out_v.append(packed[:, m * m : m * m + m])
        out_c.append(packed[:, -2])
        out_n.append(packed[:, -1])
    return (np.concatenate(out_m), np.concatenate(out_v), np.concatenate(out_c), np.concatenate(out_n))


def _chi2(a: np.ndarray, m: np.ndarray, v: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.einsum("nk,nkl,nl->n", a, m, a) - 2.0 * np.einsum("nk,nk->n", a, v) + c


def _clip(red: np.ndarray, keep: np.ndarray, nsig: float) -> np.ndarray:
    """Stars (among ``keep``) whose reduced chi^2 is above median + nsig x robust std."""
    vals = red[keep]
    med = np.median(vals)
    mad = 1.4826 * np.median(np.abs(vals - med))
    # floor the spread: with few stars or perfect data the MAD can be ~0
    spread = max(mad, 0.05 * med, 1e-12)
    return keep & (red > med + nsig * spread)


def _may_clip(keep: np.ndarray, clip: np.ndarray, config: PsfMatchConfig) -> bool:
    """Whether the stars ``clip`` may be removed from ``keep``.

    Without ``order_fallback`` always (too few left then fails, as before).  With it, only when
    the stars left afford the same orders as now: with few stars, the brightest ones often
    have the largest chi^2 (PSF-shape systematics) and clipping them would leave a noisier
    kernel of lower order fitted to the faintest stars.
    """
    if not config.order_fallback:
        return True
    now = choose_orders(int(keep.sum()), config)
    after = choose_orders(int((keep & ~clip).sum()), config)
    return after is not None and (now is None or after[:2] == now[:2])


def _cholesky_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve SPD systems ``a x = b`` (stacked ``(..., n, n)``, ``(..., n)``) by Cholesky in NumPy.

    The systems are small (n <= a few hundred); a column loop of vector
    operations avoids multi-threaded LAPACK, whose threads fight the FFT
    workers for the cores (100x slow-downs seen on a loaded 2-core machine).
    """
    n = a.shape[-1]
    low = np.zeros_like(a)
    tiny = 1e-300
    for j in range(n):
        row = low[..., j, :j]
        d = np.sqrt(np.maximum(a[..., j, j] - np.einsum("...k,...k->...", row, row), tiny))
        low[..., j, j] = d
        if j + 1 < n:
            low[..., j + 1 :, j] = ((a[..., j + 1 :, j] - np.einsum("...ik,...k->...i", low[..., j + 1 :, :j], row))
                                    / d[..., None])
    y = np.zeros_like(b)
    for j in range(n):
        y[..., j] = (b[..., j] - np.einsum("...k,...k->...", low[..., j, :j], y[..., :j])) / low[..., j, j]
    x = np.zeros_like(b)
    for j in range(n - 1, -1, -1):
        x[..., j] = (y[..., j] - np.einsum("...k,...k->...", low[..., j + 1 :, j], x[..., j + 1 :])) / low[..., j, j]
    return x


def _ridge_solve(a: np.ndarray, b: np.ndarray, reg: float, lapack: bool = False) -> np.ndarray:
    """Solve normal equations ``a x = b`` (or a stack) with Jacobi scaling and a small relative ridge.

    ``lapack=True`` uses NumPy's stacked LAPACK solve (fastest when the host's
    cores are otherwise idle, as while a GPU works); otherwise a NumPy Cholesky
    that cannot fight the CPU FFT threads.
    """
    d = np.diagonal(a, axis1=-2, axis2=-1)
    # Jacobi scaling keeps the (badly scaled) normal equations well conditioned
    s = 1.0 / np.sqrt(np.where(d > 0, d, 1.0))
    a2 = a * s[..., :, None] * s[..., None, :]
    idx = np.arange(a.shape[-1])
    a2[..., idx, idx] += max(reg, 1e-12)
    if lapack:
        try:
            x = np.linalg.solve(a2.reshape(-1, *a2.shape[-2:]), (b * s).reshape(-1, b.shape[-1], 1))
            return x[..., 0].reshape(b.shape) * s
        except np.linalg.LinAlgError:
            pass
    return _cholesky_solve(a2, b * s) * s


def fit_kernel(
    be: Backend,
    basis: KernelBasis,
    stars: StarSelection,
    conv_img,
    conv_var,
    ref_img,
    ref_var,
    ref_mask,
    *,
    core_hw: int,
    config: PsfMatchConfig,
    timings: dict | None = None,
) -> tuple[KernelSolution, FitStats]:
    """Fit the spatial kernel and background to the selected stars, clipping outliers.

    The spatial and background orders follow the number of usable stars
    (:func:`dia.stars.choose_orders`): the configured ones with at least
    ``min_stars``, lower ones with fewer (``order_fallback``); the clip never takes
    the stars below the fewest a fit can be made with.

    Raises
    ------
    StarSelectionError
        If fewer than ``fallback_min_stars`` stars (``min_stars`` without ``order_fallback``) remain.
    """
    shape = tuple(int(v) for v in conv_img.shape)
    rejected = dict(stars.rejected)
    cut = float(stars.peak_snr_cut)

    def fail(usable: int) -> StarSelectionError:
        needed = _absolute_min(config)
        return StarSelectionError(describe_rejections(stars.found, usable, rejected, needed, cut), stars.found,
                                  usable, rejected)

    if choose_orders(int(stars.y.size), config) is None:
        raise fail(int(stars.y.size))

    clock = StepClock(be, timings, "fit")
    method = "separable" if config.path == "fused" else "fft"
    m_i, v_i, c_i, npix = stamp_equations(be, basis, conv_img, conv_var, ref_img, ref_var, ref_mask, stars.y, stars.x,
                                          core_hw, method=method)
    clock("stamps")
    nb = basis.n_basis
    m = nb + 1
    n = len(npix)

    # independent per-stamp fits: a first, cheap screen of bad stamps (variables, blends, CRs)
    lapack = be.name == "gpu"
    local = _ridge_solve(m_i, v_i, config.regularization, lapack)
    local_red = _chi2(local, m_i, v_i, c_i) / np.maximum(npix - m, 1)
    keep = np.ones(n, bool)
    if _may_clip(keep, _clip(local_red, keep, config.clip_sigma), config):
        keep &= ~_clip(local_red, keep, config.clip_sigma)

    order = max(config.spatial_order, config.background_order)
    all_terms = spatial_terms(order)
    p = spatial_vector(stars.x, stars.y, shape, order)  # (n, n_all)
    n_all = len(all_terms)
    iterations = 0
    chosen = None
    for iterations in range(1, config.clip_iterations + 2):
        chosen = choose_orders(int(keep.sum()), config)
        if chosen is None:
            break
        so, bo, _ = chosen
        n_s, n_b = len(spatial_terms(so)), len(spatial_terms(bo))
        # unknowns: kernel rows k < nb use the first n_s terms, the background row the first n_b terms
        sel = np.array([k * n_all + s for k in range(nb) for s in range(n_s)] + [nb * n_all + s for s in range(n_b)])
        pk = p[keep]
        pp = (pk[:, :, None] * pk[:, None, :]).reshape(len(pk), -1)
        g = (m_i[keep].reshape(len(pk), -1).T @ pp).reshape(m, m, n_all, n_all)
        g = g.transpose(0, 2, 1, 3).reshape(m * n_all, m * n_all)
        h = np.einsum("ik,is->ks", v_i[keep], p[keep]).reshape(m * n_all)
        theta_sel = _ridge_solve(g[np.ix_(sel, sel)], h[sel], config.regularization, lapack)
        theta = np.zeros(m * n_all)
        theta[sel] = theta_sel
        coef = theta.reshape(m, n_all)
        a = p @ coef.T  # (n, m): local coefficients implied by the spatial solution
        red = _chi2(a, m_i, v_i, c_i) / np.maximum(npix, 1)
        if iterations > config.clip_iterations:
            break
        clip = _clip(red, keep, config.clip_sigma)
        if not clip.any():
            break
        if not _may_clip(keep, clip, config):
            break  # clipping would lower the orders (few stars): keep this solution
        keep &= ~clip
    rejected["clipped"] = int(n - keep.sum())
    if chosen is None:
        raise fail(int(keep.sum()))
    so, bo, why = chosen
    n_s, n_b = len(spatial_terms(so)), len(spatial_terms(bo))

    clock("solve")
    coefficients = coef[:nb, :n_s].copy()
    bg = coef[nb, :n_b].copy()
    centre = spatial_vector((shape[1] - 1) / 2, (shape[0] - 1) / 2, shape, so)
    ksum = float(coefficients[0] @ centre * basis.images[0].sum())
    solution = KernelSolution(basis, so, bo, shape, coefficients, bg, ksum)
    used_red = red[keep]
    stats = FitStats(
        found=stars.found,
        selected=n,
        used=int(keep.sum()),
        rejected=rejected,
        chi2_median=float(np.median(used_red)),
        chi2_max=float(np.max(used_red)),
        residual_rms=float(np.sqrt(np.mean(used_red))),
        local_chi2_median=float(np.median(local_red[keep])),
        iterations=iterations,
        spatial_order=so,
        background_order=bo,
        fallback=why,
        peak_snr_cut=cut,
    )
    return solution, stats
