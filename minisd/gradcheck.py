"""Gradient checking: compare backward() with central finite differences, in float64.

For f: R^n -> R (any output is reduced to a scalar by a fixed random weighting
L = sum(w * f(x))), the directional derivative along a vector u is

    dL/du = lim (L(x + h u) - L(x - h u)) / 2h       (central differences: error O(h^2))

and backward() claims it equals <grad L, u>. For small inputs we check every
coordinate (u = each unit vector); for large ones a few random directions, which
catches any wrong entry with probability one (Chainer's check_backward does the same).
float64 makes the O(h^2) truncation and the O(eps/h) rounding both tiny.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from minisd.tensor import Tensor


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[np.ndarray], *, h: float = 1e-6,
              atol: float = 1e-6, rtol: float = 1e-5, max_coords: int = 64, directions: int = 3,
              seed: int = 0) -> bool:
    """Raise AssertionError naming the input and the mismatch if backward() disagrees with finite differences.

    ``fn`` takes Tensors (one per array in ``inputs``) and returns a Tensor. Every input
    is checked; integer inputs (token ids) are passed through as constants.
    Returns True when every check passed.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(a, dtype=np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a) for a in inputs]
    float_ids = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]

    out = fn(*[Tensor(a) for a in arrays])
    weights = rng.standard_normal(out.shape)

    def loss(values) -> float:
        return float((fn(*[Tensor(a) for a in values]).numpy() * weights).sum())

    tensors = [Tensor(a, requires_grad=i in float_ids) for i, a in enumerate(arrays)]
    result = fn(*tensors)
    if result.dtype != np.float64:
        raise TypeError(f"gradcheck: fn returned {result.dtype}; ops must keep float64 inputs in float64")
    (result * weights).sum().backward()

    for i in float_ids:
        analytic = tensors[i].grad if tensors[i].grad is not None else np.zeros_like(arrays[i])
        analytic = np.asarray(analytic)
        if arrays[i].size <= max_coords:
            probes = [np.eye(1, arrays[i].size, j).reshape(arrays[i].shape) for j in range(arrays[i].size)]
        else:
            probes = [rng.standard_normal(arrays[i].shape) for _ in range(directions)]
        for u in probes:
            plus = [a + h * u if j == i else a for j, a in enumerate(arrays)]
            minus = [a - h * u if j == i else a for j, a in enumerate(arrays)]
            numeric = (loss(plus) - loss(minus)) / (2 * h)
            claimed = float((analytic * u).sum())
            if not abs(claimed - numeric) <= atol + rtol * abs(numeric):
                raise AssertionError(f"gradcheck: input {i} (shape {arrays[i].shape}): backward gives "
                                     f"{claimed:.10g} along a probe direction, finite differences {numeric:.10g}")
    return True
