"""How good is a model? Three measurements; `minisd eval` (minisd/cli/evaluate.py) runs them
all and writes a JSON report and a grid of images.

 1. VAE reconstruction: PSNR = 10 log10(255^2 / MSE) between held-out images x and
    D(E(x)) (the posterior's mean, decoded, rounded to uint8). Held-out images show the
    colour-shape pairs the VAE never saw. Reported per image (mean) and over the whole
    set (PSNR of the mean squared error: the stricter of the two; the target is >= 30 dB).
 2. Prompt adherence: generate an image for a caption, read it back with the project's
    rule-based reader (minisd/data/reader.py: colour, shape, size, position from pixels)
    and count the images whose four attributes all match. Seen pairs: every one of the 150
    training combinations; held-out pairs: the 30 combinations of blue triangle, yellow
    circle and green square, which the model has only seen as separate words (composition).
 3. CLIP score with minisd's own CLIP (the model folder's clip/, trained in stage 2):
    100 * cos(image features, caption features), for the generated images, for real
    images of the same captions (the ceiling) and for mismatched pairs (the floor).
"""

from __future__ import annotations

import os

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean of per-image PSNR, PSNR of the mean MSE) in dB for uint8 image batches (N, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    per_image = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return float(per_image.mean()), float(10 * np.log10(255.0 ** 2 / max(mse.mean(), 1e-10)))


def vae_psnr(vae, images: np.ndarray, batch: int = 128) -> dict:
    from minisd.tensor import no_grad
    from minisd.data.images import to_model_input, to_uint8

    recon = []
    with no_grad():
        for i in range(0, len(images), batch):
            x = to_model_input(images[i:i + batch])
            recon.append(to_uint8(vae.decode(vae.encode(x).mode()).numpy()))
    mean_db, overall_db = psnr(np.concatenate(recon), images)
    return {"images": len(images), "psnr_db_mean": round(mean_db, 2), "psnr_db_overall": round(overall_db, 2)}


def adherence(pipe, records, seeds: int, first_seed: int, batch: int, steps: int, guidance: float,
              scheduler: str, progress: bool = True):
    """Generate `seeds` images per record's caption; read each back. Returns (summary, images, readings, targets)."""
    from tqdm import tqdm

    from minisd.data.reader import read

    jobs = [(r, first_seed + s) for s in range(seeds) for r in records]
    images, readings = [], []
    # Prompts are batched together; each batch gets its own seed, so the result depends only on
    # (batch position, seed) and is reproducible.
    with tqdm(total=len(jobs), desc="generating", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            out = pipe([r.caption for r, _ in chunk], steps=steps, guidance_scale=guidance,
                       seed=chunk[0][1] * 7919 + i, scheduler=scheduler, batch_size=batch)
            images.append(out)
            readings.extend(read(im) for im in out)
            bar.update(len(chunk))
    images = np.concatenate(images)
    targets = [r for r, _ in jobs]
    per_attribute = {k: float(np.mean([rd.agrees_with(t)[k] for rd, t in zip(readings, targets)]))
                     for k in ("color", "shape", "size", "position")}
    correct = [rd.matches(t) for rd, t in zip(readings, targets)]
    summary = {"images": len(jobs), "all_four_right": round(float(np.mean(correct)), 4),
               "per_attribute": {k: round(v, 4) for k, v in per_attribute.items()}}
    return summary, images, readings, targets, correct


def clip_scores(clip, tokenizer, generated, captions, real) -> dict:
    """100 * cos(image, caption) with minisd's CLIP: generated vs real images, and mismatched pairs."""
    from minisd.tensor import no_grad
    from minisd.data.images import to_model_input

    def features(fn, x):
        with no_grad():
            f = fn(x).numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    ids = tokenizer(captions)
    t = features(clip.get_text_features, ids)
    g = features(clip.get_image_features, to_model_input(generated))
    r = features(clip.get_image_features, to_model_input(real))
    shuffled = np.roll(np.arange(len(captions)), 1)
    return {"generated": round(float(100 * (g * t).sum(1).mean()), 2),
            "real_images": round(float(100 * (r * t).sum(1).mean()), 2),
            "mismatched_real": round(float(100 * (r[shuffled] * t).sum(1).mean()), 2)}


def save_grid(images, titles, ok, path: str, columns: int = 10) -> None:
    """A grid of images with their captions; a green frame if the reader found all four attributes right, red if not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 1.75), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, title, good in zip(axes.flat, images, titles, ok):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(title, fontsize=5)
        for side in ax.spines.values():
            side.set_visible(True)
            side.set_color("tab:green" if good else "tab:red")
            side.set_linewidth(2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    plt.close(fig)


def short_caption(c: str) -> str:
    return c.replace("a ", "", 1).replace(" in the ", "\n")
