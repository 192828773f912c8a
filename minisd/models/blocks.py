"""The building blocks that the VAE, the UNet and CLIP share.

    ResnetBlock2D   GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> conv, plus a skip
    Downsample2D    a 3x3 convolution with stride 2 (halves H and W)
    Upsample2D      nearest-neighbour 2x upsampling, then a 3x3 convolution
    Attention       multi-head (cross-)attention with diffusers' names: to_q, to_k, to_v, to_out.0

Every attention layer (here and CLIP's, in clip.py) runs through ``multi_head_attention``,
which can also record its attention probabilities for the lessons' attention maps:

    with record_attention(unet) as maps:      # {layer name: [array (B, heads, L_query, L_key), ...]}
        unet(latents, t, text_embeddings)

Recording is off by default and then costs one attribute test per layer.
Parameter names are diffusers' (``resnets.0.norm1.weight``, ``attentions.0.to_q.weight``).
"""

from __future__ import annotations

import contextlib

import numpy as np

from minisd import functional as F
from minisd import nn
from minisd.backends import get_backend, to_numpy
from minisd.tensor import Tensor


def as_input(x, dtype, name: str = "input") -> Tensor:
    """A model's floating-point input as a Tensor of the parameters' dtype (arrays and lists accepted).

    A Tensor of another float dtype is cast differentiably, so gradients still reach it.
    """
    if isinstance(x, Tensor):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        return x if x.dtype == dtype else F.cast(x, dtype)
    array = np.asarray(to_numpy(x)) if not hasattr(x, "dtype") else x
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numbers, got {array.dtype}")
    return Tensor(get_backend().asarray(array, dtype=dtype))


# =====================================================================================
# Residual block
# =====================================================================================


class ResnetBlock2D(nn.Module):
    """A residual block with an optional time embedding (He et al. 2016; DDPM's variant).

        h = conv1(SiLU(GroupNorm(x)))
        h = h + W_t SiLU(t_emb)                    (UNet only: the timestep, broadcast over H, W)
        h = conv2(dropout(SiLU(GroupNorm(h))))
        out = shortcut(x) + h                      (shortcut: a 1x1 conv when channels change)

    SD v1.5: groups 32, eps 1e-5 in the UNet, 1e-6 in the VAE; channels 128..1280.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None = None,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block was built with a time embedding; pass temb")
            t = self.time_emb_proj(F.silu(temb))  # (B, out_channels)
            h = h + F.reshape(t, t.shape + (1, 1))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


# =====================================================================================
# Resampling
# =====================================================================================


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    ``padding=1`` (the UNet) pads every side; ``padding=0`` (the VAE encoder) pads only
    the right and bottom by one, as the original LDM code did, so that (H, W) -> (H/2, W/2).
    """

    def __init__(self, channels: int, padding: int = 1):
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour upsampling (each pixel copied 2x2), then a 3x3 convolution.
    ``size``: resize to (H, W) instead, where the UNet's skip at this level is not twice as big."""

    def __init__(self, channels: int):
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size=None) -> Tensor:
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2, mode="nearest"))


# =====================================================================================
# Attention
# =====================================================================================


class AttentionLayer(nn.Module):
    """Base class of every attention layer; ``recorded`` is a list while recording, else None."""

    recorded: list | None = None


def multi_head_attention(layer: AttentionLayer, q: Tensor, k: Tensor, v: Tensor, heads: int,
                         is_causal: bool = False, attn_mask=None) -> Tensor:
    """Multi-head scaled dot-product attention on token layouts (Vaswani et al. 2017).

    q (B, Lq, heads*d), k and v (B, Lk, heads*d) are split into heads, (B, heads, L, d),
    and each head computes  softmax(Q K^T / sqrt(d) + mask) V;  the heads are joined
    back into (B, Lq, heads*d). Splitting is a reshape and one transpose each way.
    When the layer is recording, the probabilities P (B, heads, Lq, Lk) are kept as NumPy.
    """
    B, Lq, inner = q.shape
    if inner % heads:
        raise ValueError(f"attention: width {inner} does not split into {heads} heads")
    d = inner // heads
    q, k, v = (F.permute(F.reshape(t, (B, t.shape[1], heads, d)), (0, 2, 1, 3)) for t in (q, k, v))
    if layer.recorded is not None:
        layer.recorded.append(to_numpy(F.attention_probabilities(q, k, attn_mask=attn_mask, is_causal=is_causal)))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return F.reshape(F.permute(o, (0, 2, 1, 3)), (B, Lq, inner))


class Attention(AttentionLayer):
    """diffusers' Attention: project, attend per head, project back.

        Q = x W_q,  K = c W_k,  V = c W_v     (c = context: x itself for self-attention,
                                               the text embeddings for cross-attention)
        out = MultiHead(Q, K, V) W_o + b_o

    With ``norm_num_groups`` (the VAE's mid block) the layer takes images (B, C, H, W):
    it group-normalises them, attends over the H*W pixels as tokens and adds the input
    back (residual). Otherwise it takes tokens (B, L, query_dim) and the caller adds
    the residual. SD v1.5's UNet: 8 heads of width C/8 (40, 80, 160); the VAE: 1 head of 512.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, norm_num_groups: int | None = None,
                 eps: float = 1e-5):
        inner = heads * dim_head
        self.heads = heads
        context_dim = cross_attention_dim or query_dim
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.group_norm is not None:  # images in, images out, with a residual
            B, C, H, W = x.shape
            tokens = F.transpose(F.reshape(self.group_norm(x), (B, C, H * W)), 1, 2)
            out = self._attend(tokens, tokens)
            return x + F.reshape(F.transpose(out, 1, 2), (B, C, H, W))
        return self._attend(x, x if context is None else context)

    def _attend(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](multi_head_attention(self, q, k, v, self.heads))


@contextlib.contextmanager
def record_attention(model: nn.Module, which: str = "all"):
    """Record every attention layer's probabilities while the block runs.

    Yields a dict {layer name: list of arrays (B, heads, L_query, L_key)}, one array per
    call (a sampling loop of 50 steps gives 50). ``which`` keeps only the layers whose
    name contains it, e.g. "attn2" for the UNet's cross-attention (queries: latent pixels
    in row-major order, keys: text tokens).
    """
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, AttentionLayer) and (which == "all" or which in name)}
    maps = {name: [] for name in layers}
    for name, m in layers.items():
        m.recorded = maps[name]
    try:
        yield maps
    finally:
        for m in layers.values():
            m.recorded = None
