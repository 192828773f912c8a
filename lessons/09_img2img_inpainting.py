# %% [markdown]
# # Lesson 9: image to image and inpainting
#
# Lesson 3 noised an image in one jump, z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps;
# lesson 7 walked from pure noise back to an image. **Image to image** (SDEdit, Meng et
# al. 2021) does both halves, but stops part way: encode a picture to its latent z_0,
# noise it to a timestep t_s, and denoise from there with a prompt. The noise wipes out
# the details and keeps the layout; the prompt redraws the details.
#
#     z_0   = scaling_factor * E(image)                          the VAE's encoder (lesson 4)
#     z_t_s = sqrt(alpha_bar_t_s) z_0 + sqrt(1 - alpha_bar_t_s) eps   one jump (lesson 3)
#     for t in the timesteps from t_s down: the guided UNet step of lesson 8
#
# `strength` in [0, 1] picks t_s, exactly as diffusers' StableDiffusionImg2ImgPipeline
# does: of the `steps` timesteps, the last int(steps * strength) are run. Strength 0 runs
# none (the picture comes back through the VAE), strength 1 all of them, from pure noise
# (text to image).
#
# **Inpainting** is the same loop with a mask (white: repaint). After every step the
# part outside the mask is put back: the image's own latent, noised to the timestep the
# loop has reached, so the two parts always carry the same amount of noise and the
# model blends them (RePaint's idea, Lugmayr et al. 2022; diffusers'
# StableDiffusionInpaintPipeline with an ordinary UNet). SD also ships models trained for
# it, whose UNet takes 9 channels: z_t, the mask, and the latent of the masked picture;
# minisd loads those too. Here we use the shipped model, an ordinary one.
#
# `pipe(prompt, image=..., strength=...)`, `pipe(prompt, image=..., mask_image=...)`;
# `minisd generate PROMPT --image in.png --strength 0.6 [--mask mask.png]`.
#
# Sizes: SD v1.5 encodes a 512 x 512 picture to (4, 64, 64) latents, the mask is taken at
# that resolution (one latent pixel per 8 x 8 image pixels); here 32 x 32 -> (4, 8, 8), 4 x 4.
#
# Needs a trained model: the one shipped with minisd, or `--model DIR`.
#
# Run: `python lessons/09_img2img_inpainting.py [--out DIR] [--fast] [--model DIR]`.

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
from minisd.data import reader, shapes

