"""Benchmarks run by `minisd bench NAME`: each module has add_arguments(parser) and run(args).

Speed targets are checked here, side by side in one run (minisd against PyTorch where it
is installed), never by timed tests. ``timeit`` below is the one timer they all use.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

NAMES = ("ops", "kernels", "unet", "sd15", "generate", "dist", "samplers")


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


# Seconds to wait before each block: longer than OpenBLAS's worker threads spin after a
# product (2^28 cycles, ~0.1 s, by OpenBLAS's default; minisd sets 2^20 when it is imported
# first) and PyTorch's OpenMP threads after a parallel loop.
SETTLE_SECONDS = 0.25


def side_by_side(fns: list[Callable[[], object]], repeat: int = 5, rounds: int = 3, warmup: int = 1) -> list[float]:
    """Median wall time of each function in seconds, the functions taking turns in blocks.

    Each round runs every function ``warmup`` times untimed, then ``repeat`` times timed,
    one function after the other; the median is over all rounds. Turns, so that a spell
    of other work on a shared machine slows every side alike. Blocks rather than single
    calls, with a pause before each, because a library's worker threads keep spinning on
    the cores for a while after a call returns (OpenBLAS's for ~0.1 s, PyTorch's OpenMP
    pool): a call made right after the other library's runs on a core and a half. Measured
    here: PyTorch's conv2d step at 8x8x128 took 16.6 ms right after minisd's, 8.1 ms alone;
    minisd's 32x32x32 step 19 ms alone, 26 to 46 ms when the two swapped after every call.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            if len(fns) > 1:
                time.sleep(SETTLE_SECONDS)
            for _ in range(warmup):
                fn()
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


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
