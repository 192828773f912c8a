"""Training: the three stages that make a Stable Diffusion, from captioned images.

Stable Diffusion is three networks trained separately, and so is minisd:

 1. vae   the autoencoder E, D.  x (3, 32, 32) in [-1, 1] -> z = E(x) (4, 8, 8) -> D(z) ~ x.
          loss = |D(z) - x|_1 + |D(z) - x|^2 + beta KL(q(z|x) || N(0, I)),   z ~ q(z|x)
          (beta small, 1e-6: the latents stay close to unit scale without losing detail;
          SD's VAE added a perceptual loss and a GAN, which 32x32 flat shapes do not need.)
 2. clip  the text encoder, pretrained contrastively with an image tower (CLIP, Radford
          et al. 2021): for a batch of N (image, caption) pairs, the N x N cosine
          similarities s_ij times exp(logit_scale) are trained with a cross-entropy in both
          directions to pick out the true pairs (the diagonal). SD took OpenAI's CLIP as it
          was and froze it; here the text tower is frozen after this stage too.
 3. unet  the denoiser eps_theta(x_t, t, c) on latents z_0 = scaling_factor * E(x), where
          scaling_factor = 1 / std(E(x)) is measured on the training set (SD: 0.18215):
              t ~ U{0, ..., 999},  epsilon ~ N(0, I)
              x_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) epsilon
              loss = |epsilon - eps_theta(x_t, t, c)|^2                (Ho et al. 2020)
          with c the frozen text encoder's (77, hidden) states for the caption, replaced by
          those of the empty prompt 10% of the time so that the same network also learns
          the unconditional eps_theta(x_t, t, {}) that classifier-free guidance needs.

Every stage: AdamW, a linear warmup then a cosine decay of the learning rate, gradient
clipping, a tqdm bar with the loss and steps/s, a loss curve (CSV and PNG) in OUT/logs/,
and a checkpoint in OUT/checkpoints/ every ``--checkpoint-every`` steps, written atomically
(temporary file, then os.replace). ``--resume`` reloads it and continues exactly: the
batch of step s is drawn from a generator seeded with (seed, stage, s), so the data do not
depend on how many steps ran before, and weights, optimizer moments and EMA are restored
bit for bit; an interrupted run then gives the same losses as an uninterrupted one.
A loss or gradient that turns inf or NaN stops the run at that step (the checkpoint on
disk stays the last good one), and a batch too large for the machine's memory is refused
before it is drawn. On the command line (`minisd train`, minisd/cli/train.py), an --out that
already holds a stage's output is refused unless --resume or --overwrite says what to do with it.
The UNet's shipped weights are its exponential moving average (EMA), as SD's are.

The result is a model folder in diffusers' layout (vae/, text_encoder/, tokenizer/,
unet/, scheduler/, model_index.json), and clip/ (both towers, for ``minisd eval``'s CLIP
score). Sizes, SD v1.5 against minisd's shapes model:
    image (3, 512, 512) -> latents (4, 64, 64)     here (3, 32, 32) -> (4, 8, 8)
    text (77, 768), 12 layers                      here (77, 64), 2 layers
    UNet 860M parameters                           here 0.8M
    VAE 84M, text encoder 123M                     here 0.68M and 0.14M
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
import time
import warnings

import numpy as np

from minisd import distributed
from minisd import functional as F
from minisd import nn
from minisd.data.images import to_model_input
from minisd.optim import EMA, AdamW, clip_grad_norm, warmup_cosine
from minisd.tensor import no_grad

STAGES = ("vae", "clip", "unet")
DATASETS = ("shapes", "emoji")
UNCONDITIONAL_PROMPT = ""  # SD's unconditional input: the empty prompt, [bos, eos, eos, ...]

# ---------------------------------------------------------------------------------------
# The default model: sizes chosen so that all stages train in minutes on two CPU cores and
# 50 guided sampling steps (batch 8 through the UNet) take well under a second per image.
# ---------------------------------------------------------------------------------------

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=32, mid_block_add_attention=True,
)  # f = 4: (3, 32, 32) -> (4, 8, 8). SD: (128, 256, 512, 512), f = 8.

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)  # SD: 768 wide, 12 layers, 12 heads, MLP 3072. vocab_size comes from the tokenizer.

VISION_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_channels=3, image_size=32, patch_size=8, hidden_act="quick_gelu",
)  # a ViT over 4 x 4 patches of 8 px; CLIP ViT-L/14: 24 layers over 16 x 16 patches of 14 px.

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=64, attention_head_dim=4,
)  # SD: (320, 640, 1280, 1280), 2 layers per block, cross_attention_dim 768.

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
)  # exactly SD v1.x's schedule

# Steps, batch and learning rate per stage for `minisd train all`. The recipe of issue 17, each change
# measured on its own (README, "Training"): the VAE on MSE alone at 2e-3 (L1 + MSE at 3e-3 needed
# 2,000 steps for 30 dB), the UNet with min-SNR-gamma at 3e-3 (plain MSE at 1e-3 needed 5,000 steps).
DEFAULT_STEPS = {"vae": 1200, "clip": 200, "unet": 2000}
DEFAULT_BATCH = {"vae": 8, "clip": 64, "unet": 32}
DEFAULT_LR = {"vae": 2e-3, "clip": 1e-3, "unet": 3e-3}
KL_WEIGHT = 1e-6
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.995  # an average over the last ~200 steps (SD: 0.9999 over far longer runs)
# The UNet's loss weighting: min-SNR-gamma (Hang et al. 2023) at the paper's gamma; 0 or None: SD's plain MSE.
# Measured with lr 3e-3 (issue 17): 2,000 UNet steps then reach what 5,000 plain-MSE steps at 1e-3 did.
SNR_GAMMA = 5.0
# --preset quick, a class demo: each stage's steps (and lr where it differs from DEFAULT_LR); --help
# (minisd/cli/train.py's help_epilog) quotes them with the time they took
QUICK = {"vae": {"steps": 600}, "clip": {"steps": 200}, "unet": {"steps": 800}}
QUICK_MEASURED = ("Measured once on the shared 2-core machine (load 4-6, so indicative), with the earlier recipe\n"
                  "(L1 + MSE VAE at 3e-3, plain-MSE UNet at 3e-3; not yet re-measured with min-SNR): 6.3 min of\n"
                  "CPU, 7 min wall; `minisd eval` (50 steps, w 5): 31% of seen and 17% of held-out pairs all\n"
                  "right; sizes 97%, positions 97%, shapes 82%, colours 42%: colours need the default run.")


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def load_dataset(name: str, split: str = "train", font: str | None = None):
    """(images uint8 (N, 32, 32, 3), captions). shapes: every combination of the split at every
    jitter (train: 150 x 9 = 1350 images; the held-out colour-shape pairs never appear in it).
    emoji: every emoji of ``font`` (default: Noto Color Emoji where the system keeps it)."""
    from minisd import data

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    d = data.load_dataset(name, split=split, font=font)
    return d.images, list(d.captions)


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """The generator for one training step: a function of (seed, stage, step) alone, so resume is exact."""
    return np.random.default_rng([seed, STAGES.index(stage), step])


# ---------------------------------------------------------------------------------------
# Writing files without ever leaving a half-written one
# ---------------------------------------------------------------------------------------


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then move tmp_path over path in one step (os.replace).

    The one writer minisd has (io's): tmp_path is a unique name beside path, so a kill or a
    full disk leaves the old file whole, and two processes never share a temporary file.
    """
    from pathlib import Path

    from minisd import io

    io._atomic_write(Path(path), write)


