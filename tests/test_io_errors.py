"""Saving and loading when things go wrong: every write atomic and under the umask, a full disk
is one line, corrupt weights and bad configs are refused naming the tensor / key and the file.

The files are real: written with the safetensors library (via minisd.io) and corrupted byte
by byte; the CLI is run in-process (minisd.cli.main) and its stderr must be one line."""

import json
import os
import shutil
import struct

import numpy as np
import pytest

from minisd import cli, io, nn
from minisd.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel
from minisd.models import config as model_config
from minisd.pipeline import DEFAULT_MODEL, load_pipeline
from minisd.schedulers import DDIMScheduler
from minisd.tokenizer import Tokenizer

UNET = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=2, cross_attention_dim=6,
            norm_num_groups=4, sample_size=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
WEIGHTS = "diffusion_pytorch_model.safetensors"
# what safetensors 0.8 raises when the disk fills up (its message format, with the temporary
# name it writes under; older versions say IoError(Os { code: 28, ... }))
ENOSPC_MESSAGE = 'Error while serializing: I/O error: No space left on device (os error 28) at path "{}"'


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    saved = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(saved)


def one_line_error(capsys, argv) -> str:
    """Run the CLI; it must fail with exit status 1 and exactly one line on stderr."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("minisd: error: "), err
    return err


def shipped_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    return folder


def tiny_tokenizer():
    return Tokenizer.train(["a red circle", "a blue square", "a red square"], vocab_size=530)


# =====================================================================================
# 1. One atomic writer for every file
# =====================================================================================


def writers(folder):
    """Each of minisd's savers, as (name, save(), the files it writes)."""
    unet = UNet2DConditionModel(**UNET)
    return [
        ("weights", lambda: io.save_safetensors(unet.state_dict(), folder / WEIGHTS), [WEIGHTS]),
        ("config.json", lambda: io.save_config({"a": 1}, folder / "config.json"), ["config.json"]),
        ("tokenizer", lambda: tiny_tokenizer().save(str(folder)),
         ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]),
        ("scheduler", lambda: DDIMScheduler().save_config(str(folder)), ["scheduler_config.json"]),
        ("model_index.json", lambda: io.write_json(folder / "model_index.json", {"_class_name": "x"}),
         ["model_index.json"]),
    ]


@pytest.mark.parametrize("which", range(5), ids=[w[0] for w in writers(None)])
def test_every_write_goes_to_a_unique_temporary_name_and_a_failed_one_keeps_the_old_file(tmp_path, monkeypatch,
                                                                                           which):
    name, save, files = writers(tmp_path)[which]
    for f in files:
        (tmp_path / f).write_bytes(b"the old file")
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        # the new contents went to a temporary file beside the target, never into the target
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        assert (tmp_path / os.path.basename(dst)).read_bytes() == b"the old file"
        assert f".{os.getpid()}-" in os.path.basename(src)  # unique per process (and per call)
        renamed.append(os.path.basename(src))
        if len(renamed) == 1:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        save()
    assert sorted(os.listdir(tmp_path)) == sorted(files)  # the temporary file is gone
    assert all((tmp_path / f).read_bytes() == b"the old file" for f in files)
    save()  # and when it works, every file is new
    assert sorted(os.listdir(tmp_path)) == sorted(files)
    assert all((tmp_path / f).read_bytes() != b"the old file" for f in files)
    assert len(set(renamed)) == len(renamed)  # a fresh temporary name each time


def test_atomic_write_is_public_and_removes_its_temporary_file(tmp_path):
    target = tmp_path / "sub" / "f.txt"

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, fail)
    assert os.listdir(tmp_path / "sub") == []
    io.write_text(target, "whole\n")
    assert target.read_text() == "whole\n" and os.listdir(tmp_path / "sub") == ["f.txt"]


# =====================================================================================
# 2. and 7. The umask decides the permissions
# =====================================================================================


def modes(folder):
    """{relative path: permission bits} of everything under folder, folder itself as "."."""
    out = {".": os.stat(folder).st_mode & 0o777}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.stat(path).st_mode & 0o777
    return out


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_files_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    UNet2DConditionModel(**UNET).save_pretrained(tmp_path / "unet")
    tiny_tokenizer().save(str(tmp_path / "tokenizer"))
    DDIMScheduler().save_config(str(tmp_path / "scheduler"))
    got = modes(tmp_path)
    del got["."]  # pytest's own folder
    assert got == {p: (0o777 if os.path.isdir(tmp_path / p) else 0o666) & ~mask for p in got}, got


