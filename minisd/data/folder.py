"""Your own captioned images: a folder in one of the two layouts people already have.

Stable Diffusion was trained on LAION's (image, caption) pairs; fine-tuning scripts read
a folder of pairs. minisd reads the same two layouts:

 1. Hugging Face's ``imagefolder``: the images, and a ``metadata.jsonl`` (one JSON object a
    line) or ``metadata.csv`` (a header row) beside them, with a ``file_name`` column (the
    image's path, relative to the metadata file) and a caption column:

        {"file_name": "cat.png", "text": "a black cat on a sofa"}

    The caption column is ``--caption-column`` if given, else "text" (the default of
    diffusers' examples/text_to_image/train_text_to_image.py), else the first column that
    is not file_name (what that script takes when given no column). A caption may be a list
    of captions (as that script allows): each one becomes a pair with the image.
 2. image + caption file: ``cat.png`` and ``cat.txt`` side by side (the kohya / DreamBooth
    layout), in the folder and its subfolders.

Images are PNG, JPEG or WebP (a metadata row may name any file Pillow reads) of any size
and mode: turned upright by their EXIF orientation, transparent ones composited on white
(as the shapes and emoji datasets are drawn), grey and palette ones converted to RGB, then
resized so that the shorter side is ``resolution`` (Lanczos when shrinking, bicubic when
enlarging) and centre-cropped to ``resolution`` x ``resolution``. SD v1.5 trained at 512 x
512 the same way (resize the shorter side, crop); minisd trains at 32 or 64.

Nothing is left out silently. Every problem is collected before anything trains: an image
that cannot be read, an image with no caption or an empty one, a metadata row that names a
file that is not there or has no file_name, a line of metadata.jsonl that is not JSON.
``load_folder`` raises BadData listing them (the count of each kind and the first few
names), or, with ``skip_bad=True``, leaves those pairs out and says which in
``FolderDataset.skipped``. A folder with no images at all is always an error.

``validation_split`` holds a seeded fraction of the images out of training, for
``minisd eval``; the model folder's logs/dataset.json records which (``write_record``).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
DEFAULT_CAPTION_COLUMN = "text"  # diffusers' train_text_to_image.py default
SHOWN = 5  # names shown per kind of problem
RECORD = os.path.join("logs", "dataset.json")  # in a model folder: what it was trained on


class BadData(ValueError):
    """The folder's data has problems (listed in ``problems``); nothing was trained."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: its kind (a key of KINDS), the file or row, and why."""

    kind: str
    name: str
    detail: str = ""


# The kinds of problem, in the order they are reported, and how a count of them reads.
KINDS = {
    "unreadable": "that cannot be read",
    "no caption": "with no caption",
    "empty caption": "with an empty caption",
    "caption not text": "whose caption is not text",
    "missing file": "naming a file that is not there",
    "bad row": "of metadata that cannot be read",
}
_NOUNS = {"missing file": "metadata row", "bad row": "line"}


class FolderDataset(NamedTuple):
    images: np.ndarray  # uint8 (N, R, R, 3): the training pairs' images
    captions: list  # N captions
    files: list  # N file names (relative to the folder), one per pair
    validation_files: list  # the images held out (validation_split), sorted
    skipped: list  # Problems left out (skip_bad=True)
    layout: str  # "metadata.jsonl", "metadata.csv" or "txt"
    caption_column: str | None  # metadata layouts: the column the captions came from
    resolution: int


