"""Text to image, image to image and inpainting: the Stable Diffusion sampling loop, wiring the parts together.

    prompt --tokenizer--> ids (N, 77) --text encoder--> c (N, 77, hidden)
    negative prompt (the empty prompt "" unless given) --> c_neg, the same way
    z_T ~ N(0, I) (N, 4, h, w), scaled by the scheduler's init_noise_sigma
    for t in the scheduler's timesteps (50 of the 1000, DDIM by default):
        eps_u = eps_theta(z_t, t, c_neg)            "no caption", or what the image should not be
        eps_c = eps_theta(z_t, t, c)
        eps   = eps_u + w (eps_c - eps_u)           classifier-free guidance, w = guidance_scale
        z_{t_prev}, x0_hat = scheduler.step(eps, t, z_t)
    image = D(z_0 / scaling_factor)  -> uint8 (N, H, W, 3)

The two UNet evaluations of a step run as one batch of 2N (Ho & Salimans 2022). With
w = 1 guidance is plain conditional sampling and the unconditional half is skipped; w = 0
ignores the prompt. (diffusers guides only for w > 1; minisd also for 0 <= w < 1, where
it interpolates.) guidance_rescale (Lin et al. 2023, "Common diffusion noise schedules
and sample steps are flawed", eq. 15-16) pulls the guided eps back to eps_c's standard
deviation, which large w inflates. Many images are sampled N at a time (N <= batch_size,
at most 16), the loop above once per batch, so memory stays one batch's whatever the
number asked for. The pipeline calls the scheduler; the scheduler knows nothing of the
UNet (as in diffusers), so every scheduler of minisd/schedulers.py is interchangeable
here (``SCHEDULER_NAMES``), and a model folder samples with the one its
scheduler_config.json names.

Image to image (SDEdit, Meng et al. 2021, "SDEdit: guided image synthesis and editing
with stochastic differential equations"): encode the image, z_0 = scaling_factor * E(x),
noise it in one jump to the timestep t_s that ``strength`` picks (the forward process
of lesson 3: z_{t_s} = sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) epsilon), and run the
loop above from t_s down. strength 1 starts from pure noise (text to image), strength 0
runs no step (the image through the VAE); in between, the layout survives and the
details follow the prompt. The steps run are the last ``int(steps * strength)`` of the
schedule, exactly as diffusers' StableDiffusionImg2ImgPipeline chooses them.

Inpainting (white in ``mask_image`` is repainted): the same loop, and after every step
the known part of the latent is put back: z = (1 - m) * noised(z_0, t_next) + m * z, with
m the mask at latent resolution and z_0 the image's latent noised to the timestep the
loop has reached (RePaint's idea, Lugmayr et al. 2022, as diffusers' inpainting pipeline
does it for any model). A model trained for inpainting instead (SD's "inpainting"
checkpoints: UNet in_channels 9) sees the mask and the latent of the masked image beside
z_t at every step: UNet([z_t, m, E(x * (1 - m))]).

Sizes, SD v1.5 against minisd's shapes model:
    text c           (77, 768)          here (77, 64)
    latents z_t      (4, 64, 64)        here (4, 8, 8)
    image            (3, 512, 512)      here (3, 32, 32)
    steps            50, w = 7.5        here 50, w = 5
The image size is the UNet's sample_size times the VAE's downsampling factor
2^(levels - 1) unless height / width say otherwise (SD: 64 x 8 = 512; here 8 x 4 = 32).
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import numbers
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from minisd.backends import get_backend, to_numpy
from minisd.data.images import to_model_input, to_uint8
from minisd.tensor import Tensor, no_grad

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
# img2img's and inpainting's default strengths: diffusers' (StableDiffusionImg2ImgPipeline and
# StableDiffusionInpaintPipeline)
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
# Images sampled at once: at most MAX_BATCH, fewer where a batch's activations would pass
# MEMORY_BUDGET (estimate_batch_size). The shipped model takes 16 (about 1 MB an image).
MAX_BATCH = 16
MEMORY_BUDGET = 2 ** 30
ACTIVATION_MAPS = 16  # feature maps of the widest size alive at once: a 3x3 conv's 9 columns, skips, norms


def scheduler_names() -> tuple[str, ...]:
    """The short scheduler names the pipeline takes: every scheduler of minisd/schedulers.py
    (``SCHEDULERS``: "ddim", "pndm", "dpm++2m", "euler_a", ...). Class names
    ("PNDMScheduler") are taken as well."""
    from minisd.schedulers import SCHEDULERS

    return tuple(SCHEDULERS)


SCHEDULER_NAMES = scheduler_names()


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _positive_int(name: str, value) -> int:
    # bool is an int to Python; steps=True is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _number(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    """A real number in [low, high] (not a bool, not NaN), or a ValueError naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not low <= value <= high):
        where = f"a number >= {low:g}" if high == math.inf else f"a number from {low:g} to {high:g}"
        raise ValueError(f"{name} must be {where}, got {value!r}")
    return float(value)


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """The prompt(s) as a list of strings, or one clear error naming what is wrong.

    TypeError for something that is not text (None, a number); ValueError for no prompt at
    all and for a string that is not valid Unicode text: a lone surrogate such as '\\udcff',
    which is what Python makes of a byte on the command line that is not UTF-8. ``name``
    is the argument's name in the messages (prompt, negative_prompt).
    """
    if isinstance(prompt, str):
        prompts = [prompt]
    else:
        try:
            prompts = list(prompt)
        except TypeError:
            raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}") from None
    if not prompts:
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a string or a list of strings; {name} {i} is {type(p).__name__} {p!r}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} {i} {p!r} is not valid text: {p[e.start:e.end]!r} at position {e.start} is "
                             "not a character (a byte that is not UTF-8?)") from None
    return prompts


