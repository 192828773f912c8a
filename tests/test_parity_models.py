"""minisd's VAE, CLIP and UNet against diffusers and transformers, weight for weight.

Each test builds a tiny model in PyTorch with random weights (norms perturbed away from
1 and 0 so that every parameter matters), loads its state_dict into minisd by name
(strict: the same keys and shapes), and compares outputs to 1e-4 relative, then the
gradients of a random linear functional of the output with respect to every parameter.
"""

import numpy as np
import pytest
from helpers import rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from minisd.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel, record_attention  # noqa: E402

pytestmark = pytest.mark.parity
RTOL = 1e-4


def randomised(model, seed=0):
    """A torch model whose every parameter is random (norm weights too), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.split(".")[-2] if "." in name else ""
            if "norm" in owner and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1 and p.numel() > 1:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def check_grads(ours, theirs, skip=(), rtol=RTOL):
    """Every parameter's gradient in minisd equals PyTorch's (relative to the largest entry)."""
    torch_grads = {n: p.grad for n, p in theirs.named_parameters()}
    scale = max(float(g.abs().max()) for g in torch_grads.values() if g is not None)
    checked = 0
    for name, p in ours.named_parameters():
        if any(s in name for s in skip):
            continue
        g_ref = torch_grads[name]
        assert g_ref is not None, f"PyTorch has no gradient for {name}"
        assert p.grad is not None, f"minisd has no gradient for {name}"
        checked += 1
        if name.endswith(("to_k.bias", "k_proj.bias")):
            # Adding b to every key adds q.b to every score of a row, which softmax ignores:
            # the exact gradient is 0, and both sides must be round-off away from it.
            assert np.abs(p.grad).max() < 1e-5 * scale and float(g_ref.abs().max()) < 1e-5 * scale, name
            continue
        err = rel_err(p.grad, g_ref.numpy())
        assert err < rtol, f"gradient of {name}: relative error {err:.2e}"
    assert checked == len(torch_grads) - sum(any(s in n for s in skip) for n in torch_grads)


# =====================================================================================
# UNet
# =====================================================================================

UNET_CONFIGS = {
    # two levels, one layer per block, 2 heads, text width 16
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                       cross_attention_dim=16, norm_num_groups=8,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # three levels, two layers per block, heads per level (2, 4, 4), text width 24,
    # the other sinusoid convention (sin first, shifted frequencies)
    "three_levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=(2, 4, 4),
                         cross_attention_dim=24, norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SD v2's linear projections, attention at every level, 4 heads, norm_eps 1e-6
    "linear_projection": dict(block_out_channels=(32, 32), layers_per_block=2, attention_head_dim=4,
                              cross_attention_dim=32, norm_num_groups=16, norm_eps=1e-6,
                              use_linear_projection=True,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def make_unets(config):
    theirs = randomised(diffusers.UNet2DConditionModel(sample_size=8, **config))
    ours = UNet2DConditionModel(sample_size=8, **config)
    ours.load_state_dict(numpy_state(theirs))
    return ours, theirs


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_matches_diffusers(name):
    config = UNET_CONFIGS[name]
    ours, theirs = make_unets(config)
    rng = np.random.default_rng(1)
    # one non-square latent, and one whose sizes do not halve evenly (9 -> 5 -> 3 on the way
    # down): the up path then resizes to each skip's size, as diffusers does
    B, (H, W) = 2, {"two_levels": (8, 8), "three_levels": (9, 6), "linear_projection": (8, 16)}[name]
    x = rng.standard_normal((B, 4, H, W)).astype(np.float32)
    c = rng.standard_normal((B, 5, config["cross_attention_dim"])).astype(np.float32)
    t = np.array([3, 781]) if name != "two_levels" else 999

    out = ours(x, t, c)
    ref = theirs(torch.from_numpy(x), torch.as_tensor(t), torch.from_numpy(c)).sample
    assert rel_err(out.numpy(), ref.detach().numpy()) < RTOL

    w = rng.standard_normal(out.shape).astype(np.float32)
    (out * w).sum().backward()
    (ref * torch.from_numpy(w)).sum().backward()
    check_grads(ours, theirs)


def test_unet_state_dict_loads_into_diffusers():
    """The other direction: minisd's own initial weights load into diffusers by name and agree."""
    config = UNET_CONFIGS["two_levels"]
    ours = UNet2DConditionModel(**config)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    result = theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    c = rng.standard_normal((1, 3, 16)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x), 50.5, torch.from_numpy(c)).sample.numpy()
    assert rel_err(ours(x, 50.5, c).numpy(), ref) < RTOL


