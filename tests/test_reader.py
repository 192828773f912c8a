"""The shapes reader reads back what the dataset drew, also through noise and blur."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from minisd.data import reader, shapes


@pytest.fixture(scope="module")
def every():
    return shapes.every_image("all")


def _blur(img, radius):
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def _noisy(img, rng, sigma):
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def test_reads_every_clean_image(every):
    for img, rec in zip(every.images, every.records):
        assert reader.read(img).matches(rec), (rec, reader.read(img))


def test_reads_through_noise_and_blur(every):
    rng = np.random.default_rng(0)
    for i, (img, rec) in enumerate(zip(every.images, every.records)):
        if i % 3:  # a third of the 1620 images is enough to cover every combination
            continue
        for seen in (_noisy(img, rng, 25), _blur(img, 1.0), _noisy(_blur(img, 0.8), rng, 20)):
            got = reader.read(seen)
            assert got.matches(rec), (rec, got)
    # floats in [0, 1] read the same
    assert reader.read(every.images[5] / 255.0).matches(every.records[5])


def test_reads_shapes_drawn_by_another_rasteriser():
    """Pillow's ellipse, rectangle and polygon, anti-aliased by 4x supersampling, in
    slightly-off colours: not the dataset's own pixels, so not a template lookup."""
    rng = np.random.default_rng(1)
    for rec in shapes.every_image("all").records[::7]:
        s, (cx, cy) = shapes.SIZES[rec.size] * 4, (c * 4 for c in rec.center)
        big = Image.new("RGB", (128, 128), "white")
        draw = ImageDraw.Draw(big)
        color = tuple(int(v) for v in np.clip(np.array(shapes.COLORS[rec.color]) + rng.integers(-20, 21, 3), 0, 255))
        box = (cx - s // 2, cy - s // 2, cx + s // 2 - 1, cy + s // 2 - 1)
        if rec.shape == "circle":
            draw.ellipse(box, fill=color)
        elif rec.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=color)
        img = np.asarray(big.resize((32, 32), Image.BOX))
        assert reader.read(img).matches(rec), (rec, reader.read(img))


def test_ignores_specks_and_reads_blank_as_none():
    img = shapes.render("purple", "triangle", "small", "bottom right")
    img[2, 2] = img[3, 30] = (0, 0, 0)  # stray dark pixels
    assert reader.read(img).matches(shapes.ShapeRecord("purple", "triangle", "small", "bottom right"))
    blank = reader.read(np.full((32, 32, 3), 255, np.uint8))
    assert blank == reader.Reading(None, None, None, None)
    faint = reader.read(_noisy(np.full((32, 32, 3), 255, np.uint8), np.random.default_rng(1), 20))
    assert faint.color is None and faint.shape is None
    assert not blank.matches(shapes.ShapeRecord("red", "circle", "small", "center"))


def test_read_batch_and_bad_input():
    ds = shapes.make_dataset(6, seed=2)
    assert [r.matches(rec) for r, rec in zip(reader.read_batch(ds.images), ds.records)] == [True] * 6
    with pytest.raises(ValueError, match="RGB image"):
        reader.read(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="batch"):
        reader.read_batch(np.zeros((32, 32, 3)))
