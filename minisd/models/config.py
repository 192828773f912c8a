"""Model configs: the constructor's arguments, by diffusers' and transformers' names, kept as a dict.

A diffusers model is rebuilt from its config.json by calling the class with the JSON's
keys as keyword arguments. minisd's models work the same way, so a config written by
diffusers builds a minisd model and the other way round. Real configs carry keys for
features minisd leaves out (class embeddings, SDXL's added conditions, ...); such a key
is accepted only at the value that switches the feature off (diffusers' default), and
any other value is a clear error rather than a silently different model.

Every value is checked before a layer is built (check_values, which each model's
constructor runs): its type and range ("abc" is not a list of channel counts, -4 is not
a channel count), the keys that must agree (one block type per level; channels that split
into norm_num_groups), and the model's size: parameter_count works out the number of
weights from the config alone, so that ``layers_per_block: 100000000`` is refused at once
instead of building for hours towards more memory than the machine has.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np

from minisd import io

# Keys that describe a file rather than a model (diffusers' "_class_name", transformers'
# "architectures", ...). They are written back on saving but never change the model.
METADATA_KEYS = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}


def check_config(cls_name: str, extra: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Reject keyword arguments minisd does not implement, naming the key and the value it allows.

    ``extra`` holds the keyword arguments the constructor did not name; ``fixed`` maps the
    keys minisd accepts only at one value (the value that disables the feature).
    """
    for key, value in extra.items():
        if key.startswith("_") or key in METADATA_KEYS:
            continue
        if key not in fixed:
            raise TypeError(f"{cls_name}: unknown config key {key!r}")
        if _normalise(value) != _normalise(fixed[key]):
            raise ValueError(f"{cls_name}: config {key}={value!r} is not supported by minisd "
                             f"(only {fixed[key]!r})")


def _normalise(value):
    """Tuples and lists compare equal (JSON has no tuples)."""
    if isinstance(value, (tuple, list)):
        return [_normalise(v) for v in value]
    return value


# =====================================================================================
# The values: each key's type and range
# =====================================================================================

# Each check is (what the value must be, a test of the value). JSON's true/false are not
# numbers here, although Python's bool is an int.


def _whole(v, low) -> bool:
    return isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) and v >= low


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _list_of(test):
    return lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(test(x) for x in v)


def _optional(check):
    what, test = check
    return f"{what}, or null", lambda v: v is None or test(v)


POSITIVE = ("a whole number >= 1", lambda v: _whole(v, 1))
NON_NEGATIVE = ("a whole number >= 0", lambda v: _whole(v, 0))
BOOLEAN = ("true or false", lambda v: isinstance(v, (bool, np.bool_)))
POSITIVE_NUMBER = ("a finite number > 0", lambda v: _number(v) and v > 0)
NUMBER = ("a finite number", _number)
NAME = ("a name (a string)", lambda v: isinstance(v, str))
NAMES = ("a non-empty list of names (strings)", _list_of(lambda x: isinstance(x, str)))
SIZES = ("a non-empty list of whole numbers >= 1", _list_of(lambda x: _whole(x, 1)))
SIZE_OR_SIZES = ("a whole number >= 1 or a list of them", lambda v: _whole(v, 1) or SIZES[1](v))
SIZE_OR_PAIR = ("a whole number >= 1 or a list of two", lambda v: _whole(v, 1) or (SIZES[1](v) and len(v) == 2))
MAPPING = ("a mapping of config keys (a JSON object)", lambda v: isinstance(v, Mapping))

