"""The text-to-image pipeline: guidance, seeding, callbacks, attention maps, schedulers, bad input,
and the shipped model."""

import json
import os
import warnings

import numpy as np
import pytest

import minisd
from minisd import io, nn
from minisd.pipeline import StableDiffusionPipeline, load_pipeline
from minisd.tensor import no_grad

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "a small green triangle in the bottom right", "a large purple circle in the top right"]


def make_tiny_model(folder: str) -> str:
    """A model folder in diffusers' layout with random weights: enough to test the plumbing."""
    from minisd import train as T
    from minisd.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from minisd.schedulers import DDIMScheduler

    nn.manual_seed(0)
    tok = T.train_tokenizer(CAPTIONS, folder)
    vae = AutoencoderKL(**dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8), norm_num_groups=4,
                               mid_block_add_attention=False, scaling_factor=0.5))
    te = CLIPTextModel(**dict(T.TEXT_CONFIG, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    unet = UNet2DConditionModel(**dict(T.UNET_CONFIG, block_out_channels=(8, 16), norm_num_groups=4,
                                       attention_head_dim=2, cross_attention_dim=16))
    io.save_pretrained(vae, os.path.join(folder, "vae"))
    io.save_pretrained(te, os.path.join(folder, "text_encoder"))
    io.save_pretrained(unet, os.path.join(folder, "unet"))
    DDIMScheduler.from_config(T.SCHEDULER_CONFIG).save_config(os.path.join(folder, "scheduler"))
    T.write_model_index(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def pipe(tiny_path):
    return load_pipeline(tiny_path)


def test_images_are_uint8_and_seeded(pipe):
    a = pipe(CAPTIONS[:2], steps=4, seed=3)
    b = pipe(CAPTIONS[:2], steps=4, seed=3)
    c = pipe(CAPTIONS[:2], steps=4, seed=4)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_latents_argument_replaces_the_seeded_noise(pipe):
    z = np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32)
    a = pipe(CAPTIONS[:2], steps=3, latents=z, seed=0)
    b = pipe(CAPTIONS[:2], steps=3, latents=z, seed=99)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(CAPTIONS[:2], steps=3, latents=z[:1])


def reference_ddim(pipe, prompts, z, steps, w):
    """Classifier-free guided DDIM written out from the formulas, independently of the pipeline:
        eps = eps_u + w (eps_c - eps_u)
        x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t);  z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    with SD's "leading" timesteps (steps_offset 1) and alpha_bar_prev = alpha_bar_0 at the end."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    ratio = 1000 // steps
    ts = (np.arange(steps) * ratio)[::-1] + 1
    ids = pipe.tokenizer(prompts)
    empty = pipe.tokenizer([""] * len(prompts))
    with no_grad():
        c = pipe.text_encoder(ids).numpy()
        u = pipe.text_encoder(empty).numpy()
        for t in ts:
            eps_c = pipe.unet(z, int(t), c).numpy().astype(np.float64)
            eps_u = pipe.unet(z, int(t), u).numpy().astype(np.float64)
            eps = eps_u + w * (eps_c - eps_u)
            a_t = abar[t]
            a_prev = abar[t - ratio] if t - ratio >= 0 else abar[0]
            x0 = (z - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            z = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
    return z


@pytest.mark.parametrize("w", [0.0, 1.0, 5.0])
def test_guided_ddim_matches_the_formulas(pipe, w):
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    got = pipe(CAPTIONS[:2], steps=5, guidance_scale=w, latents=z, output="latent")
    want = reference_ddim(pipe, CAPTIONS[:2], z, 5, w)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_empty_prompt_is_unconditional(pipe):
    """For "" the conditional and unconditional branches are the same, so guidance changes nothing."""
    a = pipe([""], steps=4, guidance_scale=1.0, seed=5, output="latent")
    b = pipe([""], steps=4, guidance_scale=7.0, seed=5, output="latent")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_callback_sees_every_step(pipe):
    seen = []

    def callback(step, t, latents, noise_pred, pred_x0):
        seen.append((step, t, latents.shape, noise_pred.shape, pred_x0.shape))

    pipe(CAPTIONS[:3], steps=6, callback=callback)
    assert [s[0] for s in seen] == list(range(6))
    assert [s[1] for s in seen] == sorted((s[1] for s in seen), reverse=True)
    assert all(s[2:] == ((3, 4, 8, 8),) * 3 for s in seen)


def test_attention_maps_per_step_and_token(pipe):
    pipe(CAPTIONS[:2], steps=3, collect_attention=True)
    maps = pipe.attention_maps
    assert maps and all("attn2" in name for name in maps)
    for a in maps.values():
        assert a.shape[:2] == (3, 2) and a.shape[-1] == 77
        np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=1e-5)  # a distribution over the 77 tokens
    pipe(CAPTIONS[:2], steps=2)
    assert pipe.attention_maps is None


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler"])
def test_each_scheduler_runs_and_is_seeded(pipe, scheduler):
    a = pipe(CAPTIONS[:1], steps=4, scheduler=scheduler, seed=2)
    b = pipe(CAPTIONS[:1], steps=4, scheduler=scheduler, seed=2)
    np.testing.assert_array_equal(a, b)


def test_too_long_prompt_is_truncated_with_a_warning(pipe):
    long_prompt = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        images = pipe([long_prompt], steps=2)
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=-3), "steps must be a positive integer"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number >= 0"),
    (dict(scheduler="pndm"), "unknown scheduler"),
])
def test_bad_arguments_are_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(CAPTIONS[:1], **kwargs)


def test_prompt_must_be_text(pipe):
    with pytest.raises(ValueError, match="prompt must be"):
        pipe([3], steps=2)
    with pytest.raises(ValueError, match="prompt must be"):
        pipe([], steps=2)


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_pipeline(str(tmp_path))


def test_corrupt_weights_are_a_clear_error(tiny_path, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot load unet"):
        load_pipeline(str(broken))
    with open(broken / "model_index.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(broken))


# ---- the shipped model -------------------------------------------------------------------


def test_shipped_model_loads_and_is_small():
    from minisd.info import folder_size
    from minisd.pipeline import DEFAULT_MODEL

    pipe = minisd.load_pipeline()
    assert os.path.abspath(pipe.path) == os.path.abspath(DEFAULT_MODEL)
    assert folder_size(DEFAULT_MODEL) <= 30 * 2 ** 20
    with open(os.path.join(DEFAULT_MODEL, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.slow
def test_shipped_model_follows_prompts():
    """A handful of seen prompts at 50 DDIM steps: most images read back with all four attributes."""
    from minisd.data.reader import read
    from minisd.data.shapes import parse_caption

    pipe = minisd.load_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = pipe(CAPTIONS, steps=50, seed=0)
    right = [read(im).matches(parse_caption(c)) for im, c in zip(images, CAPTIONS)]
    assert sum(right) >= 3, right
