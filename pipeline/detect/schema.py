"""Candidate schema: flag bits, catalog columns and the candidate table.

:class:`CandidateFlags` (one bit per reason to distrust a candidate) with :data:`FLAG_DESCRIPTIONS`
and :func:`flag_bits` (the comments of every catalog header's ``FLAG<bit>`` cards);
:data:`CANDIDATE_COLUMNS` (dtype, unit and description of every catalog column, in catalog order)
with :func:`describe_columns` and :func:`schema_order`; :class:`CandidateTable`, the
:class:`astropy.table.Table` both detection modes return.  No computation on images.
"""

from __future__ import annotations

import enum

import numpy as np
from astropy.table import Table

__all__ = [
    "CandidateFlags",
    "FLAG_DESCRIPTIONS",
    "flag_bits",
    "CANDIDATE_COLUMNS",
    "describe_columns",
    "schema_order",
    "CandidateTable",
]


class CandidateFlags(enum.IntFlag):
    """Bit flags of the ``flags`` column of a candidate table.

    What each bit means in one line is :data:`FLAG_DESCRIPTIONS`: every catalog's header
    carries it as ``FLAG<bit>`` cards and :func:`flag_bits` lists it.
    """

    DIPOLE = 1
    """A significant negative footprint lies within ``dipole_radius`` FWHM."""
    MASKED = 2
    """The candidate's central pixel (or its 3x3 core) is masked in some input."""
    EDGE = 4
    """Within ``edge`` pixels of the image border or of missing data: the stamp is incomplete."""
    SATURATED = 8
    """A saturated pixel lies within the PSF footprint."""
    CONVOLVED = 16
    """A masked pixel reached the candidate through the PSF-matching kernel."""


#: One line per :class:`CandidateFlags` bit, at most 47 characters: it is the comment of the
#: ``FLAG<bit>`` card in every catalog's header, which must hold it uncut.
FLAG_DESCRIPTIONS: dict[str, str] = {
    "DIPOLE": "negative footprint within dipole_radius FWHM",
    "MASKED": "masked pixel in the 3x3 core in some input",
    "EDGE": "near the border or missing data: stamp partial",
    "SATURATED": "saturated pixel within the PSF footprint",
    "CONVOLVED": "masked pixel spread in by the PSF-match kernel",
}


def flag_bits() -> list[tuple[int, str, str]]:
    """``(bit, name, description)`` of every :class:`CandidateFlags` bit, lowest bit first.

    The one list that the catalog header cards (``FLAG<bit> = '<name>' / <description>``),
    the README and the vetting page print; ``flags & (1 << bit)`` tests a bit.
    """
    rows = []
    for member in CandidateFlags:
        value = int(member)
        if value <= 0 or value & (value - 1):
            raise ValueError(f"CandidateFlags.{member.name} = {value} is not a single bit")
        rows.append((value.bit_length() - 1, member.name, FLAG_DESCRIPTIONS[member.name]))
    return sorted(rows)


#: name -> (dtype, unit, description) of every column a candidate table may carry, in catalog order.
CANDIDATE_COLUMNS: dict[str, tuple[str, str, str]] = {
    "ccd": ("U64", "", "CCD pair identifier (pipeline.io.CCD_ID_MAX_LENGTH characters at most)"),
    "id": ("i8", "", "candidate number within the CCD (the id of its row in the CCD's stamps file)"),
    "x": ("f8", "pix", "x position on the search grid (0-based)"),
    "y": ("f8", "pix", "y position on the search grid (0-based)"),
    "ra": ("f8", "deg", "right ascension (ICRS)"),
    "dec": ("f8", "deg", "declination (ICRS)"),
    "flux": ("f8", "adu", "PSF flux on the search image's photometric scale"),
    "flux_err": ("f8", "adu", "1-sigma error of flux"),
    "mag": ("f8", "mag", "MAGZERO - 2.5 log10(flux) on the search exposure's zero point, in the system "
                         "of the MAGSYS card (NaN: flux <= 0 or no zero point)"),
    "mag_err": ("f8", "mag", "1-sigma error of mag: 2.5 / ln(10) * flux_err / flux (NaN where mag is)"),
    "snr": ("f8", "", "PSF-matched-filter signal-to-noise"),
    "flags": ("i4", "", "CandidateFlags bits (the FLAGn header cards name bit n)"),
    "score": ("f4", "", "CNN probability of being real (NaN before scoring)"),
    "mode": ("U8", "", "pipeline mode: dia or direct"),
    "model": ("U32", "", "CNN model name or weights file (the column widens to fit)"),
    "mjd": ("f8", "d", "MJD (UTC) of the search exposure: its MJD-OBS, else its DATE-OBS (NaN unknown)"),
    "band": ("U16", "", "filter of the search exposure: its BAND or FILTER card ('' unknown)"),
    "noise_scale": ("f4", "", "factor applied to flux_err (and snr divided by) for the correlated noise of "
                              "this CCD's difference image; 1 = no rescaling"),
    "search_flux": ("f8", "adu", "direct mode: PSF flux in the search image"),
    "template_flux": ("f8", "adu", "direct mode: forced PSF flux in the template, on the search scale"),
    "delta_snr": ("f8", "", "direct mode: (search_flux - template_flux) / flux_err"),
    "truth_id": ("i8", "", "matched truth object id (-1 none)"),
    "truth_kind": ("U16", "", "matched truth object kind ('' none)"),
    "truth_mag": ("f8", "mag", "matched truth magnitude (NaN none)"),
    "truth_sep": ("f8", "pix", "distance on the search grid to the matched truth object (NaN none)"),
}


def describe_columns(table: Table) -> Table:
    """Attach the unit and description of :data:`CANDIDATE_COLUMNS` to every known column, in place.

    Returns ``table``; columns the schema does not know are left as they are.
    """
    for name in table.colnames:
        if name in CANDIDATE_COLUMNS:
            _, unit, desc = CANDIDATE_COLUMNS[name]
            table[name].description = desc
            table[name].unit = unit or None
    return table


def schema_order(names) -> list[str]:
    """``names`` in :data:`CANDIDATE_COLUMNS` order, columns the schema does not know last."""
    names = list(names)
    return [c for c in CANDIDATE_COLUMNS if c in names] + [c for c in names if c not in CANDIDATE_COLUMNS]


class CandidateTable(Table):
    """An :class:`astropy.table.Table` of candidates with the columns of :data:`CANDIDATE_COLUMNS`.

    Units and descriptions are attached to every known column.
    """

    @classmethod
    def from_columns(cls, **columns) -> "CandidateTable":
        """Build a table from 1-D arrays, in the documented column order."""
        n = {len(np.atleast_1d(v)) for v in columns.values()}
        if len(n) > 1:
            raise ValueError("candidate columns differ in length: "
                             f"{ {k: len(np.atleast_1d(v)) for k, v in columns.items()} }")
        order = schema_order(columns)
        table = cls()
        for name in order:
            dtype, unit, desc = CANDIDATE_COLUMNS.get(name, (None, "", ""))
            data = np.atleast_1d(np.asarray(columns[name], dtype=dtype))
            table[name] = data
            table[name].description = desc
            if unit:
                table[name].unit = unit
        return table

    @classmethod
    def empty(cls, names=("ccd", "id", "x", "y", "ra", "dec", "flux", "flux_err", "snr", "flags")) -> "CandidateTable":
        """An empty table with the given documented columns."""
        return cls.from_columns(**{n: np.zeros(0, dtype=CANDIDATE_COLUMNS[n][0]) for n in names})
