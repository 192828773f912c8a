# %% [markdown]
# # Lesson 3: the forward process, an image drowned in noise
#
# A diffusion model learns to undo noise. To train it, we need images at every level
# of destruction, from clean to pure noise. The forward process adds Gaussian noise in
# T = 1000 small steps with variances beta_1 ... beta_T:
#
#     x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z_t,     z_t ~ N(0, I)
#
# and because Gaussians compose, any step can be reached in one jump (DDPM, eq. 4):
#
#     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) epsilon,
#     alpha_t = 1 - beta_t,   alpha_bar_t = alpha_1 alpha_2 ... alpha_t
#
# The UNet is trained to recover epsilon from (x_t, t). Sampling later walks back
# through 50 of the 1000 steps (SD's default: 50 inference steps), so this lesson
# shows the image at exactly those 50 timesteps, with Stable Diffusion's own schedule
# ("scaled_linear", beta from 0.00085 to 0.012), using `minisd.schedulers`.
#
# In Stable Diffusion the noise is added not to the pixels but to the VAE's latents
# (SD: (4, 64, 64) for a (3, 512, 512) image). We first noise pixels, where we can see
# it, then latents, when a trained VAE is available.
#
# Run: `python lessons/03_forward_noise.py [--out DIR] [--fast]`.

# %%
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

from minisd import viz
from minisd.data import shapes
from minisd.data.images import to_model_input
from minisd.schedulers import DDIMScheduler, DDPMScheduler

plt = viz.plt
args = viz.lesson_args("03_forward_noise")
results = {}
t_start = time.perf_counter()

# %% [markdown]
# ## 1. Stable Diffusion's schedule
#
# The scheduler config of SD v1.5 (its `scheduler/scheduler_config.json`). DDPM and DDIM
# differ only in how they *remove* noise; they add it the same way, from the same
# alpha_bar_t. `set_timesteps(50)` picks the 50 timesteps that sampling visits.

# %%
viz.header("1. the schedule")
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                   beta_end=0.012, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
scheduler = DDIMScheduler(**SD_SCHEDULE)
ddpm = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"})
assert np.array_equal(scheduler.alphas_cumprod, ddpm.alphas_cumprod)
n_steps = viz.SD["inference_steps"]
scheduler.set_timesteps(n_steps)
timesteps = scheduler.timesteps[::-1].copy()  # ascending: the order noise is added
abar = scheduler.alphas_cumprod
print(f"  {scheduler}")
print(f"  {n_steps} inference steps (SD: {viz.SD['inference_steps']}) out of {scheduler.num_train_timesteps} "
      f"training timesteps: t = {timesteps[0]}, {timesteps[1]}, ..., {timesteps[-1]}")
for t in (timesteps[0], 250, 500, 750, timesteps[-1], 999):
    print(f"  t = {t:3d}: beta {scheduler.betas[t]:.5f}  alpha_bar {abar[t]:.5f}  "
          f"signal sqrt(alpha_bar) {np.sqrt(abar[t]):.3f}  noise sqrt(1-alpha_bar) {np.sqrt(1 - abar[t]):.3f}")
results["timesteps_first"] = int(timesteps[0])
results["timesteps_last"] = int(timesteps[-1])
results["n_steps"] = len(timesteps)
results["alpha_bar_last"] = float(abar[timesteps[-1]])

# %% [markdown]
# The curves: how much noise each step adds (beta_t), how much of the image is left
# (alpha_bar_t; the signal's weight sqrt(alpha_bar_t) and the noise's sqrt(1 - alpha_bar_t)),
# and the signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t), falling over
# five orders of magnitude. Dots mark the 50 visited timesteps. DDPM's original "linear"
# schedule (pixels, beta 1e-4 to 0.02) is drawn for comparison: it destroys the image
# faster.

# %%
t_all = np.arange(scheduler.num_train_timesteps)
linear = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
snr = abar / (1 - abar)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
axes[0].plot(t_all, scheduler.betas, label="SD: scaled_linear")
axes[0].plot(t_all, linear.betas, "--", color="0.5", label="DDPM: linear")
axes[0].set_title("beta_t: variance added at step t", fontsize=9)
axes[1].plot(t_all, abar, label="alpha_bar_t")
axes[1].plot(t_all, np.sqrt(abar), label="sqrt(alpha_bar_t): signal")
axes[1].plot(t_all, np.sqrt(1 - abar), label="sqrt(1 - alpha_bar_t): noise")
axes[1].plot(t_all, linear.alphas_cumprod, "--", color="0.5", label="alpha_bar_t, DDPM linear")
axes[1].scatter(timesteps, abar[timesteps], s=6, c="k", zorder=3, label="the 50 sampling steps")
axes[1].set_title("how much image is left", fontsize=9)
axes[2].semilogy(t_all, snr, label="SD: scaled_linear")
axes[2].semilogy(t_all, linear.alphas_cumprod / (1 - linear.alphas_cumprod), "--", color="0.5", label="DDPM: linear")
axes[2].scatter(timesteps, snr[timesteps], s=6, c="k", zorder=3)
axes[2].axhline(1, color="k", lw=0.5, ls=":")
axes[2].set_title("signal-to-noise ratio alpha_bar / (1 - alpha_bar)", fontsize=9)
for ax in axes:
    ax.set_xlabel("timestep t")
    ax.legend(fontsize=6.5)
