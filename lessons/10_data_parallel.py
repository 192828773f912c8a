# %% [markdown]
# # Lesson 10: data parallelism, one model trained by several processes
#
# Stable Diffusion v1 was trained on 256 A100 GPUs at once (batch 2048: 8 images on each).
# Every GPU held the whole model, computed the gradient of *its* 8 images, and before each
# optimizer step all of them averaged their gradients with one **all-reduce**. Then each
# took the same AdamW step from the same weights, so the 256 copies stayed identical
# without a single weight being sent. This is data parallelism (PyTorch's DDP, llm.c's
# `mpirun -np 8 ./train_gpt2cu`), and minisd does it too:
#
#     mpiexec -n 2 minisd train unet --out checkpoints/mine        # 2 ranks, each half of the batch
#
# on CPUs through MPI (mpi4py), on GPUs through NCCL (`minisd/distributed.py`).
# This lesson shows why the average of the shards' gradients *is* the gradient of the
# whole batch (and when it is not), what an all-reduce costs, and what 2 ranks give on
# the machine at hand.
#
# Needs no trained model. Section 3 runs 2 ranks with `mpiexec` where mpi4py and an MPI
# are installed (`pip install "minisd[dist]"`); without them it says so and skips.
#
# Run: `python lessons/10_data_parallel.py [--out DIR] [--fast]`.

# %%
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import minisd
except ImportError:  # run from a checkout without installing: the package sits beside lessons/
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    sys.path.insert(0, str(here.parent))
    import minisd

import numpy as np

from minisd import functional as F
from minisd import nn, viz
from minisd.models.unet import UNet2DConditionModel
from minisd.train import UNET_CONFIG

plt = viz.plt
args = viz.lesson_args("10_data_parallel")
results = {}
t_start = time.perf_counter()

# %% [markdown]
# ## 1. The mean of the shards' gradients is the gradient of the batch
#
# The loss of a batch of B samples is the mean of their losses, L = (1/B) sum_i l_i, so
#
#     grad L = (1/B) sum_i grad l_i = (1/N) sum_r [ (N/B) sum_{i in shard r} grad l_i ]
#
# the mean over N shards of each shard's gradient of its own mean loss. Below: minisd's
# UNet, one batch of 8 noisy latents, its gradient in one piece, and the gradients of its
# two halves of 4 (what 2 ranks compute). Either half alone is a noisy estimate; their
# mean is the batch's gradient, to float32 rounding.
#
# The one assumption: no sample may see another inside the model. GroupNorm and LayerNorm
# normalise each sample alone, attention looks within one sample, so sharding is exact.
# BatchNorm (statistics over the batch) is not: each rank would normalise by its shard's
# mean. To see it break, we centre the UNet's output on the batch mean, a batch-coupled op.
# (CLIP's loss couples the batch too: every caption is scored against every image. minisd's
# ranks gather each other's embeddings before it, `distributed.gather_rows`.)

# %%
viz.header("1. the shards' gradients and the batch's")
B = 8
nn.manual_seed(0)
unet = UNet2DConditionModel(**UNET_CONFIG)
params = list(unet.parameters())
rng = np.random.default_rng(0)
x_t = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)
t = rng.integers(0, 1000, size=B)
c = rng.standard_normal((B, 77, UNET_CONFIG["cross_attention_dim"])).astype(np.float32)
noise = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)


def gradient(rows, batch_coupled=False):
    """The flat gradient of the mean loss over the batch's rows ``rows``."""
    for p in params:
        p.grad = None
    pred = unet(x_t[rows], t[rows], c[rows])
    if batch_coupled:
        pred = pred - pred.mean(axis=0, keepdims=True)  # like BatchNorm: each sample sees the others
    F.mse_loss(pred, noise[rows]).backward()
    return np.concatenate([p.grad.ravel() for p in params])


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


