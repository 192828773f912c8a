"""`minisd eval`: how good is a model? Three measurements, a JSON report and a grid of images.

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

import json
import os
import time

import numpy as np


def add_arguments(parser) -> None:
    from minisd.cli import non_negative_float, non_negative_int, positive_int
    from minisd.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

    parser.add_argument("--model", default=None, help="model folder (default: the shipped shapes model)")
    parser.add_argument("--out", default="eval", help="folder for report.json and the grids (default: eval/)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"sampling steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=non_negative_float, default=DEFAULT_GUIDANCE,
                        help=f"guidance scale (default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="images per seen combination (default 1: 150 images)")
    parser.add_argument("--heldout-seeds", type=positive_int, default=3,
                        help="images per held-out combination (default 3: 90 images)")
    parser.add_argument("--batch", type=positive_int, default=30, help="prompts per sampling batch")
    parser.add_argument("--seed", type=non_negative_int, default=1000, help="first seed (unlike the training seeds)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("vae", "adherence", "clip"),
                        help="measurements to leave out")


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


def run(args) -> int:
    from minisd.cli import UsageError
    from minisd.data import shapes
    from minisd.pipeline import SCHEDULER_NAMES, load_pipeline, prepare_out_dir

    steps, guidance, scheduler = args.steps, args.guidance, args.scheduler.lower()
    if scheduler not in SCHEDULER_NAMES:
        raise UsageError(f"minisd eval: unknown --scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    prepare_out_dir(args.out)
    pipe = load_pipeline(args.model)
    try:  # the model's schedule decides how many steps it can take: said before any work starts
        pipe.make_scheduler(scheduler).set_timesteps(steps)
    except ValueError as e:
        raise UsageError(f"minisd eval: --steps {steps}: {e}") from None
    report = {"model": os.path.abspath(pipe.path), "steps": steps, "guidance_scale": guidance, "scheduler": scheduler}
    start = time.perf_counter()

    from minisd.data import folder

    own = folder.validation_images(pipe.path)  # a model trained on a captioned folder: its images
    if "vae" not in args.skip:
        images, what = own if own is not None else (shapes.every_image("heldout").images, "held-out images")
        report["vae"] = {**vae_psnr(pipe.vae, images), "on": what}
        print(f"VAE PSNR on {what if own else f'{len(images)} {what}'}: {report['vae']['psnr_db_overall']:.2f} dB "
              f"(per-image mean {report['vae']['psnr_db_mean']:.2f} dB)")
    if own is not None and not {"adherence", "clip"} <= set(args.skip):
        print("prompt adherence and CLIP score: skipped, they read shapes images (minisd/data/reader.py) and "
              f"this model was trained on a folder ({folder.read_record(pipe.path)['dataset']})")
    elif "adherence" not in args.skip or "clip" not in args.skip:
        report["adherence"] = {}
        generated, captions, real = [], [], []
        for split, seeds in (("seen", args.seeds), ("heldout", args.heldout_seeds)):
            records = [shapes.ShapeRecord(*c) for c in shapes.combinations("train" if split == "seen" else "heldout")]
            summary, images, readings, targets, ok = adherence(pipe, records, seeds, args.seed, args.batch, steps,
                                                               guidance, scheduler)
            report["adherence"][split] = summary
            print(f"prompt adherence, {split} colour-shape pairs: {summary['all_four_right']:.1%} of "
                  f"{summary['images']} images with all four attributes right; per attribute "
                  + ", ".join(f"{k} {v:.0%}" for k, v in summary["per_attribute"].items()))
            save_grid(images, [short_caption(t.caption) for t in targets], ok,
                      os.path.join(args.out, f"grid_{split}.png"))
            generated.append(images)
            captions += [t.caption for t in targets]
            real.append(np.stack([shapes.render_record(t) for t in targets]))
        clip_folder = os.path.join(pipe.path, "clip")
        if "clip" not in args.skip and os.path.isdir(clip_folder):
            from minisd import io
            from minisd.models.clip import CLIPModel

            clip = io.load_pretrained(clip_folder, CLIPModel)
            report["clip_score"] = clip_scores(clip, pipe.tokenizer, np.concatenate(generated), captions,
                                               np.concatenate(real))
            print(f"CLIP score (minisd's CLIP): generated {report['clip_score']['generated']:.1f}, real images "
                  f"{report['clip_score']['real_images']:.1f}, mismatched pairs {report['clip_score']['mismatched_real']:.1f}")
        elif "clip" not in args.skip:
            report["clip_score"] = None
            print(f"CLIP score: skipped, the model has no clip/ folder ({clip_folder})")
    report["seconds"] = round(time.perf_counter() - start, 1)
    path = os.path.join(args.out, "report.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    print(f"minisd eval: report in {path}")
    return 0
