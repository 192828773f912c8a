"""NumPy reference implementations of the three primitives the CUDA kernels replace.

conv2d, group norm and attention are where Stable Diffusion spends its time. On the
``numpy`` backend these functions compute them (this is what trains on a laptop); on the
``emulated`` and ``cupy`` backends kernels/*.cu take their place with the very same
signatures, and the kernel tests hold every kernel against these functions.

They work on raw arrays, forward and backward, and are written around large
contiguous matrix products, which is where a CPU's floating-point throughput lives.
"""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------------------
# conv2d:  y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] x[n,c, p*st - pd + r, q*st - pd + s]
# ------------------------------------------------------------------------------------
#
# im2col turns the convolution into one matrix product. Gather every receptive field
# into a column:  cols[(c,r,s), (n,p,q)] = x_pad[n, c, p*st + r, q*st + s],
# then  Y = W cols  with W viewed as a (K, C*R*S) matrix. The backward pass is two more
# products of the same matrices:  dW = dY cols^T  and  dcols = W^T dY, and dcols is
# scattered back onto the input (col2im), one shifted, strided add per (r, s).
#
# Columns are laid out as (C, R, S, N, P, Q) so that every product is a single GEMM
# over the whole batch, with no transposed copy of the large cols matrix.


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _pad_hw(x, padding: int):
    if padding == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


def im2col(x, R: int, S: int, stride: int, padding: int):
    """cols (C*R*S, N*P*Q): every receptive field of x (N, C, H, W) as a column."""
    x = _pad_hw(x, padding)
    N, C, Hp, Wp = x.shape
    P, Q = (Hp - R) // stride + 1, (Wp - S) // stride + 1
    sN, sC, sH, sW = x.strides
    windows = np.lib.stride_tricks.as_strided(
        x, shape=(C, R, S, N, P, Q), strides=(sC, sH, sW, sN, sH * stride, sW * stride), writeable=False)
    return windows.reshape(C * R * S, N * P * Q)  # the one copy of the forward pass


def col2im(cols, x_shape, R: int, S: int, stride: int, padding: int):
    """The adjoint of im2col: sum every column's entries back onto the input positions they came from."""
    N, C, H, W = x_shape
    P, Q = _out_size(H, R, stride, padding), _out_size(W, S, stride, padding)
    cols = cols.reshape(C, R, S, N, P, Q)
    # Accumulate channel-major (C, N, ...) so each shifted add walks contiguous rows.
    dx = np.zeros((C, N, H + 2 * padding, W + 2 * padding), dtype=cols.dtype)
    for r in range(R):
        for s in range(S):
            dx[:, :, r:r + stride * P:stride, s:s + stride * Q:stride] += cols[:, r, s]
    dx = dx[:, :, padding:padding + H, padding:padding + W]
    return np.ascontiguousarray(dx.transpose(1, 0, 2, 3))


def conv2d_forward(x, w, b, stride: int, padding: int):
    """y (N, K, P, Q) = conv(x (N, C, H, W), w (K, C, R, S)) + b."""
    N = x.shape[0]
    K, C, R, S = w.shape
    P, Q = _out_size(x.shape[2], R, stride, padding), _out_size(x.shape[3], S, stride, padding)
    cols = im2col(x, R, S, stride, padding)
    y = w.reshape(K, C * R * S) @ cols  # (K, N*P*Q)
    y = y.reshape(K, N, P, Q).transpose(1, 0, 2, 3)
    if b is not None:
        y = y + b.reshape(1, K, 1, 1)  # also makes y contiguous NCHW
    return np.ascontiguousarray(y)


def conv2d_backward(dy, x, w, stride: int, padding: int, need_dx=True, need_dw=True, need_db=True):
    """(dx, dw, db) from dy (N, K, P, Q); None for the gradients not asked for."""
    K, C, R, S = w.shape
    dy_mat = dy.transpose(1, 0, 2, 3).reshape(K, -1)  # (K, N*P*Q)
    dx = dw = db = None
    if need_dw:
        dw = (dy_mat @ im2col(x, R, S, stride, padding).T).reshape(w.shape)
    if need_dx:
        dx = col2im(w.reshape(K, -1).T @ dy_mat, x.shape, R, S, stride, padding)
    if need_db:
        db = dy.sum(axis=(0, 2, 3))
    return dx, dw, db


# ------------------------------------------------------------------------------------
# group norm: per sample n and group g of C/G channels, over M = (C/G)*H*W values
#   mu = mean(x),  var = mean((x - mu)^2),  rstd = 1/sqrt(var + eps)
#   xhat = (x - mu) * rstd,   y = xhat * gamma[c] + beta[c]
# ------------------------------------------------------------------------------------


