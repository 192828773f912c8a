"""NumPy reference implementations of the three primitives the CUDA kernels replace.

conv2d, group norm and attention are where Stable Diffusion spends its time. On the
``numpy`` backend these functions compute them (this is what trains on a laptop); on the
``emulated`` and ``cupy`` backends kernels/*.cu take their place with the very same
signatures, and the kernel tests hold every kernel against these functions.

They work on raw arrays, forward and backward, and are written around large
contiguous matrix products, which is where a CPU's floating-point throughput lives.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from typing import NamedTuple

import numpy as np

# ------------------------------------------------------------------------------------
# conv2d:  y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] xpad[n, c, p*st + r, q*st + s]
#          (xpad: x with pd zeros around each image)
# ------------------------------------------------------------------------------------
#
# Sizes: Stable Diffusion's UNet convolves 320 to 1,280 channels on 64x64 down to 8x8
# latents; minisd's small UNet and VAE, 32 to 128 channels on 32x32 down to 8x8.
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
# Rows i >= P of Z are computed and never read: 2 of 34 rows at 32x32, 2 of 18 at
# 16x16. At 8x8 that would be 2 of 10, so small outputs unroll the kernel rows too
# (U = R: plain im2col, whose 9 copies of a small input cost less than that waste).
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
# input and output to about CONV_CHUNK_BYTES. The chunk's buffers are made once per
# call and refilled: fresh memory is slow too, as the operating system hands it out
# one zeroed page at a time. Chunks are not made smaller than a few MB, though: every
# product is a call into a multithreaded BLAS that must gather its threads, which costs
# little on an idle machine but up to a time slice per call when other processes hold
# the cores. (For the benchmark's 32x32 layer, 2 MB chunks make 80 calls per forward
# and backward pass; on one core they ran 1.7x faster than one whole-batch chunk, on
# two cores busy with other work 8x slower. 4 MB costs a few per cent on one core and
# halves the calls.)

CONV_CHUNK_BYTES = 4 << 20  # xs + Z per chunk: between one core's L2 (1 MB) and the L3 (32 MB)
UNROLL_ROWS_UP_TO = 8  # outputs with at most this many rows unroll the kernel rows too


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


class _Layout(NamedTuple):
    """How xs holds one convolution's input: xs[c, u, s, a, n, i, q] = xpad[n, c, i*st + a + u, q*st + s].

    U kernel rows are unrolled into the matrix (1, or all R for small images: see
    ``_layout``), A = st phases when U = 1 (else 1), I rows per phase and image, and the
    output is P x Q.
    """

    P: int
    Q: int
    U: int
    A: int
    I: int


def _layout(x_shape, R: int, S: int, stride: int, padding: int) -> _Layout:
    P, Q = _out_size(x_shape[2], R, stride, padding), _out_size(x_shape[3], S, stride, padding)
    junk = (R - 1) // stride  # rows per image that the row shifts compute and throw away
    if junk and P <= UNROLL_ROWS_UP_TO:
        # Small outputs (8x8: 2 of every 10 rows thrown away at stride 1, 1 of 9 at stride
        # 2, whose rows are also short to copy): unroll the kernel rows too. This is
        # plain im2col, and its R*S copies of a small input cost less than the waste.
        return _Layout(P, Q, R, 1, P)
    return _Layout(P, Q, 1, stride, P + junk)


def _inside(n_in: int, n_out: int, phase: int, stride: int, padding: int):
    """(out slice, in slice): the positions o < n_out whose padded position o*stride + phase
    falls inside the unpadded input [0, n_in), and the input positions they read."""
    lo = max(0, -((phase - padding) // stride))  # ceil((padding - phase) / stride)
    hi = min(n_out, -((phase - padding - n_in) // stride))
    if hi <= lo:
        return None
    first = lo * stride + phase - padding
    return slice(lo, hi), slice(first, first + (hi - lo - 1) * stride + 1, stride)


def _pairs(x_shape, lay: _Layout, S: int, stride: int, padding: int):
    """For every (u, s, a): the xs slice and the (channel-major) x slice that hold the same numbers."""
    H, W = x_shape[2:]
    for u, s, a in itertools.product(range(lay.U), range(S), range(lay.A)):
        cols = _inside(W, lay.Q, s, stride, padding)
        rows = _inside(H, lay.I, a + u, stride, padding)
        if cols and rows:
            yield (slice(None), u, s, a, slice(None), rows[0], cols[0]), (slice(None), slice(None), rows[1], cols[1])


def unroll(x, lay: _Layout, S: int, stride: int, padding: int, out=None):
    """xs (C, U, S, A, N, I, Q): xs[c, u, s, a, n, i, q] = xpad[n, c, i*stride + a + u, q*stride + s].

    ``out``: an xs from an earlier call with the same layout, to fill again; the
    padding entries are never written, so they are still zero.
    """
    N, C = x.shape[:2]
    shape = (C, lay.U, S, lay.A, N, lay.I, lay.Q)
    xs = np.zeros(shape, dtype=x.dtype) if out is None else out[:, :, :, :, :N]
    xt = x.transpose(1, 0, 2, 3)
    for dst, src in _pairs(x.shape, lay, S, stride, padding):
        xs[dst] = xt[src]
    return xs


def fold(dxs, x_shape, lay: _Layout, S: int, stride: int, padding: int):
    """The adjoint of unroll: dx (N, C, H, W), each dxs entry added onto the x entry it copies."""
    N, C = x_shape[:2]
    dxt = np.zeros((C, N) + tuple(x_shape[2:]), dtype=dxs.dtype)
    for dst, src in _pairs(x_shape, lay, S, stride, padding):
        dxt[src] += dxs[dst]
    return dxt.transpose(1, 0, 2, 3)


def _phase(xs, a: int):
    """Phase a of xs as one (C*U*S, N*I*Q) matrix: a view (its rows are evenly spaced)."""
    C, U, S, _, N, I, Q = xs.shape
    return xs[:, :, :, a].reshape(C * U * S, N * I * Q)


def _kernel_matrices(w, lay: _Layout, stride: int):
    """Per phase a, the matrices W_r (K, C*U*S) of its kernel rows r = a, a + stride, ...
    stacked into one (J*K, C*U*S) matrix; with the rows unrolled, all of w as one matrix."""
    K, C, R, S = w.shape
    if lay.U == R:
        return [w.reshape(K, C * R * S)]
    return [w[:, :, a::stride, :].transpose(2, 0, 1, 3).reshape(-1, C * S) for a in range(min(stride, R))]


def _chunks(N: int, bytes_per_image: int):
    step = max(1, min(N, CONV_CHUNK_BYTES // bytes_per_image))
    return [slice(n, min(N, n + step)) for n in range(0, N, step)]


def conv2d_forward(x, w, b, stride: int, padding: int):
    """y (N, K, P, Q) = conv(x (N, C, H, W), w (K, C, R, S)) + b."""
    N = x.shape[0]
    K, C, R, S = w.shape
    lay = _layout(x.shape, R, S, stride, padding)
    P, Q, I = lay.P, lay.Q, lay.I
    W = _kernel_matrices(w, lay, stride)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    chunks = _chunks(N, (C * lay.U * S * lay.A + R // lay.U * K) * I * Q * x.itemsize)
    xs = z = None  # buffers, made for the first chunk and refilled for the others
    for chunk in chunks:
        xs = unroll(x[chunk], lay, S, stride, padding, out=xs)
        yc = y[chunk]
        n = yc.shape[0]
        z = np.empty(max(len(Wa) for Wa in W) * n * I * Q, dtype=x.dtype) if z is None else z
        for a, Wa in enumerate(W):
            Z = np.matmul(Wa, _phase(xs, a), out=z[:len(Wa) * n * I * Q].reshape(len(Wa), -1))
            Z = Z.reshape(-1, K, n, I, Q)
            for j in range(len(Z)):  # kernel row a + j*stride reads j rows further down
                term = Z[j, :, :, j:j + P].transpose(1, 0, 2, 3)
                if a == j == 0:
                    np.copyto(yc, term) if b is None else np.add(term, b.reshape(K, 1, 1), out=yc)
                else:
                    yc += term
    return y


def _dy_rows(dy, I: int, out=None):
    """dy (n, K, P, Q) as a (K, n*I*Q) matrix whose column (n, i, q) pairs with column (n, i, q)
    of xs; zero in the rows i >= P that no output uses (``out``: an earlier one to refill)."""
    n, K, P, Q = dy.shape
    D = np.zeros((K, n, I, Q), dtype=dy.dtype) if out is None else out[:, :n * I * Q].reshape(K, n, I, Q)
    D[:, :, :P] = dy.transpose(1, 0, 2, 3)
    return D.reshape(K, n * I * Q)


def conv2d_backward(dy, x, w, stride: int, padding: int, need_dx=True, need_dw=True, need_db=True):
    """(dx, dw, db) from dy (N, K, P, Q); None for the gradients not asked for."""
    N, C = x.shape[:2]
    K, _, R, S = w.shape
    lay = _layout(x.shape, R, S, stride, padding)
    I, Q, U = lay.I, lay.Q, lay.U
    Wm = _kernel_matrices(w, lay, stride)
    transposed_conv = stride == 1 and R == S and padding <= R - 1
    dw = np.zeros(w.shape, dtype=w.dtype)
    db = np.zeros(K, dtype=dy.dtype)
    dx = np.empty(x.shape, dtype=dy.dtype) if need_dx and not transposed_conv else None
    if need_dw or need_db or dx is not None:
        D = xs = None  # buffers, reused from chunk to chunk
        for chunk in _chunks(N, (C * U * S * lay.A + K) * I * Q * x.itemsize):
            D = _dy_rows(dy[chunk], I, out=D)
            M = D.shape[1]
            db += D.sum(axis=1)
            xs = unroll(x[chunk], lay, S, stride, padding, out=xs) if need_dw else None
            if dx is not None:  # every phase with kernel rows is written whole (at j = 0) before it is added to
                dxs = (np.zeros if stride > R else np.empty)((C, U, S, lay.A, M // (I * Q), I, Q), dtype=dy.dtype)
            for a, Wa in enumerate(Wm):
                for j in range(len(Wa) // K):  # kernel row a + j*stride (all rows when U = R), j rows down
                    rows = slice(None) if U == R else a + j * stride
                    Dj = D[:, :M - j * Q]
                    if need_dw:
                        dw[:, :, rows, :] += (_phase(xs, a)[:, j * Q:] @ Dj.T).T.reshape(dw[:, :, rows, :].shape)
                    if dx is not None:  # the forward product transposed; fold below
                        if j == 0:
                            np.matmul(Wa[:K].T, Dj, out=_phase(dxs, a))
                        else:
                            _phase(dxs, a)[:, j * Q:] += Wa[j * K:(j + 1) * K].T @ Dj
            if dx is not None:
                dx[chunk] = fold(dxs, x[chunk].shape, lay, S, stride, padding)
    if need_dx and transposed_conv:
        w_flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, K, R, S)
        dx = conv2d_forward(dy, w_flipped, None, 1, R - 1 - padding)
    return dx, (dw if need_dw else None), (db if need_db else None)


# ------------------------------------------------------------------------------------
# group norm: per sample n and group g of C/G channels, over M = (C/G)*H*W values
#   mu = mean(x),  var = mean((x - mu)^2),  rstd = 1/sqrt(var + eps)
#   xhat = (x - mu) * rstd,   y = xhat * gamma[c] + beta[c]
# ------------------------------------------------------------------------------------
#
# Group norm is a handful of passes over memory, so the work is in making few of them.
# Sums over the M values of a row take one pass each (einsum for sums, batched BLAS
# dot products for sums of products), and every elementwise step writes in place.
# Per-channel factors are folded together first, so that y is one multiply and one add
# over the data, and dx one affine map per (n, c) of dy and x - mu.


def _row_sums(a):
    """sum over the last axis, in one pass (einsum's loop is faster here than a.sum(-1)'s)."""
    return np.einsum("...i->...", a)


def _row_dots(a, b):
    """sum over the last axis of a * b, as batched dot products (no a * b temporary)."""
    return (a[..., None, :] @ b[..., :, None])[..., 0, 0]


def _per_channel(per_group, C: int):
    """(N, G) -> (N, C): each group's value repeated for its C/G channels."""
    return np.repeat(per_group, C // per_group.shape[1], axis=1)


def group_norm_forward(x, num_groups: int, weight, bias, eps: float):
    """(y, mean, rstd); mean and rstd have shape (N, G)."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    M = xg.shape[2]
    mean = _row_sums(xg) / M
    centred = xg - mean[:, :, None]
    var = _row_dots(centred, centred) / M  # two passes (mean first): no cancellation
    rstd = 1.0 / np.sqrt(var + np.asarray(eps, dtype=var.dtype))
    # y = centred * (rstd * gamma) + beta, with one factor per (n, c)
    scale = _per_channel(rstd, C)
    if weight is not None:
        scale *= weight
    y = centred.reshape(N, C, -1)
    y *= scale[:, :, None]
    if bias is not None:
        y += bias.reshape(C, 1)
    return y.reshape(x.shape), mean, rstd


def group_norm_backward(dy, x, num_groups: int, weight, mean, rstd):
    """(dx, dweight, dbias). With g = dy * gamma:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).

    Both means are over a group; they come from per-channel sums of dy and dy * xhat
    (which also give dbias and dweight). Written out, dx is one affine map per (n, c):
        dx = (rstd gamma) dy - (rstd^2 mean(g xhat)) (x - mu) - rstd mean(g).
    """
    N, C = x.shape[:2]
    G = num_groups
    M = x[0].size // G
    centred = (x.reshape(N, G, -1) - mean[:, :, None]).reshape(N, C, -1)
    dyc = dy.reshape(N, C, -1)
    sum_dy = _row_sums(dyc)  # (N, C)
    sum_dy_xhat = _row_dots(dyc, centred) * _per_channel(rstd, C)
    gamma = np.ones(C, dtype=x.dtype) if weight is None else weight
    mean_g = (sum_dy * gamma).reshape(N, G, -1).sum(axis=2) / M  # (N, G)
    mean_gx = (sum_dy_xhat * gamma).reshape(N, G, -1).sum(axis=2) / M
    centred *= _per_channel(-rstd * rstd * mean_gx, C)[:, :, None]
    centred -= _per_channel(rstd * mean_g, C)[:, :, None]
    dx = dyc * (_per_channel(rstd, C) * gamma)[:, :, None]
    dx += centred
    dweight = sum_dy_xhat.sum(axis=0) if weight is not None else None
    dbias = sum_dy.sum(axis=0) if weight is not None else None
    return dx.reshape(x.shape), dweight, dbias


# ------------------------------------------------------------------------------------
# attention:  S = scale * Q K^T,  P = softmax_rows(S),  O = P V
#   lse_i = log sum_j exp(S_ij) is kept so backward can rebuild P = exp(S - lse)
#   dV = P^T dO;  dP = dO V^T;  D_i = sum_j dO_ij O_ij;  dS = P * (dP - D)
#   dQ = scale * dS K;  dK = scale * dS^T Q
# ------------------------------------------------------------------------------------
#
# The (Lq, Lk) score matrices are the big arrays here; every pass over them costs, so
# they are made once per tile and then changed in place (exp included). The scale is
# applied to Q (Lq x d numbers) rather than to S (Lq x Lk), and softmax's division by
# the row sums is applied to O = exp(S - m) V, again the small side.
#
# The work is cut into tiles, FlashAttention's way: a few (batch, head) rows times a
# block of query rows. A tile's scores (SCORES_IN_CACHE: 1 MB in float32) stay in the
# CPU's cache between the passes over them, and memory stays bounded (by
# MAX_SCORES_IN_MEMORY) at 64x64 latents, where one head alone has 4,096 x 4,096 scores. Each query block is
# small enough (about BLAS_SMALL multiply-adds per product) that the BLAS computes its
# products on the calling thread instead of gathering its own threads, which for
# products this small costs more than the product (and far more when other processes
# hold the cores). The cores are used instead by running the (batch, head) slices on a
# pool of threads: NumPy releases Python's lock inside its loops and the BLAS. (With
# long keys, 4,096 at 64x64 latents, a block that small would be a handful of rows;
# there the products are big, the BLAS threads them, and the slices run one by one:
# two threads each calling a multithreaded BLAS slow each other down many times over.)
# In the backward pass each query block adds its share into dK and dV of its slice.
MAX_SCORES_IN_MEMORY = 1 << 22  # 16 MB of float32 scores per tile at most
SCORES_IN_CACHE = 1 << 18  # 1 MB: the tile size when the products are small
BLAS_SMALL = 1 << 17
MIN_QUERY_BLOCK = 16  # fewer rows make inefficient products: then let the BLAS thread them


def _causal_bias(Lq: int, Lk: int, dtype):
    """0 where key j may be seen by query i, -inf where not (torch's top-left alignment: j > i)."""
    return np.triu(np.full((Lq, Lk), -np.inf, dtype=dtype), k=1)


def _tiles(rows: int, Lq: int, Lk: int, d: int):
    """(slices of the (batch, head) rows, slices of the query rows, whether the tiles' products
    are small enough to run on the calling thread, so that the tiles can share out the cores)."""
    block = BLAS_SMALL // (Lk * d)
    small = block >= MIN_QUERY_BLOCK
    scores = min(SCORES_IN_CACHE, MAX_SCORES_IN_MEMORY) if small else MAX_SCORES_IN_MEMORY
    if not small:  # long keys (64x64 latents): big products, which the BLAS shares out itself
        block = max(1, scores // Lk)
    block = min(Lq, block)
    step = max(1, scores // (block * Lk))
    return ([slice(i, min(rows, i + step)) for i in range(0, rows, step)],
            [slice(i, min(Lq, i + block)) for i in range(0, Lq, block)], small)


_pool, _pool_pid = None, None


def _on_all_cores(fn, items, parallel=True):
    """fn(item) for every item, on a pool of one thread per core; the first exception is raised."""
    global _pool, _pool_pid
    if not parallel or len(items) == 1 or (os.cpu_count() or 1) == 1:
        return [fn(item) for item in items]
    if _pool_pid != os.getpid():  # first use, or a forked child, which has none of the parent's threads
        _pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="minisd-reference")
        _pool_pid = os.getpid()
    return [f.result() for f in [_pool.submit(fn, item) for item in items]]


def _as_rows(*arrays):
    """(B, H, L, d) arrays as (B*H, L, d): one row per (batch, head)."""
    return [a.reshape((-1,) + a.shape[2:]) for a in arrays]


def attention_forward(q, k, v, scale: float, is_causal: bool):
    """(o, lse): o (B, H, Lq, d), lse (B, H, Lq)."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    bias = _causal_bias(Lq, Lk, q.dtype) if is_causal else None
    q, k, v = _as_rows(q * np.asarray(scale, dtype=q.dtype), k, v)
    kT = k.swapaxes(-1, -2)
    o = np.empty((B * H, Lq, v.shape[-1]), dtype=q.dtype)
    lse = np.empty((B * H, Lq), dtype=q.dtype)
    slices, blocks, small = _tiles(B * H, Lq, Lk, max(d, v.shape[-1]))

    def slice_of_rows(sl):
        buffer = np.empty((len(o[sl]), blocks[0].stop, Lk), dtype=q.dtype)  # refilled by every block
        for qb in blocks:
            p = np.matmul(q[sl, qb], kT[sl], out=buffer[:, :qb.stop - qb.start])  # S for this tile
            if bias is not None:
                p += bias[qb]
            m = p.max(axis=-1, keepdims=True)
            p -= m
            np.exp(p, out=p)  # p = exp(S - m): unnormalised probabilities
            total = _row_sums(p)[..., None]
            np.matmul(p, v[sl], out=o[sl, qb])
            o[sl, qb] /= total
            lse[sl, qb] = (m + np.log(total))[..., 0]

    _on_all_cores(slice_of_rows, slices, parallel=small)
    return o.reshape(B, H, Lq, -1), lse.reshape(B, H, Lq)


def attention_backward(do, q, k, v, o, lse, scale: float, is_causal: bool):
    """(dq, dk, dv), recomputing P from lse rather than keeping it from the forward pass."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    scale = np.asarray(scale, dtype=q.dtype)
    bias = _causal_bias(Lq, Lk, q.dtype) if is_causal else None
    do, q, k, v, o = _as_rows(do, q, k, v, o)
    q_scaled, k_scaled = q * scale, k * scale
    kT, vT = k.swapaxes(-1, -2), v.swapaxes(-1, -2)
    lse = lse.reshape(B * H, Lq, 1)
    D = np.einsum("nid,nid->ni", do, o)[..., None]  # D_i = sum_j dO_ij O_ij  (= sum_j P_ij dP_ij)
    dq = np.empty_like(q)
    dk, dv = np.zeros_like(k), np.zeros((B * H, Lk, v.shape[-1]), dtype=v.dtype)
    slices, blocks, small = _tiles(B * H, Lq, Lk, max(d, v.shape[-1]))

    def slice_of_rows(sl):
        p_buffer, ds_buffer = (np.empty((len(dq[sl]), blocks[0].stop, Lk), dtype=q.dtype) for _ in range(2))
        for qb in blocks:
            rows = qb.stop - qb.start
            p = np.matmul(q_scaled[sl, qb], kT[sl], out=p_buffer[:, :rows])
            if bias is not None:
                p += bias[qb]
            p -= lse[sl, qb]
            np.exp(p, out=p)  # P
            dv[sl] += p.swapaxes(-1, -2) @ do[sl, qb]
            ds = np.matmul(do[sl, qb], vT[sl], out=ds_buffer[:, :rows])  # dP
            ds -= D[sl, qb]
            ds *= p  # dS = P * (dP - D)
            np.matmul(ds, k_scaled[sl], out=dq[sl, qb])
            dk[sl] += ds.swapaxes(-1, -2) @ q_scaled[sl, qb]

    _on_all_cores(slice_of_rows, slices, parallel=small)
    return dq.reshape(B, H, Lq, -1), dk.reshape(B, H, Lk, -1), dv.reshape(B, H, Lk, -1)
