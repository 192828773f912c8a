"""`minisd bench dist`: data-parallel training of the UNet stage, 1 rank against N ranks.

The default UNet stage (UNET_CONFIG, batch 32, on the shipped model's VAE and text
encoder) trained for ``--steps`` steps, each layout in its own launch:

    1 rank   one process, minisd's threads on every core (2 on the 2-core machine)
    N ranks  mpiexec -n N, each rank held to its share of the cores (1 thread on 2 cores)

For each: images per second (after ``--warmup`` steps), the share of a step spent in
the gradient all-reduce (and in copying the gradients to and from its flat buffer), the
buffer's bytes and what each rank sends of it (a ring all-reduce: 2 (N - 1) / N of it).
Then, on N ranks, one all-reduce of the whole buffer against the same bytes cut into
``--buckets`` messages: whether buckets would pay. Layouts take turns for ``--rounds``
rounds, and the median is shown: on a shared machine timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minisd.cli import positive_int

    parser.add_argument("--ranks", type=positive_int, default=2, help="ranks of the data-parallel run (default 2)")
    parser.add_argument("--steps", type=positive_int, default=30, help="training steps timed in each run (default 30)")
    parser.add_argument("--warmup", type=positive_int, default=3, help="steps left out of the timing (default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="the global batch (default 32)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="runs of each layout, taking turns (default 3)")
    parser.add_argument("--buckets", type=positive_int, default=8, help="messages of the bucketed all-reduce (default 8)")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)


def run(args) -> int:
    if args.worker:
        return worker(args)
    mpiexec = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        raise RuntimeError("bench dist needs mpi4py and an MPI's mpiexec: pip install 'minisd[dist]'")
    results = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory(prefix="minisd-bench-dist-") as tmp:
        for r in range(args.rounds):
            for ranks in results:
                path = os.path.join(tmp, f"{ranks}-{r}.json")
                cmd = [sys.executable, "-m", "minisd", "bench", "dist", "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                       "--buckets", str(args.buckets), "--worker", path]
                if ranks > 1:
                    cmd = [mpiexec, "-n", str(ranks), "-host", "localhost", *cmd]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if proc.returncode:
                    raise RuntimeError(f"bench dist: the {ranks}-rank run failed: {proc.stderr.strip()[-500:]}")
                with open(path) as f:
                    results[ranks].append(json.load(f))
    report(args, results)
    return 0


def report(args, results: dict) -> None:
    def median(ranks, key):
        return statistics.median(r[key] for r in results[ranks])

    one, n = 1, args.ranks
    first = results[n][0]
    print(f"minisd bench dist: the default UNet stage, global batch {args.batch_size}, {args.steps} steps "
          f"({args.warmup} more untimed), median of {args.rounds} runs each, taking turns; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} now (a shared machine: noisy)")
    print(f"  {'layout':24} {'images/s':>9} {'s/step':>8} {'all-reduce':>11} {'+ copies':>9}   each run's images/s")
    for ranks in (one, n):
        rows = results[ranks]
        threads = rows[0]["threads"]
        name = f"{ranks} rank{'s' if ranks > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        step = median(ranks, "seconds_per_step")
        share = median(ranks, "allreduce_seconds_per_step") / step if ranks > 1 else 0.0
        copies = median(ranks, "average_seconds_per_step") / step if ranks > 1 else 0.0
        runs = ", ".join(f"{r['images_per_second']:.1f}" for r in rows)
        print(f"  {name:24} {median(ranks, 'images_per_second'):9.1f} {step:8.3f} {share:10.1%} "
              f"{copies:9.1%}   {runs}")
    speedup = median(n, "images_per_second") / median(one, "images_per_second")
    print(f"  {n} ranks against 1: {speedup:.2f}x the images per second")
    nbytes = first["buffer_bytes"]
    print(f"  gradient buffer: {first['parameters']:,} parameters + the loss, {nbytes / 2**20:.2f} MiB a step; "
          f"each rank sends 2 (N - 1) / N of it in a ring all-reduce: {2 * (n - 1) / n * nbytes / 2**20:.2f} MiB")
    print(f"  one all-reduce of the buffer: {median(n, 'one_message_ms'):.2f} ms; the same bytes in "
          f"{args.buckets} messages: {median(n, 'bucketed_ms'):.2f} ms (buckets pay only where they overlap the "
          "backward pass, which minisd's does not)")


def worker(args) -> int:
    """One run (on each rank of it): the UNet stage on the shipped VAE and text encoder."""
    import numpy as np

    from minisd import distributed
    from minisd import train as T
    from minisd.backends import cpu_settings

    world = distributed.world()
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "shapes")
    out = tempfile.mkdtemp(prefix="minisd-bench-dist-")
    try:
        if world.rank == 0:
            for part in ("vae", "text_encoder", "tokenizer"):
                shutil.copytree(os.path.join(shipped, part), os.path.join(out, part))
        out = world.bcast(out)  # rank 0's folder: the ranks share this machine
        # the start of each step (fit draws each step's batch from step_rng) and the all-reduce's time
        starts, spent = [], {"allreduce": 0.0, "average": 0.0}
        step_rng, allreduce, average = T.step_rng, world.allreduce_mean_, distributed.FlatGradients.average

        def timed_step_rng(*a):
            starts.append(time.perf_counter())
            return step_rng(*a)

        def timed(key, fn):
            def call(*a):
                t0 = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    if len(starts) > args.warmup:
                        spent[key] += time.perf_counter() - t0
            return call

        T.step_rng = timed_step_rng
        world.allreduce_mean_ = timed("allreduce", allreduce)
        distributed.FlatGradients.average = timed("average", average)
        steps = args.warmup + args.steps
        # steps + 1 with stop_after: no final checkpoint inside the timed loop
        record = T.train_unet(out, steps=steps + 1, stop_after=steps, batch_size=args.batch_size, progress=False,
                              checkpoint_every=10 ** 9, quality_every=0)
        seconds = time.perf_counter() - starts[args.warmup]
        grads = distributed.FlatGradients(record["model"].parameters(), world)
        result = {"ranks": world.size, "threads": cpu_settings.cores(), "seconds_per_step": seconds / args.steps,
                  "images_per_second": args.batch_size * args.steps / seconds,
                  "allreduce_seconds_per_step": spent["allreduce"] / args.steps,
                  "average_seconds_per_step": spent["average"] / args.steps,
                  "parameters": grads.offsets[-1], "buffer_bytes": grads.nbytes}
        if world.size > 1:
            world.allreduce_mean_ = allreduce
            result.update(bucket_timings(world, grads.offsets[-1] + 1, args.buckets, np))
        if world.rank == 0:
            with open(args.worker, "w") as f:
                json.dump(result, f)
    finally:
        world.barrier()
        if world.rank == 0:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def bucket_timings(world, size: int, buckets: int, np, repeat: int = 20) -> dict:
    """Milliseconds (median of ``repeat``) of one all-reduce of ``size`` float32, and of the same in ``buckets``."""
    buf = np.ones(size, dtype=np.float32)
    parts = np.array_split(buf, buckets)

    def one():
        world.allreduce_mean_(buf)

    def many():
        for part in parts:
            world.allreduce_mean_(part)

    times = {}
    for name, fn in (("one_message_ms", one), ("bucketed_ms", many)):
        samples = []
        for _ in range(repeat):
            world.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(1000 * (time.perf_counter() - t0))
        times[name] = statistics.median(samples)
    return times
