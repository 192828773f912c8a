"""`minisd train` on the command line: what it refuses (bad numbers, a folder holding saved work,
a batch that cannot fit), how it stops a diverged run, and what it leaves in OUT.

The commands run the real CLI on the tiny configs of test_train.py and 48 shapes images, so
that each takes a second or two.
"""

import json
import math
import os
import time

import numpy as np
import pytest

from minisd import train as T
from minisd.benchmarks import peak_memory_mb
from minisd.cli import main
from minisd.data import shapes
from test_train import TINY_TEXT, TINY_UNET, TINY_VAE, TINY_VISION

PACKAGE = os.path.dirname(os.path.abspath(T.__file__))
QUIET = ("--no-progress",)


@pytest.fixture(scope="module")
def data():
    d = shapes.make_dataset(48, "train", seed=3)
    return d.images, list(d.captions)


@pytest.fixture
def tiny(monkeypatch, data):
    """The CLI trains the tiny models on 48 images, 4 a batch, instead of the defaults on 1,350;
    and draws no loss curve PNG (a second of matplotlib each; test_train checks them)."""
    for name, config in (("VAE_CONFIG", TINY_VAE), ("TEXT_CONFIG", TINY_TEXT), ("VISION_CONFIG", TINY_VISION),
                         ("UNET_CONFIG", TINY_UNET)):
        monkeypatch.setattr(T, name, config)
    monkeypatch.setattr(T, "DEFAULT_BATCH", dict.fromkeys(T.STAGES, 4))
    monkeypatch.setattr(T, "load_dataset", lambda name, split="train", font=None: data)
    monkeypatch.setattr(T, "plot_loss_curve", lambda path, stage, losses: None)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    return lines[0]


