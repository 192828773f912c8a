# %% [markdown]
# # Lesson 1: the three kernels, split into blocks and threads
#
# Almost all of Stable Diffusion's arithmetic happens in three operations:
#
# - **conv2d**: every ResNet block of the UNet and the VAE is a pair of 3x3 convolutions;
# - **group norm**: before every convolution and every attention, 32 groups;
# - **attention**: self-attention over the latent pixels and cross-attention from the
#   pixels to the 77 text tokens, in every transformer block.
#
# minisd computes them four ways, the backends (`minisd/backends/`). This lesson reads
# them in order:
#
# 1. **naive** (`naive.py`): each op as its formula, a few lines of NumPy. This is the
#    code to understand first, and the oracle every other backend is tested against.
# 2. **numpy** (`fast_cpu.py`, the default): the same math, tuned for a CPU (copies
#    that stay in the cache, the cores sharing the batch, tiles of attention).
# 3. **cupy** and **emulated**: hand-written CUDA kernels (`kernels/*.cu`), run on an
#    NVIDIA GPU through CuPy or on the CPU by an emulator that compiles the very same
#    `.cu` files with g++. We look at how each kernel cuts its work into a **grid of
#    blocks** of **threads**, with the exact launch configurations that
#    `minisd/backends/cuda_launch.py` computes, then run every kernel (forward and
#    backward, both versions) against the naive formulas.
#
# Each kernel comes in two versions (read them side by side in `kernels/`):
# version 1 is the simple one (one thread per output, or per group), version 2 the fast
# one (shared-memory tiles, block reductions, flash attention).
#
# Run: `python lessons/01_kernels.py [--out DIR] [--fast]`.

# %%
import inspect
import os
import re
import shutil
import sys
import time
from pathlib import Path

try:
    import minisd
except ImportError:  # run from a checkout without installing: the package sits beside lessons/
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    sys.path.insert(0, str(here.parent))
    import minisd

import numpy as np
from matplotlib.patches import Rectangle

from minisd import viz
from minisd.backends import BackendUnavailable, cuda_build, cuda_launch, fast_cpu, naive

plt = viz.plt
args = viz.lesson_args("01_kernels")
results = {}
t_start = time.perf_counter()

# %% [markdown]
# ## 0. What can run here?
#
# The emulator needs a C++ compiler (g++); the GPU path needs CuPy and an NVIDIA GPU.
# Without g++ the lesson still draws every launch (they are computed, not run) and
# skips the emulator runs.

# %%
viz.header("0. runtimes")
runtimes = {}
cxx = os.environ.get("CXX", "g++")  # the compiler minisd/backends/cuda_build.py builds the emulator with
print(f"  C++ compiler ({cxx}): {shutil.which(cxx) or 'not found: the emulator runs are skipped (install g++)'}")
for runtime in ("emulated", "cupy"):
    try:
        t0 = time.perf_counter()
        runtimes[runtime] = cuda_launch.KernelOps(runtime)
        print(f"  {runtime}: ready ({time.perf_counter() - t0:.2f} s to compile or load)")
    except (BackendUnavailable, cuda_build.KernelError, ImportError, OSError) as error:
        print(f"  {runtime}: not available ({str(error).splitlines()[0]})")
results["emulator_available"] = "emulated" in runtimes
results["gpu_available"] = "cupy" in runtimes


# %% [markdown]
# ## 1. The math: the naive backend
#
# A convolution, as PyTorch defines it (a cross-correlation), for x (N, C, H, W) and
# weights W (K, C, R, S):
#
#     y[n, k, p, q] = b[k] + sum_{c, r, s} W[k, c, r, s] xpad[n, c, p*st + r, q*st + s]
#
# `naive.conv2d_forward` is that line: `_windows` gives every receptive field as a
# view of the padded input (im2col without a copy), and one `einsum` does the sum over
# (c, r, s). Its backward pass is the chain rule written the same way: dW sums dy times
# the windows over the batch, and dx is a convolution again, of dy spread out by the
# stride with the kernel flipped. Group norm and attention are as short. We print the
# convolution's code, run all three forward and backward, and check the gradients the
# slow, sure way: finite differences of the forward pass.

