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
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings; prompt 0 is int 3"):
        pipe([3], steps=2)
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings, got NoneType"):
        pipe(None, steps=2)  # was "'NoneType' object is not iterable"
    with pytest.raises(ValueError, match="prompt must be"):
        pipe([], steps=2)


def test_prompt_that_is_not_valid_text_is_named(pipe):
    """A byte that is not UTF-8 on the command line reaches Python as a lone surrogate; the
    tokenizer's own message was "TextEncodeInput must be Union[...]"."""
    with pytest.raises(ValueError, match=r"prompt 1 'a red\\udcff circle' is not valid text: '\\udcff' at position 5"):
        pipe(["a red circle", "a red\udcff circle"], steps=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=True), "steps must be a positive integer, got True"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt must be a positive integer, got True"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(batch_size=True), "batch_size must be a positive integer, got True"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(guidance_scale=True), "guidance_scale must be a number >= 0, got True"),
    (dict(guidance_scale="5"), "guidance_scale must be a number >= 0"),
    (dict(seed=-1), "seed must be an integer >= 0, None or a numpy Generator, got -1"),
    (dict(seed=True), "seed must be an integer >= 0"),
    (dict(seed=1.5), "seed must be an integer >= 0"),
])
def test_bools_and_bad_numbers_are_refused_alike(pipe, kwargs, message):
    """True is an int to Python; refused wherever a whole number is asked for, as steps=True already was."""
    with pytest.raises(ValueError, match=message):
        pipe(CAPTIONS[:1], **kwargs)


def test_numpy_scalars_are_numbers(pipe):
    want = pipe(CAPTIONS[:1], steps=2, guidance_scale=5.0, num_images_per_prompt=2, seed=1)
    got = pipe(CAPTIONS[:1], steps=np.int64(2), guidance_scale=np.float32(5), num_images_per_prompt=np.int32(2),
               seed=np.int64(1))
    np.testing.assert_array_equal(got, want)


def test_non_finite_latents_are_refused(pipe):
    z = np.zeros((1, 4, 8, 8), np.float32)
    for bad in (np.nan, np.inf):
        z[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="latents must be finite; 1 of their 256 values are NaN or inf"):
            pipe(CAPTIONS[:1], steps=2, latents=z)


# ---- batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_batched_images_match_one_batch(pipe, scheduler):
    """z_T is drawn batch after batch from one generator: the same numbers as one draw for all
    images, so the batch size changes nothing but float rounding (a product over more rows
    may round differently: ~1e-6 in the latents). The UNet sees at most batch_size images."""
    rows = []
    kwargs = dict(steps=3, seed=4, scheduler=scheduler, num_images_per_prompt=3, output="latent")
    whole = pipe(CAPTIONS[:2], batch_size=6, **kwargs)
    for batch in (1, 4):
        got = pipe(CAPTIONS[:2], batch_size=batch, callback=lambda i, t, z, e, x0: rows.append(len(z)), **kwargs)
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-4)
        assert max(rows) == batch and sum(rows) == 6 * 3
        rows.clear()
    images = [pipe(CAPTIONS[:2], steps=3, seed=4, scheduler=scheduler, num_images_per_prompt=3, batch_size=b)
              for b in (2, 6)]
    assert np.abs(images[0].astype(int) - images[1]).max() <= 1


