"""UNet2DConditionModel: the network that predicts the noise, epsilon_theta(x_t, t, c).

Training draws a clean latent z_0, a timestep t and noise epsilon ~ N(0, I), forms
z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) epsilon, and teaches this network to
recover epsilon from (z_t, t, c), c being the caption's CLIP token embeddings (Ho et al.
2020; Rombach et al. 2022). Its parts, in the order this file builds them:

    timestep embedding   t -> sinusoids of geometrically spaced frequencies -> MLP (SiLU)
    resnet blocks        (blocks.py) each adds the time embedding to its feature map
    Transformer2D        GroupNorm, proj_in, then per block: self-attention over the pixels,
                         cross-attention from pixels (queries) to text tokens (keys/values),
                         a GEGLU feed-forward, each pre-LayerNormed and residual; proj_out
    down blocks          resnets (+ transformers) then a stride-2 downsample; every output
                         is kept as a skip connection
    mid block            resnet, transformer, resnet at the lowest resolution
    up blocks            each resnet first concatenates one skip (channels), then upsample
    out                  GroupNorm, SiLU, conv_out -> epsilon with the latent's shape

SD v1.5: block_out_channels (320, 640, 1280, 1280), layers_per_block 2, 8 heads,
cross_attention_dim 768, latents (4, 64, 64), text (77, 768): 859,520,964 parameters.
At minisd's toy scale, e.g.: (64, 128) channels, latents (4, 16, 16), text (16, 64).
Parameter names and config keys are diffusers'.
"""

from __future__ import annotations

import math

import numpy as np

from minisd import functional as F
from minisd import nn
from minisd.backends import get_backend, to_numpy
from minisd.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, as_input
from minisd.models.config import Pretrained, check_config
from minisd.tensor import Tensor

# =====================================================================================
# Timestep embedding
# =====================================================================================


