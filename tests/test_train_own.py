"""`minisd train` on your own data: a captioned folder trains every stage and generates, bad data
is named and stops the run (exit 2) or is left out with --skip-bad, and the held-out images
reach `minisd eval`.

The CLI trains the tiny models of test_train.py for a few steps (a second or two a stage), with
test_train_cli's ``tiny`` fixture.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from minisd import train as T
from minisd.cli import main
from test_data_folder import broken_folder, make_folder, odd_images
from test_train import TINY_TEXT, TINY_UNET, TINY_VAE, TINY_VISION
from test_train_cli import QUIET, cli, data, one_line, tiny  # noqa: F401  (data, tiny: fixtures)

FEW = ("--vae-steps", 2, "--clip-steps", 2, "--unet-steps", 2)


def same_training(a, b):
    """Two runs' records took the same steps: the same losses and the same EMA, bit for bit."""
    assert a["losses"] == b["losses"]
    for x, y in zip(a["ema"].shadow, b["ema"].shadow):
        np.testing.assert_array_equal(x, y)


def resume_is_exact(tmp_path, **kw):
    """train_unet(**kw) in tmp_path/full, and in tmp_path/cut stopped after 3 steps and resumed from its
    checkpoint (kw's checkpoint_every: 2): the same training. Returns the full run's record."""
    full = T.train_unet(str(tmp_path / "full"), **kw)
    T.train_unet(str(tmp_path / "cut"), stop_after=3, **kw)
    same_training(T.train_unet(str(tmp_path / "cut"), resume=True, **kw), full)
    return full


def generate(out, n=2):
    import minisd

    pipe = minisd.load_pipeline(str(out))
    return pipe(["a red half on white"] * n, steps=2, guidance_scale=2.0, seed=0)


# --- a folder trains every stage and generates ------------------------------------------------


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_a_captioned_folder_with_odd_and_bad_images_trains_and_generates(tiny, tmp_path, capsys, layout):
    data = make_folder(tmp_path / "data", layout)
    with open(os.path.join(data, "broken.png"), "wb") as f:
        f.write(b"not an image")
    if layout == "txt":
        (tmp_path / "data" / "broken.txt").write_text("broken")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "uncaptioned.png")
    out = tmp_path / "m"
    code, stdout, err = cli(capsys, "train", "all", "--dataset", data, "--skip-bad", *FEW, "--out", out, *QUIET)
    assert code == 0, err
    assert "--skip-bad: left out" in err and "broken.png" in err and "uncaptioned.png" in err
    assert "training on 6 images" in err
    images = generate(out)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    record = json.loads((out / "logs" / "dataset.json").read_text())
    assert record["dataset"] == os.path.abspath(data) and record["train_images"] == 6
    assert sorted(s["file"] for s in record["skipped"]) == ["broken.png", "uncaptioned.png"]
    report = json.loads((out / "logs" / "train_all.json").read_text())
    assert report["dataset"] == data


def test_stage_by_stage_at_resolution_64(tiny, tmp_path, capsys):
    data = make_folder(tmp_path / "data", "csv")
    out = tmp_path / "m"
    for stage in ("vae", "clip", "unet"):
        extra = ("--resolution", 64) if stage == "vae" else ()  # the later stages take the VAE's
        code, _, err = cli(capsys, "train", stage, "--dataset", data, *extra, "--steps", 2, "--out", out, *QUIET)
        assert code == 0, err
    assert json.loads((out / "vae" / "config.json").read_text())["sample_size"] == 64
    assert generate(out, 1).shape == (1, 64, 64, 3)
    code, _, err = cli(capsys, "train", "unet", "--dataset", data, "--resolution", 32, "--steps", 2, "--overwrite",
                       "--out", out, *QUIET)
    assert code == 2 and "trained at 64 x 64: give --resolution 64" in one_line(err)