def estimate_batch_size(unet_config: dict, vae_config: dict, guided: bool = True,
                        budget: int = MEMORY_BUDGET, size: tuple[int, int] | None = None) -> int:
    """Images to sample at once: MAX_BATCH, or fewer where their activations would pass ``budget`` bytes.

    A rough count, in float32: about ACTIVATION_MAPS copies of the widest activation are
    alive at once. The UNet's widest is block_out_channels[i] x (h / 2^i) x (w / 2^i) at
    level i (latents h x w, two rows an image with guidance); the VAE decoder's is
    block_out_channels[i] x (H / 2^i) x (W / 2^i) (images H x W: ``size``, by default the
    VAE's and the UNet's sample_size). SD v1.5: the decoder's 128 x 512 x 512, 2.1 GB an
    image, so one at a time; the shipped model: 1 MB an image, 16.
    """
    vae_channels = vae_config["block_out_channels"]
    if size is None:
        H = W = int(vae_config["sample_size"])
        h = w = int(unet_config["sample_size"])
    else:
        H, W = size
        h, w = H >> (len(vae_channels) - 1), W >> (len(vae_channels) - 1)
    unet = max(int(c) * (h >> i) * (w >> i) for i, c in enumerate(unet_config["block_out_channels"]))
    vae = max(int(c) * (H >> i) * (W >> i) for i, c in enumerate(vae_channels))
    per_image = 4 * ACTIVATION_MAPS * max((2 if guided else 1) * unet, vae)
    return int(min(MAX_BATCH, max(1, budget // per_image)))


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale: float):
    """Lin et al. 2023 (eq. 15-16; diffusers' rescale_noise_cfg): the guided eps rescaled to
    the standard deviation of the conditional one, mixed back with weight phi:

        eps_rescaled = eps_cfg * std(eps_c) / std(eps_cfg)
        eps          = phi * eps_rescaled + (1 - phi) * eps_cfg,    phi = guidance_rescale

    std over each image's (C, H, W), with torch's default Bessel correction (n - 1). Large
    w blows eps_cfg up past anything the model saw in training (overexposed images);
    the paper uses phi = 0.7.
    """
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    phi = np.float32(guidance_rescale)
    return phi * (noise_cfg * (std_text / std_cfg)) + (np.float32(1) - phi) * noise_cfg


def load_image(image, what: str = "image") -> np.ndarray:
    """An image argument as uint8 (N, H, W, 3): a path, a PIL image, a uint8 array (H, W, 3)
    or (N, H, W, 3), or a list of PIL images or (H, W, 3) arrays of one size. PIL images and
    files are converted to RGB (an alpha channel is dropped). ValueError naming ``what``."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))[None]
        except FileNotFoundError:
            raise ValueError(f"{what}: no file {os.fspath(image)!r}") from None
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{what}: cannot read {os.fspath(image)!r} as an image ({e})") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))[None]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{what} is an empty list")
        parts = [load_image(im, f"{what} {i}") for i, im in enumerate(image)]
        sizes = {p.shape[1:3] for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"{what}: the images differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))})")
        return np.concatenate(parts)
    a = np.asarray(to_numpy(_array(image)))
    if a.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 pixels (0-255), a PIL image or a path; got an array of {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or 0 in a.shape:
        raise ValueError(f"{what} must be an array (H, W, 3) or (N, H, W, 3) of RGB pixels, got shape {a.shape}")
    return a


def load_mask(mask, what: str = "mask_image") -> np.ndarray:
    """A mask argument as float32 (N, 1, H, W) of 0 (keep) and 1 (repaint), as diffusers'
    mask processor binarizes it: grey levels / 255 from 0.5 up are 1. A path, a PIL image
    (converted to grey, "L"), or an array (H, W), (N, H, W), (H, W, 1) or (H, W, 3)
    (N, H, W, 1 or 3) of uint8, or of bool (True: repaint)."""
    from PIL import Image

    if isinstance(mask, (str, os.PathLike, Image.Image)) or (
            isinstance(mask, (list, tuple)) and mask and isinstance(mask[0], (str, os.PathLike, Image.Image))):
        rgb = load_image(mask, what)
        grey = np.stack([np.asarray(Image.fromarray(m).convert("L")) for m in rgb])
    else:
        a = np.asarray(to_numpy(_array(mask)))
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * np.uint8(255)
        if a.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 (0-255) or bool, a PIL image or a path; got an array of {a.dtype}")
        if a.ndim in (3, 4) and a.shape[-1] in (1, 3):  # channels last
            a = a[..., 0] if a.shape[-1] == 1 else np.stack([np.asarray(Image.fromarray(m).convert("L"))
                                                             for m in a.reshape(-1, *a.shape[-3:])])
        grey = a[None] if a.ndim == 2 else a
        if grey.ndim != 3 or 0 in grey.shape:
            raise ValueError(f"{what} must be an array (H, W) or (N, H, W), optionally with 1 or 3 channels "
                             f"last; got shape {np.shape(mask)}")
    return (grey.astype(np.float32) / np.float32(255) >= 0.5).astype(np.float32)[:, None]


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


def _as_number(t):
    """A timestep as a plain Python number for callbacks: int where it is whole (DDIM's),
    float where it is not (Euler's interpolated ones)."""
    t = float(t)
    return int(t) if t.is_integer() else t


@dataclass
class _Plan:
    """One call, its arguments checked: everything the sampling loop needs."""

    n: int                          # images
    per_prompt: int                 # images per prompt: row r belongs to prompt r // per_prompt
    cond: Callable                  # prompt indices -> c (rows, L, hidden)
    uncond: Callable | None         # prompt indices -> c_neg; None: no guidance (w = 1)
    steps: int
    guidance_scale: float
    guidance_rescale: float
    step_kwargs: dict               # eta, where the scheduler takes it
    rng: np.random.Generator
    latents: np.ndarray | None      # epsilon instead of the seeded draw
    callback: Callable | None
    scheduler: Any
    collect_attention: bool
    output: str
    batch: int
    latent_shape: tuple[int, int, int]   # (channels, h, w) of z
    images: np.ndarray | None = None   # uint8 (k, H, W, 3): img2img and inpainting
    masks: np.ndarray | None = None    # float32 (k', 1, H, W), 1 = repaint
    strength: float = 1.0
    nine_channels: bool = False        # an inpainting UNet: [z_t, mask, masked-image latent]


class StableDiffusionPipeline:
    """tokenizer + text_encoder + unet + scheduler + vae; ``pipe(prompts)`` -> uint8 images (N, H, W, 3)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, path: str | None = None,
                 scheduler_config: dict | None = None):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.scheduler = unet, scheduler
        self.path = path
        # The scheduler config as the folder gives it, only the keys it sets: make_scheduler
        # builds every other kind from it, so a key the file leaves out takes each class's own
        # default, as with diffusers' from_config (SD v1.5's file has no timestep_spacing:
        # PNDM and DDIM take "leading", Euler and its kin "linspace").
        self.scheduler_config = dict(scheduler.config if scheduler_config is None else scheduler_config)
        self.attention_maps = None
        # the words of the training captions, where the folder says (None: no warning of unknown words)
        self.known_words = caption_vocabulary(path, tokenizer)
        for m in (vae, text_encoder, unet):
            m.eval()

    @classmethod
    def from_pretrained(cls, path: str) -> StableDiffusionPipeline:
        """Load a model folder in diffusers' layout (model_index.json, vae/, text_encoder/, tokenizer/,
        unet/, scheduler/). The scheduler is the class its scheduler_config.json names
        (_class_name: SD v1.5's PNDMScheduler samples with PNDM); one minisd lacks is an error."""
        from minisd import io
        from minisd.models.clip import CLIPTextModel
        from minisd.models.unet import UNet2DConditionModel
        from minisd.models.vae import AutoencoderKL
        from minisd.schedulers import load_scheduler
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
        config = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))  # missing or not JSON: said so
        try:
            scheduler = load_scheduler(config)
        except ValueError as e:
            raise ValueError(f"cannot load scheduler from {os.path.join(path, 'scheduler')}: {e}") from None
        return cls(parts["vae"], parts["text_encoder"], tokenizer, parts["unet"], scheduler, path=path,
                   scheduler_config=config)

    # ---- sizes -----------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """How much smaller the latents are than the image, each way: 2^(levels - 1) for a VAE
        of len(block_out_channels) levels, as diffusers computes it (SD: 8; here 4)."""
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels when the call gives none: the UNet's sample_size (the
        latent size it was trained at) times vae_scale_factor, as diffusers' pipelines
        choose it. (The VAE's own sample_size does not decide it; it is the fallback for a
        UNet config without one.)"""
        size = self.unet.config.get("sample_size")
        if size is None:
            return (int(self.vae.config["sample_size"]),) * 2
        h, w = (size, size) if isinstance(size, numbers.Integral) else size
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, h, w) of z at the default size: the VAE's latent channels, and the UNet's sample_size."""
        h, w = self.default_size
        return int(self.vae.config["latent_channels"]), h // self.vae_scale_factor, w // self.vae_scale_factor

    def check_size(self, height=None, width=None) -> tuple[int, int]:
        """(height, width) of the images: the default where None; otherwise positive whole
        numbers that the VAE's factor divides (each latent pixel is factor x factor image pixels)."""
        default = self.default_size
        size = []
        for name, value, d in (("height", height, default[0]), ("width", width, default[1])):
            value = d if value is None else _positive_int(name, value)
            if value % self.vae_scale_factor:
                raise ValueError(f"{name} must be a multiple of {self.vae_scale_factor} (the VAE's downsampling "
                                 f"factor: each latent pixel is {self.vae_scale_factor}x{self.vae_scale_factor} "
                                 f"image pixels), got {value}")
            size.append(value)
        return size[0], size[1]

    def default_batch_size(self, guided: bool = True, height: int | None = None, width: int | None = None) -> int:
        """Images sampled at once unless batch_size says: estimate_batch_size for this model and image size."""
        return estimate_batch_size(self.unet.config, self.vae.config, guided, size=self.check_size(height, width))

    # ---- the pieces of one call ----------------------------------------------------------

    def encode_prompt(self, prompts: list[str]):
        """c = text_encoder(tokenizer(prompts)): (N, 77, hidden), the UNet's cross-attention context."""
        with no_grad():
            return self.text_encoder(self.tokenizer(prompts)).data

    def encode_images(self, images, rng: np.random.Generator, batch: int = MAX_BATCH):
        """z_0 = scaling_factor * a sample of q(z | x): images (k, H, W, 3) uint8, or (k, 3, H, W)
        floats in [-1, 1] (``to_model_input``), -> latents (k, 4, h, w).

        A sample, not the mean, as diffusers' img2img and inpainting pipelines take it
        (latent_dist.sample(generator)): its noise comes from ``rng``, ``batch`` images at a
        time (the same numbers as one draw)."""
        x = to_model_input(images) if images.dtype == np.uint8 else images
        scale = np.float32(self.vae.config["scaling_factor"])
        with no_grad():
            return get_backend().xp.concatenate([self.vae.encode(x[i:i + batch]).sample(rng).data * scale
                                                 for i in range(0, len(x), batch)])

    def unknown_words(self, prompts: list[str]) -> list[str]:
        """Words of the prompts that no training caption has, in order of first use ([] where
        the training captions are not known)."""
        if self.known_words is None:
            return []
        words = (w for p in prompts for w in prompt_words(self.tokenizer, p))
        return list(dict.fromkeys(w for w in words if w not in self.known_words))

    def make_scheduler(self, name=None, **config):
        """A fresh scheduler with the model's schedule (beta_t, T): of the folder's class (None), of
        the named kind (a short name, ``SCHEDULER_NAMES``, or a class name such as "PNDMScheduler"),
        or a copy of a scheduler instance (with its own config). ``config`` sets keys on top of
        the folder's, as diffusers' Class.from_config(pipe.scheduler.config, **config) does:
        make_scheduler("dpm++2m", use_karras_sigmas=True) is "DPM++ 2M Karras"."""
        from minisd.schedulers import Scheduler, get_scheduler_class

        if isinstance(name, Scheduler):
            return type(name).from_config({**name.config, **config})
        cls = type(self.scheduler) if name is None else get_scheduler_class(name)
        return cls.from_config({**self.scheduler_config, **config})

    def decode_latents(self, latents) -> np.ndarray:
        """x = D(z / scaling_factor), from [-1, 1] to uint8 (N, H, W, 3)."""
        with no_grad():
            x = self.vae.decode(latents / float(self.vae.config["scaling_factor"])).numpy()
        return to_uint8(x)

    # ---- the sampling loop -----------------------------------------------------------------

    def __call__(self, prompt=None, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 seed: int | None = 0, latents=None, callback=None, scheduler=None,
                 num_images_per_prompt: int = 1, collect_attention: bool = False, output: str = "uint8",
                 batch_size: int | None = None, *, negative_prompt=None, height: int | None = None,
                 width: int | None = None, image=None, mask_image=None, strength: float | None = None,
                 eta: float = 0.0, guidance_rescale: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None):
        """Generate one image per prompt (times num_images_per_prompt): prompt 0's images first.

        prompt      a string or a list of strings ("" is the unconditional prompt)
        steps       number of denoising steps (> 0): diffusers' num_inference_steps
        guidance_scale  w >= 0 in eps = eps_neg + w (eps_c - eps_neg)
        seed        seeds every draw: the VAE's sample of each image (img2img, inpainting),
                    the initial noise z_T, and the per-step noise of DDPM, Euler a and DDIM
                    with eta > 0. An integer >= 0, None (fresh noise) or a numpy Generator,
                    drawn from where it stands
        latents     optional noise epsilon (N, 4, h, w) instead of the seeded draw: z_T itself
                    (times init_noise_sigma) for text to image, the noise added to the
                    image's latent for img2img and inpainting
        callback    callback(step, t, latents, noise_pred, pred_x0), arrays, after every
                    scheduler step of every batch (the batch's rows; step counts from 0 in
                    each batch; inpainting: the latents after the known part is put back)
        scheduler   None (the folder's: its scheduler_config.json's class), a short name
                    (``SCHEDULER_NAMES``: "ddim", "pndm", "dpm++2m", "euler_a", ...), a class
                    name, or a scheduler instance (its config: Karras sigmas and the like)
        num_images_per_prompt  images for each prompt, each from its own noise
        collect_attention  keep the cross-attention probabilities of the conditional branch in
                    ``self.attention_maps``: {layer: (steps, N, heads, h*w, 77)}
        output      "uint8" (N, H, W, 3) images, or "latent" (the final z_0)
        batch_size  images through the UNet and the VAE at once (default: default_batch_size(),
                    at most MAX_BATCH); only the N results are kept, so memory is one
                    batch's plus the results. z_T is drawn batch after batch from one
                    generator, the same numbers as one draw for all N, so with the
                    deterministic schedulers the images do not depend on batch_size (up
                    to float rounding: a product over more rows may round differently).
                    DDPM, Euler a and DDIM with eta > 0 draw fresh noise at every step of
                    a batch, so their images depend on batch_size once N is larger than one batch.

        With diffusers' names and meaning:
        negative_prompt  what the image should not be: a string for every prompt or one per
                    prompt; it takes the unconditional branch's place ("" when absent). No
                    effect at w = 1, where that branch is skipped.
        height, width  the image size in pixels (default: ``default_size``, the UNet's
                    sample_size times vae_scale_factor), multiples of vae_scale_factor
        image       img2img / inpainting: a path, PIL image or uint8 array (H, W, 3) or
                    (N, H, W, 3): one image for every prompt or one per prompt. The images
                    are not resized: they set the size (height / width, if given, must agree).
        strength    in [0, 1], with image: how far into the noise the image is taken. The
                    last int(steps * strength) timesteps are run (diffusers'); 0 returns the
                    image through the VAE, 1 is text to image from fresh noise (with a mask:
                    pure noise too, the known part put back at every step, as diffusers'
                    inpainting pipeline; its img2img pipeline noises the image to the first
                    timestep instead, leaving sqrt(alpha_bar) of it, 7.6% on SD's schedule).
                    Default 0.8 for img2img, 1.0 for inpainting, as in diffusers.
        mask_image  inpainting: white (>= 128) is repainted, black kept; the image's size,
                    one for every image or one per image (path, PIL, uint8 or bool array)
        eta         DDIM's eta >= 0 (0: deterministic; 1: DDPM's variance); only schedulers
                    whose step takes eta accept one
        guidance_rescale  phi in [0, 1] of Lin et al. 2023 (``rescale_noise_cfg``); 0: off
        prompt_embeds, negative_prompt_embeds  text embeddings (P, L, hidden) instead of
                    prompt / negative_prompt: the text encoder is skipped (no prompt then)

        Warns once per call about prompts longer than 77 tokens (truncated) and, where the
        training captions are known (``known_words``), about words the model never saw.
        """
        plan = self._plan(prompt, steps, guidance_scale, seed, latents, callback, scheduler, num_images_per_prompt,
                          collect_attention, output, batch_size, negative_prompt, height, width, image, mask_image,
                          strength, eta, guidance_rescale, prompt_embeds, negative_prompt_embeds, returned=True)
        outputs, maps = [], []
        for out, batch_maps in self._sample(plan):
            outputs.append(out)
            maps.append(batch_maps)
        self.attention_maps = ({name: np.concatenate([m[name] for m in maps], axis=1) for name in maps[0]}
                               if collect_attention else None)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def iter_batches(self, prompt=None, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                     seed: int | None = 0, latents=None, callback=None, scheduler=None,
                     num_images_per_prompt: int = 1, output: str = "uint8", batch_size: int | None = None, *,
                     negative_prompt=None, height: int | None = None, width: int | None = None, image=None,
                     mask_image=None, strength: float | None = None, eta: float = 0.0, guidance_rescale: float = 0.0,
                     prompt_embeds=None, negative_prompt_embeds=None):
        """The images of ``pipe(...)`` with the same arguments, batch by batch as each is done:
        an iterator of arrays of at most batch_size images (memory: one batch). The arguments
        are checked, and the warnings given, at this call, before any sampling."""
        plan = self._plan(prompt, steps, guidance_scale, seed, latents, callback, scheduler, num_images_per_prompt,
                          False, output, batch_size, negative_prompt, height, width, image, mask_image, strength,
                          eta, guidance_rescale, prompt_embeds, negative_prompt_embeds)
        return (out for out, _ in self._sample(plan))

    def _embeddings(self, embeds, name: str, like=None) -> np.ndarray:
        """prompt_embeds / negative_prompt_embeds checked: float (P, L, cross_attention_dim), finite."""
        a = np.asarray(to_numpy(_array(embeds)))
        hidden = int(self.unet.config["cross_attention_dim"])
        if like is not None and a.shape != like.shape:
            raise ValueError(f"{name} must have the shape of prompt_embeds {like.shape}, got {a.shape}")
        if a.ndim != 3 or a.shape[0] == 0 or a.shape[2] != hidden or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{name} must be a float array (prompts, tokens, {hidden}), got {a.dtype} {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite; {int((~np.isfinite(a)).sum())} values are NaN or inf")
        return a.astype(np.float32)

    def _text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided: bool):
        """(cond, uncond, prompts count, the texts to warn about): cond and uncond map prompt
        indices to embeddings; uncond is None without guidance."""
        backend = get_backend()
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("give prompt or prompt_embeds, not both")
            embeds = self._embeddings(prompt_embeds, "prompt_embeds")
            prompts, count, length = [], len(embeds), embeds.shape[1]

            def cond(idx):
                return backend.asarray(embeds[idx])
        else:
            prompts = check_prompts(prompt)
            ids = self.tokenizer(prompts)  # one row per prompt: a too-long prompt is said once
            count, length = len(prompts), ids.shape[1]

            def cond(idx):
                with no_grad():
                    return self.text_encoder(ids[idx]).data
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None:
            shape = (count, length, int(self.unet.config["cross_attention_dim"]))
            neg = self._embeddings(negative_prompt_embeds, "negative_prompt_embeds", like=np.empty(shape))
            return cond, ((lambda idx: backend.asarray(neg[idx])) if guided else None), count, prompts
        negatives = [""] if negative_prompt is None else check_prompts(negative_prompt, "negative_prompt")
        if len(negatives) not in (1, count):
            raise ValueError(f"negative_prompt must be one string or one per prompt ({count}), got {len(negatives)}")
        if not guided:
            return cond, None, count, prompts
        neg_ids = self.tokenizer(negatives)
        if len(set(negatives)) == 1:  # one text for every image: encoded once, shared by every batch
            with no_grad():
                one = self.text_encoder(neg_ids[:1]).data

            def uncond(idx):
                return backend.xp.broadcast_to(one, (len(idx), *one.shape[1:]))
        else:
            def uncond(idx):
                with no_grad():
                    return self.text_encoder(neg_ids[idx]).data
        return cond, uncond, count, prompts + [p for p in negatives if p]

    def _plan(self, prompt, steps, guidance_scale, seed, latents, callback, scheduler, num_images_per_prompt,
              collect_attention, output, batch_size, negative_prompt, height, width, image, mask_image, strength,
              eta, guidance_rescale, prompt_embeds, negative_prompt_embeds, returned: bool = False) -> _Plan:
        """Check every argument, tokenize, encode the negative prompt and warn now, before any sampling.
        returned: the caller keeps all N results (refuse where they cannot fit in memory)."""
        if prompt is None and prompt_embeds is None:
            check_prompts(prompt)  # the TypeError that names it
        steps = _positive_int("steps", steps)
        guidance_scale = _number("guidance_scale", guidance_scale)
        guidance_rescale = _number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        eta = _number("eta", eta)
        per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
        if output not in ("uint8", "latent"):
            raise ValueError(f"output must be 'uint8' or 'latent', got {output!r}")
        if not (seed is None or isinstance(seed, np.random.Generator)
                or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0)):
            raise ValueError(f"seed must be an integer >= 0, None or a numpy Generator, got {seed!r}")
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps)  # an unknown name or too many steps: now
        if eta and "eta" not in inspect.signature(sched.step).parameters:
            raise ValueError(f"eta: {type(sched).__name__} has no eta (DDIM's parameter); leave it at 0")
        step_kwargs = {"eta": eta} if "eta" in inspect.signature(sched.step).parameters else {}
        guided = guidance_scale != 1.0  # w = 1 is plain conditional sampling: no unconditional half
        channels = int(self.vae.config["latent_channels"])
        nine = int(self.unet.config["in_channels"]) == 2 * channels + 1
        if not nine and int(self.unet.config["in_channels"]) != channels:
            raise ValueError(f"the UNet takes {self.unet.config['in_channels']} input channels: neither the VAE's "
                             f"{channels} latent channels nor an inpainting UNet's {2 * channels + 1}")

        images = masks = None
        if image is None:
            if mask_image is not None or strength is not None:
                raise ValueError(f"{'mask_image' if mask_image is not None else 'strength'} needs an image (image=)")
            if nine:
                raise ValueError(f"this is an inpainting model (its UNet takes {2 * channels + 1} channels: the "
                                 "latent, the mask and the masked image's latent); give image= and mask_image=")
            height, width = self.check_size(height, width)
        else:
            images = load_image(image)
            size = images.shape[1:3]
            for name, value, have in (("height", height, size[0]), ("width", width, size[1])):
                if value is not None and value != have:
                    raise ValueError(f"{name} {value} does not match the image's {have} pixels (minisd does not "
                                     "resize images: resize it, or leave height and width out)")
            height, width = self.check_size(*size)
            if mask_image is not None:
                masks = load_mask(mask_image)
                if masks.shape[2:] != size:
                    raise ValueError(f"mask_image is {masks.shape[3]}x{masks.shape[2]} pixels and the image "
                                     f"{size[1]}x{size[0]}: they must be the same size")
                if len(masks) not in (1, len(images)) and len(images) != 1:
                    raise ValueError(f"mask_image: {len(masks)} masks for {len(images)} images; give one mask, or one "
                                     "per image")
            elif nine:
                raise ValueError("this is an inpainting model: give mask_image= with the image")
            default = DEFAULT_INPAINT_STRENGTH if masks is not None else DEFAULT_STRENGTH
            strength = default if strength is None else _number("strength", strength, 0.0, 1.0)

        cond, uncond, count, texts = self._text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided)
        k = 1 if images is None else max(len(images), 1 if masks is None else len(masks))
        if k not in (1, count):
            raise ValueError(f"image / mask_image: {k} of them for {count} prompts; give one for every prompt, or "
                             "one per prompt")
        n = count * per_prompt
        shape = (n, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            latents = np.asarray(to_numpy(_array(latents)), dtype=np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape}, got {latents.shape}")
            if not np.isfinite(latents).all():
                raise ValueError(f"latents must be finite; {int((~np.isfinite(latents)).sum())} of their "
                                 f"{latents.size} values are NaN or inf")
        batch = (estimate_batch_size(self.unet.config, self.vae.config, guided, size=(height, width))
                 if batch_size is None else _positive_int("batch_size", batch_size))
        if returned:
            per_image = 4 * math.prod(shape[1:]) if output == "latent" else 3 * height * width
            memory = _physical_memory()
            if memory is not None and n * per_image > memory:
                raise ValueError(f"{n:,} images take {n * per_image / 2 ** 30:,.1f} GiB to return, more than this "
                                 f"machine's {memory / 2 ** 30:,.1f} GiB of memory; take them batch by batch "
                                 "with pipe.iter_batches(...)")
        unknown = self.unknown_words(texts)
        if unknown:
            warnings.warn(f"the model never saw {', '.join(map(repr, unknown))} in its training captions, so the "
                          "image will not follow them; it knows " + ", ".join(sorted(self.known_words)), stacklevel=3)
        return _Plan(n, per_prompt, cond, uncond, steps, guidance_scale, guidance_rescale, step_kwargs,
                     np.random.default_rng(seed), latents, callback, sched, collect_attention, output, batch,
                     shape[1:], images, masks, 1.0 if strength is None else strength, nine)

    def _timesteps(self, plan: _Plan):
        """A fresh scheduler (multistep ones keep a history) and the timesteps to run.

        Text to image: all of them. With an image, diffusers' choice (get_timesteps of its
        img2img and inpainting pipelines): init = min(int(steps * strength), steps) steps
        are run, the last ones, from index t_start * order, t_start = steps - init (order 2
        for Heun, whose timesteps come in pairs), and a scheduler that counts its steps is
        told where it starts (set_begin_index).
        """
        sched = self.make_scheduler(plan.scheduler)
        sched.set_timesteps(plan.steps)
        if plan.images is None:
            return sched, sched.timesteps
        init = min(int(plan.steps * plan.strength), plan.steps)
        begin = max(plan.steps - init, 0) * sched.order
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        return sched, sched.timesteps[begin:]

    def _sample(self, plan: _Plan):
        """Sample each batch of images in turn: the loop of the module docstring. Yields (output, maps) per batch."""
        from minisd.models.blocks import record_attention

        backend = get_backend()
        xp = backend.xp
        rng, guided, n, batch = plan.rng, plan.uncond is not None, plan.n, plan.batch
        inpaint = plan.masks is not None
        # The images' latents z_0 (drawn first, as diffusers draws them): needed unless the
        # loop starts from pure noise and nothing is put back (strength 1 without a mask,
        # and the inpainting UNet, which sees the masked image instead).
        z0 = masks = masked = None
        if plan.images is not None and (plan.strength < 1 or (inpaint and not plan.nine_channels)):
            z0 = self.encode_images(plan.images, rng, batch)
        if inpaint:
            f = self.vae_scale_factor
            masks = backend.asarray(plan.masks[:, :, ::f, ::f])  # nearest, as torch's interpolate to (h, w)
            if plan.nine_channels:  # the inpainting UNet's input: the masked image, x * (mask < 0.5) in [-1, 1]
                masked = self.encode_images(to_model_input(plan.images) * (plan.masks < 0.5), rng, batch)

        def pick(a, prompt_rows):  # one for every prompt, or one per prompt
            return a if len(a) == 1 else a[prompt_rows]

        for start in range(0, n, batch):
            rows = np.arange(start, min(start + batch, n))
            prompt_rows = rows // plan.per_prompt
            m = len(rows)
            sched, timesteps = self._timesteps(plan)
            if plan.latents is None:
                noise = rng.standard_normal((m, *plan.latent_shape)).astype(np.float32)
            else:
                noise = plan.latents[rows]
            if z0 is not None and plan.strength < 1:
                init = xp.broadcast_to(pick(z0, prompt_rows), (m, *z0.shape[1:]))
                noise = backend.asarray(noise)
                z = sched.add_noise(init, noise, np.repeat(timesteps[:1], m)) if len(timesteps) else init
            else:  # pure noise: z_T = init_noise_sigma * epsilon
                z = backend.asarray(noise * np.float32(sched.init_noise_sigma))
                noise = backend.asarray(noise)
            cond = plan.cond(prompt_rows)
            context = xp.concatenate([plan.uncond(prompt_rows), cond]) if guided else cond
            if inpaint:
                mask = xp.broadcast_to(pick(masks, prompt_rows), (m, *masks.shape[1:]))
                if z0 is not None:
                    known = xp.broadcast_to(pick(z0, prompt_rows), (m, *z0.shape[1:]))
                if plan.nine_channels:
                    extra = xp.concatenate([mask, xp.broadcast_to(pick(masked, prompt_rows), (m, *masked.shape[1:]))],
                                           axis=1)
                    extra = xp.concatenate([extra, extra]) if guided else extra
            maps = {}
            with no_grad(), (record_attention(self.unet, "attn2") if plan.collect_attention else nullcontext()) as rec:
                for i, t in enumerate(timesteps):
                    z_in = sched.scale_model_input(z, t)
                    z_in = xp.concatenate([z_in, z_in]) if guided else z_in
                    if inpaint and plan.nine_channels:
                        z_in = xp.concatenate([z_in, extra], axis=1)
                    eps = self.unet(z_in, t, context).data
                    if guided:
                        eps_u, eps_c = eps[:m], eps[m:]
                        eps = eps_u + np.float32(plan.guidance_scale) * (eps_c - eps_u)
                        if plan.guidance_rescale > 0:
                            eps = rescale_noise_cfg(eps, eps_c, plan.guidance_rescale)
                    # DDPM, Euler a and DDIM with eta > 0 draw their noise from the seeded rng
                    out = sched.step(eps, t, z, generator=rng, **plan.step_kwargs)
                    z, x0 = out.prev_sample, out.pred_original_sample
                    if inpaint and not plan.nine_channels:  # put the known part back, noised to where z is now
                        ahead = sched.add_noise(known, noise, np.repeat(timesteps[i + 1:i + 2], m)) \
                            if i + 1 < len(timesteps) else known
                        z = (1 - mask) * ahead + mask * z
                    if plan.callback is not None:
                        plan.callback(i, _as_number(t), z, eps, x0)
                if plan.collect_attention:
                    for name, arrays in rec.items():
                        # keep the conditional half of each guided batch
                        maps[name] = np.stack([a[m:] if guided else a for a in arrays])
            yield (to_numpy(z) if plan.output == "latent" else self.decode_latents(z)), maps


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
