"""Array-module handle: the same dia code runs on NumPy/SciPy or CuPy."""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Any, Callable

__all__ = ["Backend", "get_backend", "GPU_INSTALL_HINT", "StepClock"]

GPU_INSTALL_HINT = "install the GPU extra: pip install transient-pipeline[gpu] (CuPy for CUDA 12)"


@dataclasses.dataclass
class Backend:
    """The array module ``xp`` with its FFT and ndimage companions.

    ``fft_hook``, when set, is called with the name of every full-frame FFT
    (used by the tests to count convolutions).
    """

    name: str
    xp: ModuleType
    fft: ModuleType
    ndimage: ModuleType
    workers: int | None = None
    fft_hook: Callable[[str], None] | None = None

    def _kw(self) -> dict[str, Any]:
        return {"workers": self.workers} if self.name == "cpu" else {}

    def rfft2(self, a, s=None, *, tag: str = "rfft2"):
        if self.fft_hook is not None:
            self.fft_hook(tag)
        return self.fft.rfft2(a, s=s, **self._kw())

    def irfft2(self, a, s, *, tag: str = "irfft2"):
        if self.fft_hook is not None:
            self.fft_hook(tag)
        return self.fft.irfft2(a, s=s, **self._kw())

    def asnumpy(self, a):
        """Copy to a NumPy array (no-op on CPU)."""
        if self.name == "cpu":
            return a
        return self.xp.asnumpy(a)

    def sync(self) -> None:
        """Wait for queued device work (for honest timings)."""
        if self.name == "gpu":
            self.xp.cuda.Stream.null.synchronize()


def get_backend(device: str = "cpu", workers: int | None = None) -> Backend:
    """Return the backend for ``device`` (``"cpu"`` or ``"gpu"``).

    Raises
    ------
    ValueError
        If ``device`` is not ``"cpu"`` or ``"gpu"``.
    ImportError
        If ``device="gpu"`` and CuPy is not installed.
    RuntimeError
        If CuPy is installed but no CUDA device is usable.
    """
    if device == "cpu":
        import numpy
        import scipy.fft
        import scipy.ndimage

        return Backend("cpu", numpy, scipy.fft, scipy.ndimage, workers or os.cpu_count() or 1)
    if device == "gpu":
        try:
            import cupy
            import cupyx.scipy.fft
            import cupyx.scipy.ndimage
        except ImportError as exc:
            raise ImportError(f"device='gpu' needs CuPy, which is not importable ({exc}); {GPU_INSTALL_HINT}") from None
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken
            raise RuntimeError(f"device='gpu': CuPy is installed but CUDA is not usable ({exc})") from None
        if n < 1:
            raise RuntimeError("device='gpu': CuPy is installed but no CUDA device was found")
        return Backend("gpu", cupy, cupyx.scipy.fft, cupyx.scipy.ndimage)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


class StepClock:
    """Records synchronised sub-step times ``"<prefix>.<name>"`` into a dict (no-op without one)."""

    def __init__(self, be: Backend, timings: dict | None, prefix: str):
        import time

        self._time = time.perf_counter
        self.be, self.timings, self.prefix = be, timings, prefix
        self.t = self._time()

    def __call__(self, name: str) -> None:
        if self.timings is None:
            return
        self.be.sync()
        now = self._time()
        self.timings[f"{self.prefix}.{name}"] = now - self.t
        self.t = now
