"""minisd and diffusers read each other's Stable Diffusion folders and draw the same images.

A tiny random SD v1.x pipeline is built in diffusers/transformers (UNet, VAE, CLIP text
model, a CLIP-format vocab.json + merges.txt learned here) and saved with save_pretrained.
minisd loads that folder, and from the same initial latents (DDIM, 10 steps, guidance 7.5)
gives the images diffusers' StableDiffusionPipeline gives. The other way: a minisd model
written by `minisd export` loads in diffusers and draws what minisd draws.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import randn, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import minisd  # noqa: E402
from minisd import io  # noqa: E402
from minisd.tokenizer import Tokenizer  # noqa: E402
from test_tokenizer import PROMPTS, learn_merges  # noqa: E402

pytestmark = pytest.mark.parity
ATOL = 1e-3  # on images in [0, 1] and on latents
STEPS, GUIDANCE = 10, 7.5
CAPTIONS = ["a small red circle in the top left", "A large BLUE square, in the center!"]

# A small SD v1.x: the real block types and names, at toy widths.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           norm_num_groups=8, sample_size=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# SD v1.5's scheduler settings
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def write_vocab(folder):
    """vocab.json + merges.txt in CLIP's format, learned on a little text (as SD v1.x folders carry them)."""
    vocab, merges = learn_merges(" ".join(PROMPTS[:2] + PROMPTS[4:6] + CAPTIONS), 120)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return len(vocab)


def randomise(model, seed):
    """Random norms and biases too (diffusers initialises them to 1 and 0), so that every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random SD v1.x pipeline saved by diffusers (tokenizer as vocab.json + merges.txt)."""
    root = tmp_path_factory.mktemp("interop")
    vocab_size = write_vocab(root / "vocab")
    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "vocab"), model_max_length=77)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT))
    pipe = diffusers.StableDiffusionPipeline(
        vae=randomise(diffusers.AutoencoderKL(**VAE), 1), text_encoder=randomise(text, 2), tokenizer=tokenizer,
        unet=randomise(diffusers.UNet2DConditionModel(**UNET), 3), scheduler=diffusers.DDIMScheduler(**SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = root / "sd"
    pipe.save_pretrained(str(folder))
    # SD v1.x folders carry vocab.json + merges.txt; transformers 5 writes tokenizer.json only
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).write_bytes((root / "vocab" / name).read_bytes())
    return folder


def latents_for(n, shape, seed=0):
    return randn(n, *shape, seed=seed, dtype=np.float32)


def diffusers_images(folder, prompts, latents):
    """diffusers' StableDiffusionPipeline on ``folder`` (in float32): images as floats in [0, 1]
    (N, H, W, 3), and z_0."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    z = torch.from_numpy(latents)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=z)
    with torch.no_grad():
        images = pipe(prompts, output_type="np", **kwargs).images
        z0 = pipe(prompts, output_type="latent", **kwargs).images
    return np.asarray(images, dtype=np.float32), z0.numpy()


def minisd_images(pipe, prompts, latents):
    """minisd's pipeline from the same latents: images in [0, 1] before rounding to uint8, and z_0."""
    z0 = pipe(prompts, steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output="latent")
    with minisd.no_grad():
        x = pipe.vae.decode(z0 / float(pipe.vae.config["scaling_factor"])).numpy()
    return np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1), z0


def assert_same_images(ours, theirs):
    (x, z), (x_ref, z_ref) = ours, theirs
    assert x.shape == x_ref.shape and z.shape == z_ref.shape
    assert np.abs(z - z_ref).max() < ATOL, f"latents differ by {np.abs(z - z_ref).max():.2e}"
    assert np.abs(x - x_ref).max() < ATOL, f"images differ by {np.abs(x - x_ref).max():.2e}"
    assert x.std() > 0.05  # a real picture, not a flat one that any two models would agree on


# =====================================================================================
# diffusers' folders in minisd
# =====================================================================================


def test_a_diffusers_folder_draws_the_same_images(sd_folder):
    pipe = minisd.load_pipeline(str(sd_folder))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    latents = latents_for(len(CAPTIONS), pipe.latent_shape)
    assert_same_images(minisd_images(pipe, CAPTIONS, latents), diffusers_images(sd_folder, CAPTIONS, latents))


