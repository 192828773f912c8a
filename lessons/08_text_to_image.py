# %% [markdown]
# # Lesson 8: text to image, everything together
#
#     prompt -> tokenizer -> 77 ids -> text encoder -> c (77, hidden)
#     z_T ~ N(0, I) -> 50 x [UNet(z_t, t, c) with classifier-free guidance -> scheduler step] -> z_0
#     z_0 -> VAE decoder -> image
#
# `pipe = minisd.load_pipeline(); pipe(prompts, steps=50, guidance_scale=5, seed=0)`
# does all of it, as diffusers' `StableDiffusionPipeline` does for SD. This lesson
# generates images from prompts and grades them (the shapes data set is exact, so a
# reader can say whether the colour, shape, size and position came out right), then
# turns the knobs: the guidance scale, the seed, and prompts the model never saw
# (the held-out colour-shape pairs of lesson 2).
#
# **Classifier-free guidance** (Ho & Salimans 2022): the UNet was trained to predict the
# noise with the caption and, 10% of the time, with the empty prompt. At sampling time
# it is asked both, and the difference is amplified:
#
#     eps = eps(z_t, t, "") + w (eps(z_t, t, c) - eps(z_t, t, ""))
#
# w = 0 ignores the prompt, w = 1 is plain conditional sampling, w > 1 pushes harder
# towards the prompt (SD's default: 7.5; minisd's: 5).
#
# Needs a trained model: the one shipped with minisd, or `--model DIR`.
#
# Run: `python lessons/08_text_to_image.py [--out DIR] [--fast] [--model DIR]`.

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
args = viz.lesson_args("08_text_to_image")
results = {}
t_start = time.perf_counter()
pipe = viz.require_model(args, results)
steps = 10 if args.fast else viz.SD["inference_steps"]
guidance = 5.0
print(f"  {steps} DDIM steps (SD: {viz.SD['inference_steps']}), guidance {guidance} (SD: 7.5); "
      f"images {pipe.vae.config['sample_size']} px (SD: 512), latents {pipe.latent_shape} (SD: {viz.SD['latents']})")


def grade(images, records):
    """For each image, the reader's verdict per attribute, and the number of images right in all four."""
    readings = reader.read_batch(images)
    verdicts = [reading.agrees_with(record) for reading, record in zip(readings, records)]
    return verdicts, sum(all(v.values()) for v in verdicts)


def label(record, verdict):
    wrong = [k for k, ok in verdict.items() if not ok]
    return f"{record.caption[2:]}\n" + ("all right" if not wrong else "wrong: " + ", ".join(wrong))


# %% [markdown]
# ## 1. Prompts to images, graded
#
# Captions from the training distribution (not necessarily the exact jitter seen in
# training). Under each image: the prompt, and what the reader found wrong.
#
# All the images of sections 1, 3 and 4 are made in one call of the pipeline, one batch:
# each step evaluates the UNet once on all of them (twice as many rows, for guidance),
# which costs far less than one call per prompt. Each image gets its own starting noise
# from the seeded generator.

# %%
viz.header("1. prompts to images")
n_prompts = 4 if args.fast else 6
records = shapes.make_dataset(n_prompts, "train", seed=11).records
seed_record = shapes.ShapeRecord("purple", "circle", "small", "bottom left")
n_seeds = 2 if args.fast else 4
held_records = [shapes.ShapeRecord(c, s, size, pos) for (c, s) in sorted(shapes.HELD_OUT)
                for size, pos in (("large", "center"), ("small", "top left"))]
if args.fast:
    held_records = held_records[::2]
everything = list(records) + [seed_record] * n_seeds + held_records
t0 = time.perf_counter()
all_images = pipe([r.caption for r in everything], steps=steps, guidance_scale=guidance, seed=0)
print(f"  {len(everything)} images ({n_prompts} prompts, {n_seeds} starting noises for one prompt, "
      f"{len(held_records)} held-out prompts) in one batch: {time.perf_counter() - t0:.1f} s")
images = all_images[:n_prompts]
seeded = all_images[n_prompts:n_prompts + n_seeds]
held_images = all_images[n_prompts + n_seeds:]

verdicts, right = grade(images, records)
per_attribute = {k: float(np.mean([v[k] for v in verdicts])) for k in ("color", "shape", "size", "position")}
print(f"  all four attributes right: {right} of {n_prompts}; per attribute: "
      + ", ".join(f"{k} {v:.0%}" for k, v in per_attribute.items()))
viz.save(viz.image_grid(images, titles=[label(r, v) for r, v in zip(records, verdicts)], ncols=3 if n_prompts == 6 else 4, cell=1.5,
                        fontsize=6, wrap=26, title="prompts -> images (graded by the shapes reader)"),
         args.out / "prompts.png")
results["train_prompts"] = n_prompts
results["train_all_right"] = right
results.update({f"train_{k}_accuracy": v for k, v in per_attribute.items()})

# %% [markdown]
# ## 2. The guidance scale
#
# One prompt, one starting noise z_T, guidance w from 0 to 10 or more. At w = 0 the prompt is
# ignored: the model draws *some* shape. As w grows the image follows the prompt more
# closely; too large a w overshoots (in SD: saturated colours, artefacts).
#
# To run all the scales in one batch we write the sampling loop out here, the same loop
# `pipe(...)` runs: each row of the batch is one scale's trajectory, and the guidance
# formula is applied row by row.

