"""`minisd train {vae,clip,unet,all}`: the command line of minisd/train.py.

The training itself (fit, train_vae, train_clip, train_unet, train_all) is in minisd.train;
this module turns the options into its arguments, and checks them first, each refusal one
line naming the option (exit status 2): an --out that holds a stage's output without
--resume or --overwrite, a --config file's bad part or key, a --from model that lacks a
part, a --dataset folder's bad images or a --resolution its parts cannot take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

from minisd import distributed, train
from minisd.benchmarks import peak_memory_mb
from minisd.cli import UsageError, fraction, non_negative_float, non_negative_int, positive_float, positive_int

# the package's folder, minisd/: the shipped model's logs, and the place --out must not be
PACKAGE = os.path.dirname(os.path.abspath(train.__file__))


# ---------------------------------------------------------------------------------------
# --help, the options, and the --out check
# ---------------------------------------------------------------------------------------


def logged_run() -> tuple[str, dict]:
    """(file name, record) of the training log shipped in minisd/weights/shapes/logs/ that ran
    every stage at its default steps: the times --help quotes. ("", {}) when there is none."""
    logs = os.path.join(PACKAGE, "weights", "shapes", "logs")
    try:
        names = sorted(os.listdir(logs))
    except OSError:
        return "", {}
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(logs, name)) as f:
                record = json.load(f)
            stages = record["stages"]
            if all(stages[s]["steps"] == train.DEFAULT_STEPS[s] for s in train.STAGES):
                return name, record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "", {}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def help_epilog() -> str:
    """--help's table of the defaults per stage, with what they took in the logged run from scratch."""
    name, run_log = logged_run()
    times = run_log.get("stages", {})
    lines = ["defaults per stage" + (f", and the time each took in a run from scratch on 2 CPU cores\n"
                                     f"(minisd/weights/shapes/logs/{name}):" if times else ":"),
             f"  {'stage':6} {'steps':>6} {'batch':>6}  {'lr':7}  time"]
    for s in train.STAGES:
        t = times.get(s)
        took = (f"{_minutes(t['seconds'])} ({t['seconds'] / t['steps']:.2f} s a step; "
                f"{_minutes(t['cpu_seconds'])} of CPU)") if t else ""
        lines.append(f"  {s:6} {train.DEFAULT_STEPS[s]:>6} {train.DEFAULT_BATCH[s]:>6}  "
                     f"{train.DEFAULT_LR[s]:<7.0e}  {took}")
    if times:
        lines.append(f"  {'all':6} vae, clip, unet in turn: {_minutes(run_log['total_seconds'])} "
                     f"({_minutes(run_log['total_cpu_seconds'])} of CPU)")
    lines += [
        "",
        "--steps, --batch-size and --lr set the one stage trained. `all` runs every stage",
        "with its defaults; --vae-steps, --clip-steps and --unet-steps change a stage's steps",
        "(--steps, --batch-size and --lr are refused with all).",
        "",
        "--preset quick (a class demo): " + ", ".join(f"{s} {train.QUICK[s]['steps']}" for s in train.STAGES)
        + " steps; batches and lr as above" + "".join(f", {s}'s lr {train.QUICK[s]['lr']:.0e}" for s in train.STAGES
                                                       if "lr" in train.QUICK[s]) + ".",
        *train.QUICK_MEASURED.splitlines(),
        "",
        "An --out that already holds the stage's output (its model folder or its checkpoint)",
        "is refused unless --resume (continue from OUT/checkpoints/) or --overwrite (start",
        "over, replacing it). A folder inside the installed minisd package is always refused.",
        "",
        "--dataset emoji needs the Noto Color Emoji font: `apt-get install",
        "fonts-noto-color-emoji` (Debian/Ubuntu), or --font PATH.",
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.description = ("Train the three networks of a Stable Diffusion: vae (the autoencoder), clip (the\n"
                          "text encoder, with an image tower), then unet (the denoiser, on the frozen two).")
    parser.epilog = help_epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("stage", choices=(*train.STAGES, "all"), help="which network to train (all: vae, clip, unet)")
    parser.add_argument("--dataset", default="shapes", metavar="shapes|emoji|PATH",
                        help="shapes, emoji, or a folder of captioned images: metadata.jsonl / metadata.csv "
                        "(file_name + a caption column) or a .txt caption beside each image (default: shapes)")
    parser.add_argument("--caption-column", metavar="NAME", help="a folder's metadata column holding the captions "
                        "(default: \"text\", else the first column besides file_name)")
    parser.add_argument("--resolution", type=positive_int, metavar="PX",
                        help="a folder's images are resized (shorter side) and centre-cropped to PX x PX; a "
                        "multiple of 8 at the default sizes (default: the VAE's, 32)")
    parser.add_argument("--validation-split", type=fraction, metavar="F",
                        help="hold out a fraction F of a folder's images (drawn by --seed) for `minisd eval`; "
                        "recorded in OUT/logs/dataset.json and kept by later stages in OUT")
    parser.add_argument("--config", metavar="FILE.json", help="model sizes: diffusers/transformers config keys "
                        "per part, laid over the defaults: {\"vae\": {...}, \"text_encoder\": {...}, "
                        "\"vision_config\": {...}, \"unet\": {...}} (a file, or the JSON itself)")
    parser.add_argument("--from", dest="model_from", metavar="MODEL",
                        help="fine-tune: each stage starts from MODEL's part (a model folder, a diffusers SD "
                        "folder, or 'shipped': minisd's own), and train unet takes MODEL's VAE, text encoder and "
                        "tokenizer, frozen, where OUT has none (copied into OUT); a part --config sizes is trained "
                        "new instead")
    parser.add_argument("--skip-bad", action="store_true", help="train without a folder's unreadable or "
                        "uncaptioned images, and say which (default: stop, exit status 2)")
    parser.add_argument("--font", metavar="PATH", help="the emoji font for --dataset emoji "
                        "(default: Noto Color Emoji, Debian's fonts-noto-color-emoji)")
    parser.add_argument("--out", default="checkpoints/mine", help="model folder to write (default: checkpoints/mine)")
    parser.add_argument("--steps", type=positive_int, metavar="N", help="training steps of the stage (default: below)")
    parser.add_argument("--preset", choices=("default", "quick"), default="default",
                        help="quick: a short schedule for a class demo (below); --steps, --STAGE-steps and --lr "
                        "still set what they set")
    for s in train.STAGES:
        parser.add_argument(f"--{s}-steps", type=positive_int, metavar="N",
                            help=f"with all: the {s} stage's steps (default: {train.DEFAULT_STEPS[s]})")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="images a step (default: below)")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate, finite and > 0 (default: below)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="default: 0")
    parser.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="N",
                        help="write OUT/checkpoints/STAGE.npz every N steps (default: 200)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/ where a run stopped")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in an --out that holds this stage's output, replacing it")
    parser.add_argument("--quality-every", type=non_negative_int, default=train.QUALITY_EVERY, metavar="K",
                        help="every K UNet steps, log the loss and (shapes) the adherence of images sampled from "
                        f"the EMA weights against wall-clock minutes in OUT/logs/unet_quality.csv and .png (0, or "
                        f"more than the steps: off; default: {train.QUALITY_EVERY})")
    parser.add_argument("--quality-prompts", type=positive_int, default=train.QUALITY_PROMPTS, metavar="N",
                        help=f"images a sample of that log, {train.QUALITY_STEPS} DDIM steps each "
                        f"(default: {train.QUALITY_PROMPTS})")
    parser.add_argument("--snr-gamma", type=non_negative_float, default=train.SNR_GAMMA, metavar="G",
                        help="weight the UNet's loss by min-SNR-gamma (Hang et al. 2023; default: the paper's "
                        f"gamma, {train.SNR_GAMMA:g}); 0: off, SD's plain MSE")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/checkpoints/ after `all` finishes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_out(out: str, stage: str, resume: bool, overwrite: bool) -> None:
    """Refuse (UsageError) an --out where training would lose saved work without being asked."""
    package = os.path.realpath(PACKAGE)
    if os.path.commonpath([os.path.realpath(out), package]) == package:
        raise UsageError(f"minisd train {stage}: --out {out} is inside the installed minisd package ({package}), "
                         "whose shipped model is never written; give a folder outside it")
    stages = train.STAGES if stage == "all" else (stage,)
    existing = [p for s in stages for p in train.stage_outputs(out, s)]
    if existing and not (resume or overwrite):
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise UsageError(f"minisd train {stage}: {out} already holds what a train {'/'.join(stages)} run wrote "
                         f"({shown}); pass --resume to continue it or --overwrite to start over, replacing it")
    if resume and stage != "all" and train.finished(out, train.DONE_MARKER[stage]) \
            and not os.path.isfile(train.checkpoint_path(out, stage)):
        raise UsageError(f"minisd train {stage}: {os.path.join(out, train.DONE_MARKER[stage])} is trained and there "
                         f"is no checkpoint ({train.checkpoint_path(out, stage)}) to continue from; "
                         "pass --overwrite to train it again")