def half_precision_copy(folder, out):
    """``folder`` saved again with float16 weights, as SD's published fp16 files."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.to(torch.float16).save_pretrained(str(out))
    for name in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / name).write_bytes((folder / "tokenizer" / name).read_bytes())
    return out


def test_float16_weights_draw_the_same_images(sd_folder, tmp_path):
    folder = half_precision_copy(sd_folder, tmp_path / "fp16")
    header = io.SafetensorsFile(folder / "unet" / io.DIFFUSERS_WEIGHTS).header
    assert {e["dtype"] for e in header.values()} == {"F16"}  # kept float16 on disk ...
    pipe = minisd.load_pipeline(str(folder))
    assert pipe.unet.conv_in.weight.dtype == np.float32  # ... computed in float32
    latents = latents_for(len(CAPTIONS), pipe.latent_shape, seed=1)
    assert_same_images(minisd_images(pipe, CAPTIONS, latents), diffusers_images(folder, CAPTIONS, latents))


def test_text_encoder_keys_with_or_without_prefix(sd_folder, tmp_path):
    """SD v1.x's published text encoder names its weights text_model.*; transformers 5 saves them bare."""
    path = sd_folder / "text_encoder" / io.TRANSFORMERS_WEIGHTS
    bare = {k.removeprefix("text_model."): v for k, v in io.load_safetensors(path).items()}
    other = tmp_path / "text_encoder"
    other.mkdir()
    (other / "config.json").write_bytes((sd_folder / "text_encoder" / "config.json").read_bytes())
    io.save_safetensors({"text_model." + k: v for k, v in bare.items()}, other / io.TRANSFORMERS_WEIGHTS)
    ours = [io.load_pretrained(folder) for folder in (path.parent, other)]
    ids = np.arange(20)[None] % ours[0].config["vocab_size"]
    reference = transformers.CLIPTextModel.from_pretrained(str(path.parent)).float()
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    for model in ours:
        np.testing.assert_allclose(model(ids).numpy(), want, atol=1e-5)