# %%
viz.header("2. guidance sweep")
sweep_record = shapes.ShapeRecord("red", "triangle", "large", "top right")
scales = np.array([0.0, 1.0, 3.0, 7.5, 12.0] if not args.fast else [0.0, 1.0, 5.0, 10.0], dtype=np.float32)
k = len(scales)
scheduler = pipe.make_scheduler("ddim")
scheduler.set_timesteps(steps)
z_T = np.random.default_rng(1).standard_normal((1, *pipe.latent_shape)).astype(np.float32)
z = np.repeat(z_T, k, axis=0)
c = pipe.encode_prompt([sweep_record.caption])
c_empty = pipe.encode_prompt([""])
context = np.concatenate([np.repeat(c_empty, k, axis=0), np.repeat(c, k, axis=0)])  # k unconditional, k conditional
w = scales[:, None, None, None]
with minisd.no_grad():
    for t in scheduler.timesteps:
        eps = pipe.unet(np.concatenate([z, z]), int(t), context).numpy()
        eps_u, eps_c = eps[:k], eps[k:]
        z = scheduler.step(eps_u + w * (eps_c - eps_u), int(t), z).prev_sample  # classifier-free guidance
sweep = pipe.decode_latents(z)
sweep_verdicts, _ = grade(sweep, [sweep_record] * k)
viz.save(viz.image_grid(sweep, titles=[f"w = {s:g}\n" + ("all right" if all(v.values()) else
                                                         "wrong: " + ", ".join(a for a, ok in v.items() if not ok))
                                       for s, v in zip(scales, sweep_verdicts)],
                        ncols=k, cell=1.4, fontsize=6.5, wrap=26,
                        title=f"{sweep_record.caption!r}, the same z_T, guidance scale w"),
         args.out / "guidance.png")
for s, v in zip(scales, sweep_verdicts):
    print(f"  w = {s:4.1f}: attributes right {sum(v.values())} of 4")
same = pipe(sweep_record.caption, steps=steps, guidance_scale=float(scales[-1]), latents=z_T)
results["guidance_scales"] = scales.tolist()
results["guidance_attributes_right"] = [sum(v.values()) for v in sweep_verdicts]
results["sweep_matches_pipeline"] = float(np.abs(same[0].astype(float) - sweep[-1].astype(float)).max())
print(f"  the hand-written loop and pipe(...) agree at w = {scales[-1]:g}: largest pixel difference "
      f"{results['sweep_matches_pipeline']:.0f} of 255")

# %% [markdown]
# ## 3. Starting noises
#
# The seed fixes z_T, and (with DDIM) that fixes the image. Several draws of z_T for the
# same prompt: different jitter, sometimes a different reading of the prompt.

# %%
viz.header("3. starting noises")
seed_verdicts, seeds_right = grade(seeded, [seed_record] * n_seeds)
viz.save(viz.image_grid(seeded, titles=[f"z_T draw {s}" for s in range(n_seeds)], ncols=n_seeds, cell=1.3,
                        fontsize=7, title=f"{seed_record.caption!r}: {n_seeds} starting noises"),
         args.out / "seeds.png")
print(f"  {seeds_right} of {n_seeds} draws right in all four attributes")
results["seeds_all_right"] = seeds_right
results["seed_draws"] = n_seeds

# %% [markdown]
# ## 4. Compositions never seen: the held-out pairs
#
# No blue triangle, yellow circle or green square was ever in training (lesson 2). The
# model has seen blue, triangles, yellow, circles, green and squares, each with other
# partners. Can it compose them? This is the toy version of SD drawing "an astronaut
# riding a horse", which is not in its training set either.

# %%
viz.header("4. held-out compositions")
held_verdicts, held_right = grade(held_images, held_records)
held_attr = {k: float(np.mean([v[k] for v in held_verdicts])) for k in ("color", "shape", "size", "position")}
viz.save(viz.image_grid(held_images, titles=[label(r, v) for r, v in zip(held_records, held_verdicts)],
                        ncols=len(held_records), cell=1.5, fontsize=6, wrap=26,
                        title="held-out colour-shape pairs, never seen in training"), args.out / "heldout.png")
print(f"  all four right: {held_right} of {len(held_records)}; per attribute: "
      + ", ".join(f"{k} {v:.0%}" for k, v in held_attr.items()))
results["heldout_prompts"] = len(held_records)
results["heldout_all_right"] = held_right
results.update({f"heldout_{k}_accuracy": v for k, v in held_attr.items()})

# %% [markdown]
# ## What we saw
#
# - A prompt becomes an image through the tokenizer, the text encoder, 50 guided UNet
#   steps and the decoder: Stable Diffusion's pipeline at toy scale.
# - The guidance scale trades variety for faithfulness to the prompt.
# - The starting noise (the seed) decides the details, and sometimes the reading.
# - The held-out pairs test composition: the printed accuracies say how well this model
#   puts together what it learned apart. (`minisd eval` measures all of this at scale.)

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
