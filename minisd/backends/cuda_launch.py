"""How each CUDA kernel is launched: the grid, the block and the shared memory, per op and version.

Read this beside kernels/*.cu: every launch below is ``kernel(grid, block, args, shared_mem)``,
``grid`` blocks of ``block`` threads each (ceil_div: cdiv), the same on a GPU (CuPy) and on
the CPU emulator (the toolchain, minisd/backends/cuda_build.py, compiles and loads them).
Version 1 is the simple kernel, version 2 the fast one (MINISD_KERNEL_VERSION=1|2, default 2):

    op, kernel                          version 1                        version 2
    ---------------------------------   ------------------------------   -----------------------------------------
    conv2d forward, dx, dW              a thread per output element:     implicit GEMM, a block per 64x64 tile of
                                        cdiv(size, 256) x 256            the output matrix: (cdiv(K, 64),
                                                                         cdiv(N*P*Q, 64)) x 256 (dx: C by N*H*W;
                                                                         dW: C*R*S by K)
    conv2d db                           a thread per channel:            a block per channel, threads striding
                                        cdiv(K, 64) x 64                 over N*P*Q: K x reduce_threads(N*P*Q)
    group norm forward, dx              a thread per (n, group):         a block per (n, group): N*G x
                                        cdiv(N*G, 64) x 64               reduce_threads(C/G * H*W)
    group norm dgamma, dbeta            a thread per channel:            a block per channel: C x
                                        cdiv(C, 64) x 64                 reduce_threads(N * H*W)
    attention forward                   S = s Q K^T and O = P V as       flash: a block per 64 (or fewer) query
                                        batched matmuls, a thread per    rows of one (batch, head), a thread per
                                        output: (cdiv(M*N, 256), B*H)    row: (cdiv(Lq, 64), B*H) x 64, K/V tiles
                                        x 256; softmax a warp per row:   in up to 48 KiB of dynamic shared memory
                                        cdiv(rows, 4) x 128              (flash_tiles)
    attention backward                  the same matmuls, and a warp     D = rowsum(dO * O) a warp per row; dK, dV
                                        per row for dS = P (dP - D)      a block per key tile; dQ a block per
                                                                         query tile, each with its shared memory

Shapes are checked here, before any launch (a kernel checks nothing), with one line
saying what is wrong; outputs are allocated here, in float32.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from minisd.backends import cuda_build, naive
from minisd.backends.cuda_build import MAX_SHARED_BYTES, find_cupy, program

VERSIONS = (1, 2)
CONV_TILE = 64  # the output tile of conv2d.cu's version 2 (its TILE), which sets the grid


def _env_version() -> int:
    value = os.environ.get("MINISD_KERNEL_VERSION", "2")
    if value not in ("1", "2"):
        raise ValueError(f"MINISD_KERNEL_VERSION must be 1 or 2, not {value!r}")
    return int(value)


current_version = _env_version()  # change it with set_version or settings()


def set_version(version: int) -> None:
    """Run kernel version ``version`` (1: simple, 2: fast) from now on."""
    global current_version
    if version not in VERSIONS:
        raise ValueError(f"kernel version must be one of {VERSIONS}, not {version!r}")
    current_version = version


@contextlib.contextmanager
def settings(version: int | None = None, order: str | None = None, seed: int = 0):
    """Temporarily use another kernel version and/or emulator run order (tests use this)."""
    saved = (current_version, cuda_build.current_order, cuda_build.current_seed)
    try:
        if version is not None:
            set_version(version)
        if order is not None:
            cuda_build.set_run_order(order, seed)
        yield
    finally:
        set_version(saved[0])
        cuda_build.set_run_order(saved[1], saved[2])


# ------------------------------------------------------------------------------------
# the six kernel ops: shapes checked, outputs allocated, grid/block/shared memory computed
# ------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def flash_tiles(d: int, shared_floats) -> tuple[int, int, int]:
    """(threads, tile, shared bytes) for a flash kernel: the largest tiles that fit in 48 KiB.

    A block has ``threads`` rows (one per thread) and walks the other side in tiles of ``tile``
    rows; ``shared_floats(threads, tile)`` is the layout in the kernel's head comment."""
    for threads, tile in ((64, 32), (32, 32), (32, 16), (32, 8), (16, 16), (16, 8), (8, 8)):
        if 4 * shared_floats(threads, tile) <= MAX_SHARED_BYTES:
            return threads, tile, 4 * shared_floats(threads, tile)
    raise ValueError(f"attention head dims around {d} are too large for the flash kernels' 48 KiB of shared "
                     "memory; kernel version 1 (MINISD_KERNEL_VERSION=1) has no such limit")


