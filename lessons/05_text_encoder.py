# %% [markdown]
# # Lesson 5: the text encoder, 77 tokens and an embedding each
#
# The UNet is told what to draw through cross-attention to a sequence of vectors, one
# per token of the prompt. Stable Diffusion v1 makes them with the text half of OpenAI's
# CLIP ViT-L/14, frozen:
#
#     prompt --tokenizer--> 77 ids --CLIP text transformer--> (77, 768)
#
# minisd does the same with its own CLIP, trained on the shapes captions
# (`minisd train clip`): a byte-pair tokenizer, then a small causal transformer that
# outputs (77, hidden). This lesson follows one prompt through both, shows what a
# causal text transformer implies, and shows what CLIP was trained for: matching
# captions to images.
#
# Needs a trained model: the one shipped with minisd, or `--model DIR`.
#
# Run: `python lessons/05_text_encoder.py [--out DIR] [--fast] [--model DIR]`.

# %%
import os
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
args = viz.lesson_args("05_text_encoder")
results = {}
t_start = time.perf_counter()
pipe = viz.require_model(args, results)
tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder

# %% [markdown]
# ## 1. Tokens: a prompt becomes 77 integers
#
# The tokenizer lower-cases the prompt, cuts it into words, splits rare words into
# pieces it knows (byte-pair encoding), maps each piece to an id, frames the ids with
# `<|startoftext|>` and `<|endoftext|>`, and pads with `<|endoftext|>` to CLIP's fixed
# length of 77. Our captions are common words, so each word is one token.

# %%
viz.header("1. tokens")
prompt = "a small red circle in the top left"
tokens = tokenizer.tokenize(prompt)
ids = tokenizer([prompt])[0]
vocab = tokenizer.get_vocab()
bos, eos = int(ids[0]), int(ids[len(tokens) + 1])
print(f"  prompt: {prompt!r}")
print(f"  tokens: {tokens}")
print(f"  ids ({len(ids)}): {ids[:len(tokens) + 3].tolist()} ... ({len(ids) - len(tokens) - 2} x {eos} padding)")
viz.shape_line("vocabulary", f"{len(vocab):,} tokens", f"{viz.SD['vocab_size']:,} tokens")
viz.shape_line("ids per prompt", len(ids), 77)
results["n_tokens"] = len(tokens)
results["ids_length"] = int(len(ids))
results["padding"] = int((ids[len(tokens) + 2:] == eos).sum())

fig, ax = plt.subplots(figsize=(11, 1.9))
kind = np.array([0] + [1] * len(tokens) + [2] + [3] * (len(ids) - len(tokens) - 2))
colors = np.array(["#9ecae1", "#fdd0a2", "#a1d99b", "#e0e0e0"])
for i in range(len(ids)):
    ax.add_patch(plt.Rectangle((i, 0), 1, 1, fc=colors[kind[i]], ec="w", lw=0.5))
    if i < len(tokens) + 3:
        label = ["<start>"] if i == 0 else [tokens[i - 1].replace("</w>", "")] if kind[i] == 1 else ["<end>"]
        ax.text(i + 0.5, 1.15, label[0], rotation=60, fontsize=7, ha="left", va="bottom")
        ax.text(i + 0.5, 0.5, str(ids[i]), rotation=90, fontsize=6, ha="center", va="center")
ax.text(len(tokens) + 3 + (len(ids) - len(tokens) - 3) / 2, 0.5, f"padding: <end> (id {eos}) to position 77",
        ha="center", va="center", fontsize=8)
ax.set_xlim(0, len(ids))
ax.set_ylim(0, 2.6)
ax.set_yticks([])
ax.set_xlabel("position (0 ... 76); SD's CLIP pads every prompt to the same 77")
ax.spines[["top", "right", "left"]].set_visible(False)
fig.tight_layout()
viz.save(fig, args.out / "tokens.png")

# %% [markdown]
# ## 2. The embedding: (77, hidden)
#
# The text transformer maps the 77 ids to 77 vectors (its last hidden state, what SD's
# UNet attends to). Every position gets a vector, padding included: the padded
# positions have seen the whole prompt and carry it along.

# %%
viz.header("2. the embedding")
with minisd.no_grad():
    emb = text_encoder(ids[None]).numpy()[0]
