"""Checkpoints: minisd folders load in diffusers/transformers and theirs load in minisd, with equal
outputs; float16 files load into float32; errors name the bad keys; writes are atomic."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import randn, rel_err

from minisd import io
from minisd.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel

UNET = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=2, cross_attention_dim=6,
            norm_num_groups=4, sample_size=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, latent_channels=2, sample_size=8,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=6, eos_token_id=19, bos_token_id=18, pad_token_id=0)
VISION = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=4,
              patch_size=2)
IDS = np.array([[18, 3, 19, 0], [18, 4, 5, 19]])


def unet_inputs():
    """Latents, timesteps and text embeddings, the same for minisd's UNet and diffusers'."""
    return randn(2, 4, 4, 4, dtype=np.float32), np.array([1, 900]), randn(2, 3, 6, dtype=np.float32)


def unet_out(model):
    return model(*unet_inputs()).numpy()


# =====================================================================================
# minisd <-> minisd
# =====================================================================================


@pytest.mark.parametrize("cls,config,files", [
    (UNet2DConditionModel, UNET, {"config.json", "diffusion_pytorch_model.safetensors"}),
    (AutoencoderKL, VAE, {"config.json", "diffusion_pytorch_model.safetensors"}),
    (CLIPTextModel, TEXT, {"config.json", "model.safetensors"}),
    (CLIPModel, dict(text_config=TEXT, vision_config=VISION, projection_dim=4), {"config.json", "model.safetensors"}),
])
def test_round_trip(tmp_path, cls, config, files):
    model = cls(**config)
    model.save_pretrained(tmp_path / "m")
    assert set(os.listdir(tmp_path / "m")) == files  # no temporary files left behind
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["_class_name"] == cls.__name__
    again = io.load_pretrained(tmp_path / "m")  # the class comes from config.json
    assert type(again) is cls and again.config == model.config
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], v)


def test_float16_weights_load_into_float32(tmp_path):
    model = UNet2DConditionModel(**UNET)
    model.save_pretrained(tmp_path, dtype=np.float16)
    stored = io.load_safetensors(tmp_path / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == np.float16 for v in stored.values())
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    for k, v in again.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, model.state_dict()[k].astype(np.float16).astype(np.float32))
    assert rel_err(unet_out(again), unet_out(model)) < 1e-2  # float16 rounding, nothing worse
    as64 = io.load_pretrained(tmp_path, dtype=np.float64)
    assert all(v.dtype == np.float64 for v in as64.state_dict().values())


def test_load_errors_name_the_keys(tmp_path):
    model = UNet2DConditionModel(**UNET)
    model.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = io.load_safetensors(path)
    state["extra.weight"] = np.zeros(3, np.float32)
    del state["conv_in.bias"]
    state["conv_out.weight"] = np.zeros((4, 8, 1, 1), np.float32)
    io.save_safetensors(state, path)
    with pytest.raises(KeyError) as info:
        io.load_pretrained(tmp_path)
    message = str(info.value)
    assert "missing keys: conv_in.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "conv_out.weight: checkpoint (4, 8, 1, 1) vs model (4, 8, 3, 3)" in message
    assert "diffusion_pytorch_model.safetensors" in message


def test_missing_files_and_unknown_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        io.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="model class 'UNet2DModel' is not one minisd has"):
        io.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **UNET}))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors or model.safetensors"):
        io.load_pretrained(tmp_path)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = UNet2DConditionModel(**UNET)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
    import safetensors.numpy

    def broken(arrays, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        UNet2DConditionModel(**UNET).save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert set(os.listdir(tmp_path)) == {"config.json", "diffusion_pytorch_model.safetensors"}


# =====================================================================================
# minisd <-> diffusers / transformers
# =====================================================================================


def test_unet_folders_move_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ours = UNet2DConditionModel(**UNET)
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        ref = theirs(*map(torch.from_numpy, unet_inputs()))
    assert rel_err(unet_out(ours), ref.sample.numpy()) < 1e-4

    torch.manual_seed(1)
    fresh = diffusers.UNet2DConditionModel(**UNET).half()  # a float16 file, as SD's published weights
    fresh.save_pretrained(tmp_path / "theirs")
    loaded = io.load_pretrained(tmp_path / "theirs")  # diffusers' full config: every key at its default
    assert isinstance(loaded, UNet2DConditionModel) and loaded.dtype == np.float32
    with torch.no_grad():
        ref = fresh.float()(*map(torch.from_numpy, unet_inputs()))
    assert rel_err(unet_out(loaded), ref.sample.numpy()) < 1e-4


def test_vae_folders_move_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    x = randn(1, 3, 8, 8, dtype=np.float32)
    torch.manual_seed(2)
    diffusers.AutoencoderKL(**VAE).save_pretrained(tmp_path / "theirs")
    ours = io.load_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        ref = theirs.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    assert rel_err(ours.encode(x).mean.numpy(), ref) < 1e-4
    assert theirs.config.scaling_factor == ours.config["scaling_factor"]


def test_clip_folders_move_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ours = CLIPTextModel(**TEXT)
    ours.save_pretrained(tmp_path / "text")
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path / "text").eval()
    with torch.no_grad():
        ref = theirs(torch.from_numpy(IDS)).last_hidden_state.numpy()
    assert rel_err(ours(IDS).numpy(), ref) < 1e-4

    theirs.save_pretrained(tmp_path / "text2")  # transformers' own config.json, with its generic keys
    again = io.load_pretrained(tmp_path / "text2")
    assert isinstance(again, CLIPTextModel) and rel_err(again(IDS).numpy(), ref) < 1e-4

    clip = CLIPModel(text_config=TEXT, vision_config=VISION, projection_dim=4)
    clip.save_pretrained(tmp_path / "clip")
    ref_clip = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    images = randn(2, 3, 4, 4, dtype=np.float32)
    with torch.no_grad():
        ref = ref_clip(input_ids=torch.from_numpy(IDS), pixel_values=torch.from_numpy(images)).logits_per_text
    assert rel_err(clip(images, IDS).numpy(), ref.numpy()) < 1e-4
    ref_clip.save_pretrained(tmp_path / "clip2")
    assert rel_err(io.load_pretrained(tmp_path / "clip2")(images, IDS).numpy(), ref.numpy()) < 1e-4


def test_io_names_no_model_and_loads_in_a_fresh_process():
    """No import loop io <-> models: importing minisd.io loads no model module, its source names
    no model class (each registers itself), and a fresh process loads the shipped UNet by the
    class name its config.json holds, and refuses to save what is no registered model."""
    import subprocess
    import sys

    source = Path(io.__file__).read_text()
    for name in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPModel", "CLIPVision", "REQUIRED_KEYS"):
        assert name not in source
    code = ("import sys, minisd.io as io; assert not [m for m in sys.modules if m.startswith('minisd.models')]; "
            "m = io.load_pretrained(sys.argv[1]); print(type(m).__name__, sorted(io.MODEL_CLASSES))")
    folder = Path(io.__file__).parent / "weights" / "shapes" / "unet"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    assert done.stdout.split(None, 1) == ["UNet2DConditionModel",
                                          "['AutoencoderKL', 'CLIPModel', 'CLIPTextModel', 'UNet2DConditionModel']\n"]
    from minisd.models.blocks import ResnetBlock2D

    with pytest.raises(TypeError, match="cannot save a ResnetBlock2D"):
        io.save_pretrained(ResnetBlock2D(4, 4, groups=2), "unused")