UNET_KEYS = {
    "sample_size": _optional(SIZE_OR_PAIR), "in_channels": POSITIVE, "out_channels": POSITIVE,
    "flip_sin_to_cos": BOOLEAN, "freq_shift": NON_NEGATIVE, "down_block_types": NAMES, "up_block_types": NAMES,
    "block_out_channels": SIZES, "layers_per_block": POSITIVE, "downsample_padding": NON_NEGATIVE,
    "norm_num_groups": POSITIVE, "norm_eps": POSITIVE_NUMBER, "cross_attention_dim": POSITIVE,
    "attention_head_dim": SIZE_OR_SIZES, "num_attention_heads": _optional(SIZE_OR_SIZES),
    "use_linear_projection": BOOLEAN, "upcast_attention": BOOLEAN,
}
VAE_KEYS = {
    "in_channels": POSITIVE, "out_channels": POSITIVE, "down_block_types": NAMES, "up_block_types": NAMES,
    "block_out_channels": SIZES, "layers_per_block": POSITIVE, "latent_channels": POSITIVE,
    "norm_num_groups": POSITIVE, "sample_size": SIZE_OR_PAIR, "scaling_factor": POSITIVE_NUMBER,
    "use_quant_conv": BOOLEAN, "use_post_quant_conv": BOOLEAN, "mid_block_add_attention": BOOLEAN,
}
_TOWER_KEYS = {"hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
               "num_attention_heads": POSITIVE, "hidden_act": NAME, "layer_norm_eps": POSITIVE_NUMBER}
TEXT_KEYS = {"vocab_size": POSITIVE, "max_position_embeddings": POSITIVE, "eos_token_id": NON_NEGATIVE,
             **_TOWER_KEYS}
VISION_KEYS = {"num_channels": POSITIVE, "image_size": POSITIVE, "patch_size": POSITIVE, **_TOWER_KEYS}
CLIP_KEYS = {"text_config": _optional(MAPPING), "vision_config": _optional(MAPPING), "projection_dim": POSITIVE,
             "logit_scale_init_value": NUMBER}
SCHEMAS = {"UNet2DConditionModel": UNET_KEYS, "AutoencoderKL": VAE_KEYS, "CLIPTextModel": TEXT_KEYS,
           "CLIPModel": CLIP_KEYS}

# Keys a config file must have although the constructor has defaults: the ones the others
# must agree with. diffusers writes every key; a file without these is not one of its.
REQUIRED_KEYS = {"UNet2DConditionModel": ("block_out_channels", "down_block_types", "up_block_types"),
                 "AutoencoderKL": ("block_out_channels", "down_block_types", "up_block_types")}

# The keys that make a model big, named when it is too big.
_SIZE_KEYS = {
    "UNet2DConditionModel": ("block_out_channels", "layers_per_block", "cross_attention_dim"),
    "AutoencoderKL": ("block_out_channels", "layers_per_block"),
    "CLIPTextModel": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"),
    "CLIPModel": ("text_config", "vision_config", "projection_dim"),
}


def _defaults(cls) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_keys(cls_name: str, schema: dict, values: Mapping, prefix: str = "") -> None:
    for key, (what, test) in schema.items():
        if key in values and not test(values[key]):
            raise ValueError(f"{cls_name}: config {prefix}{key} must be {what}, got {values[key]!r}")


def _check_levels(cls_name: str, values: Mapping) -> None:
    """The UNet's and the VAE's per-level keys: one entry per level, channels that split into groups."""
    levels = len(values["block_out_channels"])
    per_level = ["down_block_types", "up_block_types"]
    per_level += [k for k in ("attention_head_dim", "num_attention_heads") if isinstance(values.get(k), (list, tuple))]
    for key in per_level:
        if len(values[key]) != levels:
            raise ValueError(f"{cls_name}: config {key} has {len(values[key])} entries and block_out_channels "
                             f"{levels}: one per level")
    groups = values["norm_num_groups"]
    for channels in values["block_out_channels"]:
        if channels % groups:
            raise ValueError(f"{cls_name}: config block_out_channels {channels} does not split into "
                             f"norm_num_groups={groups} groups")


