"""Every process-wide setting minisd makes on a CPU, in one place, applied at one moment.

``apply()`` runs once, when minisd is imported (minisd/backends/__init__.py calls it
before anything loads NumPy), and makes three settings, each measured to pay:

1. OpenBLAS's idle threads spin for 2^20 cycles (~0.4 ms) instead of 2^28 (~0.1 s) before
   they sleep (OPENBLAS_THREAD_TIMEOUT=20; read when NumPy loads OpenBLAS, so only when
   minisd is imported before NumPy). A BLAS thread spinning after a product takes a core
   from the next op: 3 A/B runs of a small UNet, a training step 310-313 ms against
   321-326, a forward 103-106 against 111-113 (2^16: no better than 2^20; 216d7e8).
2. NumPy's BLAS is held to one thread, and minisd shares the cores out itself, with a pool
   of one thread per core (``on_all_cores``: a convolution's images, attention's tiles,
   group norm's samples, the rows of big products). Held to one thread, the UNet of
   ``minisd bench unet`` took 0.77-0.81x the time of a training step and 0.74-0.78x of a
   forward pass (interleaved A/B in one process, 2 cores, 5 runs; ad89de4). Where minisd
   cannot share the work (one big image, long-key attention), ``blas_on_all_cores`` lends
   the BLAS its threads back for a while.
3. glibc's allocator keeps freed memory for reuse (mallopt, ``KEEP_FREED``) instead of
   handing it back to the system, which gives it again page by page, each page a fault
   and zero-filled, on the next call: see ``keep_freed_memory`` for what was measured.

Settings of your own are left alone: a BLAS thread count in the environment
(OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS), an OPENBLAS_THREAD_TIMEOUT, and
malloc settings (MALLOC_*_ variables, GLIBC_TUNABLES). The pool's threads start at the
first op shared among them (a process that runs none starts none).

MINISD_CPU_TUNING=0 turns all of it off: minisd then changes nothing in the process (no
environment variable, the BLAS keeps its threads, the allocator its defaults) and runs
its CPU loops on the calling thread, the BLAS threading each product itself. Slower, and
the same numbers up to the order of additions.
"""

from __future__ import annotations

import concurrent.futures
import os

ENABLED = os.environ.get("MINISD_CPU_TUNING", "1") != "0"
OPENBLAS_THREAD_TIMEOUT = "20"  # 2^20 cycles
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_applied = False


def apply() -> None:
    """Make the settings of the module docstring, once (a no-op with MINISD_CPU_TUNING=0)."""
    global _applied
    if _applied or not ENABLED:
        return
    _applied = True
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)  # before NumPy loads OpenBLAS
    import numpy  # noqa: F401  (loaded now, so that threadpoolctl finds its BLAS)

    hold_blas_to_one_thread()
    keep_freed_memory()


def cores() -> int:
    """How many threads minisd shares its CPU work among: one per core this process may run on (its
    affinity: all of them, unless taskset or an MPI launcher's binding says fewer), or 1 with
    MINISD_CPU_TUNING=0."""
    if not ENABLED:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------------
# the thread pool
# ------------------------------------------------------------------------------------

_pool, _pool_pid = None, None


def on_all_cores(fn, items, parallel=True):
    """[fn(item) for item in items], on a pool of one thread per core; the first exception is raised.

    NumPy lets go of Python's lock inside its loops and the BLAS, so the threads compute
    at once. One item, ``parallel=False`` or one core: on the calling thread."""
    global _pool, _pool_pid
    if not parallel or len(items) == 1 or cores() == 1:
        return [fn(item) for item in items]
    if _pool_pid != os.getpid():  # first use, or a forked child, which has none of the parent's threads
        _pool = concurrent.futures.ThreadPoolExecutor(cores(), thread_name_prefix="minisd-cpu")
        _pool_pid = os.getpid()
    return [f.result() for f in [_pool.submit(fn, item) for item in items]]


# ------------------------------------------------------------------------------------
# the BLAS's threads
# ------------------------------------------------------------------------------------


