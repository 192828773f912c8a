"""The naive backend: conv2d, group norm and attention written as their formulas, in NumPy.

Read this file first. Each function is the math of its docstring in a few NumPy lines:
no threads, no chunks, no buffers reused. It is also the oracle: the fast CPU path
(minisd/backends/fast_cpu.py) and the CUDA kernels (kernels/*.cu) are tested against
it, and it is tested against PyTorch in float64 and against finite differences
(tests/test_naive.py). float32 in gives float32 out, float64 gives float64.

These are the functions every backend provides, with the same signatures (the contract
is in minisd/backends/__init__.py); the autograd Functions of minisd/functional.py call
them. The last section (matmul, SiLU, GELU, GEGLU, layer norm) is written against xp and
is what the emulated and cupy backends run too. Sizes: Stable Diffusion v1.5 convolves 320 to 1,280
channels on 64x64 down to 8x8 latents, normalises in 32 groups, and attends over 4,096
latent pixels (self-attention) or 77 text tokens (cross-attention) with heads of 40 to
160; minisd's small models, 32 to 128 channels on 32x32 down to 4x4, heads of 8 to 32.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from minisd.backends import get_array_module

# ------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------


def _windows(x, R: int, S: int, stride: int, padding: int):
    """im2col as a view, no copy: windows[n, c, p, q, r, s] = xpad[n, c, p*stride + r, q*stride + s],
    (N, C, P, Q, R, S), the receptive field of every output pixel (xpad: x with ``padding`` zeros around)."""
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    return sliding_window_view(xpad, (R, S), axis=(2, 3))[:, :, ::stride, ::stride]


def conv2d_forward(x, w, b, stride: int, padding: int):
    """y = conv(x, W) + b, PyTorch's conv2d (a cross-correlation), x (N, C, H, W), W (K, C, R, S):

        y[n, k, p, q] = b[k] + sum_{c, r, s} W[k, c, r, s] xpad[n, c, p*st + r, q*st + s]

    xpad is x with ``padding`` zeros around, P = (H + 2 pad - R) // st + 1 (Q likewise).
    This is im2col: for each kernel position (r, s), the slice of xpad shifted by (r, s)
    (and strided by st) times the (K, C) matrix W[:, :, r, s], summed over (r, s), which
    einsum computes as one matrix product of the (N*P*Q, C*R*S) receptive fields with W.
    """
    y = np.einsum("ncpqrs,kcrs->nkpq", _windows(x, *w.shape[2:], stride, padding), w, optimize=True)
    return y if b is None else y + b.reshape(-1, 1, 1)


def conv2d_backward(dy, x, w, stride: int, padding: int, need_dx=True, need_dw=True, need_db=True):
    """(dx, dW, db) from dy = dL/dy (N, K, P, Q); None for each gradient not asked for.

        db[k]          = sum_{n, p, q} dy[n, k, p, q]
        dW[k, c, r, s] = sum_{n, p, q} dy[n, k, p, q] xpad[n, c, p*st + r, q*st + s]   (summed over the batch)
        dx             = conv(dy dilated, W flipped), cropped by ``padding``

    y[n, k, p, q] took W[k, c, r, s] xpad[n, c, p*st + r, q*st + s], so that input position
    gets back dy[n, k, p, q] W[k, c, r, s]. Spread dy's entries st apart (st - 1 zeros
    between them: dy dilated), with R - 1 zeros before (S - 1 beside): each position of xpad
    then collects exactly those terms in a stride-1 convolution with the kernel flipped in
    (r, s) and C and K swapped, Wf[c, k, r, s] = W[k, c, R-1-r, S-1-s].
    """
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = dy.shape[2:]
    dx = dw = db = None
    if need_dx:
        dilated = np.zeros((N, K, H + 2 * padding + R - 1, W + 2 * padding + S - 1), dtype=dy.dtype)
        dilated[:, :, R - 1:R - 1 + stride * (P - 1) + 1:stride, S - 1:S - 1 + stride * (Q - 1) + 1:stride] = dy
        dxpad = conv2d_forward(dilated, w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), None, 1, 0)
        dx = dxpad[:, :, padding:padding + H, padding:padding + W]
    if need_dw:
        dw = np.einsum("nkpq,ncpqrs->kcrs", dy, _windows(x, R, S, stride, padding), optimize=True)
    if need_db:
        db = dy.sum(axis=(0, 2, 3))
    return dx, dw, db


# ------------------------------------------------------------------------------------
# group norm (Wu & He, 2018)
# ------------------------------------------------------------------------------------


def _per_channel(a, ndim: int):
    """A (C,) parameter shaped to broadcast over (N, C, ...)."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def group_norm_forward(x, num_groups: int, weight, bias, eps: float):
    """(y, mean, rstd) for x (N, C, ...) in G = num_groups groups of C/G channels; mean, rstd (N, G).

    Per sample n and group g, over its M = (C/G) * H * W values:
        mu = mean(x),   sigma^2 = mean((x - mu)^2)  (biased),   rstd = 1 / sqrt(sigma^2 + eps)
        xhat = (x - mu) * rstd,   y = gamma[c] * xhat + beta[c]   (gamma = weight, beta = bias)
    """
    N, G = x.shape[0], num_groups
    xg = x.reshape(N, G, -1)
    mean = xg.mean(axis=2)
    var = ((xg - mean[..., None]) ** 2).mean(axis=2)
    rstd = 1 / np.sqrt(var + x.dtype.type(eps))  # (a float64 eps would promote float32)
    y = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if weight is not None:
        y = y * _per_channel(weight, x.ndim)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim)
    return y, mean, rstd


