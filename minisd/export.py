"""A minisd model as a folder diffusers runs; `minisd export PATH --to DIR` (minisd/cli/export.py) writes it.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(DIR, safety_checker=None)

minisd's models already use diffusers' and transformers' names for every weight and
config key (that is the point of them), so exporting is loading the model with minisd
(which checks it is whole) and writing each part in the layout the real libraries read:

    DIR/model_index.json                        which class each subfolder holds
    DIR/unet/, DIR/vae/                         config.json + diffusion_pytorch_model.safetensors
    DIR/text_encoder/                           config.json + model.safetensors (transformers)
    DIR/tokenizer/                              vocab.json + merges.txt + tokenizer.json and the
                                                tokenizer's configs (CLIPTokenizer reads them)
    DIR/scheduler/scheduler_config.json         DDIM, SD v1.x's schedule

What a minisd training folder holds besides (clip/ with the image tower, logs/,
checkpoints/) is left behind: a StableDiffusionPipeline has no place for it.
PATH may be any model folder minisd loads, a real SD folder included; DIR must not exist
yet, or be empty, so that nothing is overwritten by accident.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

PARTS = ("vae", "text_encoder", "unet")


def export_pipeline(pipe, out: str, dtype=np.float32) -> str:
    """Write a loaded minisd StableDiffusionPipeline as a diffusers folder at ``out``."""
    from minisd import io
    from minisd.train import write_model_index

    check_out_dir(out)
    # written beside DIR under a temporary name, then renamed: a failed export leaves no half
    # folder. Folders and files get the umask's permissions, so others can read the model.
    target = Path(os.path.abspath(out))
    work = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = io.temporary_folder(target)
        store = None if np.dtype(dtype) == np.float32 else dtype
        for name in PARTS:
            io.save_pretrained(getattr(pipe, name), work / name, store)
        pipe.tokenizer.save(str(work / "tokenizer"))
        # the pipeline's sampler: DDIM with the model's schedule (a PNDM config from a real SD
        # folder was already read as DDIM on loading)
        pipe.make_scheduler(None).save_config(str(work / "scheduler"))
        write_model_index(str(work))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, as checked
        os.replace(work, out)
    except BaseException as e:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):  # its path is the temporary folder's, which the user never named
            message = f"cannot write --to {out}: {e.strerror or e}"
            raise (OSError(e.errno, message) if e.errno else OSError(message)) from None
        raise
    return out


def check_out_dir(out: str) -> None:
    """DIR must be new or empty: an export never mixes its files with others'."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--to {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--to {out} already exists and is not empty; give a new folder")