# --- bad data: one line, exit 2, nothing written ----------------------------------------------------


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_bad_data_exits_2_naming_each_problem(tiny, tmp_path, capsys, layout):
    data = broken_folder(tmp_path / "data", layout)
    code, _, err = cli(capsys, "train", "vae", "--dataset", data, "--steps", 2, "--out", tmp_path / "m", *QUIET)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"minisd train vae: --dataset {data}: ")
    for part in ("cannot be read (broken.png", "no caption (nocap.png", "an empty caption (empty.png)",
                 "--skip-bad"):
        assert part in line, part
    if layout == "jsonl":
        assert "not there (gone.png)" in line and "metadata that cannot be read" in line
    assert not (tmp_path / "m").exists()
    code, _, err = cli(capsys, "train", "vae", "--dataset", data, "--skip-bad", "--steps", 2, "--out", tmp_path / "m",
                       *QUIET)
    assert code == 0 and "left out" in err and "training on 2 images" in err


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "holds no images"),
    (lambda root: (root.mkdir(), (root / "a.png").write_bytes(b"junk"), (root / "a.txt").write_text("x")),
     "no image is left"),
    (lambda root: None, "neither shapes nor emoji nor a folder"),
])
def test_no_images_exits_2_even_with_skip_bad(tiny, tmp_path, capsys, make, message):
    root = tmp_path / "data"
    make(root)
    code, _, err = cli(capsys, "train", "vae", "--dataset", root, "--skip-bad", "--out", tmp_path / "m", *QUIET)
    assert code == 2 and message in one_line(err)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "shapes", "--skip-bad"], "--skip-bad is for a --dataset folder"),
    (["--dataset", "shapes", "--validation-split", "0.1"], "--validation-split is for a --dataset folder"),
    (["--dataset", "emoji", "--resolution", "64"], "the emoji images are 32 x 32"),
    (["--resolution", "36", "--dataset", "DATA"], "--resolution 36 is not a multiple of 8"),
    (["--validation-split", "1.5", "--dataset", "DATA"], "--validation-split"),
    (["--caption-column", "caption", "--dataset", "DATA"], "no caption column 'caption' (--caption-column)"),
])
def test_folder_options_are_checked(tiny, tmp_path, capsys, args, message):
    data = make_folder(tmp_path / "data", "jsonl")
    args = [data if a == "DATA" else a for a in args]
    code, _, err = cli(capsys, "train", "vae", *args, "--out", tmp_path / "m", *QUIET)
    assert code == 2 and message in one_line(err)


def test_long_captions_are_warned_once_with_the_count(tiny, tmp_path, capsys):
    images = {name: (image, caption) for name, (image, caption) in odd_images().items()}
    images["long.png"] = (Image.new("RGB", (8, 8)), " ".join(["word"] * 90))
    images["longer.png"] = (Image.new("RGB", (8, 8)), " ".join(["other"] * 100))
    data = make_folder(tmp_path / "data", images=images)
    code, _, err = cli(capsys, "train", "all", "--dataset", data, *FEW, "--out", tmp_path / "m", *QUIET)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "tokens" in line]
    assert len(warned) == 1 and "2 of 8 captions have more than the 75 tokens" in warned[0]


# --- the validation split reaches eval ----------------------------------------------------------------


def test_validation_split_is_kept_by_later_stages_and_used_by_eval(tiny, tmp_path, capsys):
    images = {f"{i}.png": (Image.new("RGB", (16, 16), (20 * i, 100, 0)), f"image {i % 3}") for i in range(10)}
    data = make_folder(tmp_path / "data", images=images)
    out = tmp_path / "m"
    code, stdout, err = cli(capsys, "train", "vae", "--dataset", data, "--validation-split", 0.2, "--steps", 2,
                            "--out", out, *QUIET)
    assert code == 0, err
    assert "holding out 2" in stdout
    held = json.loads((out / "logs" / "dataset.json").read_text())["validation"]
    assert len(held) == 2
    # a later stage with another seed keeps the split; another fraction is refused
    code, _, err = cli(capsys, "train", "clip", "--dataset", data, "--validation-split", 0.5, "--steps", 2,
                       "--out", out, *QUIET)
    assert code == 2 and "held out 0.2" in one_line(err)
    for stage in ("clip", "unet"):
        code, _, err = cli(capsys, "train", stage, "--dataset", data, "--seed", 5, "--steps", 2, "--out", out, *QUIET)
        assert code == 0, err
    assert json.loads((out / "logs" / "dataset.json").read_text())["validation"] == held
    code, stdout, err = cli(capsys, "eval", "--model", out, "--out", tmp_path / "eval")
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["vae"]["images"] == 2 and "2 held-out images" in report["vae"]["on"]
    assert "adherence" not in report and "skipped" in stdout


