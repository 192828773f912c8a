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
# conv2d:  y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] xpad[n, c, p*st + r, q*st + s]
#          (xpad: x with pd zeros around each image)
# ------------------------------------------------------------------------------------
#
# The textbook route is im2col: copy every receptive field into a column of a matrix of
# C*R*S rows and N*P*Q columns, then one matrix product W @ cols. On a CPU that copy is
# the problem: it writes R*S = 9 copies of the input, and writing memory is as slow as
# the multiplications. So we copy only S times (along the kernel's width) and get the
# kernel's height for free.
#
# Stride 1 first. Unroll the width:  xs[(c,s), (n,i,q)] = xpad[n, c, i, q + s],
# with i running over all Hp = H + 2*pd padded rows. Kernel row r of output row p reads
# padded row p + r, so with W_r = w[:, :, r, :] as a (K, C*S) matrix,
#     y[n, :, p, q] = sum_r  W_r @ xs[:, (n, p + r, q)].
# Stack the R matrices W_r into one (R*K, C*S) matrix, and a single product gives
#     Z[r, :, (n,i,q)] = W_r @ xs[:, (n,i,q)]   for every padded row i;
# y is then the sum of R slices of Z, each shifted by r rows:
#     y[n,k,p,q] = sum_r Z[r, k, n, p + r, q].
# (Rows i >= P of Z are computed and never read: 2 of 34 rows at 32x32, 2 of 10 at 8x8.)
#
# Stride st: split the padded rows by phase a = i mod st. Kernel row r of output row p
# reads padded row p*st + r = (p + r // st)*st + r % st: row p + r // st of phase r % st.
# So xs gets a phase axis, xs[c, s, a, n, i, q] = xpad[n, c, i*st + a, q*st + s], there
# is one product per phase (for the kernel rows r = a, a + st, ...), and kernel row r
# is shifted by r // st rows. With st = 1 this is exactly the scheme above.
#
# The backward pass reuses both pieces:
#   dW_r = sum over (n, p, q) of xs[:, (n, p + r // st, q)] dy[n, :, p, q]: a product
#       of a column-shifted view of xs with dy laid out as a (N*I*Q, K) matrix;
#   dX: for stride 1 the gradient of a convolution is itself a convolution, of dy with
#       the kernel flipped in (r, s) and with C and K swapped (padding R - 1 - pd), so
#       the forward code computes it. For stride > 1 each forward step is transposed
#       instead: a product with the stacked W_r^T, then ``fold``, the adjoint of
#       ``unroll``, adds every entry back onto the input position it was copied from.
#
# Everything runs over a few images at a time (a chunk): xs and Z of one chunk stay in
# the CPU's cache, where the copies and the sums of Z's slices are several times
# faster than in main memory. It also bounds the memory a convolution takes beyond its
# input and output to about CONV_CHUNK_BYTES.

CONV_CHUNK_BYTES = 2 << 20  # xs + Z per chunk: about one core's L2 cache (1-2 MB)


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _geometry(x_shape, R: int, S: int, stride: int, padding: int):
    """(P, Q, I): output height and width, and I, the rows per phase that xs keeps."""
    P, Q = _out_size(x_shape[2], R, stride, padding), _out_size(x_shape[3], S, stride, padding)
    return P, Q, P + (R - 1) // stride