fig.tight_layout()
viz.save(fig, args.out / "schedule.png")
t_snr1 = int(np.argmin(np.abs(snr - 1)))
print(f"  signal and noise are equal (SNR = 1) at t = {t_snr1}")
results["t_snr_equals_1"] = t_snr1

# %% [markdown]
# ## 2. One image, every step
#
# One image x_0 and one draw of epsilon, pushed through all 50 timesteps with
# `scheduler.add_noise(x_0, epsilon, t)`. The first steps barely change it; by t ~ 500 the
# shape is hard to see; at the last step it is almost pure noise. (Pixels are shown
# clipped to [-1, 1].)

# %%
viz.header("2. one image over the 50 steps")
image = shapes.render("red", "circle", "large", "center")
x0 = to_model_input(image)[None]  # (1, 3, 32, 32) in [-1, 1]
eps = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
noisy = np.concatenate([scheduler.add_noise(x0, eps, np.array([t])) for t in timesteps])  # (50, 3, 32, 32)
print(f"  x_0 {x0.shape[1:]} (SD: {viz.SD['image']}); x_t for {len(timesteps)} timesteps: {noisy.shape}")
frames = [x0[0]] + list(noisy)
titles = ["x_0 (clean)"] + [f"t = {t}" for t in timesteps]
viz.save(viz.image_grid(frames, titles=titles, ncols=9, cell=1.0, fontsize=6,
                        title="x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) epsilon, at the 50 sampling timesteps"),
         args.out / "noising_grid.png", dpi=64)
viz.save_gif(frames, args.out / "noising.gif", scale=3, duration_ms=80)
results["frames"] = len(frames)

# %% [markdown]
# ## 3. 1000 small steps = one jump
#
# Is the one-jump formula really what 1000 small steps give? Run the chain
# x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z_t with fresh noise at every step on a
# batch of images, and compare the statistics of its pixels with the jump at each of
# the 50 timesteps: the mean should be sqrt(alpha_bar_t) mean(x_0) and the variance
# alpha_bar_t var(x_0) + (1 - alpha_bar_t).

# %%
viz.header("3. the chain against the jump")
n_images = 16 if args.fast else 64
batch = to_model_input(shapes.make_dataset(n_images, "train", seed=0).images)
rng = np.random.default_rng(1)
x = batch.copy()
chain_mean, chain_std = {}, {}
visit = set(int(t) for t in timesteps)
for t in range(scheduler.num_train_timesteps):
    beta = scheduler.betas[t]
    x = np.sqrt(1 - beta).astype(np.float32) * x + np.sqrt(beta).astype(np.float32) * rng.standard_normal(x.shape, np.float32)
    if t in visit:
        chain_mean[t], chain_std[t] = float(x.mean()), float(x.std())
jump = {int(t): scheduler.add_noise(batch, rng.standard_normal(batch.shape, np.float32), np.full(n_images, t))
        for t in timesteps}
worst_mean = max(abs(chain_mean[t] - float(jump[t].mean())) for t in jump)
worst_std = max(abs(chain_std[t] - float(jump[t].std())) for t in jump)
for t in (timesteps[0], timesteps[12], timesteps[25], timesteps[-1]):
    t = int(t)
    print(f"  t = {t:3d}: chain mean {chain_mean[t]:+.3f} std {chain_std[t]:.3f} | jump mean "
          f"{jump[t].mean():+.3f} std {jump[t].std():.3f} | formula mean {np.sqrt(abar[t]) * batch.mean():+.3f}")
print(f"  over the 50 timesteps: largest difference of the means {worst_mean:.4f}, of the stds {worst_std:.4f}")
results["chain_vs_jump_mean_diff"] = worst_mean
results["chain_vs_jump_std_diff"] = worst_std

# %% [markdown]
# ## 4. The pixels drift to N(0, 1)
#
# Histograms of all pixel values of the batch at a few timesteps. At t = 0 they sit at
# the few colours of the data set (the white background at 1.0); step by step they
# blur into the bell curve of N(0, 1). At the last step the mean is not exactly 0:
# sqrt(alpha_bar_981) = 0.076 of the image is still there. SD's schedule never quite
# reaches pure noise (Lin et al. 2024, "Common diffusion noise schedules and sample
# steps are flawed"), which is why SD struggles to make very dark or very bright images.

# %%
viz.header("4. histograms")
show = [int(t) for t in (timesteps[0], timesteps[10], timesteps[20], timesteps[30], timesteps[40], timesteps[-1])]
grid_x = np.linspace(-4, 4, 200)
gauss = np.exp(-grid_x ** 2 / 2) / np.sqrt(2 * np.pi)
fig, axes = plt.subplots(1, len(show) + 1, figsize=(12, 2.6), sharey=True)
axes[0].hist(batch.ravel(), bins=60, range=(-4, 4), density=True, color="tab:red", alpha=0.7)
axes[0].set_title("x_0\n(the clean images)", fontsize=7)
for ax, t in zip(axes[1:], show):
    v = jump[t].ravel()
    ax.hist(v, bins=60, range=(-4, 4), density=True, color="tab:blue", alpha=0.7)
    ax.set_title(f"t = {t}\nmean {v.mean():+.2f}, std {v.std():.2f}", fontsize=7)
