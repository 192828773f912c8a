"""The naive backend (minisd/backends/naive.py), the oracle every other backend is tested
against, held against PyTorch in float64 at seeded random shapes (strides 1 to 3,
padding beyond R - 1, non-square and 1x1 kernels, kernels wider than the image, any
number of trailing axes in group norm, Lq != Lk, causal masks, head dims that are not
powers of two) and against central finite differences of its own forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import f32, numerical_grads, randn, random_attention_cases, random_conv_cases, random_norm_cases

from minisd.backends import naive

TOL = dict(rtol=1e-10, atol=1e-10)


def _torch():
    return pytest.importorskip("torch")


def _against_torch(torch_fn, arrays, dy):
    """torch_fn's output and the gradients of <dy, output> for every array (None: no gradient)."""
    torch = _torch()
    ts = [None if a is None else torch.tensor(a, requires_grad=True) for a in arrays]
    out = torch_fn(*ts)
    out.backward(torch.tensor(dy))
    return out.detach().numpy(), [None if t is None else t.grad.numpy() for t in ts]


# ------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------

# (N, C, H, W, K, R, S, stride, padding)
CONV_CASES = [
    (2, 3, 7, 7, 4, 3, 3, 2, 1),  # a downsampling conv
    (1, 2, 5, 4, 3, 3, 3, 1, 3),  # padding beyond R - 1
    (2, 3, 6, 5, 2, 2, 4, 1, 1),  # a non-square kernel
    (2, 4, 5, 5, 3, 1, 1, 1, 0),  # 1x1
    (1, 2, 4, 5, 3, 1, 1, 2, 1),  # 1x1 with a stride and padding
    (1, 2, 3, 3, 2, 7, 7, 1, 2),  # a kernel wider than the image (7 over 3, padding 2)
    (1, 2, 4, 9, 3, 1, 7, 2, 3),  # 1x7, stride 2
    (2, 2, 9, 8, 2, 3, 3, 3, 1),  # stride 3: the last rows and columns are never read
    (1, 1, 1, 1, 1, 1, 1, 1, 0),
]


def _conv_id(c):
    return "N{}C{}H{}W{}K{}k{}x{}s{}p{}".format(*c)


@pytest.mark.parametrize("case", CONV_CASES + random_conv_cases(40), ids=_conv_id)
def test_conv2d_against_torch(case):
    torch = _torch()
    N, C, H, W, K, R, S, st, pd = case
    x, w, b = randn(N, C, H, W), randn(K, C, R, S, seed=1), randn(K, seed=2)
    y = naive.conv2d_forward(x, w, b, st, pd)
    dy = randn(*y.shape, seed=3)
    want, grads = _against_torch(lambda x, w, b: torch.nn.functional.conv2d(x, w, b, st, pd), [x, w, b], dy)
    assert y.dtype == np.float64 and y.shape == want.shape
    np.testing.assert_allclose(y, want, **TOL)
    for name, g, e in zip(("dx", "dw", "db"), naive.conv2d_backward(dy, x, w, st, pd), grads):
        assert g.dtype == np.float64 and g.shape == e.shape, name
        np.testing.assert_allclose(g, e, **TOL, err_msg=name)
    assert naive.conv2d_forward(x, w, None, st, pd) == pytest.approx(y - b.reshape(K, 1, 1), abs=1e-12)


@pytest.mark.parametrize("case", [(2, 2, 4, 5, 3, 3, 2, 2, 1), (1, 2, 3, 3, 2, 3, 3, 1, 2), (1, 3, 3, 4, 2, 1, 1, 1, 0),
                                  (1, 1, 2, 3, 2, 4, 2, 1, 1)], ids=_conv_id)
def test_conv2d_backward_matches_finite_differences(case):
    N, C, H, W, K, R, S, st, pd = case
    x, w, b = randn(N, C, H, W), randn(K, C, R, S, seed=1), randn(K, seed=2)
    dy = randn(*naive.conv2d_forward(x, w, b, st, pd).shape, seed=3)
    expected = numerical_grads(lambda x, w, b: naive.conv2d_forward(x, w, b, st, pd), [x, w, b], dy)
    for name, g, e in zip(("dx", "dw", "db"), naive.conv2d_backward(dy, x, w, st, pd), expected):
        np.testing.assert_allclose(g, e, rtol=1e-7, atol=1e-8, err_msg=name)


def test_conv2d_backward_returns_only_what_is_asked():
    x, w = randn(2, 3, 5, 5), randn(4, 3, 3, 3, seed=1)
    dy = randn(2, 4, 3, 3, seed=2)
    full = naive.conv2d_backward(dy, x, w, 2, 1)
    for need in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
        for wanted, g, f in zip(need, naive.conv2d_backward(dy, x, w, 2, 1, *need), full):
            assert (g is None) == (not wanted)
            if wanted:
                np.testing.assert_array_equal(g, f)