def vae_weights(out) -> bytes:
    with open(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"), "rb") as f:
        return f.read()


# --- saved work is not replaced without being asked --------------------------------------------


def test_a_second_run_over_a_finished_stage_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    assert cli(capsys, "train", "vae", "--steps", 2, "--batch-size", 2, "--out", out, *QUIET)[0] == 0
    before = vae_weights(out)
    code, _, err = cli(capsys, "train", "vae", "--steps", 3, "--batch-size", 2, "--out", out, *QUIET)
    assert code == 2
    line = one_line(err)
    assert "--resume" in line and "--overwrite" in line and str(out / "vae") in line
    assert vae_weights(out) == before
    # --overwrite starts over and replaces it (another seed: other weights)
    assert cli(capsys, "train", "vae", "--steps", 2, "--batch-size", 2, "--seed", 1, "--overwrite",
               "--out", out, *QUIET)[0] == 0
    assert vae_weights(out) != before


def test_later_stages_over_the_earlier_ones_are_the_normal_flow(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    for stage in ("vae", "clip", "unet"):
        code, _, err = cli(capsys, "train", stage, "--steps", 2, "--batch-size", 4, "--out", out, *QUIET)
        assert code == 0, err
    index = (out / "model_index.json").read_bytes()
    for stage, shown in (("clip", "text_encoder"), ("unet", "unet"), ("all", "vae")):
        code, _, err = cli(capsys, "train", stage, "--out", out, *QUIET)
        assert code == 2 and shown in one_line(err) and "--overwrite" in one_line(err), stage
    assert (out / "model_index.json").read_bytes() == index
    # replacing the text encoder under a trained UNet is allowed, and said
    code, _, err = cli(capsys, "train", "clip", "--steps", 2, "--batch-size", 4, "--overwrite", "--out", out, *QUIET)
    assert code == 0 and "train unet again" in one_line(err)


def test_all_overwrite_removes_the_old_model_before_training(tiny, tmp_path, capsys, monkeypatch):
    """Killed in its second stage, `all --overwrite` must not leave the old text encoder and
    UNet to be skipped as finished by a later --resume (a UNet trained on another VAE)."""
    out = tmp_path / "m"
    steps = ("--vae-steps", 2, "--clip-steps", 2, "--unet-steps", 2)
    assert cli(capsys, "train", "all", *steps, "--out", out, *QUIET)[0] == 0
    old_vae = vae_weights(out)

    def killed(**kw):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(T, "train_clip", killed)
        assert cli(capsys, "train", "all", *steps, "--seed", 1, "--overwrite", "--out", out, *QUIET)[0] == 1
    assert vae_weights(out) != old_vae
    assert not any((out / part).exists() for part in ("clip", "text_encoder", "tokenizer", "unet", "model_index.json"))
    code, stdout, err = cli(capsys, "train", "all", *steps, "--seed", 1, "--resume", "--out", out, *QUIET)
    assert code == 0, err
    assert "vae already trained" in stdout
    report = json.loads((out / "logs" / "train_all.json").read_text())
    assert sorted(report["stages"]) == ["clip", "unet"]


def test_resume_of_a_trained_stage_with_no_checkpoint_left_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    assert cli(capsys, "train", "vae", "--steps", 2, "--batch-size", 2, "--out", out, *QUIET)[0] == 0
    os.remove(out / "checkpoints" / "vae.npz")  # as `train all` does when it finishes
    before = vae_weights(out)
    code, _, err = cli(capsys, "train", "vae", "--steps", 2, "--batch-size", 2, "--resume", "--out", out, *QUIET)
    assert code == 2 and "--overwrite" in one_line(err) and "no checkpoint" in one_line(err)
    assert vae_weights(out) == before


@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--resume",)])
def test_out_inside_the_package_is_always_refused(tiny, capsys, flags):
    shipped = os.path.join(PACKAGE, "weights", "shapes")
    listing = {p: os.stat(os.path.join(shipped, p)).st_mtime_ns for p in os.listdir(shipped)}
    for target in (shipped, os.path.join(PACKAGE, "weights", "new_model")):
        code, _, err = cli(capsys, "train", "vae", "--steps", 1, "--out", target, *flags, *QUIET)
        assert code == 2 and "package" in one_line(err), target
    assert not os.path.exists(os.path.join(PACKAGE, "weights", "new_model"))
    assert {p: os.stat(os.path.join(shipped, p)).st_mtime_ns for p in os.listdir(shipped)} == listing


@pytest.mark.parametrize("args, option", [
    (["vae", "--lr", "inf"], "--lr"), (["vae", "--lr", "nan"], "--lr"), (["unet", "--lr", "-1"], "--lr"),
    (["vae", "--seed", "-1"], "--seed"), (["vae", "--steps", "0"], "--steps"),
    (["clip", "--batch-size", "-3"], "--batch-size"), (["vae", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["all", "--clip-steps", "1.5"], "--clip-steps"), (["all", "--steps", "5"], "--vae-steps"),
    (["vae", "--unet-steps", "5"], "--unet-steps"), (["vae", "--resume", "--overwrite"], "--overwrite"),
    (["vae", "--font", "x.ttf"], "--font"), (["vae", "--dataset", "emoji", "--font", "no/such.ttf"], "--font"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, args, option):
    code, _, err = cli(capsys, "train", *args, "--out", tmp_path / "m")
    assert code == 2
    assert option in one_line(err)
    assert not (tmp_path / "m").exists()


# --- a diverged run ------------------------------------------------------------------------------


def test_a_diverged_run_exits_1_and_saves_nothing_of_it(tiny, tmp_path, capsys):
    """lr 1e30 (finite, so allowed) throws the weights to ~1e30 in one step; the next forward
    overflows. The run must stop there, naming the stage and the step, with exit status 1."""
    out = tmp_path / "m"
    code, _, err = cli(capsys, "train", "vae", "--steps", 6, "--batch-size", 2, "--lr", "1e30",
                       "--checkpoint-every", 1, "--out", out, *QUIET)
    assert code == 1
    line = one_line(err)
    assert "train vae diverged at step 1" in line and "checkpoint" in line
    assert not (out / "vae").exists()
    assert not (out / "logs" / "train_vae.json").exists() and not (out / "logs" / "vae_loss.csv").exists()
    with np.load(out / "checkpoints" / "vae.npz") as z:  # the last checkpoint: after step 0, finite
        assert json.loads(bytes(z["meta"]))["step"] == 1
        assert all(np.isfinite(z[k]).all() for k in z.files if k.startswith("param/"))


# --- a batch that cannot fit ----------------------------------------------------------------------


def test_a_batch_too_large_for_memory_is_refused_before_it_is_allocated(tiny, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "vae", "--batch-size", 100_000_000, "--out", tmp_path / "m", *QUIET)
    assert code == 2
    line = one_line(err)
    assert "--batch-size" in line and "available" in line and "TiB" in line
    assert peak_memory_mb() < 2000  # nothing near the 1 TiB was touched
    assert not (tmp_path / "m" / "checkpoints").exists()


# --- what OUT holds after a run --------------------------------------------------------------------


def test_stray_temporary_files_are_removed_after_a_resume(tiny, tmp_path, capsys, data):
    out = tmp_path / "m"
    T.train_vae(str(out), steps=4, batch_size=2, config=TINY_VAE, images=data[0], checkpoint_every=2,
                stop_after=2, progress=False)
    (out / "vae").mkdir()
    strays = [out / "checkpoints" / ".vae.npz.ab1_cd34.tmp", out / "checkpoints" / "vae.npz.tmp-4242",
              out / ".model_index.json.x1y2z3w4.tmp", out / "logs" / "vae_loss.csv.tmp-17",
              out / "vae" / ".diffusion_pytorch_model.safetensors.qqqqqqqq.tmp", out / ".tokenizer.q1w2e3r4",
              out / "vae" / ".config.json.4242-0a1b2c3d.tmp", out / ".text_encoder.77-deadbeef.tmp"]
    keep = [out / "notes.tmp.txt", out / "my.tmp", out / "checkpoints" / "keep.npz", out / ".config.tmp"]
    for path in strays + keep:
        if path.name.startswith((".tokenizer.", ".text_encoder.")):  # folders written whole
            path.mkdir()
            (path / "vocab.json").write_text("{}")
        else:
            path.write_text("half")
        os.utime(path, (time.time() - 60,) * 2)  # left by an earlier run
    busy = out / "checkpoints" / "clip.npz.tmp-99"  # another writer at work now
    busy.write_text("being written")
    os.utime(busy, (time.time() + 3600,) * 2)
    code, stdout, err = cli(capsys, "train", "vae", "--steps", 4, "--batch-size", 2, "--checkpoint-every", 2,
                            "--resume", "--out", out, *QUIET)
    assert code == 0, err
    assert [p for p in strays if os.path.lexists(p)] == []
    assert all(p.exists() for p in keep) and busy.exists()
    assert f"removed {len(strays)} temporary" in stdout


def test_clip_resume_reuses_the_saved_tokenizer(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    args = ("train", "clip", "--steps", 4, "--batch-size", 4, "--checkpoint-every", 2, "--out", out, *QUIET)
    T.train_clip(str(out), steps=4, batch_size=4, checkpoint_every=2, stop_after=2, progress=False)
    files = sorted(os.listdir(out / "tokenizer"))
    stamps = {f: os.stat(out / "tokenizer" / f).st_mtime_ns for f in files}
    time.sleep(0.01)
    assert cli(capsys, *args, "--resume")[0] == 0
    assert {f: os.stat(out / "tokenizer" / f).st_mtime_ns for f in files} == stamps


def test_all_takes_each_stage_s_steps_and_writes_strict_json(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    code, _, err = cli(capsys, "train", "all", "--vae-steps", 2, "--clip-steps", 3, "--unet-steps", 2,
                       "--out", out, *QUIET)
    assert code == 0, err

    def no_nan(name):
        raise AssertionError(f"train_all.json holds {name}")

    report = json.loads((out / "logs" / "train_all.json").read_text(), parse_constant=no_nan)
    assert {s: r["steps"] for s, r in report["stages"].items()} == {"vae": 2, "clip": 3, "unet": 2}
    assert all(math.isfinite(r["final_loss"]) for r in report["stages"].values())
    assert sorted(os.listdir(out / "logs")) == ["clip_loss.csv", "train_all.json", "unet_loss.csv", "vae_loss.csv"]


def test_the_run_s_json_is_written_atomically(tiny, tmp_path, capsys, monkeypatch):
    """The report appears whole or not at all: it is renamed into place, never written in place."""
    out = tmp_path / "m"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "train_vae.json").write_text('{"old": true}\n')
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("train_vae.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = cli(capsys, "train", "vae", "--steps", 2, "--batch-size", 2, "--out", out, *QUIET)
    assert code == 1 and "No space left" in one_line(err)
    assert (out / "logs" / "train_vae.json").read_text() == '{"old": true}\n'
    assert sorted(os.listdir(out / "logs")) == ["train_vae.json", "vae_loss.csv"]


# --- help and prerequisites -------------------------------------------------------------------------


def test_help_gives_each_stage_s_defaults_and_the_logged_times(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    with open(os.path.join(PACKAGE, "weights", "shapes", "logs", "train_all.json")) as f:
        logged = json.load(f)
    rows = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in T.STAGES}
    for s in T.STAGES:
        seconds = logged["stages"][s]["seconds"]
        took = f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"
        assert rows[s].split()[1:5] == [str(T.DEFAULT_STEPS[s]), str(T.DEFAULT_BATCH[s]),
                                        f"{T.DEFAULT_LR[s]:.0e}", took.split()[0]], rows[s]
    assert f"{logged['total_seconds'] / 60:.1f} min" in text and "2 CPU cores" in text
    for needed in ("--vae-steps", "--clip-steps", "--unet-steps", "--resume", "--overwrite", "--font",
                   "fonts-noto-color-emoji"):
        assert needed in text


def test_emoji_without_the_font_says_font_and_the_package(tmp_path, capsys, monkeypatch):
    from minisd.data import emoji

    monkeypatch.setattr(emoji, "DEFAULT_FONT_PATHS", ())
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    code, _, err = cli(capsys, "train", "all", "--dataset", "emoji", "--out", tmp_path / "m", *QUIET)
    assert code == 1
    line = one_line(err)
    assert "--font PATH" in line and "apt-get install fonts-noto-color-emoji" in line
    # --font reaches the font loader: a file that is no font is named as such
    not_a_font = tmp_path / "plain.ttf"
    not_a_font.write_text("not a font")
    code, _, err = cli(capsys, "train", "vae", "--dataset", "emoji", "--font", not_a_font, "--out", tmp_path / "n",
                       *QUIET)
    assert code == 1 and str(not_a_font) in one_line(err)
