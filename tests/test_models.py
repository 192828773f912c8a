"""The models on their own: shapes of every block, float64 gradient checks, input checking,
attention recording, and SD v1.5's exact parameter counts. (Parity with diffusers and
transformers is in test_parity_models.py.)"""

import numpy as np
import pytest
from helpers import randn

import minisd
from minisd import Tensor, io, nn
from minisd.gradcheck import gradcheck
from minisd.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel, record_attention
from minisd.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from minisd.models.unet import DownBlock2D, Transformer2DModel, UNetMidBlock2DCrossAttn, UpBlock2D, timestep_embedding
from minisd.models.vae import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=2, cross_attention_dim=6,
                 norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, latent_channels=2,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=6, eos_token_id=19)


# =====================================================================================
# Shapes of every block
# =====================================================================================


def test_shared_block_shapes():
    x = randn(2, 8, 6, 6, dtype=np.float32)
    temb = randn(2, 12, dtype=np.float32)
    assert ResnetBlock2D(8, 16, temb_channels=12, groups=4)(x, Tensor(temb)).shape == (2, 16, 6, 6)
    assert ResnetBlock2D(8, 8, groups=4)(x).shape == (2, 8, 6, 6)
    assert Downsample2D(8, padding=1)(Tensor(x)).shape == (2, 8, 3, 3)
    assert Downsample2D(8, padding=0)(Tensor(x)).shape == (2, 8, 3, 3)
    assert Upsample2D(8)(Tensor(x)).shape == (2, 8, 12, 12)
    tokens, text = Tensor(randn(2, 36, 8, dtype=np.float32)), Tensor(randn(2, 5, 3, dtype=np.float32))
    assert Attention(8, heads=2, dim_head=4)(tokens).shape == (2, 36, 8)
    assert Attention(8, cross_attention_dim=3, heads=4, dim_head=2)(tokens, text).shape == (2, 36, 8)
    assert Attention(8, heads=1, dim_head=8, bias=True, norm_num_groups=4)(Tensor(x)).shape == (2, 8, 6, 6)


def test_unet_block_shapes():
    x, temb, text = (Tensor(randn(*shape, dtype=np.float32)) for shape in ((2, 8, 4, 4), (2, 32), (2, 5, 6)))
    assert Transformer2DModel(8, 2, 6, groups=4)(x, text).shape == (2, 8, 4, 4)
    down = DownBlock2D(8, 16, 32, num_layers=2, groups=4, eps=1e-5, add_downsample=True, cross_attention=True,
                       heads=2, cross_attention_dim=6)
    out, skips = down(x, temb, text)
    assert out.shape == (2, 16, 2, 2) and [s.shape for s in skips] == [(2, 16, 4, 4)] * 2 + [(2, 16, 2, 2)]
    assert UNetMidBlock2DCrossAttn(16, 32, 4, 1e-5, 2, 6)(out, temb, text).shape == (2, 16, 2, 2)
    up = UpBlock2D(in_channels=8, prev_output_channel=16, out_channels=16, temb_channels=32, num_layers=3,
                   groups=4, eps=1e-5, add_upsample=True)
    skips = [Tensor(randn(2, channels, 2, 2, dtype=np.float32)) for channels in (8, 16, 16)]
    assert up(out, skips, temb, text).shape == (2, 16, 4, 4) and skips == []
    emb = timestep_embedding(np.array([0, 10, 999]), 7)
    assert emb.shape == (3, 7) and emb.dtype == np.float32 and np.all(emb[:, -1] == 0)


def test_vae_block_shapes():
    x = Tensor(randn(2, 4, 8, 8, dtype=np.float32))
    assert DownEncoderBlock2D(4, 8, 2, groups=2, add_downsample=True)(x).shape == (2, 8, 4, 4)
    assert UpDecoderBlock2D(4, 8, 3, groups=2, add_upsample=True)(x).shape == (2, 8, 16, 16)
    assert UNetMidBlock2D(4, groups=2)(x).shape == (2, 4, 8, 8)


