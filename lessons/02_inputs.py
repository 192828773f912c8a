# %% [markdown]
# # Lesson 2: the inputs, an image and its caption
#
# Stable Diffusion learned from pairs: a photograph and the text that came with it
# (LAION-5B: billions of pairs, trained at 512 x 512 pixels). minisd's default data set
# keeps that structure at toy size: one coloured shape on a white 32 x 32 canvas and a
# caption that says exactly what is drawn,
#
#     "a small red circle in the top left"  ->  a 32 x 32 RGB image
#
# This lesson looks at the pairs, at an image as the model sees it (a tensor of numbers),
# and at the pairs held out of training to test whether the model can compose a colour
# and a shape it has only seen apart.
#
# Run: `python lessons/02_inputs.py [--out DIR] [--fast]`.

# %%
import sys
import time
from collections import Counter
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
args = viz.lesson_args("02_inputs")
results = {}
t_start = time.perf_counter()

# %% [markdown]
# ## 1. The vocabulary of the data set
#
# Four attributes, each from a short list; every combination is a caption.

# %%
viz.header("1. what a caption can say")
print(f"  template: {shapes.CAPTION_TEMPLATE!r}")
for what, values in (("colours", shapes.COLORS), ("shapes", shapes.SHAPES), ("sizes", shapes.SIZES),
                     ("positions", shapes.POSITIONS)):
    print(f"  {what:<10} {', '.join(values)}")
n_all, n_train, n_held = (len(shapes.combinations(s)) for s in ("all", "train", "heldout"))
print(f"  {len(shapes.COLORS)} x {len(shapes.SHAPES)} x {len(shapes.SIZES)} x {len(shapes.POSITIONS)} = "
      f"{n_all} captions; x {len(shapes.JITTER) ** 2} jitters of the position = {n_all * 9} distinct images")
print(f"  train split: {n_train} captions; held out: {n_held} "
      f"({', '.join(' '.join(p) for p in sorted(shapes.HELD_OUT))}, in every size and position)")
results["captions_all"] = n_all
results["captions_train"] = n_train
results["captions_heldout"] = n_held

# %% [markdown]
# ## 2. A batch of training pairs
#
# `shapes.make_dataset(n, split, seed)` draws n pairs; the same seed always gives the
# same pairs. Each image is drawn exactly (no anti-aliasing), so that a generated
# image can later be graded attribute by attribute.

# %%
viz.header("2. a batch of pairs")
n_show = 16
batch = shapes.make_dataset(n_show, split="train", seed=0)
for caption in batch.captions[:4]:
    print(f"  {caption!r}")
print(f"  images: {batch.images.shape} {batch.images.dtype}")
viz.save(viz.image_grid(batch.images, titles=batch.captions, ncols=4, cell=1.5,
                        title="training pairs: image and caption"), args.out / "dataset_grid.png")

# %% [markdown]
# ## 3. An image is a tensor
#
# To the model an image is three arrays of numbers, one per colour channel (red, green,
# blue), in channels-first order (C, H, W) as PyTorch and diffusers keep it. Pixels are
# stored as integers 0-255; Stable Diffusion's VAE takes them scaled to [-1, 1]:
#
#     x = pixel / 127.5 - 1      (white 255 -> 1.0, black 0 -> -1.0)
#
# The white background is 1.0 in all three channels; a red shape (220, 40, 40) is
# (0.73, -0.69, -0.69). Below: the image, its three channels as heat maps, and a patch of
# its numbers.

# %%
viz.header("3. an image as a tensor")
image = batch.images[0]
x = to_model_input(image)
viz.shape_line("image as stored (H, W, C)", image.shape, (512, 512, 3))
viz.shape_line("model input (C, H, W)", x.shape, viz.SD["image"])
print(f"  numbers per image: minisd {x.size:,}; SD {int(np.prod(viz.SD['image'])):,} "
      f"({np.prod(viz.SD['image']) / x.size:.0f}x more)")
print(f"  dtype {x.dtype}, range [{x.min():.2f}, {x.max():.2f}]")
for c, name in enumerate(("red", "green", "blue")):
    print(f"  {name:<5} channel: mean {x[c].mean():+.3f}, min {x[c].min():+.3f}, max {x[c].max():+.3f}")
record = batch.records[0]
half = shapes.SIZES[record.size] // 2
px, py = max(0, record.center[0] - half - 3), max(0, record.center[1] - half - 3)  # a patch on the shape's edge
results["tensor_shape"] = list(x.shape)
results["tensor_min"] = float(x.min())
results["tensor_max"] = float(x.max())
results["tensor_mean"] = float(x.mean())

