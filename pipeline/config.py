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

if TYPE_CHECKING:  # the stage configs import their modules; RunConfig resolves them at run time
    from dia import PsfMatchConfig
    from pipeline.align import AlignConfig
    from pipeline.detect import DetectConfig, DirectDetectConfig
    from pipeline.truth import MatchConfig

__all__ = ["config_to_dict", "config_from_dict", "load_toml", "RunConfig"]

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


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return config_from_dict(annotation, value, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError):
                continue
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is Path and isinstance(value, str):
        return Path(value)
    return value


def config_from_dict(cls: type[C], data: dict[str, Any] | None, *, where: str = "") -> C:
    """Build the frozen dataclass ``cls`` from a dict (e.g. a TOML table).

    Missing keys keep their documented defaults; unknown keys raise.

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
    ValueError
        If ``data`` holds keys that ``cls`` does not define.
    """
    data = dict(data or {})
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # forward references resolved by the class itself (e.g. RunConfig)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        label = f" in {where}" if where else ""
        raise ValueError(
            f"unknown {cls.__name__} parameter(s){label}: {', '.join(unknown)}; "
            f"valid parameters are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


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
        Shipped model name (``classifier/weights/<name>.pt``) or a path, per mode.
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
    align, psf_match, detect, direct, match : configs
        Parameters of each stage (see their classes).
    """

    mode: str = "dia"
    device: str = "cpu"
    model_dia: str = "triplet"
    model_direct: str = "pair-direct"
    score_threshold: float = 0.5
    batch_size: int = 1024
    torch_threads: int = 1
    aperture_correction: bool = True
    save_diff: bool = False
    align: "AlignConfig" = None  # type: ignore[assignment]
    psf_match: "PsfMatchConfig" = None  # type: ignore[assignment]
    detect: "DetectConfig" = None  # type: ignore[assignment]
    direct: "DirectDetectConfig" = None  # type: ignore[assignment]
    match: "MatchConfig" = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        from dia import PsfMatchConfig
        from pipeline.align import AlignConfig
        from pipeline.detect import DetectConfig, DirectDetectConfig
        from pipeline.truth import MatchConfig

        defaults = {"align": AlignConfig, "psf_match": PsfMatchConfig, "detect": DetectConfig,
                    "direct": DirectDetectConfig, "match": MatchConfig}
        for name, cls in defaults.items():
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, cls())
            elif isinstance(value, dict):
                object.__setattr__(self, name, config_from_dict(cls, value, where=name))
        if self.mode not in ("dia", "direct"):
            raise ValueError(f"RunConfig.mode must be 'dia' or 'direct', got {self.mode!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"RunConfig.device must be 'cpu' or 'gpu', got {self.device!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"RunConfig.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.torch_threads < 1 or self.batch_size < 1:
            raise ValueError("RunConfig.torch_threads and batch_size must be >= 1")

    @property
    def model(self) -> str:
        """The model used by this run's mode."""
        return self.model_dia if self.mode == "dia" else self.model_direct
