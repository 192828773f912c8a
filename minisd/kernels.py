"""The hand-written CUDA kernels in kernels/*.cu, on a GPU through CuPy or on a CPU through the emulator.

The same source files run two ways:

    runtime    compiled by                          launched by
    --------   ----------------------------------   ------------------------------------
    cupy       NVRTC, through cupy.RawModule         RawModule.get_function(name)(grid, block, args)
    emulated   g++, against kernels/emulator.h      ctypes, into the emulator's launch function

and both launch with the very same description, ``kernel(grid, block, args, shared_mem)``,
computed once below for each op and each kernel version. Neither runtime checks the
arguments (CuPy sends a Python int as a 64-bit integer and a float as a double, whatever
the kernel expects), so ``Kernel.__call__`` checks them against the parameter list parsed
from the .cu source: a float32 C-contiguous array for ``float *``, an int for ``int``, a
float for ``float``.

The emulator library is built once per set of sources and flags and cached under
$XDG_CACHE_HOME/minisd (else ~/.cache/minisd), named by a hash of the sources, the
header and the flags, so that editing a .cu rebuilds it.

Settings (module level, also read from the environment at import):
    MINISD_KERNEL_VERSION  1 (simple) or 2 (fast, the default): which version of each kernel runs
    MINISD_EMU_ORDER       forward (default), reverse or random: the emulator's thread order
    MINISD_EMU_SANITIZE    1: build the emulator with AddressSanitizer and UBSan (needs
                           LD_PRELOAD=$(g++ -print-file-name=libasan.so) before Python starts)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minisd.backend import Backend, BackendUnavailable

KERNEL_FILES = ("conv2d.cu", "group_norm.cu", "attention.cu")
VERSIONS = (1, 2)
ORDERS = ("forward", "reverse", "random")
MAX_SHARED_BYTES = 48 * 1024  # dynamic shared memory a kernel may use without an opt-in
CONV_TILE = 64  # the output tile of conv2d.cu's version 2 (its TILE), which sets the grid


class KernelError(RuntimeError):
    """A kernel launch failed (on the emulator: a deadlock, a divergent barrier, a bad launch)."""


# ------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------


def _env_version() -> int:
    value = os.environ.get("MINISD_KERNEL_VERSION", "2")
    if value not in ("1", "2"):
        raise ValueError(f"MINISD_KERNEL_VERSION must be 1 or 2, not {value!r}")
    return int(value)


# The current settings; change them with set_version / set_run_order / settings().
current_version = _env_version()
current_order = os.environ.get("MINISD_EMU_ORDER", "forward")
current_seed = 0
if current_order not in ORDERS:
    raise ValueError(f"MINISD_EMU_ORDER must be one of {', '.join(ORDERS)}, not {current_order!r}")


def set_version(version: int) -> None:
    """Run kernel version ``version`` (1: simple, 2: fast) from now on."""
    global current_version
    if version not in VERSIONS:
        raise ValueError(f"kernel version must be one of {VERSIONS}, not {version!r}")
    current_version = version


def set_run_order(order: str, seed: int = 0) -> None:
    """The emulator's order of threads and blocks: "forward", "reverse" or "random" (seeded)."""
    global current_order, current_seed
    if order not in ORDERS:
        raise ValueError(f"run order must be one of {ORDERS}, not {order!r}")
    current_order, current_seed = order, int(seed)


@contextlib.contextmanager
def settings(version: int | None = None, order: str | None = None, seed: int = 0):
    """Temporarily use another kernel version and/or emulator run order (tests use this)."""
    saved = (current_version, current_order, current_seed)
    try:
        if version is not None:
            set_version(version)
        if order is not None:
            set_run_order(order, seed)
        yield
    finally:
        set_version(saved[0])
        set_run_order(saved[1], saved[2])


# ------------------------------------------------------------------------------------
# finding and reading the sources
# ------------------------------------------------------------------------------------


