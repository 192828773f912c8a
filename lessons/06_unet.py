# %% [markdown]
# # Lesson 6: the UNet, one denoising step taken apart
#
# The UNet is the network that does the work: given a noisy latent z_t, its timestep t
# and the text embedding c, it predicts the noise that was added,
#
#     epsilon_hat = epsilon_theta(z_t, t, c),
#
# trained with the simplest of losses, |epsilon - epsilon_hat|^2, on latents noised as in
# lesson 3. From epsilon_hat follows a guess of the clean latent,
#
#     z0_hat = (z_t - sqrt(1 - alpha_bar_t) epsilon_hat) / sqrt(alpha_bar_t),
#
# which the sampler (lesson 7) uses to take a step. This lesson feeds the UNet one
# example at a time: what goes in (z_t, t, c), what comes out (epsilon_hat against the
# true epsilon), how t is encoded, and where the cross-attention to the text looks.
#
# Needs a trained model: the one shipped with minisd, or `--model DIR`.
#
# Run: `python lessons/06_unet.py [--out DIR] [--fast] [--model DIR]`.

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
from minisd.models.unet import timestep_embedding
from minisd.pipeline import token_attention

plt = viz.plt
args = viz.lesson_args("06_unet")
results = {}
t_start = time.perf_counter()
pipe = viz.require_model(args, results)
unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
sf = float(vae.config["scaling_factor"])

# %% [markdown]
# ## 1. The sizes, against SD's

# %%
viz.header("1. sizes")
cfg = unet.config
latent_shape = pipe.latent_shape
viz.shape_line("input z_t / output eps", latent_shape, viz.SD["latents"])
viz.shape_line("text context c", (77, cfg["cross_attention_dim"]), viz.SD["text"])
viz.shape_line("block_out_channels", tuple(cfg["block_out_channels"]), (320, 640, 1280, 1280))
viz.shape_line("parameters", f"{unet.num_parameters():,}", f"{viz.SD['unet_params']:,}")
print(f"  down blocks {tuple(cfg['down_block_types'])}, up blocks {tuple(cfg['up_block_types'])}")
results["latent_shape"] = list(latent_shape)

# %% [markdown]
# ## 2. How the UNet knows t: the timestep embedding
#
# The same network serves every noise level, so it must be told t. As in the
# Transformer's position encoding, t becomes sinusoids of geometrically spaced
# frequencies, [cos(t w_i), sin(t w_i)] with w_i = 10000^(-i / half): fast waves tell
# nearby timesteps apart, slow waves place t in the whole range. An MLP then turns the
# vector into the embedding each ResNet block adds to its features (SD: 320 sinusoids
# -> 1280).

# %%
viz.header("2. timestep embedding")
dim = cfg["block_out_channels"][0]
t_range = np.arange(scheduler.num_train_timesteps)
emb = timestep_embedding(t_range, dim, flip_sin_to_cos=cfg["flip_sin_to_cos"], freq_shift=cfg["freq_shift"])
print(f"  sinusoids: {emb.shape} (SD: (1000, 320)); time embedding after the MLP: "
      f"{unet.time_embedding.linear_2.weight.shape[0]} (SD: 1280)")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.6, 1]})