def test_model_shapes_and_dtypes():
    unet = UNet2DConditionModel(**TINY_UNET)
    x = randn(3, 4, 8, 12, dtype=np.float32).astype(np.float64)  # float64 input is cast to float32
    out = unet(x, 5, randn(3, 7, 6, dtype=np.float32))
    assert out.shape == (3, 4, 8, 12) and out.dtype == np.float32
    vae = AutoencoderKL(**TINY_VAE)
    post = vae.encode(randn(2, 3, 8, 8, dtype=np.float32))
    assert post.mean.shape == post.logvar.shape == (2, 2, 4, 4)
    assert vae.decode(post.sample(0)).shape == (2, 3, 8, 8)
    text = CLIPTextModel(**TINY_TEXT)
    ids = np.array([[1, 4, 19, 0], [1, 2, 3, 19]])
    assert text(ids).shape == (2, 4, 8) and text.pooled(ids).shape == (2, 8)
    clip = CLIPModel(text_config=TINY_TEXT, projection_dim=4,
                     vision_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=4, patch_size=2))
    assert clip(randn(3, 3, 4, 4, dtype=np.float32), np.array([[1, 19], [2, 19], [3, 19]])).shape == (3, 3)


def test_timestep_forms_agree():
    unet = UNet2DConditionModel(**TINY_UNET)
    x, c = randn(2, 4, 4, 4, dtype=np.float32), randn(2, 3, 6, dtype=np.float32)
    both = unet(x, np.array([7, 7]), c).numpy()
    for t in (7, 7.0, np.array([7]), np.int64(7), Tensor(np.array(7.0))):
        np.testing.assert_array_equal(unet(x, t, c).numpy(), both)
    per_sample = unet(x, np.array([7, 300]), c).numpy()
    np.testing.assert_array_equal(per_sample[0], both[0])
    assert not np.allclose(per_sample[1], both[1])


def test_posterior_clamps_logvar_and_samples_reproducibly():
    vae = AutoencoderKL(**TINY_VAE)
    post = vae.encode(randn(1, 3, 4, 4, dtype=np.float32))
    assert np.all(post.logvar.numpy() >= -30) and np.all(post.logvar.numpy() <= 20)
    np.testing.assert_array_equal(post.sample(3).numpy(), post.sample(np.random.default_rng(3)).numpy())
    assert not np.array_equal(post.sample(3).numpy(), post.sample(4).numpy())
    from minisd.models.vae import DiagonalGaussianDistribution

    extreme = DiagonalGaussianDistribution(Tensor(np.concatenate([np.zeros((1, 1, 1, 2)), [[[[-100, 100]]]]], 1)))
    np.testing.assert_array_equal(extreme.logvar.numpy(), [[[[-30, 20]]]])


# =====================================================================================
# Gradient checks in float64 (directional finite differences, minisd.gradcheck)
# =====================================================================================


def _resolve(model, dotted):
    owner = model
    *path, attr = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def check_gradients(model, forward, inputs, param_names):
    """gradcheck a model's output w.r.t. its float inputs and the named parameters (float64)."""
    if not minisd.get_backend().float64:
        pytest.skip("the kernels compute in float32 only; float64 gradient checks are for the naive and numpy backends")
    model.to(np.float64)
    params = dict(model.named_parameters())

    def fn(*tensors):
        swapped = []
        for name, t in zip(param_names, tensors[len(inputs):]):
            owner, attr = _resolve(model, name)
            swapped.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, t)  # the probed tensor stands in for the parameter
        try:
            return forward(*tensors[:len(inputs)])
        finally:
            for owner, attr, p in swapped:
                setattr(owner, attr, p)

    arrays = [np.asarray(a, dtype=np.float64) if np.asarray(a).dtype.kind == "f" else a for a in inputs]
    # Not vacuous: every probed parameter really receives a gradient through fn.
    probes = [Tensor(params[n].numpy(), requires_grad=True) for n in param_names]
    fn(*[Tensor(a) for a in arrays], *probes).sum().backward()
    for name, t in zip(param_names, probes):
        assert t.grad is not None and np.abs(t.grad).max() > 0, f"{name} gets no gradient"
    assert gradcheck(fn, arrays + [params[n].numpy() for n in param_names], directions=2)


def test_unet_gradcheck():
    unet = UNet2DConditionModel(**TINY_UNET)
    names = ["conv_in.weight", "time_embedding.linear_1.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
             "mid_block.attentions.0.norm.weight", "up_blocks.0.resnets.0.conv_shortcut.weight",
             "up_blocks.0.upsamplers.0.conv.bias", "conv_norm_out.bias"]
    check_gradients(unet, lambda x, c: unet(x, np.array([3, 500]), c),
                    [randn(2, 4, 4, 4, dtype=np.float32), randn(2, 3, 6, dtype=np.float32)], names)


