"""Benchmarks run by `minisd bench NAME`: each module has add_arguments(parser) and run(args).

Speed targets are checked here, side by side in one run (minisd against PyTorch where it
is installed), never by timed tests. ``timeit`` below is the one timer they all use.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

NAMES = ("ops", "kernels", "unet", "sd15", "generate")


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds, after ``warmup`` untimed calls.

    The median rather than the mean: on a shared machine a few runs are slowed by
    other work, and the median ignores them.
    """
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_or_none():
    """PyTorch if installed (the parity extra), else None: benchmarks then time minisd alone."""
    try:
        import torch

        return torch
    except ImportError:
        return None


def peak_memory_mb() -> float | None:
    """This process' peak resident memory so far, in MiB (the kernel's high-water mark), or
    None where the platform does not say. Resident memory counts the pages a process has
    touched: arrays, but also the pages of any file it has memory-mapped and read."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB on Linux
