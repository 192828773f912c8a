"""The CPU emulator catches what it exists to catch, and runs CUDA's built-ins as specified.

Deliberately broken kernels (tests/kernels_broken/*.cu):
- a missing __syncthreads gives the right answer in forward order and a wrong one in
  reverse order (its fixed twin is right in every order);
- a divergent barrier, a shuffle/barrier deadlock and a shuffle with an invalid width
  are reported, naming the threads and the source lines;
- an out-of-bounds write is stopped by AddressSanitizer (in a child process, since ASan
  aborts the process it runs in).
Probes (tests/kernels_broken/probes.cu): shared memory is poisoned, the four warp
shuffles with widths follow the CUDA Programming Guide's lane rules (computed here
independently), masks name the lanes that take part, __syncwarp, atomicAdd, thread and
block indices in 3-D, early exits before a barrier.
And the launch path: arguments checked against the parameter list, the build cache,
the sources found, clear errors where no compiler or GPU is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisd
from minisd.backends import BackendUnavailable, cuda_build, cuda_launch

BROKEN = Path(__file__).resolve().parent / "kernels_broken"


def line_of(name: str, text: str, nth: int = 0) -> str:
    """"file.cu:LINE" of the nth line of tests/kernels_broken/name that contains text."""
    lines = [i + 1 for i, line in enumerate((BROKEN / name).read_text().splitlines()) if text in line]
    return f"{name}:{lines[nth]}"


_programs: dict[bool, cuda_build.Program] = {}


def load(name: str) -> cuda_build.Program:
    """The test kernels (all of tests/kernels_broken, built together once); name documents which file."""
    assert (BROKEN / name).is_file()
    try:
        key = os.environ.get("MINISD_EMU_SANITIZE", "0") == "1"
        if key not in _programs:
            _programs[key] = cuda_build.load_emulated(sorted(BROKEN.glob("*.cu")))
        return _programs[key]
    except BackendUnavailable as e:
        pytest.skip(str(e))


# ------------------------------------------------------------------------------------
# what the emulator exists to catch
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", cuda_build.ORDERS)
def test_missing_syncthreads_is_exposed_by_the_reverse_order(order):
    program = load("missing_sync.cu")
    x = np.arange(1, 65, dtype=np.float32)
    expected = np.concatenate([[0.0], x[:-1]])
    with cuda_launch.settings(order=order, seed=3):
        fixed, broken = np.empty_like(x), np.empty_like(x)
        program["shift_fixed_kernel"](1, 64, (x, fixed, 64))
        program["shift_missing_sync_kernel"](1, 64, (x, broken, 64))
    np.testing.assert_array_equal(fixed, expected)
    if order == "forward":  # thread t-1 has always run before thread t: the bug hides
        np.testing.assert_array_equal(broken, expected)
    else:  # some thread reads its neighbour's slot before it is written: NaN poison
        assert np.isnan(broken).any()


def test_divergent_barrier_is_reported_with_threads_and_lines():
    program = load("divergent.cu")
    y = np.zeros(32, np.float32)
    with pytest.raises(cuda_build.KernelError) as e:
        program["divergent_barrier_kernel"](1, 32, (y,))
    message = str(e.value)
    assert "divergent __syncthreads" in message and "divergent_barrier_kernel" in message
    first, second = line_of("divergent.cu", "__syncthreads();", 0), line_of("divergent.cu", "__syncthreads();", 1)
    assert f"threads 0-15 wait at __syncthreads at {BROKEN / first}" in message
    assert f"threads 16-31 wait at __syncthreads at {BROKEN / second}" in message
    # The emulator recovers: the next launch runs normally.
    program = load("probes.cu")
    out = np.empty(64, np.float32)
    program["early_exit_kernel"](1, 64, (out,))


def test_shuffle_waiting_on_a_barrier_is_a_deadlock():
    program = load("divergent.cu")
    with pytest.raises(cuda_build.KernelError, match=r"deadlock.*threads 0-15 wait at __syncthreads.*"
                                                  r"threads 16-31 wait at a warp operation"):
        program["shuffle_deadlock_kernel"](1, 32, (np.zeros(32, np.float32),))


def _asan_runtime() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_out_of_bounds_write_is_stopped_by_address_sanitizer():
    libasan = _asan_runtime()
    if libasan is None:
        pytest.skip("no AddressSanitizer runtime (libasan) for this compiler")
    script = (
        "import numpy as np; from minisd.backends import cuda_build\n"
        f"p = cuda_build.load_emulated([{str(BROKEN / 'out_of_bounds.cu')!r}], sanitize=True)\n"
        "y = np.zeros(100, np.float32)\n"
        "p['fill_unguarded_kernel'](4, 32, (y, 100))\n"  # 128 threads for 100 elements
        "print('no error')\n")
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(Path(cuda_build.__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout + result.stderr
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-2000:]
    assert line_of("out_of_bounds.cu", "y[i] = 1.0f;") in result.stderr  # the report points at the faulty line


# ------------------------------------------------------------------------------------
# CUDA's built-ins, as specified
# ------------------------------------------------------------------------------------


def test_shared_memory_is_poisoned_before_each_block():
    program = load("probes.cu")
    for order in cuda_build.ORDERS:
        y = np.zeros(3 * 2 * 64, np.float32)
        with cuda_launch.settings(order=order, seed=2):
            program["read_unwritten_shared_kernel"](3, 64, (y,), 64 * 4)
        assert np.isnan(y).all(), order


def _shuffles_expected(x, src, delta, width):
    """The CUDA Programming Guide's source lanes, lane by lane, for segments of `width`."""
    out = np.empty((4, x.size), np.float32)
    for t in range(x.size):
        warp, lane = divmod(t, 32)
        seg = lane // width * width  # first lane of this lane's segment
        at = lambda s: x[warp * 32 + s]  # noqa: E731
        out[0, t] = at(seg + src % width)
        s = lane ^ delta
        out[1, t] = x[t] if s // width > lane // width else at(s)
        s = lane + delta
        out[2, t] = x[t] if s >= seg + width else at(s)
        s = lane - delta
        out[3, t] = x[t] if s < seg else at(s)
    return out


