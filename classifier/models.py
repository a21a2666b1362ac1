"""Real-bogus CNNs: the paper's two networks and our own stamps-as-channels designs.

Every model takes a float tensor prepared by :func:`prepare_input` from canonical stamps
``(N, C, 51, 51)`` (channel order template, search, difference) and returns two logits
(bogus, real); P(real) is the softmax of the second.

``triplet-paper`` / ``pair-paper``
    Acero-Cuellar et al. (2023) exactly: the stamps placed side by side in ONE channel,
    triplet ``[difference | search | template]`` (51 x 153), pair ``[search | template]``
    (51 x 102); ReLU, valid padding, dropout 0.4 where the paper lists it, Dense32 -> Dense2;
    126,050 and 45,908 parameters; the paper's normalisation.
``triplet`` / ``pair``
    Ours: stamps as channels (3 or 2), the shared-scale normalisation (template and search on one
    scale, so their flux ratio survives), four 3x3 convolutions with BatchNorm (~170k parameters), dihedral
    (flip / 90-degree rotation) augmentation in training.  The pair model sees template and search
    only (no template-minus-search channel: that would be a difference image).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import CHANNELS
from .normalize import normalize_stamps

__all__ = ["ModelSpec", "MODELS", "build_model", "get_spec", "prepare_input", "count_parameters",
           "TripletPaper", "PairPaper", "StampNet"]


def _maxpool2(y: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(y, 2)`` (floor mode) as the maximum of the four strided views of the 2 x 2
    windows: identical values, and on CPU 1.2-8x faster than torch's pooling kernel for these
    small feature maps (no index bookkeeping, vectorised in either memory layout)."""
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    return torch.maximum(torch.maximum(y[..., 0:h:2, 0:w:2], y[..., 1:h:2, 0:w:2]),
                         torch.maximum(y[..., 0:h:2, 1:w:2], y[..., 1:h:2, 1:w:2]))


def _conv_pool_relu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))``: pooling before the ReLU (they commute) halves its work."""
    return nn.functional.relu(_maxpool2(conv(x)))


class TripletPaper(nn.Module):
    """The paper's triplet CNN on a (N, 1, 51, 153) [difference | search | template] input."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.4),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.4),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 15, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The same logits as ``forward`` in eval mode, computed faster on CPU (no dropout)."""
        f = self.features
        # the first layer's output (16 x 47 x 149 per stamp) is pooled 16 stamps at a time, while
        # it is still in the cache: ~1.8x faster in float32 than pooling a batch of 64 at once
        h = torch.cat([_conv_pool_relu(x[i:i + 16], f[0]) for i in range(0, x.shape[0], 16)])
        h = _conv_pool_relu(h, f[4])
        h = _conv_pool_relu(h, f[8])
        return self.head(h)


