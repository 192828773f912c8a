"""Plotting helpers shared by the lessons (lessons/NN_name.py).

Every lesson does the same few things: read ``--out DIR`` and ``--fast`` from its command
line, draw figures with matplotlib, save them as small PNGs (and GIFs) under DIR, print
what it did, and record the numbers a reader (and the tests) can check. Those chores live
here so that a lesson reads as its story and nothing else:

    args = viz.lesson_args("03_forward_noise")       # args.out (a Path), args.fast
    fig = viz.image_grid(images, titles=captions)
    viz.save(fig, args.out / "dataset_grid.png")     # prints the path
    viz.save_gif(frames, args.out / "noising.gif")
    viz.write_results(args.out, {"last_step_std": 1.0})

Headless by default (the Agg backend, unless $MPLBACKEND names another): a lesson run as
a script or in CI never opens a window. Inside Jupyter or VS Code's interactive window the
figures show inline as well.

Images: a lesson may hand over uint8 (H, W, 3) in [0, 255] (what the dataset holds) or
float (3, H, W) in [-1, 1] (what the models see, SD's convention); ``to_uint8`` takes both
(the model's scaling itself is minisd.data.images').
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from minisd.data import images as model_images


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


import matplotlib  # noqa: E402

if not _in_notebook() and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # headless unless the user chose a backend
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

# Stable Diffusion v1.5's sizes, printed beside minisd's wherever a lesson shows a shape.
SD = {
    "image": (3, 512, 512),
    "latents": (4, 64, 64),
    "vae_factor": 8,
    "text": (77, 768),
    "vocab_size": 49408,
    "inference_steps": 50,
    "train_timesteps": 1000,
    "unet_params": 859_520_964,
    "vae_params": 83_653_863,
    "text_encoder_params": 123_060_480,
}

DPI = 80  # small files: a 6 x 4 inch figure is 480 x 320 pixels


# ---------------------------------------------------------------------------------------
# the command line every lesson shares
# ---------------------------------------------------------------------------------------


def lesson_args(name: str, argv=None, description: str | None = None) -> argparse.Namespace:
    """``--out DIR`` (default ./figures/<name>/) and ``--fast`` (smaller sizes, for CI).

    Unknown arguments are ignored, so that a notebook kernel's own flags do no harm.
    The output folder is created.
    """
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    parser.add_argument("--out", type=Path, default=Path("figures") / name,
                        help=f"folder for the figures (default: ./figures/{name}/)")
    parser.add_argument("--fast", action="store_true", help="smaller and quicker (what CI runs)")
    parser.add_argument("--model", default=None,
                        help="a model folder (e.g. one `minisd train all --out DIR` wrote); default: the shipped model")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None and not _in_notebook() else (argv or []))
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def header(title: str) -> None:
    """A section title in the printed output, so a reader can follow the run."""
    print(f"\n=== {title} ===")


def shape_line(what: str, ours, sd) -> str:
    """One line of "what: minisd (...)  |  Stable Diffusion v1.5 (...)", printed and returned."""
    line = f"{what:<28} minisd {str(tuple(ours) if isinstance(ours, (tuple, list)) else ours):<18} " \
           f"| SD v1.5 {tuple(sd) if isinstance(sd, (tuple, list)) else sd}"
    print(line)
    return line


def load_model(path=None):
    """``minisd.load_pipeline(path)`` (the shipped model when path is None), or None with a note.

    Lessons that need a trained model call this and skip what needs it when it is missing.
    """
    import minisd

    try:
        return minisd.load_pipeline(path)
    except (ImportError, FileNotFoundError, ValueError, OSError, KeyError) as error:
        print(f"  no trained model: {str(error).splitlines()[0]}")
        print("  (train one with `minisd train all --out DIR` and pass --model DIR, or use a minisd that ships "
              "its weights)")
        return None


def require_model(args, results: dict):
    """The trained pipeline for a lesson that cannot do without one.

    Without a model the lesson records ``model: false`` in its results, says why, and ends
    (exit status 0: a missing model is not an error of the lesson).
    """
    pipe = load_model(args.model)
    results["model"] = pipe is not None
    if pipe is None:
        write_results(args.out, results)
        print("this lesson needs a trained model; stopping here.")
        raise SystemExit(0)
    print(f"  model: {pipe.path}")
    return pipe


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------


def to_uint8(image) -> np.ndarray:
    """uint8 (H, W, 3) from uint8 (H, W, 3), float (H, W, 3) in [0, 1] or float (C, H, W) in [-1, 1]."""
    a = np.asarray(image.numpy() if hasattr(image, "numpy") else image)
    if a.dtype == np.uint8:
        return a
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = model_images.to_uint8(a)  # what the models see: CHW in [-1, 1]
    else:
        a = np.round(np.clip(np.asarray(a, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: each pixel becomes a factor x factor square (32 px is tiny)."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def image_grid(images, titles=None, ncols: int | None = None, cell: float = 1.3, title: str | None = None,
               fontsize: float = 6.5, wrap: int = 22):
    """A figure of images in a grid, each with its (wrapped) title; returns the Figure.

    The images are pasted into one mosaic and drawn with a single imshow (one axes per
    image would take seconds for a 50-image grid); each gets a thin grey frame, so that a
    white canvas stands out from the page.
    """
    images = [to_uint8(im) for im in images]
    images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    ppi = w / cell  # mosaic pixels per inch of figure
    labels = [_wrap(str(t), wrap) for t in titles] if titles is not None else [""] * n
    lines = max((lab.count("\n") + 1 for lab in labels if lab), default=0)
    band = int(math.ceil(lines * fontsize * 1.3 / 72 * ppi)) + (2 if lines else 0)
    gap = max(2, int(0.12 * ppi))
    cell_h, cell_w = band + h + gap, w + gap
    mosaic = np.full((nrows * cell_h, ncols * cell_w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        y0, x0 = r * cell_h + band, c * cell_w + gap // 2
        mosaic[y0:y0 + im.shape[0], x0:x0 + im.shape[1]] = im
    if title:  # wrapped to the figure's width (9 pt characters are about 0.07 inch wide)
        title = _wrap(title, max(20, int(mosaic.shape[1] / ppi / 0.07)))
    head = 0.2 + 0.16 * (title.count("\n") + 1) if title else 0.0
    fig = plt.figure(figsize=(mosaic.shape[1] / ppi, mosaic.shape[0] / ppi + head))
    ax = fig.add_axes((0, 0, 1, mosaic.shape[0] / ppi / (mosaic.shape[0] / ppi + head)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        y0, x0 = r * cell_h + band, c * cell_w + gap // 2
        ax.add_patch(matplotlib.patches.Rectangle((x0 - 0.5, y0 - 0.5), im.shape[1], im.shape[0], fill=False,
                                                  ec="0.75", lw=0.6))
        if labels[i]:
            ax.text(x0 + im.shape[1] / 2, y0 - 1, labels[i], ha="center", va="bottom", fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / (mosaic.shape[0] / ppi + head), va="top")
    return fig


def _wrap(text: str, width: int) -> str:
    """Break text into lines of at most ``width`` characters at spaces; existing line breaks stay."""
    out = []
    for paragraph in text.split("\n"):
        line = ""
        for w in paragraph.split():
            if line and len(line) + 1 + len(w) > width:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------


def save(fig, path: Path, dpi: int = DPI) -> Path:
    """Write the figure as a PNG, print where, and close it (in a notebook: show it first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    if _in_notebook():
        plt.show()
    plt.close(fig)
    print(f"  wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def save_gif(frames, path: Path, scale: int = 4, duration_ms: int = 100, last_frame_ms: int = 1000) -> Path:
    """Write frames (images as ``to_uint8`` takes them) as a looping GIF, enlarged by ``scale``."""
    from PIL import Image

    path = Path(path)
    pictures = [Image.fromarray(upscale(to_uint8(f), scale)) for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [last_frame_ms]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0,
                     optimize=False)
    print(f"  wrote {path} ({len(pictures)} frames, {path.stat().st_size / 1024:.0f} KiB)")
    return path


def write_results(out: Path, results: dict) -> Path:
    """The lesson's key numbers as out/results.json (what the tests read), printed as well."""
    path = Path(out) / "results.json"
    clean = {k: _plain(v) for k, v in results.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    print(f"\nkey numbers ({path}):")
    for k, v in clean.items():
        print(f"  {k}: {v}")
    return path


def _plain(value):
    """NumPy scalars and arrays to JSON's numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value

