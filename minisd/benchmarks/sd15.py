"""`minisd bench sd15`: full-size Stable Diffusion v1.5, minisd against diffusers on PyTorch CPU.

What a learner with SD v1.5 on disk would run, with random weights instead of the real
ones (nothing is downloaded): diffusers builds SD v1.5's UNet (860M parameters), VAE and
CLIP text encoder from their published configs, and saves them in float16 as SD's
published "fp16" folder holds them, in a temporary folder (about 2 GB; removed afterwards
unless --folder names where to keep it). Then each side, in a process of its own so that
neither's memory counts against the other (both alive at once: about 11 GB in all):

    loads the folder (float16 on disk, float32 in memory)
    c = text_encoder(tokenizer(["", prompt]))            (2, 77, 768)
    eps = unet([z, z], t, c)                             z (1, 4, 64, 64), t = 981
    eps = eps_u + 7.5 (eps_c - eps_u)                    classifier-free guidance

and reports the median time of the guided UNet step (batch 2) and the process' peak
resident memory (the kernel's high-water mark, loading included). The two processes take
turns, one step each, so that other work on a shared machine slows both alike. The two
sides' eps are compared too: the same weights must give the same prediction.

Targets (issue 7): minisd's time <= 1.5x PyTorch's, its peak memory <= 1.2x PyTorch's.
The UNet's work at 64x64 is mostly 3x3 convolutions on 320-1280 channels (im2col + BLAS
here, oneDNN in PyTorch) and attention over 4,096 positions, whose 4,096 x 4,096 score
matrix per head minisd computes a few rows of heads at a time (MAX_SCORES_IN_MEMORY in
minisd/backends/fast_cpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# config.json of SD v1.5's unet/, vae/, text_encoder/ and scheduler/ as published
# (runwayml/stable-diffusion-v1-5; diffusers 0.6, transformers 4.22)
SD15_UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD15_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D"] * 4}
SD15_TEXT = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
             "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
             "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
             "vocab_size": 49408}
SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}

PROMPT = "a photograph of an astronaut riding a horse"
TIMESTEP = 981  # the first of SD's 50 DDIM steps
GUIDANCE = 7.5


# =====================================================================================
# The folder: SD v1.5's layout and sizes, random float16 weights, built by diffusers
# =====================================================================================


def build_folder(out: str, seed: int = 0) -> str:
    """Write a full-size SD v1.5 folder with random float16 weights at ``out`` (diffusers' own
    save_pretrained), and a CLIP-format tokenizer learned on minisd's captions (CLIP's real
    49,408-token vocabulary cannot be had without a download; the text encoder keeps
    vocab_size 49408, as published)."""
    import diffusers
    import torch
    import transformers

    from minisd.data import shapes
    from minisd.tokenizer import Tokenizer

    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    # one part at a time, so that only one is ever held in memory
    unet = diffusers.UNet2DConditionModel.from_config(SD15_UNET)
    unet.half().save_pretrained(os.path.join(out, "unet"))
    del unet
    diffusers.AutoencoderKL.from_config(SD15_VAE).half().save_pretrained(os.path.join(out, "vae"))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT))
    text.half().save_pretrained(os.path.join(out, "text_encoder"))
    del text
    diffusers.PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(os.path.join(out, "scheduler"))
    Tokenizer.train(shapes.every_image("train").captions + [PROMPT], vocab_size=700).save(
        os.path.join(out, "tokenizer"))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 64, 64)).astype(np.float32)


# =====================================================================================
# The two sides, each run in a process of its own (--worker)
# =====================================================================================


def minisd_side(folder: str):
    """(step, load seconds) for minisd: step() is one guided UNet step, returning eps."""
    import minisd

    start = time.perf_counter()
    pipe = minisd.load_pipeline(folder)
    load = time.perf_counter() - start
    context = np.concatenate([pipe.encode_prompt([""]), pipe.encode_prompt([PROMPT])])
    z = latents()

    def step():
        with minisd.no_grad():
            eps = pipe.unet(np.concatenate([z, z]), TIMESTEP, context).numpy()
        return eps[:1] + np.float32(GUIDANCE) * (eps[1:] - eps[:1])

    return step, load


def torch_side(folder: str):
    """(step, load seconds) for diffusers on PyTorch CPU, in float32 as minisd computes."""
    import warnings

    import diffusers
    import torch

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch_dtype's rename in recent diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 torch_dtype=torch.float32)
    load = time.perf_counter() - start
    with torch.no_grad():
        ids = pipe.tokenizer(["", PROMPT], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]
    z = torch.from_numpy(latents())

    def step():
        with torch.no_grad():
            eps = pipe.unet(torch.cat([z, z]), TIMESTEP, encoder_hidden_states=context).sample.numpy()
        return eps[:1] + np.float32(GUIDANCE) * (eps[1:] - eps[:1])

    return step, load


def worker(side: str, folder: str, save: str) -> None:
    """The process of one side: load, then answer the parent's commands on stdin, one JSON line each.

    "step": one guided UNet step, timed (the first one's eps is saved to ``save``);
    "exit": the peak memory of the whole run, then exit.
    """
    from minisd.benchmarks import peak_memory_mb

    step, load = (minisd_side if side == "minisd" else torch_side)(folder)
    print(json.dumps({"load_s": load, "load_peak_mb": peak_memory_mb()}), flush=True)
    saved = False
    for command in sys.stdin:
        if command.strip() == "exit":
            break
        start = time.perf_counter()
        eps = step()
        seconds = time.perf_counter() - start
        if not saved:
            np.save(save, eps)
            saved = True
        print(json.dumps({"step_s": seconds}), flush=True)
    print(json.dumps({"peak_mb": peak_memory_mb()}), flush=True)


class Side:
    """One side's worker process, driven line by line (so that the two sides can take turns)."""

    def __init__(self, side: str, folder: str, save: str, log: str):
        self.side, self.save, self.log = side, save, log
        command = [sys.executable, "-m", "minisd.benchmarks.sd15", "--worker", side, "--folder", folder, "--save", save]
        with open(log, "w") as err:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                            text=True)
        self.result = self._answer()
        self.steps = []

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.process.wait()
        with open(self.log) as f:
            tail = (f.read().strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"bench sd15: the {self.side} run failed (exit status {self.process.returncode}): {tail}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def step(self) -> None:
        self.steps.append(self.ask("step")["step_s"])

    def finish(self) -> dict:
        self.result.update(self.ask("exit"), step_s=float(np.median(self.steps[1:] or self.steps)))
        self.process.wait()
        return self.result


def compare(folder: str, sides: list[str], repeats: int, scratch: str) -> dict:
    """Run each side in its own process: both load (one after the other), take one warm-up step
    (whose eps is saved as SCRATCH/SIDE.npy), then ``repeats`` timed steps taking turns, so that
    a machine whose load changes meanwhile slows both alike. {side: load_s, step_s (median),
    load_peak_mb, peak_mb}."""
    running = []
    try:
        for side in sides:
            running.append(Side(side, folder, os.path.join(scratch, f"{side}.npy"),
                                os.path.join(scratch, f"{side}.log")))
        for _ in range(1 + repeats):
            for s in running:
                s.step()
        return {s.side: s.finish() for s in running}
    finally:
        for s in running:
            if s.process.poll() is None:
                s.process.kill()


# =====================================================================================
# The command
# =====================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folder", default=None,
                        help="an SD v1.x folder to use (built there first if it does not exist, and kept); "
                             "default: a temporary folder, removed afterwards")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side (default 3)")
    parser.add_argument("--no-torch", action="store_true", help="run minisd only")
    parser.add_argument("--worker", choices=("minisd", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)


def run(args) -> int:
    from minisd.cli import UsageError

    if args.repeats < 1:
        raise UsageError(f"minisd bench sd15: --repeats must be >= 1, got {args.repeats}")
    if args.worker:
        worker(args.worker, args.folder, args.save)
        return 0
    sides = ["minisd"] if args.no_torch else ["minisd", "torch"]
    if not (args.no_torch and args.folder and os.path.isdir(args.folder)):
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise UsageError(f"minisd bench sd15 needs diffusers and PyTorch to build its folder and to compare "
                             f"({e}); install the parity extra, or give --folder an SD folder and --no-torch")

    scratch = tempfile.mkdtemp(prefix="minisd-sd15-")
    folder = args.folder or os.path.join(scratch, "sd15")
    try:
        if not os.path.isdir(folder):
            start = time.perf_counter()
            print(f"building a random float16 SD v1.5 folder at {folder} with diffusers ...", flush=True)
            build_folder(folder)
            print(f"  {_folder_mb(folder):,.0f} MB in {time.perf_counter() - start:.0f} s")
        threads = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                   f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
        print(f"one guided UNet step: z (1, 4, 64, 64) twice (batch 2), c (2, 77, 768), t = {TIMESTEP}, "
              f"w = {GUIDANCE}; median of {args.repeats} after 1 warm-up, the two sides taking turns; {threads}")
        print(f"  loading {' and '.join(sides)}, then {args.repeats + 1} steps each, taking turns ...", flush=True)
        results = compare(folder, sides, args.repeats, scratch)
        print(f"{'':10s} {'load s':>8s} {'step s':>8s} {'peak MiB':>9s} {'(after load)':>13s}")
        names = {"minisd": "minisd", "torch": "PyTorch"}
        for side, r in results.items():
            print(f"{names[side]:10s} {r['load_s']:8.1f} {r['step_s']:8.2f} {r['peak_mb']:9,.0f} "
                  f"{r['load_peak_mb']:13,.0f}")
        if "torch" in results:
            ours, ref = results["minisd"], results["torch"]
            eps, eps_ref = (np.load(os.path.join(scratch, f"{s}.npy")) for s in ("minisd", "torch"))
            err = float(np.abs(eps - eps_ref).max() / np.abs(eps_ref).max())
            time_ratio, mem_ratio = ours["step_s"] / ref["step_s"], ours["peak_mb"] / ref["peak_mb"]
            print(f"ratio minisd/PyTorch: time {time_ratio:.2f}x (target <= 1.5x: "
                  f"{'met' if time_ratio <= 1.5 else 'missed'}), peak memory {mem_ratio:.2f}x (target <= 1.2x: "
                  f"{'met' if mem_ratio <= 1.2 else 'missed'})")
            print(f"guided eps, minisd against diffusers: max |difference| / max |eps| = {err:.1e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minisd bench sd15", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
