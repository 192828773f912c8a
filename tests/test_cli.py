"""The command line: generate, train, eval and info, and the one-line errors the contract asks for."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from minisd.cli import main
from test_pipeline import make_tiny_model, trained_on


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_generate_writes_numbered_pngs(tiny_path, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "generate", "a small red circle in the top left", "a large blue square in the center",
                              "--n", "2", "--steps", "3", "--model", tiny_path, "--out", str(out))
    assert code == 0
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    im = np.asarray(Image.open(out / "0000.png"))
    assert im.shape == (32, 32, 3) and im.dtype == np.uint8
    assert "4 image(s)" in stdout


def test_generate_is_seeded(tiny_path, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(capsys, "generate", "a small red circle", "--steps", "3", "--seed", "5", "--model", tiny_path,
                       "--out", str(tmp_path / name))[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "0000.png")),
                                  np.asarray(Image.open(tmp_path / "b" / "0000.png")))


def test_generate_empty_prompt_is_unconditional(tiny_path, tmp_path, capsys):
    assert run_cli(capsys, "generate", "", "--steps", "2", "--model", tiny_path, "--out", str(tmp_path))[0] == 0
    assert os.path.isfile(tmp_path / "0000.png")


def test_generate_too_long_prompt_warns_in_one_line(tiny_path, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", " ".join(["red"] * 90), "--n", "3", "--steps", "2", "--model", tiny_path,
                           "--out", str(tmp_path))
    assert code == 0
    assert "truncated" in one_line_error(err)  # once for the prompt, not once per image


def test_generate_unknown_words_warn_in_one_line(tiny_path, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "a dog", "an orange circle", "--n", "3", "--steps", "1",
                           "--model", trained_on(tiny_path, tmp_path, "shapes"), "--out", str(tmp_path / "out"))
    assert code == 0
    assert "warning: the model never saw 'dog', 'an', 'orange' in its training captions" in one_line_error(err)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be a whole number >= 1, got '0'"),
    (["--steps", "-5"], "argument --steps: must be a whole number >= 1, got '-5'"),
    (["--steps", "many"], "argument --steps: must be a whole number, got 'many'"),
    (["--guidance", "-1"], "argument --guidance: must be a number >= 0, got '-1'"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["--seed", "-1"], "argument --seed: must be a whole number >= 0, got '-1'"),  # was exit 1, NumPy's message
    (["--n", "0"], "argument --n: must be a whole number >= 1, got '0'"),
    (["--scale", "0"], "argument --scale: must be a whole number >= 1, got '0'"),
    (["--scale", "65"], "--scale must be between 1 and 64"),
    (["--scheduler", "plms"], "unknown --scheduler 'plms'; choose one of ddpm, ddim, pndm, euler, euler_a"),
    (["--strength", "1.5"], "argument --strength: must be a number from 0 to 1, got '1.5'"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--mask", "m.png"], "--mask needs --image"),
    (["--image", "/no/such.png"], "--image: no file '/no/such.png'"),
    (["--height", "30"], "height must be a multiple of 4 (the VAE's downsampling factor"),
    (["--width", "0"], "argument --width: must be a whole number >= 1, got '0'"),
    (["--negative", "x", "--negative", "y"], "--negative given 2 times for 1 prompts"),
    (["--karras"], "--karras: DDIMScheduler has no Karras sigmas"),
    (["--eta", "0.5", "--scheduler", "euler"], "eta: EulerDiscreteScheduler has no eta"),
    (["--eta", "-1"], "argument --eta: must be a number >= 0, got '-1'"),
    (["--guidance-rescale", "2"], "argument --guidance-rescale: must be a number from 0 to 1, got '2'"),
    (["--n", "100000000000"], "is 100,000,000,000 images, more than the 100,000 one run makes"),
    (["--steps", "100000"], "--steps 100000: num_inference_steps (100000) cannot exceed num_train_timesteps (1000)"),
])
def test_generate_usage_errors_exit_2(tiny_path, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", tiny_path, "--out", str(tmp_path), *args)
    assert code == 2
    assert message in one_line_error(err)
    assert not os.listdir(tmp_path)


def write_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda d: write_png(d / "in.png", np.zeros((30, 30, 3), np.uint8)), "height must be a multiple of 4"),
    (lambda d: (d / "in.png").write_text("no picture") and str(d / "in.png"), "--image: cannot read"),
    (lambda d: str(d), "--image: cannot read"),
])
def test_generate_bad_image_exits_2(tiny_path, tmp_path, capsys, make, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", tiny_path, "--out", str(tmp_path / "out"),
                           "--image", make(inputs))
    assert code == 2
    assert message in one_line_error(err)
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["--mask", "small"], "mask_image is 16x16 pixels and the image 32x32: they must be the same size"),
    (["--height", "24"], "height 24 does not match the image's 32 pixels"),
])
def test_generate_masks_and_sizes_that_do_not_fit_exit_2(tiny_path, tmp_path, capsys, args, message):
    image = write_png(tmp_path / "in.png", np.full((32, 32, 3), 255, np.uint8))
    small = write_png(tmp_path / "small.png", np.zeros((16, 16), np.uint8))
    args = [small if a == "small" else a for a in args]
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", tiny_path, "--out", str(tmp_path / "out"),
                           "--image", image, "--steps", "2", *args)
    assert code == 2
    assert message in one_line_error(err)
    assert not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("args, kwargs", [
    (["--negative", "a blue square", "--height", "24", "--width", "40"],
     dict(negative_prompt="a blue square", height=24, width=40)),
    (["--negative", "a blue square", "--negative", "a red circle"],
     dict(negative_prompt=["a blue square", "a red circle"])),
    (["--scheduler", "dpm++2m", "--karras", "--guidance-rescale", "0.7"],
     dict(scheduler=("dpm++2m", {"use_karras_sigmas": True}), guidance_rescale=0.7)),
    (["--scheduler", "DDIM", "--eta", "0.5"], dict(scheduler="ddim", eta=0.5)),
    (["--image", "IMAGE", "--strength", "0.6", "--scheduler", "euler_a"],
     dict(image="IMAGE", strength=0.6, scheduler="euler_a")),
    (["--image", "IMAGE", "--mask", "MASK"], dict(image="IMAGE", mask_image="MASK")),
])
def test_generate_options_are_the_pipelines(tiny_path, tmp_path, capsys, args, kwargs):
    """Each option reaches pipe(...) as its keyword: the PNGs are the images pipe(...) returns."""
    from minisd.pipeline import load_pipeline

    image = write_png(tmp_path / "in.png", np.full((32, 32, 3), 255, np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    mask = write_png(tmp_path / "mask.png", mask)
    files = {"IMAGE": image, "MASK": mask}
    prompts = ["a small red circle in the top left", "a large blue square in the center"]
    code, _, _ = run_cli(capsys, "generate", *prompts, "--steps", "3", "--seed", "2", "--model", tiny_path,
                         "--out", str(tmp_path / "out"), *[files.get(a, a) for a in args])
    assert code == 0
    pipe = load_pipeline(tiny_path)
    kwargs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    if isinstance(kwargs.get("scheduler"), tuple):
        name, config = kwargs["scheduler"]
        kwargs["scheduler"] = pipe.make_scheduler(name, **config)
    want = pipe(prompts, steps=3, seed=2, **kwargs)
    for i, im in enumerate(want):
        np.testing.assert_array_equal(pixels(tmp_path / "out" / f"{i:04d}.png"), im)


def test_generate_prompt_that_is_not_utf8_exits_2(tiny_path, tmp_path, capsys):
    """A byte that is not UTF-8 on the command line reaches Python as a lone surrogate."""
    code, _, err = run_cli(capsys, "generate", "a red circle", "a red\udcff circle", "--model", tiny_path,
                           "--out", str(tmp_path / "out"))
    assert code == 2
    assert "prompt 1 'a red\\udcff circle' is not valid text" in one_line_error(err)


# ---- where the images go ---------------------------------------------------------------


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_numbers_on_after_the_images_already_there(tiny_path, tmp_path, capsys):
    """A second run into one --out adds to the first's images (it used to replace them)."""
    out = tmp_path / "out"
    common = ("--steps", "1", "--model", tiny_path, "--out", str(out))
    assert run_cli(capsys, "generate", "a red circle", "--n", "2", "--seed", "1", *common)[0] == 0
    first = [pixels(out / f"000{i}.png") for i in range(2)]
    (out / "notes.txt").write_text("kept")
    code, stdout, _ = run_cli(capsys, "generate", "a blue square", "--n", "2", "--seed", "2", *common)
    assert code == 0
    assert "-> " + str(out / "0002.png") + " ... 0003.png (numbered on after 0001.png, already there" in stdout
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "0003.png", "notes.txt"]
    for i in range(2):
        np.testing.assert_array_equal(pixels(out / f"000{i}.png"), first[i])
    code, stdout, _ = run_cli(capsys, "generate", "a red circle", "--n", "1", "--seed", "2", "--overwrite", *common)
    assert code == 0 and "0000.png (--overwrite: numbered from 0000, replacing)" in stdout
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "0003.png", "notes.txt"]
    from minisd.pipeline import load_pipeline

    np.testing.assert_array_equal(pixels(out / "0000.png"), load_pipeline(tiny_path)("a red circle", steps=1, seed=2)[0])
    assert not np.array_equal(pixels(out / "0000.png"), first[0])