def source_dir() -> Path:
    """kernels/ of a checkout, or the copy an installed package carries as minisd/_cuda."""
    checkout = Path(__file__).resolve().parent.parent / "kernels"
    if (checkout / "emulator.h").is_file():
        return checkout
    import importlib.util

    # minisd/_cuda has no __init__.py (it is the kernels/ folder): a namespace package.
    spec = importlib.util.find_spec("minisd._cuda")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "emulator.h").is_file():
            return Path(folder)
    raise FileNotFoundError(f"the CUDA kernel sources are missing: neither {checkout} nor an installed "
                            "minisd/_cuda holds emulator.h")


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its C declaration, name, and kind ("float*", "int" or "float")."""

    decl: str
    name: str
    kind: str


# extern "C" __global__ void [__launch_bounds__(...)] name(params) {
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_DYNAMIC_SHARED_RE = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;")


def parse_kernels(source: str, filename: str = "<source>") -> dict[str, list[Param]]:
    """Every ``extern "C" __global__`` kernel in ``source`` with its parameter list."""
    kernels = {}
    for match in _KERNEL_RE.finditer(source):
        name, params = match.group(1), []
        for decl in (p.strip() for p in match.group(2).split(",") if p.strip()):
            words = decl.replace("*", " * ").split()
            pointer, base = "*" in words, [w for w in words if w in ("float", "int")]
            if len(base) != 1 or words[-1] in ("*", "float", "int"):
                raise ValueError(f"{filename}: kernel {name}: unsupported parameter {decl!r} "
                                 "(use float *, int or float)")
            kind = "float*" if pointer and base == ["float"] else base[0]
            if pointer and base != ["float"]:
                raise ValueError(f"{filename}: kernel {name}: only float pointers are supported, not {decl!r}")
            params.append(Param(decl, words[-1], kind))
        kernels[name] = params
    return kernels


# ------------------------------------------------------------------------------------
# the launch path shared by both runtimes
# ------------------------------------------------------------------------------------


def _dim3(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(d) < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive sizes, not {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class Kernel:
    """A kernel of a loaded program: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, name: str, params: list[Param], launch, array_type):
        self.name, self.params = name, params
        self._launch, self._array_type = launch, array_type

    def __repr__(self):
        return f"<Kernel {self.name}({', '.join(p.decl for p in self.params)})>"

    def check_args(self, args) -> list:
        """args converted to exactly the kernel's C types (np.int32, np.float32, arrays), or TypeError."""
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        out = []
        for i, (param, arg) in enumerate(zip(self.params, args)):
            where = f"kernel {self.name}: argument {i} ({param.decl})"
            if param.kind == "float*":
                if arg is None:
                    out.append(None)
                    continue
                if not isinstance(arg, self._array_type):
                    raise TypeError(f"{where} must be a {self._array_type.__module__.split('.')[0]} array, "
                                    f"got {type(arg).__name__}")
                if "const" not in param.decl.split() and not getattr(arg.flags, "writeable", True):
                    raise TypeError(f"{where} is written by the kernel, but the array is read-only")
                if arg.dtype != np.float32 or not arg.flags.c_contiguous:
                    raise TypeError(f"{where} must be a C-contiguous float32 array, got "
                                    f"{arg.dtype}{'' if arg.flags.c_contiguous else ' (not contiguous)'}")
                out.append(arg)
            elif param.kind == "int":
                if isinstance(arg, (bool, np.bool_)) or not isinstance(arg, (int, np.integer)):
                    raise TypeError(f"{where} must be an int, got {type(arg).__name__}")
                if not -(2**31) <= int(arg) < 2**31:
                    raise TypeError(f"{where}: {arg} does not fit in a 32-bit int")
                out.append(np.int32(arg))
            else:
                if not isinstance(arg, (int, float, np.integer, np.floating)) or isinstance(arg, bool):
                    raise TypeError(f"{where} must be a float, got {type(arg).__name__}")
                out.append(np.float32(arg))
        return out

    def __call__(self, grid, block, args, shared_mem: int = 0):
        grid, block = _dim3(grid, f"{self.name}: grid"), _dim3(block, f"{self.name}: block")
        if not 0 <= shared_mem <= MAX_SHARED_BYTES:
            raise ValueError(f"kernel {self.name}: {shared_mem} bytes of dynamic shared memory; "
                             f"at most {MAX_SHARED_BYTES}")
        self._launch(grid, block, self.check_args(args), int(shared_mem))