def test_vae_gradcheck():
    vae = AutoencoderKL(**TINY_VAE)
    names = ["encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.mid_block.attentions.0.to_q.weight",
             "encoder.mid_block.attentions.0.group_norm.weight", "quant_conv.weight",
             "decoder.up_blocks.0.resnets.0.norm1.bias", "decoder.conv_out.weight"]
    check_gradients(vae, lambda x: vae.decode(vae.encode(x).sample(0)), [randn(2, 3, 4, 4, dtype=np.float32)], names)


def test_text_model_gradcheck():
    text = CLIPTextModel(**TINY_TEXT)
    ids = np.array([[1, 5, 5, 19, 0, 0], [1, 2, 3, 4, 5, 19]])  # a repeated id: its gradient rows add up
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.1.mlp.fc1.weight",
             "encoder.layers.1.layer_norm2.weight", "final_layer_norm.bias"]
    check_gradients(text, lambda: text(ids), [], names)


def test_clip_contrastive_gradcheck():
    clip = CLIPModel(text_config=TINY_TEXT, projection_dim=4,
                     vision_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=4, patch_size=2))
    ids = np.array([[1, 19, 0], [2, 3, 19], [4, 19, 19]])
    names = ["logit_scale", "text_projection.weight", "visual_projection.weight",
             "vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
             "vision_model.pre_layrnorm.weight", "text_model.encoder.layers.0.self_attn.v_proj.bias"]
    check_gradients(clip, lambda x: clip.contrastive_loss(x, ids), [randn(3, 3, 4, 4, dtype=np.float32)], names)


# =====================================================================================
# Bad input: one clear line naming what was wrong
# =====================================================================================


def test_unet_rejects_bad_inputs():
    unet = UNet2DConditionModel(**TINY_UNET)
    x, c = randn(2, 4, 4, 4, dtype=np.float32), randn(2, 3, 6, dtype=np.float32)
    with pytest.raises(ValueError, match=r"sample must be \(B, 4, H, W\), got shape \(2, 3, 4, 4\)"):
        unet(randn(2, 3, 4, 4, dtype=np.float32), 1, c)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, L, 6\), got shape \(2, 3, 5\)"):
        unet(x, 1, randn(2, 3, 5, dtype=np.float32))
    # odd sizes are fine: up to each skip's size
    assert unet(randn(2, 4, 5, 3, dtype=np.float32), 1, c).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match=r"timestep must be a number or an array of shape \(2,\)"):
        unet(x, np.array([1, 2, 3]), c)


def test_models_reject_bad_configs_and_ids():
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNet2DConditionModel(**TINY_UNET, class_embed_type="timestep")
    with pytest.raises(TypeError, match="unknown config key 'block_channels'"):
        UNet2DConditionModel(block_channels=(8,))
    with pytest.raises(ValueError, match="down block type 'SimpleDownBlock2D' is not supported"):
        UNet2DConditionModel(**{**TINY_UNET, "down_block_types": ("SimpleDownBlock2D", "DownBlock2D")})
    UNet2DConditionModel(**TINY_UNET, class_embed_type=None, _class_name="UNet2DConditionModel")  # defaults pass
    text = CLIPTextModel(**TINY_TEXT)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 20\)"):
        text(np.array([[1, 20]]))
    with pytest.raises(ValueError, match="7 tokens is more than max_position_embeddings=6"):
        text(np.zeros((1, 7), dtype=int))
    with pytest.raises(ValueError, match="input_ids must be integers"):
        text(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="hidden_act 'relu6' is not supported"):
        CLIPTextModel(**{**TINY_TEXT, "hidden_act": "relu6"})
    vae = AutoencoderKL(**TINY_VAE)
    with pytest.raises(ValueError, match=r"encode: expected images \(B, 3, H, W\), got shape \(1, 4, 4, 4\)"):
        vae.encode(randn(1, 4, 4, 4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"decode: expected latents \(B, 2, h, w\)"):
        vae.decode(randn(1, 4, 2, 2, dtype=np.float32))


def test_config_rebuilds_the_same_model():
    for cls, cfg in ((UNet2DConditionModel, TINY_UNET), (AutoencoderKL, TINY_VAE), (CLIPTextModel, TINY_TEXT)):
        model = cls(**cfg)
        again = cls(**model.config)
        assert again.config == model.config
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in again.state_dict().items()} == shapes


# =====================================================================================
# Recording attention
# =====================================================================================