fig = plt.figure(figsize=(10, 3.4))
ax = fig.add_subplot(1, 5, 1)
ax.imshow(image, interpolation="nearest")
ax.set_title(viz._wrap(batch.captions[0], 20), fontsize=8)
ax.add_patch(plt.Rectangle((px - 0.5, py - 0.5), 8, 8, fill=False, ec="k", lw=1))
for c, (name, cmap) in enumerate((("red", "Reds"), ("green", "Greens"), ("blue", "Blues"))):
    ax = fig.add_subplot(1, 5, 2 + c)
    ax.imshow(x[c], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(f"channel {c} ({name}), 32 x 32\nblack -1 ... white +1", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
ax = fig.add_subplot(1, 5, 5)
patch = x[0, py:py + 8, px:px + 8]
ax.imshow(patch, cmap="gray", vmin=-1, vmax=1)
for (i, j), v in np.ndenumerate(patch):
    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=5.5, color="k" if v > 0 else "w")
ax.set_title(f"x[0, {py}:{py + 8}, {px}:{px + 8}]\n(the boxed patch, red channel)", fontsize=8)
ax.set_xticks([])
ax.set_yticks([])
viz.save(fig, args.out / "image_as_tensor.png")

# %% [markdown]
# ## 4. The caption is text
#
# The caption goes to the text encoder (lesson 5), which first cuts it into tokens and
# pads it to CLIP's 77 positions. SD's vocabulary has 49,408 tokens; the shapes captions
# use a handful of words:

# %%
viz.header("4. the words of the captions")
captions = shapes.make_dataset(2000, "train", seed=1).captions
words = Counter(w for c in captions for w in c.split())
lengths = sorted({len(c.split()) for c in captions})
print(f"  {len(words)} distinct words in 2,000 training captions (SD's tokenizer: "
      f"{viz.SD['vocab_size']:,} tokens); a caption has {' or '.join(map(str, lengths))} words, "
      f"far below CLIP's limit of 77 tokens")
print(f"  text embedding: SD {viz.SD['text']} per prompt (77 tokens x 768 numbers)")
results["distinct_words"] = len(words)

# %% [markdown]
# ## 5. How often each attribute appears
#
# Pairs are drawn uniformly over the split's combinations, so every colour, shape, size
# and position appears about equally often (colours paired with a held-out shape less).

# %%
viz.header("5. attribute counts")
n_count = 600 if args.fast else 3000
sample = shapes.make_dataset(n_count, split="train", seed=2)
fig, axes = plt.subplots(1, 4, figsize=(11, 2.8))
for ax, attr, values in zip(axes, ("color", "shape", "size", "position"),
                            (shapes.COLORS, shapes.SHAPES, shapes.SIZES, shapes.POSITIONS)):
    counts = Counter(getattr(r, attr) for r in sample.records)
    colors = [np.array(shapes.COLORS[v]) / 255 if attr == "color" else "0.5" for v in values]
    ax.bar(range(len(values)), [counts[v] for v in values], color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(list(values), rotation=40, ha="right", fontsize=7)
    ax.set_title(f"{attr} ({n_count} training pairs)", fontsize=8)
fig.tight_layout()
viz.save(fig, args.out / "attribute_counts.png")

# %% [markdown]
# ## 6. The held-out pairs: composition
#
# Blue triangles, yellow circles and green squares are never drawn for training. The
# model still sees blue (squares, circles), triangles (red, green, ...), yellow and so
# on: can it put together "blue" and "triangle"? Lesson 8 generates them. Here they are,
# and a check that none slipped into the training split.

# %%
viz.header("6. held-out compositions")
held = shapes.every_image("heldout")
center_only = [i for i, r in enumerate(held.records) if r.dx == 0 and r.dy == 0 and r.position in
               ("top left", "center", "bottom right")]
viz.save(viz.image_grid(held.images[center_only], titles=[held.captions[i] for i in center_only], ncols=6,
                        cell=1.5, title="held out of training: blue triangle, yellow circle, green square"),
         args.out / "heldout.png")
train = shapes.make_dataset(2000 if args.fast else 20000, split="train", seed=3)
leaks = sum(r.held_out for r in train.records)
print(f"  held-out split: {len(held.images)} images ({n_held} captions x 9 jitters)")
print(f"  held-out pairs among {len(train.records):,} training pairs: {leaks}")
results["heldout_images"] = len(held.images)
results["heldout_in_train"] = leaks

# %% [markdown]
# ## What we saw
#
# - A pair is a 32 x 32 RGB image and a caption naming colour, shape, size and position.
# - The model sees the image as a (3, 32, 32) float tensor in [-1, 1]; SD's is
#   (3, 512, 512), 256 times as many numbers.
# - Three colour-shape pairs are held out of training, to test composition.
#
# Next: what the diffusion process does to these images (lesson 3).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