class PairPaper(nn.Module):
    """The paper's two-image CNN on a (N, 1, 51, 102) [search | template] input."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 1, 7), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.4),
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 10, 32), nn.ReLU(), nn.Linear(32, 2))

    def _first_conv(self, x: torch.Tensor) -> torch.Tensor:
        # The first layer maps 1 channel to 1 channel, a shape oneDNN handles poorly (~4x slower
        # than its FLOPs warrant).  The same convolution computed as a depthwise convolution over
        # the batch (batch as channels, the one kernel shared) is exact and fast.
        conv = self.features[0]
        n = x.shape[0]
        k = conv.weight.shape[-1]
        y = nn.functional.conv2d(x.reshape(1, n, *x.shape[2:]), conv.weight.expand(n, 1, k, k),
                                 conv.bias.expand(n), groups=n)
        return y.reshape(n, 1, *y.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features[1:](self._first_conv(x)))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The same logits as ``forward`` in eval mode, computed faster on CPU (no dropout)."""
        f = self.features
        h = nn.functional.relu(_maxpool2(self._first_conv(x)))
        h = _conv_pool_relu(h.contiguous(memory_format=torch.channels_last), f[3])
        h = _conv_pool_relu(h, f[7])
        return self.head(h)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class StampNet(nn.Module):
    """Our stamps-as-channels CNN: 51 -> 25 -> 12 -> 6 with BatchNorm, then a small dense head.

    Parameters
    ----------
    in_channels : int
        Number of stamps (3 for the triplet, 2 for the pair).
    width : int
        Filters of the first stage (doubled at the second and third).
    hidden : int
        Units of the head's hidden layer.
    """

    def __init__(self, in_channels: int, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        # one convolution at full resolution (cost), two at 25 x 25, one at 12 x 12
        self.features = nn.Sequential(
            *_block(in_channels, w1), nn.MaxPool2d(2),                    # 51 -> 25
            *_block(w1, w2), *_block(w2, w2), nn.MaxPool2d(2),            # 25 -> 12
            *_block(w2, w3), nn.MaxPool2d(2),                             # 12 -> 6
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(w3 * 36, hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The same logits as ``forward`` in eval mode, faster: BatchNorm folded into the
        convolutions, pooling before ReLU."""
        f = self.features
        c1, c2, c3, c4 = (_fold_batchnorm(f[i], f[i + 1]) for i in (0, 4, 7, 11))
        h = _conv_pool_relu(x, c1)
        h = _conv_pool_relu(nn.functional.relu(c2(h)), c3)
        h = _conv_pool_relu(h, c4)
        return self.head(h)


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """The convolution ``x -> bn(conv(x))`` with ``bn`` in eval mode (running statistics) as one
    convolution with folded weights and bias (plain tensors: no module, no parameter init)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return functools.partial(nn.functional.conv2d, weight=conv.weight * scale[:, None, None, None], bias=bias,
                             stride=conv.stride, padding=conv.padding)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model needs from the stamps and how to build it.

    Attributes
    ----------
    name : str
    channels : tuple of str
        Canonical channels the model uses, in canonical order.
    scheme : str
        Normalisation scheme (see :mod:`classifier.normalize`).
    layout : str
        ``"side-by-side"`` (one channel, panels along the width in ``panels`` order) or
        ``"channels"`` (one channel per stamp, in ``channels`` order).
    panels : tuple of str
        Panel order for the side-by-side layout (empty otherwise).
    augment : bool
        Whether training applies random flips and 90-degree rotations.
    builder : callable
        Returns a fresh ``nn.Module``.
    """

    name: str
    channels: tuple[str, ...]
    scheme: str
    layout: str
    panels: tuple[str, ...]
    augment: bool
    builder: Callable[[], nn.Module] = dataclasses.field(repr=False, compare=False)

    def metadata(self) -> dict:
        """JSON-able description stored with weights."""
        return {"name": self.name, "channels": list(self.channels), "scheme": self.scheme,
                "layout": self.layout, "panels": list(self.panels), "augment": self.augment}


#: Registry of model names -> specs.
MODELS: dict[str, ModelSpec] = {
    "triplet-paper": ModelSpec("triplet-paper", CHANNELS, "paper", "side-by-side",
                               ("difference", "search", "template"), False, TripletPaper),
    "pair-paper": ModelSpec("pair-paper", ("template", "search"), "paper", "side-by-side",
                            ("search", "template"), False, PairPaper),
    "triplet": ModelSpec("triplet", CHANNELS, "shared", "channels", (), True, lambda: StampNet(3)),
    "pair": ModelSpec("pair", ("template", "search"), "shared", "channels", (), True, lambda: StampNet(2)),
    # the direct mode's dense detector: our pair network on stamps in sky units, the normalisation its score map
    # gives every window (classifier.normalize, scheme "sky")
    "pair-sky": ModelSpec("pair-sky", ("template", "search"), "sky", "channels", (), True, lambda: StampNet(2)),
    # the same with half the filters at every stage and half the head: ~1/4 of the dense map's arithmetic
    "pair-sky-lite": ModelSpec("pair-sky-lite", ("template", "search"), "sky", "channels", (), True,
                               lambda: StampNet(2, width=8, hidden=32)),
}


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model name (clear error otherwise)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}") from None


def build_model(name: str) -> nn.Module:
    """A freshly initialised model of the registered ``name``."""
    return get_spec(name).builder()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def select_channels(stamps: np.ndarray, spec: ModelSpec,
                    channels: tuple[str, ...] = CHANNELS) -> np.ndarray:
    """The model's channels out of a stamp array whose channels are named ``channels``.

    A pair model given a 3-channel (template, search, difference) array ignores the difference.
    """
    if stamps.ndim != 4 or stamps.shape[2:] != (51, 51):
        raise ValueError(f"stamps must be (N, C, 51, 51), got shape {stamps.shape}")
    if len(channels) != stamps.shape[1]:
        if stamps.shape[1] == len(spec.channels):
            channels = spec.channels
        else:
            raise ValueError(f"stamps have {stamps.shape[1]} channels but names {channels} were given")
    missing = [c for c in spec.channels if c not in channels]
    if missing:
        raise ValueError(f"model {spec.name!r} needs channel(s) {missing}; stamps have {tuple(channels)}")
    idx = [channels.index(c) for c in spec.channels]
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return stamps[:, idx[0]:idx[0] + len(idx)]  # a consecutive run: a view, no copy
    return stamps[:, idx]


def arrange(normalized: np.ndarray | torch.Tensor, spec: ModelSpec):
    """Put normalised stamps (in ``spec.channels`` order) into the model's input layout."""
    if spec.layout == "channels":
        return normalized
    cat = torch.cat if isinstance(normalized, torch.Tensor) else np.concatenate
    order = [spec.channels.index(p) for p in spec.panels]
    return cat([normalized[:, i:i + 1] for i in order], -1)


def prepare_input(stamps: np.ndarray, spec: ModelSpec | str,
                  channels: tuple[str, ...] = CHANNELS) -> np.ndarray:
    """Canonical stamps -> the model's normalised float32 input array.

    Parameters
    ----------
    stamps : ndarray or Tensor (N, C, 51, 51)
        Stamps whose channels are named ``channels`` (canonical by default); a tensor stays on
        its device and a tensor is returned.
    spec : ModelSpec or str
    channels : tuple of str

    Returns
    -------
    ndarray
        ``(N, 1, 51, 51 * k)`` for side-by-side models, ``(N, k, 51, 51)`` for channel models.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    if not isinstance(stamps, torch.Tensor):
        stamps = np.asarray(stamps)
    sel = select_channels(stamps, spec, tuple(channels))
    norm = arrange(normalize_stamps(sel, spec.scheme, spec.channels), spec)
    return norm.contiguous() if isinstance(norm, torch.Tensor) else np.ascontiguousarray(norm)


def panel_slices(spec: ModelSpec) -> dict[str, tuple[int, slice, slice]]:
    """Where each stamp sits in the model input: name -> (channel, row slice, column slice)."""
    if spec.layout == "channels":
        return {c: (i, slice(0, 51), slice(0, 51)) for i, c in enumerate(spec.channels)}
    return {p: (0, slice(0, 51), slice(51 * k, 51 * (k + 1))) for k, p in enumerate(spec.panels)}
