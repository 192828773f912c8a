"""Reading a shapes image back into words: colour, shape, size and position, from pixels alone.

This is how ``minisd eval`` grades prompt adherence without a network: generate
"a large blue triangle in the top right", read the image, and count the attributes the
reader finds right. (For photographs one would ask a classifier or CLIP; the shapes
dataset is exact enough to be read by rule.)

The rules, for an image of one object on white (minisd/data/shapes.py):
 1. foreground: pixels whose RGB distance from white exceeds half the smallest distance
    of any dataset colour from white (about 116 of 255): halfway, so that a blurred edge
    is cut where it crosses 50%, and a noisy white pixel (sigma 10-20) stays background;
 2. the object: the largest 4-connected foreground component (drops stray specks); too
    few pixels (< MIN_PIXELS) and every attribute is None;
 3. colour: the dataset colour nearest the component's per-channel median (robust to
    noise and to edge pixels mixed with white);
 4. size: the longer side of the bounding box, small (8) if under 11 px, else large (14);
 5. position: the dataset position nearest the bounding box's centre;
 6. shape: a triangle is narrow at the top and wide at the bottom (mean width of the top
    quarter of rows under 60% of the bottom quarter's; circle and square: about 100%);
    otherwise a square fills its bounding box (fill ratio >= 0.88; circle ~0.8, pi/4 in
    the limit).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import numpy as np

from minisd.data.shapes import COLORS, POSITIONS, SIZES

MIN_PIXELS = 12
_WHITE = np.array([255.0, 255.0, 255.0])
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
THRESHOLD = 0.5 * float(np.min(np.linalg.norm(_PALETTE - _WHITE, axis=1)))
_SIZE_SPLIT = 0.5 * (SIZES["small"] + SIZES["large"])
TRIANGLE_TOP_BOTTOM = 0.6
SQUARE_FILL = 0.88


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
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
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


def _classify_shape(obj: np.ndarray) -> str:
    rows = obj.sum(axis=1)
    rows = rows[rows > 0]
    quarter = max(1, len(rows) // 4)
    top, bottom = rows[:quarter].mean(), rows[-quarter:].mean()
    if top < TRIANGLE_TOP_BOTTOM * bottom:
        return "triangle"
    ys, xs = np.nonzero(obj)
    fill = obj.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill >= SQUARE_FILL else "circle"


def read(image) -> Reading:
    """Colour, shape, size and position of the one object in a shapes image (rules above)."""
    rgb = _as_rgb255(image)
    foreground = np.linalg.norm(rgb - _WHITE, axis=2) > THRESHOLD
    obj = largest_component(foreground)
    if obj.sum() < MIN_PIXELS:
        return Reading()
    median = np.median(rgb[obj], axis=0)
    color = list(COLORS)[int(np.argmin(np.linalg.norm(_PALETTE - median, axis=1)))]
    ys, xs = np.nonzero(obj)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    size = "small" if extent < _SIZE_SPLIT else "large"
    # the box [min, max + 1) in pixel-edge coordinates, as shapes.py places it
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Reading(color, _classify_shape(obj[ys.min():ys.max() + 1, xs.min():xs.max() + 1]), size, position)


def read_batch(images) -> list[Reading]:
    """``read`` for each image of a (N, H, W, 3) batch."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of RGB images (N, H, W, 3), got shape {images.shape}")
    return [read(im) for im in images]
