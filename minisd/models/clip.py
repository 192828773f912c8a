"""CLIP: the text encoder that turns a caption into the tokens the UNet attends to, and its image tower.

Stable Diffusion conditions on the last hidden state of CLIP's text transformer
(Radford et al. 2021): token ids (B, 77) -> embeddings (B, 77, 768), one vector per token,
each having seen the tokens before it (a causal mask, as in GPT). The UNet's
cross-attention layers read these vectors as keys and values.

    x_0 = token_embedding[ids] + position_embedding[0..L-1]
    x_l = x_{l-1} + SelfAttention(LayerNorm(x_{l-1}))        (causal for text)
    x_l = x_l + fc2(quick_gelu(fc1(LayerNorm(x_l))))         quick_gelu(a) = a * sigmoid(1.702 a)
    last_hidden_state = final_layer_norm(x_L)

CLIP itself was trained contrastively: an image tower (a ViT) and the text tower are
projected to a shared space, and for a batch of N (image, caption) pairs the N x N
cosine similarities times exp(logit_scale) are trained with a cross-entropy in both
directions to pick out the matching pairs. ``CLIPModel`` below does the same, so that
minisd can pretrain its own text encoder on (image, caption) pairs, as SD's was.

SD v1.5's text encoder (openai/clip-vit-large-patch14): 12 layers, width 768, 12 heads,
MLP 3072, vocab 49408, 77 positions: 123,060,480 parameters. Parameter names are
transformers': ``embeddings.token_embedding.weight``, ``encoder.layers.0.self_attn.q_proj.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minisd import functional as F
from minisd import nn
from minisd.backends import get_backend, to_numpy
from minisd.models.blocks import AttentionLayer, as_input, multi_head_attention
from minisd.models.config import Pretrained, check_config
from minisd.tensor import Tensor

_ACTIVATIONS = {"quick_gelu": F.quick_gelu, "gelu": F.gelu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"CLIP: hidden_act {name!r} is not supported (choose from {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


# =====================================================================================
# The transformer layers both towers share
# =====================================================================================


class CLIPAttention(AttentionLayer):
    """Multi-head self-attention with biases on all four projections (transformers' names)."""

    def __init__(self, hidden_size: int, num_heads: int):
        if hidden_size % num_heads:
            raise ValueError(f"CLIP: hidden_size {hidden_size} does not split into {num_heads} heads")
        self.heads = num_heads
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, is_causal: bool = False, attn_mask=None) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(multi_head_attention(self, q, k, v, self.heads, is_causal, attn_mask))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        self.act = _activation(hidden_act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-norm transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, hidden_size, intermediate_size, num_heads, hidden_act, eps):
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor, is_causal: bool = False, attn_mask=None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), is_causal, attn_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, num_layers, hidden_size, intermediate_size, num_heads, hidden_act, eps):
        self.layers = nn.ModuleList([CLIPEncoderLayer(hidden_size, intermediate_size, num_heads, hidden_act, eps)
                                     for _ in range(num_layers)])

    def forward(self, x: Tensor, is_causal: bool = False, attn_mask=None) -> Tensor:
        for layer in self.layers:
            x = layer(x, is_causal, attn_mask)
        return x


# =====================================================================================
# The text tower: what Stable Diffusion uses
# =====================================================================================


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)

    def forward(self, input_ids) -> Tensor:
        L = input_ids.shape[1]
        return F.embedding(input_ids, self.token_embedding.weight) + self.position_embedding.weight[:L]


# transformers' CLIPTextConfig keys that change nothing in the forward pass (training-time
# initialisation, dropout that is 0) are kept in the config so that files round-trip.
_TEXT_PASSIVE = {"attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
                 "projection_dim": 512, "pad_token_id": 1, "bos_token_id": 49406}


