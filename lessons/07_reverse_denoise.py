# %% [markdown]
# # Lesson 7: from pure noise to an image, step by step
#
# Sampling runs the forward process of lesson 3 backwards. Start from pure noise
# z_T ~ N(0, I) in latent space (SD: (4, 64, 64); here (4, 8, 8)), and at each of the 50
# timesteps the scheduler visits:
#
# 1. the UNet predicts the noise, epsilon_hat = epsilon_theta(z_t, t, c) (with
#    classifier-free guidance: eps_u + w (eps_c - eps_u), lesson 8);
# 2. that gives a guess of the clean latent,
#    z0_hat = (z_t - sqrt(1 - alpha_bar_t) epsilon_hat) / sqrt(alpha_bar_t);
# 3. the scheduler moves to the previous timestep t'. DDIM (eta = 0), deterministic:
#    z_t' = sqrt(alpha_bar_t') z0_hat + sqrt(1 - alpha_bar_t') epsilon_hat.
#
# After the last step the VAE decoder turns z_0 into the image. This lesson records
# z_t, epsilon_hat and z0_hat at every step (the pipeline's `callback`), decodes them,
# and compares three samplers: DDIM, DDPM and Euler.
#
# Needs a trained model: the one shipped with minisd, or `--model DIR`.
#
# Run: `python lessons/07_reverse_denoise.py [--out DIR] [--fast] [--model DIR]`.

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

plt = viz.plt
args = viz.lesson_args("07_reverse_denoise")
results = {}
t_start = time.perf_counter()
pipe = viz.require_model(args, results)

# %% [markdown]
# ## 1. Run the sampler and keep every step
#
# The pipeline calls `callback(step, t, z, eps_hat, z0_hat)` after each step. We start
# from our own z_T (the same for every sampler below) so that the comparison is fair.

# %%
viz.header("1. sampling, every step recorded")
steps = 5 if args.fast else viz.SD["inference_steps"]
prompt = "a large blue square in the center"
guidance = 5.0
latent_shape = pipe.latent_shape
z_T = np.random.default_rng(0).standard_normal((1, *latent_shape)).astype(np.float32)
record = []


def keep(step, t, z, eps_hat, z0_hat):
    record.append((t, np.array(z), np.array(eps_hat), np.array(z0_hat)))


t0 = time.perf_counter()
final = pipe(prompt, steps=steps, guidance_scale=guidance, latents=z_T, callback=keep, scheduler="ddim")[0]
print(f"  {prompt!r}: {steps} DDIM steps (SD: {viz.SD['inference_steps']}), guidance {guidance}, "
      f"in {time.perf_counter() - t0:.1f} s")
viz.shape_line("z_T, z_t, eps_hat, z0_hat", latent_shape, viz.SD["latents"])
visited = [int(r[0]) for r in record]
# a short run (--fast) lists every timestep; a long one its first four and last two
print(f"  timesteps visited: {visited}" if len(visited) <= 6 else f"  timesteps visited: {visited[:4]} ... {visited[-2:]}")
results["steps"] = len(record)
results["timesteps"] = visited

# %% [markdown]
# ## 2. Decode everything
#
# Latents are not pictures; the decoder makes them pictures. For each step: z_t (the
# noisy state, decoded as it stands), the predicted noise (its first three latent
# channels shown as colours), and z0_hat, the model's current guess of the final
# latent, decoded. Early on z0_hat is a blurry average of plausible images; it sharpens
# as t falls.

# %%
viz.header("2. decoding every step")
z_all = np.concatenate([z_T] + [r[1] for r in record])  # z_T, then z after each step
x0_all = np.concatenate([r[3] for r in record])
decoded = pipe.decode_latents(np.concatenate([z_all, x0_all]))
x_t_images, x0_images = decoded[:len(z_all)], decoded[len(z_all):]
scale = x_t_images.shape[1] // latent_shape[1]


def noise_picture(eps_hat):
    """The first three channels of eps_hat as an RGB picture, enlarged to the image's size."""
    rgb = np.clip(eps_hat[0, :3].transpose(1, 2, 0) / 3 + 0.5, 0, 1)
    return viz.upscale(viz.to_uint8(rgb), scale)


cells, titles = [], []
per_row = 5  # steps per row of the grid, each a triple (z_t, eps_hat, z0_hat)
for i, (t, _, eps_hat, _) in enumerate(record):
    cells += [x_t_images[i], noise_picture(eps_hat), x0_images[i]]
    titles += [f"t = {t}", "eps_hat" if i < per_row else "", "z0_hat" if i < per_row else ""]
viz.save(viz.image_grid(cells, titles=titles, ncols=3 * per_row, cell=0.8, fontsize=7, wrap=30,
                        title=f"{prompt!r}: at every step z_t (decoded), the predicted noise, the predicted z_0 (decoded)"),
         args.out / "reverse_grid.png")

gap = np.full((x_t_images.shape[1], 4, 3), 255, np.uint8)
frames = [np.concatenate([x_t_images[i], gap, x0_images[min(i, len(x0_images) - 1)]], axis=1)
          for i in range(len(x_t_images))]
viz.save_gif(frames, args.out / "reverse.gif", scale=3, duration_ms=150)
print("  GIF: left z_t decoded, right the prediction z0_hat decoded")

