"""Text to image: the Stable Diffusion sampling loop, wiring the trained parts together.

    prompt --tokenizer--> ids (N, 77) --text encoder--> c (N, 77, hidden)
    z_T ~ N(0, I) (N, 4, h, w)
    for t in the scheduler's timesteps (50 of the 1000, DDIM by default):
        eps_u = eps_theta(z_t, t, c_empty)          the empty prompt: "no caption"
        eps_c = eps_theta(z_t, t, c)
        eps   = eps_u + w (eps_c - eps_u)           classifier-free guidance, w = guidance_scale
        z_{t_prev}, x0_hat = scheduler.step(eps, t, z_t)
    image = D(z_0 / scaling_factor)  -> uint8 (N, H, W, 3)

The two UNet evaluations of a step run as one batch of 2N (Ho & Salimans 2022). With
w = 1 guidance is plain conditional sampling and the unconditional half is skipped; w = 0
ignores the prompt. The pipeline calls the scheduler; the scheduler knows nothing of the
UNet (as in diffusers), so DDIM, DDPM and Euler are interchangeable here.

Sizes, SD v1.5 against minisd's shapes model:
    text c           (77, 768)          here (77, 64)
    latents z_t      (4, 64, 64)        here (4, 8, 8)
    image            (3, 512, 512)      here (3, 32, 32)
    steps            50, w = 7.5        here 50, w = 5
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from minisd.backend import get_backend, to_numpy
from minisd.tensor import Tensor, no_grad

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
SCHEDULER_NAMES = ("ddim", "ddpm", "euler")


def _array(x):
    return x.data if isinstance(x, Tensor) else x


class StableDiffusionPipeline:
    """tokenizer + text_encoder + unet + scheduler + vae; ``pipe(prompts)`` -> uint8 images (N, H, W, 3)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, path: str | None = None):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.scheduler = unet, scheduler
        self.path = path
        self.attention_maps = None
        for m in (vae, text_encoder, unet):
            m.eval()

    @classmethod
    def from_pretrained(cls, path: str) -> StableDiffusionPipeline:
        """Load a model folder in diffusers' layout (model_index.json, vae/, text_encoder/, tokenizer/, unet/, scheduler/)."""
        from minisd import io
        from minisd.models.clip import CLIPTextModel
        from minisd.models.unet import UNet2DConditionModel
        from minisd.models.vae import AutoencoderKL
        from minisd.schedulers import SCHEDULERS, load_scheduler
        from minisd.tokenizer import Tokenizer

        check_model_folder(path)
        parts = {}
        for name, cls_ in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel)):
            try:
                parts[name] = io.load_pretrained(os.path.join(path, name), cls_)
            except (OSError, ValueError, KeyError, TypeError) as e:
                message = e.args[0] if e.args else str(e)
                raise ValueError(f"cannot load {name} from {os.path.join(path, name)}: {message}") from None
        tokenizer = Tokenizer.from_folder(os.path.join(path, "tokenizer"))
        config_class = _read_json(os.path.join(path, "scheduler", "scheduler_config.json")).get("_class_name")
        known = {c.__name__ for c in SCHEDULERS.values()}
        # SD v1.5 ships a PNDMScheduler config; its schedule keys serve DDIM as well.
        scheduler = load_scheduler(os.path.join(path, "scheduler"), None if config_class in known else "ddim")
        return cls(parts["vae"], parts["text_encoder"], tokenizer, parts["unet"], scheduler, path=path)

    # ---- the pieces of one call ----------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, h, w) of z: the VAE's image size divided by its downsampling factor."""
        c = self.vae.config
        size = int(c["sample_size"]) // self.vae.downsample_factor
        return int(c["latent_channels"]), size, size

    def encode_prompt(self, prompts: list[str]):
        """c = text_encoder(tokenizer(prompts)): (N, 77, hidden), the UNet's cross-attention context."""
        with no_grad():
            return self.text_encoder(self.tokenizer(prompts)).data

    def make_scheduler(self, name: str | None):
        """A fresh scheduler of the named kind with the model's schedule (beta_t, T)."""
        if name is None:
            return type(self.scheduler).from_config(self.scheduler.config)
        from minisd.schedulers import get_scheduler_class

        if str(name).lower() not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        return get_scheduler_class(name).from_config(self.scheduler.config)

    def decode_latents(self, latents) -> np.ndarray:
        """x = D(z / scaling_factor), from [-1, 1] to uint8 (N, H, W, 3)."""
        with no_grad():
            x = self.vae.decode(latents / float(self.vae.config["scaling_factor"])).numpy()
        return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    # ---- the sampling loop -----------------------------------------------------------------

    def __call__(self, prompt, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 seed: int | None = 0, latents=None, callback=None, scheduler: str | None = None,
                 num_images_per_prompt: int = 1, collect_attention: bool = False, output: str = "uint8"):
        """Generate one image per prompt (times num_images_per_prompt).

        prompt      a string or a list of strings ("" is the unconditional prompt)
        steps       number of denoising steps (> 0)
        guidance_scale  w >= 0 in eps = eps_u + w (eps_c - eps_u)
        seed        seeds the initial noise z_T (and DDPM's per-step noise)
        latents     optional z_T (N, 4, h, w) instead of the seeded draw
        callback    callback(step, t, latents, noise_pred, pred_x0), arrays, after every step
        scheduler   "ddim" (the model's default), "ddpm" or "euler"
        collect_attention  keep the cross-attention probabilities of the conditional branch in
                    ``self.attention_maps``: {layer: (steps, N, heads, h*w, 77)}
        output      "uint8" (N, H, W, 3) images, or "latent" (the final z_0)
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt <= 0:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output not in ("uint8", "latent"):
            raise ValueError(f"output must be 'uint8' or 'latent', got {output!r}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(int(steps))
        backend = get_backend()
        rng = np.random.default_rng(seed)

        shape = (n, *self.latent_shape)
        if latents is None:
            z = rng.standard_normal(shape).astype(np.float32)
        else:
            z = np.asarray(to_numpy(_array(latents)), dtype=np.float32)
            if z.shape != shape:
                raise ValueError(f"latents must have shape {shape}, got {z.shape}")
        z = backend.asarray(z * np.float32(sched.init_noise_sigma))

        guided = guidance_scale != 1.0  # w = 1 is plain conditional sampling: no unconditional half
        cond = self.encode_prompt(prompts)
        if guided:
            uncond = self.encode_prompt([""])
            context = backend.xp.concatenate([backend.xp.broadcast_to(uncond, cond.shape), cond])
        else:
            context = cond

        from minisd.models.blocks import record_attention

        maps = {}
        with no_grad(), (record_attention(self.unet, "attn2") if collect_attention else _nothing()) as recorded:
            for i, t in enumerate(sched.timesteps):
                z_in = sched.scale_model_input(z, t)
                if guided:
                    eps = self.unet(backend.xp.concatenate([z_in, z_in]), int(t), context).data
                    eps_u, eps_c = eps[:n], eps[n:]
                    eps = eps_u + np.float32(guidance_scale) * (eps_c - eps_u)
                else:
                    eps = self.unet(z_in, int(t), context).data
                out = sched.step(eps, int(t), z, generator=rng) if _takes_generator(sched) else sched.step(eps, int(t), z)
                z, x0 = out.prev_sample, out.pred_original_sample
                if callback is not None:
                    callback(i, int(t), z, eps, x0)
            if collect_attention:
                for name, arrays in recorded.items():
                    # keep the conditional half of each guided batch
                    maps[name] = np.stack([a[n:] if guided else a for a in arrays])
        self.attention_maps = maps if collect_attention else None
        if output == "latent":
            return to_numpy(z)
        return self.decode_latents(z)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _takes_generator(scheduler) -> bool:
    """DDPM draws fresh noise each step; pass it the pipeline's generator so a seed fixes everything."""
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def check_model_folder(path: str) -> None:
    """A clear error for a path that is not a model folder (nothing is ever downloaded)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path!r}: not a local folder (minisd downloads nothing; "
                                "give the path of a model folder)")
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file, not a model folder")
    missing = [p for p in ("model_index.json", "vae", "text_encoder", "tokenizer", "unet", "scheduler")
               if not os.path.exists(os.path.join(path, p))]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete model folder: missing {', '.join(missing)}")
    _read_json(os.path.join(path, "model_index.json"))


def load_pipeline(path: str | None = None) -> StableDiffusionPipeline:
    """The shipped shapes model (minisd/weights/shapes), or the model folder at ``path``."""
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL if path is None else os.fspath(path))


def token_attention(maps: dict, tokenizer, prompt: str, latent_hw: tuple[int, int]) -> dict:
    """Per word of ``prompt``: its cross-attention over the latent grid, averaged over layers of
    the finest resolution and over heads, per step: {word: (steps, h, w)} for the first image."""
    h, w = latent_hw
    words = tokenizer.tokenize(prompt)
    fine = [a for a in maps.values() if a.shape[3] == h * w]
    if not fine:
        return {}
    probs = np.mean([a[:, 0].mean(axis=1) for a in fine], axis=0)  # (steps, h*w, 77)
    return {f"{i}:{word}": probs[:, :, 1 + i].reshape(-1, h, w) for i, word in enumerate(words)}