# ---------------------------------------------------------------------------------------
# Model sizes: --config FILE.json, diffusers' / transformers' config keys per part
# ---------------------------------------------------------------------------------------

# The parts a --config file may size, and the default each one's keys are laid over.
CONFIG_PARTS = {"vae": "VAE_CONFIG", "text_encoder": "TEXT_CONFIG", "vision_config": "VISION_CONFIG",
                "unet": "UNET_CONFIG"}
# Keys that training sets from the data or from the other parts; a value given for one is not used.
DERIVED_KEYS = {
    "vae": {"sample_size": "--resolution"},
    "text_encoder": dict.fromkeys(("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"), "the tokenizer"),
    "vision_config": {"image_size": "--resolution", "num_channels": "the images (RGB)"},
    "unet": {"sample_size": "the VAE's latents", "in_channels": "the VAE's latent_channels",
             "out_channels": "the VAE's latent_channels", "cross_attention_dim": "the text encoder's hidden_size"},
}


def read_model_config(text: str, stage: str) -> dict:
    """--config: a JSON file (or JSON written inline, starting with "{") of config dicts per part,

        {"vae": {...}, "text_encoder": {...}, "vision_config": {...}, "unet": {...}}

    with diffusers' keys (AutoencoderKL, UNet2DConditionModel: their config.json) and
    transformers' (CLIPTextConfig; vision_config: CLIPVisionConfig, CLIP's image tower). Each
    part given is laid over minisd's default and checked key by key as the model's own
    config.json would be (minisd.models.config), without building the weights. Returns
    {part: full config} for the parts given; a bad file is a UsageError naming the file and key."""
    from minisd import io
    from minisd.models.clip import CLIPModel, CLIPTextModel
    from minisd.models.unet import UNet2DConditionModel
    from minisd.models.vae import AutoencoderKL

    inline = text.lstrip().startswith("{")
    where = "--config (inline JSON)" if inline else f"--config {text}"
    fail = f"minisd train {stage}: {where}"
    try:
        if inline:
            given = json.loads(text)
        else:
            with open(text, encoding="utf-8") as f:
                given = json.load(f)
    except OSError as e:
        raise UsageError(f"{fail}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{fail}: not JSON ({e})") from None
    if not isinstance(given, dict):
        raise UsageError(f"{fail}: expected a JSON object of parts ({', '.join(CONFIG_PARTS)}), "
                         f"got a {type(given).__name__}")
    configs = {}
    for part, value in given.items():
        if part not in CONFIG_PARTS:
            raise UsageError(f"{fail}: unknown part {part!r} (the parts are {', '.join(CONFIG_PARTS)})")
        if not isinstance(value, dict):
            raise UsageError(f"{fail}: {part} must be a JSON object of config keys, got {value!r}"[:200])
        for key, source in DERIVED_KEYS[part].items():
            if key in value:
                print(f"minisd train {stage}: note: {where}: {part}.{key} is set from {source} in training; "
                      f"the {value[key]!r} given is not used", file=sys.stderr)
        configs[part] = {**getattr(train, CONFIG_PARTS[part]),
                         **{k: v for k, v in value.items() if k not in DERIVED_KEYS[part]}}
    text_config = {**train.TEXT_CONFIG, **configs.get("text_encoder", {}), "vocab_size": 1024}
    build = {"vae": lambda c: AutoencoderKL(**c), "text_encoder": lambda c: CLIPTextModel(**text_config),
             "vision_config": lambda c: CLIPModel(text_config=text_config, vision_config=c,
                                                  projection_dim=text_config["hidden_size"]),
             "unet": lambda c: UNet2DConditionModel(**c)}
    for part, config in configs.items():
        try:
            with io._uninitialised():  # the sizes are checked, and no weight is drawn
                build[part](config)
        except (ValueError, TypeError) as e:
            # a class without minisd's config check says it as Python does: name it as the others do
            message = re.sub(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'",
                             r"\1: unknown config key '\2'", str(e))
            raise UsageError(f"{fail}: {part}: {message}") from None
    return configs


