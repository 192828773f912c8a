# %% [markdown]
# # Lesson 4: the VAE, into latent space and back
#
# Denoising 512 x 512 x 3 pixels fifty times is expensive. Latent diffusion (Rombach et
# al. 2022), the idea behind Stable Diffusion, first compresses the image with an
# autoencoder and runs the diffusion on the small code instead:
#
#     encoder E:  x (3, 512, 512)  ->  z (4, 64, 64)      8x smaller on each side, 48x fewer numbers
#     decoder D:  z (4, 64, 64)    ->  x (3, 512, 512)
#
# It is a *variational* autoencoder: E outputs a Gaussian q(z | x) = N(mean, std^2) per
# latent value, trained with a small KL penalty towards N(0, I) so that the latent space
# stays smooth and of a known scale. minisd's VAE does the same on 32 x 32 images. This
# lesson looks at the latents, measures reconstructions (PSNR), walks between two
# latents, and compares the compression with SD's.
#
# Needs a trained model: the one shipped with minisd, or `--model DIR`.
#
# Run: `python lessons/04_vae.py [--out DIR] [--fast] [--model DIR]`.

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

plt = viz.plt
args = viz.lesson_args("04_vae")
results = {}
t_start = time.perf_counter()
pipe = viz.require_model(args, results)
vae = pipe.vae

# %% [markdown]
# ## 1. The sizes, against SD's

