"""Alard-Lupton PSF matching and image subtraction on NumPy or CuPy (array code only).

>>> from dia import subtract, PsfMatchConfig
>>> diff = subtract(S, S_var, S_mask, T, T_var, T_mask, search_fwhm=4.2, template_fwhm=3.1)  # doctest: +SKIP
"""

from .basis import KernelBasis, make_basis
from .config import PsfMatchConfig
from .fit import FitStats, KernelSolution
from .fwhm import estimate_fwhm
from .masks import BAD_FOR_FIT, MaskBits
from .stars import StarSelectionError
from .subtract import Difference, subtract

__all__ = [
    "PsfMatchConfig",
    "Difference",
    "KernelSolution",
    "KernelBasis",
    "FitStats",
    "StarSelectionError",
    "subtract",
    "estimate_fwhm",
    "make_basis",
    "MaskBits",
    "BAD_FOR_FIT",
]
