"""Frozen-dataclass configuration helpers: to/from plain dicts and TOML.

Every algorithm parameter of the project lives in a frozen dataclass with a
documented default.  These helpers turn any such (possibly nested) config
into a JSON-able dict for ``run.json`` and build one back from a dict or a
TOML table, rejecting unknown keys with a message that names them.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # the stage configs import their modules; RunConfig resolves them at run time
    from dia import PsfMatchConfig
    from pipeline.align import AlignConfig
    from pipeline.cosmics import CosmicRayConfig
    from pipeline.detect import DetectConfig, DirectDetectConfig
    from pipeline.truth import MatchConfig

__all__ = ["config_to_dict", "config_from_dict", "load_toml", "RunConfig", "ConfigError", "science_dict",
           "execution_field", "run_table", "canonical_device", "gpu_usable", "resolve_device"]

C = TypeVar("C")


def config_to_dict(config: Any) -> Any:
    """Return a JSON-serialisable copy of a (nested) dataclass config.

    Tuples become lists, enums their values, paths strings.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    if hasattr(config, "value") and hasattr(config, "name"):  # enum
        return config.value
    return config


class ConfigError(ValueError):
    """A configuration value of the wrong type or an unknown key; the message names the key."""


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "nothing (omit the key)"
    if origin is tuple:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if dataclasses.is_dataclass(annotation):
        return f"a table of {annotation.__name__} parameters"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "a list", Path: "a path (string)"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against the field's annotation (TOML types) and convert where lossless.

    Raises :class:`ConfigError` naming ``where``: a string ``"no"`` for a boolean, a float for
    an integer, a number for a string are refused, not guessed.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    def refuse() -> ConfigError:
        return ConfigError(f"{where}: expected {_describe(annotation)}, got {value!r} ({type(value).__name__})")

    if annotation is Any or isinstance(annotation, (str, typing.ForwardRef)):
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return config_from_dict(annotation, value, where=where)
        if isinstance(value, annotation):
            return value
        raise refuse()
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise refuse()
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise refuse()
    if annotation is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        raise refuse()
    if annotation is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            return float(value)
        raise refuse()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise refuse()
    if annotation is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise refuse()
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise refuse()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise refuse()
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise refuse()
    return value


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a config class (the stage configs RunConfig names lazily)."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        from dia import PsfMatchConfig
        from pipeline.align import AlignConfig
        from pipeline.cosmics import CosmicRayConfig
        from pipeline.detect import DetectConfig, DirectDetectConfig
        from pipeline.truth import MatchConfig

        local = {"PsfMatchConfig": PsfMatchConfig, "AlignConfig": AlignConfig, "DetectConfig": DetectConfig,
                 "DirectDetectConfig": DirectDetectConfig, "MatchConfig": MatchConfig,
                 "CosmicRayConfig": CosmicRayConfig}
        return typing.get_type_hints(cls, localns=local)


def config_from_dict(cls: type[C], data: dict[str, Any] | None, *, where: str = "") -> C:
    """Build the frozen dataclass ``cls`` from a dict (e.g. a TOML table).

    Missing keys keep their documented defaults; unknown keys and values of the wrong type
    raise.

    Parameters
    ----------
    cls : type
        The dataclass type.
    data : dict or None
        Values to set.
    where : str
        Context for error messages (file name, table name).

    Raises
    ------
    ConfigError
        If ``data`` holds keys that ``cls`` does not define, or a value of the wrong type
        (the message names the key, the expected type and the value).
    ValueError
        If the class itself rejects a value (its ``__post_init__`` checks).
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table of {cls.__name__} parameters, got {data!r}")
    data = dict(data or {})
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        label = f" in {where}" if where else ""
        raise ConfigError(
            f"unknown {cls.__name__} parameter(s){label}: {', '.join(unknown)}; "
            f"valid parameters are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        label = f"{where}: " if where else ""
        raise ConfigError(f"{label}{exc}") from None


def science_dict(config: Any) -> Any:
    """:func:`config_to_dict` without the fields that cannot change a result.

    Fields declared with ``metadata={"science": False}`` (execution settings such as
    workers, threads, batch size, device, and reporting settings such as the score
    threshold) are left out; what remains is what ``--resume`` keys on.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: science_dict(getattr(config, f.name)) for f in dataclasses.fields(config)
                if f.metadata.get("science", True)}
    return config_to_dict(config)


def execution_field(default: Any) -> Any:
    """A dataclass field that is an execution or reporting setting (not hashed for ``--resume``)."""
    return dataclasses.field(default=default, metadata={"science": False})


