"""The kernels on a real GPU through CuPy, against the naive backend in float64.

Skipped where CuPy or an NVIDIA GPU is missing (every development machine here); the
emulator suite (tests/test_kernels.py) runs the very same sources on the CPU. On a GPU
the tolerances are a little looser than on the emulator: nvcc fuses multiply-adds and
__expf is an approximation there.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import f64

from minisd.backends import BackendUnavailable, cuda_build, cuda_launch, naive

pytestmark = pytest.mark.gpu

ATOL, RTOL = 2e-4, 1e-3


@pytest.fixture(scope="module")
def gpu():
    try:
        cupy = cuda_build.find_cupy()
        return cupy, cuda_launch.KernelOps("cupy")
    except BackendUnavailable as e:
        pytest.skip(str(e))


def check(cupy, out, ref, what):
    if ref is None:
        assert out is None, what
        return
    out = cupy.asnumpy(out).astype(np.float64)
    assert out.shape == ref.shape, what
    err = np.abs(out - ref)
    assert (err <= ATOL + RTOL * np.abs(ref)).all(), f"{what}: max error {err.max():.3g}"



@pytest.mark.parametrize("version", cuda_launch.VERSIONS)
@pytest.mark.parametrize("case", [(2, 3, 7, 9, 5, 3, 1, 1), (2, 4, 8, 7, 33, 3, 2, 2), (1, 35, 5, 6, 3, 1, 1, 0)])
def test_conv2d_on_gpu(gpu, version, case):
    cupy, ops = gpu
    N, C, H, W, K, R, stride, pad = case
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((N, C, H, W), (K, C, R, R), (K,)))
    y_ref = naive.conv2d_forward(*f64(x, w, b), stride, pad)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    with cuda_launch.settings(version=version):
        check(cupy, ops.conv2d_forward(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), stride, pad), y_ref, "y")
        grads = ops.conv2d_backward(cupy.asarray(dy), cupy.asarray(x), cupy.asarray(w), stride, pad)
    for name, out, ref in zip(("dx", "dw", "db"), grads, naive.conv2d_backward(*f64(dy, x, w), stride, pad)):
        check(cupy, out, ref, name)


@pytest.mark.parametrize("version", cuda_launch.VERSIONS)
@pytest.mark.parametrize("shape,G", [((2, 6, 5, 7), 3), ((2, 8, 4, 4), 8), ((1, 64, 33, 9), 32)])
def test_group_norm_on_gpu(gpu, version, shape, G):
    cupy, ops = gpu
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) + 3
    g, b = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal(shape).astype(np.float32)
    refs = naive.group_norm_forward(*f64(x), G, *f64(g, b), 1e-5)
    with cuda_launch.settings(version=version):
        y, mean, rstd = ops.group_norm_forward(cupy.asarray(x), G, cupy.asarray(g), cupy.asarray(b), 1e-5)
        grads = ops.group_norm_backward(cupy.asarray(dy), cupy.asarray(x), G, cupy.asarray(g), mean, rstd)
    for name, out, ref in zip(("y", "mean", "rstd"), (y, mean, rstd), refs):
        check(cupy, out, ref, name)
    ref_grads = naive.group_norm_backward(*f64(dy, x), G, *f64(g, cupy.asnumpy(mean), cupy.asnumpy(rstd)))
    for name, out, ref in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        check(cupy, out, ref, name)


@pytest.mark.parametrize("version", cuda_launch.VERSIONS)
@pytest.mark.parametrize("case", [(2, 3, 5, 7, 8, True, 8), (1, 2, 37, 77, 40, False, 40),
                                  (1, 2, 100, 100, 80, True, 80), (1, 1, 70, 5, 160, True, 160),
                                  (2, 1, 17, 9, 8, True, 24)])
def test_attention_on_gpu(gpu, version, case):
    cupy, ops = gpu
    B, H, Lq, Lk, d, causal, d_v = case
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, Lq, d), (B, H, Lk, d), (B, H, Lk, d_v)))
    do = rng.standard_normal((B, H, Lq, d_v)).astype(np.float32)
    scale = d ** -0.5
    o_ref, lse_ref = naive.attention_forward(*f64(q, k, v), scale, causal)
    with cuda_launch.settings(version=version):
        o, lse = ops.attention_forward(*map(cupy.asarray, (q, k, v)), scale, causal)
        grads = ops.attention_backward(*map(cupy.asarray, (do, q, k, v)), o, lse, scale, causal)
    check(cupy, o, o_ref, "o")
    check(cupy, lse, lse_ref, "lse")
    ref_grads = naive.attention_backward(*f64(do, q, k, v, cupy.asnumpy(o), cupy.asnumpy(lse)), scale, causal)
    for name, out, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        check(cupy, out, ref, name)


def test_gpu_launch_checks_argument_types(gpu):
    cupy, _ = gpu
    kernel = cuda_build.program("cupy")["conv2d_backward_bias_kernel1"]
    dy = cupy.zeros((1, 2, 3, 3), dtype=cupy.float64)
    with pytest.raises(TypeError, match="float32"):
        kernel(1, 32, (dy, cupy.zeros(2, cupy.float32), 1, 2, 3, 3))
    with pytest.raises(TypeError, match="must be a cupy array"):
        kernel(1, 32, (np.zeros((1, 2, 3, 3), np.float32), cupy.zeros(2, cupy.float32), 1, 2, 3, 3))


@pytest.mark.parametrize("name", ["conv2d", "group_norm", "attention"])
def test_the_cupy_backend_agrees_with_naive_through_the_engine(gpu, name):
    """F.conv2d, F.group_norm and causal F.scaled_dot_product_attention, forward and every
    input's gradient, with the cupy backend and with the naive one (the float32 inputs)."""
    import minisd
    from minisd import Tensor, functional as F
    from minisd.backends import to_numpy

    cupy, _ = gpu
    rng = np.random.default_rng(4)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    fn, arrays = {
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [f(2, 3, 7, 6), f(4, 3, 3, 3), f(4)]),
        "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [f(2, 4, 5, 3), f(4), f(4)]),
        "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      [f(1, 2, 9, 40), f(1, 2, 11, 40), f(1, 2, 11, 40)]),
    }[name]
    previous, results = minisd.get_backend().name, {}
    try:
        for backend in ("naive", "cupy"):
            active = minisd.set_backend(backend)
            inputs = [Tensor(active.asarray(a), requires_grad=True) for a in arrays]
            out = fn(*inputs)
            g = np.random.default_rng(7).standard_normal(out.shape).astype(np.float32)
            (out * Tensor(active.asarray(g))).sum().backward()
            results[backend] = [to_numpy(out.data)] + [to_numpy(t.grad) for t in inputs]
    finally:
        minisd.set_backend(previous)
    for what, got, want in zip(("output", "grad 0", "grad 1", "grad 2"), results["cupy"], results["naive"]):
        err = np.abs(got.astype(np.float64) - want)
        assert (err <= ATOL + RTOL * np.abs(want)).all(), f"{name} {what}: max error {err.max():.3g}"
