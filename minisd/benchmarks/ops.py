"""`minisd bench ops`: conv2d, group_norm and attention, forward + backward, against PyTorch CPU.

The shapes are those of a small UNet's training step (batch 32, 8x8 to 32x32 feature
maps, 32 to 128 channels). For conv2d the achieved GFLOP/s is also shown as a fraction
of this machine's float32 matmul peak, measured in the same run: a convolution is
three matrix products (forward, dX, dW), so the peak is the ceiling for minisd, which
computes them with NumPy's BLAS. PyTorch's fraction is shown too: its oneDNN
convolutions do not go through that BLAS, and can run above it.

minisd and PyTorch take turns in blocks of runs (``side_by_side``), so that a spell of
other work on a shared machine slows both alike; the load average is printed before and
after. ``--naive`` adds the naive backend (minisd/backends/naive.py, the formulas as
written) to the turns: its time, and how many times minisd's (the numpy backend) it is.
"""

from __future__ import annotations

import os

import numpy as np

from minisd import functional as F
from minisd.backends import get_backend, set_backend
from minisd.benchmarks import side_by_side, timeit, torch_or_none
from minisd.tensor import Tensor

# (N, C, H, W, K, kernel, stride, padding)
CONV_SHAPES = [
    (32, 32, 32, 32, 32, 3, 1, 1),
    (32, 64, 16, 16, 64, 3, 1, 1),
    (32, 128, 8, 8, 128, 3, 1, 1),
    (32, 64, 16, 16, 128, 3, 1, 1),
    (32, 64, 16, 16, 64, 3, 2, 1),
    (32, 128, 8, 8, 64, 1, 1, 0),
]
# (N, C, H, W, groups)
NORM_SHAPES = [(32, 32, 32, 32, 8), (32, 64, 16, 16, 32), (32, 128, 8, 8, 32)]
# (B, heads, Lq, Lk, d)
ATTN_SHAPES = [(32, 4, 256, 256, 16), (32, 4, 64, 64, 32), (32, 4, 64, 16, 32), (32, 8, 64, 64, 16)]


def add_arguments(parser) -> None:
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case and round, 3 rounds (the median is shown)")
    parser.add_argument("--only", metavar="TEXT", default="",
                        help="time only the cases whose label contains TEXT (e.g. conv2d, 'k3 s2')")
    parser.add_argument("--naive", action="store_true",
                        help="also time the naive backend (the formulas as written: many times slower)")


def matmul_peak_gflops(n: int = 1024, repeat: int = 5) -> float:
    """Float32 GFLOP/s of one large NumPy matrix product, on all the cores: the ceiling for
    conv2d here. (On the BLAS's own threads, which minisd otherwise holds to one.)"""
    from minisd.backends.cpu_settings import blas_on_all_cores

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    with blas_on_all_cores():
        seconds = timeit(lambda: a @ a, repeat=repeat)
    return 2 * n ** 3 / seconds / 1e9


def _minisd_step(fn, arrays, grad_out):
    """forward + backward through minisd with fixed upstream gradient."""
    def run():
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        fn(*tensors).backward(grad_out)
    return run


def _on_backend(name, run):
    """run() with backend ``name`` active, the previous one restored after."""
    def on():
        previous = get_backend().name
        set_backend(name)
        try:
            run()
        finally:
            set_backend(previous)
    return on


def _torch_step(torch, fn, arrays, grad_out):
    grad_out = torch.from_numpy(grad_out)

    def run():
        tensors = [torch.from_numpy(a).requires_grad_() for a in arrays]
        fn(*tensors).backward(grad_out)
    return run


