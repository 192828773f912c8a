"""The CUDA toolchain: kernels/*.cu compiled and loaded, on a GPU by NVRTC or on a CPU by g++.

The same source files run two ways:

    runtime    compiled by                          launched by
    --------   ----------------------------------   ------------------------------------
    cupy       NVRTC, through cupy.RawModule         RawModule.get_function(name)(grid, block, args)
    emulated   g++, against kernels/emulator.h      ctypes, into the emulator's launch function

and both give a ``Program`` whose kernels launch the same way,
``program[name](grid, block, args, shared_mem)``. This file knows nothing of what the
kernels compute or how they are launched (that is minisd/backends/cuda_launch.py, the
file to read beside the .cu sources); it parses the sources, builds and caches, loads,
and checks each launch's arguments. Neither runtime checks them (CuPy sends a Python int
as a 64-bit integer and a float as a double, whatever the kernel expects), so
``Kernel.__call__`` checks them against the parameter list parsed from the .cu source: a
float32 C-contiguous array for ``float *``, an int for ``int``, a float for ``float``.

The emulator library is built once per set of sources and flags and cached under
$XDG_CACHE_HOME/minisd (else ~/.cache/minisd), named by a hash of the sources, the
header and the flags, so that editing a .cu rebuilds it.

Settings (module level, also read from the environment at import):
    MINISD_EMU_ORDER       forward (default), reverse or random: the emulator's thread order
    MINISD_EMU_SANITIZE    1: build the emulator with AddressSanitizer and UBSan (needs
                           LD_PRELOAD=$(g++ -print-file-name=libasan.so) before Python starts)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERNEL_FILES = ("conv2d.cu", "group_norm.cu", "attention.cu")
ORDERS = ("forward", "reverse", "random")
MAX_SHARED_BYTES = 48 * 1024  # dynamic shared memory a kernel may use without an opt-in


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine: no C++ compiler for the emulator, no CuPy or GPU."""


class KernelError(RuntimeError):
    """A kernel launch failed (on the emulator: a deadlock, a divergent barrier, a bad launch)."""


# The emulator's run order; change it with set_run_order (or cuda_launch.settings()).
current_order = os.environ.get("MINISD_EMU_ORDER", "forward")
current_seed = 0
if current_order not in ORDERS:
    raise ValueError(f"MINISD_EMU_ORDER must be one of {', '.join(ORDERS)}, not {current_order!r}")


def set_run_order(order: str, seed: int = 0) -> None:
    """The emulator's order of threads and blocks: "forward", "reverse" or "random" (seeded)."""
    global current_order, current_seed
    if order not in ORDERS:
        raise ValueError(f"run order must be one of {ORDERS}, not {order!r}")
    current_order, current_seed = order, int(seed)


# ------------------------------------------------------------------------------------
# finding and reading the sources
# ------------------------------------------------------------------------------------


def source_dir() -> Path:
    """kernels/ of a checkout, or the copy an installed package carries as minisd/_cuda."""
    checkout = Path(__file__).resolve().parents[2] / "kernels"
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
# a kernel and a program: the same on both runtimes
# ------------------------------------------------------------------------------------


def dim3(value, what: str) -> tuple[int, int, int]:
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
        grid, block = dim3(grid, f"{self.name}: grid"), dim3(block, f"{self.name}: block")
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
             f'#line 1 "{path}"', source, "", "// ---- launch functions (generated by minisd/backends/cuda_build.py)"]
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


def find_cupy():
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


def inline_includes(path: Path) -> str:
    """The source with its local ``#include "x.cuh"`` lines replaced by the files' text.

    CuPy caches compiled modules by the source text and options alone, so a change to an
    included header would otherwise not reach an already cached kernel."""
    def include(match):
        for folder in (path.parent, source_dir()):
            if (folder / match.group(1)).is_file():
                return inline_includes(folder / match.group(1)).replace("#pragma once", "")
        raise FileNotFoundError(f"{path.name}: cannot find included file {match.group(1)!r}")

    return _INCLUDE_RE.sub(include, path.read_text())


def load_cupy(sources) -> Program:
    """``sources`` compiled by NVRTC, one cupy.RawModule per file."""
    cupy = find_cupy()
    kernels = {}
    for path in map(Path, sources):
        text = inline_includes(path)
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
