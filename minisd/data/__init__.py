"""Datasets of captioned images, and the reader that grades generated shapes images.

    shapes.py  procedural: one coloured shape on white, "a small red circle in the top left" (the default)
    emoji.py   Noto Color Emoji, captioned with their Unicode names ("red apple")
    folder.py  your own: a folder of captioned images (imagefolder's metadata.jsonl/.csv, or .txt captions)
    reader.py  colour, shape, size and position read back from a shapes image's pixels

Each dataset gives (images uint8 (N, H, W, 3), captions, records); ``load_dataset`` picks one by name
(a folder is read by ``folder.load_folder``, which also says what in it could not be used).
"""

from __future__ import annotations

DATASETS = ("shapes", "emoji")


def load_dataset(name: str, n: int | None = None, split: str = "train", seed: int = 0, size: int = 32,
                 font: str | None = None):
    """Images, captions and records of a dataset by name.

    shapes: n images of the split drawn by seed, or with n=None every combination at
    every jitter once (train: 150 x 9 = 1350). emoji: all of them (n=None) or n drawn
    by seed, at ``size`` pixels, from ``font`` (default: Noto Color Emoji).
    """
    if name == "shapes":
        from minisd.data import shapes

        if size != shapes.IMAGE_SIZE:
            raise ValueError(f"shapes images are {shapes.IMAGE_SIZE}x{shapes.IMAGE_SIZE}; got size={size}")
        return shapes.every_image(split) if n is None else shapes.make_dataset(n, split, seed)
    if name == "emoji":
        from minisd.data import emoji

        if split not in ("train", "all"):
            raise ValueError(f"the emoji dataset has no {split!r} split (only train / all)")
        return emoji.make_dataset(n, size=size, seed=seed, font=font)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