@pytest.mark.parametrize("width", [32, 16, 8, 4])
@pytest.mark.parametrize("src,delta", [(0, 1), (5, 3), (31, 8)])
def test_shuffles_follow_the_lane_rules(width, src, delta):
    program = load("probes.cu")
    x = np.arange(100, 164, dtype=np.float32)
    out = np.empty(4 * 64, np.float32)
    program["shuffles_kernel"](1, 64, (x, out, src, delta, width))
    np.testing.assert_array_equal(out.reshape(4, 64), _shuffles_expected(x, src, delta, width))


def test_atomic_add_sums_over_all_blocks():
    program = load("probes.cu")
    x = np.random.default_rng(0).integers(-5, 6, 300).astype(np.float32)
    total = np.zeros(1, np.float32)
    program["atomic_sum_kernel"](5, 64, (x, total, 300))
    assert total[0] == x.sum()


@pytest.mark.parametrize("order", cuda_build.ORDERS)
def test_thread_and_block_indices_in_three_dimensions(order):
    program = load("probes.cu")
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full(12 * 12 * 24, -1, np.float32)
    with cuda_launch.settings(order=order, seed=1):
        program["indices_kernel"](grid, block, (out,))
    rows = out.reshape(12, 24, 12)
    for b in range(12):
        bx, by, bz = b % 3, b // 3 % 2, b // 6
        for t in range(24):
            tx, ty, tz = t % 4, t // 4 % 3, t // 12
            assert list(rows[b, t]) == [tx, ty, tz, bx, by, bz, *block, *grid]


def test_barrier_waits_only_for_threads_still_running():
    program = load("probes.cu")
    y = np.full(64, -1, np.float32)
    program["early_exit_kernel"](1, 64, (y,))
    np.testing.assert_array_equal(y[:40], np.arange(39, -1, -1))
    assert (y[40:] == -1).all()


@pytest.mark.parametrize("order", cuda_build.ORDERS)
def test_syncwarp_orders_the_lanes_of_a_warp(order):
    program = load("probes.cu")
    x, y = np.arange(64, dtype=np.float32), np.empty(64, np.float32)
    with cuda_launch.settings(order=order, seed=5):
        program["warp_swap_kernel"](1, 64, (x, y))
    np.testing.assert_array_equal(y, np.arange(64) ^ 1)


def test_shuffle_mask_names_the_lanes_that_take_part():
    program = load("probes.cu")
    x, y = np.arange(64, dtype=np.float32), np.empty(64, np.float32)
    program["half_warp_shuffle_kernel"](1, 64, (x, y))
    lanes = np.arange(64)
    np.testing.assert_array_equal(y, np.where(lanes % 32 < 16, lanes ^ 1, lanes))


def test_invalid_shuffle_width_is_reported():
    program = load("bad_shuffle.cu")
    x, y = np.zeros(32, np.float32), np.zeros(32, np.float32)
    with pytest.raises(cuda_build.KernelError, match=r"width must be a power of 2.*bad_shuffle.cu:6"):
        program["shuffle_bad_width_kernel"](1, 32, (x, y, 12))
    program["shuffle_bad_width_kernel"](1, 32, (x, y, 8))  # a valid width runs