def test_tokenizer_ids_equal_clip_tokenizers_through_the_pipeline(sd_folder, tmp_path):
    """Both forms a folder may hold: vocab.json + merges.txt (SD v1.x), tokenizer.json (transformers 5)."""
    reference = transformers.CLIPTokenizer.from_pretrained(str(sd_folder / "tokenizer"))
    want = np.array(reference(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"])
    assert len(reference(PROMPTS[7])["input_ids"]) > 77  # one prompt is cut
    assert len(set(want.ravel())) > 60  # the prompts use much of the vocabulary, not just bytes
    for keep in (("vocab.json", "merges.txt"), ("tokenizer.json",)):
        folder = tmp_path / "+".join(keep) / "tokenizer"
        folder.mkdir(parents=True)
        for name in os.listdir(sd_folder / "tokenizer"):
            if name.endswith("config.json") or name.endswith("map.json") or name in keep:
                (folder / name).write_bytes((sd_folder / "tokenizer" / name).read_bytes())
        tok = Tokenizer.from_folder(str(folder))
        with pytest.warns(UserWarning, match="truncated"):
            np.testing.assert_array_equal(tok(PROMPTS), want, err_msg=f"tokenizer from {keep}")
    # and the pipeline's own tokenizer, loaded with the model
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_array_equal(minisd.load_pipeline(str(sd_folder)).tokenizer(PROMPTS), want)


# =====================================================================================
# Folders minisd refuses, in one line
# =====================================================================================


def test_pickle_only_and_missing_folders_are_refused(sd_folder, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(sd_folder, folder)
    (folder / "unet" / io.DIFFUSERS_WEIGHTS).rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unet.*only pickle weights \(diffusion_pytorch_model.bin\).*safetensors"):
        minisd.load_pipeline(str(folder))
    with pytest.raises(FileNotFoundError, match="not a local folder.*downloads nothing"):
        minisd.load_pipeline("runwayml/stable-diffusion-v1-5")
    for model in (str(folder), "runwayml/stable-diffusion-v1-5"):
        done = subprocess.run([sys.executable, "-m", "minisd", "generate", "a red circle", "--model", model,
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "safetensors" in done.stderr if model == str(folder) else "not a local folder" in done.stderr


# =====================================================================================
# minisd's models in diffusers
# =====================================================================================


def minisd_born_pipeline(vocab_folder):
    """A tiny pipeline made by minisd itself (its own random initialisation), not by diffusers."""
    from minisd.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from minisd.pipeline import StableDiffusionPipeline
    from minisd.schedulers import DDIMScheduler

    minisd.manual_seed(5)
    tok = Tokenizer.from_folder(str(vocab_folder))
    vae = AutoencoderKL(**VAE, scaling_factor=0.5)
    text = CLIPTextModel(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, **TEXT)
    return StableDiffusionPipeline(vae, text, tok, UNet2DConditionModel(**UNET), DDIMScheduler(**SCHEDULE))


def check_exported(pipe, folder, seed=2):
    """diffusers loads ``folder`` and draws what ``pipe`` draws; transformers reads its tokenizer."""
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (folder / name).is_file(), name
    clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    want = clip_tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(pipe.tokenizer(CAPTIONS), want)
    latents = latents_for(len(CAPTIONS), pipe.latent_shape, seed=seed)
    assert_same_images(minisd_images(pipe, CAPTIONS, latents), diffusers_images(folder, CAPTIONS, latents))


def test_a_minisd_model_exports_to_diffusers(sd_folder, tmp_path):
    from minisd.export import export_pipeline

    pipe = minisd_born_pipeline(sd_folder / "tokenizer")
    export_pipeline(pipe, str(tmp_path / "out"))
    check_exported(pipe, tmp_path / "out")
    with pytest.raises(FileExistsError, match="not empty"):
        export_pipeline(pipe, str(tmp_path / "out"))
    # the exported folder is a minisd model too: exported again by the CLI, in float16
    done = subprocess.run([sys.executable, "-m", "minisd", "export", str(tmp_path / "out"), "--to",
                           str(tmp_path / "fp16"), "--dtype", "float16"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {e["dtype"] for e in io.SafetensorsFile(tmp_path / "fp16" / "unet" / io.DIFFUSERS_WEIGHTS).header.values()} \
        == {"F16"}
    check_exported(minisd.load_pipeline(str(tmp_path / "fp16")), tmp_path / "fp16", seed=3)


def test_the_shipped_model_exports_to_diffusers(tmp_path):
    from minisd.pipeline import DEFAULT_MODEL

    if not os.path.isdir(DEFAULT_MODEL):
        pytest.skip(f"no shipped model at {DEFAULT_MODEL} yet")
    done = subprocess.run([sys.executable, "-m", "minisd", "export", "--to", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_exported(minisd.load_pipeline(), tmp_path / "out")


def test_generate_runs_a_diffusers_folder_and_reports_peak_memory(sd_folder, tmp_path):
    done = subprocess.run([sys.executable, "-m", "minisd", "generate", "a small red circle", "--model", str(sd_folder),
                           "--steps", "2", "--out", str(tmp_path), "--verbose"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(tmp_path / "0000.png").size == (16, 16)
    peak = float(done.stdout.split("peak memory ")[1].split(" MiB")[0].replace(",", ""))
    assert 20 < peak < 4000, done.stdout  # a Python process with NumPy and a tiny model


# =====================================================================================
# Full size: SD v1.5's folder (random float16 weights, about 2 GB), one guided UNet step
# =====================================================================================


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MINISD_SD15_TEST") != "1",
                    reason="full size (2 GB folder, ~5 GB per process, minutes): runs in `minisd bench sd15`; "
                           "set MINISD_SD15_TEST=1 to run it here")
def test_a_full_size_sd15_folder_takes_a_guided_unet_step():
    """What `minisd bench sd15` measures, checked: minisd loads SD v1.5's folder (float16 on
    disk) within a laptop's memory and predicts diffusers' eps at 64x64 latents, batch 2.
    Each side runs in a process of its own (about 5 GB each, both alive at once)."""
    import shutil
    import tempfile

    from minisd.benchmarks import sd15

    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    if available < 12:
        pytest.skip(f"needs about 12 GiB of free memory, {available:.1f} GiB free")
    scratch = tempfile.mkdtemp(prefix="minisd-sd15-test-")
    try:
        folder = sd15.build_folder(os.path.join(scratch, "sd15"))
        header = io.SafetensorsFile(os.path.join(folder, "unet", io.DIFFUSERS_WEIGHTS)).header
        assert len(header) == 686 and {e["dtype"] for e in header.values()} == {"F16"}
        results = sd15.compare(folder, ["minisd", "torch"], 1, scratch)
        ours, theirs = results["minisd"], results["torch"]
        eps, eps_ref = (np.load(os.path.join(scratch, f"{side}.npy")) for side in ("minisd", "torch"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert eps.shape == (1, 4, 64, 64) and np.isfinite(eps).all() and eps.std() > 0.01
    assert rel_err(eps, eps_ref) < 1e-3
    # one float32 copy of the model (4.3 GB: UNet 3.4, text encoder 0.5, VAE 0.3) plus working
    # memory; a second copy of the weights at any moment would pass 8 GB
    assert ours["peak_mb"] < 6.5 * 1024, ours
    assert theirs["peak_mb"] > 4 * 1024, theirs  # PyTorch holds the same float32 model