class Program:
    """The kernels of some .cu files, compiled for one runtime: ``program["name"]`` is a Kernel."""

    def __init__(self, kernels: dict[str, Kernel]):
        self.kernels = kernels

    def __getitem__(self, name: str) -> Kernel:
        try:
            return self.kernels[name]
        except KeyError:
            raise KeyError(f"no kernel named {name!r}; have {', '.join(sorted(self.kernels))}") from None


# ------------------------------------------------------------------------------------
# the emulator: g++, a cached shared library, ctypes
# ------------------------------------------------------------------------------------

_CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-U_FORTIFY_SOURCE", "-w"]
# -U_FORTIFY_SOURCE: the fortified longjmp refuses to jump between stacks, which is what fibers do.
_SANITIZE_FLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-U_FORTIFY_SOURCE", "-w", "-fno-omit-frame-pointer",
                   "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME/minisd/emulator (else ~/.cache/...), or a per-user temp folder if that is not writable."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(root) / "minisd" / "emulator"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"minisd-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "emulator"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BackendUnavailable(f"the emulated backend needs a C++ compiler; {cxx!r} was not found (set CXX)")
    return cxx


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    """The first line of ``cxx --version``: part of the cache key, so an upgraded compiler rebuilds."""
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]


def _translation_unit(path: Path, kernels: dict[str, list[Param]], first: bool) -> str:
    """The .cu file as C++ for the emulator: the header first, dynamic shared memory
    declarations rewritten (C++ has no ``extern __shared__``), then one launch function per kernel."""
    source = _DYNAMIC_SHARED_RE.sub(r"EMU_DYNAMIC_SHARED(\1, \2);", path.read_text())
    lines = ["#define EMU_DEFINE_CONTROLS" if first else "", '#include "emulator.h"',
             f'#line 1 "{path}"', source, "", "// ---- launch functions (generated by minisd/kernels.py)"]
    for name, params in kernels.items():
        decls = "".join(f", {p.decl}" for p in params)
        names = ", ".join(p.name for p in params)
        lines.append(
            f'extern "C" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f"unsigned by, unsigned bz, size_t shared{decls}) {{\n"
            f'    return emu::launch("{name}", dim3(gx, gy, gz), dim3(bx, by, bz), shared, '
            f"[=] {{ {name}({names}); }});\n}}")
    return "\n".join(lines) + "\n"


def build_emulator(sources, sanitize: bool = False) -> Path:
    """Compile ``sources`` (.cu paths) with the emulator into a shared library; return its path (cached)."""
    sources = [Path(s).resolve() for s in sources]
    header_dir = source_dir()
    flags = _SANITIZE_FLAGS if sanitize else _CXX_FLAGS
    cxx = _compiler()
    digest = hashlib.sha256(" ".join([cxx, _compiler_version(cxx)] + flags).encode())
    for path in [header_dir / "emulator.h", header_dir / "common.cuh"] + sources:
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    for path in sorted({p.parent for p in sources} - {header_dir}):  # headers beside other sources
        for header in sorted(path.glob("*.cuh")):
            digest.update(header.read_bytes())
    library = _cache_dir() / f"kernels-{digest.hexdigest()[:20]}{'-asan' if sanitize else ''}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        objects, jobs = [], []
        for i, path in enumerate(sources):
            kernels = parse_kernels(path.read_text(), path.name)
            unit = Path(tmp) / f"{i}_{path.stem}.cpp"
            unit.write_text(_translation_unit(path, kernels, first=(i == 0)))
            objects.append(unit.with_suffix(".o"))
            cmd = [cxx, *flags, "-I", str(header_dir), "-I", str(path.parent), "-c", str(unit), "-o", str(objects[-1])]
            jobs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))  # in parallel
        for cmd, job in jobs:
            _, err = job.communicate()
            if job.returncode:
                raise KernelError(f"compiling the emulator failed: {' '.join(cmd)}\n{err}")
        tmp_lib = Path(tmp) / "lib.so"
        cmd = [cxx, *flags, "-shared", *map(str, objects), "-o", str(tmp_lib)]
        result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if result.returncode:
            raise KernelError(f"linking the emulator failed: {' '.join(cmd)}\n{result.stderr}")
        os.replace(tmp_lib, library)  # atomic: a concurrent build simply wins or loses
    _trim_cache(library.parent)
    return library


