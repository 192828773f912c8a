"""The fast CPU path: conv2d, group norm and attention on the ``numpy`` backend (the default).

The math is in minisd/backends/naive.py; this file adds (each gain measured on the 2-core
development machine, interleaved A/B, in the commit named):
- conv2d in two routes instead of im2col's R*S copies of the input, chosen per call:
  shifted rows (copies along the kernel's width only, its rows as one stacked product)
  and channels-last im2col (copies of runs of C numbers instead of Q): 4x4/8x8 layers
  20-45% faster forward, 25-50% backward (e21ca93); a 1x1 kernel as one product per
  image on the NCHW arrays, no copies (bench ops 1x1: 1.28 ms, PyTorch 1.52; 6ebb227).
- conv2d backward at stride 1: dW from the copies of dy that dx, the flipped
  convolution, makes anyway (bench unet train step 1.94x -> 1.60-1.69x PyTorch, 7b22dd7;
  route 1 fwd+bwd 18% faster, 649ea12).
- conv2d over chunks of a few images whose copies stay in the cache, buffers refilled
  rather than made again, the chunks shared among the cores with the BLAS on one thread
  (bench ops conv2d 1.9-2.5x PyTorch -> 1.4-1.9x, 14f941c); images moved to and from
  channels-last a block of channels at a time (the copy 4x faster at 32x32, 680621e);
  the strided backward's dcols in a buffer dW is done with (1,832 -> 10 page faults a
  call, 10.0 -> 5.3 ms, 0f8b481).
- group norm: one-pass sums (einsum), in-place passes, per-channel factors folded, and a
  backward as PyTorch's CPU kernel writes it, dx = c1 dy + c2 x + c3 with xhat never made
  (0.86-0.99x the time, d85c25e); big batches shared among the cores (bench ops group
  norm 4.0-5.4x PyTorch -> 3.5-3.7x, 9bbd2e4).
- attention in FlashAttention-style tiles on the thread pool, the scores made once per
  tile and changed in place, the scale applied to Q and the division to O, each tile
  shifted by its largest score rather than each row's (with the OpenBLAS spin time: a
  UNet train step 490 -> 330 ms, f12b1de); heads read where they lie and outputs laid out
  as the inputs (8x8 self-attention fwd+bwd 11.0 -> 8.2 ms, 8a85a79).
- matmul: products of 50 MFLOP and more shared among the cores by rows (5-9% of a UNet
  step on top of holding the BLAS to one thread, ad89de4).
- SiLU, GELU, GEGLU and layer norm block by block of rows, in place, on all cores above
  256K values (GELU at the UNet's gate: forward 2.42 -> 1.18-1.43 ms, 09e393d); GEGLU's
  gradient straight into the two halves of one array (fwd+bwd 53 -> 37 ms, 04ec654);
  Phi by the A&S 7.1.26 fit, 5 terms, where naive.py calls math.erfc per value, and the
  slope kept by the forward pass (a UNet train step 0.93x the time, 44c5fa8); layer norm's
  row means as BLAS products with ones.
The signatures are the backend contract's (minisd/backends/__init__.py); the tests hold
every function here to the naive ones (tests/test_fast_cpu.py).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np

from minisd.backends import cpu_settings
from minisd.backends.cpu_settings import blas_on_all_cores, blas_on_one_thread, on_all_cores

# ------------------------------------------------------------------------------------
# conv2d:  y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] xpad[n, c, p*st + r, q*st + s]
#          (xpad: x with pd zeros around each image)
# ------------------------------------------------------------------------------------
#
# Sizes: Stable Diffusion's UNet convolves 320 to 1,280 channels on 64x64 down to 8x8
# latents; minisd's small UNet and VAE, 32 to 128 channels on 32x32 down to 4x4.
#
# The textbook route is im2col: copy every receptive field into a row of a matrix of
# N*P*Q rows and R*S*C columns, then one matrix product with the (R*S*C, K) weights. On
# a CPU the copy is what costs: it writes R*S = 9 copies of the input, and writing
# memory is as slow as the multiplications. So minisd has two routes, each best where
# the other is weak, chosen per call by ``_row_shifts`` (and 1x1 kernels, which need no
# copies at all, take a shortcut: see conv2d_forward):
#
# 1. Shifted rows (stride 1, outputs taller than ROW_SHIFTS_FROM rows). Copy only S
#    times, along the kernel's width, and get the kernel's height for free. Unroll the
#    width:  xs[(c,s), (n,i,q)] = xpad[n, c, i, q + s],  i over all I = H + 2*pd padded
#    rows. Kernel row r of output row p reads padded row p + r, so with W_r = w[:, :, r, :]
#    as a (K, C*S) matrix,   y[n, :, p, q] = sum_r  W_r @ xs[:, (n, p + r, q)].
#    Stack the R matrices W_r into one (R*K, C*S) matrix, and a single product gives
#        Z[r, :, (n,i,q)] = W_r @ xs[:, (n,i,q)]   for every padded row i;
#    y is then the sum of R slices of Z, each shifted by r rows:
#        y[n,k,p,q] = sum_r Z[r, k, n, p + r, q].
#    Rows i >= P of Z are computed and never read: 2 of 34 rows at 32x32, 2 of 18 at
#    16x16.
#
# 2. Channels last (strides > 1, small outputs, and what route 1 cannot do). Plain
#    im2col, made cheap by moving the channels innermost first:
#        xcl[n, i, j, c] = xpad[n, c, i, j]           (one transposing copy)
#        cols[(n,p,q), (r,s,c)] = xcl[n, p*st + r, q*st + s, c]
#    Each of the R*S copies then moves runs of C contiguous numbers, where in the NCHW
#    layout it would move runs of Q: at 4x4 outputs that is 128 numbers a run instead of
#    4, and the copies run about ten times faster. A stride is just a step in the slice.
#        y = cols @ W^T (in channels-last order),   dW = dy (K, N*P*Q) @ cols,
#    and for strides > 1 dcols = dy^T @ W, which ``col2im``, the adjoint of the copies,
#    adds back onto the input's positions. At 8x8 outputs
#    route 1 would throw away 2 of every 10 rows it computes, and a stride would split
#    its rows by phase; here nothing is computed twice.
#
# The backward pass at stride 1. The gradient of a stride-1 convolution is itself a
# convolution: dX is dy convolved with the kernel flipped in (r, s) and C and K swapped,
# padded by R - 1 - pd (``_dx_is_a_conv``), so either route computes it as a forward
# pass. And the copies of dy that this takes (route 1's unrolled dy, route 2's columns
# of dy) are all the copies dW needs as well: the same products of dy with x, only with
# x moved into place once (R row-shifted copies, or one transposing copy) instead of
# unrolled itself. See _flipped_shifted_rows_backward and _flipped_columns_backward.
#
# Everything runs over a few images at a time (a chunk): the copies of one chunk stay
# in the CPU's cache, where the copies and the sums of Z's slices are several times
# faster than in main memory. It also bounds the memory a convolution takes beyond its
# input and output to about CONV_CHUNK_BYTES per core. The chunk's buffers are made
# once per run of chunks and refilled: fresh memory is slow too, as the operating system
# hands it out one zeroed page at a time.
#
# The cores share the chunks out (``_over_the_batch``), the way PyTorch splits a batch
# among its threads: each core takes a run of chunks and does all of their work, copies,
# products and sums alike, while NumPy's BLAS is held to one thread (threadpoolctl). Left
# to itself the BLAS would thread each product and leave the copies, about half of the
# time, on one core; and each of its products would have to gather its threads first,
# which small products feel. (On the 2-core development machine this took bench ops'
# convolutions from 1.9-2.5x PyTorch's time to 1.4-1.9x.) A batch with fewer chunks
# than cores (one big image) stays on the calling thread, and the BLAS threads its
# products as before.

CONV_CHUNK_BYTES = 4 << 20  # copies + products per chunk: between one core's L2 (1 MB) and the L3 (32 MB)
CONV_PARALLEL_BYTES = 1 << 20  # from this much chunk work per call on, the cores share the chunks
ROW_SHIFTS_FROM = 9  # output rows from which stride-1 convolutions take route 1


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _dx_is_a_conv(w_shape, stride: int, padding: int) -> bool:
    """The gradient of a stride-1 convolution is itself a convolution, of dy with the kernel
    flipped in (r, s) and C and K swapped, padded by R - 1 - padding; that padding must be
    >= 0, and square like conv2d's."""
    R, S = w_shape[2:]
    return stride == 1 and R == S and padding <= R - 1


