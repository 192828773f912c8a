"""`minisd generate PROMPT... --n 4 --steps 50 --guidance 5 --seed 0 --out out/`: text to PNG files.

Writes --n images for each prompt, in prompt order, as OUT/NNNN.png: numbered on after the
highest NNNN.png already in OUT, so a second run adds to the images of the first and never
replaces them; with --overwrite numbered from 0000, replacing what is there. The images
are sampled in batches (StableDiffusionPipeline.iter_batches) and each batch is written as
soon as it is done, so memory stays that of one batch. The model is the shipped shapes
model unless --model names a model folder.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
import warnings

import numpy as np

from minisd.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, SCHEDULER_NAMES

# The most images one run makes: at the shipped model's ~0.3 s an image (50 steps, a CPU
# core or two) 100,000 are already most of a day; 10^11 would never finish.
MAX_IMAGES = 100_000


def add_arguments(parser) -> None:
    from minisd.cli import non_negative_float, non_negative_int, positive_int

    parser.add_argument("prompt", nargs="+", help='one or more prompts, e.g. "a small red circle in the top left" '
                        '("" for an unconditional image)')
    parser.add_argument("--n", type=positive_int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=non_negative_float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale w >= 0 (default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seeds the noise: the same seed gives the same images (default 0)")
    parser.add_argument("--scheduler", default="ddim", help="ddim (default), ddpm or euler")
    parser.add_argument("--out", default="out", help="folder for the PNG files (default: out/); the images are "
                        "numbered on after the last NNNN.png already there, never replacing one")
    parser.add_argument("--overwrite", action="store_true",
                        help="number the images from 0000 instead, replacing those already in --out")
    parser.add_argument("--model", default=None, help="a model folder (default: the shipped shapes model)")
    parser.add_argument("--scale", type=positive_int, default=1,
                        help="enlarge each PNG this many times (nearest pixel, 1 to 64)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the loading time and the peak memory of the process")


def run(args) -> int:
    from tqdm import tqdm

    from minisd.cli import UsageError
    from minisd.pipeline import check_prompts, load_pipeline, prepare_out_dir

    if args.scheduler.lower() not in SCHEDULER_NAMES:
        raise UsageError(f"minisd generate: unknown --scheduler {args.scheduler!r}; choose one of "
                         f"{', '.join(SCHEDULER_NAMES)}")
    if args.scale > 64:
        raise UsageError(f"minisd generate: --scale must be between 1 and 64, got {args.scale}")
    total = len(args.prompt) * args.n
    if total > MAX_IMAGES:
        raise UsageError(f"minisd generate: --n {args.n} for {len(args.prompt)} prompt(s) is {total:,} images, more "
                         f"than the {MAX_IMAGES:,} one run makes (at ~0.3 s an image, 100,000 already take most of "
                         "a day); make them in several runs, each with its own --seed")
    try:
        check_prompts(args.prompt)
    except (TypeError, ValueError) as e:
        raise UsageError(f"minisd generate: {e}") from None
    prepare_out_dir(args.out)

    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_seconds = time.perf_counter() - start
    scheduler = args.scheduler.lower()
    try:  # the model's schedule decides how many steps it can take
        pipe.make_scheduler(scheduler).set_timesteps(args.steps)
    except ValueError as e:
        raise UsageError(f"minisd generate: --steps {args.steps}: {e}") from None
    first = 0 if args.overwrite else next_number(args.out)
    batch = pipe.default_batch_size(args.guidance != 1.0)
    start = time.perf_counter()
    paths = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = pipe.iter_batches(args.prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                    scheduler=scheduler, num_images_per_prompt=args.n, batch_size=batch)
        _print_warnings(caught)  # unknown words, a too-long prompt: said before the work starts
        with tqdm(total=total, unit="image", desc="minisd generate", disable=total <= batch,
                  dynamic_ncols=True) as bar:
            for images in batches:
                paths += write_pngs(images, args.out, args.scale, first=first, overwrite=args.overwrite)
                first = _number(paths[-1]) + 1
                bar.update(len(images))
    _print_warnings(caught)
    seconds = time.perf_counter() - start
    numbering = ""
    if args.overwrite:
        numbering = " (--overwrite: numbered from 0000, replacing)"
    elif _number(paths[0]) > 0:
        numbering = f" (numbered on after {_number(paths[0]) - 1:04d}.png, already there; --overwrite starts at 0000)"
    print(f"minisd generate: {len(paths)} image(s) in {seconds:.2f} s -> {paths[0]}"
          + (f" ... {os.path.basename(paths[-1])}" if len(paths) > 1 else "") + numbering)
    if args.verbose:
        from minisd.benchmarks import peak_memory_mb

        peak = peak_memory_mb()
        print(f"minisd generate: model {pipe.path} loaded in {load_seconds:.2f} s; peak memory "
              + (f"{peak:,.0f} MiB (resident)" if peak is not None else "not known on this platform"))
    return 0


def _print_warnings(caught: list) -> None:
    for w in caught:  # one line each
        print(f"minisd generate: warning: {w.message}", file=sys.stderr)
    caught.clear()


_IMAGE_NAME = re.compile(r"(\d{4,})\.png")


def _number(path: str) -> int:
    return int(_IMAGE_NAME.fullmatch(os.path.basename(path)).group(1))


def next_number(out: str) -> int:
    """One more than the highest NNNN.png in ``out`` (0 where there is none)."""
    numbers = [int(m.group(1)) for m in map(_IMAGE_NAME.fullmatch, os.listdir(out)) if m]
    return max(numbers, default=-1) + 1


def _claim(tmp: str, path: str) -> bool:
    """Give the finished file ``tmp`` the name ``path`` unless a file has it already (then False)."""
    try:
        os.link(tmp, path)  # atomic, and never replaces: FileExistsError instead
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links (FAT, some network shares): reserve the name first
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(tmp, path)
        return True


def write_pngs(images: np.ndarray, out: str, scale: int = 1, first: int = 0, overwrite: bool = False) -> list[str]:
    """Write the images as OUT/NNNN.png, numbered from ``first``; returns their paths.

    Each image is written whole to a temporary file of its own first (in OUT, named with
    this process's id and a random part, so that two runs never share one), then put under
    its name in one step. overwrite: NNNN.png is replaced whatever it holds. Otherwise a
    name already taken is skipped for the next number, so two runs writing into one folder
    at once take turns with the numbers instead of replacing each other's images.
    """
    from PIL import Image

    paths, number = [], first
    for im in images:
        if scale > 1:
            im = np.repeat(np.repeat(im, scale, axis=0), scale, axis=1)
        tmp = os.path.join(out, f".minisd-{os.getpid()}-{secrets.token_hex(4)}.png.tmp")
        try:
            with open(tmp, "xb") as f:
                Image.fromarray(im).save(f, format="PNG")
            while True:
                path = os.path.join(out, f"{number:04d}.png")
                number += 1
                if overwrite:
                    os.replace(tmp, path)
                    break
                if _claim(tmp, path):
                    break
        finally:
            if os.path.exists(tmp):  # still there after os.link, or after a failure
                os.remove(tmp)
        paths.append(path)
    return paths