def test_generate_more_images_than_a_batch(tiny_path, tmp_path, capsys):
    """17 images: two batches, written as each is done, with a progress bar; the same images
    as one pipe(...) call."""
    from minisd.pipeline import load_pipeline

    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "generate", "a red circle", "--n", "17", "--steps", "1", "--seed", "3",
                                "--model", tiny_path, "--out", str(out))
    assert code == 0 and "17 image(s)" in stdout
    assert "17/17" in err  # tqdm's bar, on stderr
    want = load_pipeline(tiny_path)("a red circle", steps=1, seed=3, num_images_per_prompt=17)
    np.testing.assert_array_equal(np.stack([pixels(out / f"{i:04d}.png") for i in range(17)]), want)


def _solid(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


def check_every_image_kept(out, values):
    names = sorted(os.listdir(out))
    assert names == [f"{i:04d}.png" for i in range(len(values))], names  # no temporary file left either
    found = sorted(int(pixels(os.path.join(out, n))[0, 0, 0]) for n in names)  # each a whole PNG
    assert found == sorted(values)


def test_write_pngs_from_two_threads_at_once_lose_nothing(tmp_path):
    """Both writers start at 0000. They used to share the temporary name .0000.png.tmp, so one
    failed (FileNotFoundError) or wrote its images over the other's."""
    import threading

    from minisd.cli.generate import write_pngs

    start = threading.Barrier(2)
    errors = []

    def writer(offset):
        try:
            start.wait()
            for i in range(20):
                write_pngs(_solid(offset + i)[None], str(tmp_path))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(offset,)) for offset in (0, 100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_every_image_kept(tmp_path, [*range(20), *range(100, 120)])


def test_write_pngs_from_two_processes_at_once_lose_nothing(tmp_path):
    import subprocess
    import sys
    import time

    script = ("import sys, time, numpy as np; from minisd.cli.generate import write_pngs\n"
              "offset, go = int(sys.argv[1]), float(sys.argv[2])\n"
              "time.sleep(max(0.0, go - time.time()))\n"
              "write_pngs(np.stack([np.full((8, 8, 3), offset + i, np.uint8) for i in range(30)]), sys.argv[3])\n")
    go = time.time() + 1.5  # both start writing at this moment, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", script, str(offset), str(go), str(tmp_path)])
             for offset in (0, 100)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    check_every_image_kept(tmp_path, [*range(30), *range(100, 130)])


def test_write_pngs_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    """Where the file system has no hard links the name is reserved with an empty file first."""
    from minisd.cli.generate import write_pngs

    write_pngs(_solid(7)[None], str(tmp_path))

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert write_pngs(np.stack([_solid(8), _solid(9)]), str(tmp_path)) == \
        [str(tmp_path / "0001.png"), str(tmp_path / "0002.png")]
    check_every_image_kept(tmp_path, [7, 8, 9])


def test_write_pngs_honours_the_umask(tmp_path):
    from minisd.cli.generate import write_pngs

    old = os.umask(0o022)
    try:
        (path,) = write_pngs(_solid(1)[None], str(tmp_path))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_generate_missing_model_exits_1(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert code == 1
    assert "no model at" in one_line_error(err)


def test_generate_corrupt_model_exits_1(tiny_path, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", str(broken), "--out", str(tmp_path / "o"))
    assert code == 1
    assert "cannot load vae" in one_line_error(err)


def test_generate_unwritable_out_exits_1_and_keeps_files(tiny_path, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        code, _, err = run_cli(capsys, "generate", "a red circle", "--steps", "2", "--model", tiny_path, "--out", str(out))
        assert code == 1
        assert "--out" in one_line_error(err)
    assert blocker.read_text() == "keep me"


def test_train_usage_errors_exit_2(tmp_path, capsys):
    for args, message in ((["vae", "--steps", "0"], "argument --steps: must be a whole number >= 1, got '0'"),
                          (["unet", "--lr", "-1"], "argument --lr: must be a number > 0, got '-1'"),
                          (["gan"], "invalid choice"),
                          (["vae", "--dataset", "mnist"], "--dataset mnist is neither shapes nor emoji nor a folder")):
        code, _, err = run_cli(capsys, "train", *args, "--out", str(tmp_path))
        assert code == 2, args
        assert message in one_line_error(err)


def test_train_unet_without_vae_exits_1(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "unet", "--steps", "1", "--out", str(tmp_path), "--no-progress")
    assert code == 1
    assert "train vae" in one_line_error(err)


def test_info_prints_sizes_next_to_sd(tiny_path, capsys):
    code, out, _ = run_cli(capsys, "info", "--model", tiny_path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["sd_v1_5"]["unet"]["parameters"] == 859_520_964
    from minisd.pipeline import load_pipeline

    pipe = load_pipeline(tiny_path)
    assert info["minisd"]["unet"]["parameters"] == pipe.unet.num_parameters()
    assert "(4, 8, 8)" in info["minisd"]["vae"]["tensors"]


def test_eval_writes_a_report(tiny_path, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(capsys, "eval", "--model", tiny_path, "--out", str(out), "--steps", "2",
                              "--skip", "adherence", "clip")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["vae"]["images"] == 270
    assert 0 < report["vae"]["psnr_db_overall"] < 60
    assert "VAE PSNR" in stdout


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be a whole number >= 1, got '0'"),
    (["--seed", "-1"], "argument --seed: must be a whole number >= 0, got '-1'"),  # was exit 1, NumPy's message
    (["--guidance", "-2"], "argument --guidance: must be a number >= 0, got '-2'"),
    (["--batch", "0"], "argument --batch: must be a whole number >= 1, got '0'"),
    # was exit 1, printed on the progress bar's line: now said before any bar starts
    (["--steps", "5000"], "minisd eval: --steps 5000: num_inference_steps (5000) cannot exceed"),
])
def test_eval_usage_errors_exit_2(tiny_path, tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, "eval", "--model", tiny_path, "--out", str(tmp_path / "eval"), *args)
    assert code == 2
    assert message in one_line_error(err) and not out


def test_eval_does_not_use_the_generate_command():
    """One copy of the output-folder check, in minisd.pipeline; minisd.evaluate imports no command's code."""
    import minisd.cli.generate
    import minisd.evaluate

    source = open(minisd.evaluate.__file__).read()
    assert "cli.generate" not in source and not hasattr(minisd.cli.generate, "prepare_out_dir")


def test_bench_ops_prints_ratios_and_both_libraries_share_of_the_peak(capsys, monkeypatch):
    """`minisd bench ops` on one small case: a minisd / PyTorch ratio and each side's share of the
    NumPy matmul peak measured in the same run (PyTorch's oneDNN can run above it)."""
    pytest.importorskip("torch")
    monkeypatch.setattr("minisd.benchmarks.SETTLE_SECONDS", 0)  # no pauses between blocks: a quick run
    code, out, _ = run_cli(capsys, "bench", "ops", "--only", "k1 s1", "--repeat", "1")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("conv2d") and "k1 s1" in line)
    minisd_ms, torch_ms, ratio, gflops, share, torch_share = row.split()[-6:]
    assert float(minisd_ms) > 0 and float(torch_ms) > 0
    assert float(ratio) == pytest.approx(float(minisd_ms) / float(torch_ms), rel=0.02, abs=0.01)
    assert share.endswith("%") and torch_share.endswith("%") and float(torch_share[:-1]) > 0
    assert "conv2d: worst time ratio minisd / PyTorch" in out