@distributed.root_only
def save_checkpoint(path: str, params: dict, opt: AdamW, ema: EMA | None, step: int, losses: list) -> None:
    """Everything needed to continue exactly: weights, AdamW's t, m, v, the EMA, the step and the losses."""
    arrays = {f"param/{k}": np.asarray(v.data) for k, v in params.items()}
    names = list(params)
    for i, name in enumerate(names):
        if opt.m[i] is not None:
            arrays[f"adam_m/{name}"] = np.asarray(opt.m[i])
            arrays[f"adam_v/{name}"] = np.asarray(opt.v[i])
        if ema is not None:
            arrays[f"ema/{name}"] = np.asarray(ema.shadow[i])
    arrays["losses"] = np.asarray(losses, dtype=np.float64)
    meta = {"step": step, "adam_t": opt.t, "lr": opt.lr, "names": names}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, write)


def read_checkpoint(path: str, params: dict) -> dict:
    """The arrays save_checkpoint wrote, and its "meta", checked against ``params``. A bad file is a
    one-line error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(bytes(data["meta"]).decode())
    except Exception as e:  # zipfile, JSON and key errors all mean the same thing here
        raise ValueError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e})") from None
    if meta["names"] != list(params):
        raise ValueError(f"checkpoint {path} holds a different model (parameter names differ); "
                         "start without --resume or use another --out")
    for name in meta["names"]:
        saved, shape = data[f"param/{name}"].shape, params[name].shape
        if saved != shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {saved}, the model {shape}")
    data["meta"] = meta
    return data


def load_checkpoint(path: str, params: dict, opt: AdamW, ema: EMA | None, data: dict | None = None) -> tuple[int, list]:
    """Restore what save_checkpoint wrote; returns (step, losses). ``data``: what read_checkpoint(path)
    gave, where it was read already (on N ranks, rank 0 reads it and sends it to all)."""
    data = read_checkpoint(path, params) if data is None else data
    meta = data["meta"]
    for i, name in enumerate(meta["names"]):
        params[name].data[...] = data[f"param/{name}"]
        if f"adam_m/{name}" in data:
            opt.m[i], opt.v[i] = data[f"adam_m/{name}"].copy(), data[f"adam_v/{name}"].copy()
        if ema is not None:
            ema.shadow[i] = data[f"ema/{name}"].copy()
    opt.t, opt.lr = meta["adam_t"], meta["lr"]
    return int(meta["step"]), [float(x) for x in data["losses"]]


# ---------------------------------------------------------------------------------------
# The loop every stage shares
# ---------------------------------------------------------------------------------------


class Diverged(RuntimeError):
    """A training run met a non-finite loss, gradient or weight and stopped (nothing of it saved)."""


class BatchTooLarge(ValueError):
    """A training step of the requested batch size would not fit in this machine's memory."""


