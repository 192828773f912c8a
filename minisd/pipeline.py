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
ignores the prompt. Many images are sampled N at a time (N <= batch_size, at most 16),
the loop above once per batch, so memory stays one batch's whatever the number asked for. The pipeline calls the scheduler; the scheduler knows nothing of the
UNet (as in diffusers), so DDIM, DDPM and Euler are interchangeable here.

Sizes, SD v1.5 against minisd's shapes model:
    text c           (77, 768)          here (77, 64)
    latents z_t      (4, 64, 64)        here (4, 8, 8)
    image            (3, 512, 512)      here (3, 32, 32)
    steps            50, w = 7.5        here 50, w = 5
"""

from __future__ import annotations

import glob
import json
import math
import numbers
import os
import warnings
from contextlib import nullcontext

import numpy as np

from minisd.backend import get_backend, to_numpy
from minisd.tensor import Tensor, no_grad

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
SCHEDULER_NAMES = ("ddim", "ddpm", "euler")
# Images sampled at once: at most MAX_BATCH, fewer where a batch's activations would pass
# MEMORY_BUDGET (estimate_batch_size). The shipped model takes 16 (about 1 MB an image).
MAX_BATCH = 16
MEMORY_BUDGET = 2 ** 30
ACTIVATION_MAPS = 16  # feature maps of the widest size alive at once: a 3x3 conv's 9 columns, skips, norms


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _positive_int(name: str, value) -> int:
    # bool is an int to Python; steps=True is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_prompts(prompt) -> list[str]:
    """The prompt(s) as a list of strings, or one clear error naming what is wrong.

    TypeError for something that is not text (None, a number); ValueError for no prompt at
    all and for a string that is not valid Unicode text: a lone surrogate such as '\udcff',
    which is what Python makes of a byte on the command line that is not UTF-8.
    """
    if isinstance(prompt, str):
        prompts = [prompt]
    else:
        try:
            prompts = list(prompt)
        except TypeError:
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}") from None
    if not prompts:
        raise ValueError("prompt must be a string or a non-empty list of strings, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt must be a string or a list of strings; prompt {i} is {type(p).__name__} {p!r}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt {i} {p!r} is not valid text: {p[e.start:e.end]!r} at position {e.start} is "
                             "not a character (a byte that is not UTF-8?)") from None
    return prompts


def estimate_batch_size(unet_config: dict, vae_config: dict, guided: bool = True,
                        budget: int = MEMORY_BUDGET) -> int:
    """Images to sample at once: MAX_BATCH, or fewer where their activations would pass ``budget`` bytes.

    A rough count, in float32: about ACTIVATION_MAPS copies of the widest activation are
    alive at once. The UNet's widest is block_out_channels[i] x (h / 2^i) x (w / 2^i) at
    level i (latents h x w, two rows an image with guidance); the VAE decoder's is
    block_out_channels[i] x (S / 2^i)^2 (S the image size). SD v1.5: the decoder's
    128 x 512 x 512, 2.1 GB an image, so one at a time; the shipped model: 1 MB an image, 16.
    """
    h = int(unet_config["sample_size"])
    unet = max(int(c) * (h >> i) ** 2 for i, c in enumerate(unet_config["block_out_channels"]))
    size = int(vae_config["sample_size"])
    vae = max(int(c) * (size >> i) ** 2 for i, c in enumerate(vae_config["block_out_channels"]))
    per_image = 4 * ACTIVATION_MAPS * max((2 if guided else 1) * unet, vae)
    return int(min(MAX_BATCH, max(1, budget // per_image)))


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """The words of a prompt as the tokenizer cuts them (CLIP's rule: lower-cased runs of
    letters, single digits, runs of other signs): "A red circle." -> ["a", "red", "circle", "."].
    Each word's last BPE piece ends in "</w>"; the pieces are byte symbols, mapped back to text."""
    from minisd.tokenizer import END_OF_WORD, bytes_to_symbols

    to_byte = {symbol: b for b, symbol in bytes_to_symbols().items()}
    words, pieces = [], ""
    for token in tokenizer.tokenize(prompt):
        pieces += token.removesuffix(END_OF_WORD)
        if token.endswith(END_OF_WORD):
            words.append(bytes(to_byte.get(c, ord("?")) for c in pieces).decode("utf-8", "replace"))
            pieces = ""
    return words


def _train_dataset(path: str) -> str | None:
    """The dataset `minisd train` trained the folder's model on (its logs/train_*.json say),
    or None where no log says or the logs disagree."""
    names = set()
    for log in glob.glob(os.path.join(path, "logs", "train_*.json")):
        try:
            with open(log) as f:
                names.add(json.load(f).get("dataset"))
        except (OSError, ValueError, AttributeError):
            names.add(None)
    return names.pop() if len(names) == 1 else None


