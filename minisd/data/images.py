"""Pixels in, pixels out: uint8 images and the [-1, 1] floats the VAE reads and writes.

SD (and diffusers' VaeImageProcessor) scales a pixel p in 0 ... 255 to x = 2 (p / 255) - 1,
so white is 1 and black is -1, and maps a decoded x back with p = round(255 (x + 1) / 2),
clipped to 0 ... 255. Images are channels-last (H, W, 3) as files and PIL hold them; the
networks take channels-first (3, H, W). Every place in minisd that crosses that line uses
these two functions.
"""

from __future__ import annotations

import numpy as np


def to_model_input(images) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]: x = 2 (p / 255) - 1.

    Computed in float32 in diffusers' order (divide, then scale and shift), so an image
    enters minisd's VAE exactly as it enters diffusers'."""
    x = np.asarray(images).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(np.moveaxis(np.float32(2.0) * x - np.float32(1.0), -1, -3))


def to_uint8(x) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3): p = round(127.5 (x + 1)), clipped."""
    p = np.clip(np.round((np.asarray(x, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(p, -3, -1))
