"""Data parallelism: N processes (ranks) train one model, each on its share of every batch.

A batch's loss is the mean of its B samples' losses, so its gradient is the mean of theirs.
Cut the batch into N shards of B / N samples, one per rank, and

    grad L = (1/B) sum_i grad l_i = (1/N) sum_r [ (N/B) sum_{i in shard r} grad l_i ]
           = the mean, over the ranks, of each rank's gradient of its own shard's mean loss.

So every rank runs forward and backward on its shard, one all-reduce sums the N gradients
(every rank receives the sum), each divides by N, and every rank then takes the same AdamW
step from the same weights with the same gradient: the N copies of the model stay identical
without a weight ever being sent. Stable Diffusion was trained this way on 256 A100s
(PyTorch's DistributedDataParallel), as llm.c trains GPT-2 (``mpirun -np 8 ./train_gpt2cu``).
It is exact, up to the order of float32 additions, wherever samples do not meet inside the
model: minisd's GroupNorm and LayerNorm normalise each sample alone (BatchNorm would not).
CLIP's loss does couple samples (each caption is scored against every image of the batch):
``gather_rows`` below gives every rank the whole batch's embeddings for it.

What an all-reduce costs: NCCL and MPI reduce large buffers round a ring. Each rank's
buffer is cut into N chunks; in N - 1 steps each rank sends one chunk to its neighbour and
adds the chunk it receives (reduce-scatter: each rank then holds one chunk summed over all
ranks), and in N - 1 more steps the summed chunks go round (all-gather). Each rank sends

    2 (N - 1) / N  x  the buffer        (1x for 2 ranks, 1.5x for 4, under 2x for any N)

so the time a step spends communicating barely grows with N: why data parallelism scales.
minisd's UNet has 0.8M parameters, 3.3 MB of float32 gradient a step; SD's 860M, 3.4 GB.

The communicator, chosen once by ``world()`` (the training loop only calls its methods):
  Single  one process: no launcher, one rank, or no mpi4py. Every collective is the
          identity, so training is exactly (bit for bit) what it is without this module.
  MPI     mpi4py between processes and machines: Allreduce on the NumPy buffers.
  NCCL    the cupy backend: cupy.cuda.nccl between GPUs, one GPU per rank (chosen by the
          rank's index among those on its machine), the all-reduce on the device arrays.
          MPI still starts the job: it carries NCCL's unique id from rank 0 to the others,
          small Python objects and barriers.

Start a run with the launcher of the MPI at hand: ``mpiexec -n 2 minisd train ...``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import numpy as np

from minisd.tensor import Function, Tensor

# The environment variables MPI launchers set in the processes they start: (size, rank).
# MPICH's and Intel MPI's hydra and Slurm's PMI-2: PMI_*; Open MPI: OMPI_COMM_WORLD_*;
# MVAPICH2: MV2_COMM_WORLD_*; Slurm's srun: SLURM_STEP_NUM_TASKS, SLURM_PROCID; other PMIx
# launchers give the rank only.
LAUNCHER_VARIABLES = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                      ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"), ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
                      (None, "PMIX_RANK"))


def launched_as() -> tuple[int | None, int] | None:
    """(size, rank) that an MPI launcher set in this process's environment, None without one.
    size is None where the launcher gives only the rank (PMIx)."""
    for size_name, rank_name in LAUNCHER_VARIABLES:
        if rank_name in os.environ:
            try:
                size = int(os.environ[size_name]) if size_name in os.environ else None
                return size, int(os.environ[rank_name])
            except ValueError:
                continue
    return None


class BatchNotDivisible(ValueError):
    """A global batch that does not split evenly over the ranks."""


def exit_status(exc: BaseException) -> int:
    """The status `minisd` exits with for this exception (as minisd.cli.main gives it)."""
    from minisd.cli import UsageError

    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 2 if isinstance(exc, UsageError) else 130 if isinstance(exc, KeyboardInterrupt) else 1


class Single:
    """One process: every collective is the identity (and costs nothing)."""

    kind = "single"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "1 process"

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n: rank r takes rows [r n/N, (r + 1) n/N)."""
        if n % self.size:
            raise BatchNotDivisible(f"a batch of {n} does not split evenly over {self.size} ranks; "
                                    f"give a --batch-size that is a multiple of {self.size}")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)

    def allreduce_mean_(self, buffer) -> None:
        """buffer <- the mean of every rank's buffer, in place."""

    def allgather(self, x):
        """Every rank's x, concatenated along axis 0 in rank order."""
        return x

    def broadcast_(self, buffer) -> None:
        """buffer <- rank 0's buffer, in place."""

    def bcast(self, obj):
        """Rank 0's obj (any picklable Python object), on every rank."""
        return obj

    def any(self, flag: bool) -> bool:
        """True on every rank if flag is true on any."""
        return bool(flag)

    def allgather_obj(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def from_root(self, fn):
        """fn() run on rank 0 alone, its result sent to every rank; an exception it raises is raised
        on every rank, so that a check made once stops all ranks alike."""
        if self.size == 1:
            return fn()
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # sent to every rank, raised there too
                error = e
        result, error = self.bcast((result, error) if self.rank == 0 else None)
        if error is not None:
            raise error
        return result

    # How long a failing rank waits for the others to fail too before it stops the job.
    AGREE_SECONDS = 5.0

    @contextlib.contextmanager
    def guard(self, quiet: bool = False):
        """Stop every rank together when one of them fails.

        Ranks wait for each other in every collective, so a rank that stopped alone (a full
        disk on rank 0, a bug, a kill) would leave the others waiting forever. A failing rank
        first waits, up to AGREE_SECONDS, for all the others to fail as well (all_fail): an
        error in the arguments or the data, a diverged run, Ctrl-C, stop every rank at the
        same point. Then each raises its error; with ``quiet``, rank 0 alone says it and the
        others exit with the same status in silence. A rank that fails alone prints its error
        in one line, naming itself, and aborts the job (MPI_Abort: the launcher ends every
        process and exits with that status)."""
        if self.size == 1:
            yield
            return
        try:
            yield
        except BaseException as e:
            if not (getattr(e, "every_rank", False) or self.all_fail()):
                message = " ".join(str(e).split("\n")) or type(e).__name__
                print(f"minisd: error on rank {self.rank} of {self.size}: {message}; stopping every rank",
                      file=sys.__stderr__, flush=True)  # the real stderr, also where command() silenced it
                self.abort(exit_status(e))
            e.every_rank = True  # an enclosing guard need not wait again
            if quiet and self.rank != 0:
                raise SystemExit(exit_status(e)) from None
            raise

    def all_fail(self) -> bool:
        """True once every rank has called this (each failed), False after AGREE_SECONDS without."""
        return True

    @contextlib.contextmanager
    def command(self):
        """A command's run on N ranks: rank 0 speaks for all. The others' stdout and stderr go
        nowhere (they would say what rank 0 says, N times over); see ``guard`` for failures."""
        if self.rank == 0:
            with self.guard(quiet=True):
                yield
            return
        with self.guard(quiet=True), open(os.devnull, "w") as null, \
                contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield

    def abort(self, status: int = 1) -> None:
        raise SystemExit(status)


class MPI(Single):
    """Ranks that talk through MPI (mpi4py): NumPy buffers, between processes and machines."""

    kind = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI as mpi

        self.mpi, self.comm = mpi, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        machine = comm.Split_type(mpi.COMM_TYPE_SHARED)  # the ranks that share this machine
        self.local_rank, self.local_size = machine.Get_rank(), machine.Get_size()
        machine.Free()
        self.machines = len(set(comm.allgather(mpi.Get_processor_name())))
        self.failures = comm.Dup()  # guard's barrier, apart from the training's collectives
        self.cores = share_cores(self.local_rank, self.local_size)

    def describe(self) -> str:
        on = f"on {self.machines} machines" if self.machines > 1 else "on 1 machine"
        return f"{self.size} ranks {on}, {self.kind.upper()}"

    def allreduce_mean_(self, buffer) -> None:
        self.comm.Allreduce(self.mpi.IN_PLACE, buffer, op=self.mpi.SUM)
        buffer /= buffer.dtype.type(self.size)

    def allgather(self, x):
        x = np.ascontiguousarray(x)
        out = np.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        self.comm.Allgather(x, out)
        return out

    def broadcast_(self, buffer) -> None:
        self.comm.Bcast(buffer, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def any(self, flag: bool) -> bool:
        return bool(self.comm.allreduce(bool(flag), op=self.mpi.LOR))

    def allgather_obj(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def all_fail(self) -> bool:
        request, deadline = self.failures.Ibarrier(), time.monotonic() + self.AGREE_SECONDS
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def abort(self, status: int = 1) -> None:
        self.comm.Abort(status)
        os._exit(status)  # MPICH's MPI_Abort may return, leaving the launcher to end the process


def share_cores(local_rank: int, local_size: int) -> list[int]:
    """Give each rank on a machine its own share of the machine's cores; returns the rank's cores.

    minisd runs one thread per core it may use (minisd.backends.cpu_settings.cores). Unbound,
    2 ranks on 2 cores would each start 2, 4 threads fighting over 2 cores; so rank i of the
    k on a machine is held (sched_setaffinity) to the i-th k-th of the cores. A launcher that
    bound the ranks already (mpiexec -bind-to core) is left as it is, as is a machine with
    fewer cores than ranks."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    allowed = sorted(os.sched_getaffinity(0))
    share = len(allowed) // local_size
    if local_size == 1 or share == 0 or len(allowed) < (os.cpu_count() or 0):
        return allowed
    mine = allowed[local_rank * share:(local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine


class NCCL(MPI):
    """GPU ranks: NCCL all-reduces the CuPy arrays on the devices; MPI starts the job.

    NCCL wants one GPU per rank: the rank with index i among the ranks of its machine
    (MPI's shared-memory split) takes GPU i. Rank 0 makes NCCL's unique id, MPI carries it
    to the others, and with it every rank joins one NCCL communicator."""

    kind = "nccl"

    def __init__(self, comm):
        super().__init__(comm)
        import cupy
        from cupy.cuda import nccl

        gpus = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > gpus:
            raise RuntimeError(
                f"{self.local_size} ranks on this machine but {gpus} GPU(s): NCCL takes one GPU per rank; "
                f"start at most {gpus} rank(s) a machine (mpiexec -n {gpus}, or -ppn {gpus} over several)")
        cupy.cuda.Device(self.local_rank).use()
        self.cupy, self.nccl = cupy, nccl
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        uid = self.bcast(nccl.get_unique_id() if self.rank == 0 else None)
        self.communicator = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _type(self, x) -> int:
        try:
            return self.types[np.dtype(x.dtype)]
        except KeyError:
            raise TypeError(f"NCCL: no collectives on {x.dtype} arrays here (float32, float64)") from None

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce_mean_(self, buffer) -> None:
        self.communicator.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self._type(buffer),
                                    self.nccl.NCCL_SUM, self._stream())
        buffer /= buffer.dtype.type(self.size)

    def allgather(self, x):
        x = self.cupy.ascontiguousarray(x)
        out = self.cupy.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        self.communicator.allGather(x.data.ptr, out.data.ptr, x.size, self._type(x), self._stream())
        return out

    def broadcast_(self, buffer) -> None:
        self.communicator.bcast(buffer.data.ptr, buffer.size, self._type(buffer), 0, self._stream())

    def abort(self, status: int = 1) -> None:
        self.communicator.abort()
        super().abort(status)


_world = None


def world():
    """This process's communicator, made on the first call (the same one after).

    Single unless an MPI launcher started more than one rank; then MPI, or NCCL on the cupy
    backend. A launch of several ranks where mpi4py is not installed is refused in one line
    (each rank would otherwise train the whole model alone, N copies of one run)."""
    global _world
    if _world is None:
        _world = connect()
    return _world


def connect():
    launched = launched_as()
    if launched is None or launched[0] == 1:
        return Single()  # no launcher, or one rank: never load MPI
    size, rank = launched
    try:
        from mpi4py import MPI as mpi
    except ImportError:
        if size is None and rank == 0:
            return Single()  # a PMIx launch names no size: this may be its only rank
        if size is not None and rank != 0:
            raise SystemExit(1) from None  # rank 0 says it for all
        raise RuntimeError(
            f"an MPI launcher started {f'{size} ranks' if size else 'several ranks'}, but mpi4py is not "
            "installed, so they cannot share the work: pip install 'minisd[dist]' (mpi4py and an MPI), "
            "or run without mpiexec") from None
    comm = mpi.COMM_WORLD
    if comm.Get_size() == 1:
        if size is None:
            return Single()
        if rank != 0:
            raise SystemExit(1)
        raise RuntimeError(
            f"the launcher started {size} ranks, but MPI sees each as alone: mpi4py uses another MPI "
            f"({mpi.Get_library_version().splitlines()[0].strip()}) than this mpiexec's; start the run "
            "with that MPI's mpiexec")
    from minisd.backends import get_backend

    return NCCL(comm) if get_backend().xp.__name__ == "cupy" else MPI(comm)


def _run_under(context: str):
    """A decorator: the function runs inside world().<context>()."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with getattr(world(), context)():
                return fn(*args, **kwargs)

        return call

    return decorate


guarded = _run_under("guard")  # on N ranks, a failure of one rank alone stops them all (fit)
command = _run_under("command")  # a command's run(args): rank 0 speaks for all ranks, and guard


def root_only(fn):
    """fn runs on rank 0 alone (on the others the call does nothing and returns None): for the
    functions that write a run's files, which rank 0 alone writes."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **kwargs) if world().rank == 0 else None

    return call


# ---------------------------------------------------------------------------------------
# What the training loop uses: the gradient all-reduce, and CLIP's all-gather
# ---------------------------------------------------------------------------------------


class FlatGradients:
    """Every parameter's gradient, and the step's loss, in one flat buffer: one all-reduce a step.

    One message of 3.3 MB (the default UNet) costs one latency; a message per parameter
    (214 of them) would cost 214. Frameworks cut the buffer into buckets (DDP: 25 MB) so that
    the all-reduce of the last layers' gradients overlaps the backward pass of the first
    ones; minisd's backward runs on the calling thread, with nothing to overlap, so one
    buffer it is. The loss rides in the last slot, so that every rank learns the global
    batch's loss (the mean of the shards' losses) in the same message; a NaN on any rank
    then reaches all of them, and they stop at the same step.
    """

    def __init__(self, params, world_):
        self.params, self.world = list(params), world_
        dtypes = {p.data.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"FlatGradients: the parameters mix dtypes {sorted(map(str, dtypes))}")
        from minisd.backends import get_array_module

        self.xp = get_array_module(self.params[0].data)
        self.sizes = [p.data.size for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.buffer = None  # allocated at the first step

    @property
    def nbytes(self) -> int:
        return (self.offsets[-1] + 1) * self.params[0].data.dtype.itemsize

    def average(self, loss: float) -> float:
        """Replace each parameter's gradient by the mean of every rank's; return the mean of every
        rank's ``loss``. Parameters without a gradient (unused in the step, on every rank alike)
        keep none, so that AdamW skips them as it does in one process."""
        if self.world.size == 1:
            return loss
        if self.buffer is None:
            self.buffer = self.xp.empty(self.offsets[-1] + 1, dtype=self.params[0].data.dtype)
        buf = self.buffer
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            if p.grad is None:
                buf[a:b] = 0
            else:
                buf[a:b] = p.grad.reshape(-1)
        buf[-1] = loss
        self.world.allreduce_mean_(buf)
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            if p.grad is not None:
                p.grad = buf[a:b].reshape(p.data.shape)  # a view: clipping scales it in place
        return float(buf[-1])

    def broadcast_weights(self) -> None:
        """Every rank's weights <- rank 0's (the start of a run: one state, whatever each rank made)."""
        if self.world.size == 1:
            return
        flat = self.xp.concatenate([p.data.reshape(-1) for p in self.params])
        self.world.broadcast_(flat)
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            p.data[...] = flat[a:b].reshape(p.data.shape)


class GatherRows(Function):
    """All-gather along the batch axis: every rank's rows, in rank order, on every rank.

    CLIP's loss scores each caption of the batch against every image of the batch, so a rank
    with only its own shard's embeddings cannot compute it. Gathered, every rank computes the
    whole batch's loss L, the same number on each, and backward hands every rank dL/d(all
    rows), the same on each; a rank keeps its own rows' part, which flows back through its own
    towers. Summed over ranks, those parts give the whole batch's gradient, but the all-reduce
    that follows takes the mean: so each rank's part is multiplied by N here. (The parameters
    used after the gather, CLIP's logit_scale, get the whole dL/dscale on every rank, whose mean
    is right as it is.) open_clip's gather_with_grad does the same with torch.distributed.
    """

    def forward(self, x, world=None):
        self.world = world
        self.rows = world.shard(world.size * x.shape[0])
        return world.allgather(x)

    def backward(self, grad):
        return grad[self.rows] * grad.dtype.type(self.world.size)


def gather_rows(x: Tensor) -> Tensor:
    """The rows of x from every rank (differentiable; see GatherRows). One rank: x itself."""
    w = world()
    return x if w.size == 1 else GatherRows.apply(x, world=w)
