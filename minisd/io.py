"""Checkpoints: a model as a folder that diffusers and transformers can read, and minisd reads theirs.

    unet/ or vae/                 config.json  +  diffusion_pytorch_model.safetensors   (diffusers)
    text_encoder/                 config.json  +  model.safetensors                     (transformers)

config.json holds the constructor's arguments (the model's ``config``) plus the class
name: diffusers' "_class_name", and for CLIP transformers' "architectures" and
"model_type". The weights are a safetensors file: a JSON header of names, dtypes and
shapes, then the raw little-endian arrays, so loading is a copy (no pickle, no code).
Keys are the models' parameter names, which are diffusers'/transformers' own.

Writes are atomic: each file is written under a temporary name in the same folder and
renamed over the target, so a crash mid-save never leaves a half-written checkpoint.
Weights stored in float16 (as SD's published "fp16" files are) load into the model's
float32 parameters: load_state_dict casts each array to its parameter's dtype.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

import numpy as np

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _classes() -> dict:
    from minisd.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel

    return {c.__name__: c for c in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPModel)}


# transformers' names for the CLIP classes (config.json's "model_type")
_MODEL_TYPES = {"CLIPTextModel": "clip_text_model", "CLIPModel": "clip"}


# =====================================================================================
# Files
# =====================================================================================


def _atomic_write(path: Path, write) -> None:
    """Call write(temporary_path), then rename the result onto path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_safetensors(state: dict[str, np.ndarray], path, dtype=None) -> None:
    """Write arrays to a .safetensors file (atomically), optionally cast to ``dtype`` (e.g. float16)."""
    from safetensors.numpy import save_file

    # np.asarray(order="C"), not np.ascontiguousarray, which turns a 0-d array (logit_scale) into 1-d
    arrays = {k: np.asarray(v if dtype is None else np.asarray(v).astype(dtype), order="C") for k, v in state.items()}
    # "format": "pt" is what transformers checks for before it trusts a safetensors file.
    _atomic_write(Path(path), lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"}))


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Every array in a .safetensors file, by name, in its stored dtype."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(path)
    except Exception as e:  # a truncated file, or a dtype NumPy lacks (bfloat16)
        raise ValueError(f"cannot read {path}: {e}") from None


def save_config(config: dict, path) -> None:
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(Path(path), write)


def load_config(folder) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {folder}")
    with open(path) as f:
        return json.load(f)


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
    if name in _MODEL_TYPES:  # what transformers needs to pick the class
        config.update(architectures=[name], model_type=_MODEL_TYPES[name])
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
    if cls.__name__ not in _MODEL_TYPES:
        return config  # diffusers' configs are exactly the constructor's arguments
    from minisd.models.clip import CLIPVisionTransformer

    def known(c):
        return set(inspect.signature(c).parameters) | set(getattr(c, "passive_config", ()))

    if cls.__name__ == "CLIPTextModel":
        return {k: v for k, v in config.items() if k in known(cls)}
    text_keys = known(_classes()["CLIPTextModel"])
    vision_keys = known(CLIPVisionTransformer)
    return {"text_config": {k: v for k, v in (config.get("text_config") or {}).items() if k in text_keys},
            "vision_config": {k: v for k, v in (config.get("vision_config") or {}).items() if k in vision_keys},
            **{k: v for k, v in config.items() if k in ("projection_dim", "logit_scale_init_value")}}


def from_config(config: dict, cls=None, where: str = "config"):
    """A freshly initialised model from a config.json's contents (diffusers' or transformers'):
    the class named in it (or ``cls``), with the keys that class takes."""
    cls = cls or _model_class(config, where)
    return cls(**_constructor_config(cls, config))


def load_pretrained(folder, cls=None, dtype=np.float32):
    """Build the model a folder describes and load its weights (float16 files into float32 parameters).

    ``cls`` overrides the class named in config.json. Missing, unexpected and mis-shaped
    keys are reported by name.
    """
    folder = Path(folder)
    model = from_config(load_config(folder), cls, f"{folder}/{CONFIG}")
    if np.dtype(dtype) != np.float32:
        model.to(dtype)
    for weights in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS):
        if (folder / weights).is_file():
            break
    else:
        raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS} or {TRANSFORMERS_WEIGHTS} in {folder}")
    state = load_safetensors(folder / weights)
    try:
        model.load_state_dict(state)
    except KeyError as e:
        raise KeyError(f"{folder / weights}: {e.args[0]}") from None
    return model
