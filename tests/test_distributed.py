"""Data-parallel training (minisd.distributed): N ranks with a global batch B train the same
model as one process with batch B, to float32 rounding; --resume works across rank counts;
a rank that dies or fails alone stops the whole job within seconds.

The multi-rank tests launch this very file under ``mpiexec -n 2`` (see ``worker`` at the
bottom), on the loopback, every launch under a timeout. Where mpi4py or mpiexec is missing
they skip, saying so (CI installs both: .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minisd import distributed
from minisd import train as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (a worker rank runs this file as a script)
from test_train import TINY_TEXT, TINY_UNET, TINY_VAE, TINY_VISION  # noqa: E402

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 20
# Each stage's arguments: tiny models, the global batch B, 20 steps.
RUNS = {
    "vae": dict(steps=STEPS, batch_size=4, lr=3e-3, config=TINY_VAE),
    "clip": dict(steps=STEPS, batch_size=8, lr=1e-3, text_config=TINY_TEXT, vision_config=TINY_VISION),
    "unet": dict(steps=STEPS, batch_size=4, lr=3e-3, config=TINY_UNET),
}
RESUME_AT = 8  # the 2 -> 1 and 1 -> 2 runs stop after this many steps (a checkpoint) and resume
# Float32 rounding, as AdamW carries it over 20 steps: measured 5e-6 (losses) and 3e-4 (weights) at most.
LOSS_RTOL, WEIGHT_RTOL = 1e-4, 2e-3
LAUNCH_TIMEOUT = 240  # seconds for one mpiexec launch (the slowest here takes ~40 s on a busy 2-core machine)


def tiny_data():
    from minisd.data import shapes

    d = shapes.make_dataset(96, "train", seed=3)
    return d.images, list(d.captions)


def train(stage: str, out: str, data, **extra) -> dict:
    kw = dict(RUNS[stage], progress=False)
    kw.update(extra)
    if stage == "vae":
        return T.train_vae(out, images=data[0], **kw)
    return {"clip": T.train_clip, "unet": T.train_unet}[stage](out, data=data, **kw)


def key_bias(name: str) -> bool:
    """An attention key's bias: its gradient is 0 in exact arithmetic (q.(k + b) adds q.b to every score
    of a query, and softmax ignores that), so AdamW, which divides by sqrt(v), turns its float32
    rounding noise into steps of lr in chance directions, one process or several alike."""
    return name.endswith(("k_proj.bias", "to_k.bias"))


class FirstGradient:
    """Records the gradients of the first step (averaged over the ranks, before clipping)."""

    def __init__(self):
        self.grads = None

    def __enter__(self):
        self.clip = T.clip_grad_norm

        def record(params, max_norm):
            if self.grads is None:
                self.grads = [None if p.grad is None else p.grad.copy() for p in params]
            return self.clip(params, max_norm)

        T.clip_grad_norm = record
        return self

    def __exit__(self, *exc):
        T.clip_grad_norm = self.clip


def weights(record) -> dict:
    """What the run ends with: its weights (the UNet's EMA too)."""
    named = {k: v.numpy() for k, v in record["model"].named_parameters()}
    if record.get("ema") is not None:
        named.update({f"ema/{k}": s for k, s in zip(named, record["ema"].shadow)})
    return named


# ---------------------------------------------------------------------------------------
# Launching ranks
# ---------------------------------------------------------------------------------------


def mpi_or_skip():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install 'minisd[dist]'): no multi-rank run possible here")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (pip install mpich, or the system's MPI)")
    return mpiexec


def launch(ranks: int, args: list, timeout: float = LAUNCH_TIMEOUT, wait: bool = True, env=None):
    """mpiexec -n ranks python args..., on this machine only (loopback), under a timeout."""
    mpiexec = mpi_or_skip()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [mpiexec, "-n", str(ranks), "-host", "localhost", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_jobs(ranks: int, jobs: list, tmp, **kw):
    """Run ``jobs`` (see worker) in one launch of ``ranks`` ranks; returns the finished process."""
    path = os.path.join(str(tmp), f"jobs-{time.monotonic_ns()}.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    proc = launch(ranks, [sys.executable, HERE, path], **kw)
    if kw.get("wait", True):
        assert proc.returncode == 0, f"the {ranks}-rank run failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def largest_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of |a - b|_inf / |b|_inf."""
    return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-30)) for k in b)


