"""Robust statistics shared by the array code (NumPy or CuPy through ``xp``)."""

from __future__ import annotations

import numpy as np

__all__ = ["MAD_TO_SIGMA", "robust_std"]

#: The median absolute deviation of a Gaussian times this is its standard deviation (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826


def robust_std(values, xp=np) -> float:
    """Standard deviation of ``values`` from their median absolute deviation about their median.

    Parameters
    ----------
    values : array
        A sample (any shape; every element counts, so leave out NaN and masked ones first).
    xp : module
        NumPy or CuPy, the module of ``values``.

    Returns
    -------
    float
        ``1.4826 median(|v - median(v)|)``: the sigma of a Gaussian sample, insensitive to a minority of
        outliers (sources, cosmic rays); NaN for an empty sample.
    """
    if int(values.size) == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * xp.median(xp.abs(values - xp.median(values))))
