"""Keras HDF5 checkpoints of the paper's CNNs -> our torch state dicts (``pipeline import-keras``).

Acero-Cuellar et al. (2023) published their DES-trained networks as Keras 2 HDF5 files
(``model.save`` / ``ModelCheckpoint``).  Their architectures are ours, ``triplet-paper`` and
``pair-paper`` (:mod:`classifier.models`), layer for layer, so the weights carry over once the
conventions are translated:

* convolution kernels: Keras ``(kh, kw, in, out)`` (HWIO) -> torch ``(out, in, kh, kw)`` (OIHW); both
  frameworks compute a cross-correlation, so no kernel flip;
* dense kernels: Keras ``(in, out)`` -> torch ``(out, in)``;
* the first dense layer after ``Flatten``: Keras flattens channels-last feature maps in (row,
  column, channel) order, torch in (channel, row, column) order, so that layer's input rows are
  permuted accordingly;
* class order: in the paper's code the softmax column 0 is "real" (the autoScan label
  ``OBJECT_TYPE`` 0 = real, 1 = bogus, used directly with ``sparse_categorical_crossentropy``;
  their ``predict_data`` names column 0 ``predicted_float_Real``); our models' logit 1 is real, so
  the last layer's two output rows are swapped (:attr:`KerasImportConfig.real_column`).

Both HDF5 layouts of Keras 2 are read: a full model file (weights in the ``model_weights`` group,
the architecture in the ``model_config`` attribute, which is then checked against ours) and a
weights-only file (``save_weights``: layer groups at the root).  Layer names, their order and the
names of their weight datasets are read from the file's ``layer_names`` / ``weight_names``
attributes, never guessed.  h5py is imported lazily, on the first conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import build_model, count_parameters, get_spec

__all__ = ["KerasImportConfig", "KerasImportError", "KerasLayer", "KerasCheckpoint", "read_keras_h5",
           "convert_layers", "convert_keras_checkpoint", "PAPER_MODELS", "TRAINED_ON"]

#: Models whose Keras originals can be imported.
PAPER_MODELS: tuple[str, ...] = ("triplet-paper", "pair-paper")

#: Provenance recorded with imported weights.
TRAINED_ON = "DES autoScan (Acero-Cuellar et al. 2023)"

# Keras layer class -> the structural role compared with our model; layers absent here and not in
# _PASSIVE are refused (BatchNormalization, Conv2DTranspose, ...).
_ROLE = {"Conv2D": "conv", "Convolution2D": "conv", "MaxPooling2D": "pool", "MaxPool2D": "pool",
         "Flatten": "flatten", "Dense": "dense"}
# Layers without weights that change nothing at inference (or only apply the activation we check).
_PASSIVE = {"Dropout", "InputLayer", "Activation", "ReLU", "Softmax"}


class KerasImportError(ValueError):
    """A file that is not a usable Keras checkpoint of the requested model (message names the
    file and, where it applies, the layer)."""


@dataclasses.dataclass(frozen=True)
class KerasImportConfig:
    """Parameters of :func:`convert_keras_checkpoint`.

    Attributes
    ----------
    real_column : int
        Column of the Keras softmax output that means "real" (default 0: the paper's code trains on
        autoScan's ``OBJECT_TYPE``, 0 = real, 1 = bogus).  Our models put real in logit 1.
    trained_on : str
        Training-data provenance written into the metadata (default :data:`TRAINED_ON`).
    """

    real_column: int = 0
    trained_on: str = TRAINED_ON

    def __post_init__(self) -> None:
        if self.real_column not in (0, 1):
            raise ValueError(f"KerasImportConfig.real_column must be 0 or 1, got {self.real_column!r}")


@dataclasses.dataclass
class KerasLayer:
    """One layer of a Keras checkpoint, in file order.

    Attributes
    ----------
    name : str
        The layer's name (its HDF5 group).
    class_name : str or None
        Keras class (``Conv2D``, ``Dense``, ...) from ``model_config``; None in a weights-only file.
    config : dict
        The layer's Keras config (empty in a weights-only file).
    weights : dict of str -> ndarray
        ``kernel`` / ``bias`` (or whatever the file names them: the part after the last ``/``,
        without ``:0``).
    """

    name: str
    class_name: str | None
    config: dict[str, Any]
    weights: dict[str, np.ndarray]


@dataclasses.dataclass
class KerasCheckpoint:
    """The content of a Keras HDF5 checkpoint that matters for the conversion.

    Attributes
    ----------
    path : Path
    layout : str
        ``"model"`` (full model file: ``model_weights`` group plus ``model_config``) or ``"weights"``
        (``save_weights`` file).
    layers : list of KerasLayer
        Every layer in the order of the file's ``layer_names`` (weights-only files list only layers
        with weights).
    input_shape : tuple of int or None
        ``(rows, cols, channels)`` from the model config, when present.
    keras_version, backend : str
        From the file's attributes ("" when absent).
    """

    path: Path
    layout: str
    layers: list[KerasLayer]
    input_shape: tuple[int, ...] | None
    keras_version: str
    backend: str


def _text(value: Any) -> str:
    """An HDF5 string attribute (bytes or str) as str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _names(attr: Any) -> list[str]:
    """A ``layer_names`` / ``weight_names`` attribute (array of bytes, possibly empty) as strings."""
    return [_text(v) for v in np.asarray(attr).reshape(-1)] if attr is not None else []


