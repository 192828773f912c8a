"""Checkpoints: a model as a folder that diffusers and transformers can read, and minisd reads theirs.

    unet/ or vae/                 config.json  +  diffusion_pytorch_model.safetensors   (diffusers)
    text_encoder/                 config.json  +  model.safetensors                     (transformers)

config.json holds the constructor's arguments (the model's ``config``) plus the class
name: diffusers' "_class_name", and for CLIP transformers' "architectures" and
"model_type". The weights are a safetensors file: a JSON header of names, dtypes and
shapes, then the raw little-endian arrays, so loading is a copy (no pickle, no code).
Keys are the models' parameter names, which are diffusers'/transformers' own.

Writes are atomic, for every file minisd writes (weights, configs, the tokenizer's files,
model_index.json): atomic_write writes to a unique temporary name in the same folder and
renames it over the target, so a crash or a full disk mid-save leaves the old file whole,
and two processes saving at once never share a temporary file. Files get the permissions
the umask gives (0666 & ~umask, folders 0777 & ~umask), as files made by open() do.
Weights stored in float16 (as SD's published "fp16" files are) load into the model's
float32 parameters: load_state_dict casts each array to its parameter's dtype.

Loading refuses what no trained model holds: NaN or infinite weights, and integer or bool
arrays for floating-point parameters (a corrupt or mislabelled file), naming the tensor
and the file; and a config is checked key by key before anything is built
(minisd.models.config), so a bad file is one line that names the key and the file.

Loading a full-size model (SD v1.5's UNet: 860M parameters, 3.4 GB in float32) must not
need two of it in memory. So load_pretrained builds the model without drawing random
initial weights, and reads the file tensor by tensor (SafetensorsFile), each array cast
into its parameter and dropped before the next is read. Pickle weights (.bin, .ckpt) are
refused: unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
# the names the hub's float16 "variant" files have (from_pretrained(..., variant="fp16"))
WEIGHT_FILES = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
CONFIG = "config.json"


# The model classes minisd saves and loads, by name. Each registers itself when it is
# defined (minisd.models.config.Pretrained.__init_subclass__) and says here what this
# module needs of it as class attributes: ``model_type`` (transformers' name, for the
# classes saved in transformers' layout), ``sub_configs`` (a two-tower model's towers: the class
# each nested config is for) and ``required_config_keys``. So io names no model.
MODEL_CLASSES: dict[str, type] = {}


def register_model(cls) -> None:
    MODEL_CLASSES[cls.__name__] = cls


def _classes() -> dict:
    if not MODEL_CLASSES:  # a process that has not imported the models yet: defining them registers them
        importlib.import_module("minisd.models")
    return MODEL_CLASSES


# =====================================================================================
# Files
# =====================================================================================


def _create_beside(path: Path, create) -> Path:
    """A new file or folder next to ``path``, named .NAME.PID-RANDOM.tmp: the pid and 8 random
    hex digits make it unique per process and per call, and ``create`` fails if it exists."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def temporary_file(path) -> Path:
    """An empty new file beside ``path``, with the mode open() would give it (0666 & ~umask,
    applied by the system: unlike tempfile.mkstemp's 0600, others may read what is saved)."""
    return _create_beside(Path(path), lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def temporary_folder(path) -> Path:
    """An empty new folder beside ``path``, mode 0777 & ~umask (tempfile.mkdtemp's is 0700)."""
    return _create_beside(Path(path), lambda p: os.mkdir(p, 0o777))


def atomic_write(path, write) -> Path:
    """Write ``path`` in one step: ``write(tmp)`` fills a new temporary file beside it, which
    os.replace then renames onto ``path``. On any failure (an error, a full disk, Ctrl-C) the
    temporary file is removed and the old ``path``, if any, is untouched. The new file has the
    permissions the umask gives, even when ``write`` replaces the temporary file by one of its
    own (safetensors does, with mode 0600). Missing parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_file(path)
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


# the name train.py calls today; to go once it calls atomic_write
_atomic_write = atomic_write


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json(path, value, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``value`` as JSON (UTF-8, non-ASCII kept as is, a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def _write_error(error, path) -> OSError:
    """safetensors' SafetensorError for a failed write as the OSError it is, naming ``path`` (the
    file being saved, not safetensors' own temporary name): "[Errno 28] No space left on device:
    'unet/diffusion_pytorch_model.safetensors'". safetensors 0.8 writes "... (os error 28) at
    path ...", older versions "IoError(Os { code: 28, ... })"."""
    found = re.search(r"\(os error (\d+)\)|code: (\d+)", str(error))
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code), str(path))
    return OSError(f"cannot write {path}: {error}")


