"""Our stamp network (:class:`classifier.models.StampNet`) slid densely over a whole CCD pair.

The network is fully convolutional up to its head (three 3 x 3 stages with 2 x 2 pooling, then a
dense head over the 6 x 6 features of a 51 x 51 stamp): :func:`dense_network` turns the head into
a 6 x 6 and a 1 x 1 convolution, so that one pass over a frame gives the stamp logits of a window
every 8 pixels.  :func:`dense_logit_map` runs it at two phases per axis for a 4-pixel grid,
:func:`normalized_planes` prepares the frame as the ``sky`` scheme (:mod:`classifier.normalize`) prepares a stamp,
so a network trained on such stamps (``pair-sky``) reads the same pixels in the map; the map's
peaks are :func:`pipeline.detect.map_peaks` (the local-maximum test of the detection).  Pure array and torch
code: the pipeline's direct mode (``DirectDetectConfig.selection = "dense"``) and
``benchmarks/dense_detector.py`` feed it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .models import StampNet, _fold_batchnorm, _maxpool2

__all__ = ["STRIDE", "GRID", "WINDOW", "DenseStampNet", "dense_network", "normalized_planes", "dense_logit_map"]

#: Output stride of the dense map: three 2 x 2 poolings.
STRIDE = 8


class DenseStampNet(nn.Module):
    """A :class:`~classifier.models.StampNet` as a fully convolutional network (see :func:`dense_network`).

    ``trunk`` runs the four convolutions (BatchNorm folded in, as :meth:`StampNet.infer`) and the first two
    poolings; ``finish`` the last pooling and the head, whose ``Linear(64 * 36, 64)`` becomes a 6 x 6
    convolution and ``Linear(64, 2)`` a 1 x 1 one (dropout is the identity in eval mode).  Split so that
    :func:`dense_logit_map` runs the trunk once for the four phases (two per axis) of the last pooling.
    """

    def __init__(self, model: StampNet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        f = model.features
        with torch.no_grad():  # folded weights: plain tensors, no autograd history; folded in the model's dtype
            self._convs = [_cast(_fold_batchnorm(f[i], f[i + 1]), dtype) for i in (0, 4, 7, 11)]
        first, second = model.head[2], model.head[5]
        channels = first.in_features // 36
        self.head = nn.Conv2d(channels, first.out_features, 6).to(first.weight.device, first.weight.dtype)
        self.head.weight.data = first.weight.data.reshape(first.out_features, channels, 6, 6).clone()
        self.head.bias.data = first.bias.data.clone()
        self.out = nn.Conv2d(second.in_features, second.out_features, 1).to(first.weight.device, first.weight.dtype)
        self.out.weight.data = second.weight.data.reshape(second.out_features, second.in_features, 1, 1).clone()
        self.out.bias.data = second.bias.data.clone()
        self.to(dtype)  # the head; dense_logit_map puts the frame in the dtype of these parameters
        self.eval()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the last pooling (and its ReLU): 1/4 of the input's resolution."""
        c1, c2, c3, c4 = self._convs
        h = torch.relu(_maxpool2(c1(x)))  # pooling and ReLU commute
        h = torch.relu(_maxpool2(c3(torch.relu(c2(h)))))
        return c4(h)

    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """The last pooling, its ReLU and the head: logits (bogus, real) at 1/8 of the input's resolution."""
        return self.out(torch.relu(self.head(torch.relu(_maxpool2(features)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.trunk(x))


def _cast(conv, dtype: torch.dtype):
    """A folded convolution (:func:`classifier.models._fold_batchnorm`) with its weight and bias in ``dtype``."""
    keywords = dict(conv.keywords, weight=conv.keywords["weight"].to(dtype), bias=conv.keywords["bias"].to(dtype))
    return functools.partial(conv.func, **keywords)


def dense_network(model: StampNet, dtype: torch.dtype = torch.float32) -> DenseStampNet:
    """``model`` as a fully convolutional network (:class:`DenseStampNet`): a 51 x 51 input gives a 1 x 1 map
    with the stamp's logits, a larger frame one pair of logits per 8 x 8 pixels.  ``dtype`` (e.g.
    ``torch.bfloat16``) is the arithmetic of the result; BatchNorm is folded in the model's own first."""
    if not isinstance(model, StampNet):
        raise TypeError(f"dense_network: needs a StampNet (our triplet / pair), got {type(model).__name__}")
    return DenseStampNet(model, dtype)


#: Spacing in pixels of the map :func:`dense_logit_map` returns (two phases per axis of the network's stride).
GRID = STRIDE // 2
#: Side of the network's window: a stamp.
WINDOW = 51


def normalized_planes(search: np.ndarray, template: np.ndarray, search_background: np.ndarray,
                      template_background: np.ndarray, search_noise: np.ndarray,
                      out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The ``sky`` normalisation of :mod:`classifier.normalize` per pixel: each image less its smooth sky, over the
    search's sky noise, through ``asinh`` (a stamp gets the same from the values at its centre).

    Parameters
    ----------
    search, template : ndarray (ny, nx)
        The search image and the template resampled onto its pixels and scaled to its zero point.
    search_background, template_background : ndarray (ny, nx)
        Smooth sky of each.
    search_noise : ndarray (ny, nx)
        Sky noise of the search image (standard deviation, > 0).
    out : dict, optional
        ``{"template": ..., "search": ...}`` float32 (ny, nx) arrays to write the planes into (e.g. the
        channels of the frame the map reads), instead of new ones.

    Returns
    -------
    dict
        ``{"template": ..., "search": ...}``: ``asinh((image - sky) / noise)``, float32, non-finite pixels 0.
    """
    planes = {}
    for name, image, sky in (("template", template, template_background), ("search", search, search_background)):
        # one frame-sized array per plane (the caller's, or a new one), worked on in place
        plane = np.subtract(image, sky, dtype=np.float32, out=(out or {}).get(name))
        plane /= search_noise
        np.arcsinh(plane, out=plane)
        plane[~np.isfinite(plane)] = 0
        planes[name] = plane
    return planes


def dense_logit_map(net: torch.nn.Module, frame: np.ndarray, tile: int = 512) -> np.ndarray:
    """Logit of "real" of a stamp centred on every :data:`GRID`-th pixel of ``frame``.

    Parameters
    ----------
    net : torch.nn.Module
        :func:`dense_network` of a stamp network, on any device: its trunk runs once per tile for the
        four phases (x2.5-2.9 faster than four passes, one CPU thread, 2048 x 2048 frames).  Any other
        module with the same geometry (a 51-pixel window every 8 pixels) is run once per phase.
    frame : ndarray (C, ny, nx)
        Normalised planes in the network's channel order; zero beyond the frame (as a stamp's padding).
    tile : int
        Output pixels per tile side (a multiple of 8); bounds the memory of one pass.  A window on a tile's
        edge sees zeros where its neighbours in the frame hold data (its layers pad with zeros, as on a stamp),
        so tiles change those windows' values slightly (by ~0.01 in logit with random weights).

    Returns
    -------
    ndarray (ceil(ny / GRID), ceil(nx / GRID)) float32
        ``out[i, j]`` is the logit difference (real minus bogus) of the window centred at pixel
        ``(GRID * i, GRID * j)``.
    """
    c, ny, nx = frame.shape
    half = WINDOW // 2
    padded = np.pad(np.asarray(frame, np.float32), ((0, 0), (half, half + STRIDE), (half, half + STRIDE)))
    out = np.full((-(-ny // GRID), -(-nx // GRID)), np.nan, np.float32)
    step = max(1, tile // STRIDE)
    param = next(net.parameters(), torch.zeros(0))  # the frame goes where the network is, in its arithmetic
    phases = (0, GRID)
    cells_y = [-(-(ny - p) // STRIDE) for p in phases]  # windows per phase along each axis
    cells_x = [-(-(nx - p) // STRIDE) for p in phases]
    cells = {(i, j): np.empty((cells_y[i], cells_x[j]), np.float32) for i in range(2) for j in range(2)}
    shared = isinstance(net, DenseStampNet)
    with torch.inference_mode():
        whole = torch.from_numpy(padded)[None].to(param.device, param.dtype)  # no copy on a float32 CPU network
        for y0 in range(0, cells_y[0], step):
            for x0 in range(0, cells_x[0], step):
                y1, x1 = min(y0 + step, cells_y[0]), min(x0 + step, cells_x[0])
                # output cell k of phase p: the window starting at 8 k + p (padded pixels), 51 pixels wide
                rows = slice(STRIDE * y0, STRIDE * (y1 - 1) + WINDOW + GRID)
                cols = slice(STRIDE * x0, STRIDE * (x1 - 1) + WINDOW + GRID)
                window = whole[:, :, rows, cols].contiguous(memory_format=torch.channels_last)
                features = net.trunk(window) if shared else None
                for i, j in cells:
                    if shared:  # 4 pixels of input are one row / column of the trunk's features
                        logits = net.finish(features[:, :, i:, j:])[0]
                    else:
                        py, px = phases[i], phases[j]
                        logits = net(window[:, :, py:window.shape[2] - GRID + py, px:window.shape[3] - GRID + px])[0]
                    ry1, rx1 = min(y1, cells_y[i]), min(x1, cells_x[j])
                    diff = (logits[1] - logits[0]).float().cpu().numpy()
                    cells[i, j][y0:ry1, x0:rx1] = diff[: ry1 - y0, : rx1 - x0]
    for (i, j), values in cells.items():
        out[i::2, j::2] = values
    return out
