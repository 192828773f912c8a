"""AutoencoderKL: the VAE that moves images into Stable Diffusion's latent space and back.

Latent diffusion (Rombach et al. 2022) runs the expensive denoising on a small latent
z instead of pixels. The encoder E maps an image x (3, H, W) in [-1, 1] to a diagonal
Gaussian posterior q(z|x) = N(mu, sigma^2) over z (4, H/f, W/f), f = 2^(levels-1);
the decoder D maps z back to an image. Trained with a reconstruction loss plus a small
KL(q(z|x) || N(0, I)) ("KL-regularised", hence the name), the latents stay near unit
scale; ``scaling_factor`` (0.18215 for SD) rescales them to unit variance before the
UNet sees them:  z_unet = scaling_factor * z.

    encoder:  conv_in -> down_blocks (resnets, downsample) -> mid (resnet, attention, resnet)
              -> GroupNorm, SiLU, conv_out (2 * latent_channels: mean and log-variance)
              -> quant_conv (1x1)
    decoder:  post_quant_conv (1x1) -> conv_in -> mid -> up_blocks (resnets, upsample)
              -> GroupNorm, SiLU, conv_out

SD v1.5: block_out_channels (128, 256, 512, 512), layers_per_block 2, latents 4 x 64 x 64
for 512 x 512 images (f = 8), 83,653,863 parameters. Parameter names are diffusers'.
"""

from __future__ import annotations

import numpy as np

from minisd import functional as F
from minisd import nn
from minisd.backends import get_backend
from minisd.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, as_input
from minisd.models.config import Pretrained, check_config
from minisd.tensor import Tensor

_EPS = 1e-6  # every norm in diffusers' VAE uses eps 1e-6


class DiagonalGaussianDistribution:
    """q(z|x) = N(mean, exp(logvar)), from the encoder's 2 * latent_channels output channels.

    logvar is clamped to [-30, 20] so that exp() neither underflows nor overflows.
    sample() is the reparameterisation trick, z = mean + std * eps with eps ~ N(0, I):
    differentiable in mean and logvar, so the encoder learns through it.
    """

    def __init__(self, parameters: Tensor):
        self.parameters = parameters
        self.mean, logvar = F.chunk(parameters, 2, axis=1)
        self.logvar = F.clip(logvar, -30.0, 20.0)
        self.std = F.exp(self.logvar * 0.5)
        self.var = F.exp(self.logvar)

    def sample(self, rng: np.random.Generator | int | None = None) -> Tensor:
        """z = mean + std * eps; ``rng`` a NumPy Generator or a seed (None: fresh entropy)."""
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        eps = rng.standard_normal(self.mean.shape).astype(self.mean.dtype)
        return self.mean + self.std * get_backend().asarray(eps)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(N(mean, var) || N(0, I)) per sample: 0.5 * sum(mean^2 + var - 1 - logvar) over C, H, W."""
        return 0.5 * F.sum(self.mean * self.mean + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class DownEncoderBlock2D(nn.Module):
    """layers_per_block resnets (no time embedding), then a stride-2 downsample (except at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups=groups, eps=_EPS) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """layers_per_block + 1 resnets, then a 2x upsample (except at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups=groups, eps=_EPS) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> self-attention over all pixels (one head of width C) -> resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        self.attentions = nn.ModuleList(
            [Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=_EPS)]
        ) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups=groups, eps=_EPS) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): the posterior's mean and log-variance."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, mid_attention):
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(block_out_channels):
            in_ch = block_out_channels[max(i - 1, 0)]
            last = i == len(block_out_channels) - 1
            self.down_blocks.append(DownEncoderBlock2D(in_ch, out_ch, layers_per_block, groups, not last))
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), the encoder's mirror image."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, mid_attention):
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups, mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, out_ch in enumerate(reversed_channels):
            in_ch = reversed_channels[max(i - 1, 0)]
            last = i == len(reversed_channels) - 1
            self.up_blocks.append(UpDecoderBlock2D(in_ch, out_ch, layers_per_block + 1, groups, not last))
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[0], eps=_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# Config keys of diffusers' AutoencoderKL that minisd accepts only at their default value.
_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
          "force_upcast": True}


class AutoencoderKL(Pretrained, nn.Module):
    """The VAE: ``encode(x)`` -> posterior q(z|x), ``decode(z)`` -> image. diffusers' config keys.

    At minisd's toy scale, e.g. block_out_channels (32, 64): latents 4 x 16 x 16 for 32 x 32 images.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                 block_out_channels=(64,), layers_per_block: int = 1, latent_channels: int = 4,
                 norm_num_groups: int = 32, sample_size: int = 32, scaling_factor: float = 0.18215,
                 use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True, **unsupported):
        check_config("AutoencoderKL", unsupported, _FIXED)
        block_out_channels = tuple(block_out_channels)
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError(f"AutoencoderKL: {len(block_out_channels)} block_out_channels need as many "
                             f"down_block_types and up_block_types, got {len(down_block_types)} and "
                             f"{len(up_block_types)}")
        for kind in down_block_types:
            if kind != "DownEncoderBlock2D":
                raise ValueError(f"AutoencoderKL: down block type {kind!r} is not supported (only DownEncoderBlock2D)")
        for kind in up_block_types:
            if kind != "UpDecoderBlock2D":
                raise ValueError(f"AutoencoderKL: up block type {kind!r} is not supported (only UpDecoderBlock2D)")
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            sample_size=sample_size, scaling_factor=scaling_factor, use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv, mid_block_add_attention=mid_block_add_attention,
        )
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                               norm_num_groups, mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                               norm_num_groups, mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x) -> DiagonalGaussianDistribution:
        """x (B, in_channels, H, W), values in [-1, 1]. H and W divisible by the downsample factor
        2^(levels-1) decode back to the same size; other sizes are taken as diffusers takes them,
        each downsample padding a row and a column at the bottom right and halving, rounding down."""
        x = as_input(x, self.dtype, "AutoencoderKL.encode: x")
        c = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"AutoencoderKL.encode: expected images (B, {c}, H, W), got shape {tuple(x.shape)}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z) -> Tensor:
        """z (B, latent_channels, h, w), unscaled (divide the UNet's latents by scaling_factor first)."""
        z = as_input(z, self.dtype, "AutoencoderKL.decode: z")
        c = self.config["latent_channels"]
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"AutoencoderKL.decode: expected latents (B, {c}, h, w), got shape {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior: bool = False, rng=None) -> Tensor:
        """Reconstruct x: decode(the posterior's mode, or a sample of it)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(rng) if sample_posterior else posterior.mode())