def caption_vocabulary(path: str | None, tokenizer) -> frozenset | None:
    """The words of the captions the model at ``path`` was trained on, or None where that is
    not known: a folder that `minisd train` did not write (no logs: an exported or a
    downloaded model), or a dataset whose captions are not known without its files
    (emoji: they are the names of the glyphs in the font it was drawn from)."""
    if path is None or _train_dataset(path) != "shapes":
        return None
    from minisd.data import shapes

    captions = [shapes.ShapeRecord(*c).caption for c in shapes.combinations("train")]
    return frozenset(w for c in captions for w in prompt_words(tokenizer, c))


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on every platform
        return None


class StableDiffusionPipeline:
    """tokenizer + text_encoder + unet + scheduler + vae; ``pipe(prompts)`` -> uint8 images (N, H, W, 3)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, path: str | None = None):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.scheduler = unet, scheduler
        self.path = path
        self.attention_maps = None
        # the words of the training captions, where the folder says (None: no warning of unknown words)
        self.known_words = caption_vocabulary(path, tokenizer)
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

    def default_batch_size(self, guided: bool = True) -> int:
        """Images sampled at once unless batch_size says: estimate_batch_size for this model."""
        return estimate_batch_size(self.unet.config, self.vae.config, guided)

    def encode_prompt(self, prompts: list[str]):
        """c = text_encoder(tokenizer(prompts)): (N, 77, hidden), the UNet's cross-attention context."""
        with no_grad():
            return self.text_encoder(self.tokenizer(prompts)).data

    def unknown_words(self, prompts: list[str]) -> list[str]:
        """Words of the prompts that no training caption has, in order of first use ([] where
        the training captions are not known)."""
        if self.known_words is None:
            return []
        words = (w for p in prompts for w in prompt_words(self.tokenizer, p))
        return list(dict.fromkeys(w for w in words if w not in self.known_words))

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
                 num_images_per_prompt: int = 1, collect_attention: bool = False, output: str = "uint8",
                 batch_size: int | None = None):
        """Generate one image per prompt (times num_images_per_prompt): prompt 0's images first.

        prompt      a string or a list of strings ("" is the unconditional prompt)
        steps       number of denoising steps (> 0)
        guidance_scale  w >= 0 in eps = eps_u + w (eps_c - eps_u)
        seed        seeds the initial noise z_T (and DDPM's per-step noise): an integer >= 0,
                    None (fresh noise) or a numpy Generator, drawn from where it stands
        latents     optional z_T (N, 4, h, w) instead of the seeded draw
        callback    callback(step, t, latents, noise_pred, pred_x0), arrays, after every step
                    of every batch (the batch's rows; step counts from 0 in each batch)
        scheduler   "ddim" (the model's default), "ddpm" or "euler"
        num_images_per_prompt  images for each prompt, each from its own noise
        collect_attention  keep the cross-attention probabilities of the conditional branch in
                    ``self.attention_maps``: {layer: (steps, N, heads, h*w, 77)}
        output      "uint8" (N, H, W, 3) images, or "latent" (the final z_0)
        batch_size  images through the UNet and the VAE at once (default: default_batch_size(),
                    at most MAX_BATCH); only the N results are kept, so memory is one
                    batch's plus the results. z_T is drawn batch after batch from one
                    generator, the same numbers as one draw for all N, so with DDIM and
                    Euler the images do not depend on batch_size (up to float rounding:
                    a product over more rows may round differently). DDPM draws fresh noise
                    at every step of a batch, so its images depend on batch_size once N is
                    larger than one batch.

        Warns once per call about prompts longer than 77 tokens (truncated) and, where the
        training captions are known (``known_words``), about words the model never saw.
        """
        run = self._batches(prompt, steps, guidance_scale, seed, latents, callback, scheduler,
                            num_images_per_prompt, collect_attention, output, batch_size, returned=True)
        outputs, maps = [], []
        for out, batch_maps in run:
            outputs.append(out)
            maps.append(batch_maps)
        self.attention_maps = ({name: np.concatenate([m[name] for m in maps], axis=1) for name in maps[0]}
                               if collect_attention else None)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def iter_batches(self, prompt, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                     seed: int | None = 0, latents=None, callback=None, scheduler: str | None = None,
                     num_images_per_prompt: int = 1, output: str = "uint8", batch_size: int | None = None):
        """The images of ``pipe(...)`` with the same arguments, batch by batch as each is done:
        an iterator of arrays of at most batch_size images (memory: one batch). The arguments
        are checked, and the warnings given, at this call, before any sampling."""
        run = self._batches(prompt, steps, guidance_scale, seed, latents, callback, scheduler,
                            num_images_per_prompt, False, output, batch_size)
        return (out for out, _ in run)

    def _batches(self, prompt, steps, guidance_scale, seed, latents, callback, scheduler, num_images_per_prompt,
                 collect_attention, output, batch_size, returned: bool = False):
        """Check every argument, tokenize and warn now; return the generator of (output, maps) per batch.
        returned: the caller keeps all N results (refuse where they cannot fit in memory)."""
        prompts = check_prompts(prompt)
        steps = _positive_int("steps", steps)
        if (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
                or not math.isfinite(guidance_scale) or guidance_scale < 0):
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
        if output not in ("uint8", "latent"):
            raise ValueError(f"output must be 'uint8' or 'latent', got {output!r}")
        if not (seed is None or isinstance(seed, np.random.Generator)
                or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0)):
            raise ValueError(f"seed must be an integer >= 0, None or a numpy Generator, got {seed!r}")
        guided = guidance_scale != 1.0  # w = 1 is plain conditional sampling: no unconditional half
        batch = self.default_batch_size(guided) if batch_size is None else _positive_int("batch_size", batch_size)
        self.make_scheduler(scheduler).set_timesteps(steps)  # an unknown name or too many steps: now
        n = len(prompts) * per_prompt
        shape = (n, *self.latent_shape)
        if latents is not None:
            latents = np.asarray(to_numpy(_array(latents)), dtype=np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape}, got {latents.shape}")
            if not np.isfinite(latents).all():
                raise ValueError(f"latents must be finite; {int((~np.isfinite(latents)).sum())} of their "
                                 f"{latents.size} values are NaN or inf")
        if returned:
            per_image = 4 * math.prod(shape[1:]) if output == "latent" else 3 * int(self.vae.config["sample_size"]) ** 2
            memory = _physical_memory()
            if memory is not None and n * per_image > memory:
                raise ValueError(f"{n:,} images take {n * per_image / 2 ** 30:,.1f} GiB to return, more than this "
                                 f"machine's {memory / 2 ** 30:,.1f} GiB of memory; take them batch by batch "
                                 "with pipe.iter_batches(...)")
        ids = self.tokenizer(prompts)  # one row per prompt: a too-long prompt is said once
        unknown = self.unknown_words(prompts)
        if unknown:
            warnings.warn(f"the model never saw {', '.join(map(repr, unknown))} in its training captions, so the "
                          "image will not follow them; it knows " + ", ".join(sorted(self.known_words)), stacklevel=3)
        return self._sample(ids, per_prompt, n, steps, float(guidance_scale), np.random.default_rng(seed),
                            latents, callback, scheduler, collect_attention, output, batch)

    def _sample(self, ids, per_prompt, n, steps, guidance_scale, rng, latents, callback, scheduler,
                collect_attention, output, batch):
        """Sample images start .. start + batch for each batch in turn: the loop of the module docstring."""
        from minisd.models.blocks import record_attention

        backend = get_backend()
        guided = guidance_scale != 1.0
        uncond = self.encode_prompt([""]) if guided else None
        for start in range(0, n, batch):
            rows = np.arange(start, min(start + batch, n))
            sched = self.make_scheduler(scheduler)  # a fresh one: Euler counts its steps
            sched.set_timesteps(steps)
            if latents is None:
                z = rng.standard_normal((len(rows), *self.latent_shape)).astype(np.float32)
            else:
                z = latents[rows]
            z = backend.asarray(z * np.float32(sched.init_noise_sigma))
            with no_grad():
                cond = self.text_encoder(ids[rows // per_prompt]).data
            context = backend.xp.concatenate([backend.xp.broadcast_to(uncond, cond.shape), cond]) if guided else cond
            m = len(rows)
            maps = {}
            with no_grad(), (record_attention(self.unet, "attn2") if collect_attention else nullcontext()) as recorded:
                for i, t in enumerate(sched.timesteps):
                    z_in = sched.scale_model_input(z, t)
                    if guided:
                        eps = self.unet(backend.xp.concatenate([z_in, z_in]), int(t), context).data
                        eps_u, eps_c = eps[:m], eps[m:]
                        eps = eps_u + np.float32(guidance_scale) * (eps_c - eps_u)
                    else:
                        eps = self.unet(z_in, int(t), context).data
                    out = sched.step(eps, int(t), z, generator=rng)  # DDPM draws its noise from the seeded rng
                    z, x0 = out.prev_sample, out.pred_original_sample
                    if callback is not None:
                        callback(i, int(t), z, eps, x0)
                if collect_attention:
                    for name, arrays in recorded.items():
                        # keep the conditional half of each guided batch
                        maps[name] = np.stack([a[m:] if guided else a for a in arrays])
            yield (to_numpy(z) if output == "latent" else self.decode_latents(z)), maps


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


def prepare_out_dir(out: str) -> None:
    """Create an output folder (generate's and eval's --out), or fail now, before any work,
    with one line if it cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OSError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} is not writable")


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