def _cases(rng):
    """(label, minisd fn, torch fn (given torch), input arrays, flops or None)."""
    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    for N, C, H, W, K, k, st, pd in CONV_SHAPES:
        x, w, b = f32(N, C, H, W), f32(K, C, k, k) * 0.1, f32(K)
        P, Q = (H + 2 * pd - k) // st + 1, (W + 2 * pd - k) // st + 1
        flops = 3 * 2 * N * K * C * k * k * P * Q
        yield (f"conv2d {N}x{C}x{H}x{W} -> {K} k{k} s{st} p{pd}",
               lambda x, w, b, st=st, pd=pd: F.conv2d(x, w, b, st, pd),
               lambda torch, st=st, pd=pd: (lambda x, w, b: torch.nn.functional.conv2d(x, w, b, st, pd)),
               [x, w, b], flops)
    for N, C, H, W, G in NORM_SHAPES:
        yield (f"group_norm {N}x{C}x{H}x{W} G={G}",
               lambda x, g, b, G=G: F.group_norm(x, G, g, b),
               lambda torch, G=G: (lambda x, g, b: torch.nn.functional.group_norm(x, G, g, b)),
               [f32(N, C, H, W), f32(C), f32(C)], None)
    for B, Hh, Lq, Lk, d in ATTN_SHAPES:
        yield (f"attention {B}x{Hh} heads, Lq={Lq} Lk={Lk} d={d}",
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
               lambda torch: (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
               [f32(B, Hh, Lq, d), f32(B, Hh, Lk, d), f32(B, Hh, Lk, d)], None)


def _load_note(before: bool = True) -> str:
    """The 1-minute load average, flagged when other work competes for the cores. Only
    before the run: afterwards the average counts this benchmark's own threads too."""
    if not hasattr(os, "getloadavg"):
        return ""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if not before:
        return f"load average {load:.1f} on {cores} cores after the run (this benchmark's threads included)"
    busy = " (busy: other work shares the cores; times are inflated, ratios unreliable)" if load > 0.5 * cores else ""
    return f"load average {load:.1f} on {cores} cores{busy}"


def run(args) -> int:
    rng = np.random.default_rng(0)
    torch = torch_or_none()
    print(_load_note())
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak (NumPy, 1024^3): {peak:.0f} GFLOP/s")
    if torch is None:
        print("PyTorch is not installed (pip install 'minisd[parity]'): timing minisd alone")
    else:
        print(f"PyTorch {torch.__version__} CPU, {torch.get_num_threads()} threads")
    header = (f"{'forward + backward':48s} {'minisd ms':>10s} {'torch ms':>9s} {'ratio':>6s} {'GFLOP/s':>8s} {'of peak':>7s}"
              f" {'torch of peak':>13s}" + (f" {'naive ms':>9s} {'naive/minisd':>12s}" if args.naive else ""))
    print(header)
    print("-" * len(header))
    worst = 0.0
    for label, fn, torch_fn, arrays, flops in _cases(rng):
        if args.only not in label:
            continue
        out = fn(*[Tensor(a) for a in arrays])
        grad_out = rng.standard_normal(out.shape, dtype=np.float32)
        steps = [_minisd_step(fn, arrays, grad_out)]
        if torch is not None:
            steps.append(_torch_step(torch, torch_fn(torch), arrays, grad_out))
        if args.naive:
            steps.append(_on_backend("naive", _minisd_step(fn, arrays, grad_out)))
        if len(steps) > 1:
            times = side_by_side(steps, args.repeat)
        else:
            times = [timeit(steps[0], repeat=args.repeat)]
        ours = times[0]
        theirs = times[1] if torch is not None else None
        line = f"{label:48s} {ours * 1e3:10.2f}"
        if torch is not None:
            ratio = ours / theirs
            if flops:
                worst = max(worst, ratio)
            line += f" {theirs * 1e3:9.2f} {ratio:6.2f}"
        else:
            line += f" {'-':>9s} {'-':>6s}"
        if flops:
            line += f" {flops / ours / 1e9:8.1f} {flops / ours / 1e9 / peak:7.0%}"
            line += f" {flops / theirs / 1e9 / peak:13.0%}" if torch is not None else f" {'-':>13s}"
        elif args.naive:
            line += f" {'-':>8s} {'-':>7s} {'-':>13s}"
        if args.naive:
            line += f" {times[-1] * 1e3:9.2f} {times[-1] / ours:11.1f}x"
        print(line)
    if torch is not None:
        print(f"conv2d: worst time ratio minisd / PyTorch = {worst:.2f} (target <= 1.5)")
    print(_load_note(before=False))
    return 0