class CLIPTextModel(Pretrained, nn.Module):
    """input_ids (B, L) -> last_hidden_state (B, L, hidden_size). transformers' CLIPTextConfig keys.

    At minisd's toy scale, e.g. 4 layers of width 64 over 16 tokens.
    """

    model_type = "clip_text_model"  # transformers' name, written into config.json
    passive_config = _TEXT_PASSIVE

    def __init__(self, vocab_size: int = 49408, hidden_size: int = 512, intermediate_size: int = 2048,
                 num_hidden_layers: int = 12, num_attention_heads: int = 8, max_position_embeddings: int = 77,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5, eos_token_id: int = 49407,
                 **other):
        passive = {k: other.pop(k) for k in list(other) if k in _TEXT_PASSIVE}
        check_config("CLIPTextModel", other, {})
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                           max_position_embeddings=max_position_embeddings, hidden_act=hidden_act,
                           layer_norm_eps=layer_norm_eps, **{**_TEXT_PASSIVE, **passive},
                           eos_token_id=eos_token_id)
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
                                   hidden_act, layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    @property
    def dtype(self):
        return self.final_layer_norm.weight.dtype

    def _ids(self, input_ids) -> np.ndarray:
        ids = to_numpy(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"CLIPTextModel: input_ids must be integers of shape (B, L), got {ids.dtype} {ids.shape}")
        n = self.config["max_position_embeddings"]
        if ids.shape[1] > n:
            raise ValueError(f"CLIPTextModel: {ids.shape[1]} tokens is more than max_position_embeddings={n}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config["vocab_size"]):
            raise ValueError(f"CLIPTextModel: token ids must lie in [0, {self.config['vocab_size']}), "
                             f"got [{ids.min()}, {ids.max()}]")
        return ids

    def forward(self, input_ids, attention_mask=None) -> Tensor:
        """last_hidden_state (B, L, hidden_size).

        ``attention_mask`` (B, L) of 1 (token) / 0 (padding) hides padding keys, on top of
        the causal mask; SD passes none, and padding tokens then take part like any other.
        """
        ids = self._ids(input_ids)
        x = self.embeddings(get_backend().asarray(ids))
        mask = None
        if attention_mask is not None:
            keep = np.asarray(to_numpy(attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask))
            if keep.shape != ids.shape:
                raise ValueError(f"CLIPTextModel: attention_mask {keep.shape} must match input_ids {ids.shape}")
            mask = get_backend().asarray(keep.astype(bool)[:, None, None, :])  # (B, 1, 1, L_key)
        x = self.encoder(x, is_causal=True, attn_mask=mask)
        return self.final_layer_norm(x)

    def pooled(self, input_ids, last_hidden_state: Tensor | None = None) -> Tensor:
        """The hidden state at each sequence's end token (B, hidden_size): CLIP's sentence vector.

        As transformers: the first position holding eos_token_id; for legacy configs with
        eos_token_id 2 (before transformers PR #24773), the position of the largest id.
        """
        ids = self._ids(input_ids)
        h = self(ids) if last_hidden_state is None else last_hidden_state
        if self.config["eos_token_id"] == 2:
            end = ids.argmax(axis=-1)
        else:
            end = (ids == self.config["eos_token_id"]).argmax(axis=-1)
        rows, end = (get_backend().asarray(a) for a in (np.arange(ids.shape[0]), end))
        return h[rows, end]

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Accepts keys with or without the ``text_model.`` prefix; ignores the ``position_ids`` buffer."""
        if not isinstance(state, Mapping):  # the base class names what was expected
            return super().load_state_dict(state, strict)
        state = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
        state.pop("embeddings.position_ids", None)
        super().load_state_dict(state, strict)


# =====================================================================================
# The image tower and the contrastive model
# =====================================================================================


class CLIPVisionEmbeddings(nn.Module):
    """A ViT's input: image patches as tokens, a learned [CLS] token in front, plus positions.

    patch_embedding is a conv with kernel = stride = patch_size: one token per patch.
    """

    def __init__(self, num_channels: int, hidden_size: int, image_size: int, patch_size: int):
        self.image_size = image_size
        self.class_embedding = nn.Parameter(nn._rng.standard_normal(hidden_size))
        self.patch_embedding = nn.Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)  # (B, hidden, h, w)
        tokens = F.transpose(F.flatten(patches, 2), 1, 2)  # (B, h*w, hidden)
        cls = F.expand(F.reshape(self.class_embedding, (1, 1, -1)), (B, 1, tokens.shape[2]))
        return F.cat([cls, tokens], axis=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """pixel_values (B, C, S, S) -> pooled (B, hidden): post_layernorm of the [CLS] token's last state."""

    def __init__(self, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5):
        self.config = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                           num_channels=num_channels, image_size=image_size, patch_size=patch_size,
                           hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
        self.embeddings = CLIPVisionEmbeddings(num_channels, hidden_size, image_size, patch_size)
        self.pre_layrnorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)  # sic: transformers' spelling
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
                                   hidden_act, layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, pixel_values) -> Tensor:
        c, s = self.config["num_channels"], self.config["image_size"]
        pixel_values = as_input(pixel_values, self.post_layernorm.weight.dtype, "CLIPVisionModel: pixel_values")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"CLIPVisionModel: expected images (B, {c}, {s}, {s}), got {tuple(pixel_values.shape)}")
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(x[:, 0])


