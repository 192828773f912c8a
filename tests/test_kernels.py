"""Every kernel version, on the CPU emulator, against the naive backend in float64.

Each op runs with kernel version 1 (simple) and 2 (fast), in the emulator's forward,
reverse and random thread orders (a missing __syncthreads shows up as a difference
between orders), over shapes chosen for what breaks kernels: sizes that are not a
multiple of a tile, batch and head counts of 1, conv strides 1 and 2 with padding 0, 1
and 2, one group and one group per channel, head dims 8, 40, 80 and 160 (SD's are 40,
80, 160), Lq != Lk, causal masks with Lq < Lk and Lq > Lk. The reference is the
naive backend (minisd/backends/naive.py) run on float64 copies of the same float32
inputs, so the only difference allowed is the kernels' float32 rounding:
|out - ref| <= atol + rtol |ref|.

Then the same ops through the autograd engine (F.conv2d, F.group_norm,
F.scaled_dot_product_attention, forward and backward) on the "emulated" backend
against the "numpy" and "naive" backends.

With MINISD_EMU_SANITIZE=1 (and libasan preloaded; .ci/kernels.sh does both) this whole
file runs again on the emulator built with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import f64, randn

import minisd
from minisd.backends import BackendUnavailable, cuda_build, cuda_launch, naive

ATOL, RTOL = 1e-4, 1e-4
SETTINGS = [(v, order) for v in cuda_launch.VERSIONS for order in cuda_build.ORDERS]


@pytest.fixture(scope="module")
def ops():
    try:
        return cuda_launch.KernelOps("emulated")
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(params=SETTINGS, ids=[f"v{v}-{o}" for v, o in SETTINGS])
def setting(request):
    version, order = request.param
    with cuda_launch.settings(version=version, order=order, seed=request.param_index):
        yield request.param


def assert_close_to_reference(out, ref, what):
    """A kernel's result: float32, the reference's shape, within ATOL + RTOL |ref| of the float64 reference."""
    if ref is None:
        assert out is None, f"{what}: expected None"
        return
    assert out.dtype == np.float32, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    err = np.abs(out.astype(np.float64) - ref)
    bad = err > ATOL + RTOL * np.abs(ref)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements differ, max error "
                           f"{err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}")


# ------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------

# (N, C, H, W, K, R, S, stride, padding, bias)
CONV_CASES = [
    (1, 1, 5, 5, 1, 3, 3, 1, 0, True),  # batch 1, one channel
    (2, 3, 7, 9, 5, 3, 3, 1, 1, True),  # SD's 3x3 / padding 1, odd sizes
    (2, 4, 8, 7, 6, 3, 3, 2, 1, False),  # a downsampling conv, no bias
    (1, 3, 9, 7, 65, 1, 1, 1, 0, True),  # 1x1, K = 65: one past a 64-wide tile
    (2, 2, 6, 5, 3, 4, 2, 2, 2, True),  # non-square kernel, padding 2
    (1, 35, 5, 6, 3, 3, 3, 1, 2, True),  # C*R*S = 315: a tail in the summed dimension
]


def _conv_id(case):
    return "x".join(map(str, case[:4])) + "-k{}r{}s{}st{}p{}".format(*case[4:9])


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d(ops, setting, case):
    N, C, H, W, K, R, S, stride, pad, bias = case
    rng = np.random.default_rng(sum(case))
    x, w = randn(N, C, H, W, seed=rng, dtype=np.float32), randn(K, C, R, S, seed=rng, dtype=np.float32)
    b = randn(K, seed=rng, dtype=np.float32) if bias else None
    y_ref = naive.conv2d_forward(*f64(x, w, b), stride, pad)
    assert_close_to_reference(ops.conv2d_forward(x, w, b, stride, pad), y_ref, "y")
    dy = randn(*y_ref.shape, seed=rng, dtype=np.float32)
    grads = ops.conv2d_backward(dy, x, w, stride, pad, True, True, True)
    for name, out, ref in zip(("dx", "dw", "db"), grads, naive.conv2d_backward(*f64(dy, x, w), stride, pad)):
        assert_close_to_reference(out, ref, name)


def test_conv2d_backward_skips_unneeded_gradients(ops):
    rng = np.random.default_rng(1)
    x, w = randn(1, 2, 5, 5, seed=rng, dtype=np.float32), randn(3, 2, 3, 3, seed=rng, dtype=np.float32)
    dy = randn(1, 3, 3, 3, seed=rng, dtype=np.float32)
    dx, dw, db = ops.conv2d_backward(dy, x, w, 1, 0, False, True, False)
    assert dx is None and db is None
    assert_close_to_reference(dw, naive.conv2d_backward(*f64(dy, x, w), 1, 0)[1], "dw")


# ------------------------------------------------------------------------------------
# group norm
# ------------------------------------------------------------------------------------

# (shape, groups, affine)
GN_CASES = [
    ((1, 4, 3, 5), 1, True),  # one group: the whole sample
    ((2, 6, 5, 7), 3, True),
    ((2, 8, 4, 4), 8, True),  # one group per channel (instance norm)
    ((3, 4, 33, 1), 2, False),  # no affine parameters; 66 elements per group (a tail)
    ((2, 6, 9), 2, True),  # (N, C, L): any number of trailing axes
    ((1, 64, 8, 8), 32, True),  # SD's 32 groups
]


@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_group_norm(ops, setting, case):
    shape, G, affine = case
    rng = np.random.default_rng(len(shape) + G)
    x = randn(*shape, seed=rng, dtype=np.float32) * 2 + 3  # an offset mean: E[x^2] - E[x]^2 would lose digits
    weight, bias = (randn(shape[1], seed=rng, dtype=np.float32) for _ in range(2)) if affine else (None, None)
    refs = naive.group_norm_forward(*f64(x), G, *f64(weight, bias), 1e-5)
    outs = ops.group_norm_forward(x, G, weight, bias, 1e-5)
    for name, out, ref in zip(("y", "mean", "rstd"), outs, refs):
        assert_close_to_reference(out, ref, name)
    dy = randn(*shape, seed=rng, dtype=np.float32)
    grads = ops.group_norm_backward(dy, x, G, weight, outs[1], outs[2])
    ref_grads = naive.group_norm_backward(*f64(dy, x), G, *f64(weight, outs[1], outs[2]))
    for name, out, ref in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert_close_to_reference(out, ref, name)


# ------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------

# (B, heads, Lq, Lk, d, causal[, d_v]); d_v = d unless given
ATTN_CASES = [
    (1, 1, 1, 1, 8, False),  # one query, one key
    (2, 3, 5, 7, 8, True),  # causal with Lq < Lk
    (1, 2, 37, 70, 40, False),  # cross-attention shape: Lq != Lk, tails past 32
    (1, 1, 40, 33, 80, True),  # d = 80: the flash kernels pick smaller tiles
    (2, 1, 33, 33, 40, True),  # causal self-attention, one past a tile
    (1, 1, 70, 5, 8, True),  # causal with Lq > Lk: late queries see every key
    (1, 2, 9, 77, 40, False),  # a text context of 77 tokens, as in SD
    (1, 1, 20, 24, 160, False),  # SD's largest head dim: the smallest flash tiles
    (2, 1, 17, 9, 8, True, 24),  # values wider than queries and keys, as torch allows
    (1, 2, 9, 40, 40, False, 5),  # ... and narrower
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "b{}h{}q{}k{}d{}{}{}".format(
    *c[:5], "c" if c[5] else "", f"v{c[6]}" if len(c) > 6 else ""))
def test_attention(ops, setting, case):
    B, H, Lq, Lk, d, causal = case[:6]
    d_v = case[6] if len(case) > 6 else d
    rng = np.random.default_rng(Lq * Lk + d)
    q, k, v = (randn(B, H, L, e, seed=rng, dtype=np.float32) for L, e in ((Lq, d), (Lk, d), (Lk, d_v)))
    scale = d ** -0.5
    o_ref, lse_ref = naive.attention_forward(*f64(q, k, v), scale, causal)
    o, lse = ops.attention_forward(q, k, v, scale, causal)
    assert_close_to_reference(o, o_ref, "o")
    assert_close_to_reference(lse, lse_ref, "lse")
    do = randn(B, H, Lq, d_v, seed=rng, dtype=np.float32)
    grads = ops.attention_backward(do, q, k, v, o, lse, scale, causal)
    ref_grads = naive.attention_backward(*f64(do, q, k, v, o, lse), scale, causal)
    for name, out, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(out, ref, name)


# ------------------------------------------------------------------------------------
# determinism: no atomics, so the thread order cannot change a single bit
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", cuda_launch.VERSIONS)
def test_results_are_bitwise_the_same_in_every_run_order(ops, version):
    rng = np.random.default_rng(11)
    x, w, dy = (randn(*shape, seed=rng, dtype=np.float32) for shape in ((2, 3, 6, 5), (4, 3, 3, 3), (2, 4, 6, 5)))
    q, k, v, do = (randn(1, 2, L, 40, seed=rng, dtype=np.float32) for L in (33, 35, 35, 33))
    xg, gamma = randn(2, 6, 9, 9, seed=rng, dtype=np.float32), randn(6, seed=rng, dtype=np.float32)

    def everything():
        o, lse = ops.attention_forward(q, k, v, 0.2, True)
        y, mean, rstd = ops.group_norm_forward(xg, 3, gamma, gamma, 1e-5)
        return [ops.conv2d_forward(x, w, None, 1, 1), *ops.conv2d_backward(dy, x, w, 1, 1),
                o, lse, *ops.attention_backward(do, q, k, v, o, lse, 0.2, True),
                y, mean, rstd, *ops.group_norm_backward(xg, xg, 3, gamma, mean, rstd)]

    runs = []
    for order in cuda_build.ORDERS:
        with cuda_launch.settings(version=version, order=order, seed=4):
            runs.append(everything())
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------
# bad input: one clear line, never a traceback from inside a kernel
# ------------------------------------------------------------------------------------


def test_bad_shapes_are_reported(ops):
    x = np.zeros((1, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_forward(x, np.zeros((2, 4, 3, 3), np.float32), None, 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        ops.conv2d_forward(x, np.zeros((2, 3, 9, 9), np.float32), None, 1, 0)
    with pytest.raises(ValueError, match="groups"):
        ops.group_norm_forward(x, 2, None, None, 1e-5)
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="k must be"):
        ops.attention_forward(q, np.zeros((1, 1, 4, 7), np.float32), np.zeros((1, 1, 4, 7), np.float32), 1.0, False)
    with pytest.raises(ValueError, match="v \\(B, heads, Lk, d_v\\)"):
        ops.attention_forward(q, np.zeros((1, 1, 4, 8), np.float32), np.zeros((1, 1, 5, 8), np.float32), 1.0, False)


def test_head_dim_too_large_for_shared_memory_is_reported(ops):
    q = np.zeros((1, 1, 4, 400), np.float32)
    with cuda_launch.settings(version=2), pytest.raises(ValueError, match="too large for the flash kernels"):
        ops.attention_forward(q, q, q, 0.05, False)


def test_empty_batch_gives_empty_results(ops):
    x, w = np.zeros((0, 3, 5, 5), np.float32), np.ones((2, 3, 3, 3), np.float32)
    assert ops.conv2d_forward(x, w, None, 1, 1).shape == (0, 2, 5, 5)
    y, mean, rstd = ops.group_norm_forward(x, 3, None, None, 1e-5)
    assert y.shape == x.shape and mean.shape == (0, 3)


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINISD_KERNEL_VERSION", "1")
    assert cuda_launch._env_version() == 1
    monkeypatch.setenv("MINISD_KERNEL_VERSION", "fast")
    with pytest.raises(ValueError, match="MINISD_KERNEL_VERSION must be 1 or 2"):
        cuda_launch._env_version()


def test_version_setting_is_checked():
    with pytest.raises(ValueError, match="version"):
        cuda_launch.set_version(3)
    with pytest.raises(ValueError, match="run order"):
        cuda_build.set_run_order("sideways")


# ------------------------------------------------------------------------------------
# through the autograd engine: the emulated backend against the numpy and naive backends
# ------------------------------------------------------------------------------------


def _forward_backward(backend: str, fn, arrays):
    """fn's output and every input's gradient for a fixed random output gradient, on ``backend``."""
    from minisd import Tensor

    active = minisd.set_backend(backend)
    assert isinstance(active.ops, cuda_launch.KernelOps) == (backend == "emulated")
    try:
        inputs = [Tensor(a, requires_grad=True) for a in arrays]
        out = fn(*inputs)
        g = randn(*out.shape, seed=7, dtype=np.float32)
        (out * Tensor(g)).sum().backward()
        return [out.numpy()] + [t.grad if isinstance(t.grad, np.ndarray) else t.grad.numpy() for t in inputs]
    finally:
        minisd.set_backend("numpy")


def _engine_cases():
    from minisd import functional as F

    rng = np.random.default_rng(3)
    return {
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
                   [randn(*shape, seed=rng, dtype=np.float32) for shape in ((2, 3, 7, 6), (4, 3, 3, 3), (4,))]),
        "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b),
                       [randn(*shape, seed=rng, dtype=np.float32) for shape in ((2, 4, 5, 3), (4,), (4,))]),
        "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      [randn(1, 2, L, 40, seed=rng, dtype=np.float32) for L in (9, 11, 11)]),
        "cross_attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                            [randn(2, 1, L, e, seed=rng, dtype=np.float32) for L, e in ((6, 8), (13, 8), (13, 12))]),
    }


@pytest.mark.parametrize("baseline", ["numpy", "naive"])
@pytest.mark.parametrize("version", cuda_launch.VERSIONS)
@pytest.mark.parametrize("name", ["conv2d", "group_norm", "attention", "cross_attention"])
def test_through_the_engine(ops, name, version, baseline):
    fn, arrays = _engine_cases()[name]
    expected = _forward_backward(baseline, fn, arrays)
    with cuda_launch.settings(version=version):
        got = _forward_backward("emulated", fn, arrays)
    for i, (out, ref) in enumerate(zip(got, expected)):
        what = f"{name} {'output' if i == 0 else f'grad of input {i - 1}'}"
        assert_close_to_reference(out, ref.astype(np.float64), what)