def reduce_threads(m: int) -> int:
    """Threads for a block that reduces m values: about 4 values each, one warp to 256 threads."""
    return min(256, max(32, 32 * cdiv(cdiv(m, 4), 32)))


class KernelOps:
    """The backend contract's functions (minisd/backends/__init__.py) on one runtime ("emulated"
    or "cupy"): conv2d, group norm and attention by the kernels; the rest (matmul, SiLU,
    GELU, GEGLU, layer norm: no kernels of minisd's own) as the naive backend's whole-array
    expressions, each one CuPy kernel over everything on a GPU."""

    matmul = staticmethod(naive.matmul)
    silu_forward, silu_backward = staticmethod(naive.silu_forward), staticmethod(naive.silu_backward)
    gelu_forward = staticmethod(naive.gelu_forward)
    geglu_forward, geglu_backward = staticmethod(naive.geglu_forward), staticmethod(naive.geglu_backward)
    layer_norm_forward = staticmethod(naive.layer_norm_forward)
    layer_norm_backward = staticmethod(naive.layer_norm_backward)

    def __init__(self, runtime: str):
        self.runtime = runtime
        self.program = program(runtime)
        self.xp = find_cupy() if runtime == "cupy" else np

    def _f32(self, a):
        """A C-contiguous float32 array on this runtime (a copy only where needed); None stays None."""
        return None if a is None else self.xp.ascontiguousarray(self.xp.asarray(a, dtype=self.xp.float32))

    def _launch(self, kernel: str, grid, block, args, shared_mem: int = 0):
        """Launch ``kernel``; a grid with no blocks (an empty batch) has nothing to compute."""
        if all(g > 0 for g in np.atleast_1d(grid)):
            self.program[kernel](grid, block, args, shared_mem)

    def _run(self, name: str, grid, block, args, shared_mem: int = 0):
        """Launch the current version of kernel ``name``: ``{name}_kernel{version}``."""
        self._launch(f"{name}_kernel{current_version}", grid, block, args, shared_mem)

    # ---- conv2d ----------------------------------------------------------------------

    def _conv_shape(self, x, w, stride, padding, what):
        if x.ndim != 4 or w.ndim != 4:
            raise ValueError(f"{what}: x and w must be 4-D (N, C, H, W) and (K, C, R, S), got {x.shape} and {w.shape}")
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"{what}: x has {x.shape[1]} channels but w expects {w.shape[1]}")
        if not (isinstance(stride, (int, np.integer)) and stride >= 1 and isinstance(padding, (int, np.integer))
                and padding >= 0):
            raise ValueError(f"{what}: stride must be an int >= 1 and padding an int >= 0, got {stride!r}, {padding!r}")
        N, C, H, W = x.shape
        K, _, R, S = w.shape
        P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1
        if P < 1 or Q < 1:
            raise ValueError(f"{what}: a {R}x{S} kernel does not fit a {H}x{W} input with padding {padding}")
        return N, C, H, W, K, R, S, P, Q

    def conv2d_forward(self, x, w, b, stride, padding):
        x, w, b = self._f32(x), self._f32(w), self._f32(b)
        N, C, H, W, K, R, S, P, Q = dims = self._conv_shape(x, w, stride, padding, "conv2d")
        if b is not None and b.shape != (K,):
            raise ValueError(f"conv2d: bias must have shape ({K},), got {b.shape}")
        y = self.xp.empty((N, K, P, Q), dtype=self.xp.float32)
        args = (x, w, b, y, *dims, stride, padding)
        if current_version == 1:
            self._run("conv2d_forward", cdiv(y.size, 256), 256, args)
        else:
            self._run("conv2d_forward", (cdiv(K, CONV_TILE), cdiv(N * P * Q, CONV_TILE)), 256, args)
        return y

    def conv2d_backward(self, dy, x, w, stride, padding, need_dx=True, need_dw=True, need_db=True):
        dy, x, w = self._f32(dy), self._f32(x), self._f32(w)
        N, C, H, W, K, R, S, P, Q = dims = self._conv_shape(x, w, stride, padding, "conv2d backward")
        if dy.shape != (N, K, P, Q):
            raise ValueError(f"conv2d backward: dy must have shape {(N, K, P, Q)}, got {dy.shape}")
        dx = dw = db = None
        if need_dx:
            dx = self.xp.empty(x.shape, dtype=self.xp.float32)
            grid = cdiv(dx.size, 256) if current_version == 1 else (cdiv(C, CONV_TILE), cdiv(N * H * W, CONV_TILE))
            self._run("conv2d_backward_input", grid, 256, (dy, w, dx, *dims, stride, padding))
        if need_dw:
            dw = self.xp.empty(w.shape, dtype=self.xp.float32)
            grid = cdiv(dw.size, 256) if current_version == 1 else (cdiv(C * R * S, CONV_TILE), cdiv(K, CONV_TILE))
            self._run("conv2d_backward_weight", grid, 256, (dy, x, dw, *dims, stride, padding))
        if need_db:
            db = self.xp.empty((K,), dtype=self.xp.float32)
            if current_version == 1:
                self._run("conv2d_backward_bias", cdiv(K, 64), 64, (dy, db, N, K, P, Q))
            else:
                self._run("conv2d_backward_bias", K, reduce_threads(N * P * Q), (dy, db, N, K, P, Q))
        return dx, dw, db

    # ---- group norm ------------------------------------------------------------------

    def _gn_shape(self, x, num_groups, what):
        if x.ndim < 2:
            raise ValueError(f"{what}: x must be (N, C, ...), got shape {x.shape}")
        N, C = x.shape[:2]
        if not isinstance(num_groups, (int, np.integer)) or num_groups < 1 or C % num_groups:
            raise ValueError(f"{what}: {C} channels cannot be split into {num_groups!r} groups")
        return N, C, math.prod(x.shape[2:]), int(num_groups)

    def group_norm_forward(self, x, num_groups, weight, bias, eps):
        x, weight, bias = self._f32(x), self._f32(weight), self._f32(bias)
        N, C, HW, G = self._gn_shape(x, num_groups, "group_norm")
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (C,):
                raise ValueError(f"group_norm: {name} must have shape ({C},), got {p.shape}")
        y = self.xp.empty(x.shape, dtype=self.xp.float32)
        mean = self.xp.empty((N, G), dtype=self.xp.float32)
        rstd = self.xp.empty((N, G), dtype=self.xp.float32)
        args = (x, weight, bias, y, mean, rstd, N, C, HW, G, float(eps))
        if current_version == 1:
            self._run("group_norm_forward", cdiv(N * G, 64), 64, args)
        else:
            self._run("group_norm_forward", N * G, reduce_threads(C // G * HW), args)
        return y, mean, rstd

    def group_norm_backward(self, dy, x, num_groups, weight, mean, rstd):
        dy, x, weight = self._f32(dy), self._f32(x), self._f32(weight)
        mean, rstd = self._f32(mean), self._f32(rstd)
        N, C, HW, G = self._gn_shape(x, num_groups, "group_norm backward")
        if dy.shape != x.shape or mean.shape != (N, G) or rstd.shape != (N, G):
            raise ValueError(f"group_norm backward: dy must have x's shape {x.shape} and mean, rstd ({N}, {G}); "
                             f"got {dy.shape}, {mean.shape}, {rstd.shape}")
        dx = self.xp.empty(x.shape, dtype=self.xp.float32)
        if current_version == 1:
            self._run("group_norm_backward_input", cdiv(N * G, 64), 64,
                      (dy, x, weight, mean, rstd, dx, N, C, HW, G))
        else:
            self._run("group_norm_backward_input", N * G, reduce_threads(C // G * HW),
                      (dy, x, weight, mean, rstd, dx, N, C, HW, G))
        if weight is None:  # as in the reference: no affine parameters, no gradients for them
            return dx, None, None
        dweight = self.xp.empty((C,), dtype=self.xp.float32)
        dbias = self.xp.empty((C,), dtype=self.xp.float32)
        args = (dy, x, mean, rstd, dweight, dbias, N, C, HW, G)
        if current_version == 1:
            self._run("group_norm_backward_params", cdiv(C, 64), 64, args)
        else:
            self._run("group_norm_backward_params", C, reduce_threads(N * HW), args)
        return dx, dweight, dbias

    # ---- attention -------------------------------------------------------------------

    def _attn_shape(self, q, k, v, what):
        """(B, heads, Lq, Lk, d, d_v) for q (B, heads, Lq, d), k (B, heads, Lk, d), v (B, heads, Lk, d_v)."""
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"{what}: q, k, v must be 4-D (B, heads, L, d), got {q.shape}, {k.shape}, {v.shape}")
        B, H, Lq, d = q.shape
        if k.shape[:2] != (B, H) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"{what}: k must be (B, heads, Lk, d) = ({B}, {H}, Lk, {d}) and v (B, heads, Lk, d_v); "
                             f"got {k.shape} and {v.shape}")
        if Lq < 1 or k.shape[2] < 1 or d < 1 or v.shape[3] < 1:
            raise ValueError(f"{what}: empty sequence or head dim: q {q.shape}, k {k.shape}, v {v.shape}")
        return B, H, Lq, k.shape[2], d, v.shape[3]

    def _matmul1(self, a, b, c, M, Ncols, Kd, trans_a, trans_b, alpha):
        """version 1's batched C = alpha op(A) op(B), one matrix per (batch, head)."""
        batch = c.size // (M * Ncols)
        self._launch("attention_matmul_kernel1", (cdiv(M * Ncols, 256), batch), 256,
                     (a, b, c, M, Ncols, Kd, int(trans_a), int(trans_b), alpha))

    def attention_forward(self, q, k, v, scale, is_causal):
        q, k, v = self._f32(q), self._f32(k), self._f32(v)
        B, H, Lq, Lk, d, d_v = self._attn_shape(q, k, v, "attention")
        xp, causal = self.xp, int(bool(is_causal))
        o = xp.empty((B, H, Lq, d_v), dtype=xp.float32)
        lse = xp.empty((B, H, Lq), dtype=xp.float32)
        if current_version == 1:
            s = xp.empty((B, H, Lq, Lk), dtype=xp.float32)
            self._matmul1(q, k, s, Lq, Lk, d, False, True, float(scale))  # S = s Q K^T
            rows = B * H * Lq
            self._launch("attention_softmax_kernel1", cdiv(rows, 4), 128, (s, lse, rows, Lq, Lk, causal))
            self._matmul1(s, v, o, Lq, d_v, Lk, False, False, 1.0)  # O = P V
            return o, lse
        threads, tile, shared = flash_tiles(
            d, lambda bq, bk: bq * (d + 1) + bq * (d_v + 1) + bk * d + bk * d_v + bq * (bk + 1))
        self._launch("attention_forward_kernel2", (cdiv(Lq, threads), B * H), threads,
                     (q, k, v, o, lse, Lq, Lk, d, d_v, float(scale), causal, tile), shared)
        return o, lse

    def attention_backward(self, do, q, k, v, o, lse, scale, is_causal):
        q, k, v = self._f32(q), self._f32(k), self._f32(v)
        do, o, lse = self._f32(do), self._f32(o), self._f32(lse)
        B, H, Lq, Lk, d, d_v = self._attn_shape(q, k, v, "attention backward")
        if do.shape != (B, H, Lq, d_v) or o.shape != do.shape or lse.shape != (B, H, Lq):
            raise ValueError(f"attention backward: do and o must be {(B, H, Lq, d_v)} and lse {(B, H, Lq)}; "
                             f"got {do.shape}, {o.shape}, {lse.shape}")
        xp, causal, scale, rows = self.xp, int(bool(is_causal)), float(scale), B * H * Lq
        dq, dk, dv = (xp.empty(a.shape, dtype=xp.float32) for a in (q, k, v))
        if current_version == 1:
            p = xp.empty((B, H, Lq, Lk), dtype=xp.float32)
            dp = xp.empty((B, H, Lq, Lk), dtype=xp.float32)
            self._matmul1(q, k, p, Lq, Lk, d, False, True, scale)  # S
            self._launch("attention_probs_kernel1", cdiv(p.size, 256), 256, (p, lse, rows, Lq, Lk, causal))
            self._matmul1(p, do, dv, Lk, d_v, Lq, True, False, 1.0)  # dV = P^T dO
            self._matmul1(do, v, dp, Lq, Lk, d_v, False, True, 1.0)  # dP = dO V^T
            self._launch("attention_softmax_backward_kernel1", cdiv(rows, 4), 128, (p, dp, do, o, rows, Lk, d_v))
            self._matmul1(dp, k, dq, Lq, d, Lk, False, False, scale)  # dQ = s dS K
            self._matmul1(dp, q, dk, Lk, d, Lq, True, False, scale)  # dK = s dS^T Q
            return dq, dk, dv
        D = xp.empty((B, H, Lq), dtype=xp.float32)
        self._launch("attention_backward_dot_kernel2", cdiv(rows, 4), 128, (do, o, D, rows, d_v))
        threads, tile, shared = flash_tiles(
            d, lambda bk, bq: 2 * bk * (d + 1) + 2 * bk * (d_v + 1) + bq * d + bq * d_v + 2 * bq)
        self._launch("attention_backward_kv_kernel2", (cdiv(Lk, threads), B * H), threads,
                     (q, k, v, do, lse, D, dk, dv, Lq, Lk, d, d_v, scale, causal, tile), shared)
        threads, tile, shared = flash_tiles(
            d, lambda bq, bk: 2 * bq * (d + 1) + bq * (d_v + 1) + bk * d + bk * d_v)
        self._launch("attention_backward_q_kernel2", (cdiv(Lq, threads), B * H), threads,
                     (q, k, v, do, lse, D, dq, Lq, Lk, d, d_v, scale, causal, tile), shared)
        return dq, dk, dv
