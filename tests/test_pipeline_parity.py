"""The whole pipeline against diffusers' pipelines, on a tiny random SD v1.x built in diffusers.

The folder is what a new user meets: a UNet whose sample_size is 8 with a 2-level VAE whose
own sample_size is left at diffusers' default (32), and SD v1.5's PNDMScheduler config. From
the same noise, minisd's pipe(...) must give diffusers' images within 2 uint8 levels:
StableDiffusionPipeline (negative prompts, every scheduler, guidance_rescale, another
size, prompt embeddings), StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline
(a 4-channel UNet, blended in the latent, and the 9-channel inpainting layout).

The same noise: diffusers' every draw (randn_tensor: the initial latents, the VAE's
posterior sample, the schedulers' per-step noise) is patched to take the next numbers of
a NumPy generator, the very draws minisd makes from np.random.default_rng(seed) in the
same order. So even the stochastic samplers (DDPM, Euler a, DDIM with eta) are compared.
"""

import contextlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import minisd  # noqa: E402
import test_interop as interop  # noqa: E402
from test_interop import TEXT, randomise, write_vocab  # noqa: E402

pytestmark = pytest.mark.parity
LEVELS = 2  # uint8 levels
STEPS, GUIDANCE = 5, 7.5
IMG2IMG_STEPS = 6  # of which int(6 * strength) are run
PROMPTS = ["a small red circle in the top left", "a large blue square in the center"]
NEGATIVE = ["a green triangle", "a small yellow circle"]

# test_interop's small SD v1.x, narrower; the VAE's two levels (latents half the image's size)
# with its sample_size left at diffusers' default, 32
UNET = dict(interop.UNET, block_out_channels=(16, 32))
VAE = {key: value for key, value in interop.VAE.items() if key != "sample_size"}
# SD v1.5's scheduler/scheduler_config.json, as published: the keys it leaves out (timestep_spacing)
# take each scheduler class's own default, in diffusers and in minisd
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


def build(root, name, in_channels, pipeline_class):
    """A tiny random SD folder saved by diffusers (tokenizer as vocab.json + merges.txt, and
    scheduler_config.json as SD v1.5's), and diffusers' pipeline loaded back from it."""
    vocab_size = write_vocab(root / "vocab")
    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "vocab"), model_max_length=77)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **dict(TEXT, hidden_size=32, num_hidden_layers=1)))
    pipe = pipeline_class(
        vae=randomise(diffusers.AutoencoderKL(**VAE), 1), text_encoder=randomise(text, 2), tokenizer=tokenizer,
        unet=randomise(diffusers.UNet2DConditionModel(**dict(UNET, in_channels=in_channels)), 3 + in_channels),
        scheduler=diffusers.PNDMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    folder = root / name
    pipe.save_pretrained(str(folder))
    for part in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / part).write_bytes((root / "vocab" / part).read_bytes())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    pipe = pipeline_class.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(minisd pipeline, diffusers pipeline) for the 4-channel model, and for the 9-channel inpainting one."""
    root = tmp_path_factory.mktemp("parity")
    folder, theirs = build(root, "sd", 4, diffusers.StableDiffusionPipeline)
    folder9, theirs9 = build(root, "sd-inpainting", 9, diffusers.StableDiffusionInpaintPipeline)
    return {4: (minisd.load_pipeline(str(folder)), theirs), 9: (minisd.load_pipeline(str(folder9)), theirs9)}


@contextlib.contextmanager
def numpy_noise(source):
    """diffusers' randn_tensor, everywhere it is called, returns the next numbers of ``source``:
    a NumPy Generator (drawn as minisd draws: standard_normal(shape), in float32), or a list
    of arrays handed out in order."""
    import importlib

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        shape = tuple(shape)
        if isinstance(source, list):
            a = source.pop(0)
            assert a.shape == shape, f"diffusers asked for {shape}, the next draw is {a.shape}"
        else:
            a = source.standard_normal(shape).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype or torch.float32)

    modules = ["diffusers.models.autoencoders.vae", "diffusers.schedulers.scheduling_ddpm",
               "diffusers.schedulers.scheduling_ddim", "diffusers.schedulers.scheduling_euler_ancestral_discrete",
               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"]
    with pytest.MonkeyPatch.context() as mp:
        for name in modules:
            mp.setattr(importlib.import_module(name), "randn_tensor", randn_tensor)
        yield


def schedulers(ours, theirs, name, options):
    """minisd's and diffusers' scheduler of one kind, each built from the folder's config plus ``options``."""
    mine = ours.make_scheduler(name, **options)
    return mine, getattr(diffusers, type(mine).__name__).from_config(theirs.scheduler.config, **options)


