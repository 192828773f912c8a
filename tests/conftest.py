"""Shared test set-up: run against the checkout, on the backend MINISD_BACKEND names (numpy by default).

And the helpers several test files share (``from conftest import rand, ...``).
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def rand(*shape, seed=0):
    """Seeded standard normal numbers in float64."""
    return np.random.default_rng(seed).standard_normal(shape)


def f32(*arrays):
    """The arrays in float32 (None stays None)."""
    return [None if a is None else a.astype(np.float32) for a in arrays]


def f64(*arrays):
    """The arrays in float64 (None stays None)."""
    return [None if a is None else a.astype(np.float64) for a in arrays]


def numerical_grads(f, arrays, dy, h=1e-5):
    """d<dy, f(*arrays)>/d(each array) by central differences, one entry at a time (float64):
    the quantity whose gradients a backward pass given dy returns."""
    arrays = [a.copy() for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            up = np.vdot(dy, f(*arrays))
            a[idx] = old - h
            down = np.vdot(dy, f(*arrays))
            a[idx] = old
            g[idx] = (up - down) / (2 * h)
        grads.append(g)
    return grads


# Seeded random shapes for the primitives (conv2d, group norm, attention), shared by the tests
# of the naive backend against PyTorch and of the other backends against the naive one.


def random_conv_cases(count, seed=0):
    """(N, C, H, W, K, R, S, stride, padding), seeded: strides 1-3, padding 0-3, kernels 1-5 each way."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        N, C, K = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 6)
        H, W, R, S = rng.integers(1, 11), rng.integers(1, 11), rng.integers(1, 6), rng.integers(1, 6)
        stride, padding = rng.integers(1, 4), rng.integers(0, 4)
        if H + 2 * padding >= R and W + 2 * padding >= S:
            cases.append(tuple(int(v) for v in (N, C, H, W, K, R, S, stride, padding)))
    return cases


def random_norm_cases(count, seed=0):
    """(shape, groups, has weight, has bias, eps): any number of trailing axes (0 to 3)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        G, i = int(rng.integers(1, 5)), len(cases)
        shape = (int(rng.integers(1, 4)), G * int(rng.integers(1, 4))) + tuple(
            int(n) for n in rng.integers(1, 6, size=int(rng.integers(0, 4))))
        if np.prod(shape[1:]) > G:  # torch refuses groups of one value
            cases.append((shape, G, i % 4 in (0, 1), i % 4 in (0, 2), float(10.0 ** -rng.integers(2, 7))))
    return cases


def random_attention_cases(count, seed=0):
    """(B, heads, Lq, Lk, d, dv, causal), seeded: every other case causal."""
    rng = np.random.default_rng(seed)
    return [tuple(int(n) for n in rng.integers(1, (3, 4, 12, 12, 10, 10))) + (bool(i % 2),) for i in range(count)]