# ------------------------------------------------------------------------------------
# group norm
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", random_norm_cases(32), ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_group_norm_against_torch(case):
    torch = _torch()
    shape, G, has_weight, has_bias, eps = case
    x = randn(*shape) * 3 + 1.5
    weight = randn(shape[1], seed=1) if has_weight else None
    bias = randn(shape[1], seed=2) if has_bias else None
    y, mean, rstd = naive.group_norm_forward(x, G, weight, bias, eps)
    dy = randn(*shape, seed=3)

    def torch_fn(x, w, b):  # (torch's backward fails on a weight without a bias: give it the neutral one)
        if (w is None) != (b is None):
            w = torch.ones(shape[1], dtype=torch.float64) if w is None else w
            b = torch.zeros(shape[1], dtype=torch.float64) if b is None else b
        return torch.nn.functional.group_norm(x, G, w, b, eps)

    want, grads = _against_torch(torch_fn, [x, weight, bias], dy)
    np.testing.assert_allclose(y, want, **TOL)
    xg = x.reshape(shape[0], G, -1)
    np.testing.assert_allclose(mean, xg.mean(axis=2), **TOL)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(xg.var(axis=2) + eps), **TOL)
    dx, dweight, dbias = naive.group_norm_backward(dy, x, G, weight, mean, rstd)
    np.testing.assert_allclose(dx, grads[0], **TOL, err_msg="dx")
    assert (dweight is None) == (dbias is None) == (weight is None)
    if has_weight:
        np.testing.assert_allclose(dweight, grads[1], **TOL, err_msg="dweight")
        np.testing.assert_allclose(dbias, dy.sum(axis=(0,) + tuple(range(2, x.ndim))), **TOL, err_msg="dbias")
    if has_weight and has_bias:
        np.testing.assert_allclose(dbias, grads[2], **TOL, err_msg="dbias")


@pytest.mark.parametrize("shape, G", [((2, 4, 3, 2), 2), ((1, 6, 5), 3), ((3, 2), 1)])
def test_group_norm_backward_matches_finite_differences(shape, G):
    x, weight, bias = randn(*shape) + 2, randn(shape[1], seed=1), randn(shape[1], seed=2)
    dy = randn(*shape, seed=3)
    forward = lambda x, w, b: naive.group_norm_forward(x, G, w, b, 1e-5)[0]  # noqa: E731
    expected = numerical_grads(forward, [x, weight, bias], dy)
    _, mean, rstd = naive.group_norm_forward(x, G, weight, bias, 1e-5)
    for name, g, e in zip(("dx", "dweight", "dbias"), naive.group_norm_backward(dy, x, G, weight, mean, rstd), expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-8, err_msg=name)


# ------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------

# (B, heads, Lq, Lk, d, dv, causal)
ATTN_CASES = [(2, 2, 4, 4, 3, 3, True), (1, 2, 3, 7, 5, 2, True), (2, 1, 9, 3, 6, 7, True), (1, 1, 1, 1, 1, 1, False),
              (1, 3, 6, 77, 40, 40, False), (1, 1, 5, 5, 80, 80, True)]


@pytest.mark.parametrize("case", ATTN_CASES + random_attention_cases(30),
                         ids=lambda c: "B{}H{}Lq{}Lk{}d{}dv{}".format(*c[:6]) + ("-causal" if c[6] else ""))
def test_attention_against_torch(case):
    torch = _torch()
    B, H, Lq, Lk, d, dv, causal = case
    q, k, v = randn(B, H, Lq, d), randn(B, H, Lk, d, seed=1), randn(B, H, Lk, dv, seed=2)
    scale = 0.3 + sum(case[:6]) % 7 / 10
    o, lse = naive.attention_forward(q, k, v, scale, causal)
    do = randn(B, H, Lq, dv, seed=3)
    want, grads = _against_torch(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale), [q, k, v], do)
    np.testing.assert_allclose(o, want, **TOL)
    s = scale * torch.tensor(q) @ torch.tensor(k).transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), -torch.inf)
    np.testing.assert_allclose(lse, torch.logsumexp(s, -1).numpy(), **TOL)
    for name, g, e in zip(("dq", "dk", "dv"), naive.attention_backward(do, q, k, v, o, lse, scale, causal), grads):
        assert g.dtype == np.float64 and g.shape == e.shape, name
        np.testing.assert_allclose(g, e, **TOL, err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_matches_finite_differences(causal):
    q, k, v = randn(1, 2, 4, 3), randn(1, 2, 5, 3, seed=1), randn(1, 2, 5, 2, seed=2)
    do = randn(1, 2, 4, 2, seed=3)
    expected = numerical_grads(lambda q, k, v: naive.attention_forward(q, k, v, 0.7, causal)[0], [q, k, v], do)
    o, lse = naive.attention_forward(q, k, v, 0.7, causal)
    for name, g, e in zip(("dq", "dk", "dv"), naive.attention_backward(do, q, k, v, o, lse, 0.7, causal), expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-8, err_msg=name)


# ------------------------------------------------------------------------------------
# float32 stays float32
# ------------------------------------------------------------------------------------


def test_float32_stays_float32_even_with_float64_scalars():
    """NumPy scalars are float64 and 'strong': an eps or a scale given as np.float64 must not promote."""
    x, w, b = f32(randn(2, 3, 5, 5), randn(4, 3, 3, 3, seed=1), randn(4, seed=2))
    y = naive.conv2d_forward(x, w, b, 1, 1)
    outs = [y, *naive.conv2d_backward(y, x, w, 1, 1)]
    gn = naive.group_norm_forward(x, 3, x[0, :, 0, 0], x[0, :, 0, 1], np.float64(1e-5))
    outs += [*gn, *naive.group_norm_backward(x, x, 3, x[0, :, 0, 0], *gn[1:])]
    q = x.reshape(2, 3, 5, 5)
    o, lse = naive.attention_forward(q, q, q, np.float64(0.5), True)
    outs += [o, lse, *naive.attention_backward(o, q, q, q, o, lse, np.float64(0.5), True)]
    assert [a.dtype for a in outs] == [np.float32] * len(outs)