# %%
viz.header("1. the math: the naive backend (minisd/backends/naive.py)")
print(inspect.getsource(naive._windows))
print(inspect.getsource(naive.conv2d_forward))
rng = np.random.default_rng(0)
x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
dy = rng.standard_normal((2, 4, 3, 3))
y = naive.conv2d_forward(x, w, b, 2, 1)
dx, dw, db = naive.conv2d_backward(dy, x, w, 2, 1)
# one entry of dx and of dW by central differences of <dy, y(x)>, in float64
h, where_x, where_w = 1e-6, (1, 2, 3, 4), (3, 1, 0, 2)
fd = []
for array, where in ((x, where_x), (w, where_w)):
    up, down = array.copy(), array.copy()
    up[where] += h
    down[where] -= h
    pair = (up, w) if array is x else (x, up), (down, w) if array is x else (x, down)
    fd.append((np.vdot(dy, naive.conv2d_forward(*pair[0], b, 2, 1)) -
               np.vdot(dy, naive.conv2d_forward(*pair[1], b, 2, 1))) / (2 * h))
print(f"  conv2d x {x.shape} * W {w.shape}, stride 2, padding 1 -> y {y.shape}")
print(f"  dx{where_x}: backward {dx[where_x]:+.9f}, finite differences {fd[0]:+.9f}")
print(f"  dW{where_w}: backward {dw[where_w]:+.9f}, finite differences {fd[1]:+.9f}")
gx = rng.standard_normal((2, 8, 4, 4)) * 3 + 1
gy, gmean, grstd = naive.group_norm_forward(gx, 4, None, None, 1e-5)
print(f"  group norm, 4 groups: per-group mean of y {np.abs(gy.reshape(2, 4, -1).mean(-1)).max():.1e} "
      f"(0), variance {gy.reshape(2, 4, -1).var(-1).mean():.6f} (1 - eps/var)")
q, k, v = rng.standard_normal((1, 2, 5, 8)), rng.standard_normal((1, 2, 7, 8)), rng.standard_normal((1, 2, 7, 8))
o, lse = naive.attention_forward(q, k, v, 8 ** -0.5, True)
p_rows = np.exp(8 ** -0.5 * q @ k.swapaxes(-1, -2) - lse[..., None]) * np.tril(np.ones((5, 7)))
print(f"  attention, 5 queries over 7 keys, causal: rows of P = exp(S - lse) sum to "
      f"{p_rows.sum(-1).min():.12f} .. {p_rows.sum(-1).max():.12f}")
results["naive_fd_error"] = float(max(abs(dx[where_x] - fd[0]), abs(dw[where_w] - fd[1])))

# %% [markdown]
# ## 2. The same math, tuned: the numpy backend
#
# `minisd/backends/fast_cpu.py` computes exactly these functions, faster: its opening
# lists each change and what it was measured to gain. A convolution takes one of two
# routes instead of im2col's R*S copies (shifted rows for tall outputs at stride 1,
# channels-last columns otherwise), works through the batch a few images at a time so
# that its copies stay in the CPU's cache, and shares the images among the cores;
# attention runs in FlashAttention-style tiles. Below: its list, then both backends on
# the same inputs, how far apart they are (float32 rounding; in float64 the tests hold
# them to 1e-10) and how long each takes.

