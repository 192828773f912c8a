"""The command line: generate, train, eval and info, and the one-line errors the contract asks for."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from minisd.cli import main
from test_pipeline import make_tiny_model


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
    code, _, err = run_cli(capsys, "generate", " ".join(["red"] * 90), "--steps", "2", "--model", tiny_path,
                           "--out", str(tmp_path))
    assert code == 0
    assert "truncated" in one_line_error(err)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps", "-5"], "--steps must be a positive integer"),
    (["--guidance", "-1"], "--guidance must be a number >= 0"),
    (["--scheduler", "pndm"], "unknown --scheduler"),
    (["--n", "0"], "--n must be a positive integer"),
    (["--steps", "many"], "invalid int value"),
    (["--steps", "100000"], "is more than the model's"),
])
def test_generate_usage_errors_exit_2(tiny_path, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "generate", "a red circle", "--model", tiny_path, "--out", str(tmp_path), *args)
    assert code == 2
    assert message in one_line_error(err)


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
    for args, message in ((["vae", "--steps", "0"], "--steps must be a positive integer"),
                          (["unet", "--lr", "-1"], "--lr must be positive"),
                          (["gan"], "invalid choice"),
                          (["vae", "--dataset", "mnist"], "invalid choice")):
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


def test_eval_bad_steps_exit_2(tiny_path, tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", tiny_path, "--out", str(tmp_path), "--steps", "0")
    assert code == 2
    assert "--steps" in one_line_error(err)


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
