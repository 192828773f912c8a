"""Backends: which arrays hold the numbers, and which code runs the three heavy primitives.

Stable Diffusion spends almost all of its time in three operations: convolution,
group normalisation and attention. minisd keeps everything else (the autograd engine,
elementwise math, the models) written once against an array module ``xp`` (NumPy or
CuPy, the same API), and lets the backend choose who computes the primitives (and
matmul and the four activations and norms whose fast CPU code differs: the contract below):

    backend     arrays    conv2d / group_norm / attention                     dtype
    ---------   -------   -------------------------------------------------   -----------
    naive       NumPy     the formulas, plainly: naive.py (read it first)     the input's
    numpy       NumPy     the fast CPU path: fast_cpu.py (the default)        the input's
    emulated    NumPy     kernels/*.cu compiled with g++ against the CPU      float32
                          emulator (cuda_launch.py, cuda_build.py)
    cupy        CuPy      kernels/*.cu compiled by NVRTC, launched through    float32
                          cupy.RawModule (the same two files)

Choose with ``minisd.set_backend(name)`` or the environment variable ``MINISD_BACKEND``.
The naive backend is the oracle: the others are tested against it, and it against
PyTorch in float64 (float64 checks, such as minisd.gradcheck's, need naive or numpy).
This package's files: naive.py, fast_cpu.py and cpu_settings.py (every process-wide
setting minisd makes on a CPU, made when this package is imported: MINISD_CPU_TUNING=0
turns them off), cuda_launch.py (grid, block and shared memory of every kernel) and
cuda_build.py (the CUDA toolchain: parsing, the emulator's build cache, ctypes, NVRTC).

Every backend provides the same raw-array functions (``backend.ops``); the autograd
Functions in minisd/functional.py call them and never ask which backend runs. The three
primitives, which the CUDA kernels compute:

    conv2d_forward(x, w, b, stride, padding) -> y
    conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_db) -> (dx, dw, db)
    group_norm_forward(x, num_groups, weight, bias, eps) -> (y, mean, rstd)
    group_norm_backward(dy, x, num_groups, weight, mean, rstd) -> (dx, dweight, dbias)
    attention_forward(q, k, v, scale, is_causal) -> (o, lse)
    attention_backward(do, q, k, v, o, lse, scale, is_causal) -> (dq, dk, dv)

and the ops that the fast CPU path runs block by block on all cores (every other backend
runs naive.py's whole-array expressions for them):

    matmul(a, b) -> a @ b
    silu_forward(a, beta) -> (y, s)                 y = a s, s = sigmoid(beta a)
    silu_backward(g, y, s, beta) -> da
    gelu_forward(a, keep_slope) -> (y, slope)        y = a Phi(a); dy/da (or None); da = g slope
    geglu_forward(x, keep_slope) -> (y, gelu_g, slope)   y = h GELU(g), [h, g] = x's two halves
    geglu_backward(grad, h, gelu_g, slope) -> dx
    layer_norm_forward(x, normalized_ndim, weight, bias, eps) -> (y, xhat, rstd)
    layer_norm_backward(dy, xhat, rstd, weight, need_dx, need_dweight, need_dbias) -> (dx, dweight, dbias)

Shapes: x (N, C, H, W), w (K, C, R, S), y (N, K, P, Q); mean and rstd (N, G); a gradient
not asked for (need_*) is None, and so are dweight and dbias where weight is None;
q (B, H, Lq, d), k (B, H, Lk, d), v (B, H, Lk, dv), o (B, H, Lq, dv),
lse (B, H, Lq) = log sum_j exp(s_ij); is_causal hides key j from query i where j > i.
The activations' outputs and saved arrays have their input's shape (GEGLU's: h's, half
of x); layer norm's weight and bias are both given or both None, rstd has one value per
normalised row, x.shape[:-normalized_ndim].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# Before anything loads NumPy: the process-wide CPU settings (OpenBLAS reads its own when
# NumPy loads it). MINISD_CPU_TUNING=0 leaves the process as it is.
from minisd.backends import cpu_settings

cpu_settings.apply()

from minisd.backends.cuda_build import BackendUnavailable  # noqa: E402  (where a backend's toolchain is missing)

BACKENDS = ("naive", "numpy", "emulated", "cupy")


@dataclass(frozen=True)
class Backend:
    name: str
    xp: ModuleType  # numpy or cupy
    ops: Any  # an object with the raw-array functions listed in the module docstring

    @property
    def float64(self) -> bool:
        """Whether this backend computes float64 inputs in float64 throughout (naive, numpy); the
        kernels of emulated and cupy compute conv2d, group norm and attention in float32."""
        return self.name in ("naive", "numpy")

    def asarray(self, data, dtype=None):
        """Move ``data`` onto this backend's device (a no-op for NumPy arrays on NumPy)."""
        if self.xp.__name__ == "cupy":
            return self.xp.asarray(data, dtype=dtype)
        if hasattr(data, "get") and type(data).__module__.startswith("cupy"):
            data = data.get()  # a CuPy array brought back to the host
        return self.xp.asarray(data, dtype=dtype)


def _make(name: str, given_by: str = "") -> Backend:
    import numpy

    if name == "naive":
        from minisd.backends import naive

        return Backend("naive", numpy, naive)
    if name == "numpy":
        from minisd.backends import fast_cpu

        return Backend("numpy", numpy, fast_cpu)
    if name in ("emulated", "cupy"):
        from minisd.backends.cuda_launch import KernelOps

        ops = KernelOps(name)  # BackendUnavailable where g++, CuPy or a GPU is missing
        return Backend(name, ops.xp, ops)
    raise ValueError(f"{given_by or 'backend'} {name!r} is not a backend; choose one of {', '.join(BACKENDS)}")


_current: Backend | None = None


def set_backend(name: str) -> Backend:
    """Switch every later operation to backend ``name`` ("naive", "numpy", "emulated" or "cupy").

    Tensors created before the switch keep their arrays; mixing a NumPy-backed and a
    CuPy-backed tensor in one op is an error, so switch before building a model.
    """
    global _current
    _current = _make(name)
    return _current


def get_backend() -> Backend:
    """The active backend, created on first use from MINISD_BACKEND (default "numpy")."""
    global _current
    if _current is None:
        _current = _make(os.environ.get("MINISD_BACKEND", "numpy"), given_by="MINISD_BACKEND")
    return _current


def get_array_module(*arrays) -> ModuleType:
    """``xp`` for these arrays: cupy if any of them lives on a GPU, else numpy (Chainer's idiom)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    import numpy

    return numpy


def to_numpy(array):
    """A NumPy array on the host, whatever the array was."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    import numpy

    return numpy.asarray(array)
