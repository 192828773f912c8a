"""The shapes dataset: one coloured shape on a white 32x32 canvas, and its caption.

Stable Diffusion learned from LAION's billions of captioned photographs at 512x512.
minisd's default dataset is a toy with the same structure, small enough to train on a
laptop CPU in minutes and exact enough to grade a generated image attribute by attribute
(minisd/data/reader.py):

    "a small red circle in the top left"  ->  a 32x32 RGB image

    colours    red green blue yellow purple cyan   (exact RGB below)
    shapes     circle (filled disc), square (filled, axis-aligned), triangle (filled, apex up)
    sizes      small = 8 px, large = 14 px         (diameter, side, or base and height)
    positions  top left (9, 9), top right (23, 9), bottom left (9, 23), bottom right (23, 23),
               center (16, 16): the centre of the bounding box in (x, y), y down, each moved
               by a whole number of pixels in [-1, 1] per axis (the jitter)

6 x 3 x 2 x 5 = 180 combinations, x 9 jitters. Three colour-shape pairs, blue triangle,
yellow circle and green square, are held out: they never appear in the train split, and
the held-out split is made of them alone, so that generating "a large blue triangle"
tests whether the model composes a colour and a shape it has only seen apart.

Rasterisation (binary, no anti-aliasing, so that sizes are exact). Pixel (i, j) is the
unit square [i, i+1) x [j, j+1), its centre at (i + 0.5, j + 0.5). An object of size s
centred at (cx, cy) has the bounding box [cx - s/2, cx + s/2) x [cy - s/2, cy + s/2):
exactly s x s pixels, since s is even and the centre a whole number.
    square    every pixel of the box
    circle    the pixels whose centre lies within s/2 of (cx, cy): a disc whose widest
              row and column span all s pixels (s = 8: 52 pixels)
    triangle  row k of the box (k = 0 at the top) is 2 * ceil((k + 1) / 2) pixels wide,
              centred: the width of an isosceles triangle of base s and height s at the
              bottom edge of that row (k + 1), rounded up to an even number so the row
              stays centred. s = 8: widths 2 2 4 4 6 6 8 8 (40 pixels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (255, 255, 255)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 190),
    "cyan": (30, 180, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "large": 14}
POSITIONS = {
    "top left": (9, 9),
    "top right": (23, 9),
    "bottom left": (9, 23),
    "bottom right": (23, 23),
    "center": (16, 16),
}
JITTER = (-1, 0, 1)
HELD_OUT = frozenset({("blue", "triangle"), ("yellow", "circle"), ("green", "square")})
SPLITS = ("train", "heldout", "all")

CAPTION_TEMPLATE = "a {size} {color} {shape} in the {position}"


@dataclass(frozen=True)
class ShapeRecord:
    """What one image shows: its four attributes and the jitter (dx, dy) of its centre."""

    color: str
    shape: str
    size: str
    position: str
    dx: int = 0
    dy: int = 0

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(size=self.size, color=self.color, shape=self.shape,
                                       position=self.position)

    @property
    def center(self) -> tuple[int, int]:
        """(x, y) of the bounding box's centre, jitter included."""
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT


class ShapesDataset(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    captions: list  # N strings
    records: list  # N ShapeRecords


def _check(color, shape, size, position, dx=0, dy=0):
    for value, allowed, what in ((color, COLORS, "colour"), (shape, SHAPES, "shape"),
                                 (size, SIZES, "size"), (position, POSITIONS, "position")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if dx not in JITTER or dy not in JITTER:
        raise ValueError(f"jitter must be -1, 0 or 1 on each axis, got ({dx}, {dy})")


def shape_mask(shape: str, size: int, center: tuple[int, int], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (H, W) mask of one shape, by the rasterisation rule in the module docstring."""
    s, (cx, cy) = size, center
    if s % 2 or s <= 0:
        raise ValueError(f"size must be a positive even number of pixels, got {s}")
    x0, y0 = cx - s // 2, cy - s // 2
    if x0 < 0 or y0 < 0 or x0 + s > image_size or y0 + s > image_size:
        raise ValueError(f"a {s} px shape centred at {center} does not fit a {image_size} px canvas")
    mask = np.zeros((image_size, image_size), dtype=bool)
    if shape == "square":
        mask[y0:y0 + s, x0:x0 + s] = True
    elif shape == "circle":
        px = np.arange(image_size) + 0.5  # pixel centres
        mask = (px[None, :] - cx) ** 2 + (px[:, None] - cy) ** 2 <= (s / 2) ** 2
    elif shape == "triangle":
        for k in range(s):
            half = -(-(k + 1) // 2)  # ceil((k + 1) / 2): half of the row's even width
            mask[y0 + k, cx - half:cx + half] = True
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return mask


def render(color: str, shape: str, size: str, position: str, dx: int = 0, dy: int = 0) -> np.ndarray:
    """One image, uint8 (32, 32, 3): the named shape on white (eval draws its targets with this)."""
    _check(color, shape, size, position, dx, dy)
    record = ShapeRecord(color, shape, size, position, dx, dy)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[shape_mask(shape, SIZES[size], record.center)] = COLORS[color]
    return image


def render_record(record: ShapeRecord) -> np.ndarray:
    return render(record.color, record.shape, record.size, record.position, record.dx, record.dy)


def combinations(split: str = "all") -> list[tuple[str, str, str, str]]:
    """Every (color, shape, size, position) in a split: 150 train, 30 held out, 180 in all."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    every = itertools.product(COLORS, SHAPES, SIZES, POSITIONS)
    if split == "all":
        return list(every)
    want_held_out = split == "heldout"
    return [c for c in every if ((c[0], c[1]) in HELD_OUT) == want_held_out]


def parse_caption(caption: str) -> ShapeRecord:
    """The inverse of the caption template: "a small red circle in the top left" -> its record."""
    words = caption.strip().lower().split()
    if len(words) >= 6 and words[0] == "a" and words[4:6] == ["in", "the"]:
        size, color, shape, position = words[1], words[2], words[3], " ".join(words[6:])
        if size in SIZES and color in COLORS and shape in SHAPES and position in POSITIONS:
            return ShapeRecord(color, shape, size, position)
    raise ValueError(f"not a shapes caption: {caption!r} (expected {CAPTION_TEMPLATE!r})")


def make_dataset(n: int, split: str = "train", seed: int = 0) -> ShapesDataset:
    """n images drawn uniformly over the split's combinations and the 9 jitters.

    Deterministic: the same (n, split, seed) always gives the same images and captions.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    combos = combinations(split)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(combos), size=n)
    jitter = rng.integers(-1, 2, size=(n, 2))
    records = [ShapeRecord(*combos[c], int(dx), int(dy)) for c, (dx, dy) in zip(which, jitter)]
    images = np.stack([render_record(r) for r in records]) if n else np.zeros((0, 32, 32, 3), np.uint8)
    return ShapesDataset(images, [r.caption for r in records], records)


def every_image(split: str = "all") -> ShapesDataset:
    """Each combination of the split at each of the 9 jitters, in a fixed order (180 x 9 = 1620 for "all")."""
    records = [ShapeRecord(*c, dx, dy) for c in combinations(split) for dy in JITTER for dx in JITTER]
    return ShapesDataset(np.stack([render_record(r) for r in records]), [r.caption for r in records], records)