axes[0].imshow(emb.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
axes[0].set_xlabel("timestep t")
axes[0].set_ylabel(f"feature ({dim}): cos half, then sin half")
axes[0].set_title("sinusoidal timestep embedding", fontsize=9)
for i in (dim // 16, dim // 8, dim // 4, dim // 2 - 1):  # feature 0 (w = 1) changes sign every 3 steps
    axes[1].plot(t_range, emb[:, i], lw=0.9, label=f"feature {i}")
axes[1].set_xlabel("timestep t")
axes[1].set_title("a few features: fast to slow", fontsize=9)
axes[1].legend(fontsize=6.5)
fig.tight_layout()
viz.save(fig, args.out / "timestep_embedding.png")
results["timestep_embedding_at_0"] = float(np.abs(emb[0] - np.r_[np.ones(dim // 2), np.zeros(dim // 2)]).max()) \
    if cfg["flip_sin_to_cos"] else float(np.abs(emb[0] - np.r_[np.zeros(dim // 2), np.ones(dim // 2)]).max())

# %% [markdown]
# ## 3. One step: predicted noise against the true noise
#
# A training example, built exactly as training builds it: an image, its latents
# z_0 = scaling_factor E(x), noise epsilon, a timestep t, z_t = sqrt(alpha_bar_t) z_0 +
# sqrt(1 - alpha_bar_t) epsilon, and the caption's embedding c. We ask the UNet for
# epsilon_hat at several t and show, for each: z_t (decoded), the true noise, the
# predicted noise (latent channel 0), and the clean image it implies, z0_hat decoded.

# %%
viz.header("3. one denoising step")
caption = "a large red circle in the top left"
x0 = to_model_input(shapes.render(**{k: v for k, v in vars(shapes.parse_caption(caption)).items()
                                         if k in ("color", "shape", "size", "position")}))[None]
with minisd.no_grad():
    z0 = vae.encode(x0).mean.numpy() * sf
c = pipe.encode_prompt([caption])
c_empty = pipe.encode_prompt([""])
eps = np.random.default_rng(0).standard_normal(z0.shape).astype(np.float32)
ts = [50, 250, 500, 750, 950]
abar = scheduler.alphas_cumprod
rows = []
with minisd.no_grad():
    for t in ts:
        zt = scheduler.add_noise(z0, eps, np.array([t]))
        eps_hat = unet(zt, t, c).numpy()
        eps_hat_empty = unet(zt, t, c_empty).numpy()
        z0_hat = (zt - np.sqrt(1 - abar[t]) * eps_hat) / np.sqrt(abar[t])
        rows.append((t, zt, eps_hat, z0_hat, float(((eps_hat - eps) ** 2).mean()),
                     float(((eps_hat_empty - eps) ** 2).mean())))
decoded = pipe.decode_latents(np.concatenate([np.concatenate([r[1], r[3]]) for r in rows]))
print(f"  caption {caption!r}; z_0 {z0.shape[1:]}; c {c.shape[1:]}")
print(f"  {'t':>4}  {'MSE(eps_hat, eps)':>18}  {'with the empty prompt':>22}   (predicting 0 would give ~1)")
for t, _, _, _, mse, mse_empty in rows:
    print(f"  {t:4d}  {mse:18.3f}  {mse_empty:22.3f}")
results["mse_by_t"] = {str(r[0]): r[4] for r in rows}
results["mse_empty_by_t"] = {str(r[0]): r[5] for r in rows}

fig, axes = plt.subplots(len(rows), 4, figsize=(6.4, 1.6 * len(rows)))
lim = 3
for i, (t, zt, eps_hat, z0_hat, mse, _) in enumerate(rows):
    axes[i, 0].imshow(decoded[2 * i], interpolation="nearest")
    axes[i, 1].imshow(eps[0, 0], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[i, 2].imshow(eps_hat[0, 0], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[i, 3].imshow(decoded[2 * i + 1], interpolation="nearest")
    axes[i, 0].set_ylabel(f"t = {t}", fontsize=8)
    axes[i, 2].set_xlabel(f"MSE {mse:.3f}", fontsize=7)
for j, title in enumerate(["z_t (decoded)", "true noise eps (ch 0)", "predicted eps_hat (ch 0)",
                           "z0_hat (decoded)"]):
    axes[0, j].set_title(title, fontsize=7.5)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"epsilon_theta(z_t, t, c) for {caption!r}", fontsize=8)
fig.tight_layout()
viz.save(fig, args.out / "unet_step.png")

# %% [markdown]
# The training loss, |epsilon - epsilon_hat|^2, depends on t: at small t the noise is a
# small part of z_t and hard to tell apart from the image's own detail; at large t z_t
# is nearly all noise, so epsilon is easy to read off but the image behind it is hard
# to guess. Averaged over a batch, with the captions and with the empty prompt: how
# much does the caption help, and at which t?

# %%
n_images = 4 if args.fast else 16
t_grid = np.linspace(20, 980, 4 if args.fast else 9).astype(int)
data = shapes.make_dataset(n_images, "train", seed=6)
with minisd.no_grad():
    zb = vae.encode(to_model_input(data.images)).mean.numpy() * sf
cb = pipe.encode_prompt(data.captions)
cb_empty = np.broadcast_to(c_empty, cb.shape)
rng = np.random.default_rng(1)
loss_c, loss_u = [], []
with minisd.no_grad():
    for t in t_grid:
        e = rng.standard_normal(zb.shape).astype(np.float32)
        zt = scheduler.add_noise(zb, e, np.full(n_images, t))
        loss_c.append(float(((unet(zt, int(t), cb).numpy() - e) ** 2).mean()))
        loss_u.append(float(((unet(zt, int(t), np.ascontiguousarray(cb_empty)).numpy() - e) ** 2).mean()))
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(t_grid, loss_c, "o-", ms=3, label="with the caption")
ax.plot(t_grid, loss_u, "s--", ms=3, label="with the empty prompt")
ax.axhline(1, color="k", lw=0.6, ls=":", label="predicting 0")
ax.set_yscale("log")
ax.set_xlabel("timestep t")
ax.set_ylabel("MSE(eps_hat, eps)")
ax.set_title(f"noise-prediction error over t ({n_images} training images)", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
viz.save(fig, args.out / "noise_prediction_error.png")
results["loss_mean_caption"] = float(np.mean(loss_c))
results["loss_mean_empty"] = float(np.mean(loss_u))
print(f"  mean over t: {np.mean(loss_c):.3f} with captions, {np.mean(loss_u):.3f} with the empty prompt")

# %% [markdown]
# ## 4. Cross-attention: where does each word look?
#
# In every transformer block of the UNet, each latent pixel (a query) attends to the 77
# text tokens (keys and values): a probability distribution over the tokens per pixel.
# Turning it around, each token has a map over the latent grid: how much each pixel
# listens to it. We generate an image for a prompt, record these maps at every step
# (`collect_attention=True`), average them over heads, the finest-resolution layers and
# the second half of the steps, and draw each word's map beside the image, with the
# object's outline. (SD: the same maps on 64 x 64 latents; "prompt-to-prompt" editing
# works with them.)
#
# Watch where the attention goes as a whole: in this model most of it lands on the
# `<end>` and padding positions, which (lesson 5) have seen the entire prompt and act as
# summaries of it, so each word's own map is faint. The printed shares say how much of
# each word's attention falls on the object, against the object's share of the grid.

# %%
viz.header("4. cross-attention maps")
steps = 10 if args.fast else 50
prompt = "a large red circle in the top left"
image = pipe(prompt, steps=steps, seed=0, collect_attention=True)[0]
h, w = latent_shape[1:]
maps = token_attention(pipe.attention_maps, pipe.tokenizer, prompt, (h, w))
row_sums = [float(np.abs(a.sum(axis=-1) - 1).max()) for a in pipe.attention_maps.values()]
print(f"  {len(pipe.attention_maps)} cross-attention layers recorded over {steps} steps; each pixel's "
      f"weights over the 77 tokens sum to 1 (largest deviation {max(row_sums):.1e})")
results["attention_row_sum_error"] = max(row_sums)
words = list(maps)
late = {k: v[len(v) // 2:].mean(axis=0) for k, v in maps.items()}
# Where does a pixel's attention go, on average over layers, heads, pixels and the late steps?
fine = [a[len(a) // 2:, 0] for a in pipe.attention_maps.values() if a.shape[3] == h * w]
per_token = np.mean([a.mean(axis=(0, 1, 2)) for a in fine], axis=0)  # (77,)
n_words = len(words)
shares = {"<start>": per_token[0], "words": per_token[1:1 + n_words].sum(), "<end> and padding": per_token[1 + n_words:].sum()}
print("  a pixel's attention, on average: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
results["attention_share_start"] = float(shares["<start>"])
results["attention_share_words"] = float(shares["words"])
fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.45 * (len(words) + 1), 1.9))
axes[0].imshow(image, interpolation="nearest")
axes[0].set_title("generated", fontsize=7)
scale = image.shape[0] // h
outline = np.asarray(image, dtype=float).min(axis=2) < 200  # the object's pixels
for ax, word in zip(axes[1:], words):
    m = late[word]
    ax.imshow(np.kron((m - m.min()) / (np.ptp(m) + 1e-12), np.ones((scale, scale))), cmap="viridis",
              vmin=0, vmax=1, interpolation="nearest")
    ax.contour(outline, levels=[0.5], colors="w", linewidths=0.8)  # where the object is
    ax.set_title(f"\"{word.split(':')[1].replace('</w>', '')}\"", fontsize=7)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"where each word of {prompt!r} is looked at (each map from its least to its most attended "
             f"pixel; white line: the object; {h} x {w} latent grid, SD: 64 x 64)", fontsize=7)
fig.tight_layout()
viz.save(fig, args.out / "attention_maps.png")

# Where do the colour word and the position words look? Attention mass inside the object.
mask = np.asarray(image, dtype=float).min(axis=2) < 200  # non-white pixels: the object
mask_latent = mask.reshape(h, scale, w, scale).mean(axis=(1, 3))
for word in words:
    m = late[word] / late[word].sum()
    results[f"attention_on_object_{word.split(':')[1].replace('</w>', '')}"] = float((m * mask_latent).sum())
print(f"  share of each word's attention that falls on the object ({mask_latent.mean():.0%} of the grid): "
      + ", ".join(f"{w_.split(':')[1].replace('</w>', '')} {results['attention_on_object_' + w_.split(':')[1].replace('</w>', '')]:.2f}"
                  for w_ in words))
results["object_area_fraction"] = float(mask_latent.mean())

# %% [markdown]
# ## What we saw
#
# - The UNet maps (z_t, t, c) to epsilon_hat of z_t's shape: (4, 8, 8) here, (4, 64, 64) in SD.
# - t enters as sinusoids; c through cross-attention in every transformer block.
# - Its error, the training loss, depends on t, and on whether it is told the caption.
# - Each word has a map over the latent grid; the printed shares tell how much of each
#   word's attention falls on the object.
#
# Next: fifty of these steps, from pure noise to an image (lesson 7).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
