"""The fast CPU path (the numpy backend) against the naive backend, its formulas written plainly.

The fast path is fast because of its layout tricks (unrolled kernel widths, row shifts,
chunks, tiles, the cores sharing the work); the naive backend (minisd/backends/naive.py,
itself held to PyTorch in tests/test_naive.py) has none of them. Forward passes are
compared in float64 (and float32, looser), at the named cases and at seeded random
shapes; gradients in float64 with the naive backward pass and with central finite
differences of the naive forward pass (of <dy, f(inputs)>, whose gradient backward returns).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import f32, numerical_grads, randn, random_attention_cases, random_conv_cases, random_norm_cases

from minisd.backends import cpu_settings, fast_cpu
from minisd.backends import naive


# ------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------


# (N, C, H, W, K, R, S, stride, padding)
CONV_CASES = [
    (2, 3, 5, 5, 4, 3, 3, 1, 1),
    (2, 3, 5, 5, 4, 3, 3, 1, 0),
    (1, 2, 6, 5, 3, 3, 3, 1, 2),
    (2, 3, 7, 7, 2, 3, 3, 2, 1),
    (1, 2, 6, 6, 3, 3, 3, 2, 0),
    (2, 2, 5, 4, 3, 3, 3, 2, 2),
    (2, 3, 4, 4, 5, 1, 1, 1, 0),
    (1, 3, 5, 5, 2, 1, 1, 2, 0),
    (1, 2, 3, 4, 2, 1, 1, 1, 1),  # padding > kernel - 1: dx is not a plain convolution
    (2, 2, 5, 6, 3, 2, 3, 1, 1),  # a non-square kernel
    (1, 1, 1, 1, 2, 1, 1, 1, 0),
    (2, 2, 9, 9, 2, 3, 3, 3, 1),  # stride 3
]


# The fast path computes a convolution by one of two routes (kernel rows shifted, or
# channels-last im2col), chosen by output size; these small images would all take the
# second, so the conv tests run under both choices (route 1 takes every case it can).
LAYOUTS = {"shifted_rows": 0, "channels_last": 10 ** 9}


@pytest.fixture(params=list(LAYOUTS))
def layout(request, monkeypatch):
    monkeypatch.setattr(fast_cpu, "ROW_SHIFTS_FROM", LAYOUTS[request.param])
    return request.param


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}x{}s{}p{}".format(*c))
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_forward_matches_the_sum(case, bias, layout):
    N, C, H, W, K, R, S, st, pd = case
    x, w = randn(N, C, H, W), randn(K, C, R, S, seed=1)
    b = randn(K, seed=2) if bias else None
    expected = naive.conv2d_forward(x, w, b, st, pd)
    y = fast_cpu.conv2d_forward(x, w, b, st, pd)
    assert y.dtype == np.float64 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    y32 = fast_cpu.conv2d_forward(*f32(x, w, b), st, pd)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}x{}s{}p{}".format(*c))
def test_conv2d_backward_matches_finite_differences(case, layout):
    N, C, H, W, K, R, S, st, pd = case
    x, w, b = randn(N, C, H, W), randn(K, C, R, S, seed=1), randn(K, seed=2)
    dy = randn(*naive.conv2d_forward(x, w, b, st, pd).shape, seed=3)
    expected = numerical_grads(lambda x, w, b: naive.conv2d_forward(x, w, b, st, pd), [x, w, b], dy)
    grads = fast_cpu.conv2d_backward(dy, x, w, st, pd)
    for name, g, e in zip(("dx", "dw", "db"), grads, expected):
        assert g.dtype == np.float64 and g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=1e-7, atol=1e-8, err_msg=name)
    for name, g, e in zip(("dx", "dw", "db"), fast_cpu.conv2d_backward(*f32(dy, x, w), st, pd), expected):
        assert g.dtype == np.float32, name
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("cores", [1, 3])
def test_conv2d_backward_returns_only_what_is_asked(monkeypatch, layout, cores):
    """Every combination of gradients asked for, on one thread and with the batch shared out."""
    monkeypatch.setattr(cpu_settings, "cores", lambda: cores)
    monkeypatch.setattr(fast_cpu, "CONV_PARALLEL_BYTES", 0)
    monkeypatch.setattr(fast_cpu, "CONV_CHUNK_BYTES", 1)  # one image per chunk, so several runs
    x, w = randn(4, 3, 5, 5), randn(4, 3, 3, 3, seed=1)
    dy = randn(4, 4, 5, 5, seed=2)
    full = fast_cpu.conv2d_backward(dy, x, w, 1, 1)
    for need in itertools.product([False, True], repeat=3):
        got = fast_cpu.conv2d_backward(dy, x, w, 1, 1, *need)
        for wanted, g, f in zip(need, got, full):
            assert (g is None) == (not wanted)
            if wanted:
                np.testing.assert_allclose(g, f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cores", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_in_chunks_and_on_strided_inputs(monkeypatch, stride, layout, cores):
    """A batch cut into several chunks (the last one shorter), and inputs that are views; the
    chunks worked through on one thread, or shared out in runs among (here) three cores."""
    monkeypatch.setattr(cpu_settings, "cores", lambda: cores)
    monkeypatch.setattr(fast_cpu, "CONV_PARALLEL_BYTES", 0)  # small as it is, share the batch out
    monkeypatch.setattr(fast_cpu, "CONV_CHUNK_BYTES", 1)  # one image per chunk
    x = randn(5, 3, 6, 7).swapaxes(2, 3)  # (5, 3, 7, 6), a transposed view
    w, b = randn(4, 3, 3, 3, seed=1)[:, :, ::-1], randn(4, seed=2)  # a view with a negative stride
    y = fast_cpu.conv2d_forward(x, w, b, stride, 1)
    np.testing.assert_allclose(y, naive.conv2d_forward(x, w, b, stride, 1), rtol=1e-12, atol=1e-12)
    dy = randn(*y.shape, seed=3)[:, ::-1]
    monkeypatch.setattr(fast_cpu, "CONV_CHUNK_BYTES", 1 << 30)  # the whole batch at once
    whole = fast_cpu.conv2d_backward(dy, x, w, stride, 1)
    monkeypatch.setattr(fast_cpu, "CONV_CHUNK_BYTES", 3 * 1000 * 8)  # a couple of images per chunk
    for g, e in zip(fast_cpu.conv2d_backward(dy, x, w, stride, 1), whole):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_conv2d_runs_of_chunks_one_per_core(monkeypatch):
    """Chunks as equal as they can be, a whole number per core, in runs of consecutive
    chunks that cover the batch once; small calls, single images and one core stay on one run."""
    monkeypatch.setattr(cpu_settings, "cores", lambda: 2)
    monkeypatch.setattr(fast_cpu, "CONV_CHUNK_BYTES", 1000)
    monkeypatch.setattr(fast_cpu, "CONV_PARALLEL_BYTES", 4000)
    runs, parallel = fast_cpu._chunk_runs(N=7, bytes_per_image=700)  # 4,900 bytes: 5 chunks, 6 with the cores
    assert parallel and len(runs) == 2
    chunks = [c for run in runs for c in run]
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 6), (6, 7)]  # 6 asked for: 2 images each, 4 cover the batch
    assert [len(run) for run in runs] == [2, 2]
    assert fast_cpu._chunk_runs(N=7, bytes_per_image=500) == ([[slice(n, n + 2) for n in range(0, 6, 2)] + [slice(6, 7)]], False)
    assert fast_cpu._chunk_runs(N=1, bytes_per_image=10 ** 6)[1] is False
    monkeypatch.setattr(cpu_settings, "cores", lambda: 1)
    assert fast_cpu._chunk_runs(N=7, bytes_per_image=700)[1] is False


@pytest.mark.parametrize("a_shape, b_shape, transposed", [
    ((300, 40), (40, 70), False),       # more rows: cut by rows
    ((30, 40), (40, 700), False),       # more columns: cut by columns
    ((3, 1, 50, 20), (4, 20, 30), False),  # batch axes broadcast
    ((64, 257), (257, 33), True),       # transposed views, as Linear's backward passes them
    ((7, 5), (5, 3), False),            # tiny: cut all the same (the threshold is 0 here)
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_shared_among_the_cores_equals_numpy(monkeypatch, a_shape, b_shape, transposed, dtype):
    monkeypatch.setattr(fast_cpu, "SHARED_PRODUCT_FLOPS", 0)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
    if transposed:
        a, b = np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T
    got = fast_cpu.matmul(a, b)
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


# ------------------------------------------------------------------------------------
# group norm
# ------------------------------------------------------------------------------------


# (shape, groups, affine)
NORM_CASES = [((2, 6, 3, 3), 3, True), ((2, 6, 3, 3), 1, True), ((2, 6, 3, 3), 6, True),
              ((1, 4, 5, 3), 2, False), ((3, 4, 1, 1), 2, True), ((2, 4, 5), 2, True)]


@pytest.mark.parametrize("cores", [1, 3])
@pytest.mark.parametrize("shape, G, affine", NORM_CASES)
def test_group_norm_matches_its_definition(monkeypatch, shape, G, affine, cores):
    """On one thread, and (cores=3) with the batch shared out a sample or two per core."""
    monkeypatch.setattr(cpu_settings, "cores", lambda: cores)
    monkeypatch.setattr(fast_cpu, "GROUP_NORM_SHARED", 0)  # small as they are, share the samples out
    C = shape[1]
    x = randn(*shape) * 3 + 1.5
    weight, bias = (randn(C, seed=1), randn(C, seed=2)) if affine else (None, None)
    eps = 1e-5
    y, mean, rstd = fast_cpu.group_norm_forward(x, G, weight, bias, eps)
    np.testing.assert_allclose(y, naive.group_norm_forward(x, G, weight, bias, eps)[0], rtol=1e-10, atol=1e-10)
    xg = x.reshape(shape[0], G, -1)
    np.testing.assert_allclose(mean, xg.mean(axis=2), rtol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(xg.var(axis=2) + eps), rtol=1e-10)
    x32, weight32, bias32 = f32(x, weight, bias)
    y32, mean32, rstd32 = fast_cpu.group_norm_forward(x32, G, weight32, bias32, np.float64(eps))
    assert y32.dtype == mean32.dtype == rstd32.dtype == np.float32  # a float64 eps must not promote
    np.testing.assert_allclose(y32, y, rtol=1e-4, atol=1e-4)

    dy = randn(*shape, seed=3)
    inputs = [x] + ([weight, bias] if affine else [])
    expected = numerical_grads(lambda x, *wb: naive.group_norm_forward(x, G, *(wb or (None, None)), eps)[0], inputs, dy)
    grads = fast_cpu.group_norm_backward(dy, x, G, weight, mean, rstd)
    assert (grads[1] is None) == (not affine) and (grads[2] is None) == (not affine)
    for name, g, e in zip(("dx", "dweight", "dbias"), grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7, err_msg=name)
    for name, g, e in zip(("dx", "dweight", "dbias"), fast_cpu.group_norm_backward(
            dy.astype(np.float32), x32, G, weight32, mean32, rstd32), expected):
        assert g.dtype == np.float32, name
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4, err_msg=name)


def test_group_norm_with_a_large_mean():
    """The variance is computed around the mean (two passes), so an offset costs no accuracy
    beyond float32's own spacing at the offset; the backward pass's sums of dy * x (rather
    than dy * xhat) lose no more than that either: float32 against float64."""
    x = randn(2, 4, 8, 8) + 1e4
    y = fast_cpu.group_norm_forward(x.astype(np.float32), 2, None, None, 1e-5)[0]
    np.testing.assert_allclose(y, naive.group_norm_forward(x, 2, None, None, 1e-5)[0], atol=2e-3)
    for offset, rtol in ((30, 1e-5), (1e3, 1e-3)):
        x, w, dy = randn(3, 8, 6, 6) + offset, randn(8, seed=1), randn(3, 8, 6, 6, seed=2)
        want = fast_cpu.group_norm_backward(dy, x, 4, w, *fast_cpu.group_norm_forward(x, 4, w, w, 1e-5)[1:])
        x32, w32, dy32 = f32(x, w, dy)
        got = fast_cpu.group_norm_backward(dy32, x32, 4, w32, *fast_cpu.group_norm_forward(x32, 4, w32, w32, 1e-5)[1:])
        for name, g, e in zip(("dx", "dweight", "dbias"), got, want):
            assert np.abs(g - e).max() <= rtol * np.abs(e).max(), (offset, name)


# ------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------


# (B, heads, Lq, Lk, d, dv)
ATTN_CASES = [(2, 2, 4, 4, 3, 3), (1, 2, 3, 5, 4, 2), (2, 1, 5, 3, 2, 3), (1, 1, 1, 1, 2, 2), (1, 3, 6, 6, 4, 4)]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}H{}Lq{}Lk{}d{}dv{}".format(*c))
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_matches_its_definition(case, is_causal):
    B, H, Lq, Lk, d, dv = case
    q, k, v = randn(B, H, Lq, d), randn(B, H, Lk, d, seed=1), randn(B, H, Lk, dv, seed=2)
    scale = 0.7
    o, lse = fast_cpu.attention_forward(q, k, v, scale, is_causal)
    np.testing.assert_allclose(o, naive.attention_forward(q, k, v, scale, is_causal)[0], rtol=1e-10, atol=1e-12)
    s = scale * q @ k.swapaxes(-1, -2)
    if is_causal:
        s = np.where(np.triu(np.ones((Lq, Lk), bool), k=1), -np.inf, s)
    np.testing.assert_allclose(lse, np.log(np.exp(s).sum(-1)), rtol=1e-10)
    o32, lse32 = fast_cpu.attention_forward(*f32(q, k, v), np.float64(scale), is_causal)
    assert o32.dtype == lse32.dtype == np.float32
    np.testing.assert_allclose(o32, o, rtol=1e-4, atol=1e-5)

    do = randn(*o.shape, seed=3)
    expected = numerical_grads(lambda q, k, v: naive.attention_forward(q, k, v, scale, is_causal)[0], [q, k, v], do)
    for name, g, e in zip(("dq", "dk", "dv"), fast_cpu.attention_backward(do, q, k, v, o, lse, scale, is_causal),
                          expected):
        assert g.dtype == np.float64 and g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-8, err_msg=name)
    for name, g, e in zip(("dq", "dk", "dv"), fast_cpu.attention_backward(
            *f32(do, q, k, v, o32, lse32), scale, is_causal), expected):
        assert g.dtype == np.float32, name
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("tiles", ["runs of heads", "samples", "two samples", "small products", "long keys"])
def test_attention_in_tiles(monkeypatch, tiles):
    """(batch, head) pairs cut into tiles (runs of one sample's heads, or whole samples), and
    query rows into blocks, give the same numbers as all at once: on the thread pool (small
    products) and one tile after another."""
    B, H, Lq, Lk, d = 3, 3, 5, 4, 3
    q, k, v = randn(B, H, Lq, d), randn(B, H, Lk, d, seed=1), randn(B, H, Lk, d, seed=2)
    do = randn(B, H, Lq, d, seed=3)
    whole = fast_cpu.attention_forward(q, k, v, 0.5, True)
    whole_grads = fast_cpu.attention_backward(do, q, k, v, *whole, 0.5, True)
    if tiles == "runs of heads":  # 2 pairs a tile, fewer than a sample's 3 heads: heads 0-1, then head 2
        monkeypatch.setattr(fast_cpu, "SCORES_IN_CACHE", 2 * Lq * Lk)
        expected = [(slice(b, b + 1), slice(0, 2)) for b in range(B)] + [(slice(b, b + 1), slice(2, 3)) for b in range(B)]
    elif tiles == "samples":  # 4 pairs a tile: one whole sample
        monkeypatch.setattr(fast_cpu, "SCORES_IN_CACHE", 4 * Lq * Lk)
        expected = [(slice(b, b + 1), slice(0, H)) for b in range(B)]
    elif tiles == "two samples":  # 7 pairs a tile: two whole samples, then the last one
        monkeypatch.setattr(fast_cpu, "SCORES_IN_CACHE", 7 * Lq * Lk)
        expected = [(slice(0, 2), slice(0, H)), (slice(2, 3), slice(0, H))]
    elif tiles == "small products":  # 2 query rows a block, one sample a tile
        monkeypatch.setattr(fast_cpu, "MIN_QUERY_BLOCK", 1)
        monkeypatch.setattr(fast_cpu, "BLAS_SMALL", 2 * Lk * d)
        monkeypatch.setattr(fast_cpu, "SCORES_IN_CACHE", 3 * 2 * Lk)
        expected = [(slice(b, b + 1), slice(0, H)) for b in range(B)]
    else:  # products too big for the pool: 2 query rows a block, one (batch, head) pair a tile
        monkeypatch.setattr(fast_cpu, "BLAS_SMALL", 1)
        monkeypatch.setattr(fast_cpu, "MAX_SCORES_IN_MEMORY", 2 * Lk)
        expected = [(slice(b, b + 1), slice(h, h + 1)) for b in range(B) for h in range(H)]
    got_tiles, blocks, small = fast_cpu._tiles(B, H, Lq, Lk, d)
    assert sorted(got_tiles, key=str) == sorted(expected, key=str)
    assert (len(blocks) > 1) == (tiles in ("small products", "long keys")) and small == (tiles != "long keys")
    for got, want in zip(fast_cpu.attention_forward(q, k, v, 0.5, True), whole):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    for got, want in zip(fast_cpu.attention_backward(do, q, k, v, *whole, 0.5, True), whole_grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_reads_heads_in_place_and_writes_them_heads_last(is_causal):
    """Heads split out of tokens (B, L, H*d) are (B, H, L, d) views with a row stride; attention
    reads them as they lie and returns o, dq, dk, dv as views of (B, L, H, d) arrays, so that
    joining the heads back into tokens copies nothing (contiguous inputs get contiguous
    outputs). The numbers are those of contiguous inputs, and of inputs strided in every axis."""
    B, H, Lq, Lk, d = 2, 3, 5, 4, 2
    tokens = [randn(B, L, H * d, seed=i) for i, L in enumerate((Lq, Lk, Lk, Lq))]
    q, k, v, do = (t.reshape(B, t.shape[1], H, d).transpose(0, 2, 1, 3) for t in tokens)
    assert not q.flags.c_contiguous
    o, lse = fast_cpu.attention_forward(q, k, v, 0.7, is_causal)
    grads = fast_cpu.attention_backward(do, q, k, v, o, lse, 0.7, is_causal)
    for a in (o,) + grads:
        assert a.transpose(0, 2, 1, 3).flags.c_contiguous
    contiguous = [np.ascontiguousarray(a) for a in (q, k, v, do)]
    o_c, lse_c = fast_cpu.attention_forward(*contiguous[:3], 0.7, is_causal)
    grads_c = fast_cpu.attention_backward(contiguous[3], *contiguous[:3], o_c, lse_c, 0.7, is_causal)
    assert all(a.flags.c_contiguous for a in (o_c,) + grads_c)  # inputs (B, H, L, d): outputs too
    np.testing.assert_allclose(o, o_c, rtol=1e-12)
    np.testing.assert_allclose(lse, lse_c, rtol=1e-12)
    for got, want in zip(grads, grads_c):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    strided = [np.repeat(np.repeat(a, 2, axis=1), 2, axis=3)[:, ::2, :, ::2] for a in contiguous]  # no unit stride
    for got, want in zip(fast_cpu.attention_forward(*strided[:3], 0.7, is_causal), (o_c, lse_c)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_rows_far_below_their_tiles_top(dtype):
    """Each tile is shifted by its (batch, head)'s largest score; a row whose scores all lie
    ~1,000 below it would underflow to 0/0, and is redone with its own maximum."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 6, 4))
    q = rng.standard_normal((1, 2, 5, 4))
    q[0, 0, 1] = 30 * k[0, 0].mean(axis=0)  # row 1 of head 0 scores high ...
    q[0, 0, 3] = -30 * k[0, 0].mean(axis=0)  # ... row 3, far below it
    v = rng.standard_normal((1, 2, 6, 3))
    scale = 10.0
    s = scale * q @ k.swapaxes(-1, -2)
    assert s[0, 0, 1].max() - s[0, 0, 3].max() > 200  # exp(-200) underflows float32 (and the float32 floor)
    o, lse = fast_cpu.attention_forward(*(a.astype(dtype) for a in (q, k, v)), scale, False)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(o, naive.attention_forward(q, k, v, scale, False)[0], rtol=rtol, atol=rtol)
    m = s.max(-1, keepdims=True)
    np.testing.assert_allclose(lse, (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0], rtol=rtol)


# ------------------------------------------------------------------------------------
# the fast path against the naive backend at seeded random shapes
# ------------------------------------------------------------------------------------


def _assert_like_naive(got, want, names, dtype):
    """float64: to rounding; float32: to float32 rounding of sums, relative to the largest value."""
    for name, g, e in zip(names, got, want):
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == e.shape, name
        if dtype == np.float64:
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10, err_msg=name)
        else:
            assert np.abs(g - e).max() <= 1e-4 * max(1.0, np.abs(e).max()), name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", random_conv_cases(30, seed=1), ids=lambda c: "N{}C{}H{}W{}K{}k{}x{}s{}p{}".format(*c))