@distributed.guarded
def fit(stage: str, params: dict, loss_fn, *, steps: int, lr: float, out: str, batch_size: int, seed: int = 0,
        warmup: int | None = None, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
        ema_decay: float | None = None, checkpoint_every: int = 200, resume: bool = False,
        progress: bool = True, stop_after: int | None = None, discard=(), on_step=None) -> dict:
    """Minimise loss_fn(rng, n) -> scalar Tensor (the loss of a batch of n drawn with rng) over ``params``.

    AdamW with lr warmup_cosine(step), gradient clipping at max_grad_norm, an optional EMA
    of the weights. Returns {"losses", "seconds", "ema", "step"}. ``stop_after`` stops early
    after that many steps of this call (a test's way to interrupt a run and resume it).
    ``on_step(steps_done, losses, ema)`` is called after each step (the time-to-quality log).

    Before the first step, a batch of ``batch_size`` that would not fit in memory is refused
    (BatchTooLarge, see check_memory); then, unless resuming, the paths in ``discard`` (an
    earlier run's output that this one replaces: ``--overwrite``) and this stage's old
    checkpoint are removed. A non-finite loss or gradient norm stops the run (Diverged)
    before the weights change, and a checkpoint is written only of finite weights, so the
    one on disk is always the last good one.

    On N ranks (``mpiexec -n N``, minisd.distributed), ``batch_size`` is the global batch:
    loss_fn draws all n samples from the step's generator, the same on every rank, and
    returns the loss of its rank's rows of them (``distributed.world().shard(n)``). One
    all-reduce a step averages the gradients and the losses, before clipping: every rank
    takes the same step, and the losses are the whole batch's, as in one process (the same
    to float32 rounding: the sums are added in another order). Rank 0 alone writes the
    checkpoint and the loss curve; --resume reads the checkpoint on rank 0 and sends it to
    every rank, so a run saved by any number of ranks continues on any other.
    """
    from tqdm import tqdm

    world = distributed.world()
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"train {stage}: the learning rate must be a finite number > 0, got {lr}")
    warmup = max(1, steps // 20) if warmup is None else warmup
    named = list(params.items())
    grads = distributed.FlatGradients([p for _, p in named], world)
    grads.broadcast_weights()  # one start for every rank, before the EMA copies it
    opt = AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    ema = EMA([p for _, p in named], decay=ema_decay) if ema_decay else None
    ckpt = checkpoint_path(out, stage)
    if batch_size % world.size:
        raise distributed.BatchNotDivisible(f"train {stage}: a batch of {batch_size} does not split evenly "
                                            f"over {world.size} ranks")
    if world.size > 1 and world.is_root:
        print(f"minisd train {stage}: data parallel over {world.describe()}: batch {batch_size} = "
              f"{world.size} x {batch_size // world.size}")
    check_memory(stage, loss_fn, opt.params, batch_size)
    start, losses, saved_at = 0, [], None
    saved = world.from_root(lambda: read_checkpoint(ckpt, params) if resume and os.path.exists(ckpt) else None)
    if saved is not None:
        start, losses = load_checkpoint(ckpt, params, opt, ema, saved)
        saved_at = start
    elif world.is_root:
        if resume:
            print(f"minisd train {stage}: no checkpoint at {ckpt}; starting from step 0")
        remove_paths((*discard, ckpt))

    def diverged(step, what, value):
        kept = (f"the last good checkpoint (step {saved_at}) stays in {ckpt}, and --resume continues from it"
                if saved_at is not None else "no checkpoint had been written")
        return Diverged(f"train {stage} diverged at step {step}: the {what} is {value} (learning rate "
                        f"{opt.lr:.3g}); stopped without saving the model; {kept}; try a smaller --lr")

    progress = progress and world.is_root
    t0, cpu0, done_here = time.perf_counter(), time.process_time(), 0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    try:
        # NumPy's overflow / invalid-value warnings would only repeat, once per op, what the checks
        # below report in one line: a non-finite loss, gradient or weight.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for step in bar:
                opt.lr = warmup_cosine(step, steps, warmup, lr, min_lr=lr * 0.05)
                opt.zero_grad()
                loss = loss_fn(step_rng(seed, stage, step), batch_size)
                loss.backward()
                # the mean over the ranks of the gradients and of the shards' losses: the whole batch's
                value = grads.average(float(loss.item()))
                if not math.isfinite(value):
                    raise diverged(step, "loss", value)
                norm = clip_grad_norm(opt.params, max_grad_norm)  # of the average, as one process clips
                if not math.isfinite(norm):
                    raise diverged(step, "gradient norm", norm)
                opt.step()
                if ema is not None:
                    # Warm the average up (diffusers' formula): early on, the first random weights must not linger.
                    ema.decay = min(ema_decay, (1 + step) / (10 + step))
                    ema.update()
                losses.append(value)
                done_here += 1
                if on_step is not None:
                    on_step(step + 1, losses, ema)
                if progress and (step % 10 == 0 or step == steps - 1):
                    recent = float(np.mean(losses[-50:]))
                    bar.set_postfix(loss=f"{recent:.4f}", lr=f"{opt.lr:.1e}")
                if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                    # A finite loss and gradient can still step to inf weights (a huge lr): never save those.
                    if world.any(not all(np.isfinite(p.data).all() for p in opt.params)):
                        raise diverged(step, "model after the step", "non-finite (inf or nan weights)")
                    save_checkpoint(ckpt, params, opt, ema, step + 1, losses)
                    saved_at = step + 1
                if stop_after is not None and done_here >= stop_after:
                    break
    finally:
        bar.close()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    write_loss_curve(out, stage, losses)
    return {"losses": losses, "seconds": seconds, "cpu_seconds": cpu_seconds, "ema": ema, "step": start + done_here}


def remove_paths(paths) -> None:
    """Delete each file or folder of ``paths`` that exists."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


# ---------------------------------------------------------------------------------------
# Memory: refuse a batch that cannot fit before allocating it
# ---------------------------------------------------------------------------------------


def check_memory(stage: str, loss_fn, params, batch_size: int) -> int:
    """Estimate the bytes a training step of ``batch_size`` needs; refuse (BatchTooLarge) more than is free.

    A step's memory is almost all proportional to the batch: the activations the forward
    pass keeps for backward, and the gradients flowing back through them. So it is measured
    on a batch of 2 (the peak of NumPy's allocations under tracemalloc, over one forward and
    backward) and scaled: need = batch_size * peak(2) / 2 + AdamW's two moments (2 copies
    of the weights). peak(2) / 2 also holds half of the parameters' gradients and the
    batch-independent rest, so the bound errs high: 1.04-1.08x the measured peak for the
    default VAE and UNet at batches 8 to 64. It counts host memory (the NumPy backend).
    On N ranks each holds batch_size / N samples (the probe: 2 a rank), and the ranks on one
    machine share its memory: every machine is checked, and every rank stops if one is short.
    Returns the estimate for one rank, in bytes.
    """
    world = distributed.world()
    local = batch_size // world.size
    probe = min(2, local)

    def one_step():
        loss_fn(np.random.default_rng(0), probe * world.size).backward()

    per_sample = peak_allocated(one_step) / probe
    for p in params:
        p.grad = None  # the probe's gradients; the first step starts from none
    state = 2 * sum(p.data.nbytes for p in params)
    need = int(local * per_sample + state)
    # what each machine's ranks need together, and what it has, known to every rank alike
    machines = world.allgather_obj((need * world.local_size, available_memory(), world.local_size))
    short = [m for m in machines if m[1] is not None and m[0] > m[1]]
    if short:
        total, free, ranks = max(short, key=lambda m: m[0] - m[1])
        fits = max(0, int((free / ranks - state) // per_sample)) * world.size if per_sample else 0
        where = f" on {world.size} ranks ({ranks} on one machine, {local} samples each)" if world.size > 1 else ""
        raise BatchTooLarge(
            f"train {stage}: a step of batch {batch_size}{where} needs about {format_bytes(total)} "
            f"({format_bytes(per_sample)} a sample, measured on a batch of {probe}, + {format_bytes(state)} "
            f"of AdamW state{' a rank' if ranks > 1 else ''}), more than the {format_bytes(free)} of memory "
            f"available; a batch of at most {fits:,} fits")
    return need


def peak_allocated(fn) -> int:
    """Peak bytes allocated (NumPy's arrays included: they report to tracemalloc) while fn() runs."""
    import tracemalloc

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()


def available_memory() -> int | None:
    """Bytes this machine can still give a process: MemAvailable in /proc/meminfo (Linux), else the free
    physical pages (os.sysconf); None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the figure is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@distributed.root_only
def write_loss_curve(out: str, stage: str, losses: list) -> None:
    """OUT/logs/STAGE_loss.csv (step, loss) and STAGE_loss.png (raw and smoothed, log scale)."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    path = os.path.join(logs, f"{stage}_loss.csv")

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows((i, f"{v:.6g}") for i, v in enumerate(losses))

    atomic_write(path, write_csv)
    if losses:
        plot_loss_curve(os.path.join(logs, f"{stage}_loss.png"), stage, losses)


def plot_loss_curve(path: str, stage: str, losses: list) -> None:
    """The losses (raw, and a running mean of len/50) against the step, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    ax.plot(losses, lw=0.5, alpha=0.4, label="loss")
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(len(smooth)) + k - 1, smooth, lw=1.5, label=f"mean of {k}")
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=f"minisd train {stage}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Saving and loading the parts of a model folder
# ---------------------------------------------------------------------------------------


@distributed.root_only
def save_part(model, folder: str) -> None:
    from minisd import io

    io.save_pretrained(model, folder)


def load_part(folder: str, cls):
    from minisd import io

    return io.load_pretrained(folder, cls)


def finished(out: str, part: str) -> bool:
    return os.path.isfile(os.path.join(out, part, "config.json"))


# ---------------------------------------------------------------------------------------
# Stage 1: the VAE
# ---------------------------------------------------------------------------------------


def train_vae(out: str, dataset: str = "shapes", steps: int | None = None, batch_size: int | None = None,
              lr: float | None = None, seed: int = 0, config: dict | None = None, resume: bool = False,
              checkpoint_every: int = 200, progress: bool = True, stop_after: int | None = None,
              images=None, font: str | None = None, discard=(), init: str | None = None) -> dict:
    """Train AutoencoderKL on the dataset's images; writes OUT/vae/. Returns the stage's record.

    ``discard``: an earlier run's output this one replaces, removed when training starts (see fit).
    ``init``: a trained VAE's folder to fine-tune (its sizes and weights) instead of starting from
    random weights at ``config``'s sizes."""
    from minisd.models.vae import AutoencoderKL

    steps = steps or DEFAULT_STEPS["vae"]
    batch_size = batch_size or DEFAULT_BATCH["vae"]
    if images is None:
        images, _ = load_dataset(dataset, "train", font)
    x_all = to_model_input(images)
    nn.manual_seed(seed)
    if init is not None:
        vae = load_part(init, AutoencoderKL)
        vae.config["sample_size"] = x_all.shape[-1]
    else:
        vae = AutoencoderKL(**{**(config or VAE_CONFIG), "sample_size": x_all.shape[-1]})
        start_with_narrow_posterior(vae)
    world = distributed.world()

    def loss_fn(rng, n):  # the loss of this rank's rows of the n drawn (all of them in one process)
        x = x_all[rng.integers(0, len(x_all), size=n)]
        x = x[:, :, :, ::-1].copy() if dataset == "emoji" and rng.random() < 0.5 else x  # flips only for emoji
        mine = world.shard(n)
        x = x[mine]
        posterior = vae.encode(x)
        # posterior.sample(rng), z = mean + std * eps, with eps drawn for all n, so that a sample's noise
        # does not depend on how many ranks share the batch
        eps = rng.standard_normal((n, *posterior.mean.shape[1:])).astype(posterior.mean.dtype)[mine]
        recon = vae.decode(posterior.mean + posterior.std * eps)
        diff = recon - x
        # the reconstruction's mean squared error (PSNR's own measure) + a whisper of KL
        return (diff * diff).mean() + KL_WEIGHT * posterior.kl().mean()

    record = fit("vae", dict(vae.named_parameters()), loss_fn, steps=steps, lr=lr or DEFAULT_LR["vae"],
                 out=out, batch_size=batch_size, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
                 progress=progress, stop_after=stop_after, discard=discard)
    if record["step"] >= steps:
        vae.config["scaling_factor"] = measure_scaling_factor(vae, x_all, seed)
        save_part(vae, os.path.join(out, "vae"))
    record["model"] = vae
    return record


def start_with_narrow_posterior(vae, logvar: float = -6.0) -> None:
    """Start q(z|x) narrow (sigma = e^-3 ~ 0.05) instead of sigma ~ 1.

    With KL weight 1e-6 the encoder would shrink sigma anyway, but only after hundreds of
    steps in which the decoder sees latents drowned in noise; starting narrow skips that.
    quant_conv's output is (mean, logvar) along channels, so its second half of biases sets logvar.
    """
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    c = vae.config["latent_channels"]
    layer.bias.data[c:] = logvar


def measure_scaling_factor(vae, x_all: np.ndarray, seed: int = 0, batch: int = 128) -> float:
    """1 / std of the latents z ~ q(z|x) over the training images (SD measured 0.18215 this way)."""
    rng = np.random.default_rng(seed)
    zs = []
    with no_grad():
        for i in range(0, len(x_all), batch):
            zs.append(vae.encode(x_all[i:i + batch]).sample(rng).numpy())
    return float(1.0 / np.concatenate(zs).std())


# ---------------------------------------------------------------------------------------
# Stage 2: CLIP (text tower + image tower, contrastive), and the tokenizer
# ---------------------------------------------------------------------------------------


_WARNED_LONG = set()  # the captions already warned about in this process: once a run, not once a stage


def caption_ids(tokenizer, captions) -> np.ndarray:
    """tokenizer(captions), the captions too long for the 77-token context cut as SD cuts them;
    warned once (on stderr, with the count and the first), not once per caption."""
    room = tokenizer.max_length - 2  # <|startoftext|> and <|endoftext|> take two
    unique = list(dict.fromkeys(captions))
    long = [c for c in unique if len(tokenizer.tokenize(c)) > room]
    key = frozenset(long)
    if long and key not in _WARNED_LONG:
        _WARNED_LONG.add(key)
        print(f"minisd train: warning: {len(long)} of {len(unique)} captions have more than the {room} tokens "
              f"that fit in the text encoder's {tokenizer.max_length}; only their first {room} are used, as in "
              f"SD (the first: {long[0][:60]!r}...)", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tokenizer's own warning, once per caption: said above
        return tokenizer(list(captions))


def train_tokenizer(captions, out: str, like: str | None = None):
    """A BPE vocabulary learned from the captions (SD's CLIP: 49,408 tokens; here a few hundred), saved
    in OUT/tokenizer/; or, fine-tuning a text encoder, the tokenizer folder ``like`` it was trained with
    (its embeddings are rows of that vocabulary: words new to it are spelled in smaller pieces)."""
    from minisd.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(like) if like else Tokenizer.train(sorted(set(captions)), vocab_size=1024)
    tok.save(os.path.join(out, "tokenizer"))  # train_clip calls this on rank 0 alone
    return tok


def train_clip(out: str, dataset: str = "shapes", steps: int | None = None, batch_size: int | None = None,
               lr: float | None = None, seed: int = 0, text_config: dict | None = None,
               vision_config: dict | None = None, resume: bool = False, checkpoint_every: int = 200,
               progress: bool = True, stop_after: int | None = None, data=None, font: str | None = None,
               discard=(), init: str | None = None, tokenizer_from: str | None = None) -> dict:
    """Train CLIPModel contrastively; writes OUT/tokenizer/, OUT/clip/ and the text tower as OUT/text_encoder/.

    Resuming from a checkpoint reuses OUT/tokenizer/: the checkpoint's embeddings are rows of its vocabulary.
    ``init``: a trained CLIPModel's folder (both towers) to fine-tune, with ``tokenizer_from`` its tokenizer."""
    from minisd.models.clip import CLIPModel
    from minisd.tokenizer import Tokenizer

    steps = steps or DEFAULT_STEPS["clip"]
    batch_size = batch_size or DEFAULT_BATCH["clip"]
    images, captions = data if data is not None else load_dataset(dataset, "train", font)
    tok_dir = os.path.join(out, "tokenizer")
    world = distributed.world()

    def tokenizer():  # (tokenizer, reused): made on rank 0, and sent to every rank
        if resume and os.path.isfile(checkpoint_path(out, "clip")) and os.path.isdir(tok_dir):
            return Tokenizer.from_folder(tok_dir), True
        return train_tokenizer(captions, out, like=tokenizer_from), False

    tok, reused = world.from_root(tokenizer)
    if not reused:
        discard = tuple(p for p in discard if os.path.abspath(p) != os.path.abspath(tok_dir))  # just written
    x_all = to_model_input(images)
    ids_all = caption_ids(tok, captions)
    # Group images by caption: a batch takes distinct captions, since two images of the same
    # caption in one batch would each be told that the other is a wrong match.
    groups = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    groups = list(groups.values())
    batch_size = min(batch_size, len(groups) // world.size * world.size)
    tc = {**(text_config or TEXT_CONFIG), "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
          "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id}
    vc = {**(vision_config or VISION_CONFIG), "image_size": x_all.shape[-1]}
    nn.manual_seed(seed + 1)
    if init is not None:
        clip = load_part(init, CLIPModel)
        if clip.vision_model.config["image_size"] != x_all.shape[-1]:
            raise ValueError(f"train clip: {init}'s image tower takes {clip.vision_model.config['image_size']} px "
                             f"images and these are {x_all.shape[-1]}: give --resolution "
                             f"{clip.vision_model.config['image_size']}")
    else:
        clip = CLIPModel(text_config=tc, vision_config=vc, projection_dim=tc["hidden_size"])

    def loss_fn(rng, n):
        chosen = rng.choice(len(groups), size=n, replace=False)
        idx = np.array([groups[g][rng.integers(len(groups[g]))] for g in chosen])[world.shard(n)]
        # Each caption is scored against every image of the batch: gather_rows gives every rank the
        # embeddings of all n, so that each computes the whole batch's loss (one rank: no-op).
        return clip.contrastive_loss(x_all[idx], ids_all[idx], gather=distributed.gather_rows)

    record = fit("clip", dict(clip.named_parameters()), loss_fn, steps=steps, lr=lr or DEFAULT_LR["clip"],
                 out=out, batch_size=batch_size, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
                 progress=progress, stop_after=stop_after, discard=discard)
    if record["step"] >= steps:
        save_part(clip, os.path.join(out, "clip"))
        save_part(clip.text_model, os.path.join(out, "text_encoder"))
    record["model"] = clip
    return record


# ---------------------------------------------------------------------------------------
# Stage 3: the UNet, on frozen latents and frozen text embeddings
# ---------------------------------------------------------------------------------------


def encode_dataset(vae, images: np.ndarray, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The posterior q(z|x) of every image, (mean, std), computed once: the VAE is frozen now."""
    x_all = to_model_input(images)
    means, stds = [], []
    with no_grad():
        for i in range(0, len(x_all), batch):
            post = vae.encode(x_all[i:i + batch])
            means.append(post.mean.numpy())
            stds.append(post.std.numpy())
    return np.concatenate(means), np.concatenate(stds)


def encode_prompts(text_encoder, tokenizer, prompts, batch: int = 64) -> np.ndarray:
    """The frozen text encoder's (len(prompts), 77, hidden) states, computed once."""
    ids = caption_ids(tokenizer, prompts)
    out = []
    with no_grad():
        for i in range(0, len(prompts), batch):
            out.append(text_encoder(ids[i:i + batch]).numpy())
    return np.concatenate(out)


def train_unet(out: str, dataset: str = "shapes", steps: int | None = None, batch_size: int | None = None,
               lr: float | None = None, seed: int = 0, config: dict | None = None, resume: bool = False,
               checkpoint_every: int = 200, progress: bool = True, stop_after: int | None = None,
               data=None, font: str | None = None, discard=(), init: str | None = None,
               quality_every: int = 0, quality_prompts: int = 0, snr_gamma: float | None = SNR_GAMMA) -> dict:
    """Train UNet2DConditionModel on OUT/vae's latents and OUT/text_encoder's states; writes OUT/unet/ (EMA weights).

    ``quality_every``: every that many steps, log the loss and (shapes) the adherence of
    ``quality_prompts`` images sampled from the EMA weights against wall-clock minutes (QualityLog).
    ``snr_gamma``: weight each sample's loss by min-SNR-gamma (denoising_loss; None or 0: plain MSE, SD's).

    ``init``: a trained UNet's folder to fine-tune (its sizes and weights; SD's noise schedule, as minisd's)."""
    from minisd.models.clip import CLIPTextModel
    from minisd.models.unet import UNet2DConditionModel
    from minisd.models.vae import AutoencoderKL
    from minisd.schedulers import DDPMScheduler
    from minisd.tokenizer import Tokenizer

    def check_parts():
        for part in ("vae", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(out, part)):
                raise ValueError(f"train unet needs {os.path.join(out, part)}: run `minisd train "
                                 f"{'vae' if part == 'vae' else 'clip'} --out {out}` first, or --from MODEL")

    world = distributed.world()
    world.from_root(check_parts)  # on N ranks, also a wait for rank 0 to finish writing the earlier stages
    steps = steps or DEFAULT_STEPS["unet"]
    batch_size = batch_size or DEFAULT_BATCH["unet"]
    images, captions = data if data is not None else load_dataset(dataset, "train", font)
    vae = load_part(os.path.join(out, "vae"), AutoencoderKL)
    text_encoder = load_part(os.path.join(out, "text_encoder"), CLIPTextModel)
    tok = Tokenizer.from_folder(os.path.join(out, "tokenizer"))
    scale = float(vae.config["scaling_factor"])
    if images.shape[1] != vae.config["sample_size"]:
        raise ValueError(f"train unet: the images are {images.shape[1]} x {images.shape[1]} and "
                         f"{os.path.join(out, 'vae')} was trained at {vae.config['sample_size']}: train both at one "
                         "size (--resolution)")

    mean, std = encode_dataset(vae, images)
    prompts = sorted(set(captions))
    embeddings = encode_prompts(text_encoder, tok, [UNCONDITIONAL_PROMPT] + prompts)  # row 0: unconditional
    row_of = {p: 1 + i for i, p in enumerate(prompts)}
    caption_row = np.array([row_of[c] for c in captions])
    # frozen, and their outputs cached above: kept only for the time-to-quality log's samples
    frozen = (vae, text_encoder, tok) if quality_every and quality_prompts and dataset == "shapes" else None
    del vae, text_encoder

    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)  # from_config: DDIM-only keys are ignored
    unet_config = dict(config or UNET_CONFIG)
    unet_config["cross_attention_dim"] = embeddings.shape[-1]
    unet_config["sample_size"] = mean.shape[-1]
    unet_config["in_channels"] = unet_config["out_channels"] = mean.shape[1]
    nn.manual_seed(seed + 2)
    if init is not None:
        unet = load_part(init, UNet2DConditionModel)
        need = {"in_channels": mean.shape[1], "cross_attention_dim": embeddings.shape[-1]}
        for key, value in need.items():
            if unet.config[key] != value:
                raise ValueError(f"train unet: {init} has {key}={unet.config[key]}, and the VAE and text encoder "
                                 f"it is to work with need {value}: fine-tune it with the parts it was trained "
                                 "with, or give its sizes in --config to train a new one")
        unet.config["sample_size"] = mean.shape[-1]
    else:
        unet = UNet2DConditionModel(**unet_config)

    def loss_fn(rng, n):  # all n drawn (cheap), the UNet run on this rank's rows of them
        idx = rng.integers(0, len(mean), size=n)
        z0 = scale * (mean[idx] + std[idx] * rng.standard_normal(mean[idx].shape).astype(np.float32))
        noise = rng.standard_normal(z0.shape).astype(np.float32)
        t = rng.integers(0, scheduler.num_train_timesteps, size=n)
        x_t = scheduler.add_noise(z0, noise, t)
        rows = np.where(rng.random(n) < CAPTION_DROPOUT, 0, caption_row[idx])
        mine = world.shard(n)
        pred = unet(x_t[mine], t[mine], embeddings[rows[mine]])
        return denoising_loss(pred, noise[mine], t[mine], scheduler.alphas_cumprod, snr_gamma)

    # a run shorter than quality_every (a test's, a smoke run) has no curve to draw; on N ranks rank 0
    # alone samples and writes it (the others wait for it at the next step's all-reduce)
    quality = QualityLog(out, steps, quality_every, quality_prompts, unet, frozen, resume) \
        if quality_every and steps >= quality_every and world.is_root else None
    if quality is None and not resume and world.is_root:  # an earlier run's curve is not this run's
        remove_paths([os.path.join(out, "logs", f"unet_quality.{ext}") for ext in ("csv", "png")])
    record = fit("unet", dict(unet.named_parameters()), loss_fn, steps=steps, lr=lr or DEFAULT_LR["unet"],
                 out=out, batch_size=batch_size, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
                 progress=progress, ema_decay=EMA_DECAY, stop_after=stop_after, discard=discard, on_step=quality)
    if quality is not None:
        record["quality"] = quality.finish(record["seconds"])
    if record["step"] >= steps:
        record["ema"].copy_to(unet.parameters())  # ship the averaged weights, as SD does
        save_part(unet, os.path.join(out, "unet"))
        from minisd.schedulers import DDIMScheduler

        if world.is_root:
            DDIMScheduler.from_config(SCHEDULER_CONFIG).save_config(os.path.join(out, "scheduler"))
        write_model_index(out)
    record["model"] = unet
    return record


# ---------------------------------------------------------------------------------------
# The time-to-quality log: how good the UNet is after how many minutes
# ---------------------------------------------------------------------------------------

QUALITY_EVERY = 250  # steps between two samples (20 in a default 5000-step run)
QUALITY_PROMPTS = 12  # images a sample: half seen colour-shape pairs, half held-out ones
QUALITY_STEPS = 10  # DDIM steps an image (eval's 50 cost 5x; the curve's shape is what matters)
QUALITY_GUIDANCE = 5.0
QUALITY_FIELDS = ("step", "minutes", "loss", "adherence_seen", "adherence_heldout", "sample_seconds")


class QualityLog:
    """OUT/logs/unet_quality.csv and .png: the loss, and the prompt adherence of images sampled from
    the EMA weights, against the training's wall-clock minutes, every ``every`` steps and at the end.

    Adherence is read by the shapes reader (minisd/data/reader.py), so it is sampled on the shapes
    dataset only (``frozen`` = (vae, text_encoder, tokenizer), None elsewhere: the loss alone is
    logged, at no cost). A sample swaps the EMA weights into the UNet, generates ``prompts``
    captions (half of them held-out pairs) with QUALITY_STEPS DDIM steps at w = 5 from a fixed
    seed, and puts the training weights back exactly, so training goes on as without it. Its own
    time is left out of ``minutes`` and reported (finish). Measured with the shipped model on the
    shared 2-core machine: 1.4-1.7 s a sample, so 20 samples (~30 s) against the 805-940 s of a
    default UNet run, about 3%.
    On --resume the rows before the first step resumed are kept and the minutes go on from them.
    """

    def __init__(self, out: str, total: int, every: int, prompts: int, unet, frozen, resume: bool):
        self.out, self.total, self.every, self.unet, self.pipe = out, total, every, unet, None
        self.path = os.path.join(out, "logs", "unet_quality.csv")
        self.rows = read_quality_csv(self.path) if resume else []
        self.first = None
        self.start, self.sampling = time.perf_counter(), 0.0
        if frozen is not None and prompts and distributed.world().is_root:  # the EMA is the same on every rank
            from minisd.data import shapes
            from minisd.pipeline import StableDiffusionPipeline
            from minisd.schedulers import DDIMScheduler

            vae, text_encoder, tok = frozen
            pipe = StableDiffusionPipeline(vae, text_encoder, tok, unet, DDIMScheduler.from_config(SCHEDULER_CONFIG))
            unet.train()  # the pipeline sets eval(); the UNet trains until a sample
            rng, self.records = np.random.default_rng(0), {}
            for split, n in (("seen", (prompts + 1) // 2), ("heldout", prompts // 2)):
                combos = shapes.combinations("train" if split == "seen" else "heldout")
                pick = rng.choice(len(combos), n, replace=n > len(combos))
                self.records[split] = [shapes.ShapeRecord(*combos[i]) for i in pick]
            self.pipe = pipe

    def __call__(self, step: int, losses: list, ema) -> None:
        if self.first is None:
            self.first = step
            self.rows = [r for r in self.rows if r["step"] < step]
            self.start -= 60 * (self.rows[-1]["minutes"] if self.rows else 0.0)  # the minutes go on
        if step % self.every and step != self.total:
            return
        minutes = (time.perf_counter() - self.start - self.sampling) / 60
        row = {"step": step, "minutes": round(minutes, 3), "loss": float(np.mean(losses[-min(self.every, 50):])),
               "adherence_seen": None, "adherence_heldout": None, "sample_seconds": 0.0}
        if self.pipe is not None and ema is not None:
            began = time.perf_counter()
            row.update(self.adherence(ema))
            row["sample_seconds"] = round(time.perf_counter() - began, 2)
            self.sampling += row["sample_seconds"]
        self.rows.append(row)
        write_quality_csv(self.path, self.rows)

    def adherence(self, ema) -> dict:
        """The fraction of the sampled images, per split, whose four attributes the reader reads right."""
        from minisd.data.reader import read

        params = ema.params  # the UNet's parameters, in the order of ema.shadow
        training = [p.data.copy() for p in params]
        ema.copy_to(params)
        try:
            found = {}
            for split, records in self.records.items():
                if not records:
                    continue
                images = self.pipe([r.caption for r in records], steps=QUALITY_STEPS,
                                   guidance_scale=QUALITY_GUIDANCE, seed=0)
                found[f"adherence_{split}"] = round(float(np.mean([read(im).matches(r)
                                                                   for im, r in zip(images, records)])), 4)
            return found
        finally:
            for p, data in zip(params, training):
                p.data[...] = data
            self.unet.train()

    def finish(self, seconds: float) -> dict:
        """Draw the PNG; say what the samples cost. Returns {"samples", "sample_seconds", "fraction"}."""
        sampled = [r for r in self.rows if r["adherence_seen"] is not None]
        cost = {"samples": len(sampled), "sample_seconds": round(self.sampling, 1),
                "fraction": round(self.sampling / seconds, 4) if seconds > 0 else 0.0}
        if self.rows:
            plot_quality(os.path.join(self.out, "logs", "unet_quality.png"), self.rows)
        if cost["fraction"] > 0.05:
            print(f"minisd train unet: note: the time-to-quality log's samples took {cost['fraction']:.0%} of the "
                  f"run ({cost['sample_seconds']:.0f} s); --quality-every larger (or 0: off) makes it cheaper",
                  file=sys.stderr)
        return cost


@distributed.root_only
def write_quality_csv(path: str, rows: list) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=QUALITY_FIELDS)
            w.writeheader()
            w.writerows({k: ("" if r[k] is None else r[k]) for k in QUALITY_FIELDS} for r in rows)

    atomic_write(path, write)


def read_quality_csv(path: str) -> list:
    """The rows write_quality_csv wrote ([] where there is no readable file)."""
    try:
        with open(path, newline="") as f:
            return [{"step": int(r["step"]), "minutes": float(r["minutes"]), "loss": float(r["loss"]),
                     **{k: float(r[k]) if r[k] else None for k in ("adherence_seen", "adherence_heldout")},
                     "sample_seconds": float(r["sample_seconds"])} for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


@distributed.root_only
def plot_quality(path: str, rows: list) -> None:
    """Adherence (seen and held-out pairs, %) and the loss (log scale) against wall-clock minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minutes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    loss_ax = ax.twinx()
    loss_ax.plot(minutes, [r["loss"] for r in rows], color="tab:gray", lw=1, label="loss")
    if min(r["loss"] for r in rows) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    for split, color in (("seen", "tab:blue"), ("heldout", "tab:orange")):
        points = [(r["minutes"], 100 * r[f"adherence_{split}"]) for r in rows if r[f"adherence_{split}"] is not None]
        if points:
            ax.plot(*zip(*points), "o-", color=color, ms=3, label=f"adherence, {split} pairs")
    ax.set(xlabel="wall-clock minutes of training", ylabel="adherence %", ylim=(-2, 102),
           title="minisd train unet: time to quality")
    handles = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def min_snr_weights(alphas_cumprod: np.ndarray, t: np.ndarray, gamma: float) -> np.ndarray:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023, "Efficient Diffusion Training
    via Min-SNR Weighting Strategy"): with SNR(t) = alpha_bar_t / (1 - alpha_bar_t),

        w_t = min(SNR(t), gamma) / SNR(t)

    The epsilon loss |eps - eps_hat|^2 is SNR(t) times the x_0 loss |x_0 - x_0_hat|^2, so in
    x_0's terms it leans on the least noisy steps, where SNR is in the hundreds; capping that
    weight at gamma (5 in the paper) evens out the steps' pulls on the network, which the paper
    finds converges up to 3.4x faster. Low-noise steps (SNR > gamma) are weighted down, the noisy
    ones, where the layout and colours are decided, keep weight 1. float32 (len(t),)."""
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    return (np.minimum(snr, gamma) / snr).astype(np.float32)


def denoising_loss(pred, noise, t, alphas_cumprod, snr_gamma: float | None = None):
    """The UNet's loss: mean |eps - eps_theta|^2 (Ho et al. 2020, SD), or, with ``snr_gamma``, each
    sample's mean squared error times its min-SNR-gamma weight, averaged over the batch (as diffusers'
    train_text_to_image.py --snr_gamma). ``snr_gamma`` None or 0: the plain mean."""
    if not snr_gamma:
        return F.mse_loss(pred, noise)
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(axis=(1, 2, 3))
    return (per_sample * min_snr_weights(alphas_cumprod, t, snr_gamma)).mean()


def write_model_index(out: str) -> None:
    """model_index.json: which class each subfolder holds, as diffusers' StableDiffusionPipeline reads it."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "_minisd_version": __import__("minisd").__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    write_json(os.path.join(out, "model_index.json"), index)


# ---------------------------------------------------------------------------------------
# All stages
# ---------------------------------------------------------------------------------------


def train_all(out: str, dataset: str = "shapes", steps: dict | None = None, seed: int = 0, resume: bool = False,
              checkpoint_every: int = 200, progress: bool = True, keep_checkpoints: bool = False,
              font: str | None = None, overwrite: bool = False, data=None, configs: dict | None = None,
              source: str | None = None, quality: tuple = (0, 0), snr_gamma: float | None = SNR_GAMMA,
              lrs: dict | None = None) -> dict:
    """vae -> clip -> unet; a stage already finished in OUT is skipped when resuming.

    ``steps``: {stage: steps} for the stages not to run at their defaults. ``overwrite``
    removes what every stage wrote in OUT before (once the first stage passes its checks):
    a new VAE or text encoder makes the old UNet wrong, so nothing of the old model may
    stay to be taken, on a later --resume, for a finished stage. ``data``: (images, captions)
    to train on instead of the named dataset's (a captioned folder's); ``configs``: {part: config}
    sizes instead of the defaults (see read_model_config); ``source``: a model folder whose parts
    the stages start from (--from); ``quality``: the UNet's (quality_every, quality_prompts);
    ``snr_gamma``: its min-SNR-gamma loss weighting (None or 0: off); ``lrs``: {stage: peak learning rate}
    for the stages not to run at DEFAULT_LR's (--preset quick).
    """
    steps = steps or {}
    data = data if data is not None else load_dataset(dataset, "train", font)
    report = {"dataset": dataset, "seed": seed, "stages": {}}
    configs = configs or {}
    runners = {"vae": lambda **kw: train_vae(images=data[0], **stage_kwargs("vae", configs, source), **kw),
               "clip": lambda **kw: train_clip(data=data, **stage_kwargs("clip", configs, source), **kw),
               "unet": lambda **kw: train_unet(data=data, **stage_kwargs("unet", configs, source), **kw,
                                               quality_every=quality[0], quality_prompts=quality[1],
                                               snr_gamma=snr_gamma)}
    discard = tuple(p for stage in STAGES for p in stage_outputs(out, stage)) if overwrite else ()
    for stage in STAGES:
        if resume and finished(out, DONE_MARKER[stage]):
            print(f"minisd train all: {stage} already trained in {out}; skipped")
            continue
        rec = runners[stage](out=out, dataset=dataset, steps=steps.get(stage), seed=seed, resume=resume,
                             checkpoint_every=checkpoint_every, progress=progress, discard=discard,
                             lr=(lrs or {}).get(stage))
        discard = ()  # the first stage run removed them
        report["stages"][stage] = summarise(stage, rec)
        print(f"minisd train {stage}: {describe(report['stages'][stage], rec)}")
    if not keep_checkpoints and distributed.world().is_root:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return report


def stage_kwargs(stage: str, configs: dict, source: str | None = None) -> dict:
    """The keyword arguments that give a stage's function the sizes of --config's parts, and the
    trained parts of ``source`` (--from) it starts from."""
    names = {"vae": {"config": "vae"}, "clip": {"text_config": "text_encoder", "vision_config": "vision_config"},
             "unet": {"config": "unet"}}[stage]
    kwargs = {arg: configs[part] for arg, part in names.items() if part in configs}
    parts = stage_parts(stage, configs)[stage] if source is not None else []
    if parts:
        kwargs["init"] = os.path.join(source, parts[0])
    if "tokenizer" in parts:
        kwargs["tokenizer_from"] = os.path.join(source, "tokenizer")
    return kwargs


def summarise(stage: str, rec: dict) -> dict:
    """What train_STAGE.json records of a stage. final_loss: the mean of the last 50 losses (None if none)."""
    losses = rec["losses"]
    # cpu_seconds: the time this process actually ran; on a shared machine wall time is longer.
    return {"steps": rec["step"], "seconds": round(rec["seconds"], 1), "cpu_seconds": round(rec["cpu_seconds"], 1),
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
            **({"quality_log": rec["quality"]} if "quality" in rec else {})}


def describe(summary: dict, rec: dict) -> str:
    loss = "no steps run" if summary["final_loss"] is None else f"final loss {summary['final_loss']:.4f}"
    return f"{rec['step']} steps in {rec['seconds']:.0f} s, {loss}"


@distributed.root_only
def write_json(path: str, obj) -> None:
    """obj as indented JSON, atomically; NaN and inf are refused (they are not JSON, and never a result)."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------
# What a stage leaves in OUT: the output that --resume / --overwrite speak of, and the
# temporary files a killed run leaves behind
# ---------------------------------------------------------------------------------------

# The folders and files each stage writes (besides logs/, which every run rewrites), and the
# one whose config.json says the stage finished. tokenizer/ is clip's: its vocabulary sizes
# the text encoder's embeddings.
OUTPUTS = {"vae": ("vae",), "clip": ("clip", "text_encoder", "tokenizer"),
           "unet": ("unet", "scheduler", "model_index.json")}
DONE_MARKER = {"vae": "vae", "clip": "text_encoder", "unet": "unet"}


def checkpoint_path(out: str, stage: str) -> str:
    return os.path.join(out, "checkpoints", f"{stage}.npz")


def stage_outputs(out: str, stage: str) -> list[str]:
    """The paths in OUT that a run of ``stage`` wrote and would replace: its parts and its checkpoint."""
    paths = [os.path.join(out, name) for name in OUTPUTS[stage]] + [checkpoint_path(out, stage)]
    return [p for p in paths if os.path.lexists(p)]


# The temporary names minisd's writers use, and only those: io's ".NAME.PID-XXXXXXXX.tmp"
# (8 random hex digits; files, and folders written whole before they are renamed), earlier
# versions' tempfile names ".NAME.XXXXXXXX.tmp" (mkstemp) and ".NAME.XXXXXXXX" (mkdtemp), with
# 8 random characters of [a-z0-9_], and train's old "NAME.tmp-PID".
TEMP_FILE = re.compile(r"\..+\.(\d+-[0-9a-f]{8}|[a-z0-9_]{8})\.tmp|.+\.tmp-\d+")
TEMP_DIR = re.compile(r"\..+\.(\d+-[0-9a-f]{8}\.tmp|[a-z0-9_]{8})")


@distributed.root_only
def remove_stray_temporaries(out: str, before: float) -> list[str]:
    """Remove the temporary files and folders that killed runs and full disks left in OUT and in
    its folders (vae/, checkpoints/, logs/, ...), those last changed before ``before`` (a
    time.time()), so that a writer still at work keeps its own. Returns the paths removed."""
    removed = []
    folders = [out] + [os.path.join(out, d) for d in sorted(os.listdir(out))
                       if not d.startswith(".") and os.path.isdir(os.path.join(out, d))]
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            pattern = TEMP_DIR if is_dir else TEMP_FILE
            try:
                if pattern.fullmatch(name) and os.lstat(path).st_mtime < before:
                    remove_paths([path])
                    removed.append(path)
            except OSError:
                pass  # gone already, or not ours to remove: leave it
    return removed


# ---------------------------------------------------------------------------------------
# Fine-tuning: the parts of a trained model a stage starts from (--from MODEL)
# ---------------------------------------------------------------------------------------


def stage_parts(stage: str, configs: dict) -> dict:
    """{stage: [parts of --from's model it starts from]}: a part --config sizes is trained new instead."""
    parts = {"vae": [] if "vae" in configs else ["vae"],
             "clip": [] if {"text_encoder", "vision_config"} & set(configs) else ["clip", "tokenizer"],
             "unet": [] if "unet" in configs else ["unet"]}
    return {s: parts[s] for s in (STAGES if stage == "all" else (stage,))}


def take_frozen_parts(out: str, source: str) -> None:
    """train unet --from MODEL: MODEL's VAE, text encoder and tokenizer, copied into OUT where OUT has none
    (and MODEL's clip/ with its text encoder, for eval's CLIP score); OUT's own are kept and used. The
    package's files are only read. Each folder is copied whole under a temporary name, then renamed."""
    from minisd import io

    os.makedirs(out, exist_ok=True)
    copied = []
    for part in ("vae", "text_encoder", "tokenizer", "clip"):
        target = os.path.join(out, part)
        if os.path.exists(target) or (part == "clip" and "text_encoder" not in copied) \
                or not os.path.isdir(os.path.join(source, part)):
            continue
        tmp = io.temporary_folder(target)
        try:
            shutil.copytree(os.path.join(source, part), tmp, dirs_exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(target):  # (another process may have put it there first: that one is as good)
                raise
        copied.append(part)
    kept = [p for p in ("vae", "text_encoder", "tokenizer") if p not in copied]
    print("minisd train unet: frozen parts: " + ", ".join(
        [f"{p} from {source} (copied)" for p in copied] + [f"{p} already in {out}" for p in kept]))
