"""Reading a shapes image back into words: colour, shape, size and position, from pixels alone.

This is how ``minisd eval`` grades prompt adherence without a network: generate
"a large blue triangle in the top right", read the image, and count the attributes the
reader finds right. (For photographs one would ask a classifier or CLIP; the shapes
dataset is exact enough to be read by rule.)

The rules, for a 32x32 image of one object on white (minisd/data/shapes.py):
 1. foreground: pixels whose RGB distance from white exceeds half the smallest distance
    of any dataset colour from white (about 116 of 255): halfway, so that a blurred edge
    is cut where it crosses 50%, and a noisy white pixel (sigma 10-25) stays background;
 2. the object: the largest 4-connected foreground component (drops stray specks); too
    few pixels (< MIN_PIXELS) and every attribute is None;
 3. colour: blur and anti-aliasing mix the colour k with white, so a pixel p lies near
    the segment from white w to k: p ~ w + a (k - w), 0 <= a <= 1. The reading is the
    dataset colour whose segment the object's pixels fit best (the smallest median
    distance to it), which a plain nearest-mean rule gets wrong on blurred edges;
 4. shape, size and position together: the dataset's own drawing (shapes.shape_mask) of
    every shape, size, position and jitter, 3 x 2 x 5 x 9 = 270 masks, each scored by
    intersection over union with the object; the best one wins. Whole-mask overlap
    shrugs off the ragged edges of noisy images that sink rules on single rows or on
    the bounding box (a speck stuck to a square's side turns its fill ratio into a circle's).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from dataclasses import dataclass, fields

import numpy as np

from minisd.data.shapes import COLORS, IMAGE_SIZE, JITTER, POSITIONS, SHAPES, SIZES, shape_mask

MIN_PIXELS = 12
_WHITE = np.array([255.0, 255.0, 255.0])
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
THRESHOLD = 0.5 * float(np.min(np.linalg.norm(_PALETTE - _WHITE, axis=1)))


@dataclass(frozen=True)
class Reading:
    """What the reader saw; None where it could not tell (a blank image)."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def agrees_with(self, record) -> dict[str, bool]:
        """Per attribute, does this reading match ``record`` (a ShapeRecord or anything with the four fields)?"""
        return {f.name: getattr(self, f.name) == getattr(record, f.name) for f in fields(self)}

    def matches(self, record) -> bool:
        """All four attributes right."""
        return all(self.agrees_with(record).values())


def _as_rgb255(image) -> np.ndarray:
    a = np.asarray(image)
    if a.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.floating):  # float images are in [0, 1]
        return np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
    raise ValueError(f"expected a uint8 image or a float image in [0, 1], got dtype {a.dtype}")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (breadth-first flood fill)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


@functools.lru_cache(maxsize=1)
def _templates():
    """Every drawing the dataset can make of one shape, flattened: (270, 1024) float32, and its labels."""
    labels, masks = [], []
    for shape, size, position, dx, dy in itertools.product(SHAPES, SIZES, POSITIONS, JITTER, JITTER):
        x, y = POSITIONS[position]
        masks.append(shape_mask(shape, SIZES[size], (x + dx, y + dy)).ravel())
        labels.append((shape, size, position))
    return np.array(masks, dtype=np.float32), labels


def _read_color(pixels: np.ndarray) -> str:
    """Rule 3: the colour whose segment from white the pixels (n, 3) lie closest to."""
    rel, d = pixels - _WHITE, _PALETTE - _WHITE  # (n, 3), (6, 3)
    a = np.clip(rel @ d.T / (d * d).sum(axis=1), 0.0, 1.0)  # where along each segment, (n, 6)
    dist = np.linalg.norm(rel[:, None, :] - a[..., None] * d[None], axis=2)  # (n, 6)
    return list(COLORS)[int(np.argmin(np.median(dist, axis=0)))]


def _read_geometry(obj: np.ndarray) -> tuple[str, str, str]:
    """Rule 4: (shape, size, position) of the drawing with the best intersection over union."""
    masks, labels = _templates()
    o = obj.ravel().astype(np.float32)
    inter = masks @ o
    iou = inter / (masks.sum(axis=1) + o.sum() - inter)
    return labels[int(np.argmax(iou))]


def read(image) -> Reading:
    """Colour, shape, size and position of the one object in a 32x32 shapes image (rules above)."""
    rgb = _as_rgb255(image)
    foreground = np.linalg.norm(rgb - _WHITE, axis=2) > THRESHOLD
    obj = largest_component(foreground)
    if obj.sum() < MIN_PIXELS:
        return Reading()
    shape, size, position = _read_geometry(obj)
    return Reading(_read_color(rgb[obj]), shape, size, position)


def read_batch(images) -> list[Reading]:
    """``read`` for each image of a (N, H, W, 3) batch."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of RGB images (N, H, W, 3), got shape {images.shape}")
    return [read(im) for im in images]