def _row_shifts(x_shape, w_shape, stride: int, padding: int) -> bool:
    """Route 1 (shifted rows) or route 2 (channels last)? Route 1 computes dX as a
    convolution (``_dx_is_a_conv``) and pays for the rows it throws away only on tall
    outputs; a 1x1 kernel shifts nothing and takes it at any size."""
    R = w_shape[2]
    P = _out_size(x_shape[2], R, stride, padding)
    return _dx_is_a_conv(w_shape, stride, padding) and (P >= ROW_SHIFTS_FROM or R == 1)


def _chunk_runs(N: int, bytes_per_image: int):
    """(runs, parallel): the batch cut into chunks of about CONV_CHUNK_BYTES, as equal as they
    can be, in runs of consecutive chunks, one run per core when ``parallel``, else one run."""
    cores = cpu_settings.cores()
    count = min(N, max(1, -(-N * bytes_per_image // CONV_CHUNK_BYTES)))
    parallel = cores > 1 and N >= cores and N * bytes_per_image >= CONV_PARALLEL_BYTES
    if parallel:
        count = min(N, -(-count // cores) * cores)  # a whole number of chunks per core, where N allows
    step = -(-N // count)
    chunks = [slice(n, min(N, n + step)) for n in range(0, N, step)]
    if not parallel:
        return [chunks], False
    per_core = -(-len(chunks) // cores)
    return [chunks[i:i + per_core] for i in range(0, len(chunks), per_core)], True


def _over_the_batch(work, N: int, bytes_per_image: int) -> list:
    """[work(run of chunks)] over the batch: on all cores, the BLAS held to one thread, where
    the batch gives every core a chunk; otherwise one run on this thread, where the BLAS
    threads each product itself if the work is big. ``work`` keeps its own buffers, so runs
    share nothing."""
    runs, parallel = _chunk_runs(N, bytes_per_image)
    if not parallel:
        # fewer images than cores, or little work: where the work is big, the BLAS shares each product out
        big = N * bytes_per_image >= CONV_PARALLEL_BYTES
        with blas_on_all_cores() if big else contextlib.nullcontext():
            return [work(runs[0])]
    with blas_on_one_thread():
        return on_all_cores(work, runs)


# Products of at least this many multiply-adds (x2: FLOPs) are cut in two, or in as many parts
# as there are cores, one per pool thread. Measured on the UNet of `minisd bench unet`: cutting
# its 67 and 134 MFLOP products (the GEGLU feed-forward's) saved 5-9% of a step on top of
# holding the BLAS to one thread; cutting the 17 MFLOP ones (attention's projections) too cost
# 5-7%, more in passing the parts to the pool than the halves saved.
SHARED_PRODUCT_FLOPS = 50e6


def matmul(a, b):
    """a @ b (np.matmul's broadcasting), the big products shared among the cores by rows of the
    result (or by columns, where there are more of those): each core runs one part's product."""
    cores = cpu_settings.cores()
    if a.ndim < 2 or b.ndim < 2 or cores == 1:
        return np.matmul(a, b)
    (M, K), N = a.shape[-2:], b.shape[-1]
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if 2 * M * K * N * math.prod(batch) < SHARED_PRODUCT_FLOPS:
        return np.matmul(a, b)
    out = np.empty(batch + (M, N), dtype=np.result_type(a, b))
    by_rows = M >= N
    size = M if by_rows else N
    step = -(-size // cores)
    parts = [slice(i, min(size, i + step)) for i in range(0, size, step)]
    if by_rows:
        on_all_cores(lambda rows: np.matmul(a[..., rows, :], b, out=out[..., rows, :]), parts)
    else:
        on_all_cores(lambda cols: np.matmul(a, b[..., cols], out=out[..., cols]), parts)
    return out


def _added(parts):
    """parts[0] + parts[1] + ..., in that order, into a new array, each term added in place."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def _add_up(parts):
    """The sum of the runs' partial dW (None where dW was not asked for), in run order:
    the same numbers whatever order the cores finished in."""
    return None if parts[0] is None else _added(parts)


def conv2d_forward(x, w, b, stride: int, padding: int):
    """y (N, K, P, Q) = conv(x (N, C, H, W), w (K, C, R, S)) + b."""
    if _pointwise(w.shape, stride, padding):
        # A 1x1 convolution mixes channels pixel by pixel: y[n] = W (K, C) @ x[n] (C, H*W),
        # one product per image straight on the NCHW arrays, with no copies at all.
        N, C, H, W = x.shape
        K = w.shape[0]
        y = matmul(w.reshape(K, C), x.reshape(N, C, H * W))
        if b is not None:
            y += b.reshape(K, 1)
        return y.reshape(N, K, H, W)
    if _row_shifts(x.shape, w.shape, stride, padding):
        return _shifted_rows_forward(x, w, b, padding)
    return _channels_last_forward(x, w, b, stride, padding)


def conv2d_backward(dy, x, w, stride: int, padding: int, need_dx=True, need_dw=True, need_db=True):
    """(dx, dw, db) from dy (N, K, P, Q); None for the gradients not asked for.

    At stride 1, dx is the flipped convolution of dy (``_dx_is_a_conv``), and whichever
    route computes it makes copies of dy from which dW follows too, with x moved into
    place by one copy instead of copies of its own. Strides take route 2's col2im.
    """
    db = np.einsum("nkpq->k", dy) if need_db else None  # (3x faster than dy.sum(axis=(0, 2, 3)))
    if not (need_dx or need_dw):
        dx = dw = None
    elif _pointwise(w.shape, stride, padding):
        dx, dw = _pointwise_backward(dy, x, w, need_dx, need_dw)
    elif not _dx_is_a_conv(w.shape, stride, padding):
        dx, dw = _channels_last_backward(dy, x, w, stride, padding, need_dx, need_dw)
    else:
        w_flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, K, R, S)
        flipped_padding = w.shape[2] - 1 - padding
        route = _flipped_shifted_rows_backward if _row_shifts(dy.shape, w_flipped.shape, 1, flipped_padding) \
            else _flipped_columns_backward
        dx, dw = route(dy, x, w_flipped, flipped_padding, need_dx, need_dw)
    return dx, dw, db


def _pointwise(w_shape, stride: int, padding: int) -> bool:
    return tuple(w_shape[2:]) == (1, 1) and stride == 1 and padding == 0


def _pointwise_backward(dy, x, w, need_dx: bool, need_dw: bool):
    """(dx, dw) of the 1x1 convolution, products on the NCHW arrays as in its forward pass:
    dx[n] = W^T @ dy[n],  dW = sum_n dy[n] @ x[n]^T."""
    N, C = x.shape[:2]
    K = w.shape[0]
    dy3, x3 = dy.reshape(N, K, -1), x.reshape(N, C, -1)
    dx = matmul(w.reshape(K, C).T, dy3).reshape(x.shape) if need_dx else None
    dw = matmul(dy3, x3.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape) if need_dw else None
    return dx, dw


# --- route 1: shifted rows -------------------------------------------------------------


def unroll(x, S: int, padding: int, out=None):
    """xs (C, S, N, I, Q) with I = H + 2*padding:  xs[c, s, n, i, q] = xpad[n, c, i, q + s].

    ``out``: an xs from an earlier call with the same sizes, to fill again; the padding
    entries are never written, so they are still zero.
    """
    N, C, H, W = x.shape
    Q = _out_size(W, S, 1, padding)
    xs = np.zeros((C, S, N, H + 2 * padding, Q), dtype=x.dtype) if out is None else out[:, :, :N]
    xt = x.transpose(1, 0, 2, 3)
    for s in range(S):  # output column q reads input column q + s - padding, where that is inside
        lo, hi = max(0, padding - s), min(Q, W + padding - s)
        if lo < hi:  # (a kernel wider than the image leaves some s with no columns inside)
            xs[:, s, :, padding:padding + H, lo:hi] = xt[:, :, :, lo + s - padding:hi + s - padding]
    return xs


def _add_shifted_slices(Z, out, b=None):
    """out[n, k, p, q] = b[k] + sum_r Z[r, k, n, p + r, q]: kernel row r reads r rows further down."""
    R, P = Z.shape[0], out.shape[2]
    for r in range(R):
        term = Z[r, :, :, r:r + P].transpose(1, 0, 2, 3)
        if r == 0:
            np.copyto(out, term) if b is None else np.add(term, b.reshape(-1, 1, 1), out=out)
        else:
            out += term


def _shifted_rows_forward(x, w, b, padding: int):
    N = x.shape[0]
    K, C, R, S = w.shape
    P, Q, I = _out_size(x.shape[2], R, 1, padding), _out_size(x.shape[3], S, 1, padding), x.shape[2] + 2 * padding
    W = w.transpose(2, 0, 1, 3).reshape(R * K, C * S)  # the stacked W_r
    y = np.empty((N, K, P, Q), dtype=x.dtype)

    def work(chunks):
        xs = z = None  # buffers, made for the first chunk and refilled for the others
        for chunk in chunks:
            xs = unroll(x[chunk], S, padding, out=xs)
            n = xs.shape[2]
            z = np.empty(R * K * n * I * Q, dtype=x.dtype) if z is None else z
            Z = np.matmul(W, xs.reshape(C * S, -1), out=z[:R * K * n * I * Q].reshape(R * K, -1))
            _add_shifted_slices(Z.reshape(R, K, n, I, Q), y[chunk], b)

    _over_the_batch(work, N, (C * S + R * K) * I * Q * x.itemsize)
    return y


def _shifted_rows(a, R: int, I: int, out=None):
    """As (R, C, n*I*W) for a (n, C, H, W): As[r] is a laid out like xs's columns (n, i, w),
    moved r rows down: As[r, c, (n, i, w)] = a[n, c, i - r, w], zero where i - r is not a row
    of a (I >= H + R - 1). (``out``: an earlier As to refill; what is never written stays zero.)"""
    n, C, H, W = a.shape
    M = n * I * W
    As = np.zeros((R, C, M), dtype=a.dtype) if out is None else out
    As[0, :, :M].reshape(C, n, I, W)[:, :, :H] = a.transpose(1, 0, 2, 3)
    for r in range(1, R):  # r rows down is r*W columns on; rows H..I-1 of each image are zero
        As[r, :, r * W:M] = As[0, :, :M - r * W]
    return As


def _flipped_shifted_rows_backward(dy, x, w_flipped, padding: int, need_dx: bool, need_dw: bool):
    """(dx, dw) at stride 1 when dx, the flipped convolution of dy, takes route 1.

    dy unrolled, dys[(k,s), (n,i,w)] = dypad[n, k, i, w + s] over the I = H + R - 1 rows
    of dy padded by ``padding`` = R - 1 - pd, feeds both products:
        dx[n, c, h, w] = sum_r Z[r, c, n, h + r, w],   Z = Wf @ dys   (route 1 itself)
        dWf_r = Xs_r @ dys^T,   Xs_r[c, (n, i, w)] = x[n, c, i - r, w]   (x moved r rows
            down, all R of them one product as in the forward pass),
        dW[k, c, R-1-r, S-1-s] = dWf_r[c, (k, s)]
    since kernel row r of the flipped kernel meets x[h] at dy row h + r - padding, the row
    that x[h] meets through kernel row R-1-r in the forward pass.
    """
    N, C, H, W = x.shape
    _, K, R, S = w_flipped.shape
    I = dy.shape[2] + 2 * padding  # = H + R - 1
    Wf = w_flipped.transpose(2, 0, 1, 3).reshape(R * C, K * S)  # the stacked Wf_r
    dx = np.empty(x.shape, dtype=dy.dtype) if need_dx else None

    def work(chunks):
        dWf = np.zeros((R * C, K * S), dtype=x.dtype) if need_dw else None
        dys = z = Xs = None  # buffers, reused from chunk to chunk
        for chunk in chunks:
            dys = unroll(dy[chunk], S, padding, out=dys)
            n = dys.shape[2]
            D = dys.reshape(K * S, n * I * W)
            if need_dx:
                z = np.empty(R * C * n * I * W, dtype=dy.dtype) if z is None else z
                Z = np.matmul(Wf, D, out=z[:R * C * n * I * W].reshape(R * C, -1))
                _add_shifted_slices(Z.reshape(R, C, n, I, W), dx[chunk])
            if need_dw:
                Xs = _shifted_rows(x[chunk], R, I, out=Xs)
                dWf += Xs[:, :, :n * I * W].reshape(R * C, -1) @ D.T
        return dWf

    dWf = _add_up(_over_the_batch(work, N, (K * S + 2 * R * C) * I * W * x.itemsize))
    dw = dWf.reshape(R, C, K, S).transpose(2, 1, 0, 3)[:, :, ::-1, ::-1] if need_dw else None
    return dx, dw


# --- route 2: channels last ------------------------------------------------------------


def _channel_blocks(C: int, H: int, W: int):
    """Slices of channels for moving an image between NCHW and channels-last: a transposing
    copy runs fastest a block of about 32 KB (L1) of each image at a time (at 32x32, 8
    channels: 4x faster than the whole image at once; at 8x8 the whole image is one block)."""
    step = max(1, (8 << 10) // (H * W))
    return [slice(c, c + step) for c in range(0, C, step)]


def _channels_last(x, padding: int, out=None):
    """xcl (N, H + 2*padding, W + 2*padding, C): xcl[n, i, j, c] = xpad[n, c, i, j]
    (``out``: an earlier one to refill; its border is still zero)."""
    N, C, H, W = x.shape
    xcl = np.zeros((N, H + 2 * padding, W + 2 * padding, C), dtype=x.dtype) if out is None else out[:N]
    for cs in _channel_blocks(C, H, W):
        xcl[:, padding:padding + H, padding:padding + W, cs] = x[:, cs].transpose(0, 2, 3, 1)
    return xcl


def _windows(xcl, R: int, S: int, stride: int, P: int, Q: int):
    """For each kernel position (r, s): the view xcl[:, p*stride + r, q*stride + s] of shape (n, P, Q, C)."""
    for r, s in itertools.product(range(R), range(S)):
        yield r, s, xcl[:, r:r + stride * (P - 1) + 1:stride, s:s + stride * (Q - 1) + 1:stride]


def im2col(xcl, R: int, S: int, stride: int, P: int, Q: int, out=None):
    """cols (n, P, Q, R, S, C): cols[n, p, q, r, s, c] = xcl[n, p*stride + r, q*stride + s, c]."""
    n, C = xcl.shape[0], xcl.shape[3]
    cols = np.empty((n, P, Q, R, S, C), dtype=xcl.dtype) if out is None else out[:n]
    for r, s, window in _windows(xcl, R, S, stride, P, Q):
        cols[:, :, :, r, s] = window
    return cols


def col2im(dcols, dxcl, stride: int):
    """The adjoint of im2col: every dcols entry added onto the dxcl entry it was copied from."""
    _, P, Q, R, S, _ = dcols.shape
    dxcl[...] = 0
    for r, s, window in _windows(dxcl, R, S, stride, P, Q):
        window += dcols[:, :, :, r, s]
    return dxcl


def _channels_last_sizes(x, w, stride: int, padding: int):
    """(P, Q, bytes per image of a chunk's buffers: xcl, cols and the output or dy)."""
    K, C, R, S = w.shape
    H, W = x.shape[2] + 2 * padding, x.shape[3] + 2 * padding
    P, Q = _out_size(x.shape[2], R, stride, padding), _out_size(x.shape[3], S, stride, padding)
    return P, Q, (H * W * C + P * Q * (R * S * C + K)) * x.itemsize


def _weight_rows(w):
    """w (K, C, R, S) as the (K, R*S*C) matrix whose columns follow cols' (r, s, c) order."""
    K, C, R, S = w.shape
    return w.transpose(0, 2, 3, 1).reshape(K, R * S * C)


def _columns_times_weights(cols, Wm, out, b=None):
    """out (n, K, P, Q) = cols (n, P, Q, R*S*C) @ Wm^T (+ b), moved from channels-last to NCHW.
    (The product in channels-last order, (n*P*Q, K), runs ~20% faster than Wm @ cols^T.)"""
    n, K, P, Q = out.shape
    ycl = (cols.reshape(n * P * Q, -1) @ Wm.T).reshape(n, P, Q, K).transpose(0, 3, 1, 2)
    np.copyto(out, ycl) if b is None else np.add(ycl, b.reshape(K, 1, 1), out=out)


def _channels_last_forward(x, w, b, stride: int, padding: int):
    N = x.shape[0]
    K, C, R, S = w.shape
    P, Q, chunk_bytes = _channels_last_sizes(x, w, stride, padding)
    Wm = _weight_rows(w)
    y = np.empty((N, K, P, Q), dtype=x.dtype)

    def work(chunks):
        xcl = cols = None  # buffers, made for the first chunk and refilled for the others
        for chunk in chunks:
            xcl = _channels_last(x[chunk], padding, out=xcl)
            cols = im2col(xcl, R, S, stride, P, Q, out=cols)
            _columns_times_weights(cols, Wm, y[chunk], b)

    _over_the_batch(work, N, chunk_bytes)
    return y


def _channels_last_backward(dy, x, w, stride: int, padding: int, need_dx: bool, need_dw: bool):
    """(dx, dw) by route 2's columns of x where dx is no convolution of its own (strides, padding
    beyond R - 1, non-square kernels): dW = D @ cols, dx = col2im(D^T @ W)."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q, chunk_bytes = _channels_last_sizes(x, w, stride, padding)
    if need_dx:  # and dxcl, as big as xcl
        chunk_bytes += (H + 2 * padding) * (W + 2 * padding) * C * dy.itemsize
    Wm = _weight_rows(w) if need_dx else None
    dx = np.empty(x.shape, dtype=dy.dtype) if need_dx else None

    def work(chunks):
        dWm = np.zeros((K, R * S * C), dtype=w.dtype) if need_dw else None
        xcl = cols = dcols = dxcl = None  # buffers, reused from chunk to chunk
        for chunk in chunks:
            n = len(dy[chunk])
            D = np.ascontiguousarray(dy[chunk].transpose(1, 0, 2, 3)).reshape(K, n * P * Q)
            if need_dw:
                xcl = _channels_last(x[chunk], padding, out=xcl)
                cols = im2col(xcl, R, S, stride, P, Q, out=cols)
                dWm += D @ cols.reshape(n * P * Q, -1)
            if need_dx:
                # dcols goes into cols' buffer, which dW is done with. A fresh dcols per chunk,
                # made on a pool thread, came back from the system as new pages every call
                # (32x64x16x16, stride 2: 1,832 page faults, 10 ms for what takes 5.3)
                if dcols is None:
                    dtype = np.result_type(dy, Wm)
                    dcols = cols if cols is not None and cols.dtype == dtype else np.empty((n, P, Q, R, S, C), dtype)
                np.matmul(D.T, Wm, out=dcols[:n].reshape(n * P * Q, -1))
                if dxcl is None:
                    dxcl = np.empty((n, H + 2 * padding, W + 2 * padding, C), dtype=dy.dtype)
                col2im(dcols[:n], dxcl[:n], stride)
                for cs in _channel_blocks(C, H, W):
                    dx[chunk, cs] = dxcl[:n, padding:padding + H, padding:padding + W, cs].transpose(0, 3, 1, 2)
        return dWm

    dWm = _add_up(_over_the_batch(work, N, chunk_bytes))
    return dx, (dWm.reshape(K, R, S, C).transpose(0, 3, 1, 2) if need_dw else None)


def _flipped_columns_backward(dy, x, w_flipped, padding: int, need_dx: bool, need_dw: bool):
    """(dx, dw) at stride 1 when dx, the flipped convolution of dy, takes route 2.

    Its columns, cols[(n,h,w), (r,s,k)] = dypad[n, h + r, w + s, k] (dy padded by
    ``padding`` = R - 1 - pd), hold every product of dy that dW needs as well:
        dx  = cols @ Wf^T,      Wf[c, (r,s,k)] = w[k, c, R-1-r, S-1-s]   (w_flipped's rows)
        dWf = X @ cols,         X[c, (n,h,w)] = x[n, c, h, w]
        dW[k, c, r, s] = dWf[c, (R-1-r, S-1-s, k)]
    (output (h, w) of the flipped convolution reads dy at p = h - r + pd for kernel row
    R-1-r, exactly the p that x[h] meets in the forward pass through kernel row r). So x
    needs one transposing copy instead of columns of its own: a tenth of the copying.
    """
    N, C, H, W = x.shape
    _, K, R, S = w_flipped.shape
    Wf = _weight_rows(w_flipped)  # (C, R*S*K)
    _, _, chunk_bytes = _channels_last_sizes(dy, w_flipped, 1, padding)
    dx = np.empty(x.shape, dtype=dy.dtype) if need_dx else None

    def work(chunks):
        dWf = np.zeros((C, R * S * K), dtype=x.dtype) if need_dw else None
        dycl = cols = None  # buffers, reused from chunk to chunk
        for chunk in chunks:
            dycl = _channels_last(dy[chunk], padding, out=dycl)
            cols = im2col(dycl, R, S, 1, H, W, out=cols)
            if need_dx:
                _columns_times_weights(cols, Wf, dx[chunk])
            if need_dw:
                n = cols.shape[0]
                X = np.ascontiguousarray(x[chunk].transpose(1, 0, 2, 3)).reshape(C, n * H * W)
                dWf += X @ cols.reshape(n * H * W, R * S * K)
        return dWf

    dWf = _add_up(_over_the_batch(work, N, chunk_bytes + C * H * W * x.itemsize))
    dw = dWf.reshape(C, R, S, K)[:, ::-1, ::-1].transpose(3, 0, 1, 2) if need_dw else None
    return dx, dw


# ------------------------------------------------------------------------------------
# group norm: per sample n and group g of C/G channels, over M = (C/G)*H*W values
#   mu = mean(x),  var = mean((x - mu)^2),  rstd = 1/sqrt(var + eps)
#   xhat = (x - mu) * rstd,   y = xhat * gamma[c] + beta[c]
# ------------------------------------------------------------------------------------
#
# Group norm is a handful of passes over memory, so the work is in making few of them.
# Sums over the M values of a row take one pass each (einsum, for sums and for sums of
# products), and every elementwise step writes in place.
# Per-channel factors are folded together first, so that y is one multiply and one add
# over the data, and dx an affine map of dy and x.


def _row_sums(a):
    """sum over the last axis, in one pass (einsum's loop is faster here than a.sum(-1)'s)."""
    return np.einsum("...i->...", a)


def _row_dots(a, b):
    """sum over the last axis of a * b, in one pass with no a * b temporary (einsum: as fast as
    batched BLAS dot products on long rows, 3x faster on rows as short as a 4x4 image's)."""
    return np.einsum("...i,...i->...", a, b)


GROUP_NORM_SHARED = 1 << 18  # from this many values on, group norm shares the batch among the cores


def _samples_per_core(x):
    """Slices of the batch, one per core, where x is big enough that sharing it out pays;
    else the whole batch as one slice. (Every NumPy pass hands Python's lock between the
    threads; below GROUP_NORM_SHARED values that costs more than the cores save.)"""
    N, cores = x.shape[0], cpu_settings.cores()
    if cores == 1 or N == 1 or x.size < GROUP_NORM_SHARED:
        return [slice(0, N)]
    step = -(-N // min(cores, N))
    return [slice(n, min(N, n + step)) for n in range(0, N, step)]


def group_norm_forward(x, num_groups: int, weight, bias, eps: float):
    """(y, mean, rstd); mean and rstd have shape (N, G). Samples are independent: big
    batches are shared out among the cores, a slice of samples each."""
    N, C = x.shape[:2]
    G, M = num_groups, x.size // (N * num_groups)
    y = np.empty(x.shape, dtype=x.dtype)
    mean, rstd = np.empty((N, G), dtype=x.dtype), np.empty((N, G), dtype=x.dtype)

    def normalise(sl):
        xg = x[sl].reshape(-1, G, M)
        n = xg.shape[0]
        mean[sl] = _row_sums(xg) / M
        centred = np.subtract(xg, mean[sl, :, None], out=y[sl].reshape(n, G, M))
        var = _row_dots(centred, centred) / M  # two passes (mean first): no cancellation
        rstd[sl] = 1.0 / np.sqrt(var + np.asarray(eps, dtype=var.dtype))
        # y = centred * (rstd * gamma) + beta, with one factor per (n, c): viewed as
        # (n, G, C/G, H*W), the per-group and per-channel factors broadcast
        scale = np.broadcast_to(rstd[sl, :, None], (n, G, C // G)).copy()
        if weight is not None:
            scale *= weight.reshape(G, C // G)
        y4 = centred.reshape(n, G, C // G, -1)
        y4 *= scale[..., None]
        if bias is not None:
            y4 += bias.reshape(G, C // G, 1)

    on_all_cores(normalise, _samples_per_core(x))
    return y, mean, rstd


def group_norm_backward(dy, x, num_groups: int, weight, mean, rstd):
    """(dx, dweight, dbias). With g = dy * gamma:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).

    Both means are over a group, and both come from two per-channel sums over H*W,
    s1 = sum dy and s2 = sum dy * x (which also give dbias and dweight), since
    sum dy * xhat = rstd * (s2 - mu * s1). Written out in x rather than xhat, dx is
    an affine map of dy and x, as in PyTorch's CPU kernel:
        dx = c1 dy + c2 x + c3,   c1 = rstd gamma[c],   c2 = -rstd^2 mean(g xhat),
                                  c3 = -c2 mu - rstd mean(g),
    with c1 per (n, c) and c2, c3 per (n, g): two passes for the sums and four for dx,
    xhat never made. As in the forward pass, big batches are shared out among the cores.
    """
    N, C = x.shape[:2]
    G, M = num_groups, x.size // (N * num_groups)
    gamma = np.ones((G, C // G), dtype=x.dtype) if weight is None else weight.reshape(G, C // G)
    dx = np.empty(x.shape, dtype=np.result_type(dy, x))  # C order, whatever dy's layout
    sum_dy = np.empty((N, G, C // G), dtype=dx.dtype)  # per sample and channel
    sum_dy_xhat = np.empty((N, G, C // G), dtype=dx.dtype)

    def backward(sl):
        n, mu, r = len(dx[sl]), mean[sl], rstd[sl]  # (n, G)
        dy4, x4 = dy[sl].reshape(n, G, C // G, -1), x[sl].reshape(n, G, C // G, -1)
        sum_dy[sl] = _row_sums(dy4)
        sum_dy_xhat[sl] = (_row_dots(dy4, x4) - mu[..., None] * sum_dy[sl]) * r[..., None]
        mean_g = _row_sums(sum_dy[sl] * gamma) / M  # (n, G)
        mean_gx = _row_sums(sum_dy_xhat[sl] * gamma) / M
        c2 = -(r * r) * mean_gx
        c3 = -c2 * mu - r * mean_g
        dxg = dx[sl].reshape(n, G, M)
        np.multiply(dy4, (gamma * r[..., None])[..., None], out=dxg.reshape(dy4.shape))
        affine_x = np.multiply(x[sl].reshape(n, G, M), c2[..., None])
        affine_x += c3[..., None]
        dxg += affine_x

    on_all_cores(backward, _samples_per_core(x))
    dweight = sum_dy_xhat.sum(axis=0).reshape(C) if weight is not None else None
    dbias = sum_dy.sum(axis=0).reshape(C) if weight is not None else None
    return dx, dweight, dbias


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
#
# Softmax subtracts a shift m before exp so that nothing overflows; any m >= max_j S_ij
# gives the same P. The row maxima cost more than the exp (NumPy reduces short rows
# slowly: 64 keys a row), so each tile is shifted by the largest score of each of its
# (batch, head) pairs, one fast reduction over contiguous memory. A row whose own scores
# all lie far below that shift would underflow (sum exp(S - m) below ``_exp_floor``); a
# tile with such a row is redone with the exact row maxima. (Causal attention keeps row
# maxima: there a row's numbers must not depend, even in rounding, on later keys.)
MAX_SCORES_IN_MEMORY = 1 << 22  # 16 MB of float32 scores per tile at most
SCORES_IN_CACHE = 1 << 18  # 1 MB: the tile size when the products are small
BLAS_SMALL = 1 << 17
MIN_QUERY_BLOCK = 16  # fewer rows make inefficient products: then let the BLAS thread them


def _exp_floor(dtype) -> float:
    """Row sums of exp(S - m) below this mean the row's largest entry is so small that
    its neighbours may already be subnormal: tiny**0.7 is e^-61 in float32, e^-496 in float64."""
    return float(np.finfo(dtype).tiny) ** 0.7


def _causal_bias(Lq: int, Lk: int, dtype):
    """0 where key j may be seen by query i, -inf where not (torch's top-left alignment: j > i)."""
    return np.triu(np.full((Lq, Lk), -np.inf, dtype=dtype), k=1)


def _tiles(B: int, H: int, Lq: int, Lk: int, d: int):
    """(tiles of (batch, head) pairs, slices of the query rows, whether the tiles' products
    are small enough to run on the calling thread, so that the tiles can share out the cores).

    A tile is a (batch slice, head slice) pair, which indexes (B, H, L, d) arrays of any
    layout: a few samples with all their heads, or, where fewer pairs fit in a tile than
    a sample has heads, a run of one sample's heads.
    """
    block = BLAS_SMALL // (Lk * d)
    small = block >= MIN_QUERY_BLOCK
    scores = min(SCORES_IN_CACHE, MAX_SCORES_IN_MEMORY) if small else MAX_SCORES_IN_MEMORY
    if not small:  # long keys (64x64 latents): big products, which the BLAS shares out itself
        block = max(1, scores // Lk)
    block = min(Lq, block)
    pairs = max(1, scores // (block * Lk))
    if pairs >= H:
        step = pairs // H
        tiles = [(slice(b, min(B, b + step)), slice(0, H)) for b in range(0, B, step)]
    else:
        tiles = [(slice(b, b + 1), slice(h, min(H, h + pairs))) for b in range(B) for h in range(0, H, pairs)]
    return tiles, [slice(i, min(Lq, i + block)) for i in range(0, Lq, block)], small


def _laid_out_as(a, L: int, d: int, zeros=False):
    """A new (B, H, L, d) array in a's layout: where a is heads split out of tokens (a view
    of a (B, L', H, d') array), a view of a new (B, L, H, d) array, so that joining its heads
    back into tokens (a transpose and a reshape) copies nothing; else plain (B, H, L, d)."""
    B, H = a.shape[:2]
    make = np.zeros if zeros else np.empty
    if a.transpose(0, 2, 1, 3).flags.c_contiguous and not a.flags.c_contiguous:
        return make((B, L, H, d), dtype=a.dtype).transpose(0, 2, 1, 3)
    return make((B, H, L, d), dtype=a.dtype)


def _run_tiles(tile, tiles, small: bool) -> None:
    """tile(t) for every tile: shared among the cores where the products are small; else
    (long keys) one after another, each big product shared out by the BLAS itself."""
    if small:
        on_all_cores(tile, tiles)
    else:
        with blas_on_all_cores():
            on_all_cores(tile, tiles, parallel=False)


def attention_forward(q, k, v, scale: float, is_causal: bool):
    """(o, lse): o (B, H, Lq, dv), lse (B, H, Lq).

    q, k and v may be views of any layout, such as heads split out of tokens (B, L, H*d):
    the products read them where they lie (the BLAS takes a row stride), and o is laid out
    as q is (``_laid_out_as``).
    """
    B, H, Lq, d = q.shape
    Lk, dv = k.shape[2], v.shape[3]
    bias = _causal_bias(Lq, Lk, q.dtype) if is_causal else None
    q = q * np.asarray(scale, dtype=q.dtype)  # (an elementwise result keeps q's layout)
    kT = k.swapaxes(-1, -2)
    o = _laid_out_as(q, Lq, dv)
    lse = np.empty((B, H, Lq), dtype=q.dtype)
    tiles, blocks, small = _tiles(B, H, Lq, Lk, max(d, dv))
    floor = _exp_floor(q.dtype)
    # The second pass runs only if a row underflowed. A causal mask takes each row's own
    # maximum at once: a shared shift would let later keys change earlier rows' rounding.
    shifts = (True,) if is_causal else (False, True)

    def tile(pairs):
        b, h = pairs
        buffer = np.empty(q[b, h].shape[:2] + (blocks[0].stop, Lk), dtype=q.dtype)  # refilled by every block
        for qb in blocks:
            for shift_by_rows in shifts:
                p = np.matmul(q[b, h, qb], kT[b, h], out=buffer[:, :, :qb.stop - qb.start])  # S for this tile
                if bias is not None:
                    p += bias[qb]
                m = p.max(axis=-1 if shift_by_rows else (-2, -1), keepdims=True)
                p -= m
                np.exp(p, out=p)  # p = exp(S - m): unnormalised probabilities
                total = _row_sums(p)[..., None]
                if shift_by_rows or total.min() >= floor:
                    break
            out = o[b, h, qb]
            np.matmul(p, v[b, h], out=out)
            out /= total
            lse[b, h, qb] = (m + np.log(total))[..., 0]

    _run_tiles(tile, tiles, small)
    return o, lse


def attention_backward(do, q, k, v, o, lse, scale: float, is_causal: bool):
    """(dq, dk, dv), recomputing P from lse rather than keeping it from the forward pass.
    Inputs of any layout, as in the forward pass; each gradient is laid out as its input."""
    B, H, Lq, d = q.shape
    Lk, dv_width = k.shape[2], v.shape[3]
    scale = np.asarray(scale, dtype=q.dtype)
    bias = _causal_bias(Lq, Lk, q.dtype) if is_causal else None
    q_scaled, k_scaled = q * scale, k * scale
    kT, vT = k.swapaxes(-1, -2), v.swapaxes(-1, -2)
    lse = lse[..., None]
    D = np.einsum("bhid,bhid->bhi", do, o)[..., None]  # D_i = sum_j dO_ij O_ij  (= sum_j P_ij dP_ij)
    dq = _laid_out_as(q, Lq, d)
    dk, dv = _laid_out_as(k, Lk, d, zeros=True), _laid_out_as(v, Lk, dv_width, zeros=True)
    tiles, blocks, small = _tiles(B, H, Lq, Lk, max(d, dv_width))

    def tile(pairs):
        b, h = pairs
        p_buffer, ds_buffer = (np.empty(q[b, h].shape[:2] + (blocks[0].stop, Lk), dtype=q.dtype) for _ in range(2))
        for qb in blocks:
            rows = qb.stop - qb.start
            p = np.matmul(q_scaled[b, h, qb], kT[b, h], out=p_buffer[:, :, :rows])
            if bias is not None:
                p += bias[qb]
            p -= lse[b, h, qb]
            np.exp(p, out=p)  # P
            dv[b, h] += p.swapaxes(-1, -2) @ do[b, h, qb]
            ds = np.matmul(do[b, h, qb], vT[b, h], out=ds_buffer[:, :, :rows])  # dP
            ds -= D[b, h, qb]
            ds *= p  # dS = P * (dP - D)
            np.matmul(ds, k_scaled[b, h], out=dq[b, h, qb])
            dk[b, h] += ds.swapaxes(-1, -2) @ q_scaled[b, h, qb]

    _run_tiles(tile, tiles, small)
    return dq, dk, dv


# ------------------------------------------------------------------------------------
# SiLU, GELU, GEGLU and layer norm: the formulas of naive.py, block by block in place
# ------------------------------------------------------------------------------------
#
# Long elementwise chains (GELU's Phi is some 20 NumPy passes) run on all cores: each
# core takes a block of rows and runs the whole chain on it (NumPy's loops release the
# GIL). Blocks are big on purpose: every pass is a GIL hand-off between the threads, which
# costs far more than the pass itself on a small block, and on the development machine a
# pass over an L2-sized block is no faster per element than one over the whole array (the
# loops are bound by arithmetic, not memory). Blocks of at most _BLOCK elements still bound
# the temporaries of a huge array.

_BLOCK = 1 << 18  # elements per block at most: 1 MiB per float32 temporary
_THREADED = 1 << 18  # from this many elements on, the cores share the blocks (a hand-off costs ~0.1 ms)


def _blockwise(fn, *arrays):
    """fn(*blocks) for consecutive blocks of rows (axis 0) of NumPy arrays with the same number of rows.

    fn reads its inputs' blocks and writes its results into the blocks of the output
    arrays, which the caller allocates and passes among ``arrays``. An array given as None
    (an output not wanted this time) reaches fn as None.
    """
    rows, size = len(arrays[0]), arrays[0].size
    if size <= _BLOCK and size < _THREADED:  # one block: skip the bookkeeping (small arrays are common)
        return fn(*arrays)
    cores = cpu_settings.cores()
    threaded = size >= _THREADED and cores > 1
    parts = -(-size // _BLOCK) or 1
    if threaded:
        parts = -(-parts // cores) * cores  # a whole number of blocks per core
    step = -(-rows // parts) or 1  # rows per block
    blocks = [slice(start, start + step) for start in range(0, rows, step)]

    def run(span):
        for block in span:
            fn(*(None if a is None else a[block] for a in arrays))

    if not threaded or len(blocks) == 1:
        return run(blocks)
    per_core = -(-len(blocks) // cores)  # each core takes a run of consecutive blocks
    on_all_cores(run, [blocks[i:i + per_core] for i in range(0, len(blocks), per_core)])


def _rows(a, row_size):
    """a as (rows, row_size): a view where the layout allows (e.g. the gate half of GEGLU's projection), else a copy."""
    return a.reshape(-1, row_size)


def _empty_rows(a, row_size):
    return np.empty((a.size // row_size, row_size), dtype=a.dtype)


def _row_size(a) -> int:
    """Blocks are made of whole rows of the last axis, so views strided along the others need no copy."""
    return a.shape[-1] if a.ndim and a.shape[-1] else 1


def silu_forward(a, beta: float):
    """(y, s): y = a * s, s = sigmoid(beta * a) = (1 + tanh(beta a / 2)) / 2, block by block."""
    beta = a.dtype.type(beta)

    def block(a, s, y):
        half = a.dtype.type(0.5)
        np.multiply(a, half * beta, out=s)
        np.tanh(s, out=s)
        s *= half
        s += half
        np.multiply(a, s, out=y)

    n = _row_size(a)
    s, y = _empty_rows(a, n), _empty_rows(a, n)
    _blockwise(block, _rows(a, n), s, y)
    return y.reshape(a.shape), s.reshape(a.shape)


def silu_backward(g, y, s, beta: float):
    """da = g * (s + beta * y * (1 - s)), block by block."""
    beta = g.dtype.type(beta)

    def block(g, s, y, da):
        np.subtract(1, s, out=da)
        da *= y
        if beta != 1:
            da *= beta
        da += s
        da *= g

    n = _row_size(g)
    da = _empty_rows(g, n)
    _blockwise(block, _rows(g, n), _rows(s, n), _rows(y, n), da)
    return da.reshape(g.shape)


# Phi on NumPy arrays. NumPy has no erf, so Phi comes from a fit: Abramowitz & Stegun
# 7.1.26, the formula PyTorch's own vectorised CPU erf uses (and so its GELU):
#     erfc(z) ~ t (a1 + a2 t + a3 t^2 + a4 t^3 + a5 t^4) exp(-z^2),  t = 1 / (1 + p z),  z >= 0,
# with an absolute error below 1.5e-7, float32's own resolution near 1. Written for
# Phi(-|x|) = erfc(|x| / sqrt 2) / 2, it gives Phi(x) = 1 - Phi(-|x|) for x >= 0 and
# Phi(-|x|) itself for x < 0, never 1 minus something close to 1, so the far left tail
# keeps its relative accuracy (a few percent, where 1 + erf(x / sqrt 2) would round to 0).
# Five terms make some 20 NumPy passes, where a ten-term fit made 36 (and naive.py's
# exact erfc, one Python call per value, is some 15x slower per value).
# float64 is minisd's precision for checking (finite differences, parity with PyTorch's
# float64), where a 1.5e-7 fit would be the largest error in sight: there Phi(-|x|) comes
# from Python's own erfc, exact to the last bit.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_erfc_exact = np.frompyfunc(math.erfc, 1, 1)


def _left_tail(a, gauss):
    """Phi(-|a|) = erfc(|a| / sqrt 2) / 2 (a new array), given gauss = exp(-a^2 / 2):
    the fit above, or for float64 exact."""
    f = a.dtype.type
    if a.dtype == np.float64:
        return _erfc_exact(np.abs(a) * f(1 / math.sqrt(2))).astype(np.float64) * f(0.5)
    t = np.abs(a)
    t *= f(_AS_P / math.sqrt(2))
    t += f(1)
    np.divide(f(1), t, out=t)
    tail = np.multiply(t, f(_AS_A[-1] / 2))  # Horner's rule; the /2 of erfc / 2 folded in
    for coefficient in _AS_A[-2::-1]:
        tail += f(coefficient / 2)
        tail *= t
    tail *= gauss
    return tail


def _phi_block(a, cdf, scratch, slope=None):
    """cdf = Phi(a) and, where asked, slope = Phi(a) + a * pdf(a), on one block; scratch: a's size."""
    f = a.dtype.type
    gauss = np.multiply(a, f(-0.5), out=scratch)  # exp(-a^2 / 2)
    gauss *= a
    np.exp(gauss, out=gauss)
    if slope is not None:
        np.multiply(gauss, a, out=slope)
        slope *= f(1 / math.sqrt(2 * math.pi))  # a * pdf(a)
    tail = _left_tail(a, gauss)
    # cdf = tail where a < 0, else 1 - tail, as tail + [a >= 0] (1 - 2 tail): exact where a < 0.
    # (np.where and masked copies run 10-20x slower per value than arithmetic on random signs.)
    np.multiply(tail, f(-2), out=cdf)
    cdf += f(1)
    cdf *= np.greater_equal(a, 0, out=scratch)
    cdf += tail
    if slope is not None:
        slope += cdf


def _gelu_block(a, out, cdf, slope=None):
    """out = GELU(a) = a * Phi(a), cdf = Phi(a) and, where asked, slope = GELU'(a), on one block."""
    _phi_block(a, cdf, out, slope)
    np.multiply(a, cdf, out=out)


def gelu_forward(a, keep_slope: bool):
    """(a * Phi(a), Phi(a) + a * pdf(a) or None), block by block."""
    n = _row_size(a)
    out, cdf = _empty_rows(a, n), _empty_rows(a, n)
    slope = _empty_rows(a, n) if keep_slope else None
    _blockwise(_gelu_block, _rows(a, n), out, cdf, slope)
    return out.reshape(a.shape), None if slope is None else slope.reshape(a.shape)


def geglu_forward(x, keep_slope: bool):
    """(h * GELU(g), GELU(g), GELU'(g) or None) for [h, g] = x, block by block (h and g read in place)."""
    d = x.shape[-1] // 2
    h, g = x[..., :d], x[..., d:]

    def block(h, g, gelu_g, cdf, out, slope):
        _gelu_block(g, gelu_g, cdf, slope)
        np.multiply(h, gelu_g, out=out)

    gelu_g, cdf, out = (_empty_rows(g, d) for _ in range(3))
    slope = _empty_rows(g, d) if keep_slope else None
    _blockwise(block, _rows(h, d), _rows(g, d), gelu_g, cdf, out, slope)
    return out.reshape(h.shape), gelu_g.reshape(h.shape), None if slope is None else slope.reshape(h.shape)


def geglu_backward(grad, h, gelu_g, slope):
    """dx = [grad * GELU(g), grad * h * GELU'(g)], written into the two halves of one array."""
    d = h.shape[-1]

    def block(grad, h, gelu_g, slope, dh, dg):
        np.multiply(grad, h, out=dg)
        dg *= slope
        np.multiply(grad, gelu_g, out=dh)

    dx = np.empty(h.shape[:-1] + (2 * d,), dtype=grad.dtype)
    _blockwise(block, _rows(grad, d), _rows(h, d), _rows(gelu_g, d), _rows(slope, d),
               _rows(dx[..., :d], d), _rows(dx[..., d:], d))
    return dx


# Layer norm: rows normalised block by block, and the per-row means as matrix-vector
# products with a vector of ones: BLAS, several times faster than .mean(axis=-1) over rows
# as short as the UNet's 64 features.


def _row_means(a):
    """The mean of each row of a 2-D NumPy array, as a product with a vector of ones (BLAS)."""
    return (a @ np.ones(a.shape[1], dtype=a.dtype)) / a.dtype.type(a.shape[1])


def _column_sums(a):
    """The sum over the rows of a 2-D array, as one BLAS product with a vector of ones."""
    return np.ones(len(a), dtype=a.dtype) @ a


def layer_norm_forward(x, normalized_ndim: int, weight, bias, eps: float):
    """(y, xhat, rstd) as naive.layer_norm_forward, block by block of rows."""
    n = math.prod(x.shape[x.ndim - normalized_ndim:])
    eps = x.dtype.type(eps)
    rows = _rows(x, n)
    xhat, y, rstd = _empty_rows(x, n), _empty_rows(x, n), np.empty(len(rows), dtype=x.dtype)

    def normalise(x, xhat, y, rstd):
        np.subtract(x, _row_means(x)[:, None], out=xhat)
        var = _row_means(np.multiply(xhat, xhat, out=y))  # y is scratch until the end
        np.divide(1, np.sqrt(var + eps, out=rstd), out=rstd)
        xhat *= rstd[:, None]
        if weight is None:
            y[...] = xhat
        else:
            np.multiply(xhat, weight.reshape(n), out=y)
            y += bias.reshape(n)

    _blockwise(normalise, rows, xhat, y, rstd)
    return y.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape(x.shape[:x.ndim - normalized_ndim])


def layer_norm_backward(dy, xhat, rstd, weight, need_dx: bool, need_dweight: bool, need_dbias: bool):
    """(dx, dweight, dbias) as naive.layer_norm_backward, dx block by block of rows."""
    n = math.prod(xhat.shape[rstd.ndim:])
    dy2, xhat = _rows(dy, n), _rows(xhat, n)
    w = weight.reshape(n) if weight is not None else None
    dweight = _column_sums(dy2 * xhat).reshape(weight.shape) if weight is not None and need_dweight else None
    dbias = _column_sums(dy2).reshape(weight.shape) if weight is not None and need_dbias else None
    if not need_dx:
        return None, dweight, dbias

    def rows_dx(dy, xhat, rstd, dx):
        g = dy * w if w is not None else dy
        mean_gx = _row_means(np.multiply(g, xhat, out=dx))  # dx is scratch until the end
        np.subtract(g, _row_means(g)[:, None], out=dx)
        dx -= xhat * mean_gx[:, None]
        dx *= rstd[:, None]

    dx = _empty_rows(dy, n)
    _blockwise(rows_dx, dy2, xhat, rstd.reshape(-1), dx)
    return dx.reshape(dy.shape), dweight, dbias