def test_random_order_depends_on_the_seed():
    program = load("missing_sync.cu")
    x = np.arange(1, 257, dtype=np.float32)
    results = []
    for seed in (1, 2):
        y = np.empty_like(x)
        with cuda_launch.settings(order="random", seed=seed):
            program["shift_missing_sync_kernel"](1, 256, (x, y, 256))
        results.append(np.isnan(y))
    assert (results[0] != results[1]).any()


# ------------------------------------------------------------------------------------
# the launch path
# ------------------------------------------------------------------------------------


def test_arguments_are_checked_against_the_parameter_list():
    program = load("missing_sync.cu")
    kernel = program["shift_fixed_kernel"]
    x, y = np.zeros(32, np.float32), np.zeros(32, np.float32)
    with pytest.raises(TypeError, match=r"argument 0 \(const float \*x\) must be a C-contiguous float32 array, "
                                        r"got float64"):
        kernel(1, 32, (x.astype(np.float64), y, 32))
    with pytest.raises(TypeError, match=r"not contiguous"):
        kernel(1, 16, (np.zeros(64, np.float32)[::2], y, 32))
    with pytest.raises(TypeError, match=r"argument 2 \(int n\) must be an int, got float"):
        kernel(1, 32, (x, y, 32.0))
    with pytest.raises(TypeError, match="does not fit in a 32-bit int"):
        kernel(1, 32, (x, y, 2**31))
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        kernel(1, 32, (x, y))
    with pytest.raises(TypeError, match="must be a numpy array, got list"):
        kernel(1, 32, ([0.0] * 32, y, 32))
    frozen = y.copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match=r"argument 1 \(float \*y\) is written by the kernel, "
                                        r"but the array is read-only"):
        kernel(1, 32, (x, frozen, 32))
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        program["nope"]


def test_launch_limits_are_those_of_a_gpu():
    program = load("probes.cu")
    with pytest.raises(cuda_build.KernelError, match="1025 threads"):
        program["early_exit_kernel"](1, 1025, (np.zeros(2048, np.float32),))
    with pytest.raises(ValueError, match="dynamic shared memory"):
        program["read_unwritten_shared_kernel"](1, 64, (np.zeros(128, np.float32),), 64 * 1024)  # > 48 KiB


def test_parse_kernels_reads_parameter_lists():
    source = 'extern "C" __global__ void __launch_bounds__(256) k(const float *__restrict__ a, int n, float s) {}'
    params = cuda_build.parse_kernels(source)["k"]
    assert [(p.name, p.kind) for p in params] == [("a", "float*"), ("n", "int"), ("s", "float")]
    with pytest.raises(ValueError, match="unsupported parameter"):
        cuda_build.parse_kernels('extern "C" __global__ void k(double x) {}', "bad.cu")


def test_build_cache_rebuilds_when_a_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "probe.cu"
    source.write_text((BROKEN / "missing_sync.cu").read_text())
    try:
        first = cuda_build.build_emulator([source])
    except BackendUnavailable as e:
        pytest.skip(str(e))
    assert first.is_relative_to(tmp_path / "cache" / "minisd")
    mtime = first.stat().st_mtime_ns
    assert cuda_build.build_emulator([source]) == first and first.stat().st_mtime_ns == mtime  # cached
    source.write_text(source.read_text() + "\n// an edit\n")
    assert cuda_build.build_emulator([source]) != first


def test_cupy_source_carries_its_headers_inline():
    # CuPy caches by source text: the header must be part of it, or edits to it go unseen.
    text = cuda_build.inline_includes(cuda_build.source_dir() / "group_norm.cu")
    assert "#include" not in text and "#pragma once" not in text
    assert "float block_sum(" in text and text.index("float block_sum(") < text.index("group_norm_forward_kernel2")


def test_build_cache_keeps_only_the_newest_libraries(tmp_path):
    for i in range(5):
        lib = tmp_path / f"kernels-{i}.so"
        lib.write_bytes(b"")
        os.utime(lib, (i, i))
    cuda_build._trim_cache(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-3.so", "kernels-4.so"]


def test_the_sources_are_found():
    root = cuda_build.source_dir()
    for name in cuda_build.KERNEL_FILES + ("common.cuh", "emulator.h"):
        assert (root / name).is_file()


def test_emulated_backend_says_when_there_is_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-g++")
    monkeypatch.setattr(cuda_build, "_programs", {})
    with pytest.raises(BackendUnavailable, match="needs a C\\+\\+ compiler; 'no-such-compiler-g\\+\\+' was not found"):
        minisd.set_backend("emulated")


def test_cupy_backend_says_why_it_is_unavailable():
    try:
        import cupy  # noqa: F401

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    with pytest.raises(BackendUnavailable, match="cupy backend needs"):
        minisd.set_backend("cupy")