def check_values(cls_name: str, values: Mapping) -> None:
    """Check a model's config before it is built: ``values`` are all its constructor's arguments
    (defaults included). Raises ValueError naming the key, the value and what it must be; a
    model whose weights would not fit in this machine's memory is refused by its size."""
    schema = SCHEMAS.get(cls_name)
    if schema is None:
        return
    _check_keys(cls_name, schema, values)
    if cls_name == "CLIPModel":  # the towers' keys, with the towers' defaults
        from minisd.models.clip import CLIPTextModel, CLIPVisionTransformer

        values = dict(values)
        for key, cls, keys in (("text_config", CLIPTextModel, TEXT_KEYS),
                               ("vision_config", CLIPVisionTransformer, VISION_KEYS)):
            values[key] = {**_defaults(cls), **(values[key] or {})}
            _check_keys(cls_name, keys, values[key], prefix=f"{key}.")
    if cls_name in REQUIRED_KEYS:
        _check_levels(cls_name, values)
    _check_size(cls_name, values)


# =====================================================================================
# The size: the number of weights, from the config alone
# =====================================================================================


def _conv(cin, cout, k=3, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def _linear(fan_in, fan_out, bias=True):
    return fan_in * fan_out + (fan_out if bias else 0)


def _norm(c):  # GroupNorm / LayerNorm: a scale and a shift per channel
    return 2 * c


def _resnet(cin, cout, temb=None):
    return (_norm(cin) + _conv(cin, cout) + (_linear(temb, cout) if temb else 0) + _norm(cout) + _conv(cout, cout)
            + (_conv(cin, cout, 1) if cin != cout else 0))


def _transformer(c, context):
    """Transformer2DModel with one BasicTransformerBlock (the heads together are c wide)."""
    attn1 = 3 * _linear(c, c, bias=False) + _linear(c, c)
    attn2 = _linear(c, c, bias=False) + 2 * _linear(context, c, bias=False) + _linear(c, c)
    feed_forward = _linear(c, 8 * c) + _linear(4 * c, c)  # GEGLU to 2 x 4c, then back
    return _norm(c) + 2 * _linear(c, c) + 3 * _norm(c) + attn1 + attn2 + feed_forward


def _clip_layers(c):
    per_layer = 4 * _linear(c["hidden_size"], c["hidden_size"]) + 2 * _norm(c["hidden_size"]) + \
        _linear(c["hidden_size"], c["intermediate_size"]) + _linear(c["intermediate_size"], c["hidden_size"])
    return c["num_hidden_layers"] * per_layer


def _unet(c):
    ch, L, D = list(c["block_out_channels"]), c["layers_per_block"], c["cross_attention_dim"]
    T, levels = 4 * ch[0], len(ch)
    n = _conv(c["in_channels"], ch[0]) + _linear(ch[0], T) + _linear(T, T)
    for i, kind in enumerate(c["down_block_types"]):
        n += _resnet(ch[max(i - 1, 0)], ch[i], T) + (L - 1) * _resnet(ch[i], ch[i], T)
        n += L * _transformer(ch[i], D) if "CrossAttn" in kind else 0
        n += _conv(ch[i], ch[i]) if i < levels - 1 else 0
    n += 2 * _resnet(ch[-1], ch[-1], T) + _transformer(ch[-1], D)
    rev = ch[::-1]
    for i, kind in enumerate(c["up_block_types"]):  # L + 1 resnets on [x, skip]
        out, prev, below = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, levels - 1)]
        n += _resnet(prev + out, out, T) + (L - 1) * _resnet(2 * out, out, T) + _resnet(out + below, out, T)
        n += (L + 1) * _transformer(out, D) if "CrossAttn" in kind else 0
        n += _conv(out, out) if i < levels - 1 else 0
    return n + _norm(ch[0]) + _conv(ch[0], c["out_channels"])


def _vae(c):
    ch, L, lat = list(c["block_out_channels"]), c["layers_per_block"], c["latent_channels"]
    last = len(ch) - 1
    mid = 2 * _resnet(ch[-1], ch[-1]) + (_norm(ch[-1]) + 4 * _linear(ch[-1], ch[-1])
                                         if c["mid_block_add_attention"] else 0)
    encoder = _conv(c["in_channels"], ch[0]) + mid + _norm(ch[-1]) + _conv(ch[-1], 2 * lat)
    for i in range(len(ch)):
        encoder += _resnet(ch[max(i - 1, 0)], ch[i]) + (L - 1) * _resnet(ch[i], ch[i])
        encoder += _conv(ch[i], ch[i]) if i < last else 0
    rev = ch[::-1]
    decoder = _conv(lat, rev[0]) + mid + _norm(ch[0]) + _conv(ch[0], c["out_channels"])
    for i in range(len(rev)):
        decoder += _resnet(rev[max(i - 1, 0)], rev[i]) + L * _resnet(rev[i], rev[i])
        decoder += _conv(rev[i], rev[i]) if i < last else 0
    quant = (_conv(2 * lat, 2 * lat, 1) if c["use_quant_conv"] else 0) + \
        (_conv(lat, lat, 1) if c["use_post_quant_conv"] else 0)
    return encoder + decoder + quant