def save_safetensors(state: dict[str, np.ndarray], path, dtype=None) -> None:
    """Write arrays to a .safetensors file (atomically), optionally cast to ``dtype`` (e.g. float16)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    # np.asarray(order="C"), not np.ascontiguousarray, which turns a 0-d array (logit_scale) into 1-d
    arrays = {k: np.asarray(v if dtype is None else np.asarray(v).astype(dtype), order="C") for k, v in state.items()}

    def write(tmp):
        try:
            # "format": "pt" is what transformers checks for before it trusts a safetensors file.
            save_file(arrays, tmp, metadata={"format": "pt"})
        except SafetensorError as e:
            raise _write_error(e, path) from None

    atomic_write(path, write)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Every array in a .safetensors file, by name, in its stored dtype (bfloat16 as float32)."""
    with SafetensorsFile(path) as f:
        return {name: f.read(name) for name in f}


# safetensors' dtype names; bfloat16, which NumPy lacks, is read as its top 16 bits of a float32
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class StoredTensor:
    """One array of a safetensors file, read from disk when NumPy asks for it (np.asarray)."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.shape = tuple(file.header[name]["shape"])
        self.dtype = file.dtype(name)

    def __array__(self, dtype=None, copy=None):
        a = self.file.read(self.name)
        return a if dtype is None else a.astype(dtype, copy=False)


class SafetensorsFile(Mapping):
    """The arrays of a .safetensors file by name, each read only when used, in one read of its bytes.

    The format: 8 bytes (little-endian u64) giving the header's length n, n bytes of JSON
    {name: {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
    then the data, offsets counted from its start. Values are StoredTensor, so that
    ``model.load_state_dict(f)`` reads, casts and copies one tensor at a time. Plain reads,
    not the memory map of safetensors' own ``safe_open``: every page of a mapped file that
    has been read counts as the process' memory until the file is closed.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no weights file at {self.path}")
        self._f = open(self.path, "rb")
        try:
            size = os.fstat(self._f.fileno()).st_size
            n = int.from_bytes(self._f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(self._f.read(n))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                count = int(np.prod(entry["shape"], dtype=np.int64))
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"{name}: dtype {entry['dtype']} is not one minisd reads")
                if end - begin != count * np.dtype(_DTYPES[entry["dtype"]]).itemsize or 8 + n + end > size:
                    raise ValueError(f"{name}: its bytes do not fit its shape or the file (truncated?)")
        except (ValueError, KeyError, TypeError) as e:
            self._f.close()
            raise ValueError(f"cannot read {self.path}: not a safetensors file ({e})") from None
        self.header, self._data_start = header, 8 + n

    def dtype(self, name: str) -> np.dtype:
        """The NumPy dtype ``read(name)`` returns (bfloat16 is read as float32)."""
        stored = self.header[name]["dtype"]
        return np.dtype(np.float32 if stored == "BF16" else _DTYPES[stored])

    def read(self, name: str) -> np.ndarray:
        """The named array, as a fresh NumPy array (bfloat16 widened to float32).

        A floating-point array holding NaN or inf is refused: no trained weight is either, and
        they are what flipped bytes in a file's data look like (the model would load and draw
        black images). One np.isfinite pass over each tensor, as it is read.
        """
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        a = np.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        self._f.seek(self._data_start + begin)
        if self._f.readinto(a.reshape(-1).view(np.uint8)) != end - begin:
            raise ValueError(f"cannot read {self.path}: {name} is cut short (truncated file?)")
        if entry["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"cannot load {self.path}: tensor {name} holds NaN or infinite values "
                             "(a corrupt file?)")
        return a

    def __getitem__(self, name: str) -> StoredTensor:
        if name not in self.header:
            raise KeyError(name)
        return StoredTensor(self, name)

    def __iter__(self):
        return iter(self.header)

    def __len__(self):
        return len(self.header)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_config(config: dict, path) -> None:
    write_json(path, config, sort_keys=True)


def load_config(folder) -> dict:
    """A model folder's config.json, which must be a JSON object."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config is a JSON object of keys and values, got a {type(config).__name__}")
    return config


# =====================================================================================
# Models
# =====================================================================================


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_pretrained(model, folder, dtype=None) -> Path:
    """Write ``model`` into ``folder`` as config.json + weights, in diffusers' or transformers' layout.

    ``dtype`` (e.g. np.float16) stores the weights in that type; default: the parameters' own.
    """
    from minisd import __version__

    name = type(model).__name__
    if name not in _classes():
        raise TypeError(f"save_pretrained: cannot save a {name}; expected one of {', '.join(_classes())}")
    folder = Path(folder)
    config = {"_class_name": name, "_minisd_version": __version__, **_json_ready(model.config)}
    model_type = getattr(type(model), "model_type", None)
    if model_type:  # what transformers needs to pick the class
        config.update(architectures=[name], model_type=model_type)
        weights = TRANSFORMERS_WEIGHTS
    else:
        weights = DIFFUSERS_WEIGHTS
    save_safetensors(model.state_dict(), folder / weights, dtype)
    save_config(config, folder / CONFIG)
    return folder


def _model_class(config: dict, where: str):
    classes = _classes()
    name = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
    if name not in classes:
        raise ValueError(f"{where}: model class {name!r} is not one minisd has "
                         f"(expected one of {', '.join(classes)})")
    return classes[name]


def _constructor_config(cls, config: dict) -> dict:
    """The config keys ``cls`` takes. transformers' files also carry keys every model has
    (return_dict, id2label, ...) that say nothing about CLIP; those are left out."""
    if not getattr(cls, "model_type", None):
        return config  # diffusers' configs are exactly the constructor's arguments

    def known(c):
        return set(inspect.signature(c).parameters) | set(getattr(c, "passive_config", ()))

    towers = getattr(cls, "sub_configs", {})
    if not towers:
        return {k: v for k, v in config.items() if k in known(cls)}
    named = {k for k, p in inspect.signature(cls).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return {**{key: {k: v for k, v in (config.get(key) or {}).items() if k in known(tower)}
               for key, tower in towers.items()},
            **{k: v for k, v in config.items() if k in named and k not in towers}}


def from_config(config: dict, cls=None, where: str = "config"):
    """A freshly initialised model from a config.json's contents (diffusers' or transformers'):
    the class named in it (or ``cls``), with the keys that class takes.

    A bad config is one error that names ``where`` (the file) and the key: a key the class
    needs and the file lacks, a value of the wrong type or range, a model too big to build
    (see minisd.models.config.check_values, which the constructors run).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: a config is a mapping of keys to values (a JSON object), "
                         f"got a {type(config).__name__}")
    cls = cls or _model_class(config, where)
    required = getattr(cls, "required_config_keys", ())
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{where}: config key {missing[0]!r} is missing ({cls.__name__} needs "
                         f"{', '.join(required)})")
    try:
        return cls(**_constructor_config(cls, config))
    except (ValueError, TypeError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{where}: {e}") from None


@contextlib.contextmanager
def _uninitialised():
    """Build models without drawing random initial weights (a checkpoint overwrites every one).

    nn draws each new weight from its generator ``nn._rng``; here it hands out zero views of
    the requested shape instead, which take neither memory nor time (SD v1.5's UNet would
    otherwise spend ~30 s and 3.4 GB on numbers that are thrown away).
    """
    from minisd import nn

    class ShapesOnly:
        def uniform(self, low=0.0, high=1.0, size=None):
            return np.broadcast_to(np.float32(0), size)

        def standard_normal(self, size=None):
            return np.broadcast_to(np.float32(0), size)

    saved, nn._rng = nn._rng, ShapesOnly()
    try:
        yield
    finally:
        nn._rng = saved


def weights_file(folder) -> Path:
    """The safetensors file of a model folder; a folder with only pickle weights is refused."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ValueError(f"{folder} has only pickle weights ({', '.join(pickles)}); minisd reads safetensors "
                         "only (unpickling runs code): convert with diffusers, e.g. "
                         "from_pretrained(path).save_pretrained(path, safe_serialization=True)")
    raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS} or {TRANSFORMERS_WEIGHTS} in {folder}")


def load_pretrained(folder, cls=None, dtype=np.float32):
    """Build the model a folder describes and load its weights (float16 files into float32 parameters).

    ``cls`` overrides the class named in config.json. Missing, unexpected and mis-shaped
    keys are reported by name. The weights are read tensor by tensor into a model built
    without random initial values, so loading needs memory for one model, not two.
    """
    folder = Path(folder)
    config = load_config(folder)
    with _uninitialised():
        model = from_config(config, cls, f"{folder}/{CONFIG}")
    weights = weights_file(folder)
    with SafetensorsFile(weights) as state:
        try:
            model.load_state_dict(state)
        except (KeyError, TypeError) as e:  # (a non-finite tensor's ValueError names the file already)
            raise (KeyError if isinstance(e, KeyError) else TypeError)(f"{weights}: {e.args[0]}") from None
    if np.dtype(dtype) != np.float32:
        model.to(dtype)
    return model
