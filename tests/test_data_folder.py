"""Captioned image folders (minisd/data/folder.py): both layouts, odd images, and every kind of bad data.

``make_folder`` is shared with test_train_own.py: a folder of small images made here, in
either layout, with the odd ones a real folder has (RGBA, grey, palette, non-square, WebP).
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from minisd.data import folder

RED, BLUE, GREEN = (220, 40, 40), (40, 80, 220), (40, 160, 60)


def odd_images():
    """name -> (PIL image, caption): the kinds of file a real folder holds."""
    half_red = Image.new("RGBA", (40, 40), (*RED, 0))
    half_red.paste(Image.new("RGBA", (20, 40), (*RED, 255)), (0, 0))  # left half opaque, right transparent
    wide = Image.new("RGB", (40, 20), RED)  # 10 px red | 20 px blue | 10 px green
    wide.paste(Image.new("RGB", (20, 20), BLUE), (10, 0))
    wide.paste(Image.new("RGB", (10, 20), GREEN), (30, 0))
    palette = Image.new("RGB", (32, 32), GREEN).convert("P", palette=Image.ADAPTIVE, colors=4)
    return {
        "rgba.png": (half_red, "a red half on white"),
        "grey.jpg": (Image.new("L", (50, 33), 100), "a grey square"),
        "wide.png": (wide, "red blue green stripes"),
        "palette.png": (palette, "a green square"),
        "sub/blue.webp": (Image.new("RGB", (96, 96), BLUE), "a blue square"),
        "small.jpeg": (Image.new("RGB", (8, 12), RED), "a tiny red picture"),
    }


def make_folder(root, layout="txt", images=None, extra_rows=(), column="text"):
    """Write ``images`` (default odd_images()) into root in ``layout``: "txt" (a .txt beside each image),
    "jsonl" or "csv" (metadata with file_name and ``column``). extra_rows: more metadata rows."""
    images = odd_images() if images is None else images
    os.makedirs(root, exist_ok=True)
    rows = []
    for name, (image, caption) in images.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
        if layout == "txt" and caption is not None:
            with open(os.path.splitext(path)[0] + ".txt", "w") as f:
                f.write(caption)
        rows.append({"file_name": name, column: caption})
    rows += list(extra_rows)
    if layout == "jsonl":
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif layout == "csv":
        import csv

        with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", column])
            w.writeheader()
            w.writerows(rows)
    return str(root)


def by_file(data):
    return {f: (im, c) for f, im, c in zip(data.files, data.images, data.captions)}


# --- the two layouts, and what becomes of odd images --------------------------------------------


@pytest.mark.parametrize("layout", ["txt", "jsonl", "csv"])
def test_every_layout_reads_the_same_pairs(tmp_path, layout):
    data = folder.load_folder(make_folder(tmp_path / layout, layout), resolution=32)
    expected = {name: caption for name, (_, caption) in odd_images().items()}
    assert dict(zip(data.files, data.captions)) == expected
    assert data.images.shape == (6, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.layout == ("txt" if layout == "txt" else f"metadata.{layout}")
    assert data.skipped == [] and data.validation_files == []


def test_odd_images_become_rgb_on_white_resized_and_centre_cropped(tmp_path):
    got = by_file(folder.load_folder(make_folder(tmp_path), resolution=32))
    rgba = got["rgba.png"][0].astype(int)
    assert (np.abs(rgba[:, :14] - RED).max() <= 1) and (rgba[:, 18:] == 255).all()  # transparent -> white
    grey = got["grey.jpg"][0].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert abs(grey.mean() - 100) <= 2
    # 40 x 20 -> 64 x 32 (the shorter side to 32) -> its middle 32 columns: the blue stripe, x in [10, 30)
    wide = got["wide.png"][0].astype(int)
    assert np.abs(wide[:, 2:30] - BLUE).max() <= 3
    assert (np.abs(got["palette.png"][0].astype(int) - GREEN).max() <= 1)
    assert np.abs(got["sub/blue.webp"][0].astype(int) - BLUE).max() <= 6  # lossy WebP, shrunk 3x
    assert np.abs(got["small.jpeg"][0].astype(int) - RED).max() <= 6  # enlarged 4x (bicubic)


def test_resolution_64(tmp_path):
    data = folder.load_folder(make_folder(tmp_path), resolution=64)
    assert data.images.shape == (6, 64, 64, 3)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF Orientation 6 (rotate 90 clockwise to view) is read upright."""
    stored = Image.new("RGB", (20, 40), BLUE)  # stored 20 wide, 40 tall: red on its top 15 rows
    stored.paste(Image.new("RGB", (20, 15), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "phone.txt").write_text("a photo")
    image = folder.load_folder(str(tmp_path), resolution=32).images[0].astype(int)
    # upright: 40 wide, 20 tall, red in x [25, 40); at 64 x 32 red is x [40, 64), and the crop x [16, 48)
    assert np.abs(image[:, -4:] - RED).max() <= 12 and np.abs(image[:, :20] - BLUE).max() <= 12


# --- captions ------------------------------------------------------------------------------------


def test_caption_column_default_is_text_then_the_first_other_column(tmp_path):
    rows = [{"file_name": "a.png", "notes": "ignored", "text": "the caption"}]
    make_folder(tmp_path / "t", "jsonl", images={"a.png": (Image.new("RGB", (8, 8)), None)}, column="unused")
    with open(tmp_path / "t" / "metadata.jsonl", "w") as f:
        f.write(json.dumps(rows[0]) + "\n")
    assert folder.load_folder(str(tmp_path / "t")).captions == ["the caption"]
    with open(tmp_path / "t" / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "a.png", "prompt": "from prompt", "other": "x"}) + "\n")
    data = folder.load_folder(str(tmp_path / "t"))
    assert data.captions == ["from prompt"] and data.caption_column == "prompt"
    assert folder.load_folder(str(tmp_path / "t"), caption_column="other").captions == ["x"]
    with pytest.raises(folder.BadData, match=r"no caption column 'caption' \(--caption-column\); its columns "
                                             r"are file_name, prompt, other"):
        folder.load_folder(str(tmp_path / "t"), caption_column="caption")


