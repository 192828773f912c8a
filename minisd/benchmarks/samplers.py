"""`minisd bench samplers`: the sampler scoreboard, prompt adherence against the number of steps for every scheduler.

For each sampler (every scheduler minisd has, "ddim" ... "unipc", and "NAME-karras" for
one with Karras et al.'s sigmas), each guidance scale w and each number of steps n, the
model draws one image for each of P seen captions (the same captions and seeds for every
sampler: ``minisd.evaluate.adherence``), the shapes reader reads each back, and the score
is the fraction with all four attributes (colour, shape, size, position) right. That is
the question a user of a UI asks of "DPM++ 2M Karras" against "Euler a": how few steps
does it need? The figure: adherence against steps, a panel per w, a line per sampler;
the table: the fewest steps (and UNet calls: Heun takes two a step, PNDM one more than
its steps) at which each reaches the target, 95% by default.

PNDM runs as SD v1.5 configures it (skip_prk_steps: PLMS from the first step). Cost: P x
sum(steps) image-steps per sampler and w (the defaults: 30 x 85, ~30 s of one CPU core
for each of the 33 curves with the shipped model).
"""

from __future__ import annotations

import argparse
import json
import os
import time

DEFAULT_SAMPLERS = ("ddim", "pndm", "ddpm", "euler", "euler_a", "heun", "lms", "dpm++2m", "unipc", "euler-karras",
                    "dpm++2m-karras")
DEFAULT_STEPS = (2, 3, 4, 6, 8, 12, 20, 30)
DEFAULT_GUIDANCE = (3.0, 5.0, 7.5)


def _list_of(kind):
    """An argparse type: a comma-separated list, each item checked by one of minisd.cli's types."""
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        return [kind(t) for t in items]
    return parse


def add_arguments(parser) -> None:
    from minisd.cli import fraction, non_negative_float, non_negative_int, positive_int

    parser.add_argument("--model", default=None, help="model folder (default: the shipped shapes model)")
    parser.add_argument("--samplers", type=_list_of(str), default=list(DEFAULT_SAMPLERS),
                        help="comma-separated scheduler names, NAME-karras for Karras sigmas (default: "
                             + ",".join(DEFAULT_SAMPLERS) + ")")
    parser.add_argument("--steps", type=_list_of(positive_int), default=list(DEFAULT_STEPS),
                        help="comma-separated numbers of steps (default " + ",".join(map(str, DEFAULT_STEPS)) + ")")
    parser.add_argument("--guidance", type=_list_of(non_negative_float), default=list(DEFAULT_GUIDANCE),
                        help="comma-separated guidance scales (default " + ",".join(map(str, DEFAULT_GUIDANCE)) + ")")
    parser.add_argument("--prompts", type=positive_int, default=30,
                        help="seen captions to draw, spread evenly over the 150 training combinations (default 30)")
    parser.add_argument("--seed", type=non_negative_int, default=1000, help="first seed (as minisd eval's)")
    parser.add_argument("--target", type=fraction, default=0.95, help="the adherence to reach (default 0.95)")
    parser.add_argument("--out", default="bench_samplers", help="folder for samplers.png and samplers.json "
                        "(default: bench_samplers/)")
    parser.add_argument("--json", action="store_true", help="print the JSON report")


def make_sampler(pipe, label: str):
    """The scheduler a label names: a scheduler name ("euler_a"), or NAME-karras (use_karras_sigmas).
    PNDM as SD v1.5 sets it up (skip_prk_steps)."""
    from minisd.schedulers import get_scheduler_class

    name, karras = (label[:-len("-karras")], True) if label.endswith("-karras") else (label, False)
    config = {"use_karras_sigmas": True} if karras else {}
    if get_scheduler_class(name).__name__ == "PNDMScheduler":
        config["skip_prk_steps"] = True
    sched = pipe.make_scheduler(name, **config)
    if karras and not sched.config.get("use_karras_sigmas"):
        raise ValueError(f"{label}: {type(sched).__name__} has no Karras sigmas")
    return sched


def steps_to_reach(steps: list[int], scores: list[float], target: float) -> int | None:
    """The fewest steps of the grid whose score reaches ``target`` (None: none does)."""
    return next((n for n, s in zip(steps, scores) if s >= target), None)