def _model_config_layers(raw: Any, path: Path) -> tuple[dict[str, dict], tuple[int, ...] | None]:
    """``{layer name: {"class_name", "config"}}`` and the input shape from a ``model_config`` attribute."""
    try:
        cfg = json.loads(_text(raw))
    except (ValueError, TypeError) as exc:
        raise KerasImportError(f"{path}: unreadable model_config attribute ({exc})") from None
    body = cfg.get("config", {}) if isinstance(cfg, dict) else {}
    layers = body.get("layers", []) if isinstance(body, dict) else body  # Keras < 2.2.3: a plain list
    if not isinstance(layers, list):
        raise KerasImportError(f"{path}: model_config has no layer list")
    out: dict[str, dict] = {}
    input_shape = None
    for layer in layers:
        if not isinstance(layer, dict) or "class_name" not in layer:
            raise KerasImportError(f"{path}: malformed layer entry in model_config: {str(layer)[:80]}")
        conf = layer.get("config", {}) or {}
        name = layer.get("name") or conf.get("name")
        out[str(name)] = {"class_name": str(layer["class_name"]), "config": conf}
        shape = conf.get("batch_input_shape") or conf.get("batch_shape")
        if input_shape is None and shape:
            input_shape = tuple(int(s) for s in shape[1:] if s is not None)
    return out, input_shape


