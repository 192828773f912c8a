"""`minisd bench generate`: time to generate 4 images, 50 DDIM steps with guidance (target <= 3 s on 2 CPU cores).

The whole call is timed, as a user waits for it: tokenizer, text encoder, 50 UNet
evaluations on a batch of 8 (4 prompts x conditional and unconditional), 50 DDIM steps
and the VAE decoder. The split between them is shown too. SD v1.5 on the same schedule
runs the same loop on latents (4, 64, 64) with a 860M-parameter UNet.
"""

from __future__ import annotations

import json
import time

from minisd.benchmarks import timeit

PROMPTS = ["a small red circle in the top left", "a large blue square in the center",
           "a small green triangle in the bottom right", "a large yellow circle in the top right"]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the shipped shapes model)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (the median is shown)")
    parser.add_argument("--json", action="store_true")


def run(args) -> int:
    from minisd.cli import UsageError
    from minisd.pipeline import DEFAULT_GUIDANCE, load_pipeline
    from minisd.tensor import no_grad

    if args.steps <= 0 or args.repeat <= 0:
        raise UsageError("minisd bench generate: --steps and --repeat must be positive integers")
    pipe = load_pipeline(args.model)
    call = lambda: pipe(PROMPTS, steps=args.steps, guidance_scale=DEFAULT_GUIDANCE, seed=0)  # noqa: E731
    total = timeit(call, repeat=args.repeat, warmup=1)
    # CPU time of one call: on a machine shared with other work, wall time overstates the cost.
    cpu0 = time.process_time()
    call()
    cpu = time.process_time() - cpu0

    # The parts, timed alone (each the median of a few runs).
    import numpy as np

    c, h, w = pipe.latent_shape
    z = np.zeros((2 * len(PROMPTS), c, h, w), np.float32)
    context = np.concatenate([pipe.encode_prompt([""] * len(PROMPTS)), pipe.encode_prompt(PROMPTS)])
    with no_grad():
        unet = timeit(lambda: pipe.unet(z, 500, context), repeat=5)
        text = timeit(lambda: pipe.encode_prompt(PROMPTS + [""]), repeat=5)
        decode = timeit(lambda: pipe.decode_latents(z[:len(PROMPTS)]), repeat=5)
    result = {"images": len(PROMPTS), "steps": args.steps, "guidance_scale": DEFAULT_GUIDANCE,
              "seconds_total": round(total, 3), "cpu_seconds_total": round(cpu, 3), "seconds_per_unet_call_batch8": round(unet, 4),
              "seconds_text_encoder": round(text, 4), "seconds_vae_decode": round(decode, 4),
              "target_seconds": 3.0}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"generate {len(PROMPTS)} images, {args.steps} DDIM steps, guidance {DEFAULT_GUIDANCE:g}: "
              f"{total:.2f} s wall, {cpu:.2f} s of CPU (target <= 3 s)")
        print(f"  UNet on a batch of {2 * len(PROMPTS)}: {unet * 1e3:.1f} ms per step "
              f"(x {args.steps} = {unet * args.steps:.2f} s); text encoder {text * 1e3:.1f} ms; "
              f"VAE decode {decode * 1e3:.1f} ms")
    return 0