def to_uint8(images):
    """diffusers' output_type="np" floats in [0, 1] -> uint8, as its numpy_to_pil rounds them."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def assert_images_close(ours, theirs):
    """The same uint8 pictures to within LEVELS levels, and a real picture (not a flat one)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= LEVELS, f"images differ by {diff} uint8 levels"
    assert ours.astype(float).std() > 10  # a picture, not a flat image that any two models would agree on


def run_both(models, seed, diffusers_call, minisd_call, inpainting=False, noise=None):
    ours, theirs = models[9 if inpainting else 4]
    with numpy_noise(np.random.default_rng(seed) if noise is None else noise), torch.no_grad():
        want = to_uint8(diffusers_call(theirs).images)
    return minisd_call(ours), want


# ---- text to image -------------------------------------------------------------------------


def test_the_folder_is_read_as_diffusers_reads_it(models):
    """The latent size comes from the UNet's sample_size (8) and the VAE's factor (2), not from the
    VAE's own sample_size (32: minisd used to draw 16 x 16 latents here); the scheduler is
    the PNDMScheduler the folder names (minisd used to swap in DDIM)."""
    ours, theirs = models[4]
    assert ours.vae_scale_factor == theirs.vae_scale_factor == 2
    assert ours.latent_shape == (4, 8, 8) and ours.default_size == (16, 16)
    assert type(ours.scheduler).__name__ == type(theirs.scheduler).__name__ == "PNDMScheduler"
    assert ours.scheduler.config["skip_prk_steps"] is True


# (short name, options): every deterministic scheduler, with the options the issue names
DETERMINISTIC = [("ddim", {}), ("pndm", {}), ("pndm", {"skip_prk_steps": False}), ("euler", {}),
                 ("euler", {"use_karras_sigmas": True}), ("heun", {}), ("lms", {}),
                 ("lms", {"use_karras_sigmas": True}),
                 ("dpm++2m", {}), ("dpm++2m", {"use_karras_sigmas": True}), ("dpm++2m", {"solver_order": 3}),
                 ("unipc", {}), ("unipc", {"use_karras_sigmas": True})]
STOCHASTIC = [("ddpm", {}), ("euler_a", {})]


@pytest.mark.parametrize("name, options", DETERMINISTIC + STOCHASTIC,
                         ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}" for n, o in
                              DETERMINISTIC + STOCHASTIC])
def test_text_to_image_with_each_scheduler_and_negative_prompts(models, name, options):
    ours, theirs = models[4]
    mine, their_scheduler = schedulers(ours, theirs, name, options)

    def diffusers_call(pipe):
        pipe = diffusers.StableDiffusionPipeline(**pipe.components)
        pipe.scheduler = their_scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="np")

    got, want = run_both(models, 3, diffusers_call, lambda pipe: pipe(
        PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, seed=3, scheduler=mine))
    assert_images_close(got, want)


def test_the_folders_own_scheduler_one_negative_prompt_and_several_images(models):
    """No scheduler named: the folder's PNDM. One negative prompt for both prompts, two images each."""
    got, want = run_both(models, 5, lambda pipe: pipe(  # (diffusers takes a list for a list of prompts)
        PROMPTS, negative_prompt=["a purple square"] * 2, num_images_per_prompt=2, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, output_type="np"), lambda pipe: pipe(
        PROMPTS, negative_prompt="a purple square", num_images_per_prompt=2, steps=STEPS, guidance_scale=GUIDANCE,
        seed=5))
    assert got.shape == (4, 16, 16, 3)
    assert_images_close(got, want)


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale(models, rescale):
    got, want = run_both(models, 7, lambda pipe: pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=12.0, guidance_rescale=rescale, output_type="np"),
        lambda pipe: pipe(PROMPTS, steps=STEPS, guidance_scale=12.0, guidance_rescale=rescale, seed=7))
    assert_images_close(got, want)


