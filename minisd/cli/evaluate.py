"""`minisd eval`: how good is a model? Three measurements, a JSON report and a grid of images.

The measurements are minisd.evaluate's (vae_psnr, adherence, clip_scores; its docstring
says what each one is); this runs them on a model folder, prints each result, and writes
OUT/report.json and OUT/grid_seen.png, OUT/grid_heldout.png.
"""

from __future__ import annotations

import os
import time

import numpy as np

from minisd import io
from minisd.cli import UsageError, non_negative_float, non_negative_int, positive_int
from minisd.evaluate import adherence, clip_scores, save_grid, short_caption, vae_psnr
from minisd.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS


def add_arguments(parser) -> None:
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


def run(args) -> int:
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
    io.write_json(path, report)
    print(f"minisd eval: report in {path}")
    return 0
