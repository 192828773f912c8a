"""What is in a model folder, part by part, next to Stable Diffusion v1.5; `minisd info`
(minisd/cli/info.py) prints it.

For each network: its parameter count, its config in brief and the tensors that flow
through it at generation time; the same for SD v1.5 (runwayml/stable-diffusion-v1-5),
whose figures are written below from its published configs.
"""

from __future__ import annotations

import os

# Stable Diffusion v1.5, from its published configs and weights (counted by diffusers/transformers).
SD15 = {
    "vae": {"parameters": 83_653_863, "brief": "block_out_channels (128, 256, 512, 512), 2 layers per block, f = 8",
            "tensors": "image (3, 512, 512) -> latents (4, 64, 64); scaling_factor 0.18215"},
    "text_encoder": {"parameters": 123_060_480, "brief": "CLIP ViT-L/14 text: 12 layers, width 768, 12 heads, "
                                                          "vocab 49408",
                     "tensors": "ids (77,) -> embeddings (77, 768)"},
    "unet": {"parameters": 859_520_964, "brief": "block_out_channels (320, 640, 1280, 1280), 2 layers per block, "
                                                  "8 heads, cross_attention_dim 768",
             "tensors": "z_t (4, 64, 64), t, c (77, 768) -> epsilon (4, 64, 64)"},
    "sampling": "50 steps (PNDM by default; DDIM works), guidance 7.5, batch 2 per image per step",
}
# unet + vae + text encoder as float32 safetensors: 4 bytes a parameter
SD15["size_on_disk_mb"] = round(sum(SD15[k]["parameters"] for k in ("vae", "text_encoder", "unet")) * 4 / 2 ** 20)


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def describe(pipe) -> dict:
    """Parameter counts, sizes and tensor shapes of a loaded pipeline."""
    vae, te, unet, tok = pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer
    c, h, w = pipe.latent_shape
    size = int(vae.config["sample_size"])
    v, t, u = vae.config, te.config, unet.config
    return {
        "vae": {"parameters": vae.num_parameters(),
                "brief": f"block_out_channels {tuple(v['block_out_channels'])}, {v['layers_per_block']} layer(s) per "
                         f"block, f = {vae.downsample_factor}",
                "tensors": f"image (3, {size}, {size}) -> latents ({c}, {h}, {w}); "
                           f"scaling_factor {float(v['scaling_factor']):.5g}"},
        "text_encoder": {"parameters": te.num_parameters(),
                         "brief": f"CLIP text: {t['num_hidden_layers']} layers, width {t['hidden_size']}, "
                                  f"{t['num_attention_heads']} heads, vocab {t['vocab_size']}",
                         "tensors": f"ids ({tok.max_length},) -> embeddings ({tok.max_length}, {t['hidden_size']})"},
        "unet": {"parameters": unet.num_parameters(),
                 "brief": f"block_out_channels {tuple(u['block_out_channels'])}, {u['layers_per_block']} layer(s) per "
                          f"block, cross_attention_dim {u['cross_attention_dim']}",
                 "tensors": f"z_t ({c}, {h}, {w}), t, c ({tok.max_length}, {t['hidden_size']}) -> "
                            f"epsilon ({c}, {h}, {w})"},
        "sampling": f"{type(pipe.scheduler).__name__}, 50 steps, guidance 5, batch 2 per image per step",
        "size_on_disk_mb": round(folder_size(pipe.path) / 2 ** 20, 2),
    }