for ax in axes:
    ax.plot(grid_x, gauss, "k", lw=0.8)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("pixel value", fontsize=7)
axes[0].set_ylabel("density (black: N(0, 1))", fontsize=7)
fig.tight_layout()
viz.save(fig, args.out / "histograms.png")
last = jump[int(timesteps[-1])]
results["last_step_mean"] = float(last.mean())
results["last_step_std"] = float(last.std())
results["last_step_expected_mean"] = float(np.sqrt(abar[timesteps[-1]]) * batch.mean())
print(f"  last step t = {timesteps[-1]}: mean {last.mean():+.4f} (expected sqrt(alpha_bar) mean(x_0) = "
      f"{results['last_step_expected_mean']:+.4f}), std {last.std():.4f} (expected ~1)")

# %% [markdown]
# ## 5. The same in latent space
#
# Stable Diffusion never noises pixels: the VAE encoder first maps the image to latents
# z_0 (SD: (4, 64, 64), here (4, h, w)), scaled by `scaling_factor` to unit variance,
# and the forward process runs on those. Decoding a noisy latent shows what the UNet is
# given. This part needs a trained VAE: the model shipped with minisd
# (`minisd.load_pipeline()`) or one given with `--model DIR`; without one the lesson says
# so and skips this part.

# %%
viz.header("5. latent space")


def noise_latents(vae, out):
    """Encode x_0, noise the latents over the 50 timesteps, decode them; figures and numbers."""
    sf = float(vae.config["scaling_factor"])
    with minisd.no_grad():
        z0 = vae.encode(x0).mean.numpy() * sf
        zb = vae.encode(batch).mean.numpy() * sf
    viz.shape_line("latents z_0", z0.shape[1:], viz.SD["latents"])
    print(f"  compression: {x0[0].size} numbers -> {z0[0].size} ({x0[0].size / z0[0].size:.0f}x); "
          f"SD: {np.prod(viz.SD['image']):,} -> {np.prod(viz.SD['latents']):,} (48x)")
    print(f"  scaled latents of the batch: mean {zb.mean():+.3f}, std {zb.std():.3f} (scaling_factor {sf})")
    zeps = np.random.default_rng(0).standard_normal(z0.shape).astype(np.float32)
    picks = [int(t) for t in timesteps[::7]]
    picks += [] if picks[-1] == timesteps[-1] else [int(timesteps[-1])]
    zt = np.concatenate([scheduler.add_noise(z0, zeps, np.array([t])) for t in picks])
    with minisd.no_grad():
        decoded = vae.decode(zt / sf).numpy()
    fig, axes = plt.subplots(z0.shape[1] + 1, len(picks), figsize=(1.2 * len(picks), 1.2 * (z0.shape[1] + 1)))
    for j, t in enumerate(picks):
        for c in range(z0.shape[1]):
            axes[c, j].imshow(zt[j, c], cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
            axes[c, j].set_xticks([])
            axes[c, j].set_yticks([])
            if j == 0:
                axes[c, j].set_ylabel(f"latent ch {c}", fontsize=7)
        axes[-1, j].imshow(viz.to_uint8(decoded[j]), interpolation="nearest")
        axes[-1, j].set_xticks([])
        axes[-1, j].set_yticks([])
        axes[0, j].set_title(f"t = {t}", fontsize=7)
    axes[-1, 0].set_ylabel("decoded", fontsize=7)
    fig.suptitle("noised latents z_t (4 channels) and what the decoder makes of them", fontsize=9)
    fig.tight_layout()
    viz.save(fig, out / "latent_noising.png")
    zlast = scheduler.add_noise(zb, np.random.default_rng(2).standard_normal(zb.shape).astype(np.float32),
                                np.full(len(zb), timesteps[-1]))
    print(f"  latents at the last step: mean {zlast.mean():+.4f}, std {zlast.std():.4f}")
    return {"latent_shape": list(z0.shape[1:]), "latent_last_step_mean": float(zlast.mean()),
            "latent_last_step_std": float(zlast.std()), "latent_std": float(zb.std())}


pipe = viz.load_model(args.model)
results["latent_part"] = pipe is not None
if pipe is None:
    print("  skipped the latent-space part (it needs a trained VAE)")
else:
    results.update(noise_latents(pipe.vae, args.out))

# %% [markdown]
# ## What we saw
#
# - SD's schedule (scaled_linear, 1000 steps) and the 50 timesteps sampling visits.
# - One jump `add_noise(x_0, epsilon, t)` gives the same distribution as t small steps:
#   that is what makes training cheap (any t, one line).
# - Pixels drift to N(0, 1); a trace of the image (7.6%) survives the last step.
#
# Next: the VAE that makes the latents (lesson 4).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