# ---------------------------------------------------------------------------------------
# One process: what it was before, bit for bit
# ---------------------------------------------------------------------------------------


def test_one_process_is_a_world_of_one_whose_collectives_change_nothing():
    from minisd import nn

    world = distributed.world()
    assert (world.kind, world.rank, world.size) == ("single", 0, 1)
    assert world.shard(6) == slice(0, 6)
    w = nn.Parameter(np.arange(3, dtype=np.float32))
    (w * w).sum().backward()
    grad = w.grad
    assert distributed.FlatGradients([w], world).average(1.25) == 1.25
    assert w.grad is grad  # not even copied
    x = nn.Parameter(np.ones((2, 3), dtype=np.float32))
    assert distributed.gather_rows(x) is x


def test_a_launch_of_several_ranks_without_mpi4py_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    """Without mpi4py, `mpiexec -n 2 minisd train` would be two copies of one run: refused, rank 0 saying it."""
    from minisd import cli

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    for name in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_STEP_NUM_TASKS",
                 "SLURM_PROCID", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setattr(distributed, "_world", None)
    assert cli.main(["train", "vae", "--out", str(tmp_path / "m"), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an MPI launcher started 2 ranks, but mpi4py is not installed" in err[0], err
    assert "pip install 'minisd[dist]'" in err[0]
    assert not (tmp_path / "m").exists()
    monkeypatch.setenv("PMI_RANK", "1")  # the other ranks exit with the same status, saying nothing
    monkeypatch.setattr(distributed, "_world", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "vae", "--out", str(tmp_path / "m"), "--steps", "1"])
    assert e.value.code == 1
    monkeypatch.setenv("PMI_SIZE", "1")  # one rank: as without a launcher
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setattr(distributed, "_world", None)
    assert distributed.world().size == 1
    monkeypatch.setattr(distributed, "_world", None)


def test_a_launcher_of_another_mpi_than_mpi4py_s_is_refused(tmp_path):
    """Open MPI's mpirun starting an mpi4py built on MPICH gives N singletons, N copies of one run."""
    mpi_or_skip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MV2_", "SLURM_"))}
    env.update(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "minisd", "train", "vae", "--out", str(tmp_path / "m")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if "Open MPI" in proc.stderr and "MPICH" not in proc.stderr:
        pytest.skip("mpi4py is built on Open MPI here: the MPICH-side mismatch cannot be staged")
    assert proc.returncode == 1, proc.stderr
    assert "the launcher started 2 ranks, but MPI sees each as alone" in proc.stderr


# ---------------------------------------------------------------------------------------
# N = 2 against one process: the same losses and weights, to float32 rounding
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (here) and 2 ranks (one launch) on the same tiny runs, and the resumes across counts.

    one[stage]: one process, 20 steps; two[stage]: 2 ranks, global batch the same. The UNet of both
    trains on the one process's VAE and text encoder, so that only the UNet's own run differs.
    two_one: 8 steps on 2 ranks, resumed on 1 to 20; one_two: 8 on 1, resumed on 2."""
    mpi_or_skip()
    tmp = tmp_path_factory.mktemp("dist")
    data = tiny_data()
    one, ref = {}, str(tmp / "one")
    for stage in ("vae", "clip", "unet"):
        with FirstGradient() as first:
            one[stage] = train(stage, ref, data)
        one[stage]["first_gradient"] = dict(zip((k for k, _ in one[stage]["model"].named_parameters()), first.grads))
    parts = ("vae", "text_encoder", "tokenizer")

    def with_parts(name):
        out = tmp / name
        for part in parts:
            shutil.copytree(os.path.join(ref, part), out / part)
        return str(out)

    one_two = with_parts("one_two")
    train("unet", one_two, data, stop_after=RESUME_AT, checkpoint_every=RESUME_AT)
    jobs = [{"stage": s, "out": str(tmp / f"two_{s}") if s != "unet" else with_parts("two_unet"),
             "dump": str(tmp / f"two_{s}.npz"), "first_gradient": True} for s in ("vae", "clip", "unet")]
    two_one = with_parts("two_one")
    jobs.append({"stage": "unet", "out": two_one, "dump": str(tmp / "two_one_first.npz"),
                 "kwargs": {"stop_after": RESUME_AT, "checkpoint_every": RESUME_AT}})
    jobs.append({"stage": "unet", "out": one_two, "dump": str(tmp / "one_two.npz"), "kwargs": {"resume": True}})
    jobs.append({"cores": str(tmp)})
    t0 = time.perf_counter()
    run_jobs(2, jobs, tmp)
    seconds = time.perf_counter() - t0
    two = {job["dump"]: load_dump(job["dump"]) for job in jobs if "dump" in job}
    resumed = train("unet", two_one, data, resume=True)
    return {"one": one, "two": {s: two[jobs[i]["dump"]] for i, s in enumerate(("vae", "clip", "unet"))},
            "two_one": {"losses": resumed["losses"], "weights": weights(resumed)},
            "one_two": two[str(tmp / "one_two.npz")], "seconds": seconds,
            "cores": [json.loads((tmp / f"cores{r}.json").read_text()) for r in range(2)]}


def load_dump(path: str) -> dict:
    """What every rank of a job wrote (see worker): rank 0's losses and weights, and whether
    every rank ended with the very same weights."""
    with np.load(path) as z:
        out = {"losses": z["losses"].tolist(), "weights": {k[2:]: z[k] for k in z.files if k.startswith("w/")},
               "first_gradient": {k[2:]: z[k] for k in z.files if k.startswith("g/")}}
    ranks = sorted(p for p in os.listdir(os.path.dirname(path)) if p.startswith(os.path.basename(path) + ".rank"))
    out["ranks"] = 1 + len(ranks)
    out["ranks_agree"] = True
    for name in ranks:
        with np.load(os.path.join(os.path.dirname(path), name)) as z:
            out["ranks_agree"] &= all(np.array_equal(z[f"w/{k}"], v) for k, v in out["weights"].items())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_two_ranks_compute_the_gradient_of_the_whole_batch(runs, stage):
    """The first step's gradient, averaged over 2 ranks of B/2 samples, is the gradient of the batch of
    B in one process, to float32 rounding, tensor by tensor; CLIP's too, whose loss couples the
    whole batch (each rank gathers every rank's embeddings)."""
    one, two = runs["one"][stage]["first_gradient"], runs["two"][stage]["first_gradient"]
    assert set(two) == {k for k, g in one.items() if g is not None}
    worst, where = 0.0, None
    for name, g in two.items():
        scale = np.max(np.abs(one[name]))
        if key_bias(name):  # 0 in exact arithmetic: both are rounding noise
            assert scale < 1e-7 and np.max(np.abs(g)) < 1e-7, name
            continue
        diff = float(np.max(np.abs(g - one[name])) / scale)
        worst, where = max((worst, where), (diff, name))
    print(f"\n{stage}: the first gradient on 2 ranks against 1 process: largest relative difference "
          f"{worst:.1e} ({where})")
    assert worst < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_two_ranks_train_what_one_process_trains(runs, stage):
    """Global batch B on 2 ranks (B/2 each) and batch B in one process: the same 20 losses and the
    same weights, to float32 rounding (which AdamW amplifies where a gradient is near 0, and turns
    into steps of lr for the key biases; see key_bias); every rank ends with the very same weights."""
    one, two = runs["one"][stage], runs["two"][stage]
    assert two["ranks"] == 2 and two["ranks_agree"], "the ranks' weights drifted apart"
    losses = np.array(two["losses"])
    assert len(losses) == STEPS
    loss_diff = float(np.max(np.abs(losses - one["losses"]) / np.abs(one["losses"])))
    ref = weights(one)
    weight_diff = largest_relative_difference({k: v for k, v in two["weights"].items() if not key_bias(k)},
                                              {k: v for k, v in ref.items() if not key_bias(k)})
    print(f"\n{stage}: 2 ranks against 1 process after {STEPS} steps: largest relative difference "
          f"{loss_diff:.1e} in the losses, {weight_diff:.1e} in the weights")
    assert loss_diff < LOSS_RTOL and weight_diff < WEIGHT_RTOL
    for k in filter(key_bias, ref):  # at most one step of lr (1e-3) a step apart
        assert np.max(np.abs(two["weights"][k] - ref[k])) < STEPS * RUNS[stage]["lr"], k


@pytest.mark.slow
def test_resume_across_rank_counts_continues_the_same_loss_curve(runs):
    """8 steps on 2 ranks then 12 on 1, and 8 on 1 then 12 on 2: the 20 losses of one process."""
    one = np.array(runs["one"]["unet"]["losses"])
    for name in ("two_one", "one_two"):
        losses = np.array(runs[name]["losses"])
        assert len(losses) == STEPS, name
        diff = float(np.max(np.abs(losses - one) / np.abs(one)))
        weight_diff = largest_relative_difference(runs[name]["weights"], weights(runs["one"]["unet"]))
        print(f"\nresumed {name.replace('_', ' -> ')}: largest relative difference {diff:.1e} in the losses, "
              f"{weight_diff:.1e} in the weights")
        assert diff < LOSS_RTOL and weight_diff < WEIGHT_RTOL, name


@pytest.mark.slow
def test_the_ranks_on_one_machine_share_its_cores(runs):
    """2 ranks on this machine: each held to its half of the cores, with that many threads (not 2 x all)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or len(cpus) < (os.cpu_count() or 0):
        pytest.skip(f"needs 2 or more CPUs, unbound ({len(cpus)} here)")
    share = len(cpus) // 2
    first, second = runs["cores"]
    assert first["affinity"] == cpus[:share] and second["affinity"] == cpus[share:2 * share]
    assert first["threads"] == second["threads"] == share


def test_minisd_s_threads_and_the_blas_s_are_the_cores_this_process_may_use():
    """A process held to one core (a rank's share) runs one thread of its own, and lends the BLAS
    one: with 2 BLAS threads on one core, 2 ranks trained the VAE 4x slower than one process."""
    from minisd.backends import cpu_settings

    code = ("import os; os.sched_setaffinity(0, {0}); from minisd.backends import cpu_settings as c; "
            "from threadpoolctl import threadpool_info\n"
            "with c.blas_on_all_cores(): print(c.cores(), max(i['num_threads'] for i in threadpool_info() "
            "if i['user_api'] == 'blas'))")
    env = {k: v for k, v in os.environ.items() if k not in cpu_settings.BLAS_THREAD_VARIABLES}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**env, "MINISD_CPU_TUNING": "1"})
    assert proc.stdout.split() == ["1", "1"], proc.stdout + proc.stderr
    assert cpu_settings.cores() in (1, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------------------
# Failures: every rank stops, soon, and what is on disk stays good
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_within_seconds_and_the_checkpoint_stays_whole(tmp_path):
    mpi_or_skip()
    out = tmp_path / "m"
    job = {"stage": "vae", "out": str(out), "kwargs": {"steps": 100000, "checkpoint_every": 2}, "pids": str(tmp_path)}
    proc = run_jobs(2, [job], tmp_path, wait=False)
    ckpt = T.checkpoint_path(str(out), "vae")
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (os.path.exists(ckpt) and os.path.exists(tmp_path / "rank1.pid")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        time.sleep(1.0)  # well into the run: a few more steps and checkpoints
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert took < 10, f"the job took {took:.1f} s to stop after a rank died"
    assert "BAD TERMINATION" in output or "exited on signal" in output, output  # MPICH's, Open MPI's words
    from minisd import nn
    from minisd.models.vae import AutoencoderKL

    nn.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    saved = T.read_checkpoint(ckpt, dict(vae.named_parameters()))  # whole: it opens and matches the model
    assert saved["meta"]["step"] % 2 == 0 and saved["meta"]["step"] >= 2
    assert len(saved["losses"]) == saved["meta"]["step"] and np.isfinite(saved["losses"]).all()


@pytest.mark.slow
def test_a_rank_that_fails_alone_stops_every_rank_with_its_message(tmp_path):
    """Rank 0's disk fills at its second checkpoint: without the guard rank 1 would wait forever."""
    job = {"stage": "vae", "out": str(tmp_path / "m"), "kwargs": {"steps": 1000, "checkpoint_every": 2},
           "disk_full_at_save": 2}
    t0 = time.perf_counter()
    proc = run_jobs(2, [job], tmp_path, wait=False)
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 1, output
    assert "minisd: error on rank 0 of 2: [Errno 28] No space left on device; stopping every rank" in output
    with np.load(T.checkpoint_path(str(tmp_path / "m"), "vae")) as z:  # the first checkpoint, whole
        assert json.loads(bytes(z["meta"]))["step"] == 2
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_the_command_line_on_two_ranks_speaks_once_and_refuses_a_batch_that_does_not_split(tmp_path):
    proc = launch(2, [sys.executable, "-m", "minisd", "train", "vae", "--steps", "abc", "--out", str(tmp_path / "m")],
                  timeout=LAUNCH_TIMEOUT)  # a usage error: every rank reads the same line, one says so
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == ["minisd train: argument --steps: must be a whole number, got 'abc'"]
    proc = launch(2, [sys.executable, "-m", "minisd", "train", "vae", "--steps", "2", "--batch-size", "3",
                      "--out", str(tmp_path / "m")], timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["minisd train vae: a batch of 3 does not split evenly over 2 ranks; give a --batch-size "
                     "that is a multiple of 2"], proc.stderr
    proc = launch(2, [sys.executable, "-m", "minisd", "train", "vae", "--steps", "2", "--batch-size", "2",
                      "--no-progress", "--out", str(tmp_path / "m")], timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = [line for line in proc.stdout.splitlines() if line.startswith("minisd train vae: 2 steps")]
    assert len(said) == 1, proc.stdout  # rank 0 alone
    assert (tmp_path / "m" / "vae" / "config.json").is_file()
    with open(tmp_path / "m" / "logs" / "train_vae.json") as f:
        assert json.load(f)["stages"]["vae"]["steps"] == 2


# ---------------------------------------------------------------------------------------
# NCCL, where there are GPUs
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_nccl_all_reduce_gather_and_broadcast_on_the_gpus(tmp_path):
    mpi_or_skip()
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401

        gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, no NCCL in it, or no GPU
        pytest.skip(f"no GPU with CuPy and NCCL here ({type(e).__name__}: {e})")
    ranks = min(2, gpus)  # NCCL takes one GPU a rank
    proc = run_jobs(ranks, [{"nccl": str(tmp_path / "nccl.json")}], tmp_path)
    with open(tmp_path / "nccl.json") as f:
        result = json.load(f)
    assert result == {"kind": "nccl", "size": ranks, "mean": (ranks + 1) / 2, "gathered": list(range(ranks)),
                      "broadcast": 0.0}, proc.stdout


# ---------------------------------------------------------------------------------------
# The worker: what each rank runs, `mpiexec -n N python tests/test_distributed.py JOBS.json`
# ---------------------------------------------------------------------------------------


def worker(jobs_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    world = distributed.world()
    data = None
    for job in jobs:
        if "nccl" in job:
            nccl_check(job["nccl"])
            continue
        if "cores" in job:
            from minisd.backends import cpu_settings

            with open(os.path.join(job["cores"], f"cores{world.rank}.json"), "w") as f:
                json.dump({"threads": cpu_settings.cores(), "affinity": sorted(os.sched_getaffinity(0))}, f)
            continue
        if "pids" in job:
            with open(os.path.join(job["pids"], f"rank{world.rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        if "disk_full_at_save" in job:
            save, calls = T.save_checkpoint, []

            def failing_save(*args, **kwargs):
                calls.append(1)
                if world.rank == 0 and len(calls) == job["disk_full_at_save"]:
                    raise OSError(28, "No space left on device")
                return save(*args, **kwargs)

            T.save_checkpoint = failing_save
        data = data or tiny_data()
        with FirstGradient() as first:
            record = train(job["stage"], job["out"], data, **job.get("kwargs", {}))
        if "dump" in job:
            arrays = {f"w/{k}": v for k, v in weights(record).items()}
            if job.get("first_gradient"):
                names = [k for k, _ in record["model"].named_parameters()]
                arrays.update({f"g/{k}": g for k, g in zip(names, first.grads) if g is not None})
            if world.rank == 0:
                np.savez(job["dump"], losses=np.array(record["losses"]), **arrays)
            else:
                np.savez(f"{job['dump']}.rank{world.rank}.npz", **arrays)


def nccl_check(path: str) -> None:
    import cupy

    world = distributed.world()
    if world.size == 1:  # one GPU: the NCCL communicator of one rank, the same code
        from mpi4py import MPI

        world = distributed.NCCL(MPI.COMM_WORLD)
    buf = cupy.full(1000, world.rank + 1.0, dtype=cupy.float32)
    world.allreduce_mean_(buf)
    gathered = world.allgather(cupy.full((1, 3), float(world.rank), dtype=cupy.float32))
    b = cupy.full(7, float(world.rank), dtype=cupy.float32)
    world.broadcast_(b)
    result = {"kind": world.kind, "size": world.size, "mean": float(buf.mean()),
              "gathered": [int(v) for v in cupy.asnumpy(gathered[:, 0])], "broadcast": float(b.max())}
    if world.rank == 0:
        with open(path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    worker(sys.argv[1])
