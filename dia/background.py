"""The differential background of a difference re-fitted on its blank sky (``PsfMatchConfig.background_fit="sky"``).

The kernel fit solves for the kernel and a polynomial differential background together, on the
star stamps only.  Within a stamp a constant offset is nearly degenerate with the broad wings of
the kernel, and the fit weights are dominated by the star, so on a frame with few stars (or PSF
wings the basis cannot follow) the stamp background can be off by a sizeable fraction of the sky
noise everywhere else: on a real pair of sky-subtracted DECam stacks (6 kernel stars) the stamp
fit put +6 ADU into the background and left the blank sky of the difference at +0.65 sigma.

The sky itself says what the background difference is.  After the subtraction this module
measures the difference on a grid of cells (the median of the good, unflagged pixels of each
cell, with pixels beyond ``background_clip`` sigma left out: transients, residuals), fits the
background polynomial to the cell medians (weighted by their pixel counts, cells off the fit
by more than ``background_clip`` robust sigma rejected), and moves that polynomial from the
difference into the background term.  The kernel is unchanged.  All full-frame work is array
code on ``be.xp``; the fit itself is a small host least-squares problem.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .backend import Backend
from .basis import eval_poly_image, spatial_terms, spatial_vector
from .config import PsfMatchConfig
from .convolve import kernel_sum_image
from .fit import KernelSolution
from .masks import BAD_FOR_FIT, MaskBits
from .stars import _block_median, cell_stack

__all__ = ["SkyBackground", "background_cells", "refit_background"]

# plain int: CuPy kernels do not take enum scalars
_SKIP = int(BAD_FOR_FIT | MaskBits.CONVOLVED)
#: samples per cell side at most (pixels are subsampled with a step beyond that)
_SAMPLES_PER_SIDE = 32


@dataclasses.dataclass(frozen=True)
class SkyBackground:
    """What the sky re-fit did (recorded in ``FitStats.background``).

    Attributes
    ----------
    order : int
        Order of the background polynomial fitted on the sky.
    cells, cells_used : int
        Cells with enough good pixels, and those kept after the rejection of outlying cells.
    cell_size : int
        Cell side [px].
    offset_centre : float
        The correction at the image centre, in difference units (what the stamp background was off by).
    """

    order: int
    cells: int
    cells_used: int
    cell_size: int
    offset_centre: float

    def describe(self) -> str:
        return (f"sky: order {self.order} fitted to the medians of {self.cells_used}/{self.cells} cells of "
                f"{self.cell_size} px; changed the difference by {-self.offset_centre:+.4g} at the centre")


def background_cells(shape: tuple[int, int], config: PsfMatchConfig) -> tuple[int, int]:
    """``(cell side, sampling step)`` [px] of the sky re-fit of an image of ``shape``.

    ``config.background_cell`` when set, else a quarter of the shorter side clipped to 16..128 px
    (at least 4 x 4 cells on a small frame); the step keeps about 32 x 32 samples per cell.
    """
    cell = config.background_cell or max(16, min(128, min(shape) // 4))
    cell = int(min(cell, max(shape)))
    return cell, max(1, cell // _SAMPLES_PER_SIDE)


def _sky_order(n_cells: int, wanted: int) -> int:
    """Highest order ``<= wanted`` with at least two cells per polynomial term (0 with fewer)."""
    for order in range(wanted, -1, -1):
        if n_cells >= 2 * len(spatial_terms(order)):
            return order
    return 0


def refit_background(be: Backend, image, variance, mask, solution: KernelSolution, convolved: str,
                     config: PsfMatchConfig, dtype):
    """Fit the differential background on the blank sky of a difference and move it into the background term.

    Parameters
    ----------
    be : Backend
        Array module.
    image, variance, mask : arrays
        The difference (either convention of :func:`dia.subtract.subtract`), its variance and mask.
    solution : KernelSolution
        The kernel fit's solution (its background is corrected).
    convolved : {"template", "search"}
        ``template``: ``D = Y - K X - B``; ``search``: ``D = (K X + B - Y) / sum K``, so the correction
        ``P`` fitted to ``D sum K`` becomes ``B - P`` and ``D - P / sum K``.
    config : PsfMatchConfig
        ``background_order`` (the order fitted on the sky, lowered when there are few cells),
        ``background_cell``, ``background_clip``.
    dtype : float32 or float64
        Precision of the corrected image.

    Returns
    -------
    image : array
        The corrected difference (a new array).
    solution : KernelSolution
        The solution with the corrected background (its ``background_order`` is the sky fit's when higher).
    info : SkyBackground or None
        ``None`` (nothing changed) when fewer than one cell has enough good pixels.
    """
    xp = be.xp
    ny, nx = image.shape
    cell, step = background_cells((ny, nx), config)
    # the kernel sum where the cells are sampled (full-frame only at the end, when nothing else is being built)
    ksum = kernel_sum_image(be, solution, xp.float32, step=step) if convolved == "search" else None

    # subsampled good pixels, in the units of the background term (D sum K when the search was convolved)
    sub = image[::step, ::step].astype(xp.float32)
    vsub = variance[::step, ::step].astype(xp.float32)
    good = ((mask[::step, ::step] & _SKIP) == 0) & xp.isfinite(sub) & xp.isfinite(vsub) & (vsub > 0)
    good &= xp.abs(sub) <= config.background_clip * xp.sqrt(xp.where(good, vsub, 1))
    if ksum is not None:
        sub = sub * ksum
    b = -(-cell // step)  # samples per cell side
    cells, (by, bx) = cell_stack(xp, sub, good, b)
    med, count = _block_median(xp, cells)
    med, count = be.asnumpy(med).astype(np.float64), be.asnumpy(count).astype(np.float64)
    # cell centres [px]: the middle of the sampled pixels of each cell
    cy = np.minimum((np.arange(by) * b + (b - 1) / 2) * step, ny - 1)
    cx = np.minimum((np.arange(bx) * b + (b - 1) / 2) * step, nx - 1)
    cy, cx = np.repeat(cy, bx), np.tile(cx, by)
    full = b * b
    ok = np.isfinite(med) & (count >= max(0.25 * full, 4))
    if not ok.any():
        return image, solution, None
    n_cells = int(ok.sum())
    order = _sky_order(n_cells, config.background_order)
    design = spatial_vector(cx, cy, (ny, nx), order)
    keep = ok.copy()
    coef = np.zeros(design.shape[1])
    typical_var = float(np.median(be.asnumpy(vsub[good]))) if bool(good.any()) else 0.0
    for _ in range(3):
        w = np.sqrt(count[keep])
        coef = np.linalg.lstsq(design[keep] * w[:, None], med[keep] * w, rcond=None)[0]
        resid = med - design @ coef
        spread = 1.4826 * np.median(np.abs(resid[keep]))
        # a cell's median has a noise of ~1.25 sigma / sqrt(n): do not reject cells on that scale alone
        floor = 1.25 * math.sqrt(typical_var) / math.sqrt(max(float(np.median(count[keep])), 1.0))
        new = ok & (np.abs(resid) <= config.background_clip * max(spread, floor))
        if new.sum() < len(coef) or np.array_equal(new, keep):
            break
        keep = new

    terms = spatial_terms(order)
    correction = {t: float(c) for t, c in zip(terms, coef)}
    # in place where possible: at this point the frame's planes are all alive, each temporary is a frame more
    plane = eval_poly_image(correction, (ny, nx), xp, dtype)
    if convolved == "search":
        plane /= kernel_sum_image(be, solution, dtype)
    out = image.astype(dtype, copy=True)
    out -= plane
    del plane

    # the background term: B + P (template convolved: D = Y - K X - B) or B - P (search: D = (K X + B - Y) / sum K)
    new_order = max(order, solution.background_order)
    bg = np.zeros(len(spatial_terms(new_order)))
    bg[: solution.background_coefficients.size] = solution.background_coefficients
    bg[: coef.size] += coef if convolved == "template" else -coef
    centre = float(spatial_vector((nx - 1) / 2, (ny - 1) / 2, (ny, nx), order) @ coef)
    if convolved == "search":
        centre /= float(solution.kernel_sum_centre)
    info = SkyBackground(order=order, cells=n_cells, cells_used=int(keep.sum()), cell_size=cell,
                         offset_centre=centre)
    return out, dataclasses.replace(solution, background_order=new_order, background_coefficients=bg), info