def test_resume_on_a_folder_is_bit_exact(tmp_path):
    from minisd.data import folder

    d = folder.load_folder(make_folder(tmp_path / "data"))
    data = (d.images, list(d.captions))
    for out in ("full", "cut"):
        T.train_vae(str(tmp_path / out), steps=2, batch_size=4, config=TINY_VAE, progress=False, images=d.images)
        T.train_clip(str(tmp_path / out), steps=2, batch_size=4, text_config=TINY_TEXT, vision_config=TINY_VISION,
                     progress=False, data=data)
    resume_is_exact(tmp_path, steps=6, batch_size=4, lr=3e-3, config=TINY_UNET, progress=False, data=data,
                    checkpoint_every=2)


# --- model sizes: --config ------------------------------------------------------------------------------


def test_config_file_sizes_each_part(tiny, tmp_path, capsys):
    sizes = {"vae": {"block_out_channels": [8, 8, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
                     "up_block_types": ["UpDecoderBlock2D"] * 3, "latent_channels": 3},
             "text_encoder": {"hidden_size": 32, "num_attention_heads": 2, "_class_name": "ignored"},
             "vision_config": {"hidden_size": 32, "num_attention_heads": 2, "patch_size": 4},
             "unet": {"block_out_channels": [16, 16], "cross_attention_dim": 768}}
    config = tmp_path / "sizes.json"
    config.write_text(json.dumps(sizes))
    data = make_folder(tmp_path / "data")
    out = tmp_path / "m"
    code, _, err = cli(capsys, "train", "all", "--dataset", data, "--config", config, *FEW, "--out", out, *QUIET)
    assert code == 0, err
    assert "unet.cross_attention_dim is set from the text encoder's hidden_size" in err  # said, not silently
    saved = {part: json.loads((out / part / "config.json").read_text()) for part in ("vae", "text_encoder", "unet")}
    assert saved["vae"]["block_out_channels"] == [8, 8, 16] and saved["vae"]["latent_channels"] == 3
    assert saved["text_encoder"]["hidden_size"] == 32
    assert saved["unet"]["block_out_channels"] == [16, 16] and saved["unet"]["cross_attention_dim"] == 32
    assert saved["unet"]["in_channels"] == 3 and saved["unet"]["sample_size"] == 8  # 32 / 4 (VAE: f = 4)
    clip = json.loads((out / "clip" / "config.json").read_text())
    assert clip["vision_config"]["patch_size"] == 4
    assert generate(out, 1).shape == (1, 32, 32, 3)
    # the same sizes written inline
    code, _, err = cli(capsys, "train", "vae", "--dataset", data, "--config", json.dumps({"vae": sizes["vae"]}),
                       "--steps", 1, "--out", tmp_path / "inline", *QUIET)
    assert code == 0, err


@pytest.mark.parametrize("content, message", [
    ('{"unet": {"block_out_channels": "abc"}}', "unet: UNet2DConditionModel: config block_out_channels must be"),
    ('{"unet": {"block_out_channels": [32, 64, 128]}}', "down_block_types has 2 entries and block_out_channels 3"),
    ('{"vae": {"norm_num_groups": 5}}', "does not split into norm_num_groups=5"),
    ('{"text_encoder": {"hiden_size": 32}}', "text_encoder: CLIPTextModel: unknown config key 'hiden_size'"),
    ('{"vision_config": {"layers": 3}}', "vision_config:"),
    ('{"unet": {"layers_per_block": 100000000000}}', "more than this machine's memory"),
    ('{"decoder": {}}', "unknown part 'decoder' (the parts are vae, text_encoder, vision_config, unet)"),
    ('{"vae": [1, 2]}', "vae must be a JSON object"),
    ('[1, 2]', "expected a JSON object of parts"),
    ('{"vae": ', "not JSON"),
])
def test_a_bad_config_exits_2_naming_the_file_and_the_key(tiny, tmp_path, capsys, content, message):
    config = tmp_path / "sizes.json"
    config.write_text(content)
    code, _, err = cli(capsys, "train", "all", "--config", config, "--out", tmp_path / "m", *QUIET)
    assert code == 2
    line = one_line(err)
    assert f"--config {config}" in line and message in line
    assert not (tmp_path / "m").exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "vae", "--config", tmp_path / "no.json", "--out", tmp_path / "m", *QUIET)
    assert code == 2 and f"--config {tmp_path / 'no.json'}: No such file" in one_line(err)