# ---------------------------------------------------------------------------------------
# Fine-tuning: --from MODEL
# ---------------------------------------------------------------------------------------

# What each part of a model folder is, for the messages that name a missing one.
PART_NAMES = {"vae": "the VAE", "clip": "CLIP's two towers, which train clip fine-tunes",
              "text_encoder": "the text encoder", "tokenizer": "the tokenizer", "unet": "the UNet"}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def resolve_from(text: str, stage: str, out: str, configs: dict) -> str:
    """--from's model folder ('shipped': the one in the package), checked for the parts this run takes
    from it (UsageError naming the missing one) and for SD's noise schedule, the one minisd trains with."""
    from minisd.pipeline import DEFAULT_MODEL

    where = f"minisd train {stage}: --from {text}"
    source = DEFAULT_MODEL if text == "shipped" else text
    if not os.path.isdir(source):
        raise UsageError(f"{where}: no such model folder (give a model folder, or 'shipped' for minisd's own)")
    needed = [p for parts in train.stage_parts(stage, configs).values() for p in parts]
    if stage == "unet":  # the frozen parts, where OUT has none
        needed += [p for p in ("vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(out, p))]
    for part in dict.fromkeys(needed):
        marker = os.path.join(source, part, "config.json" if part != "tokenizer" else "")
        if not os.path.exists(marker):
            hint = (" (a diffusers SD folder keeps the text tower alone: `train unet --from` takes it frozen)"
                    if part == "clip" else "")
            raise UsageError(f"{where}: {source} has no {part}/ ({PART_NAMES[part]}){hint}")
    if stage in ("unet", "all") and os.path.isfile(os.path.join(source, "scheduler", "scheduler_config.json")):
        with open(os.path.join(source, "scheduler", "scheduler_config.json")) as f:
            schedule = {"prediction_type": "epsilon", **json.load(f)}
        differ = [k for k in SCHEDULE_KEYS if schedule.get(k) != train.SCHEDULER_CONFIG[k]]
        if differ:
            raise UsageError(f"{where}: its UNet was trained with {differ[0]}={schedule.get(differ[0])!r}, and "
                             f"minisd trains with SD v1's schedule ({differ[0]}={train.SCHEDULER_CONFIG[differ[0]]!r})")
    return source


# ---------------------------------------------------------------------------------------
# Your own data: a folder of captioned images (minisd/data/folder.py reads it)
# ---------------------------------------------------------------------------------------

FOLDER_OPTIONS = ("caption_column", "validation_split", "skip_bad")


def resolution_multiple(vae_config: dict, unet_config: dict, vision_config: dict) -> int:
    """The image sizes every part can take are the multiples of this: the VAE halves the image
    len(block_out_channels) - 1 times, the UNet halves the latents len(its block_out_channels) - 1
    times, and the CLIP image tower cuts the image into patch_size squares (defaults: 4 * 2 and 8: 8)."""
    vae = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet = 2 ** (len(unet_config["block_out_channels"]) - 1)
    return math.lcm(vae * unet, int(vision_config.get("patch_size", 1)))


def sizes_in_effect(stage: str, out: str, configs: dict, source: str | None = None) -> dict:
    """{part: config} the run will train with: --config's parts, OUT's trained VAE (for clip and unet),
    --from's parts, the defaults."""
    sizes = {part: configs.get(part) or getattr(train, name) for part, name in CONFIG_PARTS.items()}
    for part, file, key in (("vae", "vae", None), ("unet", "unet", None), ("vision_config", "clip", "vision_config")):
        if source is not None and part not in configs and train.finished(source, file):
            sizes[part] = read_config(source, file, key)
    if stage in ("clip", "unet") and train.finished(out, "vae"):
        sizes["vae"] = read_config(out, "vae")
    return sizes


def read_config(model: str, part: str, key: str | None = None) -> dict:
    """MODEL/part/config.json (or its ``key``), as a dict."""
    with open(os.path.join(model, part, "config.json")) as f:
        config = json.load(f)
    return config[key] if key else config


def fixed_resolution(stage: str, out: str, configs: dict, source: str | None) -> tuple[int, str] | None:
    """(size, what fixes it) where a trained part the stage keeps decides the image size: OUT's VAE
    (clip and unet train on its latents), --from's frozen VAE (unet) or image tower (clip); else None."""
    if stage in ("clip", "unet") and train.finished(out, "vae"):
        return int(read_config(out, "vae").get("sample_size", 32)), f"{os.path.join(out, 'vae')} was trained"
    if source is not None and stage == "unet" and train.finished(source, "vae"):
        return int(read_config(source, "vae").get("sample_size", 32)), f"{os.path.join(source, 'vae')} was trained"
    if source is not None and stage == "clip" and not {"text_encoder", "vision_config"} & set(configs):
        size = read_config(source, "clip", "vision_config").get("image_size", 224)
        return int(size), f"{os.path.join(source, 'clip')}'s image tower takes images"
    return None


def pick_resolution(args, out: str, configs: dict, source: str | None = None) -> int:
    """--resolution, else the size a trained part fixes (fixed_resolution), else --from's VAE's, else 32.
    Refused (UsageError) where it is not a size the parts can take, or not the one a kept part fixes."""
    fixed = fixed_resolution(args.stage, out, configs, source)
    default = fixed[0] if fixed else int(read_config(source, "vae").get("sample_size", 32)) \
        if source is not None and train.finished(source, "vae") else 32
    resolution = args.resolution or default
    if fixed is not None and resolution != fixed[0]:
        raise UsageError(f"minisd train {args.stage}: --resolution {resolution}, but {fixed[1]} at {fixed[0]} x "
                         f"{fixed[0]}: give --resolution {fixed[0]}")
    sizes = sizes_in_effect(args.stage, out, configs, source)
    multiple = resolution_multiple(sizes["vae"], sizes["unet"], sizes["vision_config"])
    if resolution % multiple:
        raise UsageError(f"minisd train {args.stage}: --resolution {resolution} is not a multiple of {multiple} "
                         f"(the VAE's and the UNet's downsampling, and the CLIP image tower's patches); "
                         f"try {max(multiple, resolution // multiple * multiple)}")
    return resolution


def load_own_data(args, out: str, configs: dict, source: str | None = None):
    """The captioned folder --dataset names, read and checked before any training (None for shapes/emoji).

    Bad data is a UsageError (exit 2) naming each kind of problem and its first files; with
    --skip-bad those images are left out and said. A split recorded in OUT/logs/dataset.json
    by an earlier stage on the same folder is kept, so that no stage trains on what another
    held out (unless ``all --overwrite`` starts the whole model over)."""
    from minisd.data import folder

    where = f"minisd train {args.stage}"
    if args.dataset in train.DATASETS:
        given = [o for o in FOLDER_OPTIONS if getattr(args, o) not in (None, False)]
        if given:
            raise UsageError(f"{where}: --{given[0].replace('_', '-')} is for a --dataset folder; "
                             f"{args.dataset} is built in")
        if args.resolution not in (None, 32):
            raise UsageError(f"{where}: --resolution {args.resolution}: the {args.dataset} images are 32 x 32; "
                             "--resolution is for a --dataset folder")
        return None
    if not os.path.isdir(args.dataset):
        raise UsageError(f"{where}: --dataset {args.dataset} is neither {' nor '.join(train.DATASETS)} nor a folder")
    resolution = pick_resolution(args, out, configs, source)
    record = folder.read_record(out)
    held = None
    if record is not None and record["dataset"] == os.path.abspath(args.dataset) \
            and not (args.overwrite and args.stage == "all"):
        recorded = record.get("validation_split") or 0.0
        if args.validation_split is not None and args.validation_split != recorded:
            raise UsageError(f"{where}: --validation-split {args.validation_split:g}, but the stages already "
                             f"trained in {out} held out {recorded:g} of {args.dataset} "
                             f"({os.path.join(out, folder.RECORD)}); give the same, or another --out")
        held, args.validation_split = record.get("validation", []), recorded
    try:
        data = folder.load_folder(args.dataset, resolution, args.caption_column, args.skip_bad,
                                  args.validation_split or 0.0, args.seed, held)
    except folder.BadData as e:
        raise UsageError(f"{where}: --dataset {e}") from None
    if data.skipped:
        print(f"{where}: --skip-bad: left out {folder.describe(data.skipped)}; training on "
              f"{len(set(data.files))} images ({len(data.files)} pairs)", file=sys.stderr)
    if data.validation_files:
        print(f"{where}: holding out {len(data.validation_files)} of {args.dataset}'s images for `minisd eval` "
              f"({os.path.join(out, folder.RECORD)} lists them)")
    return data


@distributed.command
def run(args) -> int:
    stage = args.stage
    stage_steps = {s: getattr(args, f"{s}_steps") for s in train.STAGES}
    if stage == "all":
        if args.steps or args.batch_size or args.lr:
            raise UsageError("minisd train all: --steps, --batch-size and --lr set one stage; with all, give "
                             "--vae-steps, --clip-steps, --unet-steps (the defaults are in --help)")
    elif any(n is not None for n in stage_steps.values()):
        given = next(s for s in train.STAGES if stage_steps[s] is not None)
        raise UsageError(f"minisd train {stage}: --{given}-steps is for `train all`; give --steps")
    preset_lr = {}
    if args.preset == "quick":  # the preset's numbers where the command line gives none
        stage_steps = {s: stage_steps[s] or train.QUICK[s]["steps"] for s in train.STAGES}
        preset_lr = {s: train.QUICK[s]["lr"] for s in train.STAGES if "lr" in train.QUICK[s]}
        if stage != "all":
            args.steps = args.steps or train.QUICK[stage]["steps"]
            args.lr = args.lr or preset_lr.get(stage)
    if args.font is not None:
        if args.dataset != "emoji":
            raise UsageError("minisd train: --font is the emoji dataset's font; it needs --dataset emoji")
        if not os.path.isfile(args.font):
            raise UsageError(f"minisd train: --font {args.font}: no such file")
    out = args.out
    distributed.world().from_root(lambda: check_out(out, stage, args.resume, args.overwrite))
    configs = read_model_config(args.config, stage) if args.config else {}
    source = resolve_from(args.model_from, stage, out, configs) if args.model_from else None
    own = load_own_data(args, out, configs, source)
    data = None if own is None else (own.images, list(own.captions))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"--out {out} is not writable")
    if source is not None and stage == "unet":
        distributed.world().from_root(lambda: train.take_frozen_parts(out, source))
    if own is not None:
        from minisd.data import folder

        distributed.world().from_root(lambda: folder.write_record(out, args.dataset, own,
                                                                  args.validation_split or 0.0, args.seed))
    progress = not args.no_progress
    began, start, cpu_start = time.time(), time.perf_counter(), time.process_time()
    try:
        if stage == "all":
            report = train.train_all(out, args.dataset, {s: n for s, n in stage_steps.items() if n}, args.seed,
                               args.resume, args.checkpoint_every, progress, args.keep_checkpoints,
                               font=args.font, overwrite=args.overwrite, data=data, configs=configs,
                               source=source, quality=(args.quality_every, args.quality_prompts),
                               snr_gamma=args.snr_gamma, lrs=preset_lr)
        else:
            if args.overwrite and stage in ("vae", "clip") and train.finished(out, "unet"):
                print(f"minisd train {stage}: note: {os.path.join(out, 'unet')} was trained on the {stage} this "
                      "run replaces; train unet again (--overwrite) to match it", file=sys.stderr)
            fn = {"vae": train.train_vae, "clip": train.train_clip, "unet": train.train_unet}[stage]
            given = {} if data is None else {"images": data[0]} if stage == "vae" else {"data": data}
            given.update(train.stage_kwargs(stage, configs, source))
            if stage == "unet":
                given.update(quality_every=args.quality_every, quality_prompts=args.quality_prompts,
                             snr_gamma=args.snr_gamma)
            rec = fn(out=out, dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every,
                     progress=progress, font=args.font,
                     discard=tuple(train.stage_outputs(out, stage)) if args.overwrite else (), **given)
            report = {"dataset": args.dataset, "seed": args.seed, "stages": {stage: train.summarise(stage, rec)}}
            print(f"minisd train {stage}: {train.describe(report['stages'][stage], rec)}")
    except train.BatchTooLarge as e:
        hint = "train the stage alone with a smaller --batch-size" if stage == "all" else "give a smaller --batch-size"
        raise UsageError(f"minisd {e}; {hint}") from None
    except distributed.BatchNotDivisible as e:
        n = distributed.world().size
        hint = (f"give a --batch-size that is a multiple of {n}" if stage != "all" else
                f"the default batches ({', '.join(f'{s} {train.DEFAULT_BATCH[s]}' for s in train.STAGES)}) split over "
                f"{math.gcd(*train.DEFAULT_BATCH.values())} ranks or a divisor of it; or train each stage alone "
                f"with a --batch-size that is a multiple of {n}")
        raise UsageError(f"minisd {e}; {hint}") from None
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["total_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    report["peak_memory_mb"] = round(peak_memory_mb(), 1)
    train.write_json(os.path.join(out, "logs", f"train_{stage}.json"), report)
    removed = train.remove_stray_temporaries(out, before=began)
    if removed:
        print(f"minisd train {stage}: removed {len(removed)} temporary file(s) that earlier runs left in {out}")
    print(f"minisd train {stage}: {report['total_seconds']:.0f} s in all ({report['total_cpu_seconds']:.0f} s of CPU), peak memory "
          f"{report['peak_memory_mb']:.0f} MB; model in {out}")
    return 0