def test_conv2d_equals_naive_at_random_shapes(case, layout, dtype):
    N, C, H, W, K, R, S, st, pd = case
    x, w, b = randn(N, C, H, W), randn(K, C, R, S, seed=1), randn(K, seed=2)
    y = naive.conv2d_forward(x, w, b, st, pd)
    dy = randn(*y.shape, seed=3)
    cast = lambda *arrays: [a.astype(dtype) for a in arrays]  # noqa: E731
    _assert_like_naive([fast_cpu.conv2d_forward(*cast(x, w, b), st, pd)], [y], ["y"], dtype)
    _assert_like_naive(fast_cpu.conv2d_backward(*cast(dy, x, w), st, pd), naive.conv2d_backward(dy, x, w, st, pd),
                       ("dx", "dw", "db"), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", random_norm_cases(24, seed=1), ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_group_norm_equals_naive_at_random_shapes(monkeypatch, case, dtype):
    monkeypatch.setattr(cpu_settings, "cores", lambda: 3)
    monkeypatch.setattr(fast_cpu, "GROUP_NORM_SHARED", 0)  # small as they are, share the samples out
    shape, G, has_weight, has_bias, eps = case
    x, dy = randn(*shape) * 2 + 1, randn(*shape, seed=3)
    weight = randn(shape[1], seed=1) if has_weight else None
    bias = randn(shape[1], seed=2) if has_bias else None
    want = naive.group_norm_forward(x, G, weight, bias, eps)
    cast = lambda *arrays: [None if a is None else a.astype(dtype) for a in arrays]  # noqa: E731
    got = fast_cpu.group_norm_forward(*cast(x), G, *cast(weight, bias), eps)
    _assert_like_naive(got, want, ("y", "mean", "rstd"), dtype)
    _assert_like_naive(fast_cpu.group_norm_backward(*cast(dy, x), G, *cast(weight, *want[1:])),
                       naive.group_norm_backward(dy, x, G, weight, *want[1:]), ("dx", "dweight", "dbias"), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", random_attention_cases(24, seed=1),
                         ids=lambda c: "B{}H{}Lq{}Lk{}d{}dv{}".format(*c[:6]) + ("-causal" if c[6] else ""))
def test_attention_equals_naive_at_random_shapes(case, dtype):
    """Contiguous inputs, and every other case heads split out of tokens (strided views)."""
    B, H, Lq, Lk, d, dv, causal = case
    if sum(case[:6]) % 2:
        q, k, v, do = (randn(B, L, H * e, seed=i).reshape(B, L, H, e).transpose(0, 2, 1, 3)
                       for i, (L, e) in enumerate(((Lq, d), (Lk, d), (Lk, dv), (Lq, dv))))
    else:
        q, k, v, do = (randn(B, H, L, e, seed=i) for i, (L, e) in enumerate(((Lq, d), (Lk, d), (Lk, dv), (Lq, dv))))
    scale = d ** -0.5
    o, lse = naive.attention_forward(q, k, v, scale, causal)
    cast = lambda *arrays: [a.astype(dtype) for a in arrays]  # noqa: E731
    got = fast_cpu.attention_forward(*cast(q, k, v), scale, causal)
    _assert_like_naive(got, (o, lse), ("o", "lse"), dtype)
    _assert_like_naive(fast_cpu.attention_backward(*cast(do, q, k, v, o, lse), scale, causal),
                       naive.attention_backward(do, q, k, v, o, lse, scale, causal), ("dq", "dk", "dv"), dtype)