def group_norm_forward(x, num_groups: int, weight, bias, eps: float):
    """(y, mean, rstd); mean and rstd have shape (N, G)."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mean = xg.mean(axis=2)
    centred = xg - mean[:, :, None]
    var = np.einsum("ngm,ngm->ng", centred, centred) / xg.shape[2]  # two passes: no cancellation
    rstd = 1.0 / np.sqrt(var + eps)
    y = (centred * rstd[:, :, None]).reshape(x.shape)
    if weight is not None:
        y *= weight.reshape(_channel_shape(x))
    if bias is not None:
        y += bias.reshape(_channel_shape(x))
    return y, mean.astype(x.dtype), rstd.astype(x.dtype)


def group_norm_backward(dy, x, num_groups: int, weight, mean, rstd):
    """(dx, dweight, dbias). With g = dy * gamma:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    N, C = x.shape[:2]
    xhat = ((x.reshape(N, num_groups, -1) - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)
    sum_axes = (0,) + tuple(range(2, x.ndim))
    dweight = (dy * xhat).sum(axis=sum_axes) if weight is not None else None
    dbias = dy.sum(axis=sum_axes) if weight is not None else None
    g = dy * weight.reshape(_channel_shape(x)) if weight is not None else dy
    gg = g.reshape(N, num_groups, -1)
    xg = xhat.reshape(N, num_groups, -1)
    mean_g = gg.mean(axis=2, keepdims=True)
    mean_gx = np.einsum("ngm,ngm->ng", gg, xg)[:, :, None] / gg.shape[2]
    dx = (gg - mean_g - xg * mean_gx) * rstd[:, :, None]
    return dx.reshape(x.shape), dweight, dbias


def _channel_shape(x) -> tuple:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


# ------------------------------------------------------------------------------------
# attention:  S = scale * Q K^T,  P = softmax_rows(S),  O = P V
#   lse_i = log sum_j exp(S_ij) is kept so backward can rebuild P = exp(S - lse)
#   dV = P^T dO;  dP = dO V^T;  D_i = sum_j dO_ij O_ij;  dS = P * (dP - D)
#   dQ = scale * dS K;  dK = scale * dS^T Q
# ------------------------------------------------------------------------------------

# Attention at 64x64 latents has 4,096 x 4,096 scores per head; rows of (batch, head)
# are processed in slices so that at most this many scores exist at once.
MAX_SCORES_IN_MEMORY = 1 << 25


def _causal_mask(Lq: int, Lk: int):
    """True where key j may not be seen by query i (torch's top-left alignment: j > i)."""
    return np.triu(np.ones((Lq, Lk), dtype=bool), k=1)


def _slices(B: int, H: int, Lq: int, Lk: int):
    per_row = max(1, MAX_SCORES_IN_MEMORY // (H * Lq * Lk))
    return [slice(i, min(B, i + per_row)) for i in range(0, B, per_row)]


def _probabilities(q, k, scale: float, is_causal: bool, lse=None):
    """P = softmax(scale * q k^T) (and lse, when not given)."""
    s = (q @ k.swapaxes(-1, -2)) * np.asarray(scale, dtype=q.dtype)
    if is_causal:
        s[..., _causal_mask(q.shape[-2], k.shape[-2])] = -np.inf
    if lse is None:
        m = s.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]
    return np.exp(s - lse[..., None]), lse


def attention_forward(q, k, v, scale: float, is_causal: bool):
    """(o, lse): o (B, H, Lq, d), lse (B, H, Lq)."""
    B, H, Lq, _ = q.shape
    o = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    lse = np.empty((B, H, Lq), dtype=q.dtype)
    for sl in _slices(B, H, Lq, k.shape[-2]):
        p, lse[sl] = _probabilities(q[sl], k[sl], scale, is_causal)
        o[sl] = p @ v[sl]
    return o, lse


def attention_backward(do, q, k, v, o, lse, scale: float, is_causal: bool):
    """(dq, dk, dv), recomputing P from lse rather than keeping it from the forward pass."""
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    scale_ = np.asarray(scale, dtype=q.dtype)
    for sl in _slices(q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
        p, _ = _probabilities(q[sl], k[sl], scale, is_causal, lse[sl])
        dv[sl] = p.swapaxes(-1, -2) @ do[sl]
        dp = do[sl] @ v[sl].swapaxes(-1, -2)
        D = np.einsum("bhid,bhid->bhi", do[sl], o[sl])[..., None]
        ds = p * (dp - D)
        dq[sl] = (ds @ k[sl]) * scale_
        dk[sl] = (ds.swapaxes(-1, -2) @ q[sl]) * scale_
    return dq, dk, dv
