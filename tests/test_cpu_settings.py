"""The process-wide CPU settings (minisd/backends/cpu_settings.py): made at import, each one
checked in a fresh Python (they are process-wide), with settings of the user's own left
alone, and MINISD_CPU_TUNING=0 leaving the whole process as it was."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys

import pytest

from minisd.backends import cpu_settings

_STATE = """
import os, sys, threading
import threadpoolctl

def blas_threads():  # NumPy's own BLAS (other packages may bring BLAS libraries of their own)
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]

import numpy as np
before = blas_threads()
import minisd
from minisd.backends import cpu_settings, fast_cpu
held = blas_threads()
with cpu_settings.blas_on_all_cores():
    lent = blas_threads()
x = np.random.default_rng(0).standard_normal((8, 32, 32, 32)).astype(np.float32)
y = fast_cpu.conv2d_forward(x, np.ones((32, 32, 3, 3), np.float32), None, 1, 1)  # a batch shared out, where the pool is
pool = sorted({t.name.rsplit("_", 1)[0] for t in threading.enumerate() if t.name.startswith("minisd")})
print(repr((before, held, lent, blas_threads(), os.environ.get("OPENBLAS_THREAD_TIMEOUT"), pool,
            cpu_settings.cores(), float(y.sum()))))
"""


def _state(monkeypatch, **env):
    """(BLAS threads before import minisd, after, lent, after the op, OPENBLAS_THREAD_TIMEOUT,
    minisd's thread names, cores(), a convolution's sum), from a fresh Python with ``env``."""
    pytest.importorskip("threadpoolctl")
    for name in cpu_settings.BLAS_THREAD_VARIABLES + ("OPENBLAS_THREAD_TIMEOUT", "MINISD_CPU_TUNING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = subprocess.run([sys.executable, "-c", _STATE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    state = ast.literal_eval(done.stdout.strip())
    if not state[0]:
        pytest.skip("NumPy's BLAS is not one that threadpoolctl can see here")
    return state


needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")


@needs_two_cores
def test_import_holds_the_blas_to_one_thread_and_starts_the_pool_at_first_use(monkeypatch):
    """From import on, NumPy's BLAS runs on one thread (numpy was imported first here, so
    OpenBLAS's spin time, read when it loads, is set but too late to matter: it is still
    set for child processes); blas_on_all_cores lends the BLAS its threads back a while;
    the pool's threads start with the first op shared among them."""
    before, held, lent, after, timeout, pool, cores, _ = _state(monkeypatch)
    assert min(before) > 1 and set(held) == set(after) == {1} and lent == before
    assert timeout == cpu_settings.OPENBLAS_THREAD_TIMEOUT and pool == ["minisd-cpu"] and cores == os.cpu_count()


@needs_two_cores
def test_settings_of_the_users_own_are_kept(monkeypatch):
    before, held, lent, after, timeout, *_ = _state(monkeypatch, OPENBLAS_NUM_THREADS="2", OPENBLAS_THREAD_TIMEOUT="4")
    assert held == lent == after == before and timeout == "4"


@needs_two_cores
def test_minisd_cpu_tuning_0_changes_nothing_in_the_process(monkeypatch):
    """No environment variable, the BLAS keeps its threads, no pool; the same numbers."""
    tuned = _state(monkeypatch)
    before, held, lent, after, timeout, pool, cores, total = _state(monkeypatch, MINISD_CPU_TUNING="0")
    assert held == lent == after == before and timeout is None and pool == [] and cores == 1
    assert total == pytest.approx(tuned[-1], rel=1e-6)


def test_on_all_cores_keeps_the_order_and_raises_the_first_error():
    assert cpu_settings.on_all_cores(lambda i: i * i, list(range(7))) == [i * i for i in range(7)]

    def fail(i):
        if i == 2:
            raise ValueError("item 2")
        return i

    with pytest.raises(ValueError, match="item 2"):
        cpu_settings.on_all_cores(fail, [0, 1, 2, 3])


def test_blas_on_one_thread_while_the_cores_share_a_batch():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]

    before = blas_threads()
    if not before:
        pytest.skip("NumPy's BLAS is not one that threadpoolctl can see here")
    with cpu_settings.blas_on_one_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


_FAULTS_PER_CALL = """
import resource
import numpy as np
from minisd.backends import fast_cpu
rng = np.random.default_rng(0)
q, k = rng.standard_normal((2, 32, 4, 64, 32), dtype=np.float32)
for _ in range(3):
    o, lse = fast_cpu.attention_forward(q, k, k, 0.2, False)
    fast_cpu.attention_backward(q, q, k, k, o, lse, 0.2, False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    o, lse = fast_cpu.attention_forward(q, k, k, 0.2, False)
    fast_cpu.attention_backward(q, q, k, k, o, lse, 0.2, False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_freed_memory_is_kept_so_a_loop_on_the_pool_takes_no_page_faults(monkeypatch):
    """An op in a loop, its temporaries made on the pool's threads, gets them back without
    page faults once glibc keeps freed memory (about 2,000 a call without: measured with the
    settings made here against glibc's defaults, the attention of this test)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or (os.cpu_count() or 1) < 2:
        pytest.skip("glibc's arenas, shared out over at least two cores")
    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["GLIBC_TUNABLES", "MINISD_CPU_TUNING"]:
        monkeypatch.delenv(name, raising=False)
    done = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 50


@pytest.mark.parametrize("env", [("MALLOC_TOP_PAD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.top_pad=131072")])
def test_malloc_settings_of_the_users_own_are_kept(monkeypatch, env):
    import ctypes

    monkeypatch.setenv(*env)
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *args: calls.append(args))
    assert cpu_settings.keep_freed_memory() is False and calls == []
