"""Model configs: the constructor's arguments, by diffusers' and transformers' names, kept as a dict.

A diffusers model is rebuilt from its config.json by calling the class with the JSON's
keys as keyword arguments. minisd's models work the same way, so a config written by
diffusers builds a minisd model and the other way round. Real configs carry keys for
features minisd leaves out (class embeddings, SDXL's added conditions, ...); such a key
is accepted only at the value that switches the feature off (diffusers' default), and
any other value is a clear error rather than a silently different model.
"""

from __future__ import annotations

from typing import Any

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


def as_json(config: dict[str, Any]) -> dict[str, Any]:
    """The config with tuples as lists, ready for json.dump."""
    return {k: _normalise(v) for k, v in config.items()}


class Pretrained:
    """diffusers' two methods for checkpoints, as thin calls into minisd.io."""

    def save_pretrained(self, folder, dtype=None):
        from minisd.io import save_pretrained

        return save_pretrained(self, folder, dtype)

    @classmethod
    def from_pretrained(cls, folder, dtype="float32"):
        from minisd.io import load_pretrained

        return load_pretrained(folder, cls, dtype)
