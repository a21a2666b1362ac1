"""Mask bit flags shared by every image plane of the project.

The flags live in ``dia`` because the array code needs them (which pixels
may enter the kernel fit, which pixels the convolution contaminates) and
``dia`` must not import ``pipeline``.  ``pipeline`` re-uses them for FITS
I/O; each bit is written into the mask HDU header as ``MP_<NAME>`` so that
other tools can decode the plane.
"""

from __future__ import annotations

import enum

__all__ = ["MaskBits", "BAD_FOR_FIT", "mask_header_cards"]


class MaskBits(enum.IntFlag):
    """Bit flags of the integer mask planes (one bit per condition)."""

    BAD = 1
    """Known bad pixel: hot pixel, bad column, dead amplifier region."""
    SAT = 2
    """Saturated pixel or bleed trail."""
    NO_DATA = 4
    """No data: outside the template footprint after resampling, or CCD edge."""
    CR = 8
    """Cosmic ray flagged by the data reduction (simulated CRs are *not* flagged)."""
    SUSPECT = 16
    """Near saturation or otherwise doubtful (non-linear regime)."""
    EDGE = 32
    """Within a few pixels of the CCD edge."""
    CONVOLVED = 64
    """Difference-image pixel whose value was reached by a flagged pixel through the kernel."""
    DETECTED_NEGATIVE = 128
    """Part of a significant negative footprint in a difference image."""


#: Pixels that must not enter the PSF-matching kernel fit or photometry.
BAD_FOR_FIT = MaskBits.BAD | MaskBits.SAT | MaskBits.NO_DATA | MaskBits.CR | MaskBits.SUSPECT | MaskBits.EDGE


#: FITS keyword (<= 8 characters) and description for each bit.
_HEADER_KEYS = {
    MaskBits.BAD: ("MP_BAD", "known bad pixel (hot pixel, bad column)"),
    MaskBits.SAT: ("MP_SAT", "saturated or bleed trail"),
    MaskBits.NO_DATA: ("MP_NODAT", "no data (outside footprint)"),
    MaskBits.CR: ("MP_CR", "flagged cosmic ray"),
    MaskBits.SUSPECT: ("MP_SUSP", "near saturation / doubtful"),
    MaskBits.EDGE: ("MP_EDGE", "near CCD edge"),
    MaskBits.CONVOLVED: ("MP_CONV", "reached by a flagged pixel through the kernel"),
    MaskBits.DETECTED_NEGATIVE: ("MP_DNEG", "significant negative footprint"),
}


def mask_header_cards() -> list[tuple[str, int, str]]:
    """Header cards ``(keyword, bit value, description)`` documenting the mask bits."""
    return [(key, int(bit), text) for bit, (key, text) in _HEADER_KEYS.items()]