# %%
viz.header("1. sizes")
cfg = vae.config
f = vae.downsample_factor
latent_shape = (cfg["latent_channels"], cfg["sample_size"] // f, cfg["sample_size"] // f)
image_shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
viz.shape_line("image x", image_shape, viz.SD["image"])
viz.shape_line("latents z", latent_shape, viz.SD["latents"])
viz.shape_line("downsampling factor f", f, viz.SD["vae_factor"])
compression = int(np.prod(image_shape)) / int(np.prod(latent_shape))
sd_compression = int(np.prod(viz.SD["image"])) / int(np.prod(viz.SD["latents"]))
viz.shape_line("numbers: image / latents", f"{compression:.0f}x", f"{sd_compression:.0f}x")
viz.shape_line("parameters", f"{vae.num_parameters():,}", f"{viz.SD['vae_params']:,}")
print(f"  block_out_channels {tuple(cfg['block_out_channels'])} (SD: (128, 256, 512, 512)), "
      f"scaling_factor {cfg['scaling_factor']:.4f} (SD: 0.18215)")
results["latent_shape"] = list(latent_shape)
results["compression"] = compression
results["sd_compression"] = sd_compression

# %% [markdown]
# ## 2. Encoding: what the latents look like
#
# `vae.encode(x)` returns the posterior q(z | x): its `mean` (what the pipeline uses) and
# `std`. Each image becomes four small channels. They are not a tiny picture in colour
# channels; they are whatever code the decoder learned to read, though on flat shapes
# the object's place often shows through.

# %%
viz.header("2. encoding")
n_images = 6 if args.fast else 64
data = shapes.make_dataset(n_images, "train", seed=4)
x = to_model_input(data.images)
with minisd.no_grad():
    posterior = vae.encode(x)
    z_mean, z_std = posterior.mean.numpy(), posterior.std.numpy()
    recon = vae.decode(z_mean).numpy()
print(f"  x {x.shape} -> posterior mean and std {z_mean.shape}")
print(f"  posterior std: median {np.median(z_std):.3f}, against a spread of the means of {z_mean.std():.3f} "
      "(a small std: the code is nearly deterministic, and the pipeline uses the mean)")
sf = float(cfg["scaling_factor"])
print(f"  latents times scaling_factor: std {(z_mean * sf).std():.3f} (the UNet wants ~1), "
      f"mean {(z_mean * sf).mean():+.3f}")
results["posterior_std_median"] = float(np.median(z_std))
results["scaled_latent_std"] = float((z_mean * sf).std())

show = 6
fig, axes = plt.subplots(show, 2 + latent_shape[0], figsize=(1.3 * (2 + latent_shape[0]), 1.3 * show))
lim = np.abs(z_mean[:show]).max()
for i in range(show):
    axes[i, 0].imshow(data.images[i], interpolation="nearest")
    for c in range(latent_shape[0]):
        axes[i, 1 + c].imshow(z_mean[i, c], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[i, -1].imshow(viz.to_uint8(recon[i]), interpolation="nearest")
    axes[i, 0].set_ylabel(viz._wrap(data.captions[i][2:], 14), fontsize=5.5)
for c, title in enumerate(["image x"] + [f"z channel {c}" for c in range(latent_shape[0])] + ["D(E(x))"]):
    axes[0, c].set_title(title, fontsize=7)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"(3, 32, 32) -> latents {latent_shape} -> (3, 32, 32); SD: (3, 512, 512) -> (4, 64, 64)",
             fontsize=8)
fig.tight_layout()
viz.save(fig, args.out / "latents.png")

# %% [markdown]
# ## 3. How good are the reconstructions?
#
# Peak signal-to-noise ratio, PSNR = 10 log10(255^2 / MSE) in decibels, on uint8 pixels:
# 20 dB is an average error of 10%, 30 dB of about 3%. SD's VAE reaches roughly 24-27 dB
# on photographs; flat shapes are easier. We measure training images and the held-out
# compositions, which the VAE never saw either (it is trained on the train split).

# %%
viz.header("3. reconstructions")


def psnr_db(a_uint8, b_uint8):
    mse = ((a_uint8.astype(np.float64) - b_uint8.astype(np.float64)) ** 2).reshape(len(a_uint8), -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


recon_uint8 = np.stack([viz.to_uint8(r) for r in recon])
train_psnr = psnr_db(recon_uint8, data.images)
held = shapes.make_dataset(n_images, "heldout", seed=5)
with minisd.no_grad():
    held_recon = vae.decode(vae.encode(to_model_input(held.images)).mean).numpy()
held_recon_uint8 = np.stack([viz.to_uint8(r) for r in held_recon])
held_psnr = psnr_db(held_recon_uint8, held.images)
print(f"  PSNR over {n_images} training images: mean {train_psnr.mean():.1f} dB (min {train_psnr.min():.1f})")
print(f"  PSNR over {n_images} held-out images: mean {held_psnr.mean():.1f} dB (min {held_psnr.min():.1f})")
results["psnr_train_db"] = float(train_psnr.mean())
results["psnr_heldout_db"] = float(held_psnr.mean())

pairs, titles = [], []
for i in range(4):
    pairs += [data.images[i], recon_uint8[i]]
    titles += ["original", f"decoded, {train_psnr[i]:.1f} dB"]
for i in range(4):
    pairs += [held.images[i], held_recon_uint8[i]]
    titles += [f"held out: {held.records[i].color} {held.records[i].shape}", f"decoded, {held_psnr[i]:.1f} dB"]
viz.save(viz.image_grid(pairs, titles=titles, ncols=8, cell=1.2, fontsize=6,
                        title="x and D(E(x)): training images (top), held-out compositions (bottom)"),
         args.out / "reconstructions.png")

# %% [markdown]
# ## 4. Walking through latent space
#
# Decode the points on the straight line between the latents of two images,
# z = (1 - a) z_A + a z_B. In pixel space the same walk is a cross-fade (two faint
# shapes); in a good latent space the decoder tends to draw something shape-like all
# the way. (SD's latents are smooth in the same way; that is what lets diffusion move
# through them in small steps.)

# %%
viz.header("4. interpolation")
a_img = shapes.render("red", "circle", "large", "top left")
b_img = shapes.render("blue", "square", "large", "bottom right")
xa, xb = to_model_input(np.stack([a_img, b_img]))
with minisd.no_grad():
    za, zb = vae.encode(np.stack([xa, xb])).mean.numpy()
alphas = np.linspace(0, 1, 8, dtype=np.float32)
z_path = np.stack([(1 - a) * za + a * zb for a in alphas])
with minisd.no_grad():
    latent_walk = vae.decode(z_path).numpy()
pixel_walk = [(1 - a) * xa + a * xb for a in alphas]
viz.save(viz.image_grid(list(latent_walk) + pixel_walk,
                        titles=[f"latent a={a:.2f}" for a in alphas] + [f"pixels a={a:.2f}" for a in alphas],
                        ncols=8, cell=1.1, fontsize=6,
                        title="from a red circle to a blue square: through latent space (top), in pixels (bottom)"),
         args.out / "interpolation.png")
results["interpolation_steps"] = len(alphas)

# %% [markdown]
# ## What we saw
#
# - The VAE turns a (3, 32, 32) image into (4, 8, 8) latents (12x fewer numbers; SD: 48x)
#   and back, with a reconstruction error measured in dB of PSNR.
# - The latents are scaled by `scaling_factor` to unit variance before diffusion:
#   lesson 3's noise is added to *these* numbers.
# - Straight lines in latent space decode to plausible images.
#
# Next: the text encoder that tells the UNet what to draw (lesson 5).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