def test_an_exported_model_is_readable_by_others_under_umask_022(tmp_path, umask, capsys):
    assert cli.main(["export", "--to", str(tmp_path / "out")]) == 0
    got = modes(tmp_path / "out")
    assert {p for p in got if p.endswith("safetensors")} == {"unet/" + WEIGHTS, "vae/" + WEIGHTS,
                                                             "text_encoder/model.safetensors"}
    assert got == {p: 0o755 if os.path.isdir(tmp_path / "out" / p) else 0o644 for p in got}, got
    assert not [p for p in os.listdir(tmp_path) if p != "out"]  # no temporary folder left


def test_export_to_an_unwritable_place_names_the_folder_given(capsys):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc, where no folder can be made")
    err = one_line_error(capsys, ["export", "--to", "/proc/x"])
    assert "--to /proc/x" in err and "/proc/.x" not in err, err


# =====================================================================================
# 3. A full disk: one line, the old file intact, no temporary file left
# =====================================================================================


def fill_the_disk(monkeypatch):
    """safetensors' writer, as it behaves on a full disk: part of the file, then SafetensorError."""
    import safetensors.numpy
    from safetensors import SafetensorError

    def save_file(arrays, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise SafetensorError(ENOSPC_MESSAGE.format(os.path.join(os.path.dirname(path), ".tmpAbC123")))

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


def test_a_full_disk_while_writing_weights_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    UNet2DConditionModel(**UNET).save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS).read_bytes()
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        UNet2DConditionModel(**UNET).save_pretrained(tmp_path)
    assert info.value.errno == 28 and "No space left on device" in str(info.value)
    assert str(tmp_path / WEIGHTS) in str(info.value) and ".tmp" not in str(info.value)
    assert (tmp_path / WEIGHTS).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", WEIGHTS]


def test_a_full_disk_in_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    fill_the_disk(monkeypatch)
    err = one_line_error(capsys, ["export", "--to", str(tmp_path / "out")])
    assert "No space left on device" in err and str(tmp_path / "out") in err, err
    assert os.listdir(tmp_path) == []


def test_the_cli_prints_a_message_of_several_lines_on_one(monkeypatch, capsys):
    import minisd.cli.info

    def fail(args):
        raise ValueError("first\nsecond")

    monkeypatch.setattr(minisd.cli.info, "run", fail)
    monkeypatch.setattr(cli, "_COMMANDS", {"info": ("minisd.cli.info", "")})
    assert "first second" in one_line_error(capsys, ["info"])


# =====================================================================================
# 4. Corrupt weights are refused, naming the tensor and the file
# =====================================================================================