def group_norm_backward(dy, x, num_groups: int, weight, mean, rstd):
    """(dx, dgamma, dbeta); the last two None where there is no weight.

    With g = dy * gamma and the means over each (sample, group), as in the forward pass:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        dgamma[c] = sum_{n, h, w} dy * xhat,    dbeta[c] = sum_{n, h, w} dy
    (x reaches y directly, through mu, and through rstd: the three terms of dx.)
    """
    N, G = x.shape[0], num_groups
    xhat = (x.reshape(N, G, -1) - mean[..., None]) * rstd[..., None]
    g = (dy if weight is None else dy * _per_channel(weight, x.ndim)).reshape(N, G, -1)
    dx = rstd[..., None] * (g - g.mean(axis=2, keepdims=True) - xhat * (g * xhat).mean(axis=2, keepdims=True))
    if weight is None:
        return dx.reshape(x.shape), None, None
    over = (0,) + tuple(range(2, x.ndim))  # every axis but the channels
    return dx.reshape(x.shape), (dy * xhat.reshape(x.shape)).sum(axis=over), dy.sum(axis=over)


# ------------------------------------------------------------------------------------
# attention (Vaswani et al., 2017; lse as in FlashAttention, Dao et al., 2022)
# ------------------------------------------------------------------------------------


def _scores(q, k, scale, is_causal: bool):
    """S = scale * Q K^T (B, H, Lq, Lk), with S_ij = -inf where a causal mask hides key j
    from query i (j > i: torch's top-left alignment, so Lq != Lk is allowed)."""
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)
    if is_causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], dtype=bool), k=1), -np.inf, s)
    return s


def attention_forward(q, k, v, scale: float, is_causal: bool):
    """(O, lse) for Q (B, H, Lq, d), K (B, H, Lk, d), V (B, H, Lk, dv): O (B, H, Lq, dv), lse (B, H, Lq).

        S = scale * Q K^T,   P = softmax(S) by rows,   O = P V
        lse_i = log sum_j exp(S_ij) = m_i + log l_i,   m_i = max_j S_ij,   l_i = sum_j exp(S_ij - m_i)
    (subtracting the row maximum m keeps exp from overflowing). lse is what the backward
    pass keeps instead of P: P = exp(S - lse).
    """
    s = _scores(q, k, scale, is_causal)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    return (p / l) @ v, (m + np.log(l))[..., 0]


def attention_backward(do, q, k, v, o, lse, scale: float, is_causal: bool):
    """(dQ, dK, dV) from dO, with P rebuilt from lse:

        P = exp(S - lse),   dV = P^T dO,   dP = dO V^T
        D_i = sum_j P_ij dP_ij = sum_j dO_ij O_ij,   dS = P * (dP - D)   (softmax's Jacobian, by rows)
        dQ = scale * dS K,   dK = scale * dS^T Q
    """
    scale = q.dtype.type(scale)
    p = np.exp(_scores(q, k, scale, is_causal) - lse[..., None])
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (do * o).sum(axis=-1, keepdims=True))
    return scale * (ds @ k), scale * (ds.swapaxes(-1, -2) @ q), p.swapaxes(-1, -2) @ do


# ------------------------------------------------------------------------------------
# The rest of the contract: matmul, SiLU, GELU, GEGLU and layer norm
# ------------------------------------------------------------------------------------
# Written against xp (NumPy or CuPy, whichever the arrays are): these whole-array
# formulas are also what the emulated and cupy backends run (on a GPU each expression is
# one kernel over everything); the numpy backend runs them block by block on all cores.