plt = viz.plt
args = viz.lesson_args("09_img2img_inpainting")
results = {}
t_start = time.perf_counter()
pipe = viz.require_model(args, results)
steps = 10 if args.fast else viz.SD["inference_steps"]
guidance = 5.0
strengths = [0.0, 0.3, 0.6, 1.0] if args.fast else [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
results["steps"] = steps
results["strengths"] = strengths


def some_steps(record, at_most: int = 10):
    """Every step of a short run; of a long one, at_most of them evenly spread, the last included."""
    keep = np.unique(np.linspace(0, len(record) - 1, min(at_most, len(record))).round().astype(int))
    return [record[i] for i in keep]


def describe(image) -> str:
    """What the shapes reader sees, in the caption's words."""
    r = reader.read(image)
    return "nothing" if r.color is None else f"{r.size} {r.color} {r.shape}\n{r.position}"


# %% [markdown]
# ## 1. Strength picks the timestep
#
# With the schedule SD uses (50 steps, "leading" spacing: 981, 961, ..., 1), strength s
# runs the last int(50 s) of them. The signal left in z_t_s is sqrt(alpha_bar_t_s): at
# strength 0.6 the first step run is t = 581, where 42% of the image's latent is left,
# under noise of twice its strength (sqrt(1 - alpha_bar) / sqrt(alpha_bar) = 2.1, lesson 3).
# (SD's 50 steps; --fast takes 10, 901 ... 1.)

# %%
viz.header("1. strength -> timesteps")
scheduler = pipe.make_scheduler()
scheduler.set_timesteps(steps)
steps_run = []
for s in strengths:
    n = min(int(steps * s), steps)
    run = scheduler.timesteps[steps - n:]
    first = int(run[0]) if n else None
    signal = float(np.sqrt(scheduler.alphas_cumprod[first])) if n else 1.0
    steps_run.append(n)
    print(f"  strength {s:.1f}: {n:2d} of {steps} steps run, from t = {first}; "
          f"sqrt(alpha_bar) = {signal:.3f} of the image's latent left")
results["steps_run"] = steps_run

# %% [markdown]
# ## 2. Recolouring: a red circle, prompted blue
#
# The same picture and the same seed at every strength. Colour is a fine detail to this
# model: a little noise (strength 0.2 of 50 steps) is enough for the prompt to turn the
# circle blue, and it stays where and as large as it was; at strength 1 the picture is
# forgotten and the result is plain text to image (it agrees here because the prompt
# says "top left").
#
# Strength 0 is the picture through the VAE: the encoder's sample of q(z | x), decoded.

# %%
viz.header("2. recolouring")
red = shapes.render("red", "circle", "large", "top left")
blue_prompt = "a large blue circle in the top left"
recoloured = np.concatenate([pipe(blue_prompt, image=red, strength=s, steps=steps, guidance_scale=guidance, seed=0)
                             for s in strengths])
readings = reader.read_batch(recoloured)
target = reader.Reading("blue", "circle", "large", "top left")
for s, r in zip(strengths, readings):
    print(f"  strength {s:.1f}: reads {r.size} {r.color} {r.shape} in the {r.position}")
viz.save(viz.image_grid([red, *recoloured], titles=["the picture\n" + describe(red)]
                        + [f"strength {s:.1f}\n{describe(im)}" for s, im in zip(strengths, recoloured)],
                        ncols=len(strengths) + 1, cell=1.3, fontsize=6.5, wrap=24,
                        title=f"img2img: a red circle, prompted {blue_prompt!r}, {steps} DDIM steps"),
         args.out / "img2img_recolour.png")
through = recoloured[0].astype(np.float64)
mse = float(((through - red) ** 2).mean())
results["strength0_psnr_db"] = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
results["recolour_readings"] = [str(r) for r in readings]
results["recolour_right"] = [r == target for r in readings]
text_to_image = pipe(blue_prompt, steps=steps, guidance_scale=guidance, seed=0)
results["strength1_is_text_to_image"] = bool(np.array_equal(text_to_image[0], recoloured[-1]))
print(f"  strength 0: the picture through the VAE, PSNR {results['strength0_psnr_db']:.1f} dB; "
      f"strength 1 equals text to image from the same seed: {results['strength1_is_text_to_image']}")

# %% [markdown]
# ## 3. Moving: the same circle, prompted to the bottom right
#
# Position is the coarsest thing in the picture, so it survives more noise than colour
# does: the circle only moves once the strength is high enough that little of the
# picture's layout is left.

# %%
viz.header("3. moving")
move_prompt = "a large red circle in the bottom right"
moved = np.concatenate([pipe(move_prompt, image=red, strength=s, steps=steps, guidance_scale=guidance, seed=0)
                        for s in strengths])
positions = [r.position for r in reader.read_batch(moved)]
for s, p in zip(strengths, positions):
    print(f"  strength {s:.1f}: the circle reads in the {p}")
viz.save(viz.image_grid([red, *moved], titles=["the picture"] + [f"strength {s:.1f}\n{describe(im)}" for s, im in
                                                                 zip(strengths, moved)],
                        ncols=len(strengths) + 1, cell=1.3, fontsize=6.5, wrap=24,
                        title=f"img2img: the same circle, prompted {move_prompt!r}"),
         args.out / "img2img_move.png")
results["move_positions"] = positions
moved_at = [s for s, p in zip(strengths, positions) if p == "bottom right"]
results["move_strength"] = moved_at[0] if moved_at else None

# %% [markdown]
# ## 4. Every step of image to image
#
# At strength 0.6 the loop starts at z_t_s (the red circle under noise) instead of pure
# noise. Top row: z_t after each step, decoded; bottom row: the model's guess of z_0,
# decoded (every step with --fast, 10 of the 30 otherwise). Compare lesson 7, which
# starts from nothing. We pass our own noise eps (``latents=``) and check the start by hand.

# %%
viz.header("4. every step")
record = []
eps = np.random.default_rng(1).standard_normal((1, *pipe.latent_shape)).astype(np.float32)  # our own noise
pipe(blue_prompt, image=red, strength=0.6, steps=steps, guidance_scale=guidance, seed=0, latents=eps,
     callback=lambda i, t, z, eps_hat, x0: record.append((t, np.array(z), np.array(x0))))
start_t = int(record[0][0])
# the start, by hand: the encoder's sample (the first draw from seed 0), noised in one jump to t_s
z0 = pipe.encode_images(red[None], np.random.default_rng(0))
start = pipe.make_scheduler().add_noise(z0, eps, np.array([start_t]))
results["img2img_steps_recorded"] = len(record)
record = some_steps(record)
decoded = pipe.decode_latents(np.concatenate([z0, start] + [r[1] for r in record] + [r[2] for r in record]))
k = len(record)
top = [decoded[0], decoded[1], *decoded[2:2 + k]]
bottom = [red, decoded[0], *decoded[2 + k:]]
titles = ["z_0 = E(picture)", f"z_t_s, t = {start_t}"] + [f"after t = {r[0]}" for r in record]
titles += ["the picture", "(decoded z_0)"] + ["z0_hat" for _ in record]
viz.save(viz.image_grid(top + bottom, titles=titles, ncols=k + 2, cell=0.9, fontsize=6, wrap=16,
                        title=f"img2img at strength 0.6: {results['img2img_steps_recorded']} steps from t = {start_t} "
                              f"({'every one' if k == results['img2img_steps_recorded'] else f'{k} of them'}); "
                              "top z_t, bottom the guess of z_0"),
         args.out / "img2img_steps.png")

# %% [markdown]
# ## 5. Inpainting: repaint the masked part
#
# Two cases. An empty canvas whose top right quadrant is masked, prompted with a shape
# there: the shape is drawn inside the mask and the rest stays white. And the red circle
# with its own quadrant masked, prompted with a blue square: the circle is replaced.
#
# The steps drawn below (every one with --fast, 10 of the 50 otherwise): after each step
# the part outside the mask is set back to the picture's latent at the current noise
# level, so outside the mask z_t (top) is the white canvas under noise that fades as t
# falls, while the model's guess (bottom) settles on a shape inside the hole that fits
# the prompt.

# %%
viz.header("5. inpainting")
white = np.full((32, 32, 3), 255, np.uint8)
quadrant = {"top right": (slice(0, 16), slice(16, 32)), "top left": (slice(0, 16), slice(0, 16))}
cases = [(white, "top right", "a small green triangle in the top right"),
         (red, "top left", "a large blue square in the top left")]
if not args.fast:
    cases.append((white, "top left", "a small yellow circle in the top left"))
cells, titles, right, outside = [], [], [], []
latent_error = 0.0
for picture, where, prompt in cases:
    mask = np.zeros((32, 32), np.uint8)
    mask[quadrant[where]] = 255
    out = pipe(prompt, image=picture, mask_image=mask, steps=steps, guidance_scale=guidance, seed=0)[0]
    z = pipe(prompt, image=picture, mask_image=mask, steps=steps, guidance_scale=guidance, seed=0, output="latent")
    known = mask[::4, ::4] == 0  # the mask at latent resolution
    z0 = pipe.encode_images(picture[None], np.random.default_rng(0))
    latent_error = max(latent_error, float(np.abs(z - z0)[..., known].max()))
    r = reader.read(out)
    right.append(r.matches(shapes.parse_caption(prompt)))
    outside.append(int(np.abs(out.astype(int) - 255)[mask == 0].max()) if picture is white else None)
    shown_mask = np.repeat(mask[..., None], 3, axis=2)
    cells += [picture, shown_mask, out]
    titles += ["the picture", f"the mask ({where})", f"{prompt[2:]}\nreads: {describe(out)}"]
    print(f"  {prompt!r}: reads {r.size} {r.color} {r.shape} in the {r.position}")
viz.save(viz.image_grid(cells, titles=titles, ncols=3, cell=1.3, fontsize=6.5, wrap=26,
                        title="inpainting with an ordinary UNet: white in the mask is repainted"),
         args.out / "inpainting.png")
results["inpaint_prompts"] = [c[2] for c in cases]
results["inpaint_right"] = right
results["inpaint_outside_max"] = max(v for v in outside if v is not None)
results["known_latent_error"] = latent_error
print(f"  outside the mask of the white canvases the pixels move by at most {results['inpaint_outside_max']} "
      f"of 255 (the VAE's blur at the mask's edge); the known latent is the picture's to {latent_error:.1g}")

record = []
mask = np.zeros((32, 32), np.uint8)
mask[quadrant["top right"]] = 255
pipe(cases[0][2], image=white, mask_image=mask, steps=steps, guidance_scale=guidance, seed=0,
     callback=lambda i, t, z, eps, x0: record.append((t, np.array(z), np.array(x0))))
everything = len(record) <= 10
record = some_steps(record)
decoded = pipe.decode_latents(np.concatenate([r[1] for r in record] + [r[2] for r in record]))
k = len(record)
viz.save(viz.image_grid(list(decoded), titles=[f"after t = {r[0]}" for r in record] + ["z0_hat"] * k, ncols=k,
                        cell=0.9, fontsize=6, wrap=16,
                        title=f"inpainting {cases[0][2]!r}: {'every step' if everything else f'{k} of the steps'}, "
                              "top z_t (the known part put back), bottom the guess of z_0"),
         args.out / "inpainting_steps.png")

# %% [markdown]
# ## What we saw
#
# - img2img is the forward jump of lesson 3 to t_s and the reverse walk of lesson 7 from
#   there: `strength` says how far; the steps run are the last int(steps * strength).
# - Little noise keeps the picture; more lets the prompt change colour, then shape and
#   place; strength 1 is text to image.
# - Inpainting keeps the known part exact in latent space by putting it back after every
#   step, noised to the same level as the rest, and lets the model paint the hole.
# - SD's own inpainting checkpoints see the mask and the masked picture as extra input
#   channels (a UNet with 9 input channels); the loop is the same.

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
