"""Datasets (shapes: procedural, the default; emoji: Noto Color Emoji with Unicode names)
and the reader that grades generated shapes images. Import the submodules directly:
``from minisd.data import shapes, emoji, reader``."""