def matmul(a, b):
    """a @ b, with np.matmul's broadcasting."""
    return a @ b


def _sigmoid(a):
    """1 / (1 + e^-a), as (1 + tanh(a / 2)) / 2, which never overflows."""
    half = a.dtype.type(0.5)
    return half + half * get_array_module(a).tanh(half * a)


def silu_forward(a, beta: float):
    """(y, s) with s = sigmoid(beta a), y = a s: SiLU for beta = 1, CLIP's quick_gelu for 1.702."""
    s = _sigmoid(a.dtype.type(beta) * a)
    return a * s, s


def silu_backward(g, y, s, beta: float):
    """da = g * dy/da,   dy/da = s + beta a s (1 - s) = s + beta y (1 - s)."""
    return g * (s + g.dtype.type(beta) * y * (1 - s))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_cdf(a):
    """Phi(a) = erfc(-a / sqrt 2) / 2, the standard normal CDF (erfc rather than 1 + erf, so that
    the left tail keeps its digits): math.erfc value by value on NumPy, cupyx's on CuPy."""
    if get_array_module(a) is np:  # in float64, rounded once to a's dtype at the end
        return (np.asarray(_erfc(a.astype(np.float64) * -(1 / math.sqrt(2))), dtype=np.float64) * 0.5).astype(a.dtype)
    import cupyx.scipy.special

    return cupyx.scipy.special.erfc(a * -a.dtype.type(1 / math.sqrt(2))) * a.dtype.type(0.5)


def gelu_forward(a, keep_slope: bool):
    """(y, slope): y = a Phi(a), and where a backward pass can follow its derivative
    slope = Phi(a) + a pdf(a), pdf(a) = exp(-a^2 / 2) / sqrt(2 pi); the backward pass is g * slope."""
    cdf = normal_cdf(a)
    if not keep_slope:
        return a * cdf, None
    pdf = get_array_module(a).exp(-0.5 * a * a) * a.dtype.type(1 / math.sqrt(2 * math.pi))
    return a * cdf, cdf + a * pdf


def geglu_forward(x, keep_slope: bool):
    """(y, GELU(g), GELU'(g) or None): y = h GELU(g), where [h, g] = x, the two halves of the last axis."""
    d = x.shape[-1] // 2
    gelu_g, slope = gelu_forward(x[..., d:], keep_slope)
    return x[..., :d] * gelu_g, gelu_g, slope


def geglu_backward(grad, h, gelu_g, slope):
    """dx = [dh, dg] = [grad GELU(g), grad h GELU'(g)]."""
    return get_array_module(grad).concatenate([grad * gelu_g, grad * h * slope], axis=-1)


def layer_norm_forward(x, normalized_ndim: int, weight, bias, eps: float):
    """(y, xhat, rstd) over the last ``normalized_ndim`` axes of x, for each row (the rest):

        mu = mean(x),   rstd = 1 / sqrt(mean((x - mu)^2) + eps),   xhat = (x - mu) rstd
        y = gamma xhat + beta   (weight gamma and bias beta both given, or both None: y = xhat)

    rstd has one value per row: shape x.shape[:-normalized_ndim].
    """
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    centred = x - x.mean(axis=axes, keepdims=True)
    rstd = 1 / get_array_module(x).sqrt((centred * centred).mean(axis=axes, keepdims=True) + x.dtype.type(eps))
    xhat = centred * rstd
    y = xhat if weight is None else xhat * weight + bias
    return y, xhat, rstd.reshape(x.shape[:x.ndim - normalized_ndim])


def layer_norm_backward(dy, xhat, rstd, weight, need_dx: bool, need_dweight: bool, need_dbias: bool):
    """(dx, dgamma, dbeta), None for what is not asked for (and for both where there is no weight):

        dx = rstd (g - mean(g) - xhat mean(g xhat)),   g = dy gamma   (group norm's formula, per row)
        dgamma = sum over the rows of dy xhat,   dbeta = sum over the rows of dy
    """
    rows, axes = tuple(range(rstd.ndim)), tuple(range(rstd.ndim, xhat.ndim))
    dweight = (dy * xhat).sum(axis=rows) if weight is not None and need_dweight else None
    dbias = dy.sum(axis=rows) if weight is not None and need_dbias else None
    if not need_dx:
        return None, dweight, dbias
    g = dy if weight is None else dy * weight
    r = rstd.reshape(rstd.shape + (1,) * len(axes))
    dx = r * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, dweight, dbias