def data_offset(path, name):
    """Where tensor ``name``'s bytes start in a safetensors file."""
    header = io.SafetensorsFile(path).header
    n = struct.unpack("<Q", open(path, "rb").read(8))[0]
    return 8 + n + header[name]["data_offsets"][0]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    UNet2DConditionModel(**UNET).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    raw = bytearray(path.read_bytes())
    at = data_offset(path, "conv_in.weight") + 4 * 5  # the sixth number of the tensor
    raw[at:at + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as info:
        io.load_pretrained(tmp_path)
    message = str(info.value)
    assert "conv_in.weight" in message and str(path) in message and "\n" not in message, message


def test_float_weights_declared_as_integers_are_refused(tmp_path):
    UNet2DConditionModel(**UNET).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["conv_out.weight"]["dtype"] = "I32"  # same size: only the header says otherwise
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(TypeError) as info:
        io.load_pretrained(tmp_path)
    message = str(info.value)
    assert "conv_out.weight" in message and "int32" in message and str(path) in message, message


def test_corrupt_weights_in_a_pipeline_folder_fail_the_cli_in_one_line(tmp_path, capsys):
    folder = shipped_copy(tmp_path)
    path = folder / "vae" / WEIGHTS
    raw = bytearray(path.read_bytes())
    at = data_offset(path, "decoder.conv_out.bias")
    raw[at:at + 4] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        load_pipeline(folder)
    err = one_line_error(capsys, ["generate", "a red circle", "--steps", "2", "--model", str(folder),
                                  "--out", str(tmp_path / "png")])
    assert "decoder.conv_out.bias" in err and str(path) in err
    assert not (tmp_path / "png").exists() or not os.listdir(tmp_path / "png")


# =====================================================================================
# 5. Config errors: the key and the file, in one line; absurd sizes refused before building
# =====================================================================================


def write_config(folder, config):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


BAD_CONFIGS = [
    ({k: v for k, v in UNET.items() if k != "block_out_channels"}, "block_out_channels", "missing"),
    ({**UNET, "block_out_channels": "abc"}, "block_out_channels", "'abc'"),
    ({**UNET, "in_channels": -4}, "in_channels", "-4"),
    ({**UNET, "layers_per_block": 1.5}, "layers_per_block", "1.5"),
    ({**UNET, "norm_eps": "small"}, "norm_eps", "'small'"),
    ({**UNET, "flip_sin_to_cos": "yes"}, "flip_sin_to_cos", "'yes'"),
    ({**UNET, "cross_attention_dim": True}, "cross_attention_dim", "True"),
    ({**UNET, "norm_num_groups": 3}, "norm_num_groups", "3"),
    ({**UNET, "down_block_types": [1, 2]}, "down_block_types", "[1, 2]"),
]


@pytest.mark.parametrize("config,key,shown", BAD_CONFIGS, ids=[f"{k}={s}" for _, k, s in BAD_CONFIGS])
def test_a_bad_unet_config_names_the_key_and_the_file(tmp_path, config, key, shown):
    path = write_config(tmp_path, {"_class_name": "UNet2DConditionModel", **config})
    with pytest.raises((ValueError, TypeError)) as info:
        io.load_pretrained(tmp_path)
    message = str(info.value)
    assert key in message and shown in message and str(path) in message and "\n" not in message, message


@pytest.mark.parametrize("cls,key,value", [
    (AutoencoderKL, "latent_channels", 0), (AutoencoderKL, "scaling_factor", float("nan")),
    (AutoencoderKL, "use_quant_conv", 1), (CLIPTextModel, "hidden_size", "64"),
    (CLIPTextModel, "layer_norm_eps", -1.0), (CLIPTextModel, "hidden_act", 3),
    (CLIPModel, "vision_config", [1]), (CLIPModel, "projection_dim", -1),
])
def test_every_model_checks_its_keys_when_built(cls, key, value):
    with pytest.raises((ValueError, TypeError), match=f"{cls.__name__}: config {key} must be"):
        cls(**{key: value})


def test_a_clip_config_checks_the_towers_inside_it():
    with pytest.raises(ValueError, match="CLIPModel: config vision_config.patch_size must be"):
        CLIPModel(vision_config={"patch_size": 0})
    with pytest.raises(ValueError, match="CLIPModel: config text_config.num_hidden_layers must be"):
        CLIPModel(text_config={"num_hidden_layers": -1})
    with pytest.raises(ValueError, match="CLIPTextModel: config num_hidden_layers must be"):
        CLIPTextModel(num_hidden_layers=-1)


def test_a_config_that_is_not_a_mapping(tmp_path):
    path = write_config(tmp_path, [1, 2, 3])
    with pytest.raises(ValueError, match=f"{path}: .*JSON object.*list"):
        io.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        io.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mapping"):
        io.from_config([1, 2, 3])


@pytest.mark.parametrize("cls,config", [
    (UNet2DConditionModel, {**UNET, "layers_per_block": 100_000_000}),
    (AutoencoderKL, {"block_out_channels": [100_000] * 2, "down_block_types": ["DownEncoderBlock2D"] * 2,
                     "up_block_types": ["UpDecoderBlock2D"] * 2}),
    (CLIPTextModel, {"vocab_size": 10 ** 12}),
    (CLIPModel, {"vision_config": {"num_hidden_layers": 10 ** 9}}),
])
def test_absurd_sizes_are_refused_before_building(tmp_path, cls, config):
    path = write_config(tmp_path, {"_class_name": cls.__name__, **config})
    with pytest.raises(ValueError, match="parameters") as info:
        io.load_pretrained(tmp_path)  # a hang (or a MemoryError) before the fix
    assert str(path) in str(info.value) and "memory" in str(info.value)


def test_a_bad_config_in_a_pipeline_fails_the_cli_in_one_line(tmp_path, capsys):
    folder = shipped_copy(tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["layers_per_block"] = 100_000_000
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["export", str(folder), "--to", str(tmp_path / "out")])
    assert "layers_per_block=100000000" in err and str(folder / "unet" / "config.json") in err, err


def parameter_count_cases():
    from minisd.benchmarks.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

    small_text = dict(vocab_size=30, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=7)
    return [
        (UNet2DConditionModel, SD15_UNET),
        (AutoencoderKL, SD15_VAE),
        (CLIPTextModel, SD15_TEXT),
        (UNet2DConditionModel, UNET),
        (UNet2DConditionModel, {**UNET, "layers_per_block": 3, "use_linear_projection": True, "in_channels": 3,
                                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}),
        (UNet2DConditionModel, {**UNET, "block_out_channels": (8, 16, 24), "attention_head_dim": (2, 4, 4),
                                "down_block_types": ["CrossAttnDownBlock2D"] * 3,
                                "up_block_types": ["CrossAttnUpBlock2D"] * 3}),
        (AutoencoderKL, dict(block_out_channels=(4, 8, 12), layers_per_block=2, norm_num_groups=2, latent_channels=3,
                             down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                             mid_block_add_attention=False, use_quant_conv=False)),
        (CLIPTextModel, small_text),
        (CLIPModel, dict(text_config=small_text, projection_dim=5,
                         vision_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=12, patch_size=4))),
    ]


