"""`minisd generate PROMPT... --n 4 --steps 50 --guidance 5 --seed 0 --out out/`: text to PNG files.

Writes OUT/0000.png, OUT/0001.png, ...: --n images for each prompt, in prompt order. The
model is the shipped shapes model unless --model names a model folder.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np

from minisd.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, SCHEDULER_NAMES


def add_arguments(parser) -> None:
    parser.add_argument("prompt", nargs="+", help='one or more prompts, e.g. "a small red circle in the top left" '
                        '("" for an unconditional image)')
    parser.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale w >= 0 (default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default="ddim", help="ddim (default), ddpm or euler")
    parser.add_argument("--out", default="out", help="folder for the PNG files (default: out/)")
    parser.add_argument("--model", default=None, help="a model folder (default: the shipped shapes model)")
    parser.add_argument("--scale", type=int, default=1, help="enlarge each PNG this many times (nearest pixel)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the loading time and the peak memory of the process")


def run(args) -> int:
    from minisd.cli import UsageError

    if args.n <= 0:
        raise UsageError(f"minisd generate: --n must be a positive integer, got {args.n}")
    if args.steps <= 0:
        raise UsageError(f"minisd generate: --steps must be a positive integer, got {args.steps}")
    if not np.isfinite(args.guidance) or args.guidance < 0:
        raise UsageError(f"minisd generate: --guidance must be a number >= 0, got {args.guidance:g}")
    if args.scheduler.lower() not in SCHEDULER_NAMES:
        raise UsageError(f"minisd generate: unknown --scheduler {args.scheduler!r}; choose one of "
                         f"{', '.join(SCHEDULER_NAMES)}")
    if not 1 <= args.scale <= 64:
        raise UsageError(f"minisd generate: --scale must be between 1 and 64, got {args.scale}")
    prepare_out_dir(args.out)

    from minisd.pipeline import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_seconds = time.perf_counter() - start
    if args.steps > pipe.scheduler.num_train_timesteps:  # known only once the model's schedule is
        raise UsageError(f"minisd generate: --steps {args.steps} is more than the model's "
                         f"{pipe.scheduler.num_train_timesteps} training timesteps")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe(args.prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                      scheduler=args.scheduler.lower(), num_images_per_prompt=args.n)
    seconds = time.perf_counter() - start
    for w in caught:  # one line each (a too-long prompt, truncated at 77 tokens)
        print(f"minisd generate: warning: {w.message}", file=sys.stderr)
    paths = write_pngs(images, args.out, args.scale)
    print(f"minisd generate: {len(paths)} image(s) in {seconds:.2f} s -> {paths[0]}"
          + (f" ... {os.path.basename(paths[-1])}" if len(paths) > 1 else ""))
    if args.verbose:
        from minisd.benchmarks import peak_memory_mb

        peak = peak_memory_mb()
        print(f"minisd generate: model {pipe.path} loaded in {load_seconds:.2f} s; peak memory "
              + (f"{peak:,.0f} MiB (resident)" if peak is not None else "not known on this platform"))
    return 0


def prepare_out_dir(out: str) -> None:
    """Create --out, or fail now (before any work) with one line if it cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OSError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} is not writable")


def write_pngs(images: np.ndarray, out: str, scale: int = 1) -> list[str]:
    """OUT/0000.png, OUT/0001.png, ... each written to a temporary name first, then renamed."""
    from PIL import Image

    paths = []
    for i, im in enumerate(images):
        if scale > 1:
            im = np.repeat(np.repeat(im, scale, axis=0), scale, axis=1)
        path = os.path.join(out, f"{i:04d}.png")
        tmp = os.path.join(out, f".{i:04d}.png.tmp")
        Image.fromarray(im).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths
