"""`minisd bench kernels`: every version of the hand-written CUDA kernels, timed.

On a GPU (CuPy and a device present): each op at Stable Diffusion 1.5's sizes (64x64
latents, 320 channels, 8 heads of 40), forward and backward, for each kernel version
and for a vendor-library equivalent: PyTorch's CUDA ops (cuDNN, cuBLAS, its fused
attention) where PyTorch with CUDA is installed, else CuPy's cuBLAS-backed matmuls
(im2col + GEMM for conv2d, materialised softmax for attention). Shown: milliseconds,
our time / theirs, achieved TFLOP/s (conv2d, attention) and GB/s (group norm: it
moves data and does little arithmetic; counted as one read of each input and one
write of each output, a lower bound on the traffic).

On a CPU: there is no GPU to time, so it says so and times the CPU emulator on small
shapes instead, each version beside the numpy backend and the naive one (the formulas as
written). Those figures measure the emulator (about a fiber switch per thread per
barrier), not the kernels' speed on a GPU.
"""

from __future__ import annotations

import numpy as np

from minisd.backends import BackendUnavailable, cuda_build, cuda_launch, fast_cpu, naive
from minisd.benchmarks import timeit, torch_or_none

# (label, op, shape arguments) at SD 1.5's sizes (batch 2: classifier-free guidance)
GPU_CASES = [
    ("conv2d 2x320x64x64 -> 320 k3 p1", "conv2d", (2, 320, 64, 64, 320, 3, 1, 1)),
    ("conv2d 2x640x32x32 -> 640 k3 s2 p1", "conv2d", (2, 640, 32, 32, 640, 3, 2, 1)),
    ("group_norm 2x320x64x64 G=32", "group_norm", (2, 320, 64, 64, 32)),
    ("attention self 2x8 L=4096 d=40", "attention", (2, 8, 4096, 4096, 40)),
    ("attention cross 2x8 Lq=4096 Lk=77 d=40", "attention", (2, 8, 4096, 77, 40)),
    ("attention self 2x8 L=1024 d=80", "attention", (2, 8, 1024, 1024, 80)),
]
# The same ops, small enough for the emulator.
CPU_CASES = [
    ("conv2d 2x16x16x16 -> 16 k3 p1", "conv2d", (2, 16, 16, 16, 16, 3, 1, 1)),
    ("group_norm 2x32x16x16 G=8", "group_norm", (2, 32, 16, 16, 8)),
    ("attention 1x2 L=128 d=40", "attention", (1, 2, 128, 128, 40)),
]


def add_arguments(parser) -> None:
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (the median is shown)")
    parser.add_argument("--runtime", choices=("auto", "cupy", "emulated"), default="auto",
                        help="auto: the GPU where there is one, else the emulator")


def _inputs(xp, op, shape, rng):
    """(forward arrays, extra arguments, flops of forward, flops of backward, bytes of forward)."""
    f32 = lambda *s: xp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    if op == "conv2d":
        N, C, H, W, K, R, stride, pad = shape
        P, Q = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - R) // stride + 1
        flops = 2 * N * K * C * R * R * P * Q
        arrays = [f32(N, C, H, W), f32(K, C, R, R) * 0.05, f32(K)]
        return arrays, (stride, pad), flops, 2 * flops, 4 * (sum(a.size for a in arrays) + N * K * P * Q)
    if op == "group_norm":
        N, C, H, W, G = shape
        arrays = [f32(N, C, H, W), f32(C), f32(C)]
        return arrays, (G,), None, None, 4 * 2 * N * C * H * W
    B, Hh, Lq, Lk, d = shape
    arrays = [f32(B, Hh, Lq, d), f32(B, Hh, Lk, d), f32(B, Hh, Lk, d)]
    flops = 4 * B * Hh * Lq * Lk * d  # S = Q K^T and O = P V
    return arrays, (d ** -0.5,), flops, 2.5 * flops, 4 * 2 * (2 * B * Hh * Lq * d + 2 * B * Hh * Lk * d)


def _ours(ops, op, arrays, extra):
    """(forward thunk, backward thunk) of the kernels."""
    if op == "conv2d":
        x, w, b = arrays
        y = ops.conv2d_forward(x, w, b, *extra)
        return (lambda: ops.conv2d_forward(x, w, b, *extra),
                lambda: ops.conv2d_backward(y, x, w, *extra, True, True, True))
    if op == "group_norm":
        x, g, b = arrays
        (G,) = extra
        y, mean, rstd = ops.group_norm_forward(x, G, g, b, 1e-5)
        return (lambda: ops.group_norm_forward(x, G, g, b, 1e-5),
                lambda: ops.group_norm_backward(y, x, G, g, mean, rstd))
    q, k, v = arrays
    (scale,) = extra
    o, lse = ops.attention_forward(q, k, v, scale, False)
    return (lambda: ops.attention_forward(q, k, v, scale, False),
            lambda: ops.attention_backward(o, q, k, v, o, lse, scale, False))


def _numpy_baseline(op, arrays, extra):
    """The fast CPU path (the numpy backend): the emulator's yardstick on a CPU."""
    return _ours(fast_cpu, op, arrays, extra)


def _torch_baseline(torch, op, arrays, extra):
    """PyTorch on the GPU (cuDNN convolutions, its fused attention), forward and forward+backward."""
    import torch.nn.functional as TF

    ts = [torch.as_tensor(a, device="cuda").requires_grad_() for a in arrays]
    if op == "conv2d":
        fn = lambda: TF.conv2d(*ts, stride=extra[0], padding=extra[1])  # noqa: E731
    elif op == "group_norm":
        fn = lambda: TF.group_norm(ts[0], extra[0], ts[1], ts[2])  # noqa: E731
    else:
        fn = lambda: TF.scaled_dot_product_attention(*ts)  # noqa: E731
    out = fn()
    grad = torch.ones_like(out)
    return fn, lambda: torch.autograd.grad(fn(), ts, grad)  # the second includes a forward


def _cupy_baseline(cupy, op, arrays, extra):
    """CuPy's cuBLAS matmuls and reductions (forward only): im2col + GEMM, materialised softmax."""
    if op == "conv2d":
        x, w, b = arrays
        stride, pad = extra
        N, C, H, W = x.shape
        K, _, R, S = w.shape

        def conv():
            xp_ = cupy.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            P, Q = (xp_.shape[2] - R) // stride + 1, (xp_.shape[3] - S) // stride + 1
            s = xp_.strides
            cols = cupy.lib.stride_tricks.as_strided(
                xp_, (N, P, Q, C, R, S), (s[0], s[2] * stride, s[3] * stride, s[1], s[2], s[3]))
            return cols.reshape(N * P * Q, -1) @ w.reshape(K, -1).T + b

        return conv, None
    if op == "group_norm":
        x, g, b = arrays
        (G,) = extra

        def gn():
            xg = x.reshape(x.shape[0], G, -1)
            mean = xg.mean(axis=2, keepdims=True)
            var = ((xg - mean) ** 2).mean(axis=2, keepdims=True)
            return ((xg - mean) / cupy.sqrt(var + 1e-5)).reshape(x.shape) * g[:, None, None] + b[:, None, None]

        return gn, None
    q, k, v = arrays
    (scale,) = extra

    def attn():
        s = (q @ k.swapaxes(-1, -2)) * scale
        p = cupy.exp(s - s.max(axis=-1, keepdims=True))
        return (p / p.sum(axis=-1, keepdims=True)) @ v

    return attn, None


def _rate(flops, nbytes, seconds):
    if flops:
        return f"{flops / seconds / 1e12:8.2f} TFLOP/s"
    return f"{nbytes / seconds / 1e9:8.1f} GB/s"


