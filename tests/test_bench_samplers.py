"""`minisd bench samplers` (the sampler scoreboard) runs at a tiny size: its report, table and figure."""

import json

import numpy as np
import pytest
from PIL import Image

from minisd.benchmarks.samplers import make_sampler, steps_to_reach
from minisd.cli import main


def test_the_scoreboard_runs_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "board"
    code = main(["bench", "samplers", "--samplers", "ddim,heun,dpm++2m-karras", "--steps", "2,4", "--guidance",
                 "3,7.5", "--prompts", "3", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "samplers.json").read_text())
    assert report["prompts"] == 3 and report["steps"] == [2, 4] and report["guidance"] == [3.0, 7.5]
    assert set(report["adherence"]) == {"ddim", "heun", "dpm++2m-karras"}
    for label, per_w in report["adherence"].items():
        assert set(per_w) == {"3", "7.5"}
        for w, scores in per_w.items():
            assert len(scores) == 2 and all(0 <= s <= 1 and abs(s * 3 - round(s * 3)) < 1e-3 for s in scores)
            assert report["steps_to_target"][label][w] == steps_to_reach([2, 4], scores, 0.95)
    assert report["unet_calls"] == {"ddim": [2, 4], "heun": [3, 7], "dpm++2m-karras": [2, 4]}
    stdout = capsys.readouterr().out
    assert "steps (UNet calls) to reach 95% of 3 seen captions" in stdout and "dpm++2m-karras" in stdout
    with Image.open(out / "samplers.png") as im:
        assert np.asarray(im.convert("L"), dtype=float).var() > 0


def test_steps_to_reach():
    assert steps_to_reach([2, 4, 8], [0.5, 0.96, 1.0], 0.95) == 4
    assert steps_to_reach([2, 4, 8], [0.5, 0.9, 0.94], 0.95) is None


def test_samplers_by_label():
    import minisd

    pipe = minisd.load_pipeline()
    assert make_sampler(pipe, "pndm").config["skip_prk_steps"] is True  # as SD v1.5 runs it
    assert make_sampler(pipe, "euler-karras").config["use_karras_sigmas"] is True
    with pytest.raises(ValueError, match="ddim-karras: DDIMScheduler has no Karras sigmas"):
        make_sampler(pipe, "ddim-karras")


@pytest.mark.parametrize("args, message", [
    (["--samplers", "ddim,nope"], "unknown scheduler 'nope'"),
    (["--samplers", "ddim-karras"], "DDIMScheduler has no Karras sigmas"),
    (["--steps", "2,0"], "argument --steps: must be a whole number >= 1, got '0'"),
    (["--guidance", "x"], "argument --guidance: must be a number, got 'x'"),
    (["--target", "2"], "argument --target: must be a number from 0 to 1"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    code = main(["bench", "samplers", "--out", str(tmp_path / "board"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "board").exists()