def describe(problems: list, shown: int = SHOWN) -> str:
    """'2 images with no caption (a.png, b.png), 1 metadata row naming a file that is not there (c.png)'."""
    parts = []
    for kind, what in KINDS.items():
        found = [p for p in problems if p.kind == kind]
        if not found:
            continue
        noun = _NOUNS.get(kind, "image")
        first = found[0].name + (f": {found[0].detail}" if found[0].detail else "")  # why, once a kind
        names = ", ".join([first] + [p.name for p in found[1:shown]])
        more = f", and {len(found) - shown} more" if len(found) > shown else ""
        parts.append(f"{len(found)} {noun}{'s' if len(found) != 1 else ''} {what} ({names}{more})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# Finding the pairs: file names and captions, before any image is opened
# ---------------------------------------------------------------------------------------


def _image_files(root: str) -> list[str]:
    """Every PNG/JPEG/WebP under root (hidden files and folders skipped), relative, '/'-separated, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def _caption_values(value, name: str, problems: list) -> list[str]:
    """The captions one metadata cell holds: a string, or a list of strings (one pair each)."""
    if value is None:
        problems.append(Problem("no caption", name))
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        problems.append(Problem("caption not text", name, f"{value!r}"[:40]))
        return []
    captions = [" ".join(v.split()) for v in values]
    captions = [c for c in captions if c]
    if not captions:
        problems.append(Problem("empty caption", name))
    return captions


def _read_rows(path: str, problems: list) -> tuple[list[dict], list[str]]:
    """The rows of metadata.jsonl / metadata.csv that name a file, as dicts, and the columns in order of first use."""
    rows, columns = [], {}

    def take(number, row):
        if not isinstance(row, dict):
            problems.append(Problem("bad row", f"line {number}", "not a JSON object"))
        elif not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
            problems.append(Problem("bad row", f"line {number}", "no file_name"))
        else:
            rows.append(row)

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                columns = dict.fromkeys(reader.fieldnames or [])
                for row in reader:
                    take(reader.line_num, {k: v for k, v in row.items() if k is not None})
            else:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        problems.append(Problem("bad row", f"line {number}", f"not JSON ({e.msg})"))
                        continue
                    if isinstance(row, dict):
                        columns.update(dict.fromkeys(row))
                    take(number, row)
    except UnicodeDecodeError as e:
        raise BadData(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows, list(columns)


def pick_caption_column(columns: list[str], given: str | None, where: str) -> str:
    """--caption-column if given (it must be a column), else "text", else the first column besides file_name."""
    others = [c for c in columns if c != "file_name"]
    if given is not None:
        if given not in columns or given == "file_name":
            raise BadData(f"{where} has no caption column {given!r} (--caption-column); its columns are "
                          f"{', '.join(columns) or 'none'}")
        return given
    if DEFAULT_CAPTION_COLUMN in others:
        return DEFAULT_CAPTION_COLUMN
    if not others:
        raise BadData(f"{where} has no caption column: only {', '.join(columns) or 'no columns'}; "
                      "add a \"text\" column with each image's caption")
    return others[0]


def scan(root: str, caption_column: str | None = None):
    """The folder's pairs without opening an image: ([(file, caption), ...], problems, layout, column).

    file is relative to root, '/'-separated. Raises BadData for a folder that is not one of
    the two layouts (no images; two metadata files; metadata only in subfolders).
    """
    if not os.path.isdir(root):
        raise BadData(f"{root} is not a folder" if os.path.exists(root) else f"{root}: no such folder")
    metadata = [m for m in METADATA_FILES if os.path.isfile(os.path.join(root, m))]
    if len(metadata) > 1:
        raise BadData(f"{root} has both {' and '.join(metadata)}; keep one")
    images = _image_files(root)
    problems, pairs = [], []
    if metadata:
        layout = metadata[0]
        where = os.path.join(root, layout)
        rows, columns = _read_rows(where, problems)
        column = pick_caption_column(columns, caption_column, where)
        named = set()
        for row in rows:
            name = os.path.normpath(row["file_name"].strip().replace("\\", "/")).replace(os.sep, "/")
            named.add(name)
            if not os.path.isfile(os.path.join(root, name)):
                problems.append(Problem("missing file", name))
                continue
            pairs += [(name, c) for c in _caption_values(row.get(column), name, problems)]
        problems += [Problem("no caption", f, f"no row in {layout}") for f in images if f not in named]
    else:
        nested = sorted({os.path.relpath(folder, root) for folder, _, files in os.walk(root)
                         if any(m in files for m in METADATA_FILES)})
        if nested:
            raise BadData(f"{root} has no metadata.jsonl or metadata.csv of its own, but {nested[0]} has one: "
                          f"give --dataset {os.path.join(root, nested[0])}")
        layout, column = "txt", None
        for name in images:
            txt = os.path.splitext(os.path.join(root, name))[0] + ".txt"
            if not os.path.isfile(txt):
                problems.append(Problem("no caption", name, f"no {os.path.basename(txt)}"))
                continue
            try:
                with open(txt, encoding="utf-8-sig") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                problems.append(Problem("caption not text", name, f"{os.path.basename(txt)}: "
                                        f"{getattr(e, 'reason', None) or e.strerror}"))
                continue
            pairs += [(name, c) for c in _caption_values(text, name, problems)]
    if not images and not pairs:
        others = sorted(f for f in os.listdir(root) if not f.startswith("."))
        found = f"it holds {', '.join(others[:SHOWN])}{', ...' if len(others) > SHOWN else ''}" if others \
            else "it is empty"
        raise BadData(f"{root} holds no images (PNG, JPEG or WebP, captioned by a metadata.jsonl / metadata.csv "
                      f"or a .txt beside each image); {found}", problems)
    return pairs, problems, layout, column


# ---------------------------------------------------------------------------------------
# Opening an image: upright, on white, RGB, resized and centre-cropped
# ---------------------------------------------------------------------------------------


def to_rgb_on_white(image):
    """A PIL image of any mode -> RGB; transparency composited on white (255, 255, 255)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: scale to 8 bits (convert clips)
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def fit_square(image, resolution: int) -> np.ndarray:
    """Resize so the shorter side is ``resolution`` (Lanczos down, bicubic up), then crop the centre square."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def load_image(path: str, resolution: int) -> np.ndarray:
    """One image file as uint8 (resolution, resolution, 3); OSError / ValueError if Pillow cannot read it."""
    import warnings

    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # an image too large to be one
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            return fit_square(to_rgb_on_white(image), resolution)


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def split_files(files: list[str], fraction: float, seed: int) -> list[str]:
    """The images held out: round(fraction * N) of them (at least 1 for a fraction > 0), drawn by seed; sorted."""
    if not fraction:
        return []
    n = max(1, round(fraction * len(files)))
    if n >= len(files):
        raise BadData(f"--validation-split {fraction:g} would hold out {n} of the {len(files)} images, leaving "
                      "none to train on")
    order = np.random.default_rng(seed).permutation(len(files))
    return sorted(files[i] for i in order[:n])


def load_folder(root: str, resolution: int = 32, caption_column: str | None = None, skip_bad: bool = False,
                validation_split: float = 0.0, seed: int = 0, held_out: list | None = None) -> FolderDataset:
    """Read a captioned folder (layouts above). ``held_out``: the images to hold out (a recorded split),
    instead of drawing ``validation_split`` of them."""
    pairs, problems, layout, column = scan(root, caption_column)
    images = {}
    for name in dict.fromkeys(f for f, _ in pairs):
        try:
            images[name] = load_image(os.path.join(root, name), resolution)
        except Exception as e:  # Pillow raises many kinds (OSError, ValueError, SyntaxError, ...) for a bad file
            why = str(e).split("\n")[0].replace(repr(os.path.join(root, name)), "").strip(" :")
            problems.append(Problem("unreadable", name, why[:120] or type(e).__name__))
    if problems and not skip_bad:
        raise BadData(f"{root}: {describe(problems)}; fix or remove them, or pass --skip-bad to train without "
                      "them", problems)
    pairs = [(f, c) for f, c in pairs if f in images]
    if not pairs:
        raise BadData(f"{root}: no image is left to train on once the bad ones are left out: {describe(problems)}",
                      problems)
    files = list(images)
    held = sorted(f for f in files if f in set(held_out)) if held_out is not None \
        else split_files(files, validation_split, seed)
    train = [(f, c) for f, c in pairs if f not in set(held)]
    if not train:
        raise BadData(f"{root}: every image is held out for validation; none is left to train on")
    return FolderDataset(np.stack([images[f] for f, _ in train]), [c for _, c in train], [f for f, _ in train],
                         held, problems, layout, column, resolution)


# ---------------------------------------------------------------------------------------
# What a model folder records of the data it was trained on (for `minisd eval`)
# ---------------------------------------------------------------------------------------


def write_record(out: str, root: str, data: FolderDataset, validation_split: float, seed: int) -> dict:
    """OUT/logs/dataset.json: the folder, its layout and resolution, the held-out images, what was skipped."""
    from minisd.io import write_json

    record = {"dataset": os.path.abspath(root), "layout": data.layout, "caption_column": data.caption_column,
              "resolution": data.resolution, "validation_split": validation_split, "seed": seed,
              "train_images": len(set(data.files)), "train_pairs": len(data.files),
              "validation": list(data.validation_files),
              "skipped": [{"file": p.name, "problem": p.kind, "detail": p.detail} for p in data.skipped]}
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    write_json(os.path.join(out, RECORD), record)
    return record


def read_record(out: str) -> dict | None:
    """OUT/logs/dataset.json, or None where the model was not trained on a folder (or the file is unreadable)."""
    try:
        with open(os.path.join(out, RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("dataset"), str) else None


def validation_images(model: str) -> tuple[np.ndarray, str] | None:
    """For `minisd eval`: (uint8 images, what they are) of the folder a model was trained on, the held-out
    images where its split kept some, else the training images; None for a model not trained on a folder."""
    record = read_record(model)
    if record is None:
        return None
    root, held = record["dataset"], record.get("validation") or []
    names = held or sorted({f for f, _ in scan(root, record.get("caption_column"))[0]}
                           - {s["file"] for s in record.get("skipped", [])})
    images = [load_image(os.path.join(root, f), int(record["resolution"])) for f in names]
    what = (f"{len(names)} held-out images of {root}" if held else
            f"{len(names)} training images of {root} (it was trained with no --validation-split)")
    return np.stack(images), what