def read_keras_h5(path: str | Path) -> KerasCheckpoint:
    """Read the layers and weights of a Keras 2 HDF5 checkpoint.

    Parameters
    ----------
    path : str or Path
        A full model file (``model.save`` / ``ModelCheckpoint``) or a weights-only file
        (``model.save_weights``) in HDF5.

    Returns
    -------
    KerasCheckpoint

    Raises
    ------
    KerasImportError
        The file is missing, not HDF5, or not a Keras 2 checkpoint (no ``layer_names``), or a layer's
        listed weight is absent.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise KerasImportError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise KerasImportError(f"{path}: not an HDF5 file ({exc})") from None
    with f:
        if "model_weights" in f:
            group, layout = f["model_weights"], "model"
        elif "layer_names" in f.attrs:
            group, layout = f, "weights"
        elif isinstance(f.get("layers"), h5py.Group):
            raise KerasImportError(f"{path}: a Keras 3 '.weights.h5' file; only the Keras 2 HDF5 layout "
                                   "(model.save(...h5) / save_weights(...h5)) is supported")
        else:
            raise KerasImportError(f"{path}: not a Keras checkpoint (no 'model_weights' group and no "
                                   "'layer_names' attribute)")
        if "layer_names" not in group.attrs:
            raise KerasImportError(f"{path}: not a Keras checkpoint ('{group.name}' has no 'layer_names' attribute)")
        config_layers: dict[str, dict] = {}
        input_shape = None
        if "model_config" in f.attrs:
            config_layers, input_shape = _model_config_layers(f.attrs["model_config"], path)
        layers = []
        for name in _names(group.attrs["layer_names"]):
            if name not in group:
                raise KerasImportError(f"{path}: layer {name!r} is listed in layer_names but has no group")
            lg = group[name]
            weights = {}
            for wname in _names(lg.attrs.get("weight_names")):
                if wname not in lg:
                    raise KerasImportError(f"{path}: layer {name!r}: weight {wname!r} listed but absent")
                key = wname.rsplit("/", 1)[-1].split(":", 1)[0]
                if key in weights:
                    raise KerasImportError(f"{path}: layer {name!r}: two weights named {key!r}")
                weights[key] = np.array(lg[wname], dtype=np.float64)
            info = config_layers.get(name, {})
            if config_layers and not info:
                raise KerasImportError(f"{path}: layer {name!r} has weights but is not in model_config")
            layers.append(KerasLayer(name, info.get("class_name"), dict(info.get("config", {})), weights))
        return KerasCheckpoint(path, layout, layers, input_shape, _text(f.attrs.get("keras_version", "")),
                               _text(f.attrs.get("backend", "")))


def _torch_skeleton(net: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Our model's structural layers in forward order: ``(role, module name, module)``."""
    roles = {nn.Conv2d: "conv", nn.MaxPool2d: "pool", nn.Flatten: "flatten", nn.Linear: "dense"}
    out = []
    for name, mod in net.named_modules():
        role = roles.get(type(mod))
        if role:
            out.append((role, name, mod))
    return out


def _check_keras_config(ckpt: KerasCheckpoint, model_name: str, skeleton: list, input_shape: tuple[int, ...]) -> None:
    """With a ``model_config``: the Keras layer sequence, activations, padding and input shape are ours."""
    path = ckpt.path
    if ckpt.input_shape is not None and tuple(ckpt.input_shape) != input_shape:
        raise KerasImportError(f"{path}: the Keras model takes input {ckpt.input_shape}, model {model_name!r} "
                               f"takes {input_shape} (rows, cols, channels)")
    roles = []
    dense = [layer for layer in ckpt.layers if _ROLE.get(layer.class_name or "") == "dense"]
    for layer in ckpt.layers:
        cls, conf = layer.class_name or "", layer.config
        role = _ROLE.get(cls)
        if role is None:
            if cls in _PASSIVE:
                continue
            raise KerasImportError(f"{path}: layer {layer.name!r} is a {cls}, which model {model_name!r} "
                                   "does not have")
        roles.append(role)
        where = f"{path}: layer {layer.name!r} ({cls})"
        if conf.get("data_format", "channels_last") != "channels_last":
            raise KerasImportError(f"{where}: data_format {conf['data_format']!r}; expected channels_last")
        if role in ("conv", "pool") and conf.get("padding", "valid") != "valid":
            raise KerasImportError(f"{where}: padding {conf['padding']!r}; the paper's models use 'valid'")
        if role == "conv":
            if tuple(conf.get("strides", (1, 1))) != (1, 1) or tuple(conf.get("dilation_rate", (1, 1))) != (1, 1):
                raise KerasImportError(f"{where}: strides {conf.get('strides')} / dilation "
                                       f"{conf.get('dilation_rate')}; expected 1")
            if conf.get("activation", "relu") != "relu":
                raise KerasImportError(f"{where}: activation {conf['activation']!r}; expected relu")
        if role == "pool":
            size = tuple(conf.get("pool_size", (2, 2)))
            strides = tuple(conf.get("strides") or size)
            if size != (2, 2) or strides != (2, 2):
                raise KerasImportError(f"{where}: pool_size {size}, strides {strides}; expected 2 x 2")
        if role == "dense":
            want = ("softmax", "linear") if layer is dense[-1] else ("relu",)
            if conf.get("activation", want[0]) not in want:
                raise KerasImportError(f"{where}: activation {conf['activation']!r}; expected {' or '.join(want)}")
    ours = [role for role, _, _ in skeleton]
    if roles != ours:
        raise KerasImportError(f"{path}: layer sequence {roles} differs from model {model_name!r} ({ours})")