def run(args) -> int:
    from tqdm import tqdm

    from minisd.cli import UsageError
    from minisd.data import shapes
    from minisd.evaluate import adherence
    from minisd.pipeline import load_pipeline, prepare_out_dir

    pipe = load_pipeline(args.model)
    steps = sorted(set(args.steps))
    try:
        samplers = {label: make_sampler(pipe, label) for label in args.samplers}
        for sched in samplers.values():
            sched.set_timesteps(max(steps))
    except ValueError as e:
        raise UsageError(f"minisd bench samplers: {e}") from None
    prepare_out_dir(args.out)
    seen = [shapes.ShapeRecord(*c) for c in shapes.combinations("train")]
    records = [seen[i * len(seen) // args.prompts] for i in range(min(args.prompts, len(seen)))]
    report = {"model": os.path.abspath(pipe.path), "prompts": len(records), "seed": args.seed, "steps": steps,
              "guidance": args.guidance, "target": args.target, "adherence": {}, "unet_calls": {},
              "steps_to_target": {}}
    start = time.perf_counter()
    with tqdm(total=len(samplers) * len(args.guidance) * len(steps), desc="minisd bench samplers",
              dynamic_ncols=True) as bar:
        for label, sched in samplers.items():
            report["unet_calls"][label] = []
            for n in steps:
                sched.set_timesteps(n)
                report["unet_calls"][label].append(len(sched.timesteps))
            report["adherence"][label], report["steps_to_target"][label] = {}, {}
            for w in args.guidance:
                scores = []
                for n in steps:
                    summary = adherence(pipe, records, 1, args.seed, len(records), n, w, sched, progress=False)[0]
                    scores.append(summary["all_four_right"])
                    bar.update()
                report["adherence"][label][f"{w:g}"] = scores
                report["steps_to_target"][label][f"{w:g}"] = steps_to_reach(steps, scores, args.target)
    report["seconds"] = round(time.perf_counter() - start, 1)

    from minisd import io

    io.write_json(os.path.join(args.out, "samplers.json"), report)
    plot(report, os.path.join(args.out, "samplers.png"))
    if args.json:
        print(json.dumps(report, indent=2))
    print(table(report))
    print(f"minisd bench samplers: {len(records)} seen captions, {report['seconds']:.0f} s; "
          f"{args.out}/samplers.png, {args.out}/samplers.json")
    return 0


def table(report: dict) -> str:
    """The steps (UNet calls) each sampler needs to reach the target, one column per guidance scale."""
    scales = [f"{w:g}" for w in report["guidance"]]
    lines = [f"steps (UNet calls) to reach {report['target']:.0%} of {report['prompts']} seen captions read right",
             f"{'sampler':<16}" + "".join(f"{'w = ' + w:>14}" for w in scales)]
    for label, per_w in report["steps_to_target"].items():
        cells = []
        for w in scales:
            n = per_w[w]
            calls = report["unet_calls"][label][report["steps"].index(n)] if n is not None else None
            cells.append(f"> {max(report['steps'])}" if n is None else f"{n} ({calls})")
        lines.append(f"{label:<16}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Adherence against steps (log axis), one panel per guidance scale, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minisd import io

    scales = [f"{w:g}" for w in report["guidance"]]
    fig, axes = plt.subplots(1, len(scales), figsize=(3.6 * len(scales) + 1.6, 3.4), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab20").colors
    for ax, w in zip(axes[0], scales):
        for k, (label, per_w) in enumerate(report["adherence"].items()):
            ax.plot(report["steps"], per_w[w], marker="o", ms=3, lw=1.2, color=colours[(2 * k) % 20 + (k >= 10)],
                    ls="--" if "karras" in label else "-", label=label)
        ax.axhline(report["target"], color="0.6", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(report["steps"])
        ax.set_xticklabels([str(n) for n in report["steps"]], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("steps")
        ax.set_title(f"guidance w = {w}", fontsize=9)
    axes[0][0].set_ylabel(f"all four attributes right\n({report['prompts']} seen captions)")
    axes[0][0].set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("the sampler scoreboard: prompt adherence against the number of steps", fontsize=10)
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