# %%
viz.header("2. tuned: the numpy backend (minisd/backends/fast_cpu.py)")
opening = fast_cpu.__doc__.split("this file adds", 1)[1].split("The signatures", 1)[0]
print("  the math is in naive.py; fast_cpu.py adds" + opening.rstrip())
N, C, H, W = (8, 32, 16, 16) if args.fast else (32, 64, 16, 16)  # bench ops' shapes in full mode
tx, tw = rng.standard_normal((N, C, H, W)).astype(np.float32), (rng.standard_normal((C, C, 3, 3)) * 0.1).astype(np.float32)
tg = rng.standard_normal(C).astype(np.float32)
tq = rng.standard_normal((N, 4, H * W // 4, 16)).astype(np.float32)
tuned_rows = []
for label, fn in (
        (f"conv2d {N}x{C}x{H}x{W} k3", lambda ops: ops.conv2d_backward(ops.conv2d_forward(tx, tw, None, 1, 1), tx, tw, 1, 1)),
        (f"group norm {N}x{C}x{H}x{W} G=8", lambda ops: ops.group_norm_backward(
            tx, tx, 8, tg, *ops.group_norm_forward(tx, 8, tg, tg, 1e-5)[1:])),
        (f"attention {N}x4 L={H * W // 4} d=16", lambda ops: ops.attention_backward(
            tq, tq, tq, tq, *ops.attention_forward(tq, tq, tq, 0.25, False), 0.25, False))):
    outs, seconds = {}, {"naive": np.inf, "numpy": np.inf}
    for _ in range(3):  # best of 3, the two taking turns
        for name, ops in (("naive", naive), ("numpy", fast_cpu)):
            t0 = time.perf_counter()
            outs[name] = fn(ops)
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
    err = max(float(np.abs(a - b_).max() / max(1.0, np.abs(a).max())) for a, b_ in zip(outs["naive"], outs["numpy"])
              if a is not None)
    tuned_rows.append((label, seconds["naive"], seconds["numpy"], err))
print(f"  {'forward + backward, float32':<34} {'naive ms':>9} {'numpy ms':>9} {'naive/numpy':>11} {'max rel. diff':>13}")
for label, t_naive, t_fast, err in tuned_rows:
    print(f"  {label:<34} {t_naive * 1e3:9.1f} {t_fast * 1e3:9.1f} {t_naive / t_fast:10.1f}x {err:13.1e}")
results["naive_vs_numpy_max_rel_diff"] = max(r[3] for r in tuned_rows)
results["naive_over_numpy_time"] = [round(r[1] / r[2], 2) for r in tuned_rows]

# %% [markdown]
# ## 3. Launch configurations, written down
#
# A kernel launch is `kernel(grid, block, args, shared_mem)`: `grid` blocks, each of
# `block` threads, each block with `shared_mem` bytes of fast on-chip memory shared by
# its threads (plus whatever the kernel declares statically with `__shared__`).
# To see exactly what `minisd/kernels.py` launches, we run its `KernelOps` with a
# stand-in program that only writes each launch down (a "dry run": nothing is computed).

# %%
class LaunchLog:
    """Stands in for a compiled cuda_build.Program: records each launch, then runs it if it can."""

    def __init__(self, program=None):
        self.program, self.launches = program, []

    def __getitem__(self, name):
        kernel = self.program[name] if self.program is not None else None

        def launch(grid, block, args, shared_mem=0):
            self.launches.append({"kernel": name, "grid": cuda_build.dim3(grid, name),
                                  "block": cuda_build.dim3(block, name), "shared_bytes": int(shared_mem),
                                  "scalars": [a for a in args if isinstance(a, (int, float, np.integer))]})
            if kernel is not None:
                kernel(grid, block, args, shared_mem)

        return launch


def dry_run(op_name, *op_args, version=2):
    """The launches KernelOps makes for one call of ``op_name``, without running anything."""
    ops = object.__new__(cuda_launch.KernelOps)  # KernelOps without compiling a program
    ops.runtime, ops.xp, ops.program = "dry run", np, LaunchLog()
    with cuda_launch.settings(version=version):
        getattr(ops, op_name)(*op_args)
    return ops.program.launches


def describe(launches):
    for L in launches:
        threads = np.prod(L["grid"]) * np.prod(L["block"])
        print(f"    {L['kernel']:<36} grid {L['grid']}  block {L['block'][0]:>3}  "
              f"= {threads:>9,} threads  dynamic shared {L['shared_bytes']:>6,} B")


def zeros(*shape):
    return np.zeros(shape, np.float32)


# The example shapes: minisd's sizes (a small UNet layer at 16x16), and SD v1.5's
# first UNet level (320 channels on 64x64 latents, batch 2 for classifier-free guidance).
conv_ex = dict(N=2, C=32, H=16, W=16, K=128)
gn_ex = dict(N=2, C=32, HW=64, G=8)
attn_ex = dict(B=2, heads=2, L=256, d=16)

viz.header("3. launches: minisd's example shapes, and SD v1.5's")
conv_launch = dry_run("conv2d_forward", zeros(2, 32, 16, 16), zeros(128, 32, 3, 3), zeros(128), 1, 1)
print("  conv2d forward, x (2, 32, 16, 16), w (128, 32, 3, 3), padding 1, version 2:")
describe(conv_launch)
print("  the same, version 1:")
describe(dry_run("conv2d_forward", zeros(2, 32, 16, 16), zeros(128, 32, 3, 3), zeros(128), 1, 1, version=1))
print("  SD v1.5: x (2, 320, 64, 64), w (320, 320, 3, 3), version 2:")
describe(dry_run("conv2d_forward", zeros(2, 320, 64, 64), zeros(320, 320, 3, 3), zeros(320), 1, 1))

gn_launch = dry_run("group_norm_forward", zeros(2, 32, 8, 8), 8, zeros(32), zeros(32), 1e-5)
print("  group norm forward, x (2, 32, 8, 8), 8 groups, version 2:")
describe(gn_launch)
print("  SD v1.5: x (2, 320, 64, 64), 32 groups:")
describe(dry_run("group_norm_forward", zeros(2, 320, 64, 64), 32, zeros(320), zeros(320), 1e-5))

q_ex = zeros(2, 2, 256, 16)
attn_launch = dry_run("attention_forward", q_ex, q_ex, q_ex, 0.25, False)
print("  attention forward (self), q, k, v (2, 2, 256, 16), version 2 (flash):")
describe(attn_launch)
print("  SD v1.5 self-attention: (2, 8, 4096, 40); cross-attention to 77 tokens:")
q_sd = zeros(2, 8, 4096, 40)
describe(dry_run("attention_forward", q_sd, q_sd, q_sd, 40 ** -0.5, False))
describe(dry_run("attention_forward", q_sd, zeros(2, 8, 77, 40), zeros(2, 8, 77, 40), 40 ** -0.5, False))
results["conv_grid"] = list(conv_launch[0]["grid"])
results["gn_grid"] = list(gn_launch[0]["grid"])
results["gn_block"] = gn_launch[0]["block"][0]
results["attn_grid"] = list(attn_launch[0]["grid"])
results["attn_block"] = attn_launch[0]["block"][0]

# %% [markdown]
# ## 4. conv2d, version 2: an implicit matrix product
#
# A convolution is a matrix product in disguise. Flatten each output pixel
# m = (n, p, q) into a row and each filter tap j = (c, r, s) into a column of a matrix A
# (A[m, j] = the input pixel that tap j of output pixel m reads), and the weights into
# B[j, k] = w[k, c, r, s]: then y = A B, an (N P Q) x K matrix. The kernel never builds A
# (that would copy each input pixel 9 times); it computes A's addresses on the fly.
#
# In `kernels/conv2d.cu` three constants set the blocking (the figure reads them from
# the source, so it follows the kernel as it is):
#
# - The **grid** tiles the output matrix into TILE x TILE tiles, one block each.
# - A **block**'s THREADS threads, arranged as a square, each compute SUB x SUB outputs
#   of the tile, spread out so that neighbouring threads touch neighbouring columns.
# - The sum over j runs TILE_K terms at a time: the block copies a TILE x TILE_K slice of
#   A and a TILE_K x TILE slice of B into **shared memory**, waits at `__syncthreads()`,
#   and every thread then reads its values of each term from the fast shared copy
#   instead of global memory: each value fetched from global memory serves TILE outputs.

# %%
viz.header("4. conv2d, version 2: an implicit matrix product")
conv_source = (cuda_build.source_dir() / "conv2d.cu").read_text()
define = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define\s+(\w+)\s+(\d+)", conv_source)}
TILE, TILE_K, THREADS, SUB = (define[k] for k in ("TILE", "TILE_K", "THREADS", "SUB"))
side = TILE // SUB  # threads per side of the block's square
print(f"  conv2d.cu: TILE {TILE}, TILE_K {TILE_K}, THREADS {THREADS} ({side} x {side}), SUB {SUB}")
N, C, H, W, K = conv_ex.values()
M, depth = N * H * W, C * 9
grid_k, grid_m = conv_launch[0]["grid"][:2]
fig, axes = plt.subplots(1, 3, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3, 1.6]})