def _text(c):
    h = c["hidden_size"]
    return (c["vocab_size"] + c["max_position_embeddings"]) * h + _clip_layers(c) + _norm(h)


def _vision(c):
    h, patches = c["hidden_size"], (c["image_size"] // c["patch_size"]) ** 2
    embeddings = h + _conv(c["num_channels"], h, c["patch_size"], bias=False) + (patches + 1) * h
    return embeddings + 2 * _norm(h) + _clip_layers(c)


def _clip(c):
    text, vision = c["text_config"], c["vision_config"]
    projections = _linear(vision["hidden_size"], c["projection_dim"], bias=False) + \
        _linear(text["hidden_size"], c["projection_dim"], bias=False)
    return _text(text) + _vision(vision) + projections + 1  # + logit_scale


_COUNTS = {"UNet2DConditionModel": _unet, "AutoencoderKL": _vae, "CLIPTextModel": _text, "CLIPModel": _clip}


def parameter_count(cls_name: str, config: Mapping) -> int:
    """The number of weights the model ``config`` describes (every constructor argument given,
    as in ``model.config``), without building it: equal to ``model.num_parameters()``."""
    return _COUNTS[cls_name](config)


def _memory_bytes() -> int:
    """This machine's memory (2**40 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2 ** 40


def _check_size(cls_name: str, values: Mapping) -> None:
    """Refuse a model whose float32 weights alone would not fit in memory (SD v1.5's UNet: 860M
    parameters, 3.4 GB), before the constructor spends hours or a MemoryError trying."""
    n, memory = parameter_count(cls_name, values), _memory_bytes()
    if 4 * n > memory:
        sizes = ", ".join(f"{k}={values[k]!r}" for k in _SIZE_KEYS[cls_name])
        raise ValueError(f"{cls_name}: the config describes a model of {n:,} parameters ({4 * n / 2 ** 30:,.1f} GiB "
                         f"as float32), more than this machine's memory ({memory / 2 ** 30:,.1f} GiB); "
                         f"check its sizes: {sizes}")


# =====================================================================================
# The classes' shared part
# =====================================================================================


class Pretrained:
    """diffusers' two methods for checkpoints, as thin calls into minisd.io; and the config check.

    Defining a model class registers it with minisd.io (io.MODEL_CLASSES), which builds a
    model by the class name a config.json holds: io imports no model.

    Each model class (UNet2DConditionModel, ...) derives from it, and its constructor runs
    check_values on all its arguments, defaults included, before building anything: the
    subclass's __init__ is wrapped when the class is defined (__init_subclass__), so a model
    built in Python and one built from a config.json are checked alike.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _checked(cls.__name__, cls.__init__)
        if Pretrained in cls.__bases__:  # a model class of its own (not a subclass of one): io saves and loads it
            cls.required_config_keys = REQUIRED_KEYS.get(cls.__name__, ())
            io.register_model(cls)

    def save_pretrained(self, folder, dtype=None):
        return io.save_pretrained(self, folder, dtype)

    @classmethod
    def from_pretrained(cls, folder, dtype="float32"):
        return io.load_pretrained(folder, cls, dtype)


def _checked(cls_name: str, init):
    """``init``, calling check_values(cls_name, its named arguments) first."""
    signature = inspect.signature(init)
    named = [name for name, p in signature.parameters.items()
             if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        check_values(cls_name, {name: bound.arguments[name] for name in named})
        init(self, *args, **kwargs)

    return __init__