@pytest.mark.parametrize("cls,config", parameter_count_cases(), ids=lambda x: getattr(x, "__name__", ""))
def test_the_parameter_count_from_the_config_is_exact(cls, config):
    """The estimate that guards against absurd configs is the true count (SD v1.5's included)."""
    with io._uninitialised():
        model = io.from_config(config, cls)
    assert model_config.parameter_count(cls.__name__, model.config) == model.num_parameters()


# =====================================================================================
# 6. load_state_dict's input
# =====================================================================================


def test_load_state_dict_wants_a_mapping_of_arrays():
    net = nn.Linear(3, 2)
    before = net.weight.numpy().copy()
    with pytest.raises(TypeError, match=r"Linear.load_state_dict: expected a mapping of parameter name -> array, "
                                        r"got list"):
        net.load_state_dict([1, 2, 3])
    with pytest.raises(TypeError, match=r"weight: expected an array of shape \(2, 3\), got str 'abc'"):
        net.load_state_dict({"weight": "abc", "bias": np.zeros(2)})
    with pytest.raises(TypeError, match=r"weight: .*int64.*float32"):
        net.load_state_dict({"weight": np.ones((2, 3), np.int64), "bias": np.zeros(2)})
    with pytest.raises(TypeError, match=r"bias: .*bool"):
        net.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2, bool)})
    with pytest.raises(KeyError, match=r"unexpected keys: 7"):  # keys that are not names are listed too
        net.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2), 7: np.zeros(1)})
    np.testing.assert_array_equal(net.weight.numpy(), before)  # nothing loaded by the failed calls
    net.load_state_dict({"weight": [[1.0, 2, 3], [4, 5, 6]], "bias": [0.5, 0.25]})  # nested lists are arrays
    np.testing.assert_array_equal(net.weight.numpy(), np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    assert net.weight.dtype == np.float32



def test_the_clip_models_load_state_dict_want_a_mapping_too():
    """CLIPTextModel and CLIPModel rename keys before the base class checks them: a list is named, not an AttributeError."""
    from minisd.models import CLIPModel, CLIPTextModel

    text = dict(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8)
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_channels=3,
                  image_size=8, patch_size=4)
    for model in (CLIPTextModel(**text), CLIPModel(text_config=text, vision_config=vision, projection_dim=8)):
        with pytest.raises(TypeError, match=r"load_state_dict: expected a mapping of parameter name -> array, got list"):
            model.load_state_dict([1, 2, 3])