def _inside(n_in: int, n_out: int, phase: int, stride: int, padding: int):
    """(out slice, in slice): the positions o < n_out whose padded position o*stride + phase
    falls inside the unpadded input [0, n_in), and the input positions they read."""
    lo = max(0, -((phase - padding) // stride))  # ceil((padding - phase) / stride)
    hi = min(n_out, -((phase - padding - n_in) // stride))
    if hi <= lo:
        return None
    first = lo * stride + phase - padding
    return slice(lo, hi), slice(first, first + (hi - lo - 1) * stride + 1, stride)


def _pairs(x_shape, R: int, S: int, stride: int, padding: int):
    """For every (s, a): the xs slice and the (channel-major) x slice that hold the same numbers."""
    H, W = x_shape[2:]
    _, Q, I = _geometry(x_shape, R, S, stride, padding)
    for s in range(S):
        cols = _inside(W, Q, s, stride, padding)
        for a in range(stride):
            rows = _inside(H, I, a, stride, padding)
            if cols and rows:
                yield (slice(None), s, a, slice(None), rows[0], cols[0]), (slice(None), slice(None), rows[1], cols[1])


def unroll(x, R: int, S: int, stride: int, padding: int):
    """xs (C, S, stride, N, I, Q): xs[c, s, a, n, i, q] = xpad[n, c, i*stride + a, q*stride + s]."""
    N, C = x.shape[:2]
    _, Q, I = _geometry(x.shape, R, S, stride, padding)
    xs = np.zeros((C, S, stride, N, I, Q), dtype=x.dtype)
    xt = x.transpose(1, 0, 2, 3)
    for dst, src in _pairs(x.shape, R, S, stride, padding):
        xs[dst] = xt[src]
    return xs


def fold(dxs, x_shape, R: int, S: int, stride: int, padding: int):
    """The adjoint of unroll: dx (N, C, H, W), each dxs entry added onto the x entry it copies."""
    N, C = x_shape[:2]
    dxt = np.zeros((C, N) + tuple(x_shape[2:]), dtype=dxs.dtype)
    for dst, src in _pairs(x_shape, R, S, stride, padding):
        dxt[src] += dxs[dst]
    return dxt.transpose(1, 0, 2, 3)


def _phase(xs, a: int):
    """Phase a of xs as one (C*S, N*I*Q) matrix: a view (its rows are evenly spaced)."""
    C, S, _, N, I, Q = xs.shape
    return xs[:, :, a].reshape(C * S, N * I * Q)


def _stacked_kernel_rows(w, a: int, stride: int):
    """The matrices W_r (K, C*S) of the kernel rows r = a, a + stride, ... stacked: (J*K, C*S)."""
    K, C, R, S = w.shape
    return w[:, :, a::stride, :].transpose(2, 0, 1, 3).reshape(-1, C * S)


def _chunks(N: int, bytes_per_image: int):
    step = max(1, min(N, CONV_CHUNK_BYTES // bytes_per_image))
    return [slice(n, min(N, n + step)) for n in range(0, N, step)]


def conv2d_forward(x, w, b, stride: int, padding: int):
    """y (N, K, P, Q) = conv(x (N, C, H, W), w (K, C, R, S)) + b."""
    N = x.shape[0]
    K, C, R, S = w.shape
    P, Q, I = _geometry(x.shape, R, S, stride, padding)
    W = [_stacked_kernel_rows(w, a, stride) for a in range(min(stride, R))]
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    for chunk in _chunks(N, (C * S * stride + R * K) * I * Q * x.itemsize):
        xs, yc = unroll(x[chunk], R, S, stride, padding), y[chunk]
        terms = []
        for a, Wa in enumerate(W):
            Z = (Wa @ _phase(xs, a)).reshape(-1, K, yc.shape[0], I, Q)
            terms += [Z[j, :, :, j:j + P].transpose(1, 0, 2, 3) for j in range(len(Z))]  # kernel row a + j*st
        if b is None:
            np.copyto(yc, terms[0])
        else:
            np.add(terms[0], b.reshape(K, 1, 1), out=yc)
        for term in terms[1:]:
            yc += term
    return y


def _dy_rows(dy, I: int):
    """dy (n, K, P, Q) as the (n*I*Q, K) matrix whose row (n, i, q) pairs with column (n, i, q)
    of xs; zero in the rows i >= P that no output uses."""
    n, K, P, Q = dy.shape
    D = np.zeros((n, I, Q, K), dtype=dy.dtype)
    D[:, :P] = dy.transpose(0, 2, 3, 1)
    return D.reshape(n * I * Q, K)


def conv2d_backward(dy, x, w, stride: int, padding: int, need_dx=True, need_dw=True, need_db=True):
    """(dx, dw, db) from dy (N, K, P, Q); None for the gradients not asked for."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q, I = _geometry(x.shape, R, S, stride, padding)
    transposed_conv = stride == 1 and R == S and padding <= R - 1
    dwt = np.zeros((R, C * S, K), dtype=w.dtype)  # dW_r^T
    db = np.zeros(K, dtype=dy.dtype)
    dx = np.empty(x.shape, dtype=dy.dtype) if need_dx and not transposed_conv else None
    if need_dw or need_db or dx is not None:
        for chunk in _chunks(N, (C * S * stride + K) * I * Q * x.itemsize):
            D = _dy_rows(dy[chunk], I)
            db += D.sum(axis=0)
            if need_dw:
                xs = unroll(x[chunk], R, S, stride, padding)
                for r in range(R):
                    shift = (r // stride) * Q
                    dwt[r] += _phase(xs, r % stride)[:, shift:] @ D[:len(D) - shift]
            if dx is not None:  # the forward steps transposed, then fold
                dxs = np.zeros((C, S, stride, len(D) // (I * Q), I, Q), dtype=dy.dtype)
                for r in range(R):
                    shift = (r // stride) * Q
                    _phase(dxs, r % stride)[:, shift:] += w[:, :, r, :].reshape(K, C * S).T @ D[:len(D) - shift].T
                dx[chunk] = fold(dxs, x[chunk].shape, R, S, stride, padding)
    if need_dx and transposed_conv:
        w_flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, K, R, S)
        dx = conv2d_forward(dy, w_flipped, None, 1, R - 1 - padding)
    dw = dwt.reshape(R, C, S, K).transpose(3, 1, 0, 2).copy() if need_dw else None
    return dx, dw, (db if need_db else None)


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
