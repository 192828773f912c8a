"""`minisd generate PROMPT... --n 4 --steps 50 --guidance 5 --seed 0 --out out/`: text to PNG files.

Writes --n images for each prompt, in prompt order, as OUT/NNNN.png: numbered on after the
highest NNNN.png already in OUT, so a second run adds to the images of the first and never
replaces them; with --overwrite numbered from 0000, replacing what is there. The images
are sampled in batches (StableDiffusionPipeline.iter_batches) and each batch is written as
soon as it is done, so memory stays that of one batch. The model is the shipped shapes
model unless --model names a model folder.

The rest of the everyday toolbox, as pipe(...) takes it (diffusers' meaning):

    --negative "a green square"            what the images should not be (once, or once per prompt)
    --height 48 --width 64                 the size, a multiple of the VAE's factor (shapes model: 4)
    --image in.png --strength 0.6          img2img: start from in.png, noised 60% of the way
    --image in.png --mask mask.png         inpainting: repaint the mask's white part
    --scheduler dpm++2m --karras           any scheduler (SCHEDULER_NAMES), Karras sigmas where it has them
    --eta 0.5 --guidance-rescale 0.7       DDIM's eta; Lin et al.'s rescaled guidance
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
import warnings

import numpy as np

from minisd.cli import UsageError, fraction, non_negative_float, non_negative_int, positive_int
from minisd.pipeline import (DEFAULT_GUIDANCE, DEFAULT_INPAINT_STRENGTH, DEFAULT_STEPS, DEFAULT_STRENGTH,
                             SCHEDULER_NAMES)

# The most images one run makes: at the shipped model's ~0.3 s an image (50 steps, a CPU
# core or two) 100,000 are already most of a day; 10^11 would never finish.
MAX_IMAGES = 100_000


def add_arguments(parser) -> None:
    parser.add_argument("prompt", nargs="+", help='one or more prompts, e.g. "a small red circle in the top left" '
                        '("" for an unconditional image)')
    parser.add_argument("--n", type=positive_int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=non_negative_float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale w >= 0 (default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--negative", action="append", default=None, metavar="TEXT",
                        help="negative prompt: what the images should not be, in place of the empty prompt of "
                             "guidance; once for every prompt, or once per prompt in their order")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seeds the noise: the same seed gives the same images (default 0)")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help=f"{', '.join(SCHEDULER_NAMES)} (default: the model's, as its "
                             "scheduler/scheduler_config.json names it; the shipped model's is ddim)")
    parser.add_argument("--karras", action="store_true",
                        help='Karras et al.\'s noise levels (use_karras_sigmas) for the schedulers that have them '
                             '(euler, heun, lms, dpm++2m, unipc): "DPM++ 2M Karras"')
    parser.add_argument("--eta", type=non_negative_float, default=0.0,
                        help="DDIM's eta: 0 deterministic (default), 1 DDPM's noise at every step")
    parser.add_argument("--guidance-rescale", type=fraction, default=0.0, metavar="PHI",
                        help="rescale the guided noise to the conditional one's spread (Lin et al. 2023; 0.7 in "
                             "the paper; default 0: off)")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="image height in pixels, a multiple of the VAE's factor (default: the model's size, "
                             "32 for the shipped model)")
    parser.add_argument("--width", type=positive_int, default=None, help="image width in pixels (as --height)")
    parser.add_argument("--image", default=None, metavar="PNG",
                        help="img2img: start from this picture instead of noise (it sets the size)")
    parser.add_argument("--strength", type=fraction, default=None,
                        help="with --image: how far into the noise it is taken, 0 to 1 (0 keeps it, 1 ignores it; "
                             f"default {DEFAULT_STRENGTH:g}, or {DEFAULT_INPAINT_STRENGTH:g} with --mask)")
    parser.add_argument("--mask", default=None, metavar="PNG",
                        help="with --image: inpainting, the white part of this mask (the image's size) is repainted")
    parser.add_argument("--out", default="out", help="folder for the PNG files (default: out/); the images are "
                        "numbered on after the last NNNN.png already there, never replacing one")
    parser.add_argument("--overwrite", action="store_true",
                        help="number the images from 0000 instead, replacing those already in --out")
    parser.add_argument("--model", default=None, help="a model folder (default: the shipped shapes model)")
    parser.add_argument("--scale", type=positive_int, default=1,
                        help="enlarge each PNG this many times (nearest pixel, 1 to 64)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the loading time and the peak memory of the process")


def _usage(message: str):
    return UsageError(f"minisd generate: {message}")


def _read_inputs(args):
    """--image and --mask read now, before any work: a missing file or one that is not a
    picture is a usage error naming the option."""
    from minisd.pipeline import load_image

    image = mask = None
    if args.image is None:
        for option, value in (("--strength", args.strength), ("--mask", args.mask)):
            if value is not None:
                raise _usage(f"{option} needs --image (the picture to start from)")
        return None, None
    try:
        image = load_image(args.image, "--image")
        if args.mask is not None:
            mask = load_image(args.mask, "--mask")  # as RGB: pipe(...) makes it grey, as it would the file
    except ValueError as e:
        raise _usage(str(e)) from None
    return image, mask


def run(args) -> int:
    from tqdm import tqdm

    from minisd.pipeline import check_prompts, load_pipeline, prepare_out_dir

    if args.scheduler is not None and args.scheduler.lower() not in SCHEDULER_NAMES:
        raise _usage(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if args.scale > 64:
        raise _usage(f"--scale must be between 1 and 64, got {args.scale}")
    total = len(args.prompt) * args.n
    if total > MAX_IMAGES:
        raise _usage(f"--n {args.n} for {len(args.prompt)} prompt(s) is {total:,} images, more than the "
                     f"{MAX_IMAGES:,} one run makes (at ~0.3 s an image, 100,000 already take most of a day); "
                     "make them in several runs, each with its own --seed")
    negatives = args.negative
    if negatives is not None and len(negatives) not in (1, len(args.prompt)):
        raise _usage(f"--negative given {len(negatives)} times for {len(args.prompt)} prompts; give it once for "
                     "every prompt, or once per prompt")
    try:
        check_prompts(args.prompt)
        if negatives is not None:
            check_prompts(negatives, "--negative")
    except (TypeError, ValueError) as e:
        raise _usage(str(e)) from None
    image, mask = _read_inputs(args)
    prepare_out_dir(args.out)

    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_seconds = time.perf_counter() - start
    scheduler = pipe.make_scheduler(args.scheduler and args.scheduler.lower(),
                                    **({"use_karras_sigmas": True} if args.karras else {}))
    if args.karras and not scheduler.config.get("use_karras_sigmas"):
        raise _usage(f"--karras: {type(scheduler).__name__} has no Karras sigmas; use it with euler, heun, lms, "
                     "dpm++2m or unipc")
    try:  # the model's schedule decides how many steps it can take
        scheduler.set_timesteps(args.steps)
    except ValueError as e:
        raise _usage(f"--steps {args.steps}: {e}") from None
    first = 0 if args.overwrite else next_number(args.out)
    guided = args.guidance != 1.0
    kwargs = dict(steps=args.steps, guidance_scale=args.guidance, seed=args.seed, scheduler=scheduler,
                  num_images_per_prompt=args.n, negative_prompt=negatives[0] if negatives and len(negatives) == 1
                  else negatives, height=args.height, width=args.width, image=image, mask_image=mask,
                  strength=args.strength, eta=args.eta, guidance_rescale=args.guidance_rescale)
    start = time.perf_counter()
    paths = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # every argument is checked here, before any sampling: a size, a mask that does not fit
            batch = pipe.default_batch_size(guided, *((image.shape[1:3]) if image is not None
                                                      else (args.height, args.width)))
            batches = pipe.iter_batches(args.prompt, batch_size=batch, **kwargs)
        except ValueError as e:
            raise _usage(str(e)) from None
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