hidden = emb.shape[1]
viz.shape_line("text embedding", emb.shape, viz.SD["text"])
viz.shape_line("parameters", f"{text_encoder.num_parameters():,}", f"{viz.SD['text_encoder_params']:,}")
results["embedding_shape"] = list(emb.shape)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2.2, 1]})
lim = np.percentile(np.abs(emb), 99)
im = axes[0].imshow(emb.T, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
axes[0].set_xlabel("token position")
axes[0].set_ylabel(f"feature (hidden = {hidden}; SD: 768)")
axes[0].set_title(f"text_encoder(ids): ({emb.shape[0]}, {hidden}) for {prompt!r}", fontsize=8)
axes[0].axvline(len(tokens) + 1.5, color="k", lw=0.6, ls="--")
fig.colorbar(im, ax=axes[0], fraction=0.03)
end_vec = emb[len(tokens) + 1]  # the <end> token's vector, the last one that reads the prompt
unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
cos_end = unit @ (end_vec / np.linalg.norm(end_vec))
axes[1].plot(cos_end, ".-", ms=3)
axes[1].axvline(len(tokens) + 1.5, color="k", lw=0.6, ls="--", label="end of the prompt")
axes[1].set_ylim(min(0, cos_end.min()) - 0.05, 1.05)
axes[1].set_xlabel("token position")
axes[1].set_title("cosine similarity of each position with <end>", fontsize=8)
axes[1].legend(fontsize=7)
results["padding_cosine_to_end"] = float(cos_end[len(tokens) + 2:].mean())
print(f"  the padding positions' vectors: cosine similarity with <end>'s {cos_end[len(tokens) + 2:].mean():.2f} "
      "on average (they too have read the whole prompt)")
fig.tight_layout()
viz.save(fig, args.out / "embedding_heatmap.png")

# %% [markdown]
# ## 3. A causal transformer: each position sees only what came before
#
# CLIP's text transformer is causal: position i attends to positions 0 ... i. So
# changing the word at position k leaves positions 0 ... k-1 exactly as they were and
# changes k and everything after (the padding included). Below: the distance between
# the embeddings of prompts that differ in one word, position by position.

# %%
viz.header("3. change one word")
variants = {"colour: red -> blue": prompt.replace("red", "blue"),
            "shape: circle -> square": prompt.replace("circle", "square"),
            "position: left -> right": prompt.replace("left", "right")}
with minisd.no_grad():
    others = text_encoder(tokenizer(list(variants.values()))).numpy()
fig, ax = plt.subplots(figsize=(8, 3))
unchanged_before = 0.0
for (label, text), other in zip(variants.items(), others):
    changed = next(i for i, (a, b) in enumerate(zip(tokenizer([text])[0], ids)) if a != b)
    dist = np.linalg.norm(other - emb, axis=1)
    unchanged_before = max(unchanged_before, float(dist[:changed].max()))
    ax.plot(dist[:20], ".-", label=f"{label} (position {changed})")
    print(f"  {label:<26} first changed position {changed}: distance before it {dist[:changed].max():.2e}, "
          f"at it {dist[changed]:.2f}, on the padding {dist[len(tokens) + 2:].mean():.2f}")
ax.set_xlabel("token position (the first 20 of 77)")
ax.set_ylabel("|embedding difference|")
ax.set_xticks(range(20))
ax.set_title("one word changed: positions before it are untouched (causal attention)", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
viz.save(fig, args.out / "prompt_difference.png")
results["max_change_before_edit"] = unchanged_before

# %% [markdown]
# ## 4. What CLIP learned: which caption goes with which image
#
# The text encoder was trained together with an image encoder (CLIP, Radford et al.
# 2021): for a batch of image-caption pairs, both are embedded, and the cosine
# similarity of every caption with every image is pushed up for the true pairs (the
# diagonal) and down for the rest. The matrix below is that similarity for a fresh
# batch. SD took OpenAI's CLIP, trained this way on 400 million pairs, and kept only
# the text half; minisd's was trained on the shapes captions, and its image half is in
# the model folder's `clip/`.

# %%
viz.header("4. caption-image similarity")
clip_folder = os.path.join(str(pipe.path), "clip")
results["clip_part"] = os.path.isdir(clip_folder)
if not results["clip_part"]:
    print(f"  skipped: the model folder has no clip/ (the image tower) at {clip_folder}")
else:
    from minisd import io
    from minisd.models.clip import CLIPModel

    clip = io.load_pretrained(clip_folder, CLIPModel)
    n_pairs = 8
    # one image per colour-shape pair, so that no two captions describe the same picture
    pairs = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in shapes.HELD_OUT]
    positions = list(shapes.POSITIONS)
    records = [shapes.ShapeRecord(c, s, ("large", "small")[i % 2], positions[i % len(positions)])
               for i, (c, s) in enumerate(pairs[::2][:n_pairs])]
    images = np.stack([shapes.render_record(r) for r in records])
    captions = [r.caption for r in records]
    with minisd.no_grad():
        logits = clip(to_model_input(images), tokenizer(captions)).numpy()
    cos = logits / np.exp(float(clip.logit_scale.numpy()))
    top1 = float((cos.argmax(axis=1) == np.arange(len(records))).mean())
    print(f"  {len(records)} captions x {len(records)} images; the right image ranks first for "
          f"{top1:.0%} of the captions")
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = plt.subplots(figsize=(7, 5))
    im = ax.imshow(cos, cmap="viridis")
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels([c[2:] for c in captions], fontsize=7)
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels([])
    for j, picture in enumerate(images):  # each column's image under it
        ax.add_artist(AnnotationBbox(OffsetImage(picture, zoom=0.9), (j, len(records) - 0.5), xybox=(0, -16),
                                     boxcoords="offset points", frameon=True, annotation_clip=False, pad=0.1))
    ax.set_title(f"CLIP: cosine similarity of each caption (row) with each image (column)\n"
                 f"the right image ranks first for {top1:.0%} of the captions", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.subplots_adjust(left=0.33, bottom=0.12, right=0.86, top=0.9)
    viz.save(fig, args.out / "clip_similarity.png")
    results["clip_top1"] = top1
    results["clip_diagonal_mean"] = float(np.diag(cos).mean())
    results["clip_offdiagonal_mean"] = float(cos[~np.eye(len(cos), dtype=bool)].mean())

# %% [markdown]
# ## What we saw
#
# - A prompt becomes 77 ids (SD's vocabulary: 49,408 tokens; ours: a few hundred).
# - The text encoder turns them into a (77, hidden) sequence: (77, 768) in SD, (77, 64)
#   here. The UNet attends to all 77 vectors, not to one summary.
# - Causal attention: a word changes only its own position and those after it.
# - CLIP was trained to match captions with images.
#
# Next: the UNet, which uses these vectors to predict noise (lesson 6).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
