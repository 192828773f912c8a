"""Training: a tiny model trains end to end, its losses fall, and --resume continues exactly."""

import json
import math
import os

import numpy as np
import pytest

from minisd import train as T
from minisd.data import shapes
from minisd.data.images import to_model_input

# A model small enough for CI: every stage runs in a few seconds.
TINY_VAE = dict(T.VAE_CONFIG, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, mid_block_add_attention=False)
# (Narrower CLIP towers sit at the chance loss ln(batch) for many steps: contrastive training
# has a plateau that width shortens; one layer of the default width learns within 60 steps.)
TINY_TEXT = dict(T.TEXT_CONFIG, num_hidden_layers=1)
TINY_VISION = dict(T.VISION_CONFIG, num_hidden_layers=1)
TINY_UNET = dict(T.UNET_CONFIG, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2)


@pytest.fixture(scope="module")
def small_data():
    d = shapes.make_dataset(96, "train", seed=3)
    return d.images, list(d.captions)


def first_and_last(losses, k=5):
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """All three stages, a few steps each, into one model folder."""
    out = str(tmp_path_factory.mktemp("model"))
    images, captions = small_data
    vae = T.train_vae(out, steps=30, batch_size=8, lr=3e-3, config=TINY_VAE, progress=False, images=images)
    clip = T.train_clip(out, steps=60, batch_size=16, lr=1e-3, text_config=TINY_TEXT, vision_config=TINY_VISION,
                        progress=False, data=small_data)
    unet = T.train_unet(out, steps=40, batch_size=16, lr=3e-3, config=TINY_UNET, progress=False, data=small_data)
    return out, {"vae": vae, "clip": clip, "unet": unet}


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_each_stage_loss_falls(trained, stage):
    first, last = first_and_last(trained[1][stage]["losses"], k=10)
    assert last < 0.9 * first, f"{stage}: loss went from {first:.4f} to {last:.4f}"


