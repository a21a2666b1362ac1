"""Survey simulator: realistic search/template CCD pairs with ground truth.

Public API: :func:`simulate_pair` (pure, one CCD pair in memory),
:func:`write_simulation` (FITS pairs, truth tables and a manifest),
:class:`SimulationConfig`, :data:`INSTRUMENTS`.  CLI: ``pipeline simulate``.

The names are imported on first use, so that ``pipeline simulate --help`` (which imports
``pipeline.simulate.command``) does not load the simulator and its dependencies.
"""

import importlib

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

#: public name -> submodule that defines it
_WHERE = {name: ".config" for name in ("INSTRUMENTS", "InstrumentPreset", "SimulationConfig")}
_WHERE.update({name: ".core" for name in ("TRUTH_COLUMNS", "SimulatedPair", "ccd_name", "simulate_pair",
                                          "write_simulation")})


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
