"""Stable Diffusion's three networks, with diffusers' and transformers' names and configs.

    AutoencoderKL          vae.py   images <-> latents
    CLIPTextModel          clip.py  token ids -> token embeddings (what the UNet attends to)
    CLIPModel              clip.py  text + image towers, for contrastive pretraining
    UNet2DConditionModel   unet.py  epsilon_theta(z_t, t, c)

blocks.py holds what they share (ResnetBlock2D, Downsample2D, Upsample2D, Attention) and
``record_attention``, which records attention probabilities for plotting.
"""

from minisd.models.blocks import record_attention
from minisd.models.clip import CLIPModel, CLIPTextModel, CLIPVisionTransformer
from minisd.models.unet import UNet2DConditionModel
from minisd.models.vae import AutoencoderKL

__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPModel", "CLIPVisionTransformer", "UNet2DConditionModel",
           "record_attention"]