def _trim_cache(folder: Path, keep: int = 24) -> None:
    """Delete all but the ``keep`` newest libraries: every edit of a .cu adds one.
    (A library still loaded by some process stays usable: Linux keeps a deleted file's data.)"""
    try:
        libraries = sorted(folder.glob("kernels-*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in libraries[keep:]:
            old.unlink(missing_ok=True)
    except OSError:  # another process trimming at the same time: its work, not an error
        pass


def _asan_preloaded() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


# ctypes lets go of the GIL during a call, and an emulator library's runtime is one set of
# globals: one launch at a time.
_emulator_lock = threading.Lock()
_CTYPE = {"float*": ctypes.c_void_p, "int": ctypes.c_int, "float": ctypes.c_float}


def load_emulated(sources, sanitize: bool | None = None) -> Program:
    """``sources`` compiled for the emulator (the sanitizer build if MINISD_EMU_SANITIZE=1)."""
    if sanitize is None:
        sanitize = os.environ.get("MINISD_EMU_SANITIZE", "0") == "1"
    if sanitize and not _asan_preloaded():
        raise BackendUnavailable("the sanitizer build of the emulator must be loaded into a Python started "
                                 "with LD_PRELOAD=$(g++ -print-file-name=libasan.so)")
    lib = ctypes.CDLL(str(build_emulator(sources, sanitize)))
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_set_order.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
    applied = [None]  # the (order, seed) the library was last told

    def launcher(name, params):
        fn = getattr(lib, f"emu_launch_{name}")
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t] + [_CTYPE[p.kind] for p in params]
        fn.restype = ctypes.c_int

        def launch(grid, block, args, shared_mem):
            raw = [None if a is None else a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
            with _emulator_lock:
                if applied[0] != (current_order, current_seed):
                    lib.emu_set_order(ORDERS.index(current_order), current_seed)
                    applied[0] = (current_order, current_seed)
                if fn(*grid, *block, shared_mem, *raw) != 0:
                    raise KernelError(lib.emu_last_error().decode())

        return launch

    kernels = {}
    for path in sources:
        for name, params in parse_kernels(Path(path).read_text(), Path(path).name).items():
            kernels[name] = Kernel(name, params, launcher(name, params), np.ndarray)
    return Program(kernels)


# ------------------------------------------------------------------------------------
# CuPy: NVRTC and cupy.RawModule
# ------------------------------------------------------------------------------------


def _cupy():
    try:
        import cupy
    except ImportError:
        raise BackendUnavailable("the cupy backend needs CuPy (pip install cupy-cuda12x)") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        raise BackendUnavailable(f"the cupy backend needs an NVIDIA GPU; CUDA reports: {e}") from None
    if count < 1:
        raise BackendUnavailable("the cupy backend needs an NVIDIA GPU; none was found")
    return cupy


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def _inline_includes(path: Path) -> str:
    """The source with its local ``#include "x.cuh"`` lines replaced by the files' text.

    CuPy caches compiled modules by the source text and options alone, so a change to an
    included header would otherwise not reach an already cached kernel."""
    def include(match):
        for folder in (path.parent, source_dir()):
            if (folder / match.group(1)).is_file():
                return _inline_includes(folder / match.group(1)).replace("#pragma once", "")
        raise FileNotFoundError(f"{path.name}: cannot find included file {match.group(1)!r}")

    return _INCLUDE_RE.sub(include, path.read_text())


def load_cupy(sources) -> Program:
    """``sources`` compiled by NVRTC, one cupy.RawModule per file."""
    cupy = _cupy()
    kernels = {}
    for path in map(Path, sources):
        text = _inline_includes(path)
        module = cupy.RawModule(code=text, options=("--std=c++17",))
        for name, params in parse_kernels(text, path.name).items():
            function = module.get_function(name)

            def launch(grid, block, args, shared_mem, function=function):
                # A null pointer goes as an 8-byte zero, which is what the kernel sees as nullptr.
                function(grid, block, tuple(np.uint64(0) if a is None else a for a in args), shared_mem=shared_mem)

            kernels[name] = Kernel(name, params, launch, cupy.ndarray)
    return Program(kernels)


_programs: dict[tuple[str, bool], Program] = {}


def program(runtime: str) -> Program:
    """The kernels of KERNEL_FILES on ``runtime`` ("emulated" or "cupy"), loaded once."""
    sanitize = runtime == "emulated" and os.environ.get("MINISD_EMU_SANITIZE", "0") == "1"
    key = (runtime, sanitize)
    if key not in _programs:
        sources = [source_dir() / f for f in KERNEL_FILES]
        if runtime == "emulated":
            _compiler()
            _programs[key] = load_emulated(sources, sanitize)
        elif runtime == "cupy":
            _programs[key] = load_cupy(sources)
        else:
            raise ValueError(f"unknown kernel runtime {runtime!r}; choose 'emulated' or 'cupy'")
    return _programs[key]


# ------------------------------------------------------------------------------------
# the six ops: shapes checked, outputs allocated, grid/block/shared memory computed
# ------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flash_tiles(d: int, shared_floats) -> tuple[int, int, int]:
    """(threads, tile, shared bytes) for a flash kernel: the largest tiles that fit in 48 KiB.

    A block has ``threads`` rows (one per thread) and walks the other side in tiles of ``tile``
    rows; ``shared_floats(threads, tile)`` is the layout in the kernel's head comment."""
    for threads, tile in ((64, 32), (32, 32), (32, 16), (32, 8), (16, 16), (16, 8), (8, 8)):
        if 4 * shared_floats(threads, tile) <= MAX_SHARED_BYTES:
            return threads, tile, 4 * shared_floats(threads, tile)
    raise ValueError(f"attention head dims around {d} are too large for the flash kernels' 48 KiB of shared "
                     "memory; kernel version 1 (MINISD_KERNEL_VERSION=1) has no such limit")


def _reduce_threads(m: int) -> int:
    """Threads for a block that reduces m values: about 4 values each, one warp to 256 threads."""
    return min(256, max(32, 32 * _cdiv(_cdiv(m, 4), 32)))


class KernelOps:
    """The six raw-array functions of minisd/backend.py, computed by the kernels on one runtime."""

    def __init__(self, runtime: str):
        self.runtime = runtime
        self.program = program(runtime)
        self.xp = _cupy() if runtime == "cupy" else np

    def _f32(self, a):
        """A C-contiguous float32 array on this runtime (a copy only where needed); None stays None."""
        return None if a is None else self.xp.ascontiguousarray(self.xp.asarray(a, dtype=self.xp.float32))

    def _launch(self, kernel: str, grid, block, args, shared_mem: int = 0):
        """Launch ``kernel``; a grid with no blocks (an empty batch) has nothing to compute."""
        if all(g > 0 for g in np.atleast_1d(grid)):
            self.program[kernel](grid, block, args, shared_mem)

    def _run(self, name: str, grid, block, args, shared_mem: int = 0):
        """Launch the current version of kernel ``name``: ``{name}_kernel{version}``."""
        self._launch(f"{name}_kernel{current_version}", grid, block, args, shared_mem)

    # ---- conv2d ----------------------------------------------------------------------

    def _conv_shape(self, x, w, stride, padding, what):
        if x.ndim != 4 or w.ndim != 4:
            raise ValueError(f"{what}: x and w must be 4-D (N, C, H, W) and (K, C, R, S), got {x.shape} and {w.shape}")
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"{what}: x has {x.shape[1]} channels but w expects {w.shape[1]}")
        if not (isinstance(stride, (int, np.integer)) and stride >= 1 and isinstance(padding, (int, np.integer))
                and padding >= 0):
            raise ValueError(f"{what}: stride must be an int >= 1 and padding an int >= 0, got {stride!r}, {padding!r}")
        N, C, H, W = x.shape
        K, _, R, S = w.shape
        P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1
        if P < 1 or Q < 1:
            raise ValueError(f"{what}: a {R}x{S} kernel does not fit a {H}x{W} input with padding {padding}")
        return N, C, H, W, K, R, S, P, Q

    def conv2d_forward(self, x, w, b, stride, padding):
        x, w, b = self._f32(x), self._f32(w), self._f32(b)
        N, C, H, W, K, R, S, P, Q = dims = self._conv_shape(x, w, stride, padding, "conv2d")
        if b is not None and b.shape != (K,):
            raise ValueError(f"conv2d: bias must have shape ({K},), got {b.shape}")
        y = self.xp.empty((N, K, P, Q), dtype=self.xp.float32)
        args = (x, w, b, y, *dims, stride, padding)
        if current_version == 1:
            self._run("conv2d_forward", _cdiv(y.size, 256), 256, args)
        else:
            self._run("conv2d_forward", (_cdiv(K, CONV_TILE), _cdiv(N * P * Q, CONV_TILE)), 256, args)
        return y

    def conv2d_backward(self, dy, x, w, stride, padding, need_dx=True, need_dw=True, need_db=True):
        dy, x, w = self._f32(dy), self._f32(x), self._f32(w)
        N, C, H, W, K, R, S, P, Q = dims = self._conv_shape(x, w, stride, padding, "conv2d backward")
        if dy.shape != (N, K, P, Q):
            raise ValueError(f"conv2d backward: dy must have shape {(N, K, P, Q)}, got {dy.shape}")
        dx = dw = db = None
        if need_dx:
            dx = self.xp.empty(x.shape, dtype=self.xp.float32)
            grid = _cdiv(dx.size, 256) if current_version == 1 else (_cdiv(C, CONV_TILE), _cdiv(N * H * W, CONV_TILE))
            self._run("conv2d_backward_input", grid, 256, (dy, w, dx, *dims, stride, padding))
        if need_dw:
            dw = self.xp.empty(w.shape, dtype=self.xp.float32)
            grid = _cdiv(dw.size, 256) if current_version == 1 else (_cdiv(C * R * S, CONV_TILE), _cdiv(K, CONV_TILE))
            self._run("conv2d_backward_weight", grid, 256, (dy, x, dw, *dims, stride, padding))
        if need_db:
            db = self.xp.empty((K,), dtype=self.xp.float32)
            if current_version == 1:
                self._run("conv2d_backward_bias", _cdiv(K, 64), 64, (dy, db, N, K, P, Q))
            else:
                self._run("conv2d_backward_bias", K, _reduce_threads(N * P * Q), (dy, db, N, K, P, Q))
        return dx, dw, db

    # ---- group norm ------------------------------------------------------------------

    def _gn_shape(self, x, num_groups, what):
        if x.ndim < 2:
            raise ValueError(f"{what}: x must be (N, C, ...), got shape {x.shape}")
        N, C = x.shape[:2]
        if not isinstance(num_groups, (int, np.integer)) or num_groups < 1 or C % num_groups:
            raise ValueError(f"{what}: {C} channels cannot be split into {num_groups!r} groups")
        return N, C, math.prod(x.shape[2:]), int(num_groups)

    def group_norm_forward(self, x, num_groups, weight, bias, eps):
        x, weight, bias = self._f32(x), self._f32(weight), self._f32(bias)
        N, C, HW, G = self._gn_shape(x, num_groups, "group_norm")
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != (C,):
                raise ValueError(f"group_norm: {name} must have shape ({C},), got {p.shape}")
        y = self.xp.empty(x.shape, dtype=self.xp.float32)
        mean = self.xp.empty((N, G), dtype=self.xp.float32)
        rstd = self.xp.empty((N, G), dtype=self.xp.float32)
        args = (x, weight, bias, y, mean, rstd, N, C, HW, G, float(eps))
        if current_version == 1:
            self._run("group_norm_forward", _cdiv(N * G, 64), 64, args)
        else:
            self._run("group_norm_forward", N * G, _reduce_threads(C // G * HW), args)
        return y, mean, rstd

    def group_norm_backward(self, dy, x, num_groups, weight, mean, rstd):
        dy, x, weight = self._f32(dy), self._f32(x), self._f32(weight)
        mean, rstd = self._f32(mean), self._f32(rstd)
        N, C, HW, G = self._gn_shape(x, num_groups, "group_norm backward")
        if dy.shape != x.shape or mean.shape != (N, G) or rstd.shape != (N, G):
            raise ValueError(f"group_norm backward: dy must have x's shape {x.shape} and mean, rstd ({N}, {G}); "
                             f"got {dy.shape}, {mean.shape}, {rstd.shape}")
        dx = self.xp.empty(x.shape, dtype=self.xp.float32)
        if current_version == 1:
            self._run("group_norm_backward_input", _cdiv(N * G, 64), 64,
                      (dy, x, weight, mean, rstd, dx, N, C, HW, G))
        else:
            self._run("group_norm_backward_input", N * G, _reduce_threads(C // G * HW),
                      (dy, x, weight, mean, rstd, dx, N, C, HW, G))
        if weight is None:  # as in the reference: no affine parameters, no gradients for them
            return dx, None, None
        dweight = self.xp.empty((C,), dtype=self.xp.float32)
        dbias = self.xp.empty((C,), dtype=self.xp.float32)
        args = (dy, x, mean, rstd, dweight, dbias, N, C, HW, G)
        if current_version == 1:
            self._run("group_norm_backward_params", _cdiv(C, 64), 64, args)
        else:
            self._run("group_norm_backward_params", C, _reduce_threads(N * HW), args)
        return dx, dweight, dbias

    # ---- attention -------------------------------------------------------------------

    def _attn_shape(self, q, k, v, what):
        """(B, heads, Lq, Lk, d, d_v) for q (B, heads, Lq, d), k (B, heads, Lk, d), v (B, heads, Lk, d_v)."""
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"{what}: q, k, v must be 4-D (B, heads, L, d), got {q.shape}, {k.shape}, {v.shape}")
        B, H, Lq, d = q.shape
        if k.shape[:2] != (B, H) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"{what}: k must be (B, heads, Lk, d) = ({B}, {H}, Lk, {d}) and v (B, heads, Lk, d_v); "
                             f"got {k.shape} and {v.shape}")
        if Lq < 1 or k.shape[2] < 1 or d < 1 or v.shape[3] < 1:
            raise ValueError(f"{what}: empty sequence or head dim: q {q.shape}, k {k.shape}, v {v.shape}")
        return B, H, Lq, k.shape[2], d, v.shape[3]

    def _matmul1(self, a, b, c, M, Ncols, Kd, trans_a, trans_b, alpha):
        """version 1's batched C = alpha op(A) op(B), one matrix per (batch, head)."""
        batch = c.size // (M * Ncols)
        self._launch("attention_matmul_kernel1", (_cdiv(M * Ncols, 256), batch), 256,
                     (a, b, c, M, Ncols, Kd, int(trans_a), int(trans_b), alpha))

    def attention_forward(self, q, k, v, scale, is_causal):
        q, k, v = self._f32(q), self._f32(k), self._f32(v)
        B, H, Lq, Lk, d, d_v = self._attn_shape(q, k, v, "attention")
        xp, causal = self.xp, int(bool(is_causal))
        o = xp.empty((B, H, Lq, d_v), dtype=xp.float32)
        lse = xp.empty((B, H, Lq), dtype=xp.float32)
        if current_version == 1:
            s = xp.empty((B, H, Lq, Lk), dtype=xp.float32)
            self._matmul1(q, k, s, Lq, Lk, d, False, True, float(scale))  # S = s Q K^T
            rows = B * H * Lq
            self._launch("attention_softmax_kernel1", _cdiv(rows, 4), 128, (s, lse, rows, Lq, Lk, causal))
            self._matmul1(s, v, o, Lq, d_v, Lk, False, False, 1.0)  # O = P V
            return o, lse
        threads, tile, shared = _flash_tiles(
            d, lambda bq, bk: bq * (d + 1) + bq * (d_v + 1) + bk * d + bk * d_v + bq * (bk + 1))
        self._launch("attention_forward_kernel2", (_cdiv(Lq, threads), B * H), threads,
                     (q, k, v, o, lse, Lq, Lk, d, d_v, float(scale), causal, tile), shared)
        return o, lse

    def attention_backward(self, do, q, k, v, o, lse, scale, is_causal):
        q, k, v = self._f32(q), self._f32(k), self._f32(v)
        do, o, lse = self._f32(do), self._f32(o), self._f32(lse)
        B, H, Lq, Lk, d, d_v = self._attn_shape(q, k, v, "attention backward")
        if do.shape != (B, H, Lq, d_v) or o.shape != do.shape or lse.shape != (B, H, Lq):
            raise ValueError(f"attention backward: do and o must be {(B, H, Lq, d_v)} and lse {(B, H, Lq)}; "
                             f"got {do.shape}, {o.shape}, {lse.shape}")
        xp, causal, scale, rows = self.xp, int(bool(is_causal)), float(scale), B * H * Lq
        dq, dk, dv = (xp.empty(a.shape, dtype=xp.float32) for a in (q, k, v))
        if current_version == 1:
            p = xp.empty((B, H, Lq, Lk), dtype=xp.float32)
            dp = xp.empty((B, H, Lq, Lk), dtype=xp.float32)
            self._matmul1(q, k, p, Lq, Lk, d, False, True, scale)  # S
            self._launch("attention_probs_kernel1", _cdiv(p.size, 256), 256, (p, lse, rows, Lq, Lk, causal))
            self._matmul1(p, do, dv, Lk, d_v, Lq, True, False, 1.0)  # dV = P^T dO
            self._matmul1(do, v, dp, Lq, Lk, d_v, False, True, 1.0)  # dP = dO V^T
            self._launch("attention_softmax_backward_kernel1", _cdiv(rows, 4), 128, (p, dp, do, o, rows, Lk, d_v))
            self._matmul1(dp, k, dq, Lq, d, Lk, False, False, scale)  # dQ = s dS K
            self._matmul1(dp, q, dk, Lk, d, Lq, True, False, scale)  # dK = s dS^T Q
            return dq, dk, dv
        D = xp.empty((B, H, Lq), dtype=xp.float32)
        self._launch("attention_backward_dot_kernel2", _cdiv(rows, 4), 128, (do, o, D, rows, d_v))
        threads, tile, shared = _flash_tiles(
            d, lambda bk, bq: 2 * bk * (d + 1) + 2 * bk * (d_v + 1) + bq * d + bq * d_v + 2 * bq)
        self._launch("attention_backward_kv_kernel2", (_cdiv(Lk, threads), B * H), threads,
                     (q, k, v, do, lse, D, dk, dv, Lq, Lk, d, d_v, scale, causal, tile), shared)
        threads, tile, shared = _flash_tiles(
            d, lambda bq, bk: 2 * bq * (d + 1) + bq * (d_v + 1) + bk * d + bk * d_v)
        self._launch("attention_backward_q_kernel2", (_cdiv(Lq, threads), B * H), threads,
                     (q, k, v, do, lse, D, dq, Lq, Lk, d, d_v, scale, causal, tile), shared)
        return dq, dk, dv


def make_backend(name: str) -> Backend:
    """The "emulated" or "cupy" backend: kernels/*.cu computing conv2d, group norm and attention."""
    if name == "emulated":
        return Backend("emulated", np, KernelOps("emulated"))
    if name == "cupy":
        cupy = _cupy()
        return Backend("cupy", cupy, KernelOps("cupy"))
    raise ValueError(f"minisd.kernels has no backend {name!r}; choose 'emulated' or 'cupy'")