# %% [markdown]
# ## 3. The guesses converge on the final image
#
# How far is each step's decoded z0_hat from the image the sampler ends with? And how
# far is z_t itself? Both distances fall to (near) zero, z0_hat much sooner: after a
# step or two the model knows what it is going to draw, and the remaining steps add
# detail. (The very first guess can be further off than z_t: a noisy latent decodes to
# a mostly white picture, which is close to any image of a small shape on white.)
# On the right: how much the guess still moves from one step to the next.

# %%
viz.header("3. convergence")
final_f = final.astype(np.float64) / 255
d_x0 = [float(np.sqrt(((im.astype(np.float64) / 255 - final_f) ** 2).mean())) for im in x0_images]
d_xt = [float(np.sqrt(((im.astype(np.float64) / 255 - final_f) ** 2).mean())) for im in x_t_images[1:]]
ts = [r[0] for r in record]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].plot(range(1, len(ts) + 1), d_x0, "o-", ms=3, label="decoded z0_hat")
axes[0].set_xticks(range(1, len(ts) + 1, max(1, len(ts) // 10)))
axes[0].plot(range(1, len(ts) + 1), d_xt, "s-", ms=3, label="decoded z_t")
axes[0].set_xlabel("step")
axes[0].set_ylabel("RMS distance to the final image")
axes[0].set_title("the predictions approach the final image", fontsize=9)
axes[0].legend(fontsize=7)
x0_f = x0_images.astype(np.float64) / 255
change = np.sqrt(((x0_f[1:] - x0_f[:-1]) ** 2).reshape(len(x0_f) - 1, -1).mean(axis=1))
axes[1].semilogy(range(2, len(ts) + 1), np.maximum(change, 1e-6), "o-", ms=3)
axes[1].set_xlabel("step")
axes[1].set_ylabel("RMS change of decoded z0_hat")
axes[1].set_title("how much the guess still changes, step to step", fontsize=9)
fig.tight_layout()
viz.save(fig, args.out / "convergence.png")
print(f"  RMS distance of decoded z0_hat to the final image: first step {d_x0[0]:.3f}, halfway "
      f"{d_x0[len(d_x0) // 2]:.3f}, last {d_x0[-1]:.3f}")
results["x0_distance_first"] = d_x0[0]
results["x0_distance_half"] = d_x0[len(d_x0) // 2]
results["x0_distance_last"] = d_x0[-1]
results["xt_distance_first"] = d_xt[0]

# %% [markdown]
# ## 4. DDIM, DDPM, Euler
#
# The UNet is the same; the samplers differ in how they step from z_t to z_t':
# DDIM (eta = 0) is deterministic; DDPM (ancestral) adds fresh noise at every step;
# Euler integrates the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar).
# Same z_T, same prompt, same number of steps. (SD's default in diffusers is PNDM;
# DDIM was the original release's.)

# %%
viz.header("4. three samplers")
samplers = ("ddim", "ddpm", "euler")
trajectories, finals = {}, {}
for name in samplers:
    kept = []
    t0 = time.perf_counter()
    if name == "ddim":  # section 1 ran exactly this already
        kept, finals[name] = [r[3] for r in record], final
    else:
        finals[name] = pipe(prompt, steps=steps, guidance_scale=guidance, latents=z_T, scheduler=name, seed=0,
                            callback=lambda i, t, z, e, x0, kept=kept: kept.append(np.array(x0)))[0]
    picks = np.linspace(0, len(kept) - 1, 5).astype(int)
    trajectories[name] = pipe.decode_latents(np.concatenate([kept[i] for i in picks]))
    print(f"  {name}: {steps} steps in {time.perf_counter() - t0:.1f} s")
cells, titles = [], []
for name in samplers:
    cells += list(trajectories[name]) + [finals[name]]
    titles += [f"{name}: z0_hat, step {i + 1}" for i in np.linspace(0, steps - 1, 5).astype(int)] + [f"{name}: final"]
viz.save(viz.image_grid(cells, titles=titles, ncols=6, cell=1.2, fontsize=6,
                        title=f"{prompt!r} from the same z_T: the predicted z_0 along the way, and the result"),
         args.out / "samplers.png")
# DDIM (eta = 0) has no randomness after z_T: two short runs from the same z_T agree exactly.
twice = [pipe(prompt, steps=5, guidance_scale=guidance, latents=z_T, scheduler="ddim")[0]]
twice.append(final if steps == 5 else pipe(prompt, steps=5, guidance_scale=guidance, latents=z_T, scheduler="ddim")[0])
results["ddim_repeatable"] = bool(np.array_equal(*twice))
diff = {f"{a}_vs_{b}": float(np.abs(finals[a].astype(float) - finals[b].astype(float)).mean() / 255)
        for a, b in (("ddim", "ddpm"), ("ddim", "euler"))}
results.update({f"mean_abs_diff_{k}": v for k, v in diff.items()})
print(f"  DDIM run twice from the same z_T (5 steps) gives the same image: {results['ddim_repeatable']}")

# %% [markdown]
# ## What we saw
#
# - Fifty UNet evaluations turn noise into latents; the decoder turns latents into an image.
# - At every step the model has a full guess of the result (z0_hat); the guess settles
#   long before the noise is gone.
# - DDIM is deterministic (same z_T, same image); DDPM and Euler walk other paths.
#
# Next: everything together, and what guidance does (lesson 8).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
