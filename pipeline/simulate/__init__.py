"""Survey simulator: realistic search/template CCD pairs with ground truth.

Public API: :func:`simulate_pair` (pure, one CCD pair in memory),
:func:`write_simulation` (FITS pairs, truth tables and a manifest),
:class:`SimulationConfig`, :data:`INSTRUMENTS`.  CLI: ``pipeline simulate``.
"""

from .config import INSTRUMENTS, InstrumentPreset, SimulationConfig
from .core import TRUTH_COLUMNS, SimulatedPair, ccd_name, simulate_pair, write_simulation

__all__ = [
    "INSTRUMENTS",
    "InstrumentPreset",
    "SimulationConfig",
    "SimulatedPair",
    "TRUTH_COLUMNS",
    "ccd_name",
    "simulate_pair",
    "write_simulation",
]