class blas_threads:
    """A context in which NumPy's BLAS runs its products on ``threads`` threads (None: on as
    many as it had before minisd held it to one; a no-op where minisd never held it).

    threadpoolctl finds the BLAS libraries once; entering and leaving then cost a call to
    each one's set_num_threads (a couple of microseconds, where threadpoolctl's own
    limit() looks them all up again, ten times longer: 8 us a conv call against 27, 0b89aaf).
    """

    libraries = None
    held_from = None  # the BLAS's thread counts before minisd held it to one thread

    def __init__(self, threads=None):
        self.wanted = threads

    @classmethod
    def controllers(cls):
        if cls.libraries is None:
            from threadpoolctl import ThreadpoolController

            cls.libraries = ThreadpoolController().select(user_api="blas").lib_controllers
        return cls.libraries

    def __enter__(self):
        libraries = self.controllers()
        self.threads = [lib.get_num_threads() for lib in libraries]
        wanted = [self.wanted] * len(libraries) if self.wanted is not None else blas_threads.held_from
        if self.wanted is None and wanted:  # no more than the cores this process may use (an MPI rank: its share)
            wanted = [min(n, cores()) for n in wanted]
        for lib, n in zip(libraries, wanted or self.threads):
            lib.set_num_threads(n)

    def __exit__(self, *exception):
        for lib, threads in zip(self.libraries, self.threads):
            lib.set_num_threads(threads)


def blas_on_one_thread():
    """While the pool's threads share a batch: each of their products on its own thread."""
    return blas_threads(1)


def blas_on_all_cores():
    """For the few products big enough to be worth the BLAS's own threads, and that minisd
    cannot share among its pool's threads itself (one image's convolution, long-key attention)."""
    return blas_threads(None)


def hold_blas_to_one_thread() -> None:
    """NumPy's BLAS computes on the calling thread from now on (setting 2 of the module
    docstring), unless a thread count for it is set in the environment."""
    if blas_threads.held_from is not None or any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        return
    try:
        libraries = blas_threads.controllers()
    except ImportError:  # no threadpoolctl: the BLAS keeps its threads
        return
    blas_threads.held_from = [lib.get_num_threads() for lib in libraries]
    for lib in libraries:
        lib.set_num_threads(1)


# ------------------------------------------------------------------------------------
# glibc's allocator
# ------------------------------------------------------------------------------------

KEEP_FREED = 64 << 20  # bytes of freed memory kept at the top of each malloc arena (M_TOP_PAD)
TRIM_THRESHOLD = 256 << 20  # the main arena gives memory back only beyond this (M_TRIM_THRESHOLD)
MMAP_THRESHOLD = 32 << 20  # allocations below this come from the arenas (M_MMAP_THRESHOLD: glibc's largest)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers in glibc's malloc.h


def _user_set_malloc() -> bool:
    return any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ) or \
        "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process for the next op's temporaries (True if set).

    By default glibc serves every block above its mmap threshold with a fresh mapping,
    unmapped again on free, and gives memory back to the system as soon as more than 128 KB
    of it lies free at the top of an arena. A training step, or an op in a loop, allocates
    and frees the same large temporaries every time, and each one comes back page by page,
    a page fault and a zero-filled page each. Three knobs stop that: blocks below 32 MB from
    the arenas (MMAP_THRESHOLD; setting any knob freezes glibc's adaptive threshold, which
    starts at 128 KB and would send every bigger temporary to mmap), the main arena trimmed
    only beyond 256 MB free (TRIM_THRESHOLD), and 64 MB kept at the top of every arena when
    it is trimmed (KEEP_FREED), which is what the pool's threads, each with an arena of its
    own, need.

    Measured (2 cores shared with other work at load 7-9, each variant in a fresh process,
    six rounds in alternating order; peak memory 294 MB in every variant):
    - bench unet's training step, page faults a step: glibc's defaults 16,580 (16,519-19,157),
      the mmap and trim thresholds alone 48 (16-55), the top pad and mmap threshold alone 453
      (210-657), all three 16 (16-48); median step time 2.59 s (1.83-3.29) with the
      defaults, 2.01 s (1.27-3.06) with all three: faster, by less than the spread here.
    - attention at 64 keys, d = 32, forward + backward in a loop on the pool (fresh process,
      two rounds): faults a call 2,172 with the defaults, 2,087 with the thresholds alone,
      0.1 with the top pad, 0.1 with all three; 32 ms (20-44), 25 (22-27), 11.4 (10.7-12.1),
      11.9 (11.5-12.3).
    So each knob pays where the other does not, and all three are kept.
    """
    if _user_set_malloc():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.mallopt(_M_TOP_PAD, KEEP_FREED)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return True