# --- fine-tuning: --from --------------------------------------------------------------------------------

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(T.__file__)), "weights", "shapes")


def file_bytes(*path):
    with open(os.path.join(*path), "rb") as f:
        return f.read()


def weights(folder):
    from minisd.io import load_safetensors, weights_file

    return load_safetensors(weights_file(folder))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped model written by `minisd export` as a diffusers StableDiffusionPipeline folder (no clip/)."""
    target = tmp_path_factory.mktemp("exported") / "sd"
    assert main(["export", "--to", str(target)]) == 0
    return target


def package_listing():
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(SHIPPED) for f in files}


@pytest.mark.parametrize("source", ["shipped", "exported"])
def test_unet_on_a_new_folder_with_the_shipped_vae_and_text_encoder(tiny, tmp_path, capsys, source, exported):
    model = SHIPPED if source == "shipped" else str(exported)
    before = package_listing()
    data = make_folder(tmp_path / "data")
    out = tmp_path / "m"
    code, stdout, err = cli(capsys, "train", "unet", "--dataset", data, "--from", model if source != "shipped"
                            else "shipped", "--steps", 2, "--out", out, *QUIET)
    assert code == 0, err
    assert "frozen parts: vae from" in stdout and "(copied)" in stdout
    for part in ("vae", "text_encoder"):  # frozen: the source's, byte for byte
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        assert file_bytes(out, part, name) == file_bytes(model, part, name)
    assert file_bytes(out, "tokenizer", "tokenizer.json") == file_bytes(model, "tokenizer", "tokenizer.json")
    assert (out / "clip").is_dir() == (source == "shipped")
    # the UNet is the source's, fine-tuned: same sizes, weights moved a little from its own
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64]
    new, old = weights(out / "unet"), weights(os.path.join(model, "unet"))
    assert new.keys() == old.keys()
    moved = max(float(np.abs(new[k] - old[k]).max()) for k in new)
    assert 0 < moved < 0.05
    assert generate(out, 1).shape == (1, 32, 32, 3)
    assert package_listing() == before  # the package is only read


def test_from_with_a_new_unet_sized_in_config(tiny, tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    unet = {"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 2}
    code, _, err = cli(capsys, "train", "unet", "--dataset", data, "--from", "shipped", "--config",
                       json.dumps({"unet": unet}), "--steps", 2, "--out", tmp_path / "m", *QUIET)
    assert code == 0, err
    saved = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    assert saved["block_out_channels"] == [8, 16] and saved["cross_attention_dim"] == 64
    assert generate(tmp_path / "m", 1).shape == (1, 32, 32, 3)


def test_all_from_shipped_fine_tunes_every_part(tiny, tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "m"
    code, _, err = cli(capsys, "train", "all", "--dataset", data, "--from", "shipped", *FEW, "--out", out, *QUIET)
    assert code == 0, err
    assert file_bytes(out, "tokenizer", "tokenizer.json") == file_bytes(SHIPPED, "tokenizer", "tokenizer.json")
    for part in ("vae", "clip", "unet"):
        new, old = weights(out / part), weights(os.path.join(SHIPPED, part))
        assert new.keys() == old.keys(), part
        assert max(float(np.abs(new[k] - old[k]).max()) for k in new) < 0.05, part  # near the start, not random
    assert generate(out, 1).shape == (1, 32, 32, 3)


def test_from_keeps_the_parts_out_already_has(tiny, tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "m"
    assert cli(capsys, "train", "vae", "--dataset", data, "--steps", 2, "--out", out, *QUIET)[0] == 0
    own_vae = file_bytes(out, "vae", "diffusion_pytorch_model.safetensors")
    code, stdout, err = cli(capsys, "train", "unet", "--dataset", data, "--from", "shipped", "--steps", 2,
                            "--out", out, *QUIET)
    # OUT's VAE is tiny (latent 4 x 16 x 16): the shipped UNet takes its channels, and the sizes agree
    assert code == 0, err
    assert "vae already in" in stdout and "text_encoder from" in stdout
    assert file_bytes(out, "vae", "diffusion_pytorch_model.safetensors") == own_vae


@pytest.mark.parametrize("stage, args, message", [
    ("unet", ["--from", "NOWHERE"], "no such model folder"),
    ("clip", ["--from", "EXPORTED"], "has no clip/ (CLIP's two towers, which train clip fine-tunes)"),
    ("all", ["--from", "EXPORTED"], "has no clip/"),
    ("unet", ["--from", "shipped", "--resolution", "64"], "at 32 x 32: give --resolution 32"),
    ("unet", ["--from", "BETAS"], "trained with beta_end=0.02"),
])
def test_from_refuses_what_it_cannot_fine_tune(tiny, tmp_path, capsys, exported, stage, args, message):
    import shutil

    betas = tmp_path / "betas"
    shutil.copytree(SHIPPED, betas)
    config = json.loads((betas / "scheduler" / "scheduler_config.json").read_text())
    (betas / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 0.02}))
    names = {"NOWHERE": tmp_path / "nowhere", "EXPORTED": exported, "BETAS": betas}
    args = [names.get(a, a) for a in args]
    data = make_folder(tmp_path / "data")
    code, _, err = cli(capsys, "train", stage, "--dataset", data, *args, "--out", tmp_path / "m", *QUIET)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "m").exists()


def test_resume_from_shipped_is_bit_exact(tmp_path):
    from minisd.data import folder

    d = folder.load_folder(make_folder(tmp_path / "data"))
    for out in ("full", "cut"):
        T.take_frozen_parts(str(tmp_path / out), SHIPPED)
    resume_is_exact(tmp_path, steps=6, batch_size=4, lr=1e-4, progress=False, data=(d.images, list(d.captions)),
                    checkpoint_every=2, init=os.path.join(SHIPPED, "unet"))


# --- the time-to-quality log --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_parts(tmp_path_factory):
    """A tiny VAE and CLIP trained a few steps on 48 shapes images: what the UNet stage needs."""
    from minisd.data import shapes

    d = shapes.make_dataset(48, "train", seed=3)
    data = (d.images, list(d.captions))
    out = tmp_path_factory.mktemp("parts")
    T.train_vae(str(out), steps=2, batch_size=4, config=TINY_VAE, progress=False, images=d.images)
    T.train_clip(str(out), steps=2, batch_size=4, text_config=TINY_TEXT, vision_config=TINY_VISION, progress=False,
                 data=data)
    return str(out), data


def copy_parts(source, target):
    import shutil

    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(source, part), os.path.join(target, part))


@pytest.mark.slow
def test_quality_log_samples_the_ema_and_leaves_training_as_it_was(tmp_path, shapes_parts, monkeypatch):
    """With the log on (a sample every 2 steps, from the EMA weights), the losses, the EMA and the
    weights are bit for bit those of a run without it, also across a --resume."""
    source, data = shapes_parts
    for name in ("plain", "logged", "cut"):
        copy_parts(source, tmp_path / name)
    kw = dict(steps=4, batch_size=4, lr=3e-3, config=TINY_UNET, progress=False, data=data, checkpoint_every=2,
              dataset="shapes")
    plain = T.train_unet(str(tmp_path / "plain"), **kw)
    kw.update(quality_every=2, quality_prompts=2)
    logged = T.train_unet(str(tmp_path / "logged"), **kw)
    same_training(logged, plain)
    rows = T.read_quality_csv(str(tmp_path / "logged" / "logs" / "unet_quality.csv"))
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["adherence_seen"] in (0.0, 1.0) and r["adherence_heldout"] in (0.0, 1.0) for r in rows)
    assert all(r["sample_seconds"] > 0 for r in rows)
    minutes = [r["minutes"] for r in rows]
    assert minutes == sorted(minutes) and minutes[0] > 0
    np.testing.assert_allclose(rows[-1]["loss"], np.mean(logged["losses"][-2:]), rtol=1e-5)
    assert (tmp_path / "logged" / "logs" / "unet_quality.png").stat().st_size > 1000
    assert logged["quality"]["samples"] == 2 and 0 < logged["quality"]["fraction"]
    # interrupted after step 3 and resumed from step 2: the same training, and the log goes on from its rows
    monkeypatch.setattr(T, "plot_quality", lambda path, rows: None)
    T.train_unet(str(tmp_path / "cut"), stop_after=3, **kw)
    rows_cut = T.read_quality_csv(str(tmp_path / "cut" / "logs" / "unet_quality.csv"))
    assert [r["step"] for r in rows_cut] == [2]
    same_training(T.train_unet(str(tmp_path / "cut"), resume=True, **kw), plain)
    again = T.read_quality_csv(str(tmp_path / "cut" / "logs" / "unet_quality.csv"))
    assert [r["step"] for r in again] == [2, 4] and again[0] == rows_cut[0]


def test_quality_log_on_a_folder_logs_the_loss_alone(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "plot_quality", lambda path, rows: None)
    data = make_folder(tmp_path / "data")
    out = tmp_path / "m"
    code, _, err = cli(capsys, "train", "all", "--dataset", data, "--vae-steps", 2, "--clip-steps", 2,
                       "--unet-steps", 4, "--quality-every", 2, "--out", out, *QUIET)
    assert code == 0, err
    rows = T.read_quality_csv(str(out / "logs" / "unet_quality.csv"))
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["adherence_seen"] is None and r["sample_seconds"] == 0 for r in rows)
    report = json.loads((out / "logs" / "train_all.json").read_text())
    assert report["stages"]["unet"]["quality_log"]["samples"] == 0
    # off (0, or a run shorter than K): no log, and the earlier run's is not left to pass for this one's
    for every in (0, 250):
        code, _, err = cli(capsys, "train", "unet", "--dataset", data, "--steps", 2, "--quality-every", every,
                           "--overwrite", "--out", out, *QUIET)
        assert code == 0, err
        assert "quality_log" not in json.loads((out / "logs" / "train_unet.json").read_text())["stages"]["unet"]
        assert not (out / "logs" / "unet_quality.csv").exists()


# --- min-SNR-gamma --------------------------------------------------------------------------------------


def test_min_snr_weights_from_sd_betas():
    """In float64 from SD's betas: scaled_linear, beta_t = (linspace of sqrt(beta))^2, alpha_bar_t = prod(1 - beta)."""
    from minisd.schedulers import DDPMScheduler

    a = DDPMScheduler.from_config(T.SCHEDULER_CONFIG).alphas_cumprod
    t = np.array([0, 1, 10, 100, 250, 500, 750, 999])
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)[t]
    snr = alpha_bar / (1 - alpha_bar)
    for gamma in (1.0, 5.0):
        got = T.min_snr_weights(a, t, gamma)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np.minimum(snr, gamma) / snr, rtol=1e-6)
    assert T.min_snr_weights(a, np.array([999]), 5.0)[0] == 1.0  # the noisy steps keep weight 1