full = gradient(slice(0, B))
halves = [gradient(slice(0, B // 2)), gradient(slice(B // 2, B))]
mean = (halves[0] + halves[1]) / 2
coupled = [gradient(slice(0, B), True), gradient(slice(0, B // 2), True), gradient(slice(B // 2, B), True)]
coupled_error = relative((coupled[1] + coupled[2]) / 2, coupled[0])
results.update(parameters=int(full.size), shard_mean_relative_difference=relative(mean, full),
               one_shard_cosine=cosine(halves[0], full), batch_coupled_relative_difference=coupled_error)
print(f"  UNet: {full.size:,} parameters (SD's: {viz.SD['unet_params']:,}); batch {B} as 2 shards of {B // 2}")
print(f"  one shard's gradient against the batch's: cosine {results['one_shard_cosine']:.3f} (a noisy estimate)")
print(f"  mean of the 2 shards against the batch's: largest relative difference "
      f"{results['shard_mean_relative_difference']:.1e} (float32 rounding)")
print(f"  with a batch-coupled op (output minus the batch mean): {coupled_error:.1e}, not rounding: sharding breaks it")

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
pick = np.random.default_rng(1).choice(full.size, size=3000, replace=False)
scale = np.abs(full[pick]).max()
for ax, (shards, whole, title) in zip(axes, (((halves[0], halves[1]), full, "GroupNorm (per sample): exact"),
                                            ((coupled[1], coupled[2]), coupled[0], "batch-coupled op: not"))):
    avg = (shards[0] + shards[1]) / 2
    for g, colour, name in ((shards[0], "tab:orange", "shard 1 alone"), (shards[1], "tab:green", "shard 2 alone"),
                            (avg, "tab:blue", "mean of the 2 shards")):
        ax.scatter(whole[pick], g[pick], s=3, alpha=0.5 if g is not avg else 0.9, color=colour, label=name)
    ax.plot([-scale, scale], [-scale, scale], color="black", lw=0.6)
    ax.set(xlabel="gradient of the whole batch", ylabel="gradient from the shards", title=title)
axes[0].legend(fontsize=7, markerscale=3)
fig.suptitle(f"3,000 of the UNet's {full.size:,} gradient entries, batch {B} = 2 shards of {B // 2}")
fig.tight_layout()
viz.save(fig, args.out / "shard_gradients.png")

# %% [markdown]
# ## 2. What an all-reduce costs: the ring
#
# N ranks each hold a buffer (the gradient); each must end with the sum of all N. Sending
# every buffer to every rank costs (N - 1) buffers a rank. The ring algorithm (used by
# NCCL and by MPI for large buffers) does better: cut each buffer into N chunks and pass
# chunks round a ring, rank r to rank r + 1.
#
# - **reduce-scatter**, N - 1 steps: each rank sends one chunk to its neighbour and adds the
#   chunk it receives to its own. Afterwards each rank holds one chunk summed over all ranks.
# - **all-gather**, N - 1 steps: the summed chunks go round the ring, copied, not added.
#
# Each rank sends 2 (N - 1) chunks of 1/N of the buffer: **2 (N - 1) / N buffers**, 1 for
# 2 ranks and under 2 for any N. The cost barely grows with the number of ranks, which is
# why data parallelism scales to hundreds of GPUs. Here it is, in NumPy, with the bytes
# counted; the figure shows, for 4 ranks, how many ranks' contributions each chunk holds.

# %%
viz.header("2. the ring all-reduce")


def ring_allreduce(buffers, history=None):
    """Every buffer replaced by the sum of all of them, by passing chunks round a ring; returns the
    bytes each rank sent. ``history``, a list, gets each step's count of contributions per chunk."""
    n = len(buffers)
    chunks = [np.array_split(b, n) for b in buffers]  # chunks[r][k]: rank r's chunk k (views into b)
    counts = np.ones((n, n), dtype=int)  # counts[r][k]: how many ranks' chunk k rank r's chunk k sums
    sent = 0
    for step in range(n - 1):  # reduce-scatter: rank r sends chunk (r - step) to rank r + 1, which adds it
        outgoing = [chunks[r][(r - step) % n].copy() for r in range(n)]
        for r in range(n):
            k = (r - step) % n
            chunks[(r + 1) % n][k] += outgoing[r]
            counts[(r + 1) % n][k] += counts[r][k]
            sent += outgoing[r].nbytes
        if history is not None:
            history.append(counts.copy())
    for step in range(n - 1):  # all-gather: rank r sends its summed chunk (r + 1 - step) to rank r + 1
        outgoing = [chunks[r][(r + 1 - step) % n].copy() for r in range(n)]
        for r in range(n):
            k = (r + 1 - step) % n
            chunks[(r + 1) % n][k][...] = outgoing[r]
            counts[(r + 1) % n][k] = counts[r][k]
            sent += outgoing[r].nbytes
        if history is not None:
            history.append(counts.copy())
    return sent // n


ranks, size = 4, full.size
buffers = [np.random.default_rng(r).standard_normal(size).astype(np.float32) for r in range(ranks)]
expected = np.sum(buffers, axis=0, dtype=np.float64)
history = []
sent = ring_allreduce(buffers, history)
results["ring_error"] = max(relative(b.astype(np.float64), expected) for b in buffers)
results["ring_bytes_sent_per_rank"] = int(sent)
print(f"  {ranks} ranks, the UNet's gradient ({size * 4 / 2**20:.2f} MiB): every rank ends with the sum "
      f"(largest relative error {results['ring_error']:.1e}); each sent {sent / 2**20:.2f} MiB = "
      f"{sent / (size * 4):.2f} buffers (2 (N - 1) / N = {2 * (ranks - 1) / ranks:.2f})")
for n in (2, 8, 256):
    factor = 2 * (n - 1) / n
    print(f"  N = {n:3}: each rank sends {factor:.2f} buffers a step: minisd's UNet {factor * size * 4 / 2**20:6.2f} MiB, "
          f"SD's {factor * viz.SD['unet_params'] * 4 / 2**30:5.2f} GiB (float32 gradients)")

fig, axes = plt.subplots(1, len(history) + 1, figsize=(1.6 * (len(history) + 1), 2.3))
panels = [np.ones((ranks, ranks), dtype=int)] + history
for i, (ax, counts) in enumerate(zip(axes, panels)):
    ax.imshow(counts, vmin=1, vmax=ranks, cmap="Blues")
    for r in range(ranks):
        for k in range(ranks):
            ax.text(k, r, counts[r, k], ha="center", va="center", fontsize=7,
                    color="white" if counts[r, k] > ranks / 2 else "black")
    ax.set_xticks(range(ranks), [f"c{k}" for k in range(ranks)], fontsize=6)
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)] if i == 0 else [], fontsize=6)
    ax.set_title("start" if i == 0 else f"{'reduce-scatter' if i < ranks else 'all-gather'} {i if i < ranks else i - ranks + 1}",
                 fontsize=7)
fig.suptitle(f"ring all-reduce on {ranks} ranks: how many ranks' gradients each chunk holds", fontsize=9)
fig.tight_layout()
viz.save(fig, args.out / "ring_allreduce.png")

# %% [markdown]
# ## 3. Two real ranks, on this machine
#
# Now the real thing: `minisd train vae` in one process, and the same run under
# `mpiexec -n 2`, each rank computing half of every batch and MPI's Allreduce averaging
# the gradients (and the losses) in one message a step. The loss curves should lie on top
# of each other (the same losses, to float32 rounding: the sums are added in another order).
#
# On one machine, 2 ranks share its cores: each rank is held to its half of them, so 1
# process x 2 threads is set against 2 ranks x 1 thread. Threads share one copy of the
# model, but also one Python interpreter, which runs the work between the big array
# operations (building the graph, the many small ops) one thread at a time; each rank has
# its own, and pays the all-reduce instead. On the 2-core machine minisd is developed on,
# `minisd bench dist` (the UNet stage, in turns, several times: a shared machine is noisy)
# measured 2 ranks at 1.4-1.55x the images per second of 1 process. The short VAE runs here
# are a rougher measure.

# %%
viz.header("3. one process against 2 ranks")
steps = 8 if args.fast else 30
mpiexec = shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
except ImportError:
    mpiexec = None
results["two_ranks"] = mpiexec is not None
if mpiexec is None:
    print("  mpi4py or mpiexec is not installed here (pip install 'minisd[dist]'): skipped")
else:
    runs = {}
    with tempfile.TemporaryDirectory(prefix="minisd-lesson10-") as tmp:
        for ranks in (1, 2):
            out = os.path.join(tmp, f"ranks{ranks}")
            cmd = [sys.executable, "-m", "minisd", "train", "vae", "--steps", str(steps), "--batch-size", "8",
                   "--no-progress", "--out", out]
            cmd = [mpiexec, "-n", "2", "-host", "localhost", *cmd] if ranks == 2 else cmd
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise SystemExit(f"the {ranks}-rank run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            with open(os.path.join(out, "logs", "vae_loss.csv")) as f:
                losses = [float(row["loss"]) for row in csv.DictReader(f)]
            with open(os.path.join(out, "logs", "train_vae.json")) as f:
                seconds = json.load(f)["stages"]["vae"]["seconds"]
            runs[ranks] = {"losses": np.array(losses), "images_per_second": 8 * steps / seconds}
    diff = np.abs(runs[2]["losses"] - runs[1]["losses"]) / np.abs(runs[1]["losses"])
    results["loss_relative_difference"] = float(diff.max())
    results["images_per_second"] = {str(r): round(v["images_per_second"], 1) for r, v in runs.items()}
    print(f"  {steps} VAE steps, batch 8 (2 ranks: 4 each): largest relative difference between the two loss "
          f"curves {diff.max():.1e}")
    print(f"  images/s: 1 process {runs[1]['images_per_second']:.1f}, 2 ranks {runs[2]['images_per_second']:.1f} "
          f"({os.cpu_count()} CPUs; on a shared machine, noisy)")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(runs[1]["losses"], lw=2.5, alpha=0.5, label="1 process, batch 8")
    ax.plot(runs[2]["losses"], "k--", lw=1, label="2 ranks, 4 + 4")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="the same loss curve")
    ax.legend(fontsize=7)
    twin = ax.twinx()
    twin.semilogy(np.maximum(diff, 1e-10), color="tab:red", lw=0.8)
    twin.set_ylabel("relative difference", color="tab:red", fontsize=7)
    bx.bar(["1 process\nx 2 threads", "2 ranks\nx 1 thread"], [runs[1]["images_per_second"],
                                                                runs[2]["images_per_second"]],
           color=["tab:blue", "tab:orange"])
    bx.set(ylabel="images / s", title="on this machine")
    fig.tight_layout()
    viz.save(fig, args.out / "two_ranks.png")

# %% [markdown]
# ## What we saw
#
# - The gradient of a batch is the mean of its shards' gradients, exactly (to float32
#   rounding) while every sample is computed alone; a batch-coupled op (BatchNorm, a
#   contrastive loss) needs its statistics or embeddings gathered across the ranks first.
# - One all-reduce a step keeps N copies of the model identical; in a ring each rank sends
#   2 (N - 1) / N of the gradient, whatever N: 3 MiB for minisd's UNet, ~6.4 GiB for SD's.
# - Ranks can beat threads even on one machine (each has its own Python); data parallelism
#   is how training grows past one machine, or one GPU (`mpiexec -n 16 -f hosts minisd
#   train ...`, see the README).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
