"""The lessons: each runs in --fast mode, writes its figures (non-blank, the expected ones)
and prints numbers that are checked here (each lesson writes them to OUT/results.json).

Every lesson is run once, through the CLI (`python -m minisd lesson N --fast --out DIR`),
and the tests of its figures and of its numbers share that run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"

# lesson -> the figures it always writes
FIGURES = {
    "00_autograd": {"computation_graph.png", "finite_differences.png", "training.png"},
    "01_kernels": {"conv2d_blocks.png", "group_norm_blocks.png", "attention_blocks.png", "kernel_check.png"},
    "02_inputs": {"dataset_grid.png", "image_as_tensor.png", "attribute_counts.png", "heldout.png"},
    "03_forward_noise": {"schedule.png", "noising_grid.png", "noising.gif", "histograms.png"},
    "10_data_parallel": {"shard_gradients.png", "ring_allreduce.png"},
}
# lessons that need a trained model: without one they stop early, write no figures, and
# their numbers are not checked (they are in CI once the shipped model is in the package)
FIGURES.update({
    "04_vae": {"latents.png", "reconstructions.png", "interpolation.png"},
    "05_text_encoder": {"tokens.png", "embedding_heatmap.png", "prompt_difference.png"},
    "06_unet": {"timestep_embedding.png", "unet_step.png", "noise_prediction_error.png", "attention_maps.png"},
    "07_reverse_denoise": {"reverse_grid.png", "reverse.gif", "convergence.png", "samplers.png"},
    "08_text_to_image": {"prompts.png", "guidance.png", "seeds.png", "heldout.png"},
    "09_img2img_inpainting": {"img2img_recolour.png", "img2img_move.png", "img2img_steps.png", "inpainting.png",
                              "inpainting_steps.png"},
})
NEEDS_MODEL = {"04_vae", "05_text_encoder", "06_unet", "07_reverse_denoise", "08_text_to_image",
               "09_img2img_inpainting"}
# figures written only when a model loads (03) or the model folder has CLIP's image tower (05)
OPTIONAL_FIGURES = {"03_forward_noise": ("latent_part", {"latent_noising.png"}),
                    "05_text_encoder": ("clip_part", {"clip_similarity.png"}),
                    "10_data_parallel": ("two_ranks", {"two_ranks.png"})}  # with mpi4py and mpiexec
# MINISD_LESSONS_MODEL=DIR runs the lessons on another model folder (one `minisd train all`
# wrote); the checks of the model's quality are then left out, the rest still hold.
OTHER_MODEL = os.environ.get("MINISD_LESSONS_MODEL")

PIXEL_VARIANCE_FLOOR = 30.0  # in (0-255)^2: a blank or single-colour image has ~0

present = sorted(p.stem for p in LESSONS.glob("[0-9][0-9]_*.py"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (output folder, results dict, stdout); each lesson run once, lazily."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
            command = [sys.executable, "-m", "minisd", "lesson", name[:2], "--fast", "--out", str(out)]
            command += ["--model", OTHER_MODEL] if OTHER_MODEL else []
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(out), timeout=600)
            assert proc.returncode == 0, f"lesson {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            cache[name] = (out, json.loads((out / "results.json").read_text()), proc.stdout)
        return cache[name]

    return get


def test_every_lesson_is_known():
    assert set(present) >= set(FIGURES), f"missing lessons: {set(FIGURES) - set(present)}"
    unknown = set(present) - set(FIGURES)
    assert not unknown, f"lessons without figure expectations in this test: {unknown}"


@pytest.mark.parametrize("name", present)
def test_lesson_is_a_notebook(name):
    """`# %%` cells with markdown cells explaining the steps, opening with a title."""
    text = (LESSONS / f"{name}.py").read_text()
    assert text.startswith("# %% [markdown]\n# # Lesson"), "a lesson opens with a markdown title cell"
    markdown = text.count("# %% [markdown]")
    code = text.count("\n# %%\n")
    assert markdown >= 4 and code >= 4, f"{markdown} markdown and {code} code cells"
    assert "SD" in text and "--fast" in text
    try:
        import jupytext
    except ImportError:
        return
    cells = jupytext.read(LESSONS / f"{name}.py").cells  # as Jupyter and VS Code will see it
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# Lesson")
    assert sum(c.cell_type == "markdown" for c in cells) == markdown


@pytest.mark.parametrize("name", present)
def test_lesson_figures(name, runs):
    out, results, _ = runs(name)
    written = {p.name for p in out.iterdir() if p.suffix in (".png", ".gif")}
    if name in NEEDS_MODEL and not results["model"]:
        assert written == set()
        pytest.skip("no trained model here: the lesson stopped early, as it should")
    expected = set(FIGURES[name])
    flag, extra = OPTIONAL_FIGURES.get(name, (None, set()))
    if flag and results.get(flag):
        expected |= extra
    assert written == expected
    for fname in written:
        with Image.open(out / fname) as im:
            frames = getattr(im, "n_frames", 1)
            im.seek(frames - 1 if fname.endswith(".gif") else 0)
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert pixels.var() > PIXEL_VARIANCE_FLOOR, f"{fname} looks blank (variance {pixels.var():.1f})"
        assert max(pixels.shape[:2]) <= 1400, f"{fname} is {pixels.shape[1]}x{pixels.shape[0]}: keep figures small"
        assert (out / fname).stat().st_size < 600_000, f"{fname} is too large a file"
    assert results["seconds"] < 60


def test_00_autograd_numbers(runs):
    _, r, out = runs("00_autograd")
    assert r["graph_tensors"] == 12 and r["graph_functions"] == 7
    assert r["grad_max_disagreement"] < 1e-5  # backward() = the walk by hand = calculus
    assert abs(r["grad_w"] - r["grad_w_calculus"]) < 1e-5
    assert r["fd_best_error_float64"] < 1e-9 < r["fd_best_error_float32"]
    assert r["gradchecks_passed"] == r["gradchecks_total"] == 6
    assert r["wrong_backward_caught"] is True
    assert r["train_final_loss"] < 0.2 * r["train_first_loss"]
    assert r["train_accuracy"] > 0.9
    assert "passed" in out and "caught: gradcheck" in out


def test_01_kernels_numbers(runs):
    _, r, out = runs("01_kernels")
    # the launches drawn are kernels.py's: conv2d (2, 32, 16, 16) * (128, 32, 3, 3) tiles y
    # (N*P*Q = 512 rows, K = 128 columns) in blocks of conv2d.cu's TILE; group norm a block per (n, g)
    tile = r["conv_tile"]
    assert r["conv_grid"] == [-(-128 // tile), -(-512 // tile), 1]
    assert r["gn_grid"] == [16, 1, 1] and r["gn_block"] == 64
    assert r["attn_grid"] == [4, 4, 1] and r["attn_block"] == 64
    assert r["online_softmax_lse_error"] < 1e-4
    if shutil.which(os.environ.get("CXX", "g++")):
        assert r["emulator_available"], "a C++ compiler is here, so the emulator must have run"
    if r["emulator_available"]:
        assert r["kernel_checks"] >= 12
        assert r["kernel_checks_passed"] == r["kernel_checks"]
        assert r["kernel_max_error"] < 1e-3
    else:
        assert "not available" in out


def test_02_inputs_numbers(runs):
    _, r, _ = runs("02_inputs")
    assert (r["captions_all"], r["captions_train"], r["captions_heldout"]) == (180, 150, 30)
    assert r["tensor_shape"] == [3, 32, 32]
    assert -1.0 <= r["tensor_min"] < 0 and r["tensor_max"] == 1.0  # [-1, 1], white background at 1
    assert r["heldout_images"] == 270 and r["heldout_in_train"] == 0
    assert r["distinct_words"] == 19


def test_03_forward_noise_numbers(runs):
    _, r, _ = runs("03_forward_noise")
    assert r["n_steps"] == 50 and (r["timesteps_first"], r["timesteps_last"]) == (1, 981)
    assert r["frames"] == 51
    assert abs(r["alpha_bar_last"] - 0.0057755) < 1e-6
    # the histogram at the last step: mean ~0 (a 7.6% trace of the image is left), std ~1
    assert abs(r["last_step_mean"]) < 0.15
    assert abs(r["last_step_mean"] - r["last_step_expected_mean"]) < 0.03
    assert abs(r["last_step_std"] - 1) < 0.03
    # 1000 small steps give the one-jump distribution
    assert r["chain_vs_jump_mean_diff"] < 0.05 and r["chain_vs_jump_std_diff"] < 0.05
    assert 300 < r["t_snr_equals_1"] < 400
    if r["latent_part"]:
        assert abs(r["latent_last_step_mean"]) < 0.2 and abs(r["latent_last_step_std"] - 1) < 0.1


def needs_model(results):
    if not results["model"]:
        pytest.skip("no trained model here")


def test_04_vae_numbers(runs):
    _, r, _ = runs("04_vae")
    needs_model(r)
    c, h, w = r["latent_shape"]
    assert r["compression"] == 3 * 32 * 32 / (c * h * w) and r["sd_compression"] == 48
    assert 0.3 < r["scaled_latent_std"] < 3  # scaling_factor brings the latents near unit scale
    if not OTHER_MODEL:  # the shipped model reconstructs flat shapes well
        assert r["psnr_train_db"] > 20 and r["psnr_heldout_db"] > 18


def test_05_text_encoder_numbers(runs):
    _, r, _ = runs("05_text_encoder")
    needs_model(r)
    assert r["n_tokens"] == 8 and r["ids_length"] == 77 and r["padding"] == 77 - 8 - 2
    assert r["embedding_shape"][0] == 77
    assert r["max_change_before_edit"] < 1e-5  # causal: positions before an edited word do not change
    if r["clip_part"] and not OTHER_MODEL:
        assert r["clip_top1"] >= 0.75 and r["clip_diagonal_mean"] > r["clip_offdiagonal_mean"]


def test_06_unet_numbers(runs):
    _, r, _ = runs("06_unet")
    needs_model(r)
    assert r["timestep_embedding_at_0"] < 1e-6  # t = 0: every cos is 1, every sin 0
    assert r["attention_row_sum_error"] < 1e-4  # each pixel's attention over the 77 tokens sums to 1
    assert set(r["mse_by_t"]) == {"50", "250", "500", "750", "950"}
    if not OTHER_MODEL:  # a trained UNet predicts the noise far better than predicting 0 (MSE 1)
        assert r["loss_mean_caption"] < 0.5
        assert r["loss_mean_caption"] <= r["loss_mean_empty"] + 0.01


def test_07_reverse_denoise_numbers(runs):
    _, r, stdout = runs("07_reverse_denoise")
    needs_model(r)
    ts = r["timesteps"]
    assert r["steps"] == len(ts) == 5 and ts == sorted(ts, reverse=True) and ts[-1] == 1
    # the 5 timesteps are printed once each (the first-four-and-last-two form repeated some)
    assert f"timesteps visited: {ts}\n" in stdout
    assert r["ddim_repeatable"] is True  # DDIM (eta = 0) from the same z_T: the same image
    # the decoded predictions of x_0 approach the final image
    assert r["x0_distance_last"] < r["x0_distance_first"] and r["x0_distance_last"] < 0.05
    assert r["x0_distance_half"] < r["x0_distance_first"]


def test_08_text_to_image_numbers(runs):
    _, r, _ = runs("08_text_to_image")
    needs_model(r)
    assert r["train_prompts"] == 4 and r["heldout_prompts"] == 3 and r["seed_draws"] == 2
    assert len(r["guidance_attributes_right"]) == len(r["guidance_scales"]) == 4
    assert r["sweep_matches_pipeline"] <= 1  # the lesson's own guided loop is the pipeline's
    for key in ("train", "heldout"):
        assert 0 <= r[f"{key}_all_right"] <= r[f"{key}_prompts"]
    if not OTHER_MODEL:  # at the 10 steps of --fast the shipped model already follows the prompts
        assert r["train_all_right"] >= 3 and r["train_color_accuracy"] >= 0.75
        scales, right = r["guidance_scales"], r["guidance_attributes_right"]
        assert right[scales.index(0.0)] <= right[scales.index(5.0)]  # guidance makes it follow the prompt


def test_09_img2img_inpainting_numbers(runs):
    _, r, _ = runs("09_img2img_inpainting")
    needs_model(r)
    assert r["steps_run"] == [int(r["steps"] * s) for s in r["strengths"]]  # diffusers' choice of timesteps
    assert r["img2img_steps_recorded"] == int(r["steps"] * 0.6)
    assert r["strength1_is_text_to_image"] is True
    assert r["known_latent_error"] == 0.0  # inpainting keeps the unmasked latent exactly
    if not OTHER_MODEL:  # the shipped model: recoloured in place, moved at high strength, the hole filled
        assert r["strength0_psnr_db"] > 25 and r["recolour_right"][0] is False
        assert all(r["recolour_right"][r["strengths"].index(0.6):])
        assert r["move_positions"][0] == "top left" and r["move_positions"][-1] == "bottom right"
        assert all(r["inpaint_right"]) and r["inpaint_outside_max"] < 40


def test_10_data_parallel_numbers(runs):
    _, r, _ = runs("10_data_parallel")
    assert r["shard_mean_relative_difference"] < 1e-5  # the shards' mean is the batch's gradient
    assert r["batch_coupled_relative_difference"] > 1e-2  # ... unless samples meet inside the model
    assert 0.2 < r["one_shard_cosine"] < 0.99  # one shard alone: a noisy estimate
    assert r["ring_error"] < 1e-6
    assert r["ring_bytes_sent_per_rank"] == pytest.approx(2 * 3 / 4 * (r["parameters"] * 4), rel=1e-4)
    if r["two_ranks"]:
        assert r["loss_relative_difference"] < 1e-3


def test_cli_lists_lessons_and_rejects_unknown():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    listing = subprocess.run([sys.executable, "-m", "minisd", "lessons", "--list"], capture_output=True,
                             text=True, env=env)
    assert listing.returncode == 0
    for name in present:
        assert name in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "minisd", "lesson", "99"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no lesson '99'" in bad.stderr and "Traceback" not in bad.stderr


def test_lesson_resolution():
    from minisd.cli import lessons

    assert lessons.resolve("3").name == "03_forward_noise.py"
    assert lessons.resolve("03").name == "03_forward_noise.py"
    assert lessons.resolve("forward_noise").name == "03_forward_noise.py"
    assert lessons.resolve("00_autograd.py").name == "00_autograd.py"


def test_viz_helpers(tmp_path):
    from minisd import viz
    from minisd.data.images import to_model_input

    white = np.full((4, 4, 3), 255, np.uint8)
    assert viz.to_uint8(white) is white
    chw = np.ones((3, 4, 4), np.float32)  # [-1, 1] channels-first: 1 is white
    assert (viz.to_uint8(chw) == 255).all() and viz.to_uint8(chw).shape == (4, 4, 3)
    assert (viz.to_uint8(-chw) == 0).all()
    x = to_model_input(np.stack([white, white * 0]))
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32 and x[0].min() == 1 and x[1].max() == -1
    assert viz.upscale(white, 3).shape == (12, 12, 3)
    assert viz._wrap("a b c\nd", 3) == "a b\nc\nd"
    fig = viz.image_grid([white, chw, -chw], titles=["one", "two", "three"], ncols=2, title="grid")
    path = viz.save(fig, tmp_path / "grid.png")
    with Image.open(path) as im:
        assert np.asarray(im.convert("L"), dtype=float).var() > 0
    gif = viz.save_gif([white, -chw, chw], tmp_path / "a.gif", scale=2)
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (8, 8)
    viz.write_results(tmp_path, {"a": np.float32(1.5), "b": np.arange(2), "c": (np.int64(3),)})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1.5, "b": [0, 1], "c": [3]}