_VISION_PASSIVE = {"attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
                   "projection_dim": 512}


class CLIPModel(Pretrained, nn.Module):
    """Text and image towers projected into one space, as transformers' CLIPModel.

        t = text_projection(pooled text),  i = visual_projection(pooled image),  both L2-normalised
        logits_per_text = exp(logit_scale) * t i^T     (N x N; the diagonal holds the true pairs)

    ``text_config`` and ``vision_config`` are dicts of CLIPTextConfig / CLIPVisionConfig keys.
    """

    model_type = "clip"  # transformers' name, written into config.json
    sub_configs = {"text_config": CLIPTextModel, "vision_config": CLIPVisionTransformer}  # (the keys each takes)

    def __init__(self, text_config: dict | None = None, vision_config: dict | None = None,
                 projection_dim: int = 512, logit_scale_init_value: float = 2.6592, **other):
        other = {k: v for k, v in other.items() if k not in ("initializer_factor",)}
        check_config("CLIPModel", other, {})
        text_config = dict(text_config or {})
        vision_config = {k: v for k, v in (vision_config or {}).items()
                         if k not in _VISION_PASSIVE and not k.startswith("_") and k != "model_type"}
        self.text_model = CLIPTextModel(**text_config)
        self.vision_model = CLIPVisionTransformer(**vision_config)
        self.config = dict(text_config=self.text_model.config, vision_config=self.vision_model.config,
                           projection_dim=projection_dim, logit_scale_init_value=logit_scale_init_value)
        self.visual_projection = nn.Linear(self.vision_model.config["hidden_size"], projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_model.config["hidden_size"], projection_dim, bias=False)
        self.logit_scale = nn.Parameter(np.array(logit_scale_init_value))

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Ignores the ``position_ids`` buffers that older transformers files carry for both towers."""
        if not isinstance(state, Mapping):
            return super().load_state_dict(state, strict)
        super().load_state_dict({k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}, strict)

    def get_text_features(self, input_ids) -> Tensor:
        return self.text_projection(self.text_model.pooled(input_ids))

    def get_image_features(self, pixel_values) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values))

    def forward(self, pixel_values, input_ids, gather=None) -> Tensor:
        """logits_per_text (N_text, N_image): exp(logit_scale) times the cosine similarities.

        ``gather``, if given, is applied to both towers' normalised embeddings first: in
        data-parallel training, minisd.distributed.gather_rows (every rank's rows of the batch)."""
        t = _l2_normalise(self.get_text_features(input_ids))
        i = _l2_normalise(self.get_image_features(pixel_values))
        if gather is not None:
            t, i = gather(t), gather(i)
        return F.matmul(t, F.transpose(i, 0, 1)) * F.exp(self.logit_scale)

    def contrastive_loss(self, pixel_values, input_ids, gather=None) -> Tensor:
        """CLIP's symmetric loss: mean of the cross-entropies over rows (text -> image) and columns."""
        logits = self(pixel_values, input_ids, gather)
        target = np.arange(logits.shape[0])
        return (F.cross_entropy(logits, target) + F.cross_entropy(F.transpose(logits, 0, 1), target)) * 0.5


def _l2_normalise(x: Tensor) -> Tensor:
    return x / F.sqrt(F.sum(x * x, axis=-1, keepdims=True))