def test_batches_keep_prompt_order_and_attention(pipe):
    """Images come prompt by prompt (prompt 0's first) whatever the batches; the attention maps
    of every batch are joined in the same order."""
    z = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    got = pipe(CAPTIONS[:2], steps=2, num_images_per_prompt=2, latents=z, batch_size=3, collect_attention=True,
               output="latent")
    maps = pipe.attention_maps
    for i, prompt in enumerate([CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2):
        alone = pipe(prompt, steps=2, latents=z[i:i + 1], collect_attention=True, output="latent")
        np.testing.assert_allclose(got[i:i + 1], alone, atol=1e-5)
        for name, m in maps.items():
            assert m.shape[:2] == (2, 4)
            np.testing.assert_allclose(m[:, i:i + 1], pipe.attention_maps[name], atol=1e-5)


def test_iter_batches_yields_bounded_batches_of_a_huge_request(pipe):
    """10^11 images: iter_batches yields 16 at a time; pipe(...) refuses at once, since it would
    have to return them all (it used to draw all the noise at once and grow until it died)."""
    batches = pipe.iter_batches(CAPTIONS[:1], steps=1, num_images_per_prompt=10 ** 11)
    first = next(batches)
    assert first.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(first[:2], pipe(CAPTIONS[:1], steps=1, num_images_per_prompt=2))
    with pytest.raises(ValueError, match=r"100,000,000,000 images take .* GiB to return, more than this machine"):
        pipe(CAPTIONS[:1], steps=1, num_images_per_prompt=10 ** 11)


def test_iter_batches_checks_before_it_samples(pipe):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        pipe.iter_batches(CAPTIONS[:1], steps=0)  # not at the first next()
    with pytest.raises(ValueError, match="cannot exceed"):
        pipe.iter_batches(CAPTIONS[:1], steps=5000)


def test_batch_size_from_a_memory_estimate():
    from minisd.pipeline import MAX_BATCH, estimate_batch_size

    shapes_unet = {"sample_size": 8, "block_out_channels": [32, 64]}
    shapes_vae = {"sample_size": 32, "block_out_channels": [16, 32, 64]}
    sd_unet = {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280]}
    sd_vae = {"sample_size": 512, "block_out_channels": [128, 256, 512, 512]}
    assert estimate_batch_size(shapes_unet, shapes_vae) == MAX_BATCH == 16
    assert estimate_batch_size(sd_unet, sd_vae) == 1  # 128 x 512 x 512 floats, 16 copies: 2.1 GB an image
    # 128 x 256 x 256 x 4 bytes x 16 = 512 MiB an image: two fit in 1 GiB
    assert estimate_batch_size(sd_unet, dict(sd_vae, sample_size=256)) == 2
    assert estimate_batch_size(sd_unet, sd_vae, budget=10 ** 12) == MAX_BATCH


# ---- what the model knows ----------------------------------------------------------------


def test_too_long_prompt_warns_once_per_prompt(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe([" ".join(["red"] * 100), CAPTIONS[0], " ".join(["blue"] * 90)], steps=1, num_images_per_prompt=3)
    assert [str(w.message)[:9] for w in caught] == ["prompt 0 ", "prompt 2 "]  # was once per image: 6


def trained_on(tiny_path, tmp_path, dataset) -> str:
    """A copy of the tiny model whose logs say what `minisd train` trained it on."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder)
    os.makedirs(folder / "logs")
    (folder / "logs" / "train_all.json").write_text(json.dumps({"dataset": dataset, "seed": 0}))
    return str(folder)


SHAPES_WORDS = {"a", "in", "the", "small", "large", "red", "green", "blue", "yellow", "purple", "cyan",
                "circle", "square", "triangle", "top", "bottom", "left", "right", "center"}


def test_unknown_words_warn_once_per_call(tiny_path, tmp_path):
    pipe = load_pipeline(trained_on(tiny_path, tmp_path, "shapes"))
    assert pipe.known_words == SHAPES_WORDS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(["a dog", "orange circle", "A small RED circle in the top left."], steps=1, num_images_per_prompt=2)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("the model never saw 'dog', 'orange', '.' in its training captions")
    assert "it knows a, blue, bottom, center, circle, cyan" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(["a large Cyan triangle in the bottom right", ""], steps=1)  # case does not matter: CLIP lower-cases


def test_no_word_warning_where_the_training_captions_are_not_known(pipe, tiny_path, tmp_path):
    """No logs (an exported or downloaded model), or a dataset whose captions need its files (emoji)."""
    assert pipe.known_words is None
    assert load_pipeline(trained_on(tiny_path, tmp_path, "emoji")).known_words is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(["a dog"], steps=1)


def test_prompt_words_follow_the_tokenizer(pipe):
    from minisd.pipeline import prompt_words

    assert prompt_words(pipe.tokenizer, "A red  CIRCLE, top-left été 42") == \
        ["a", "red", "circle", ",", "top", "-", "left", "été", "4", "2"]


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
    assert pipe.known_words == SHAPES_WORDS  # its logs say shapes; the README lists these words
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