def test_unet_cross_attention_probabilities_match_torch():
    """record_attention's maps equal softmax(Q K^T / sqrt(d)) computed by PyTorch from diffusers' own layers."""
    config = UNET_CONFIGS["two_levels"]
    ours, theirs = make_unets(config)
    captured = {}

    def hook(name):
        def fn(module, args, kwargs):
            hidden, context = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            q, k = module.to_q(hidden), module.to_k(context)
            B, Lq, inner = q.shape
            h = module.heads
            q = q.reshape(B, Lq, h, inner // h).transpose(1, 2)
            k = k.reshape(B, -1, h, inner // h).transpose(1, 2)
            captured[name] = torch.softmax(q @ k.transpose(-1, -2) / (inner // h) ** 0.5, dim=-1)
        return fn

    for name, m in theirs.named_modules():
        if name.endswith("attn2"):
            m.register_forward_pre_hook(hook(name), with_kwargs=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    c = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        theirs(torch.from_numpy(x), 10, torch.from_numpy(c))
    with record_attention(ours, "attn2") as maps:
        ours(x, 10, c)
    assert set(maps) == set(captured) and len(maps) >= 3
    for name, ref in captured.items():
        (probs,) = maps[name]
        assert probs.shape == tuple(ref.shape)
        assert rel_err(probs, ref.numpy()) < RTOL


# =====================================================================================
# VAE
# =====================================================================================

VAE_CONFIGS = {
    "two_levels": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    "three_levels": dict(block_out_channels=(8, 8, 16), layers_per_block=2, norm_num_groups=2, latent_channels=3,
                         in_channels=2, out_channels=3),
}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_matches_diffusers(name):
    config = dict(VAE_CONFIGS[name])
    levels = len(config["block_out_channels"])
    config.update(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    theirs = randomised(diffusers.AutoencoderKL(**config))
    ours = AutoencoderKL(**config)
    ours.load_state_dict(numpy_state(theirs))
    rng = np.random.default_rng(3)
    size = (8, 8) if name == "two_levels" else (9, 7)  # odd sizes: each downsample pads, then rounds down
    x = rng.uniform(-1, 1, (2, config.get("in_channels", 3)) + size).astype(np.float32)

    post = ours.encode(x)
    ref_post = theirs.encode(torch.from_numpy(x)).latent_dist
    assert rel_err(post.mean.numpy(), ref_post.mean.detach().numpy()) < RTOL
    assert rel_err(post.logvar.numpy(), ref_post.logvar.detach().numpy()) < RTOL
    assert rel_err(post.std.numpy(), ref_post.std.detach().numpy()) < RTOL

    image = ours.decode(post.mean)
    ref_image = theirs.decode(ref_post.mean).sample
    assert rel_err(image.numpy(), ref_image.detach().numpy()) < RTOL

    w1 = rng.standard_normal(image.shape).astype(np.float32)
    w2 = rng.standard_normal(post.logvar.shape).astype(np.float32)
    ((image * w1).sum() + (post.logvar * w2).sum()).backward()
    ((ref_image * torch.from_numpy(w1)).sum() + (ref_post.logvar * torch.from_numpy(w2)).sum()).backward()
    check_grads(ours, theirs)


def test_vae_kl_and_sample_match_diffusers_formulas():
    config = dict(VAE_CONFIGS["two_levels"], down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
    theirs = randomised(diffusers.AutoencoderKL(**config))
    ours = AutoencoderKL(**config)
    ours.load_state_dict(numpy_state(theirs))
    x = np.random.default_rng(4).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    post = ours.encode(x)
    ref = theirs.encode(torch.from_numpy(x)).latent_dist
    assert rel_err(post.kl().numpy(), ref.kl().detach().numpy()) < RTOL
    # the same noise on both sides: diffusers draws it from a torch generator
    eps = np.random.default_rng(5).standard_normal(post.mean.shape).astype(np.float32)
    z = post.sample(np.random.default_rng(5))
    assert rel_err(z.numpy(), (ref.mean + ref.std * torch.from_numpy(eps)).detach().numpy()) < RTOL


# =====================================================================================
# CLIP
# =====================================================================================

TEXT_CONFIG = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=12, eos_token_id=49, bos_token_id=48, pad_token_id=0)


def make_text_models(**overrides):
    config = {**TEXT_CONFIG, **overrides}
    theirs = randomised(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)))
    ours = CLIPTextModel(**config)
    ours.load_state_dict(numpy_state(theirs))
    return ours, theirs


def token_ids(rng, B=3, L=12, eos=49):
    ids = rng.integers(1, 47, size=(B, L))
    ids[:, 0] = 48
    for b, end in enumerate(rng.integers(3, L, size=B)):
        ids[b, end] = eos
        ids[b, end + 1:] = 0 if eos != 2 else 1
    return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_matches_transformers(act):
    ours, theirs = make_text_models(hidden_act=act)
    ids = token_ids(np.random.default_rng(6))
    out = ours(ids)
    ref = theirs(torch.from_numpy(ids))
    assert rel_err(out.numpy(), ref.last_hidden_state.detach().numpy()) < RTOL
    assert rel_err(ours.pooled(ids, out).numpy(), ref.pooler_output.detach().numpy()) < RTOL

    w = np.random.default_rng(7).standard_normal(out.shape).astype(np.float32)
    (out * w).sum().backward()
    (ref.last_hidden_state * torch.from_numpy(w)).sum().backward()
    check_grads(ours, theirs)


def test_clip_text_legacy_eos_and_attention_mask():
    ours, theirs = make_text_models(eos_token_id=2)
    rng = np.random.default_rng(8)
    ids = rng.integers(3, 47, size=(2, 10))
    ids[0, 4] = 49  # the largest id marks the end, as in the original CLIP vocabulary
    ids[1, 7] = 49
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    out = ours(ids, attention_mask=mask)
    ref = theirs(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    assert rel_err(out.numpy(), ref.last_hidden_state.detach().numpy()) < RTOL
    assert rel_err(ours.pooled(ids, out).numpy(), ref.pooler_output.detach().numpy()) < RTOL


def test_clip_text_attention_probabilities_match_transformers():
    ours, theirs = make_text_models()
    theirs.config._attn_implementation = "eager"
    ids = token_ids(np.random.default_rng(9))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids), output_attentions=True).attentions
    with record_attention(ours) as maps:
        ours(ids)
    assert len(maps) == len(ref) == 2
    for i, r in enumerate(ref):
        assert rel_err(maps[f"encoder.layers.{i}.self_attn"][0], r.numpy()) < RTOL


def test_clip_text_loads_prefixed_state_dicts():
    """SD v1 files and older transformers carry 'text_model.' in front of every key, and position_ids."""
    ours, theirs = make_text_models()
    state = {"text_model." + k: v for k, v in numpy_state(theirs).items()}
    state["text_model.embeddings.position_ids"] = np.arange(12)[None]
    fresh = CLIPTextModel(**TEXT_CONFIG)
    fresh.load_state_dict(state)
    ids = token_ids(np.random.default_rng(10))
    assert rel_err(fresh(ids).numpy(), theirs(torch.from_numpy(ids)).last_hidden_state.detach().numpy()) < RTOL


def test_clip_contrastive_model_matches_transformers():
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=8,
                  patch_size=4, num_channels=3)
    theirs = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT_CONFIG, vision_config=vision,
                                                            projection_dim=16))
    theirs = randomised(theirs)
    with torch.no_grad():
        theirs.logit_scale.fill_(1.3)
    ours = CLIPModel(text_config=TEXT_CONFIG, vision_config=vision, projection_dim=16)
    state = numpy_state(theirs)
    # older transformers files also hold the towers' position_ids buffers
    state["text_model.embeddings.position_ids"] = np.arange(12)[None]
    state["vision_model.embeddings.position_ids"] = np.arange(5)[None]
    ours.load_state_dict(state)
    rng = np.random.default_rng(11)
    ids = token_ids(rng, B=4)
    images = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    loss = ours.contrastive_loss(images, ids)
    ref = theirs(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images), return_loss=True)
    assert rel_err(ours(images, ids).numpy(), ref.logits_per_text.detach().numpy()) < RTOL
    assert rel_err(loss.numpy(), ref.loss.detach().numpy()) < RTOL
    loss.backward()
    ref.loss.backward()
    check_grads(ours, theirs)


def test_bench_unet_runs_and_reports_ratios(capsys, monkeypatch):
    """`minisd bench unet` on a smaller UNet and batch: both sides run and a ratio is printed."""
    from minisd.benchmarks import unet as bench

    monkeypatch.setattr(bench, "CONFIG", {**bench.CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8,
                                          "layers_per_block": 1, "attention_head_dim": 2})

    assert bench.main(["--batch", "2", "--tokens", "3", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "train step" in out and "forward" in out and out.count("x\n") == 2