def timestep_embedding(timesteps: np.ndarray, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       dtype=np.float32, max_period: float = 10000) -> np.ndarray:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), as in the Transformer.

        omega_i = max_period ^ (-i / (half - freq_shift)),  i = 0 .. half-1,  half = dim // 2
        emb(t) = [sin(t omega), cos(t omega)]       ([cos, sin] when flip_sin_to_cos, as SD)

    Computed in ``dtype`` with the same operations as diffusers, so float32 results agree.
    """
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=dtype) / dtype(half - freq_shift)
    angles = np.asarray(timesteps, dtype=dtype)[:, None] * np.exp(exponent)[None, :]
    sin, cos = np.sin(angles), np.cos(angles)
    emb = np.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP on top of the sinusoids: linear_1 -> SiLU -> linear_2, width 4 * block_out_channels[0]."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# =====================================================================================
# The transformer that lets pixels look at each other and at the text
# =====================================================================================


class GEGLU(nn.Module):
    """GEGLU(x) = a * GELU(g), where [a, g] = x W + b splits the projection in two (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.geglu(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU to 4 * dim, dropout, then back to dim (``net.0.proj``, ``net.2``: diffusers' names)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """On tokens h (B, H*W, C), with text c (B, L, cross_attention_dim):

        h = h + attn1(LayerNorm(h))          self-attention: every pixel attends to every pixel
        h = h + attn2(LayerNorm(h), c)       cross-attention: pixels query the caption's tokens
        h = h + ff(LayerNorm(h))             GEGLU feed-forward
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads=heads, dim_head=dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context)
        return h + self.ff(self.norm3(h))


def _pointwise(layer: nn.Module, h: Tensor) -> Tensor:
    """Apply proj_in/proj_out to tokens (B, L, C): a 1x1 convolution is a linear map over channels."""
    if isinstance(layer, nn.Conv2d):
        w = layer.weight
        return F.linear(h, F.reshape(w, w.shape[:2]), layer.bias)
    return layer(h)


class Transformer2DModel(nn.Module):
    """A feature map (B, C, H, W) as H*W tokens through transformer blocks, plus a residual.

        h = proj_in(GroupNorm(x))  as tokens (B, H*W, C);  h = blocks(h, c);  out = x + proj_out(h)

    proj_in/proj_out are 1x1 convolutions (SD v1) or linear layers (use_linear_projection,
    SD v2); on tokens both are the same matrix product.
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, groups: int,
                 use_linear_projection: bool = False, num_layers: int = 1):
        if channels % heads:
            raise ValueError(f"Transformer2DModel: {channels} channels do not split into {heads} heads")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        make = (lambda: nn.Linear(channels, channels)) if use_linear_projection else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim) for _ in range(num_layers)])
        self.proj_out = make()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = F.transpose(F.reshape(self.norm(x), (B, C, H * W)), 1, 2)  # tokens in row-major pixel order
        h = _pointwise(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = _pointwise(self.proj_out, h)
        return x + F.reshape(F.transpose(h, 1, 2), (B, C, H, W))


# =====================================================================================
# Down, mid and up blocks
# =====================================================================================


class DownBlock2D(nn.Module):
    """One level of the contracting path: num_layers resnets, each followed by a Transformer2D
    when ``cross_attention`` (diffusers' CrossAttnDownBlock2D), then a stride-2 downsample
    unless this is the last level. Returns the output and every intermediate (the skips).
    """

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample,
                 downsample_padding=1, cross_attention=False, heads=8, cross_attention_dim=768,
                 use_linear_projection=False):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_channels, heads, cross_attention_dim, groups, use_linear_projection)
            for _ in range(num_layers)]) if cross_attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet -> Transformer2D -> resnet at the lowest resolution."""

    def __init__(self, channels, temb_channels, groups, eps, heads, cross_attention_dim, use_linear_projection=False):
        self.attentions = nn.ModuleList([
            Transformer2DModel(channels, heads, cross_attention_dim, groups, use_linear_projection)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock2D(nn.Module):
    """One level of the expanding path: num_layers = layers_per_block + 1 resnets, each taking
    the concatenation [x, skip] of the running features and one skip from the matching down
    level (last in, first out), each followed by a Transformer2D when ``cross_attention``
    (diffusers' CrossAttnUpBlock2D); then a 2x upsample unless this is the last level.

    Channels: resnet j takes prev_output_channel (j = 0) or out_channels, plus the skip's
    channels: out_channels, except for the last one, whose skip comes from the level below
    (in_channels).
    """

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps,
                 add_upsample, cross_attention=False, heads=8, cross_attention_dim=768,
                 use_linear_projection=False):
        resnets = []
        for j in range(num_layers):
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            x_channels = prev_output_channel if j == 0 else out_channels
            resnets.append(ResnetBlock2D(x_channels + skip_channels, out_channels, temb_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([
            Transformer2DModel(out_channels, heads, cross_attention_dim, groups, use_linear_projection)
            for _ in range(num_layers)]) if cross_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(F.cat([x, skips.pop()], axis=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            # up to the size of the skip the next level starts with: twice this size, unless a
            # stride-2 convolution on the way down rounded an odd size up (9 -> 5 -> 9). (A
            # block run on its own, with no skips left, just doubles.)
            x = self.upsamplers[0](x, size=tuple(skips[-1].shape[2:]) if skips else None)
        return x


# =====================================================================================
# The model
# =====================================================================================

_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}

# diffusers' config keys for features minisd leaves out, at the value that turns them off.
_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}


class UNet2DConditionModel(Pretrained, nn.Module):
    """epsilon_theta(z_t, t, c): ``unet(sample, timestep, encoder_hidden_states)`` -> predicted noise.

    Config keys are diffusers', with their defaults. Note the legacy meaning of
    ``attention_head_dim``: like diffusers, minisd takes it as the NUMBER of heads per
    level (8 in SD v1.5, so heads are C/8 wide), unless ``num_attention_heads`` is given.
    ``upcast_attention`` is accepted and has no effect (minisd computes in float32 or float64).
    """

    def __init__(self, sample_size=None, in_channels: int = 4, out_channels: int = 4,
                 flip_sin_to_cos: bool = True, freq_shift: int = 0,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block: int = 2, downsample_padding: int = 1,
                 norm_num_groups: int = 32, norm_eps: float = 1e-5, cross_attention_dim: int = 1280,
                 attention_head_dim=8, num_attention_heads=None, use_linear_projection: bool = False,
                 upcast_attention: bool = False, **unsupported):
        check_config("UNet2DConditionModel", unsupported, _FIXED)
        block_out_channels = tuple(block_out_channels)
        levels = len(block_out_channels)
        if len(down_block_types) != levels or len(up_block_types) != levels:
            raise ValueError(f"UNet2DConditionModel: {levels} block_out_channels need as many down_block_types "
                             f"and up_block_types, got {len(down_block_types)} and {len(up_block_types)}")
        for kind in down_block_types:
            if kind not in _DOWN_TYPES:
                raise ValueError(f"UNet2DConditionModel: down block type {kind!r} is not supported "
                                 f"(choose from {', '.join(_DOWN_TYPES)})")
        for kind in up_block_types:
            if kind not in _UP_TYPES:
                raise ValueError(f"UNet2DConditionModel: up block type {kind!r} is not supported "
                                 f"(choose from {', '.join(_UP_TYPES)})")
        if not isinstance(layers_per_block, int) or not isinstance(cross_attention_dim, int):
            raise ValueError("UNet2DConditionModel: minisd takes layers_per_block and cross_attention_dim "
                             "as single integers")
        heads = num_attention_heads if num_attention_heads is not None else attention_head_dim
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        if len(heads) != levels:
            raise ValueError(f"UNet2DConditionModel: {len(heads)} head counts for {levels} levels")
        self.config = dict(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, downsample_padding=downsample_padding,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
        )
        temb_channels = 4 * block_out_channels[0]
        common = dict(groups=norm_num_groups, eps=norm_eps)
        attn = dict(cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(down_block_types):
            self.down_blocks.append(DownBlock2D(
                block_out_channels[max(i - 1, 0)], block_out_channels[i], temb_channels, layers_per_block,
                add_downsample=i < levels - 1, downsample_padding=downsample_padding,
                cross_attention=_DOWN_TYPES[kind], heads=heads[i], **common, **attn))

        self.mid_block = UNetMidBlock2DCrossAttn(block_out_channels[-1], temb_channels, heads=heads[-1],
                                                 **common, **attn)

        self.up_blocks = nn.ModuleList()
        rev_channels, rev_heads = block_out_channels[::-1], heads[::-1]
        for i, kind in enumerate(up_block_types):
            self.up_blocks.append(UpBlock2D(
                in_channels=rev_channels[min(i + 1, levels - 1)], prev_output_channel=rev_channels[max(i - 1, 0)],
                out_channels=rev_channels[i], temb_channels=temb_channels, num_layers=layers_per_block + 1,
                add_upsample=i < levels - 1, cross_attention=_UP_TYPES[kind], heads=rev_heads[i], **common, **attn))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    def _timesteps(self, timestep, batch: int) -> np.ndarray:
        t = np.asarray(to_numpy(timestep.data if isinstance(timestep, Tensor) else timestep))
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"UNet2DConditionModel: timestep must be a number or an array of shape ({batch},), "
                             f"got shape {t.shape}")
        return np.broadcast_to(t.reshape(-1), (batch,))

    def forward(self, sample, timestep, encoder_hidden_states) -> Tensor:
        """sample z_t (B, in_channels, H, W), timestep t (a number or (B,)), encoder_hidden_states
        c (B, L, cross_attention_dim) -> epsilon_theta (B, out_channels, H, W)."""
        cfg = self.config
        x = as_input(sample, self.dtype, "UNet2DConditionModel: sample")
        c = as_input(encoder_hidden_states, self.dtype, "UNet2DConditionModel: encoder_hidden_states")
        if x.ndim != 4 or x.shape[1] != cfg["in_channels"]:
            raise ValueError(f"UNet2DConditionModel: sample must be (B, {cfg['in_channels']}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if c.ndim != 3 or c.shape[0] != x.shape[0] or c.shape[2] != cfg["cross_attention_dim"]:
            raise ValueError(f"UNet2DConditionModel: encoder_hidden_states must be ({x.shape[0]}, L, "
                             f"{cfg['cross_attention_dim']}), got shape {tuple(c.shape)}")

        t = self._timesteps(timestep, x.shape[0])
        t_sin = timestep_embedding(t, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"], cfg["freq_shift"],
                                   dtype=self.dtype.type)
        temb = self.time_embedding(Tensor(get_backend().asarray(t_sin)))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, c)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, c)
        for block in self.up_blocks:
            x = block(x, skips, temb, c)  # pops as many skips as it has resnets
        return self.conv_out(F.silu(self.conv_norm_out(x)))