def run_table(data: dict[str, Any], table: str, where: str = "") -> dict[str, Any]:
    """The ``[table]`` of a parsed TOML configuration, or the whole file when it has none.

    Keys beside the table would be silently ignored, so they are an error.

    Raises
    ------
    ConfigError
        If the file has the table and other top-level keys too, or the table is not a table.
    """
    if table not in data:
        return dict(data)
    others = sorted(set(data) - {table})
    label = f"{where}: " if where else ""
    if others:
        raise ConfigError(f"{label}key(s) {', '.join(others)} outside the [{table}] table would be ignored; "
                          f"move them into [{table}] (or drop the [{table}] header)")
    if not isinstance(data[table], dict):
        raise ConfigError(f"{label}'{table}' must be a table ([{table}]), got {data[table]!r}")
    return dict(data[table])


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, naming the file in any parse error."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


# ----------------------------------------------------------------------------- the run configuration


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides what ``pipeline run`` computes (written into ``run.json``).

    Attributes
    ----------
    mode : str
        ``"dia"`` (align, PSF-match, subtract, detect on the difference, triplet CNN) or
        ``"direct"`` (detect without a difference image, two-image CNN).
    device : str
        ``"cpu"`` or ``"gpu"`` (CuPy for the DIA, CUDA for the CNN).
    model_dia, model_direct : str
        Shipped model name (``classifier/weights/<name>.pt``) or a path, per mode (:attr:`model`:
        ``"pair-direct"`` means ``"pair-dense"`` with ``direct.selection = "dense"``).
    instrument : str
        Instrument preset whose shipped weights a shipped model name stands for (``"decam"``,
        ``"ztf"``, ``"lsst"``; :func:`classifier.infer.preset_weights`: ``"triplet"`` becomes
        ``triplet-ztf.pt`` for ``"ztf"``); default ``""``: from the search exposures' ``INSTRUME``
        (``pipeline.runner.resolve_instrument``).  A weights path is used as given.  Not hashed
        for ``--resume`` itself: its effect, the weights file, is (by its SHA-256).
    score_threshold : float
        Operating threshold on the CNN's P(real) (default 0.5).
    batch_size : int
        CNN inference batch.
    torch_threads : int
        Threads torch may use in each task (default 1: one per Dask worker thread, so
        workers do not oversubscribe the cores; raise it for a threads scheduler on one CCD).
    aperture_correction : bool
        Put dia-mode fluxes on a total-flux scale with an aperture correction measured on
        bright stars of the unconvolved image (default True).
    save_diff : bool
        Keep difference images (``diff/<ccd>.fits``).
    save_stamps : bool
        Keep the stamps each CCD's candidates were scored on (``ccds/<ccd>_stamps.fits``, read by
        ``pipeline vet``; default True).
    reuse_memory : bool
        Each worker keeps the memory its stages free in its C heap and reuses it for the next
        stage and CCD (default True; glibc only, :func:`pipeline.graph.tune_heap`), instead of
        handing it back to the system at every stage boundary and having the kernel zero fresh
        pages on first touch.  Measured on 4 simulated DECam CCDs (2 one-thread workers, 3
        alternating runs): 16% less time per CCD through dia, 13% through direct; a worker's
        resident memory stays at its high-water mark (peak 0.91 GB against 0.84).  Turn it off where workers must give
        memory back between CCDs (a shared node with a tight memory limit).
    cosmics : CosmicRayConfig
        Cosmic rays found (L.A.Cosmic) and masked before alignment and subtraction, in both modes.
    align, psf_match, detect, direct, match : configs
        Parameters of each stage (see their classes).

    Notes
    -----
    Fields are of two kinds.  *Science* fields change a result and are hashed for
    ``--resume``; *execution and reporting* fields (``device``, ``instrument``, ``batch_size``,
    ``torch_threads``, ``save_diff``, ``save_stamps``, ``reuse_memory``, ``score_threshold``, and
    ``psf_match.fft_workers`` / ``fft_band_rows``; declared with :func:`execution_field`) are recorded in ``run.json``
    but never hashed: changing them does not redo finished CCDs (the truth summary is
    recomputed at the new threshold).
    """

    mode: str = "dia"
    device: str = execution_field("cpu")
    model_dia: str = "triplet"
    model_direct: str = "pair-direct"
    instrument: str = execution_field("")
    score_threshold: float = execution_field(0.5)
    batch_size: int = execution_field(1024)
    torch_threads: int = execution_field(1)
    aperture_correction: bool = True
    save_diff: bool = execution_field(False)
    save_stamps: bool = execution_field(True)
    reuse_memory: bool = execution_field(True)
    cosmics: "CosmicRayConfig" = None  # type: ignore[assignment]
    align: "AlignConfig" = None  # type: ignore[assignment]
    psf_match: "PsfMatchConfig" = None  # type: ignore[assignment]
    detect: "DetectConfig" = None  # type: ignore[assignment]
    direct: "DirectDetectConfig" = None  # type: ignore[assignment]
    match: "MatchConfig" = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        from dia import PsfMatchConfig
        from pipeline.align import AlignConfig
        from pipeline.cosmics import CosmicRayConfig
        from pipeline.detect import DetectConfig, DirectDetectConfig
        from pipeline.truth import MatchConfig

        defaults = {"align": AlignConfig, "psf_match": PsfMatchConfig, "detect": DetectConfig,
                    "direct": DirectDetectConfig, "match": MatchConfig, "cosmics": CosmicRayConfig}
        for name, cls in defaults.items():
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, cls())
            elif isinstance(value, dict):
                object.__setattr__(self, name, config_from_dict(cls, value, where=name))
        if self.mode not in ("dia", "direct"):
            raise ValueError(f"RunConfig.mode must be 'dia' or 'direct', got {self.mode!r}")
        if self.device == "cuda":  # the deprecated name of the accelerator, kept working
            object.__setattr__(self, "device", "gpu")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"RunConfig.device must be 'cpu' or 'gpu', got {self.device!r}"
                             + (" ('auto' is resolved by the command line: pipeline run --device auto)"
                                if self.device == "auto" else ""))
        if self.instrument not in ("", "decam", "ztf", "lsst"):
            raise ValueError(f"RunConfig.instrument must be '', 'decam', 'ztf' or 'lsst', got {self.instrument!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"RunConfig.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.torch_threads < 1 or self.batch_size < 1:
            raise ValueError("RunConfig.torch_threads and batch_size must be >= 1")

    @property
    def model(self) -> str:
        """The model used by this run's mode.  With ``direct.selection = "dense"`` the direct default
        ``"pair-direct"`` (trained on stamps centred on search peaks only) stands for ``"pair-dense"``, trained
        for the dense score map as well (off-peak stamps); any other ``model_direct`` is used as given."""
        if self.mode == "dia":
            return self.model_dia
        if self.direct.selection == "dense" and self.model_direct == "pair-direct":
            return "pair-dense"
        return self.model_direct


# ----------------------------------------------------------------------------- device names
#
# One vocabulary everywhere: "auto", "cpu", "gpu" ("cuda" is a deprecated alias of "gpu").  The
# pipeline's array code (dia/, CuPy) and RunConfig take "cpu" / "gpu"; torch code maps "gpu" to
# its "cuda" in one place, classifier.infer.torch_device.


def canonical_device(name: str) -> str:
    """``name`` in the project's vocabulary: ``"auto"``, ``"cpu"`` or ``"gpu"`` (``"cuda"`` -> ``"gpu"``).

    Raises
    ------
    ValueError
        For any other name.
    """
    value = str(name).strip().lower()
    if value == "cuda":
        value = "gpu"
    if value not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {name!r}")
    return value


def gpu_usable(torch_too: bool = True) -> tuple[bool, str]:
    """Whether the GPU path can run here, and a sentence saying why (or why not).

    Parameters
    ----------
    torch_too : bool
        Also require torch to see a CUDA device (the CNN's half of ``pipeline run``); False for
        commands that only subtract (CuPy).
    """
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CuPy sees no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception as exc:  # noqa: BLE001 - not installed, no driver, no device: all mean "no"
        return False, f"CuPy unavailable ({type(exc).__name__}: {exc})"
    if torch_too:
        try:
            import torch

            if not torch.cuda.is_available():
                return False, "torch sees no CUDA device"
        except Exception as exc:  # noqa: BLE001
            return False, f"torch unavailable ({exc})"
    return True, f"GPU: {name}"


def resolve_device(name: str, torch_too: bool = True) -> tuple[str, str]:
    """``"cpu"`` or ``"gpu"`` for a requested device name, and the reason.

    ``"auto"`` becomes ``"gpu"`` when :func:`gpu_usable` says so, else ``"cpu"``; ``"cpu"`` and
    ``"gpu"`` (or the deprecated ``"cuda"``) are returned as asked, without probing.
    """
    device = canonical_device(name)
    if device != "auto":
        return device, "as asked"
    ok, why = gpu_usable(torch_too)
    return ("gpu" if ok else "cpu"), why
