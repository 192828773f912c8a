"""`minisd bench unet`: a UNet training step and forward pass, minisd against diffusers on PyTorch CPU.

Both sides run the same model with the same weights (minisd's, loaded into diffusers by
name) on the same inputs:

    train step   eps = unet(z_t, t, c); L = mean((eps - noise)^2); L.backward(); AdamW.step()
    forward      eps = unet(z_t, t, c) without recording a graph

Config (the issue's): block_out_channels (64, 128), layers_per_block 2, down blocks
(CrossAttnDownBlock2D, DownBlock2D), up blocks (UpBlock2D, CrossAttnUpBlock2D), 8 heads
(attention_head_dim 8, diffusers' default), 32 groups; batch 32 of 4 x 8 x 8 latents,
16 text tokens of width 64. Each figure is the median of ``--rounds`` x ``--repeats`` timed
runs, minisd and PyTorch taking turns in blocks of ``--warmup`` untimed and ``--repeats``
timed runs (``minisd.benchmarks.side_by_side``). The ratio is minisd's time
over PyTorch's (lower is better). On a machine shared with other busy processes, BLAS
threads that spin while waiting for each other can slow both sides many times over: set
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 there (printed below as "threads").
"""

from __future__ import annotations

import argparse
import cProfile
import io as _io
import os
import pstats

import numpy as np

from minisd.benchmarks import side_by_side

CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
              norm_num_groups=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--tokens", type=int, default=16, help="text tokens per sample (default 16)")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs per block (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="blocks each side runs, taking turns (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs at the start of each block (default 1)")
    parser.add_argument("--no-torch", action="store_true", help="time minisd only")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print cProfile's top functions for one minisd training step")


def _inputs(batch: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    c = rng.standard_normal((batch, tokens, CONFIG["cross_attention_dim"])).astype(np.float32)
    noise = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    return z, t, c, noise


def minisd_steps(unet, z, t, c, noise):
    """(train_step, forward) closures for minisd."""
    import minisd
    from minisd import functional as F
    from minisd.optim import AdamW

    opt = AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)

    def train_step():
        opt.zero_grad()
        loss = F.mse_loss(unet(z, t, c), noise)
        loss.backward()
        opt.step()

    def forward():
        with minisd.no_grad():
            unet(z, t, c)

    return train_step, forward


def torch_steps(state, z, t, c, noise):
    """(train_step, forward) closures for diffusers on PyTorch, with minisd's weights."""
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel(**CONFIG)
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    z, t, c, noise = (torch.from_numpy(a) for a in (z, t, c, noise))

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(unet(z, t, c).sample, noise)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad():
            unet(z, t, c)

    return train_step, forward


def run(args) -> int:
    import minisd
    from minisd.models import UNet2DConditionModel

    minisd.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG)
    z, t, c, noise = _inputs(args.batch, args.tokens)
    cfg = CONFIG
    print(f"UNet2DConditionModel {unet.num_parameters():,} parameters: block_out_channels "
          f"{tuple(cfg['block_out_channels'])}, layers_per_block {cfg['layers_per_block']}, "
          f"{'+'.join(cfg['down_block_types'])} / {'+'.join(cfg['up_block_types'])}, "
          f"{cfg['attention_head_dim']} heads, {cfg['norm_num_groups']} groups")
    print(f"batch {args.batch}, latents 4x8x8, {args.tokens} tokens of width 64; "
          f"median of {args.rounds} x {args.repeats} runs (blocks after {args.warmup} warm-up runs); backend {minisd.get_backend().name}")
    state = unet.state_dict()  # before any step changes the weights
    ours = dict(zip(("train step", "forward"), minisd_steps(unet, z, t, c, noise)))
    theirs = {}
    if not args.no_torch:
        try:
            import torch

            theirs = dict(zip(("train step", "forward"), torch_steps(state, z, t, c, noise)))
            print(f"PyTorch {torch.__version__} on CPU; threads: PyTorch {torch.get_num_threads()}, "
                  f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
                  f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
        except ImportError as e:
            print(f"(PyTorch/diffusers not installed: {e}; timing minisd only)")

    print(f"{'':12s} {'minisd ms':>10s} {'PyTorch ms':>11s} {'ratio':>7s}")
    for name, fn in ours.items():
        if name in theirs:
            ms, ref = (1e3 * t for t in side_by_side([fn, theirs[name]], args.repeats, args.rounds, args.warmup))
            print(f"{name:12s} {ms:10.1f} {ref:11.1f} {ms / ref:6.2f}x")
        else:
            ms = 1e3 * side_by_side([fn], args.repeats, args.rounds, args.warmup)[0]
            print(f"{name:12s} {ms:10.1f}")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(ours["train step"])
        out = _io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minisd bench unet", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
