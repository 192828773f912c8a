"""The helpers several test files share: seeded inputs, dtype casts, the relative error, central
differences and the primitives' random cases (``from helpers import randn, rel_err, ...``).

A plain module beside the tests rather than conftest.py, which pytest loads itself and which is not
meant to be imported. ``import helpers`` works because pytest puts tests/ on sys.path (the folder has
no __init__.py; conftest.py adds it too, for --import-mode=importlib).
"""

import numpy as np


def randn(*shape, seed=0, dtype=np.float64):
    """Standard normal numbers of the given shape, drawn in float64 and then cast to ``dtype``.

    ``seed`` is an int (a fresh generator: the same numbers on every call) or a np.random.Generator,
    which is drawn on (``default_rng`` hands a Generator back as it is), so successive calls give
    successive draws. Drawn in float64 first: standard_normal(dtype=float32) gives other numbers.
    """
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype, copy=False)


def f32(*arrays):
    """The arrays in float32 (None stays None)."""
    return [None if a is None else a.astype(np.float32) for a in arrays]


def f64(*arrays):
    """The arrays in float64 (None stays None)."""
    return [None if a is None else a.astype(np.float64) for a in arrays]


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64: the largest error relative to the reference ``b``'s scale
    (an all-zero reference counts as scale 1e-30, so equal zeros give 0, not 0 / 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


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