def _feature_shape(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, rows, cols) of the feature map that reaches ``Flatten`` for one input stamp."""
    rows, cols, ch = input_shape
    with torch.no_grad():
        y = net.features(torch.zeros(1, ch, rows, cols))
    return tuple(int(v) for v in y.shape[1:])


def convert_layers(ckpt: KerasCheckpoint, model_name: str,
                   config: KerasImportConfig = KerasImportConfig()) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Map a checkpoint's weighted layers onto model ``model_name`` and convert them.

    Parameters
    ----------
    ckpt : KerasCheckpoint
        From :func:`read_keras_h5`.
    model_name : {"triplet-paper", "pair-paper"}
    config : KerasImportConfig

    Returns
    -------
    state_dict : dict of str -> Tensor (float32)
        Loads strictly into ``build_model(model_name)``.
    mapping : list of dict
        One entry per weighted layer: Keras name, torch module, shapes and the conversion applied.

    Raises
    ------
    KerasImportError
        Naming the file and layer: a layer type, count, activation or shape that does not fit.
    """
    path = ckpt.path
    if model_name not in PAPER_MODELS:
        raise KerasImportError(f"model {model_name!r} has no Keras original; choose one of {PAPER_MODELS}")
    spec = get_spec(model_name)
    net = build_model(model_name)
    input_shape = (51, 51 * len(spec.panels), 1)
    skeleton = _torch_skeleton(net)
    if ckpt.layout == "model":
        _check_keras_config(ckpt, model_name, skeleton, input_shape)
    keras_w = [layer for layer in ckpt.layers if layer.weights]
    torch_w = [(role, name, mod) for role, name, mod in skeleton if role in ("conv", "dense")]
    if len(keras_w) != len(torch_w):
        raise KerasImportError(f"{path}: {len(keras_w)} layers with weights "
                               f"({', '.join(repr(k.name) for k in keras_w)}); model {model_name!r} has "
                               f"{len(torch_w)} ({len([r for r in torch_w if r[0] == 'conv'])} convolutions, "
                               f"{len([r for r in torch_w if r[0] == 'dense'])} dense)")
    c, h, w = _feature_shape(net, input_shape)
    state: dict[str, torch.Tensor] = {}
    mapping = []
    first_dense = True
    for k, (layer, (role, tname, mod)) in enumerate(zip(keras_w, torch_w)):
        where = f"{path}: layer {layer.name!r}"
        extra = sorted(set(layer.weights) - {"kernel", "bias"})
        if extra or "kernel" not in layer.weights:
            raise KerasImportError(f"{where}: weights {sorted(layer.weights)}; expected kernel and bias "
                                   f"(model {model_name!r} layer {tname} is a {type(mod).__name__})")
        kernel = layer.weights["kernel"]
        bias = layer.weights.get("bias")
        want_w = tuple(mod.weight.shape)
        if role == "conv":
            expected_k = (want_w[2], want_w[3], want_w[1], want_w[0])
            if kernel.shape != expected_k:
                raise KerasImportError(f"{where}: kernel shape {kernel.shape}, but model {model_name!r} layer "
                                       f"{tname} (Conv2d {want_w[1]}->{want_w[0]}, {want_w[2]}x{want_w[3]}) "
                                       f"needs {expected_k} (rows, cols, in, out)")
            weight = np.transpose(kernel, (3, 2, 0, 1))
            how = "conv kernel HWIO -> OIHW"
        else:
            if kernel.ndim != 2 or kernel.shape != (want_w[1], want_w[0]):
                raise KerasImportError(f"{where}: dense kernel shape {kernel.shape}, but model {model_name!r} "
                                       f"layer {tname} (Linear {want_w[1]}->{want_w[0]}) needs "
                                       f"{(want_w[1], want_w[0])} (in, out)")
            weight = kernel.T
            how = "dense kernel (in, out) -> (out, in)"
            if first_dense:
                if c * h * w != want_w[1]:  # cannot happen for a registered model; a guard all the same
                    raise KerasImportError(f"{where}: feature map {c}x{h}x{w} does not flatten to {want_w[1]}")
                # Keras input index (row, col, channel) -> torch input index (channel, row, col)
                weight = weight.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
                how += (f"; inputs permuted from the Keras (row, col, channel) to the torch (channel, row, col) "
                        f"flatten of {c}x{h}x{w}")
                first_dense = False
            if k == len(keras_w) - 1:
                order = [1 - config.real_column, config.real_column]
                weight = weight[order]
                bias = None if bias is None else bias[order]
                how += ("; output rows swapped (Keras column 0 = real -> our logit 1 = real)" if order == [1, 0]
                        else "; output rows kept (Keras column 1 = real = our logit 1)")
        want_b = tuple(mod.bias.shape) if mod.bias is not None else None
        if bias is None and want_b is not None:
            raise KerasImportError(f"{where}: no bias, but model {model_name!r} layer {tname} has one")
        if bias is not None and bias.shape != want_b:
            raise KerasImportError(f"{where}: bias shape {bias.shape}, model {model_name!r} layer {tname} "
                                   f"needs {want_b}")
        state[f"{tname}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        if bias is not None:
            state[f"{tname}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        mapping.append({"keras": layer.name, "torch": tname, "keras_kernel": list(kernel.shape),
                        "torch_weight": list(want_w), "conversion": how})
    n_keras = sum(int(v.size) for layer in keras_w for v in layer.weights.values())
    n_ours = count_parameters(net)
    if n_keras != n_ours:
        raise KerasImportError(f"{path}: {n_keras} parameters; model {model_name!r} has {n_ours}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a key the mapping missed: a bug, reported with the file
        raise KerasImportError(f"{path}: converted weights do not load into {model_name!r}: {exc}") from None
    return state, mapping


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_keras_checkpoint(path: str | Path, model_name: str,
                             config: KerasImportConfig = KerasImportConfig()) -> tuple[dict[str, torch.Tensor], dict]:
    """A Keras HDF5 checkpoint of the paper's triplet or pair CNN as our state dict plus metadata.

    Parameters
    ----------
    path : str or Path
        Keras 2 HDF5 file (full model or weights only).
    model_name : {"triplet-paper", "pair-paper"}
    config : KerasImportConfig

    Returns
    -------
    state_dict : dict of str -> Tensor
        For ``build_model(model_name)``.
    metadata : dict
        JSON-able: ``source`` (file, SHA-256, bytes, layout, Keras version), ``conversion`` (the
        per-layer mapping, class order, parameter count) and ``trained_on``; pass it to
        :func:`classifier.train.save_weights` as keyword arguments.

    Raises
    ------
    KerasImportError
    """
    path = Path(path)
    ckpt = read_keras_h5(path)
    state, mapping = convert_layers(ckpt, model_name, config)
    n_params = sum(int(v.numel()) for v in state.values())
    metadata = {
        "source": {"file": path.name, "path": str(path), "sha256": _sha256(path), "bytes": path.stat().st_size,
                   "format": "Keras HDF5 " + ("full model (model_weights group)" if ckpt.layout == "model"
                                              else "weights only (save_weights)"),
                   "keras_version": ckpt.keras_version, "backend": ckpt.backend},
        "conversion": {"tool": "classifier.keras_import", "model": model_name, "parameters": n_params,
                       "keras_real_column": config.real_column,
                       "class_order": f"Keras softmax column {config.real_column} = real -> logit 1 = real",
                       "layers": mapping},
        "trained_on": config.trained_on,
    }
    return state, metadata
