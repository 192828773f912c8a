"""The emoji dataset: real drawn images with real names, rendered from a colour emoji font.

Where the shapes dataset is a toy with a grammar, emoji are small pictures people drew,
each with the name the Unicode standard gives it: U+1F34E "red apple", U+1F600
"grinning face". That makes a second, less regular text-to-image dataset, closer in kind
to SD's captioned images (at 32x32 or 64x64 instead of 512x512, about 1,300 pictures
instead of LAION's billions).

Images come from Google's Noto Color Emoji (Debian/Ubuntu: ``apt-get install
fonts-noto-color-emoji``), drawn with Pillow. The font is a bitmap font (CBDT): its
glyphs exist at one size only, 109 px (a 136 x 128 bitmap), so each emoji is drawn at 109,
centred in a square, composited onto white, and resized. Another font can be given with
``font=PATH`` (``minisd train --font PATH``; a scalable font is drawn at the same size).

The emoji are the single code points of the usual emoji blocks that have a Unicode name
in this Python's ``unicodedata`` and a glyph in the font (sequences such as flags,
skin tones and family ZWJ sequences are left out: one code point, one name).
Captions are the names lower-cased.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import unicodedata
from typing import NamedTuple

import numpy as np

FONT_SIZE = 109  # the one size NotoColorEmoji's bitmaps exist at
DEFAULT_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",
)
INSTALL_HINT = ("install it with `apt-get install fonts-noto-color-emoji` (Debian/Ubuntu), or give the path "
                "of an emoji font: `minisd train --font PATH`, or font=PATH in Python")

# Blocks that hold emoji; the font decides which of their code points it draws.
_RANGES = ((0x2190, 0x21FF), (0x2300, 0x23FF), (0x2460, 0x24FF), (0x25A0, 0x27BF),
           (0x2900, 0x297F), (0x2B00, 0x2BFF), (0x3030, 0x3030), (0x303D, 0x303D),
           (0x3297, 0x3299), (0x1F000, 0x1F1E5), (0x1F200, 0x1F3FA), (0x1F400, 0x1FAFF))
# Not pictures on their own: skin-tone modifiers (inside 0x1F3FB-0x1F3FF, excluded above),
# regional indicators (0x1F1E6-0x1F1FF, halves of flags, excluded above) and marks.
_SKIP_CATEGORIES = {"Mn", "Me", "Cf", "Sk"}


class EmojiFontNotFound(FileNotFoundError):
    """No emoji font where we looked."""


class EmojiDataset(NamedTuple):
    images: np.ndarray  # uint8 (N, size, size, 3)
    captions: list  # N lower-cased Unicode names
    records: list  # N emoji characters


def find_font(font: str | None = None) -> str:
    """The path of the emoji font: ``font`` if given, else Noto Color Emoji where systems put it."""
    if font is not None:
        if not os.path.isfile(font):
            raise EmojiFontNotFound(f"emoji font {font!r} does not exist; {INSTALL_HINT}")
        return font
    for path in DEFAULT_FONT_PATHS:
        if os.path.isfile(path):
            return path
    if shutil.which("fc-match"):  # fontconfig knows where this system keeps it
        try:
            path = subprocess.run(["fc-match", "-f", "%{file}", "Noto Color Emoji"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            path = ""
        if path and "emoji" in os.path.basename(path).lower() and os.path.isfile(path):
            return path
    raise EmojiFontNotFound(f"Noto Color Emoji font not found (looked in {', '.join(DEFAULT_FONT_PATHS)}); "
                            f"{INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _load_font(path: str):
    from PIL import ImageFont

    try:
        return ImageFont.truetype(path, FONT_SIZE)
    except OSError as e:
        raise ValueError(f"cannot use {path} as an emoji font at {FONT_SIZE} px: {e}") from None


def _draw_rgba(char: str, font_path: str):
    """The emoji at 109 px on a transparent square, or None if the font has no glyph for it."""
    from PIL import Image, ImageDraw

    font = _load_font(font_path)
    left, top, right, bottom = font.getbbox(char)
    w, h = right - left, bottom - top
    if w <= 0 or h <= 0:
        return None
    # Every glyph of the font shares one em box; centring that box (not the glyph's ink)
    # keeps a small emoji small and a wide one wide, as the font designed them.
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(((side - w) // 2 - left, (side - h) // 2 - top), char, font=font,
                                embedded_color=True, fill=(0, 0, 0, 255))
    return canvas if canvas.getbbox() else None


def render_emoji(char: str, size: int = 32, font: str | None = None) -> np.ndarray:
    """One emoji as uint8 (size, size, 3) on white."""
    from PIL import Image

    if not isinstance(size, (int, np.integer)) or not 4 <= size <= 1024:
        raise ValueError(f"size must be an integer number of pixels in [4, 1024], got {size!r}")
    if not isinstance(char, str) or len(char) != 1:
        raise ValueError(f"expected one emoji character, got {char!r}")
    rgba = _draw_rgba(char, find_font(font))
    if rgba is None:
        raise ValueError(f"the emoji font has no glyph for U+{ord(char):04X} {char!r}")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    # Composite first, then resize: resizing a transparent image would blend the
    # (black) colour of transparent pixels into the edges.
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def caption(char: str) -> str:
    """The emoji's Unicode name, lower-cased: "🍎" -> "red apple"."""
    return unicodedata.name(char).lower()


@functools.lru_cache(maxsize=4)
def _emoji_in_font(font_path: str) -> tuple[str, ...]:
    chars = []
    for lo, hi in _RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if unicodedata.category(ch) in _SKIP_CATEGORIES or not unicodedata.name(ch, ""):
                continue
            if _draw_rgba(ch, font_path) is not None:
                chars.append(ch)
    return tuple(chars)


def emoji_list(font: str | None = None) -> list[str]:
    """Every emoji this dataset can draw with the font, in code point order."""
    return list(_emoji_in_font(find_font(font)))


def make_dataset(n: int | None = None, size: int = 32, seed: int = 0, font: str | None = None) -> EmojiDataset:
    """All emoji (n=None, in code point order), or n of them drawn without replacement by seed."""
    chars = emoji_list(font)
    if n is not None:
        if not isinstance(n, (int, np.integer)) or not 0 <= n <= len(chars):
            raise ValueError(f"n must be an integer in [0, {len(chars)}] (the emoji in the font), got {n!r}")
        pick = np.random.default_rng(seed).choice(len(chars), size=n, replace=False)
        chars = [chars[i] for i in pick]
    if not chars:
        return EmojiDataset(np.zeros((0, size, size, 3), np.uint8), [], [])
    images = np.stack([render_emoji(c, size, font) for c in chars])
    return EmojiDataset(images, [caption(c) for c in chars], list(chars))