ax = axes[0]
block_id = (np.arange(M)[:, None] // TILE) * grid_k + np.arange(K)[None, :] // TILE
ax.imshow(block_id % 10, cmap="tab10", aspect="auto", alpha=0.45, interpolation="nearest")
hi_m, hi_k = min(2, grid_m - 1), min(1, grid_k - 1)
ax.add_patch(Rectangle((hi_k * TILE - 0.5, hi_m * TILE - 0.5), TILE, TILE, fill=False, ec="red", lw=2))
ax.set_xlabel(f"output channel k (K = {K})")
ax.set_ylabel(f"output pixel m = (n, p, q)  (N*P*Q = {M})")
ax.set_title(f"y as a matrix: grid {grid_k} x {grid_m}\n= {grid_k * grid_m} blocks of {TILE} x {TILE}", fontsize=9)

ax = axes[1]
ty, tx = np.meshgrid(np.arange(TILE) % side, np.arange(TILE) % side, indexing="ij")
owner = ty * side + tx  # thread (tx, ty) owns rows ty + side*a and columns tx + side*b
ax.imshow(np.full((TILE, TILE), 0.93), cmap="gray", vmin=0, vmax=1)
for t, color in ((0, "tab:red"), (1, "tab:orange"), (side + 1, "tab:blue"), (THREADS - 1, "tab:green")):
    rows, cols = np.nonzero(owner == t)
    ax.scatter(cols, rows, s=max(4, 1800 // TILE ** 1.2), c=color, marker="s",
               label=f"thread {t} (ty {t // side}, tx {t % side})")
for edge in range(side, TILE, side):
    ax.axhline(edge - 0.5, color="0.6", lw=0.5)
    ax.axvline(edge - 0.5, color="0.6", lw=0.5)
ax.set_title(f"one block's {TILE} x {TILE} tile: {THREADS} threads,\n"
             f"each computes {SUB} x {SUB} outputs {side} apart", fontsize=9)
ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=2)
ax.set_xticks(range(0, TILE, side))
ax.set_yticks(range(0, TILE, side))

ax = axes[2]
# the loading loop: element e = j * TILE + i of a slice goes to thread e % THREADS
loader = (np.arange(TILE_K * TILE).reshape(TILE_K, TILE) % THREADS) // 32
gap = np.full((max(1, TILE_K // 8), TILE), np.nan)
ax.imshow(np.vstack([loader, gap, loader]), cmap="Set2", interpolation="nearest", aspect="auto")
ax.set_yticks([TILE_K / 2 - 0.5, TILE_K + len(gap) + TILE_K / 2 - 0.5])
ax.set_yticklabels([f"As[{TILE_K}][{TILE}]\n(A, transposed)", f"Bs[{TILE_K}][{TILE}]"], fontsize=7)
ax.set_xticks([0, TILE - 1])
ax.set_xlabel(f"m (for As) or k (for Bs) within the tile\ncolour: the warp that loads the value "
              f"({TILE * TILE_K // THREADS} values per thread)", fontsize=8)
for j in range(0, TILE_K, max(1, TILE_K // 4)):
    for i0 in range(0, TILE, 32):
        ax.text(i0 + 15.5, j, f"warp {loader[j, i0]}", fontsize=5.5, ha="center", va="center")
ax.set_title(f"shared memory, one step of the sum: 2 x {4 * TILE * TILE_K / 1024:g} KiB\n"
             f"{depth} terms = {-(-depth // TILE_K)} steps of {TILE_K}", fontsize=9)
fig.tight_layout()
viz.save(fig, args.out / "conv2d_blocks.png")
results["conv_tile"] = TILE

# %% [markdown]
# ## 5. Group norm, version 2: a block per group, a reduction per block
#
# Group norm needs, for each batch item n and group g, the mean and variance over the
# group's M = (C/G) H W values, which lie next to each other in memory. One block takes
# one (n, g). Its threads **stride** over the group: thread t reads elements t, t + T,
# t + 2T, ... (T threads), so that neighbouring threads read neighbouring addresses in
# the same instant (coalesced loads). Each thread sums its share; then `block_sum`
# combines the partial sums: within each warp of 32 threads by five butterfly exchanges
# (`__shfl_xor_sync` with offsets 16, 8, 4, 2, 1: after them every lane holds the warp's
# total), then warp 0 adds up the warps' totals. Twice: once for the mean, once for
# sum (x - mean)^2, which is more accurate in float32 than E[x^2] - E[x]^2.

# %%
viz.header("5. group norm, version 2: a block per group")
N, C, HW, G = gn_ex.values()
T = gn_launch[0]["block"][0]
Mg = C // G * HW
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.4]})
ax = axes[0]
rows = np.arange(N * C)
ax.imshow(np.repeat(((rows // C) * G + (rows % C) // (C // G))[:, None] % 10, HW, 1), cmap="tab10",
          aspect="auto", interpolation="nearest", alpha=0.6)
for r in range(0, N * C, C // G):
    ax.axhline(r - 0.5, color="w", lw=0.5)
ax.set_xlabel(f"H*W = {HW}")
ax.set_ylabel(f"(n, c): N = {N}, C = {C}")
ax.set_title(f"x: {N * G} groups of {C // G} channels\n= grid of {N * G} blocks", fontsize=9)

ax = axes[1]
thread_of = (np.arange(Mg) % T).reshape(-1, 32)
im = ax.imshow(thread_of, cmap="viridis", aspect="auto", interpolation="nearest")
ax.set_title(f"one group's {Mg} values (32 a row):\nelement i -> thread i mod {T}", fontsize=9)
ax.set_xlabel("i mod 32")
ax.set_ylabel("i // 32")
fig.colorbar(im, ax=ax, label="thread", fraction=0.05)

ax = axes[2]
lanes = np.arange(32)
for level, offset in enumerate((16, 8, 4, 2, 1)):
    for lane in lanes:
        ax.plot([lane, lane ^ offset], [level, level + 1], color=plt.cm.plasma(level / 5), lw=0.5)
ax.scatter(np.tile(lanes, 6), np.repeat(np.arange(6), 32), s=4, c="k")
ax.set_yticks(range(6))
ax.set_yticklabels(["partial sums", "xor 16", "xor 8", "xor 4", "xor 2", "xor 1: total"], fontsize=7)
ax.invert_yaxis()
ax.set_xlabel("lane (thread within a warp)")
ax.set_title("warp_sum: 5 butterfly exchanges,\nthen warp 0 adds the warps' totals", fontsize=9)
fig.tight_layout()
viz.save(fig, args.out / "group_norm_blocks.png")

# %% [markdown]
# ## 6. Attention, version 2: flash attention
#
# Attention computes S = s Q K^T (Lq x Lk), P = softmax(S) by rows, O = P V. At SD's
# 64 x 64 latents Lq = Lk = 4096: S alone is 16.8 M numbers per head. The flash kernel
# never stores it. A block owns a tile of query rows (one thread per row) and walks
# the keys tile by tile, copying each K and V tile into shared memory. Each thread
# keeps for its row a running maximum m, a running sum l of exp(S - m) and an
# unnormalised output, and rescales both by exp(m_old - m_new) whenever a new tile
# raises the maximum. After the last tile: O = acc / l and L = m + log l (the
# log-sum-exp, saved for the backward pass). The right panel follows one row.

# %%
viz.header("6. attention, version 2: flash attention")
B_, heads, Lq, d = attn_ex.values()
Bq = attn_launch[0]["block"][0]  # one thread per query row
Bk = int(attn_launch[0]["scalars"][-1])  # the key tile: attention_forward_kernel2's last argument
shared = attn_launch[0]["shared_bytes"]
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.3, 1]})
ax = axes[0]
band = np.arange(Lq)[:, None] // Bq + 0 * np.arange(Lq)[None, :]
ax.imshow(band % 10, cmap="Pastel1", aspect="auto", interpolation="nearest")
hb = 1
ax.add_patch(Rectangle((-0.5, hb * Bq - 0.5), Lq, Bq, fill=False, ec="red", lw=1.5))
for i, k0 in enumerate(range(0, Lq, Bk)):
    ax.add_patch(Rectangle((k0 - 0.5, hb * Bq - 0.5), Bk, Bq, fill=False, ec="red", lw=0.4))
    ax.text(k0 + Bk / 2, hb * Bq + Bq / 2, str(i + 1), fontsize=6, ha="center", va="center", color="red")
ax.set_xlabel(f"key j (Lk = {Lq}), tiles of {Bk}")
ax.set_ylabel(f"query i (Lq = {Lq})")
ax.set_title(f"S for one (batch, head): a block per {Bq} queries\nwalks the {Lq // Bk} key tiles in order",
             fontsize=9)

ax = axes[1]
rng = np.random.default_rng(0)
q_row = rng.standard_normal(d).astype(np.float32)
keys = rng.standard_normal((Lq, d)).astype(np.float32) + np.linspace(0, 1.5, Lq)[:, None] * q_row
scores = keys @ q_row / np.sqrt(d)
m, l, ms, lses = -np.inf, 0.0, [], []
for k0 in range(0, Lq, Bk):
    tile = scores[k0:k0 + Bk]
    m_new = max(m, tile.max())
    l = l * np.exp(m - m_new) + np.exp(tile - m_new).sum()
    m = m_new
    ms.append(m)
    lses.append(m + np.log(l))
true_lse = float(np.log(np.exp(scores - scores.max()).sum()) + scores.max())
steps = np.arange(1, len(ms) + 1)
ax.plot(steps, ms, "o-", ms=3, label="running max m")
ax.plot(steps, lses, "s-", ms=3, label="running m + log l")
ax.axhline(true_lse, color="k", ls="--", lw=0.8, label="log-sum-exp of the whole row")
ax.set_xlabel("key tiles seen")
ax.set_title("one query row, tile by tile", fontsize=9)
ax.legend(fontsize=7)
results["online_softmax_lse_error"] = abs(lses[-1] - true_lse)

ax = axes[2]
parts = [("q rows", Bq * (d + 1)), ("output acc", Bq * (d + 1)), ("K tile", Bk * d), ("V tile", Bk * d),
         ("scores", Bq * (Bk + 1))]
kib = [4 * floats / 1024 for _, floats in parts]
ax.barh(range(len(parts)), kib, color=plt.cm.Set3.colors[:len(parts)], ec="0.3")
for i, v in enumerate(kib):
    ax.text(v + 0.5, i, f"{v:.1f} KiB", va="center", fontsize=7)
ax.barh(len(parts), sum(kib), color="0.6", ec="0.3")
ax.text(sum(kib) + 0.5, len(parts), f"{sum(kib):.1f} KiB", va="center", fontsize=7)
ax.set_yticks(range(len(parts) + 1))
ax.set_yticklabels([p[0] for p in parts] + ["total"], fontsize=7)
ax.invert_yaxis()
ax.axvline(48, color="red", lw=1)
ax.text(47.5, len(parts) + 0.3, "48 KiB limit", color="red", fontsize=7, ha="right")
ax.set_xlim(0, 50)
ax.set_xlabel("KiB of shared memory per block")
ax.set_title(f"a block's shared memory: {shared / 1024:.1f} KiB\n({Bq} threads, key tiles of {Bk}, d = {d})",
             fontsize=9)
fig.tight_layout()
viz.save(fig, args.out / "attention_blocks.png")
print(f"  online softmax: m + log l after the last tile {lses[-1]:.6f}, exact {true_lse:.6f}")

# %% [markdown]
# ## 7. Run every kernel and hold it against the naive formulas
#
# Forward and backward of all three ops, versions 1 and 2, on every runtime available,
# against the naive backend computed in float64 on the same inputs: the oracle. An
# output passes when |kernel - naive| <= atol + rtol |naive| (atol 1e-4, rtol 1e-3 here:
# the kernels compute in float32). The times are beside the numpy backend's. Timings on the emulator are not GPU timings: it runs each CUDA
# thread as a fiber on one CPU core, to check the kernels, not to be fast. On a GPU
# (CuPy) the same kernels run in parallel.

# %%
viz.header("7. kernels against the naive formulas")
rng = np.random.default_rng(0)
if args.fast:
    cx, cw = rng.standard_normal((2, 8, 8, 8)), rng.standard_normal((16, 8, 3, 3))
    gx = rng.standard_normal((2, 16, 4, 4))
    aq, ak = rng.standard_normal((1, 2, 40, 16)), rng.standard_normal((1, 2, 24, 16))
else:
    cx, cw = rng.standard_normal((2, 32, 16, 16)), rng.standard_normal((64, 32, 3, 3))
    gx = rng.standard_normal((2, 32, 8, 8))
    aq, ak = rng.standard_normal((2, 2, 256, 16)), rng.standard_normal((2, 2, 77, 16))
f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
cx, cw, cb = f32(cx), f32(cw * 0.1), f32(rng.standard_normal(cw.shape[0]))
gx, gw, gb = f32(gx * 3 + 1), f32(rng.standard_normal(gx.shape[1])), f32(rng.standard_normal(gx.shape[1]))
aq, ak, av = f32(aq), f32(ak), f32(rng.standard_normal(ak.shape))
scale = aq.shape[-1] ** -0.5


# the backward passes' inputs: upstream gradients, and what the forward pass saved
dy = f32(rng.standard_normal(fast_cpu.conv2d_forward(cx, cw, cb, 1, 1).shape))
_, gmean, grstd = fast_cpu.group_norm_forward(gx, 8, gw, gb, 1e-5)
dgy = f32(rng.standard_normal(gx.shape))
o, lse = fast_cpu.attention_forward(aq, ak, av, scale, False)
do = f32(rng.standard_normal(o.shape))
inputs = dict(cx=cx, cw=cw, cb=cb, dy=dy, gx=gx, gw=gw, gb=gb, gmean=gmean, grstd=grstd, dgy=dgy,
              aq=aq, ak=ak, av=av, o=o, lse=lse, do=do)
inputs64 = {key: a.astype(np.float64) for key, a in inputs.items()}  # the oracle's: the same numbers, in float64


def cases(ops, a=inputs):
    """name -> a function computing that op's outputs with ``ops`` on arrays ``a``: a backend's six
    kernel functions (conv2d, group norm and attention, forward and backward)."""
    return {
        "conv2d forward": lambda: [ops.conv2d_forward(a["cx"], a["cw"], a["cb"], 1, 1)],
        "conv2d backward": lambda: list(ops.conv2d_backward(a["dy"], a["cx"], a["cw"], 1, 1)),
        "group norm forward": lambda: list(ops.group_norm_forward(a["gx"], 8, a["gw"], a["gb"], 1e-5)),
        "group norm backward": lambda: list(ops.group_norm_backward(a["dgy"], a["gx"], 8, a["gw"], a["gmean"], a["grstd"])),
        "attention forward": lambda: list(ops.attention_forward(a["aq"], a["ak"], a["av"], scale, False)),
        "attention backward": lambda: list(ops.attention_backward(a["do"], a["aq"], a["ak"], a["av"], a["o"], a["lse"],
                                                                   scale, False)),
    }


def timed(fn, repeat, sync=None):
    """(fn's result, its best time over ``repeat`` calls); ``sync`` waits for a GPU to finish."""
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if sync is not None:
            sync()  # kernel launches return at once; the time is when the GPU is done
        best = min(best, time.perf_counter() - t0)
    return out, best


repeat = 1 if args.fast else 3
ref_out = {name: fn() for name, fn in cases(naive, inputs64).items()}  # the oracle, in float64
ref_time = {name: timed(fn, repeat)[1] for name, fn in cases(fast_cpu).items()}  # the numpy backend, float32

rows = []  # (runtime, version, op, max error, seconds, passed)
for runtime, ops in runtimes.items():
    for version in cuda_launch.VERSIONS:
        with cuda_launch.settings(version=version):
            for name, fn in cases(ops).items():
                sync = ops.xp.cuda.Device().synchronize if runtime == "cupy" else None
                out, seconds = timed(fn, repeat, sync)
                out = [None if a is None else np.asarray(a.get() if hasattr(a, "get") else a) for a in out]
                err = max(float(np.abs(a - r).max()) for a, r in zip(out, ref_out[name]) if r is not None)
                ok = all(np.allclose(a, r, atol=1e-4, rtol=1e-3) for a, r in zip(out, ref_out[name]) if r is not None)
                rows.append((runtime, version, name, err, seconds, ok))
print(f"  shapes: conv x {cx.shape} w {cw.shape}; group norm x {gx.shape}, 8 groups; "
      f"attention q {aq.shape} k, v {ak.shape}")
print(f"  {'runtime':<9} {'v':>2} {'op':<20} {'max |err|':>10} {'time':>10} {'numpy':>10}  ok")
for runtime, version, name, err, seconds, ok in rows:
    print(f"  {runtime:<9} {version:>2} {name:<20} {err:10.2e} {seconds * 1e3:8.2f}ms "
          f"{ref_time[name] * 1e3:8.2f}ms  {'yes' if ok else 'NO'}")
if not rows:
    print("  (no kernel runtime here: nothing to compare; the drawings above still hold)")
results["kernel_checks"] = len(rows)
results["kernel_checks_passed"] = sum(r[5] for r in rows)
results["kernel_max_error"] = max((r[3] for r in rows), default=0.0)

# %% [markdown]
# The errors and the timings side by side.

# %%
names = list(ref_out)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
configs = sorted({(r[0], r[1]) for r in rows})
width = 0.8 / max(1, len(configs) + 1)
for i, (runtime, version) in enumerate(configs):
    errs = [next(r[3] for r in rows if r[:3] == (runtime, version, n)) for n in names]
    secs = [next(r[4] for r in rows if r[:3] == (runtime, version, n)) for n in names]
    xs = np.arange(len(names)) + i * width
    axes[0].bar(xs, np.maximum(errs, 1e-9), width, label=f"{runtime} v{version}")
    axes[1].bar(xs, np.array(secs) * 1e3, width, label=f"{runtime} v{version}")
axes[1].bar(np.arange(len(names)) + len(configs) * width, [ref_time[n] * 1e3 for n in names], width,
            label="numpy backend (fast_cpu)", color="0.5")
axes[0].axhline(1e-4, color="red", lw=0.8, ls="--", label="atol 1e-4")
for ax, label in ((axes[0], "max |kernel - naive in float64|"), (axes[1], "milliseconds (best of runs)")):
    ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels([n.replace(" ", "\n", 1) for n in names], fontsize=7)
    ax.legend(fontsize=7)
if not rows:
    axes[0].text(0.5, 0.5, "no emulator (g++) or GPU here:\nkernels not run", ha="center",
                 transform=axes[0].transAxes)
axes[0].set_title("agreement with the naive formulas (float64)", fontsize=9)
axes[1].set_title("time per call", fontsize=9)
fig.tight_layout()
viz.save(fig, args.out / "kernel_check.png")

# %% [markdown]
# ## What we saw
#
# - Each op is a few lines of math (naive.py): a convolution is a sum over the
#   kernel's positions of shifted slices times weight matrices, its gradient another
#   convolution; attention's backward needs only lse = m + log l from the forward.
# - conv2d is a matrix product; version 2 gives each block a TILE x TILE tile of it and
#   stages TILE_K-term slices in shared memory, so each value read from global memory
#   is used TILE times (64 in the current source).
# - group norm is a reduction: a block per group, threads striding over it, warp
#   shuffles to combine partial sums.
# - flash attention never stores the Lq x Lk scores: a running max and sum per row,
#   tile by tile, give the exact softmax.
# - The same `.cu` source runs on the CPU emulator and on a GPU, and agrees with the
#   naive formulas to float32 rounding; so does the tuned numpy backend, many times
#   faster than the formulas as written.

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