def test_a_size_other_than_the_default(models):
    """24 x 40 pixels: latents 12 x 20 (diffusers asks for multiples of 8 whatever the VAE)."""
    got, want = run_both(models, 9, lambda pipe: pipe(
        PROMPTS[:1], height=24, width=40, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np"),
        lambda pipe: pipe(PROMPTS[:1], height=24, width=40, steps=STEPS, guidance_scale=GUIDANCE, seed=9))
    assert got.shape == (1, 24, 40, 3)
    assert_images_close(got, want)


def test_ddim_with_eta(models):
    ours, theirs = models[4]
    mine, their_scheduler = schedulers(ours, theirs, "ddim", {})

    def diffusers_call(pipe):
        pipe = diffusers.StableDiffusionPipeline(**pipe.components)
        pipe.scheduler = their_scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS, eta=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")

    got, want = run_both(models, 11, diffusers_call, lambda pipe: pipe(
        PROMPTS, eta=0.6, steps=STEPS, guidance_scale=GUIDANCE, seed=11, scheduler=mine))
    assert_images_close(got, want)
    assert not np.array_equal(got, ours(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, seed=11, scheduler=mine))


def test_prompt_embeddings_skip_the_text_encoder(models):
    ours, _ = models[4]
    rng = np.random.default_rng(0)
    embeds, negative = (rng.standard_normal((2, 77, 32)).astype(np.float32) for _ in range(2))
    got, want = run_both(models, 13, lambda pipe: pipe(
        prompt_embeds=torch.from_numpy(embeds), negative_prompt_embeds=torch.from_numpy(negative),
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np"), lambda pipe: pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, steps=STEPS, guidance_scale=GUIDANCE, seed=13))
    assert_images_close(got, want)
    # the embeddings of the prompts themselves give the prompts' images
    c = ours.encode_prompt(PROMPTS)
    np.testing.assert_array_equal(ours(prompt_embeds=c, steps=2, seed=1), ours(PROMPTS, steps=2, seed=1))


# ---- img2img -------------------------------------------------------------------------------


def picture(size=16, seed=0):
    """A blocky RGB test picture (uint8 (size, size, 3)): a dark square on a light ground, speckled."""
    rng = np.random.default_rng(seed)
    im = np.full((size, size, 3), 230, np.uint8)
    im[size // 4: 3 * size // 4, size // 8: size // 2] = (200, 40, 40)
    return np.clip(im.astype(int) + rng.integers(-20, 20, im.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name, strength", [("ddim", 0.6), ("pndm", 0.6), ("euler", 0.5), ("heun", 0.6),
                                            ("dpm++2m", 0.4), ("unipc", 0.7), ("lms", 0.8), ("ddpm", 0.6),
                                            ("euler_a", 0.6)])
def test_img2img_against_diffusers(models, name, strength):
    from PIL import Image

    ours, theirs = models[4]
    mine, their_scheduler = schedulers(ours, theirs, name, {})
    image = picture()

    def diffusers_call(pipe):
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
        pipe.scheduler = their_scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS, image=Image.fromarray(image), strength=strength, negative_prompt=NEGATIVE,
                    num_inference_steps=IMG2IMG_STEPS, guidance_scale=GUIDANCE, output_type="np",
                    callback_on_step_end=lambda p, i, t, kw: (their_steps.append(float(t)), kw)[1])

    our_steps, their_steps = [], []
    got, want = run_both(models, 17, diffusers_call, lambda pipe: pipe(
        PROMPTS, image=image, strength=strength, negative_prompt=NEGATIVE, steps=IMG2IMG_STEPS, guidance_scale=GUIDANCE,
        seed=17, scheduler=mine, callback=lambda i, t, *arrays: our_steps.append(t)))
    assert_images_close(got, want)
    # the same timesteps visited: the last int(IMG2IMG_STEPS * strength) steps of the schedule (PNDM one
    # more, as in diffusers: its list holds t_1 twice, and the cut counts it)
    assert our_steps == pytest.approx(their_steps)
    assert len(set(our_steps)) == int(IMG2IMG_STEPS * strength) + (name == "pndm")


# ---- inpainting ----------------------------------------------------------------------------


def quadrant_mask(size=16):
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2, size // 2:] = 255  # repaint the top right
    return mask


@pytest.mark.parametrize("name, strength", [("ddim", 1.0), ("pndm", 1.0), ("euler", 1.0), ("dpm++2m", 0.7),
                                            ("ddim", 0.5)])
def test_inpainting_any_model_against_diffusers(models, name, strength):
    """A 4-channel UNet: after every step the known part of the latent is the image's, noised
    to the next timestep (diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet)."""
    from PIL import Image

    ours, theirs = models[4]
    mine, their_scheduler = schedulers(ours, theirs, name, {})
    image, mask = picture(), quadrant_mask()

    def diffusers_call(pipe):
        pipe = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
        pipe.scheduler = their_scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")

    got, want = run_both(models, 19, diffusers_call, lambda pipe: pipe(
        PROMPTS, image=image, mask_image=mask, strength=strength, steps=STEPS, guidance_scale=GUIDANCE, seed=19,
        scheduler=mine))
    assert_images_close(got, want)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_unet_with_nine_channels_against_diffusers(models, strength):
    """The inpainting layout: UNet([z_t, mask, E(masked image)]). minisd draws the masked image's
    posterior sample before the noise, diffusers after: the same arrays, handed out in its order."""
    from PIL import Image

    ours, _ = models[9]
    assert ours.unet.config["in_channels"] == 9
    image, mask = picture(seed=1), quadrant_mask()
    rng = np.random.default_rng(23)
    image_sample = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32)] if strength < 1 else []
    masked_sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    got, want = run_both(models, None, lambda pipe: pipe(
        PROMPTS, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np"), lambda pipe: pipe(
        PROMPTS, image=image, mask_image=mask, strength=strength, steps=STEPS, guidance_scale=GUIDANCE, seed=23),
        inpainting=True, noise=image_sample + [noise, masked_sample])
    assert_images_close(got, want)