def _run_gpu(args, cupy) -> int:
    ops = cuda_launch.KernelOps("cupy")
    torch = torch_or_none()
    if torch is not None and not torch.cuda.is_available():
        torch = None
    sync = cupy.cuda.runtime.deviceSynchronize
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"GPU: {name}; baseline: {'PyTorch ' + torch.__version__ if torch else 'CuPy (cuBLAS), forward only'}")
    header = f"{'case':42s} {'pass':8s} {'who':9s} {'ms':>9s} {'vs base':>8s} {'rate':>16s}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for label, op, shape in GPU_CASES:
        arrays, extra, f_fwd, f_bwd, nbytes = _inputs(cupy, op, shape, rng)
        if torch is not None:
            base = _torch_baseline(torch, op, arrays, extra)
            base_sync = lambda: torch.cuda.synchronize()  # noqa: E731
        else:
            base, base_sync = _cupy_baseline(cupy, op, arrays, extra), sync
        for pass_index, pass_name in enumerate(("forward", "backward")):
            base_fn = base[pass_index]
            base_t = None
            if base_fn is not None:
                base_t = timeit(lambda: (base_fn(), base_sync()), repeat=args.repeat)
                if pass_index == 1:  # torch's backward thunk also runs the forward
                    base_t -= timeit(lambda: (base[0](), base_sync()), repeat=args.repeat)
                print(f"{label:42s} {pass_name:8s} {'baseline':9s} {base_t * 1e3:9.3f} {'':>8s} "
                      f"{_rate(f_fwd if pass_index == 0 else f_bwd, nbytes * (1 + pass_index), base_t)}")
            for v in cuda_launch.VERSIONS:
                with cuda_launch.settings(version=v):
                    fwd, bwd = _ours(ops, op, arrays, extra)
                    fn = (fwd, bwd)[pass_index]
                    t = timeit(lambda: (fn(), sync()), repeat=args.repeat)
                ratio = f"{t / base_t:8.2f}" if base_t else f"{'-':>8s}"
                print(f"{'':42s} {'':8s} {'v' + str(v):9s} {t * 1e3:9.3f} {ratio} "
                      f"{_rate(f_fwd if pass_index == 0 else f_bwd, nbytes * (1 + pass_index), t)}")
    return 0


def _run_emulator(args) -> int:
    ops = cuda_launch.KernelOps("emulated")
    print(f"{'case':34s} {'pass':8s} {'who':9s} {'ms':>9s} {'vs NumPy':>9s}")
    rng = np.random.default_rng(0)
    for label, op, shape in CPU_CASES:
        arrays, extra, *_ = _inputs(np, op, shape, rng)
        base = _numpy_baseline(op, arrays, extra)
        formulas = _ours(naive, op, arrays, extra)
        for pass_index, pass_name in enumerate(("forward", "backward")):
            base_t = timeit(base[pass_index], repeat=args.repeat)
            print(f"{label:34s} {pass_name:8s} {'numpy':9s} {base_t * 1e3:9.2f}")
            t = timeit(formulas[pass_index], repeat=args.repeat)
            print(f"{'':34s} {'':8s} {'naive':9s} {t * 1e3:9.2f} {t / base_t:9.1f}")
            for v in cuda_launch.VERSIONS:
                with cuda_launch.settings(version=v):
                    fn = _ours(ops, op, arrays, extra)[pass_index]
                    t = timeit(fn, repeat=args.repeat)
                print(f"{'':34s} {'':8s} {'emu v' + str(v):9s} {t * 1e3:9.2f} {t / base_t:9.1f}")
    return 0


def run(args) -> int:
    if args.runtime in ("auto", "cupy"):
        try:
            cupy = cuda_build.find_cupy()
        except BackendUnavailable as e:
            if args.runtime == "cupy":
                print(f"error: {e}")
                return 1
            print(f"No GPU is present ({e}).")
            print("Timing the CPU emulator instead: these figures measure the emulator, not the kernels on a GPU.")
            return _run_emulator(args)
        return _run_gpu(args, cupy)
    return _run_emulator(args)