def test_a_list_of_captions_gives_one_pair_each(tmp_path):
    image = Image.new("RGB", (8, 8))
    root = make_folder(tmp_path, "jsonl", images={"a.png": (image, ["first", "second  one "])})
    data = folder.load_folder(root)
    assert data.captions == ["first", "second one"] and data.files == ["a.png", "a.png"]
    assert (data.images[0] == data.images[1]).all()


# --- bad data: counted, named, and never silent ---------------------------------------------------


def broken_folder(root, layout):
    """Two good images and one of every kind of trouble the layout can have."""
    images = {"good1.png": (Image.new("RGB", (8, 8), RED), "a red one"),
              "good2.png": (Image.new("RGB", (8, 8), BLUE), "a blue one"),
              "nocap.png": (Image.new("RGB", (8, 8)), None),
              "empty.png": (Image.new("RGB", (8, 8)), "   ")}
    extra = [{"file_name": "gone.png", "text": "not there"}, {"text": "no file name"}] if layout == "jsonl" else []
    make_folder(root, layout, images, extra_rows=extra)
    with open(os.path.join(root, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n but then nothing")
    if layout == "txt":
        (root / "broken.txt").write_text("a broken image")
    else:
        with open(os.path.join(root, "metadata.jsonl"), "a") as f:
            f.write('{"file_name": "broken.png", "text": "a broken image"}\n{not json\n')
        # nocap.png's row has "text": null; norow.png has no row at all
        Image.new("RGB", (8, 8)).save(os.path.join(root, "norow.png"))
    return str(root)


def test_bad_data_stops_with_every_problem_counted_and_named(tmp_path):
    with pytest.raises(folder.BadData) as e:
        folder.load_folder(broken_folder(tmp_path / "j", "jsonl"))
    message = str(e.value)
    for part in ("1 image that cannot be read (broken.png", "2 images with no caption (nocap.png, norow.png",
                 "1 image with an empty caption (empty.png)",
                 "1 metadata row naming a file that is not there (gone.png)",
                 "2 lines of metadata that cannot be read (line 6: no file_name, line 8",
                 "--skip-bad"):
        assert part in message, part
    assert "\n" not in message
    kinds = sorted(p.kind for p in e.value.problems)
    assert kinds == ["bad row", "bad row", "empty caption", "missing file", "no caption", "no caption", "unreadable"]

    with pytest.raises(folder.BadData) as e:
        folder.load_folder(broken_folder(tmp_path / "t", "txt"))
    assert "1 image with no caption (nocap.png: no nocap.txt)" in str(e.value)
    assert "1 image that cannot be read (broken.png" in str(e.value)


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_skip_bad_leaves_out_the_bad_pairs_and_says_which(tmp_path, layout):
    data = folder.load_folder(broken_folder(tmp_path, layout), skip_bad=True)
    assert sorted(data.files) == ["good1.png", "good2.png"]
    assert {p.name for p in data.skipped} >= {"broken.png", "nocap.png", "empty.png"}


def test_only_the_first_few_names_are_shown(tmp_path):
    images = {f"{i:02d}.png": (Image.new("RGB", (8, 8)), None) for i in range(9)}
    images["ok.png"] = (Image.new("RGB", (8, 8)), "fine")
    with pytest.raises(folder.BadData, match=r"9 images with no caption \(00.png: no 00.txt, 01.png, 02.png, "
                                             r"03.png, 04.png, and 4 more\)"):
        folder.load_folder(make_folder(tmp_path, images=images))


def test_a_folder_with_no_images_is_always_an_error(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    for skip in (False, True):
        with pytest.raises(folder.BadData, match="holds no images .* it holds notes.md"):
            folder.load_folder(str(tmp_path), skip_bad=skip)
    with pytest.raises(folder.BadData, match="no such folder"):
        folder.load_folder(str(tmp_path / "nope"))
    # nothing left once the bad ones are out
    make_folder(tmp_path / "bad", images={"a.png": (Image.new("RGB", (8, 8)), None)})
    with pytest.raises(folder.BadData, match="no image is left"):
        folder.load_folder(str(tmp_path / "bad"), skip_bad=True)


def test_folder_layout_mistakes_are_named(tmp_path):
    make_folder(tmp_path / "both", "jsonl")
    (tmp_path / "both" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(folder.BadData, match="both metadata.jsonl and metadata.csv"):
        folder.load_folder(str(tmp_path / "both"))
    make_folder(tmp_path / "split" / "train", "jsonl")
    with pytest.raises(folder.BadData, match="give --dataset .*split/train"):
        folder.load_folder(str(tmp_path / "split"))
    make_folder(tmp_path / "only", "jsonl", images={"a.png": (Image.new("RGB", (8, 8)), "x")})
    (tmp_path / "only" / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(folder.BadData, match="no caption column: only file_name"):
        folder.load_folder(str(tmp_path / "only"))


# --- the validation split ---------------------------------------------------------------------------


def test_validation_split_is_seeded_and_a_recorded_split_is_kept(tmp_path):
    images = {f"{i}.png": (Image.new("RGB", (8, 8), (i, 0, 0)), f"image {i}") for i in range(10)}
    root = make_folder(tmp_path, images=images)
    a = folder.load_folder(root, validation_split=0.3, seed=1)
    assert len(a.validation_files) == 3 and not set(a.validation_files) & set(a.files)
    assert len(a.files) == 7
    assert folder.load_folder(root, validation_split=0.3, seed=1).validation_files == a.validation_files
    assert folder.load_folder(root, validation_split=0.3, seed=2).validation_files != a.validation_files
    # another seed, but the recorded list: the same images held out
    kept = folder.load_folder(root, validation_split=0.5, seed=7, held_out=a.validation_files)
    assert kept.validation_files == a.validation_files
    assert len(folder.load_folder(root, validation_split=0.01).validation_files) == 1  # at least one
    with pytest.raises(folder.BadData, match="leaving none to train on"):
        folder.load_folder(root, validation_split=1.0)


def test_the_record_gives_eval_the_held_out_images(tmp_path):
    images = {f"{i}.png": (Image.new("RGB", (8, 8), (20 * i, 0, 0)), f"image {i}") for i in range(5)}
    root = make_folder(tmp_path / "data", images=images)
    data = folder.load_folder(root, validation_split=0.4, seed=0)
    folder.write_record(str(tmp_path / "model"), root, data, 0.4, 0)
    held, what = folder.validation_images(str(tmp_path / "model"))
    assert held.shape == (2, 32, 32, 3) and "2 held-out images" in what
    expected = [folder.load_image(os.path.join(root, f), 32) for f in data.validation_files]
    np.testing.assert_array_equal(held, np.stack(expected))
    assert folder.validation_images(str(tmp_path / "no-model")) is None