def test_model_folder_has_diffusers_layout(trained):
    out = trained[0]
    for path in ("model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                 "clip/config.json", "logs/vae_loss.csv", "logs/vae_loss.png", "logs/unet_loss.csv"):
        assert os.path.isfile(os.path.join(out, path)), path
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    with open(os.path.join(out, "scheduler/scheduler_config.json")) as f:
        assert json.load(f)["_class_name"] == "DDIMScheduler"


def test_scaling_factor_is_one_over_latent_std(trained, small_data):
    """The saved scaling_factor makes the training latents unit-variance, as SD's 0.18215 does."""
    from minisd import io
    from minisd.models import AutoencoderKL

    vae = io.load_pretrained(os.path.join(trained[0], "vae"), AutoencoderKL)
    scale = vae.config["scaling_factor"]
    z = vae.encode(to_model_input(small_data[0])).sample(np.random.default_rng(1)).numpy()
    assert abs(np.std(z * scale) - 1.0) < 0.05


def test_loss_csv_matches_losses(trained):
    rows = open(os.path.join(trained[0], "logs", "unet_loss.csv")).read().splitlines()
    assert rows[0] == "step,loss"
    values = [float(r.split(",")[1]) for r in rows[1:]]
    np.testing.assert_allclose(values, trained[1]["unet"]["losses"], rtol=1e-5)


def test_resume_gives_the_same_losses(tmp_path, small_data):
    """Stop after 6 of 10 steps, resume from the checkpoint (step 6 is a checkpoint), and compare
    with 10 uninterrupted steps: the same losses and the same weights, bit for bit."""
    images = small_data[0]
    kw = dict(steps=10, batch_size=4, lr=3e-3, config=TINY_VAE, progress=False, images=images, checkpoint_every=3)
    full = T.train_vae(str(tmp_path / "full"), **kw)
    T.train_vae(str(tmp_path / "cut"), stop_after=6, **kw)
    resumed = T.train_vae(str(tmp_path / "cut"), resume=True, **kw)
    assert len(resumed["losses"]) == 10
    assert resumed["losses"] == full["losses"]
    for (name, a), (_, b) in zip(full["model"].named_parameters(), resumed["model"].named_parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_resume_restores_ema_and_optimizer(tmp_path, small_data):
    """The UNet stage carries AdamW moments and the EMA: resume must restore both exactly."""
    out_full, out_cut = str(tmp_path / "full"), str(tmp_path / "cut")
    for out in (out_full, out_cut):
        T.train_vae(out, steps=2, batch_size=4, config=TINY_VAE, progress=False, images=small_data[0])
        T.train_clip(out, steps=2, batch_size=8, text_config=TINY_TEXT, vision_config=TINY_VISION,
                     progress=False, data=small_data)
    kw = dict(steps=6, batch_size=4, lr=3e-3, config=TINY_UNET, progress=False, data=small_data, checkpoint_every=2)
    full = T.train_unet(out_full, **kw)
    T.train_unet(out_cut, stop_after=4, **kw)
    resumed = T.train_unet(out_cut, resume=True, **kw)
    assert resumed["losses"] == full["losses"]
    for a, b in zip(full["ema"].shadow, resumed["ema"].shadow):
        np.testing.assert_array_equal(a, b)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, small_data):
    out = tmp_path / "m"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "vae.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="corrupt"):
        T.train_vae(str(out), steps=2, batch_size=4, config=TINY_VAE, progress=False, images=small_data[0],
                    resume=True)


def test_unet_stage_needs_the_earlier_stages(tmp_path):
    with pytest.raises(ValueError, match="train vae"):
        T.train_unet(str(tmp_path), steps=1, progress=False)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        T.atomic_write(str(path), fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


# --- a diverged run stops, and what it saved stays good ----------------------------------------


def one_weight_run(tmp_path, loss_at, steps=8, checkpoint_every=2):
    """fit() on one parameter w with the loss loss_at(step, w): a way to make a chosen step go wrong."""
    from minisd import nn

    w = nn.Parameter(np.ones(3, dtype=np.float32))
    calls = {"step": -1}

    def loss_fn(rng, n):
        calls["step"] += 1
        return loss_at(calls["step"], w)

    with pytest.raises(T.Diverged) as e:
        # batch_size 1: the memory probe calls loss_fn once, as "step" 0; training steps are 1, 2, ...
        T.fit("vae", {"w": w}, loss_fn, steps=steps, lr=0.1, out=str(tmp_path), batch_size=1,
              checkpoint_every=checkpoint_every, progress=False)
    return str(e.value), w


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    message, w = one_weight_run(tmp_path, lambda call, w: (w * w).sum() * (np.nan if call == 6 else 1.0))
    assert "train vae diverged at step 5" in message and "loss is nan" in message
    assert "checkpoint (step 4)" in message  # the one kept
    with np.load(tmp_path / "checkpoints" / "vae.npz") as z:
        assert json.loads(bytes(z["meta"]))["step"] == 4
        assert np.isfinite(z["losses"]).all() and len(z["losses"]) == 4
        saved = z["param/w"]
    assert np.isfinite(saved).all()
    assert not (tmp_path / "logs").exists()  # no loss curve of a failed run


def test_a_non_finite_gradient_stops_the_run_before_the_weights_change(tmp_path):
    from minisd import functional as F

    def loss_at(call, w):  # at call 4 the loss is finite (0) but d sqrt(u)/du at u = 0 is inf
        return F.sqrt(w * 0.0).sum() if call == 4 else (w * w).sum()

    message, w = one_weight_run(tmp_path, loss_at, checkpoint_every=1)
    assert "diverged at step 3" in message and "gradient norm is nan" in message
    with np.load(tmp_path / "checkpoints" / "vae.npz") as z:
        np.testing.assert_array_equal(z["param/w"], w.numpy())  # step 3 did not move w
        assert json.loads(bytes(z["meta"]))["step"] == 3


def test_fit_refuses_a_learning_rate_that_is_not_finite(tmp_path):
    from minisd import nn

    w = nn.Parameter(np.ones(2, dtype=np.float32))
    for lr in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="learning rate"):
            T.fit("vae", {"w": w}, lambda rng, n: (w * w).sum(), steps=2, lr=lr, out=str(tmp_path), batch_size=1,
                  progress=False)


# --- memory --------------------------------------------------------------------------------------


def test_memory_estimate_bounds_the_measured_peak_and_refuses_what_cannot_fit(small_data, monkeypatch):
    """check_memory scales a batch-2 probe; against the peak measured at batch 16, the estimate
    must be above it (honest as a bound) and not far above (generous, not absurd)."""
    from minisd import nn
    from minisd.models.vae import AutoencoderKL

    nn.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    x_all = to_model_input(small_data[0])

    def loss_fn(rng, n):
        x = x_all[rng.integers(0, len(x_all), size=n)]
        recon = vae.decode(vae.encode(x).sample(rng))
        return ((recon - x) * (recon - x)).mean()

    params = list(vae.parameters())
    need = T.check_memory("vae", loss_fn, params, 16)
    assert all(p.grad is None for p in params)  # the probe's gradients are not left behind
    measured = T.peak_allocated(lambda: loss_fn(np.random.default_rng(1), 16).backward())
    state = 2 * sum(p.data.nbytes for p in params)
    assert measured < need - state < 1.5 * measured
    monkeypatch.setattr(T, "available_memory", lambda: need // 2)
    with pytest.raises(T.BatchTooLarge, match="more than the .* available; a batch of at most [0-9]"):
        T.check_memory("vae", loss_fn, params, 16)


# --- logs -----------------------------------------------------------------------------------------


def test_a_stage_with_no_losses_summarises_as_null_not_nan():
    summary = T.summarise("vae", {"losses": [], "step": 0, "seconds": 0.0, "cpu_seconds": 0.0})
    assert summary["final_loss"] is None
    json.dumps(summary, allow_nan=False)


def test_clip_resume_gives_the_same_losses(tmp_path, small_data):
    kw = dict(steps=4, batch_size=8, lr=1e-3, text_config=TINY_TEXT, vision_config=TINY_VISION, progress=False,
              data=small_data, checkpoint_every=2)
    full = T.train_clip(str(tmp_path / "full"), **kw)
    T.train_clip(str(tmp_path / "cut"), stop_after=2, **kw)
    resumed = T.train_clip(str(tmp_path / "cut"), resume=True, **kw)
    assert resumed["losses"] == full["losses"]