def test_record_attention_is_off_by_default_and_records_on_request():
    unet = UNet2DConditionModel(**TINY_UNET)
    x, c = randn(2, 4, 8, 8, dtype=np.float32), randn(2, 3, 6, dtype=np.float32)
    unet(x, 1, c)
    layers = [m for _, m in unet.named_modules() if isinstance(m, Attention)]
    assert layers and all(m.recorded is None for m in layers)
    with record_attention(unet, "attn2") as maps:
        unet(x, 1, c)
        unet(x, 2, c)
    assert all(m.recorded is None for m in layers)  # switched off again
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert set(maps) == {name, "mid_block.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.1.attentions.1.transformer_blocks.0.attn2"}
    first, second = maps[name]
    assert first.shape == (2, 2, 64, 3)  # (batch, heads, 8 x 8 latent pixels, text tokens)
    np.testing.assert_allclose(first.sum(axis=-1), 1, rtol=1e-5)
    assert not np.allclose(first, second)  # another timestep, another map
    text = CLIPTextModel(**TINY_TEXT)
    with record_attention(text) as maps:
        text(np.array([[1, 2, 19]]))
    probs = maps["encoder.layers.0.self_attn"][0]
    assert probs.shape == (1, 2, 3, 3) and np.all(np.triu(probs[0, 0], k=1) == 0)  # causal


# =====================================================================================
# SD v1.5's sizes
# =====================================================================================

# SD v1.5's unet/, vae/ and text_encoder/ configs: one copy, the one `minisd bench sd15` builds its folder from.
from minisd.benchmarks.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402


class _ShapesOnly:
    """Stands in for nn's weight generator: zero views of the requested shape, which take no
    memory, so a full-size model has its real parameter shapes without allocating ~4 GB."""

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.broadcast_to(np.float32(0), size)

    def standard_normal(self, size=None):
        return np.broadcast_to(np.float32(0), size)


@pytest.fixture(scope="module")
def sd15_models():
    assert hasattr(nn, "_rng"), "nn's weight generator moved: update _ShapesOnly's hook"
    saved, nn._rng = nn._rng, _ShapesOnly()
    try:
        return tuple(io.from_config(c) for c in (SD15_UNET, SD15_VAE, SD15_TEXT))
    finally:
        nn._rng = saved


def test_sd15_parameter_counts(sd15_models):
    unet, vae, text = sd15_models
    assert (type(unet), type(vae), type(text)) == (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)
    assert unet.num_parameters() == 859_520_964
    assert vae.num_parameters() == 83_653_863
    assert text.num_parameters() == 123_060_480


def test_sd15_keys_and_shapes_match_diffusers(sd15_models):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # shapes without memory on PyTorch's side too
        theirs = (diffusers.UNet2DConditionModel.from_config(SD15_UNET), diffusers.AutoencoderKL.from_config(SD15_VAE),
                  transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)))
    for ours, ref in zip(sd15_models, theirs):
        assert {k: p.shape for k, p in ours.named_parameters()} == \
               {k: tuple(p.shape) for k, p in ref.named_parameters()}


def test_models_on_the_emulated_kernels_match_numpy():
    """The same tiny models through kernels/*.cu on the CPU emulator: outputs and gradients as on NumPy."""
    import minisd
    from minisd.backends import BackendUnavailable, get_backend

    previous = get_backend().name
    try:
        minisd.set_backend("emulated")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    finally:
        minisd.set_backend(previous)
    unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
    x, c, img = (randn(*shape, dtype=np.float32) for shape in ((2, 4, 4, 4), (2, 3, 6), (1, 3, 4, 4)))

    def run():
        unet.zero_grad()
        vae.zero_grad()
        out = unet(x, np.array([3, 700]), c)
        (out * out).sum().backward()
        rec = vae(img)
        (rec * rec).sum().backward()
        grads = {k: p.grad.copy() for k, p in [*unet.named_parameters(), *vae.named_parameters()]}
        return out.numpy(), rec.numpy(), grads

    minisd.set_backend("numpy")
    ref = run()
    try:
        minisd.set_backend("emulated")
        got = run()
    finally:
        minisd.set_backend(previous)
    for a, b in zip(got[:2], ref[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    largest = max(np.abs(g).max() for g in ref[2].values())
    for name, g in ref[2].items():
        # relative to the parameter's own gradient, or to a thousandth of the largest one for
        # gradients that are zero in exact arithmetic (a key bias shifts every score of a row alike)
        scale = max(np.abs(g).max(), 1e-3 * largest)
        assert np.abs(got[2][name] - g).max() <= 1e-4 * scale, name
