"""The shapes dataset against its spec (DESIGN.md), and the emoji dataset."""

import unicodedata

import numpy as np
import pytest

from minisd.data import emoji, shapes

SPEC_COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
               "yellow": (230, 200, 30), "purple": (140, 60, 190), "cyan": (30, 180, 200)}
SPEC_CENTRES = {"top left": (9, 9), "top right": (23, 9), "bottom left": (9, 23),
                "bottom right": (23, 23), "center": (16, 16)}
SPEC_SIDE = {"small": 8, "large": 14}
HELD_OUT = {("blue", "triangle"), ("yellow", "circle"), ("green", "square")}


@pytest.fixture(scope="module")
def every():
    return shapes.every_image("all")


def test_constants_are_the_spec():
    assert shapes.COLORS == SPEC_COLORS
    assert shapes.POSITIONS == SPEC_CENTRES
    assert shapes.SIZES == SPEC_SIDE
    assert set(shapes.SHAPES) == {"circle", "square", "triangle"}
    assert set(shapes.HELD_OUT) == HELD_OUT


def test_every_image_matches_the_spec(every):
    assert every.images.shape == (180 * 9, 32, 32, 3) and every.images.dtype == np.uint8
    for img, cap, r in zip(every.images, every.captions, every.records):
        assert cap == f"a {r.size} {r.color} {r.shape} in the {r.position}"
        ink = np.any(img != 255, axis=2)
        # two colours only: white background, the object's exact RGB
        assert np.all(img[~ink] == 255) and np.all(img[ink] == SPEC_COLORS[r.color])
        ys, xs = np.nonzero(ink)
        s = SPEC_SIDE[r.size]
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (s, s)  # exact extent
        cx, cy = SPEC_CENTRES[r.position]
        # bounding box [min, max + 1) centred on the position plus its jitter
        assert ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2) == (cx + r.dx, cy + r.dy)
        assert ink.sum() == s * s if r.shape == "square" else ink.sum() < s * s
    jitters = {(r.dx, r.dy) for r in every.records}
    assert jitters == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}


def test_shape_geometry():
    tri = shapes.render("red", "triangle", "large", "center")
    widths = np.any(tri != 255, axis=2).sum(axis=1)
    widths = widths[widths > 0]
    assert len(widths) == 14 and np.all(np.diff(widths) >= 0)  # apex up: rows widen downwards
    assert widths[0] <= 2 and widths[-1] == 14
    circ = np.any(shapes.render("red", "circle", "large", "center") != 255, axis=2)
    assert np.array_equal(circ, circ[::-1]) and np.array_equal(circ, circ[:, ::-1])  # symmetric about (16, 16)
    assert np.array_equal(circ, circ.T)
    assert abs(circ.sum() - np.pi * 7 ** 2) < 0.1 * np.pi * 7 ** 2  # a disc of radius 7
    # circle rule by brute force: pixel centre within s/2 of the centre
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    assert np.array_equal(circ, (xx - 16) ** 2 + (yy - 16) ** 2 <= 49)


def test_splits_keep_the_held_out_pairs_out():
    train = shapes.make_dataset(3000, "train", seed=1)
    held = shapes.make_dataset(300, "heldout", seed=1)
    assert not any((r.color, r.shape) in HELD_OUT for r in train.records)
    assert all((r.color, r.shape) in HELD_OUT for r in held.records)
    assert len({(r.color, r.shape, r.size, r.position) for r in train.records}) == 150
    assert {(r.color, r.shape) for r in held.records} == HELD_OUT
    for ds in (train, held):
        for i in range(0, len(ds.records), 97):
            assert np.array_equal(ds.images[i], shapes.render_record(ds.records[i]))
            assert shapes.parse_caption(ds.captions[i]) == shapes.ShapeRecord(
                *(getattr(ds.records[i], k) for k in ("color", "shape", "size", "position")))


def test_deterministic_by_seed():
    a, b, c = (shapes.make_dataset(64, seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert a.captions != c.captions


def test_bad_input():
    with pytest.raises(ValueError, match="colour"):
        shapes.render("pink", "circle", "small", "center")
    with pytest.raises(ValueError, match="position"):
        shapes.render("red", "circle", "small", "middle")
    with pytest.raises(ValueError, match="jitter"):
        shapes.render("red", "circle", "small", "center", dx=2)
    with pytest.raises(ValueError, match="split"):
        shapes.make_dataset(4, "test")
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.parse_caption("a huge red circle in the top left")


# --- emoji -----------------------------------------------------------------------------


def _font_or_skip():
    try:
        return emoji.find_font()
    except emoji.EmojiFontNotFound as e:
        pytest.skip(str(e))


def test_emoji_dataset():
    _font_or_skip()
    ds = emoji.make_dataset(40, size=32, seed=0)
    assert ds.images.shape == (40, 32, 32, 3) and ds.images.dtype == np.uint8
    for img, cap, ch in zip(ds.images, ds.captions, ds.records):
        assert cap == unicodedata.name(ch).lower()
        assert (np.abs(img.astype(int) - 255).sum(axis=2) > 30).mean() > 0.05  # something is drawn
    # composited on white: most emoji leave the corners of their square empty
    assert np.mean([img[0, 0].tolist() == [255, 255, 255] for img in ds.images]) > 0.5
    assert emoji.make_dataset(40, size=32, seed=0).captions == ds.captions
    apple = emoji.render_emoji("\U0001F34E", size=64)  # red apple
    assert apple.shape == (64, 64, 3)
    ink = np.abs(apple.astype(int) - 255).sum(axis=2) > 60
    r, g, b = apple[ink].astype(int).mean(axis=0)
    assert r > g + 50 and r > b + 50  # it is red
    assert "\U0001F34E" in emoji.emoji_list() and emoji.caption("\U0001F600") == "grinning face"


def test_missing_emoji_font_says_how_to_install(monkeypatch):
    monkeypatch.setattr(emoji, "DEFAULT_FONT_PATHS", ("/nonexistent/NotoColorEmoji.ttf",))
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)  # no fontconfig either
    with pytest.raises(emoji.EmojiFontNotFound, match="apt-get install fonts-noto-color-emoji"):
        emoji.make_dataset(4)


def test_emoji_errors(tmp_path):
    with pytest.raises(emoji.EmojiFontNotFound, match="fonts-noto-color-emoji"):
        emoji.find_font(str(tmp_path / "missing.ttf"))
    _font_or_skip()
    with pytest.raises(ValueError, match="size"):
        emoji.render_emoji("\U0001F34E", size=0)
    with pytest.raises(ValueError, match="no glyph"):
        emoji.render_emoji("A")


def test_load_dataset_by_name():
    from minisd.data import load_dataset

    every = load_dataset("shapes")
    assert every.images.shape == (150 * 9, 32, 32, 3)
    assert load_dataset("shapes", n=10, seed=3).captions == shapes.make_dataset(10, "train", 3).captions
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("shapes", size=64)
    _font_or_skip()
    small = load_dataset("emoji", n=3, size=64, seed=1)
    assert small.images.shape == (3, 64, 64, 3) and len(small.captions) == 3