@pytest.mark.slow  # importing diffusers (and torch) takes seconds
def test_min_snr_weights_match_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    from minisd.schedulers import DDPMScheduler

    ours = DDPMScheduler.from_config(T.SCHEDULER_CONFIG)
    theirs = diffusers.DDPMScheduler(**{k: v for k, v in T.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    t = np.array([0, 1, 10, 100, 250, 500, 750, 999])
    snr = compute_snr(theirs, torch.from_numpy(t))
    for gamma in (1.0, 5.0):
        expected = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr  # train_text_to_image
        np.testing.assert_allclose(T.min_snr_weights(ours.alphas_cumprod, t, gamma), expected.numpy(),
                                   rtol=1e-4)  # diffusers works in float32


def test_denoising_loss_with_snr_gamma_weights_each_sample():
    from minisd import Tensor
    from minisd.schedulers import DDPMScheduler

    rng = np.random.default_rng(0)
    pred, noise = (rng.standard_normal((3, 4, 2, 2)).astype(np.float32) for _ in range(2))
    t = np.array([5, 400, 990])
    a = DDPMScheduler.from_config(T.SCHEDULER_CONFIG).alphas_cumprod
    plain = T.denoising_loss(Tensor(pred), noise, t, a)
    np.testing.assert_allclose(plain.item(), np.mean((pred - noise) ** 2), rtol=1e-6)
    x = Tensor(pred.astype(np.float64), requires_grad=True)
    loss = T.denoising_loss(x, noise.astype(np.float64), t, a, snr_gamma=5.0)
    snr = a[t] / (1 - a[t])
    w = np.minimum(snr, 5.0) / snr
    per = ((pred.astype(np.float64) - noise) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(loss.item(), np.mean(w * per), rtol=1e-6)
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * (pred - noise) * w[:, None, None, None] / (3 * 16), rtol=1e-5, atol=1e-7)


def test_snr_gamma_trains_and_resumes_bit_exact(tmp_path, shapes_parts):
    source, data = shapes_parts
    for name in ("full", "cut", "plain", "default"):
        copy_parts(source, tmp_path / name)
    kw = dict(steps=4, batch_size=4, lr=3e-3, config=TINY_UNET, progress=False, data=data, checkpoint_every=2)
    plain = T.train_unet(str(tmp_path / "plain"), snr_gamma=0, **kw)  # 0: SD's plain MSE
    weighted = resume_is_exact(tmp_path, snr_gamma=5.0, **kw)
    assert weighted["losses"] != plain["losses"] and all(np.isfinite(weighted["losses"]))
    assert T.SNR_GAMMA == 5.0 and T.train_unet(str(tmp_path / "default"), **kw)["losses"] == weighted["losses"]


# --- --preset quick ----------------------------------------------------------------------------------------


def test_preset_quick_sets_each_stage_s_steps_and_lr_unless_given(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "QUICK", {"vae": {"steps": 2}, "clip": {"steps": 3}, "unet": {"steps": 2, "lr": 5e-3}})
    seen = {}
    for name in ("train_vae", "train_unet"):
        real = getattr(T, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen[_name.removeprefix("train_")] = kw["lr"]
            return _real(*args, **kw)

        monkeypatch.setattr(T, name, spy)
    out = tmp_path / "m"
    code, _, err = cli(capsys, "train", "all", "--preset", "quick", "--vae-steps", 1, "--out", out, *QUIET)
    assert code == 0, err
    report = json.loads((out / "logs" / "train_all.json").read_text())
    assert {s: r["steps"] for s, r in report["stages"].items()} == {"vae": 1, "clip": 3, "unet": 2}
    assert seen == {"vae": None, "unet": 5e-3}  # None: the stage's default
    for lr, expected in (((), 5e-3), (("--lr", "1e-4"), 1e-4)):
        code, _, err = cli(capsys, "train", "unet", "--preset", "quick", *lr, "--overwrite", "--out", out, *QUIET)
        assert code == 0, err
        assert seen["unet"] == expected
    assert json.loads((out / "logs" / "train_unet.json").read_text())["stages"]["unet"]["steps"] == 2
