"""Noise schedulers: how noise is added in training, and removed step by step in sampling.

A diffusion model is trained on images destroyed by Gaussian noise to a known level.
With a schedule of variances beta_1 ... beta_T (T = ``num_train_timesteps`` = 1000) and

    alpha_t = 1 - beta_t,        alpha_bar_t = prod_{s <= t} alpha_s,

the noisy sample at step t is drawn in one go (DDPM, Ho et al. 2020, eq. 4):

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * epsilon,   epsilon ~ N(0, I)

(``add_noise``). The UNet is trained to predict epsilon from (x_t, t). Sampling starts
from pure noise x_T and walks back through a few of the 1000 steps (``set_timesteps``),
each ``step`` turning the model's prediction into x_{t_prev}. The schedulers differ only
in that walk (the short names are what ``minisd generate --scheduler`` takes, and what
UIs call them):

    ddpm     DDPMScheduler            ancestral sampling: the posterior q(x_{t-1} | x_t, x_0), noise drawn each step
    ddim     DDIMScheduler            a deterministic (eta = 0) or partly random (eta > 0) jump to t_prev
    pndm     PNDMScheduler            pseudo linear multistep (PLMS): DDIM's jump with an Adams-Bashforth epsilon
                                      (SD v1.5's shipped scheduler)
    euler    EulerDiscreteScheduler   Euler's method on the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar)
    euler_a  EulerAncestralDiscreteScheduler  "Euler a": an Euler step down past sigma_next, then fresh noise back up
    heun     HeunDiscreteScheduler    Heun's 2nd-order method: two model calls a step
    lms      LMSDiscreteScheduler     linear multistep on the ODE: the last 4 slopes, Lagrange-weighted
    dpm++2m  DPMSolverMultistepScheduler  "DPM++ 2M": the ODE solved exactly in its linear part, in log-SNR time
    unipc    UniPCMultistepScheduler  a multistep predictor, then a corrector that reuses the next model call

``use_karras_sigmas`` (euler, heun, lms, dpm++2m, unipc) replaces the evenly spaced
timesteps by Karras et al. 2022's noise levels (``karras_sigmas``): "DPM++ 2M Karras".

The sampling loop is the same for all of them (it is SD's pipeline without the guidance):

    scheduler.set_timesteps(50)
    x = rng.standard_normal((N, 4, 64, 64)) * scheduler.init_noise_sigma      # x_T
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, text_embeddings)
        x = scheduler.step(eps, t, x, generator=rng).prev_sample             # x_{t_prev}
    # step() also returns pred_original_sample: the current guess of x_0

Every step() takes ``generator`` (the deterministic ones ignore it), so this one loop
serves them all. The higher-order schedulers keep what they need between calls:
PNDM, LMS, DPM-Solver and UniPC remember earlier model outputs, and Heun repeats each
timestep but the first in ``timesteps`` (2n - 1 entries for n steps), so the loop
calls the model twice per step without knowing it; PNDM with its Runge-Kutta warm-up
(skip_prk_steps False) also visits more timesteps than steps. ``len(timesteps)`` is the
number of model calls.

Each follows diffusers' scheduler of the same name: the same config keys, defaults and
formulas, so that ``scheduler/scheduler_config.json`` moves between minisd and diffusers
and the two produce the same timesteps and the same samples (tests/test_schedulers.py).
Where diffusers has a quirk (DDIM's previous timestep) minisd has it too, with a note.

Stable Diffusion v1.x: num_train_timesteps 1000, beta_schedule "scaled_linear",
beta_start 0.00085, beta_end 0.012, steps_offset 1, set_alpha_to_one False,
clip_sample False, prediction_type "epsilon" (v2.x 768 px: "v_prediction"). minisd's
shapes model uses the same schedule on (4, 8, 8) latents instead of SD's (4, 64, 64).

Arrays: NumPy or CuPy (``xp = get_array_module(x)``); a float32 sample stays float32.
The schedule itself (betas, alpha_bar) is kept in float64 NumPy and its values enter the
array math as Python floats, so they never change the sample's dtype.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.polynomial import Polynomial

from minisd.backends import get_array_module, to_numpy

CONFIG_NAME = "scheduler_config.json"

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------------------
# The noise schedule beta_t
# ---------------------------------------------------------------------------------------


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float,
               beta_schedule: str, trained_betas=None) -> np.ndarray:
    """beta_t for t = 0 ... T-1 (float64).

    linear            beta_t evenly spaced from beta_start to beta_end (DDPM: 1e-4 ... 0.02)
    scaled_linear     sqrt(beta_t) evenly spaced, then squared (Stable Diffusion, from LDM)
    squaredcos_cap_v2 the cosine schedule of Nichol & Dhariwal 2021:
                      alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2), s = t / T,
                      beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), capped at 0.999
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(f"trained_betas has {betas.size} values; num_train_timesteps is {num_train_timesteps}")
        return betas
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        s = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, timestep_spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """Which of the T training steps sampling visits, in descending order (float64, unrounded).

    For T = 1000 and n = 10 (Lin et al. 2023, "Common diffusion noise schedules and
    sample steps are flawed", table 2):
        leading   0, 100, ..., 900 (+ steps_offset), reversed: 900 ... 0 (SD v1: 901 ... 1)
        trailing  999, 899, ..., 99: starts at the last step, so x_T really is pure noise
        linspace  999, 888, ..., 0: both ends (Euler's default; unrounded here)
    """
    n, T = num_inference_steps, num_train_timesteps
    if timestep_spacing == "leading":
        return (np.arange(n)[::-1] * (T // n) + steps_offset).astype(np.float64)
    if timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, "Elucidating the design space of diffusion-based generative
    models", eq. 5):

        sigma_i = (sigma_max^(1/rho) + i / (n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0 ... n-1

    rho = 7, the paper's choice, puts the steps closer together at low noise than evenly
    spaced timesteps do, where the image's details are decided.
    """
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas, all_sigmas) -> np.ndarray:
    """The fractional training timestep of each noise level: t interpolated linearly in
    log sigma between the two training steps around it, clamped to [0, T-1]. (diffusers'
    _sigma_to_t; ``all_sigmas`` is sigma_t for t = 0 ... T-1, increasing.)"""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    return np.interp(log_sigma, np.log(all_sigmas), np.arange(len(all_sigmas), dtype=np.float64))


def draw_noise(shape, like, generator=None):
    """epsilon ~ N(0, I) of ``shape``, in ``like``'s array module and dtype.

    ``generator``: a numpy.random.Generator (``np.random.default_rng(seed)``, made once and
    passed to every step), or None for fresh entropy. Noise is always drawn on the host
    by NumPy, so a seed gives the same numbers on CPU and GPU.
    """
    if generator is None:
        generator = np.random.default_rng()
    if not isinstance(generator, np.random.Generator):
        # an int seed here would redraw the very same noise at every step
        raise ValueError("generator must be a numpy.random.Generator (np.random.default_rng(seed), "
                         f"made once for the whole sampling loop), not {type(generator).__name__}")
    xp = get_array_module(like)
    return xp.asarray(generator.standard_normal(shape), dtype=like.dtype)


@dataclass
class SchedulerOutput:
    """What one sampling step returns: x_{t_prev}, and the model's current guess of x_0."""

    prev_sample: Any
    pred_original_sample: Any

    def __iter__(self):  # so that ``prev, x0 = scheduler.step(...)`` also works
        return iter((self.prev_sample, self.pred_original_sample))


# ---------------------------------------------------------------------------------------
# What every scheduler shares: the config, alpha_bar, add_noise, the x_0 / epsilon algebra
# ---------------------------------------------------------------------------------------


class Scheduler:
    """Base class: config handling and the variance-preserving algebra that every scheduler shares.

    Subclasses list their config keys and defaults in ``_defaults`` (diffusers' names and
    diffusers' defaults, which are not SD's: see the module docstring).
    """

    _defaults: dict[str, Any] = {}
    # Options that diffusers' class of the same name has and minisd does not implement:
    # accepted only at these values, so a config that needs them fails loudly instead of
    # sampling something else. Keys the diffusers class does not have are ignored, as
    # diffusers ignores them (DDIM.from_config of a Karras DPM++ config is plain DDIM).
    _unsupported: dict[str, Any] = {"thresholding": False, "rescale_betas_zero_snr": False}
    # diffusers' ``order``: timesteps per step (Heun's come in pairs). img2img starts at
    # timesteps[t_start * order], as diffusers' pipelines do.
    order = 1

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self._defaults))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no config key {unknown[0]!r}; "
                             f"known keys: {', '.join(self._defaults)}")
        self.config = {**self._defaults, **config}
        c = self.config
        if c["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {c['prediction_type']!r}; "
                             f"choose one of {', '.join(PREDICTION_TYPES)}")
        if c["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {c['timestep_spacing']!r}; "
                             f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if int(c["num_train_timesteps"]) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {c['num_train_timesteps']}")
        self.betas = make_betas(int(c["num_train_timesteps"]), c["beta_start"], c["beta_end"],
                                c["beta_schedule"], c.get("trained_betas"))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)  # alpha_bar_t
        self.num_inference_steps = None
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].copy()

    # -- config: plain constructor arguments, saved as JSON (diffusers' ConfigMixin) ---------

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config["num_train_timesteps"])

    @classmethod
    def from_config(cls, config: dict):
        """Build from a config dict (a scheduler_config.json's contents).

        Keys this class does not have are ignored (as diffusers does: SD v1.5 ships a
        PNDMScheduler config whose schedule keys every scheduler shares), except options
        that would change the result and that minisd lacks, which are an error.
        """
        for key, default in cls._unsupported.items():
            if key in config and config[key] != default and config[key] is not None:
                raise ValueError(f"{cls.__name__}: config {key}={config[key]!r} is not supported by minisd")
        return cls(**{k: v for k, v in config.items() if k in cls._defaults})

    @classmethod
    def from_pretrained(cls, path: str):
        """Load from a folder holding scheduler_config.json, or a model folder with scheduler/."""
        return cls.from_config(read_config(path))

    def to_dict(self) -> dict:
        """The config as saved: diffusers' "_class_name" first, then the constructor arguments."""
        d = {"_class_name": type(self).__name__}
        for k, v in self.config.items():
            d[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return d

    def save_config(self, directory: str) -> str:
        """Write ``directory``/scheduler_config.json (diffusers' layout: the model's scheduler/ folder)."""
        from minisd.io import write_json  # atomic: a failed save leaves the old file whole

        path = os.path.join(directory, CONFIG_NAME)
        write_json(path, self.to_dict())
        return path

    save_pretrained = save_config

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v != self._defaults[k])
        return f"{type(self).__name__}({args})"

    def __len__(self):
        return self.num_train_timesteps

    # -- the forward process and its algebra ------------------------------------------------

    def _alpha_bar(self, t) -> float:
        """alpha_bar_t as a Python float; 1 before the first step (t < 0: nothing added yet)."""
        t = int(t)
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def _alpha_bar_prev(self, t_prev: int) -> float:
        """alpha_bar of the step jumped to (DDIM, PNDM): past the first step (t' < 0) it is
        1 if set_alpha_to_one else alpha_bar_0 (SD: False, so the last step keeps a little noise)."""
        if t_prev >= 0:
            return float(self.alphas_cumprod[t_prev])
        return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _per_sample(self, values, sample):
        """(N,) values -> an array that broadcasts against sample (N, C, H, W), in sample's dtype."""
        xp = get_array_module(sample)
        values = xp.asarray(values, dtype=sample.dtype)
        return values.reshape(values.shape + (1,) * (sample.ndim - values.ndim))

    def _check_timesteps(self, timesteps):
        t = np.asarray(to_numpy(timesteps))
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.min()} ... {t.max()}")
        return t.astype(np.int64)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * epsilon, one t per sample."""
        t = self._check_timesteps(timesteps)
        a = self.alphas_cumprod[t]
        return (self._per_sample(np.sqrt(a), original_samples) * original_samples
                + self._per_sample(np.sqrt(1 - a), original_samples) * noise)

    def get_velocity(self, sample, noise, timesteps):
        """The v-prediction target (Salimans & Ho 2022): v = sqrt(alpha_bar_t) epsilon - sqrt(1 - alpha_bar_t) x_0."""
        t = self._check_timesteps(timesteps)
        a = self.alphas_cumprod[t]
        return self._per_sample(np.sqrt(a), sample) * noise - self._per_sample(np.sqrt(1 - a), sample) * sample

    def scale_model_input(self, sample, timestep=None):
        """The UNet sees x_t itself in the variance-preserving schedulers (Euler rescales it)."""
        return sample

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of x_T, the starting noise: 1 for a variance-preserving x_t."""
        return 1.0

    def _x0_and_eps(self, model_output, sample, alpha_bar_t: float):
        """Turn the model's output into (x_0, epsilon), whichever the model predicts.

        From x_t = sqrt(a) x_0 + sqrt(1-a) epsilon, with a = alpha_bar_t:
            epsilon       x_0 = (x_t - sqrt(1-a) epsilon) / sqrt(a)
            sample        epsilon = (x_t - sqrt(a) x_0) / sqrt(1-a)
            v_prediction  v = sqrt(a) epsilon - sqrt(1-a) x_0, so
                          x_0 = sqrt(a) x_t - sqrt(1-a) v,  epsilon = sqrt(a) v + sqrt(1-a) x_t
        """
        sa, sb = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - sb * model_output) / sa, model_output
        if kind == "sample":
            return model_output, (sample - sa * model_output) / sb
        return sa * sample - sb * model_output, sa * model_output + sb * sample

    def _clip(self, x0):
        """Clamp the x_0 guess to [-r, r] when clip_sample is on (pixel-space models; SD turns it off)."""
        if not self.config.get("clip_sample"):
            return x0
        r = float(self.config["clip_sample_range"])
        return get_array_module(x0).clip(x0, -r, r)

    def _check_steps(self, num_inference_steps):
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot exceed "
                             f"num_train_timesteps ({self.num_train_timesteps})")

    def set_timesteps(self, num_inference_steps: int):
        """Choose the n timesteps that sampling visits (``self.timesteps``, int64, descending)."""
        self._check_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        c = self.config
        timesteps = spaced_timesteps(self.num_inference_steps, self.num_train_timesteps,
                                     c["timestep_spacing"], int(c["steps_offset"])).round().astype(np.int64)
        if timesteps.max() >= self.num_train_timesteps:  # (diffusers fails here with an IndexError at the first step)
            raise ValueError(f"{type(self).__name__}: {num_inference_steps} steps with steps_offset="
                             f"{c['steps_offset']} and {c['timestep_spacing']!r} spacing would start at timestep "
                             f"{timesteps.max()}, past the last of {self.num_train_timesteps} training timesteps; "
                             f"take fewer steps or steps_offset=0")
        self.timesteps = timesteps


_SHARED = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


# ---------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------


class DDPMScheduler(Scheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020): ancestral sampling.

    Given x_t and the model's guess x_0, step to the previous visited timestep t' by sampling
    the Gaussian posterior q(x_t' | x_t, x_0) (eqs. 6-7), where with a_t = alpha_bar_t and
    the effective one-jump beta_t = 1 - a_t / a_t' (= beta_t itself when t' = t - 1):

        mean     = sqrt(a_t') beta_t / (1 - a_t) * x_0  +  sqrt(1 - beta_t) (1 - a_t') / (1 - a_t) * x_t
        variance = (1 - a_t') / (1 - a_t) * beta_t                            ("fixed_small")
        x_t'     = mean + sqrt(variance) * z,   z ~ N(0, I), and no noise at the last step (t = 0)

    variance_type "fixed_large" uses beta_t instead (the upper bound in the paper).
    """

    _defaults = {**_SHARED, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["variance_type"] not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type {self.config['variance_type']!r} is not supported by minisd; "
                             "choose fixed_small or fixed_large")

    def previous_timestep(self, timestep) -> int:
        """The next timestep sampling visits after ``timestep`` (-1 after the last)."""
        t = int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        idx = np.flatnonzero(self.timesteps == t)
        if idx.size == 0:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps")
        i = int(idx[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output, timestep, sample, generator=None, noise=None, return_dict=True):
        """One ancestral step x_t -> x_t'. ``noise`` (z) or ``generator`` / seed for the draw."""
        t = int(timestep)
        t_prev = self.previous_timestep(t)
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        beta_t = 1 - a_t / a_prev
        x0, _ = self._x0_and_eps(model_output, sample, a_t)
        x0 = self._clip(x0)
        coef_x0 = math.sqrt(a_prev) * beta_t / (1 - a_t)
        coef_xt = math.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t)
        mean = coef_x0 * x0 + coef_xt * sample
        prev = mean
        if t > 0:
            if self.config["variance_type"] == "fixed_large":
                variance = beta_t
            else:  # clamped as in diffusers: t' = -1 would otherwise give exactly 0
                variance = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            prev = mean + math.sqrt(variance) * noise
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021), eq. 12.

    With a_t = alpha_bar_t, the guesses x_0 and epsilon from the model, and t' the previous
    visited timestep:

        sigma_t = eta * sqrt((1 - a_t') / (1 - a_t)) * sqrt(1 - a_t / a_t')
        x_t'    = sqrt(a_t') x_0  +  sqrt(1 - a_t' - sigma_t^2) epsilon  +  sigma_t z

    eta = 0: deterministic, the same noise always gives the same image (SD's default
    sampler in its original release); eta = 1: DDPM's variance.

    Past the first step (t' < 0), a_t' is 1 if set_alpha_to_one else alpha_bar_0.

    Quirk kept for parity with diffusers: t' = t - T // n whatever timestep_spacing is,
    which is exactly the next visited timestep for "leading" and "trailing" with n
    dividing T, and only close to it otherwise.
    """

    _defaults = {**_SHARED, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, noise=None,
             use_clipped_model_output: bool = False, return_dict=True):
        """One DDIM step x_t -> x_t'. For eta > 0, ``noise`` (z) or ``generator`` / seed for the draw."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before step()")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = int(timestep)
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar_prev(t_prev)
        x0, eps = self._x0_and_eps(model_output, sample, a_t)
        x0 = self._clip(x0)
        if use_clipped_model_output:  # epsilon consistent with the clipped x_0
            eps = (sample - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        if eta > 0:
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            prev = prev + sigma * noise
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------
# PNDM (the scheduler SD v1.5 ships configured for)
# ---------------------------------------------------------------------------------------


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods for diffusion models (Liu et al. 2022, "Pseudo numerical
    methods for diffusion models on manifolds", ICLR): a classical ODE method whose steps
    are DDIM's jump.

    The transfer part (eq. 11) moves x_t to t - delta along a noise estimate e; with
    a = alpha_bar_t and a' = alpha_bar_{t-delta}:

        phi(x_t, e, t, t - delta) = sqrt(a' / a) x_t - (a' - a) / (a sqrt(1 - a') + sqrt(a (1 - a) a')) e

    (DDIM with eta = 0, written differently). The gradient part chooses e from the model's
    outputs e_t = eps(x_t, t):

      PLMS (eq. 12; one model call a step): the 4th-order Adams-Bashforth combination
          e' = (55 e_t - 59 e_{t-delta} + 37 e_{t-2 delta} - 9 e_{t-3 delta}) / 24,
        and the 1st-, 2nd- and 3rd-order ones, (3 e_t - e_{t-delta}) / 2 and
        (23 e_t - 16 e_{t-delta} + 5 e_{t-2 delta}) / 12, while fewer outputs are known.
      PRK (eq. 13; skip_prk_steps False, the paper's warm-up): each of the first 3 steps by
        a pseudo Runge-Kutta method, 4 model calls at t, t - delta/2, t - delta/2, t - delta,
        each from x_t: e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6.

    With skip_prk_steps True (SD v1.5's config) PLMS starts with one improved Euler step
    instead: the second timestep is visited twice, and the second visit redoes
    t_0 -> t_1 from x_{t_0} with (e_{t_0} + e_{t_1}) / 2. So n steps cost n + 1 model calls
    (``timesteps`` lists them), and n + 9 with PRK (12 for its 3 steps, then n - 3).

    Quirks kept for parity with diffusers: delta = T // n whatever timestep_spacing is (as
    in DDIM); v_prediction outputs are combined as above and only then turned into
    epsilon, at the transfer's start (exact when v does not change along the path, which it
    does); prediction_type "sample" is not supported. pred_original_sample, which
    diffusers does not return, is the x_0 each transfer heads for: (x_t - sqrt(1 - a) e') / sqrt(a).
    """

    _defaults = {**_SHARED, "skip_prk_steps": False, "set_alpha_to_one": False}
    _unsupported: dict[str, Any] = {}
    pndm_order = 4

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["prediction_type"] == "sample":
            raise ValueError("PNDMScheduler: prediction_type 'sample' is not supported "
                             "(diffusers' PNDM takes epsilon or v_prediction)")
        self.prk_timesteps = np.array([], dtype=np.int64)
        self._reset()

    def _reset(self):
        self.counter = 0        # model outputs taken since set_timesteps
        self.ets = []           # PLMS's e_t history, oldest first (PRK leaves its 3 there)
        self._rk_sum = None     # PRK's running (e_1 + 2 e_2 + 2 e_3) / 6
        self._x_start = None    # the x_t that the current PRK step (or the first PLMS step) starts from

    def set_timesteps(self, num_inference_steps: int):
        """PRK's 12 timesteps (if any), then PLMS's: int64, descending."""
        self._check_steps(num_inference_steps)
        n = self.num_inference_steps = int(num_inference_steps)
        c, T = self.config, self.num_train_timesteps
        ts = spaced_timesteps(n, T, c["timestep_spacing"], int(c["steps_offset"]))[::-1].round().astype(np.int64)
        if c["skip_prk_steps"]:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]  # t_0, t_1, t_1, t_2, ...
        else:
            if n < self.pndm_order:
                raise ValueError(f"PNDMScheduler: the Runge-Kutta warm-up (skip_prk_steps False) needs at least "
                                 f"{self.pndm_order} steps, got {n}")
            # the top 4 timesteps and their midpoints, each visited as RK4 needs: t, t-d/2, t-d/2, t-d
            prk = np.repeat(ts[-self.pndm_order:], 2) + np.tile([0, T // n // 2], self.pndm_order)
            self.prk_timesteps = np.repeat(prk[:-1], 2)[1:-1][::-1].copy()
            plms = ts[:-3][::-1]
        timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        if timesteps.max() >= T:  # (diffusers fails here with an IndexError)
            raise ValueError(f"PNDMScheduler: {n} steps with {c['timestep_spacing']!r} spacing and steps_offset="
                             f"{c['steps_offset']} would visit timestep {timesteps.max()}, past the last of {T} "
                             "training timesteps; take fewer steps or a smaller steps_offset")
        self.timesteps = timesteps
        self._reset()

    def _transfer(self, x, t: int, t_to: int, e):
        """phi(x_t, e, t, t_to) of eq. 11, and the x_0 it heads for."""
        a, a_to = self._alpha_bar(t), self._alpha_bar_prev(t_to)
        x0, eps = self._x0_and_eps(e, x, a)  # v_prediction: the v combination turned into epsilon
        coef = (a_to - a) / (a * math.sqrt(1 - a_to) + math.sqrt(a * (1 - a) * a_to))
        return math.sqrt(a_to / a) * x - coef * eps, x0

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One model output in, one point out: PRK's while the warm-up lasts, then PLMS's.
        ``timestep`` must be the one just visited; ``generator`` is ignored (deterministic)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before step()")
        if self.counter < len(self.prk_timesteps):
            prev, x0 = self._step_prk(model_output, int(timestep), sample)
        else:
            prev, x0 = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def _step_prk(self, e, t: int, x):
        k = self.counter % 4  # which of RK4's four calls this is
        t_to = t - (0 if k % 2 else self.num_train_timesteps // self.num_inference_steps // 2)
        if k == 0:
            self._rk_sum = (1 / 6) * e
            self.ets.append(e)
            self._x_start = x
        elif k < 3:
            self._rk_sum = self._rk_sum + (1 / 3) * e
        else:
            e = self._rk_sum + (1 / 6) * e
            self._rk_sum = None
        return self._transfer(self._x_start, int(self.prk_timesteps[self.counter - k]), t_to, e)

    def _step_plms(self, e, t: int, x):
        delta = self.num_train_timesteps // self.num_inference_steps
        t_to = t - delta
        if self.counter == 1:  # skip_prk_steps' second visit of t_1: redo t_0 -> t_1
            t, t_to = t + delta, t
        else:
            self.ets = self.ets[-3:] + [e]
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self._x_start = x
        elif len(ets) == 1 and self.counter == 1:
            e = (e + ets[-1]) / 2
            x, self._x_start = self._x_start, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._transfer(x, t, t_to, e)


# ---------------------------------------------------------------------------------------
# Walking a grid of noise levels sigma: Euler, Heun, LMS (k-diffusion), DPM-Solver, UniPC
# ---------------------------------------------------------------------------------------


class SigmaScheduler(Scheduler):
    """What the schedulers that walk a grid of noise levels share.

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is x_t's noise-to-signal ratio (SD:
    0.029 at t = 0, 14.6 at t = 999). set_timesteps(n) picks n timesteps and their sigmas,
    interpolated linearly in t; with use_karras_sigmas, Karras' n levels instead
    (``karras_sigmas``) and the fractional timesteps that have them (``sigma_to_t``). Then
    it appends the last sigma: 0 (final_sigmas_type "zero": the walk ends on the clean
    image) or sigma_0 ("sigma_min").

    ``step_index`` counts the steps taken. The first call of scale_model_input or step
    finds its timestep in ``timesteps`` (the second of two equal ones, as diffusers does),
    or starts at ``begin_index`` if set_begin_index was called (img2img starts part way
    down); later calls just count, so the timestep argument matters only once.
    """

    _timestep_dtype: Any = np.float32
    _karras_over_all_t = False  # Karras' range: the visited sigmas' (False) or the whole schedule's

    def __init__(self, **config):
        super().__init__(**config)
        final = self.config.get("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"unknown final_sigmas_type {final!r}; choose zero or sigma_min")
        self.all_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)  # sigma_t, t = 0 ... T-1
        self.timesteps = np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[::-1].astype(np.float32)
        self.sigmas = np.append(self.all_sigmas[::-1], 0.0)
        self.step_index = self.begin_index = None
        self._reset()

    def _reset(self):
        """Forget what earlier steps left behind (Heun's half step, the multistep histories)."""

    def _spaced(self, n: int) -> np.ndarray:
        c = self.config
        return spaced_timesteps(n, self.num_train_timesteps, c["timestep_spacing"], int(c["steps_offset"]))

    def _karras_timesteps(self, t: np.ndarray) -> np.ndarray:
        return t

    def _final_sigma(self, sigmas) -> float:
        return float(self.all_sigmas[0]) if self.config.get("final_sigmas_type") == "sigma_min" else 0.0

    def set_timesteps(self, num_inference_steps: int):
        """timesteps (descending) and ``sigmas``: theirs, then the final sigma."""
        self._check_steps(num_inference_steps)
        n, c = int(num_inference_steps), self.config
        t = self._spaced(n).astype(self._timestep_dtype)
        sigmas = np.interp(t.astype(np.float64), np.arange(self.num_train_timesteps), self.all_sigmas)
        if c.get("use_karras_sigmas"):
            lo, hi = (self.all_sigmas[0], self.all_sigmas[-1]) if self._karras_over_all_t else (sigmas[-1], sigmas[0])
            lo = lo if c.get("sigma_min") is None else c["sigma_min"]
            hi = hi if c.get("sigma_max") is None else c["sigma_max"]
            sigmas = karras_sigmas(float(lo), float(hi), n)
            t = self._karras_timesteps(sigma_to_t(sigmas, self.all_sigmas)).astype(self._timestep_dtype)
        self.num_inference_steps = len(t)
        self.timesteps = t
        self.sigmas = np.append(sigmas, self._final_sigma(sigmas))
        self.step_index = self.begin_index = None
        self._reset()

    def set_begin_index(self, begin_index: int = 0):
        """Start counting at ``timesteps[begin_index]`` (diffusers' img2img pipelines call this)."""
        self.begin_index = int(begin_index)

    def index_for_timestep(self, timestep) -> int:
        """Where ``timestep`` is in ``timesteps`` (the second of two equal ones, as in diffusers)."""
        target = to_numpy(timestep)
        if self.timesteps.dtype == np.float32:
            target = np.float32(target)
        idx = np.flatnonzero(self.timesteps == target)
        if idx.size == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps")
        return int(idx[1] if idx.size > 1 else idx[0])

    def _step_index_for(self, timestep) -> int:
        if self.step_index is None:
            self.step_index = self.begin_index if self.begin_index is not None else self.index_for_timestep(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError("step() called after the last timestep; call set_timesteps again")
        return self.step_index

    def _sigmas_for(self, timesteps) -> np.ndarray:
        """add_noise's sigma for each sample: its timestep's, or, once img2img has set a
        begin_index, the current step's for all (as diffusers does)."""
        t = np.atleast_1d(to_numpy(timesteps))
        if self.begin_index is None:
            return self.sigmas[[self.index_for_timestep(x) for x in t]]
        return self.sigmas[[self.begin_index if self.step_index is None else self.step_index] * len(t)]


class KDiffusionScheduler(SigmaScheduler):
    """The samplers of Karras et al. 2022 and Crowson's k-diffusion: x lives in sigma-space.

    Divide x_t by sqrt(alpha_bar_t) and it becomes x = x_0 + sigma * epsilon. So the
    sampler starts from x_T = sigma_max * z (``init_noise_sigma``), feeds the UNet
    x / sqrt(sigma^2 + 1) (= x_t, what it was trained on: ``scale_model_input``), turns its
    output into the denoised guess D(x; sigma) of x_0 (``_denoised``), and follows the
    probability-flow ODE, whose slope is d = dx/dsigma = (x - D(x; sigma)) / sigma
    (Karras et al. 2022, eq. 3 with sigma(t) = t).
    """

    @property
    def init_noise_sigma(self) -> float:
        """x_T = init_noise_sigma * z. For "leading" the first sigma is not the largest
        noise level, and diffusers uses sqrt(sigma_max^2 + 1) there; kept for parity."""
        sigma_max = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(sigma_max ** 2 + 1)

    def scale_model_input(self, sample, timestep=None):
        """x / sqrt(sigma^2 + 1): the variance-preserving x_t that the UNet was trained on."""
        sigma = float(self.sigmas[self._step_index_for(timestep)])
        return sample / math.sqrt(sigma ** 2 + 1)

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma_t * epsilon (sigma-space; divide by sqrt(sigma^2 + 1) for x_t)."""
        return original_samples + self._per_sample(self._sigmas_for(timesteps), original_samples) * noise

    def _denoised(self, model_output, sample, sigma: float, sigma_hat: float):
        """D(x; sigma), the x_0 guess, from what the model predicts on x_t = x / sqrt(sigma^2 + 1):
            epsilon       x - sigma_hat * epsilon (sigma_hat: the level x is at; Euler's churn raises it)
            sample        the output itself
            v_prediction  x_0 = sqrt(a) x_t - sqrt(1-a) v, a = 1 / (sigma^2 + 1)
        """
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - sigma_hat * model_output
        if kind == "sample":
            return model_output
        return model_output * (-sigma / math.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)


# The k-diffusion schedulers' options beyond the schedule (diffusers' names and defaults)
_KARRAS = {"timestep_spacing": "linspace", "use_karras_sigmas": False}
_OTHER_SIGMAS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}


class EulerDiscreteScheduler(KDiffusionScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2), k-diffusion style.

    With d_i = (x_i - D(x_i; sigma_i)) / sigma_i, the slope at sigma_i:

        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * d_i,     last sigma = 0 (or sigma_0: final_sigmas_type)

    use_karras_sigmas spaces the sigmas as Karras et al. 2022 (between sigma_min and
    sigma_max: the config's, else the visited timesteps' ends). s_churn > 0 adds noise to
    climb to sigma_hat = sigma (1 + gamma) before the step (Karras' stochastic sampler);
    0 (the default) keeps it deterministic.
    """

    _defaults = {**_SHARED, **_KARRAS, "sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero"}
    _unsupported = {**_OTHER_SIGMAS, "interpolation_type": "linear", "timestep_type": "discrete",
                    "rescale_betas_zero_snr": False}

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, noise=None, return_dict=True):
        """One Euler step from sigma_i to sigma_{i+1}; model_output is the UNet's output on
        scale_model_input(x). ``noise`` or ``generator`` / seed only matter when s_churn > 0."""
        i = self._step_index_for(timestep)
        sigma = float(self.sigmas[i])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            sample = sample + (s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)) * noise
        x0 = self._denoised(model_output, sample, sigma, sigma_hat)
        derivative = (sample - x0) / sigma_hat
        prev = sample + (float(self.sigmas[i + 1]) - sigma_hat) * derivative
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class EulerAncestralDiscreteScheduler(KDiffusionScheduler):
    """"Euler a": Euler steps with fresh noise (k-diffusion's sample_euler_ancestral, the
    ancestral sampler in the sigma-space of Karras et al. 2022).

    DDPM's step from sigma to sigma_next, in sigma-space, is a deterministic part down to
    sigma_down and noise sigma_up back up, with sigma_down^2 + sigma_up^2 = sigma_next^2:

        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        x_next     = x + (sigma_down - sigma) * d  +  sigma_up * z,   z ~ N(0, I),  d = (x - D(x; sigma)) / sigma

    Each step forgets some of the path, so the image keeps changing with the number of
    steps (unlike the ODE samplers). ``noise`` (z) or ``generator`` for the draw, as DDPM.
    """

    _defaults = {**_SHARED, "timestep_spacing": "linspace"}
    _unsupported = {"rescale_betas_zero_snr": False}

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["prediction_type"] == "sample":
            raise ValueError("EulerAncestralDiscreteScheduler: prediction_type 'sample' is not supported "
                             "(diffusers' takes epsilon or v_prediction)")

    def step(self, model_output, timestep, sample, generator=None, noise=None, return_dict=True):
        """One ancestral step sigma_i -> sigma_{i+1}; ``noise`` (z) or ``generator`` for the draw."""
        i = self._step_index_for(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = self._denoised(model_output, sample, sigma, sigma)
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = math.sqrt(max(sigma_next ** 2 - sigma_up ** 2, 0.0))
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        if sigma_up > 0:  # (the last step, to sigma = 0, adds none)
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            prev = prev + noise * sigma_up
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class HeunDiscreteScheduler(KDiffusionScheduler):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, algorithm 1;
    k-diffusion's sample_heun).

    An Euler step, then the slope at its end, and the step redone with the average:

        d_i  = (x_i - D(x_i; sigma_i)) / sigma_i
        x'   = x_i + (sigma_{i+1} - sigma_i) d_i                     (1st call: Euler)
        d'   = (x' - D(x'; sigma_{i+1})) / sigma_{i+1}
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2        (2nd call: the correction)

    and the last step, to sigma = 0, is Euler's only (d' would divide by 0). Two model
    calls per step: as in diffusers, ``timesteps`` holds every timestep but the first twice
    (t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}) and ``sigmas`` likewise, so the sampling loop
    is unchanged; step() knows from its state which call this is.
    """

    order = 2
    _defaults = {**_SHARED, **_KARRAS, "beta_start": 0.00085, "beta_end": 0.012,
                 "clip_sample": False, "clip_sample_range": 1.0}
    _unsupported = dict(_OTHER_SIGMAS)

    def set_timesteps(self, num_inference_steps: int):
        """n timesteps and sigmas as Euler's, then each but the first (and the final 0) doubled."""
        super().set_timesteps(num_inference_steps)
        s, t = self.sigmas, self.timesteps
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)])

    def _reset(self):
        self._euler = None  # after the 1st call: (d_i, sigma_{i+1} - sigma_i, x_i)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """The Euler half of a step, or its correction (``generator`` is ignored: deterministic)."""
        i = self._step_index_for(timestep)
        first = self._euler is None
        sigma, sigma_next = (float(self.sigmas[j]) for j in ((i, i + 1) if first else (i - 1, i)))
        at = sigma if first else sigma_next  # the model has just seen x at this level
        x0 = self._clip(self._denoised(model_output, sample, at, at))
        if first:
            derivative, dt = (sample - x0) / sigma, sigma_next - sigma
            self._euler = (derivative, dt, sample)
        else:
            d_i, dt, x_i = self._euler
            derivative = (d_i + (sample - x0) / sigma_next) / 2
            sample, self._euler = x_i, None
        prev = sample + derivative * dt
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class LMSDiscreteScheduler(KDiffusionScheduler):
    """Linear multistep on the probability-flow ODE (k-diffusion's sample_lms; the
    Adams-Bashforth idea on a non-uniform sigma grid).

    Keep the last ``order`` slopes d_i, d_{i-1}, ... (d = (x - D(x; sigma)) / sigma), fit
    the polynomial through them in sigma, and integrate it over the step:

        x_{i+1} = x_i + sum_{j < order} c_j d_{i-j},
        c_j = integral_{sigma_i}^{sigma_{i+1}} l_j(s) ds,   l_j(s) = prod_{k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})

    l_j is the Lagrange basis polynomial that is 1 at sigma_{i-j} and 0 at the others: a
    polynomial of degree order - 1, integrated exactly here (diffusers calls scipy's quad
    on it: the same to float rounding). order = 4 by default (a step() argument, as in
    diffusers), and min(i + 1, order) while fewer slopes are known.
    """

    _defaults = {**_SHARED, **_KARRAS}
    _unsupported = dict(_OTHER_SIGMAS)

    def _reset(self):
        self.derivatives = []  # the last slopes, oldest first

    def lms_coefficient(self, order: int, i: int, j: int) -> float:
        """c_j for the step from sigmas[i] to sigmas[i + 1] with ``order`` slopes."""
        s = [float(v) for v in self.sigmas]
        basis = Polynomial([1.0])
        for k in range(order):
            if k != j:
                basis = basis * Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
        integral = basis.integ()
        return float(integral(s[i + 1]) - integral(s[i]))

    def step(self, model_output, timestep, sample, order: int = 4, generator=None, return_dict=True):
        """One LMS step sigma_i -> sigma_{i+1} (``generator`` is ignored: deterministic)."""
        i = self._step_index_for(timestep)
        sigma = float(self.sigmas[i])
        x0 = self._denoised(model_output, sample, sigma, sigma)
        self.derivatives = (self.derivatives + [(sample - x0) / sigma])[-order:]
        # (as diffusers: after set_begin_index fewer slopes than this order may be known,
        # and the sum then uses the first coefficients only)
        order = min(i + 1, order)
        coeffs = [self.lms_coefficient(order, i, j) for j in range(order)]
        prev = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class MultistepScheduler(SigmaScheduler):
    """What DPM-Solver and UniPC share: exponential integrators in log-SNR time.

    These keep x_t variance-preserving (scale_model_input is the identity, x_T = z) and
    write it as x_t = alpha_t x_0 + sigma_t epsilon with alpha_t = 1 / sqrt(sigma^2 + 1),
    sigma_t = sigma * alpha_t (sigma: the grid's noise-to-signal ratio), and
    lambda_t = log(alpha_t / sigma_t) = -log(sigma), half the log signal-to-noise ratio.
    In lambda the probability-flow ODE's linear part is solved exactly: from s to t,
    h = lambda_t - lambda_s > 0,

        x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x_0(lambda) dlambda

    (DPM-Solver++, Lu et al. 2022, eq. 9), and the solvers differ in how they approximate
    x_0(lambda) (or epsilon) from the model outputs of the last steps (``model_outputs``).

    Timesteps (int64): n + 1 evenly spaced points, the last (t = 0) dropped; with
    use_karras_sigmas, the timesteps nearest Karras' levels over the whole schedule.
    """

    _timestep_dtype = np.int64
    _karras_over_all_t = True

    def _reset(self):
        self.model_outputs = []    # the converted outputs of the last solver_order steps, oldest first
        self.lower_order_nums = 0  # steps taken, up to solver_order: the first steps use lower orders

    def _last_timestep(self) -> int:
        return self.num_train_timesteps

    def _spaced(self, n: int) -> np.ndarray:
        c, T, last = self.config, self.num_train_timesteps, self._last_timestep()
        if c["timestep_spacing"] == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        if c["timestep_spacing"] == "leading":
            return (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1] + int(c["steps_offset"])
        return np.arange(last, 0, -T / n).round() - 1

    def _karras_timesteps(self, t):
        return np.round(t)

    def _alpha_sigma(self, i: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) at grid point i."""
        s = float(self.sigmas[i])
        alpha = 1 / math.sqrt(s ** 2 + 1)
        return alpha, s * alpha

    def _lambda(self, i: int) -> float:
        """lambda at grid point i: -log(sigma), infinite at the final sigma = 0."""
        s = float(self.sigmas[i])
        return -math.log(s) if s > 0 else math.inf

    def _x0_eps(self, model_output, sample):
        """(x_0, epsilon) at the current grid point, whichever the model predicts."""
        s = float(self.sigmas[self.step_index])
        return self._x0_and_eps(model_output, sample, 1 / (s ** 2 + 1))

    def _remember(self, m):
        self.model_outputs = (self.model_outputs + [m])[-int(self.config["solver_order"]):]

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = alpha_t x_0 + sigma_t epsilon at each sample's timestep."""
        sigma = self._sigmas_for(timesteps)
        alpha = 1 / np.sqrt(sigma ** 2 + 1)
        return (self._per_sample(alpha, original_samples) * original_samples
                + self._per_sample(sigma * alpha, original_samples) * noise)

    def _check_order(self):
        order = self.config["solver_order"]
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order < 1:
            raise ValueError(f"{type(self).__name__}: solver_order must be a positive integer, got {order!r}")


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver++ multistep, "DPM++ 2M" (Lu et al. 2022, "DPM-Solver++: fast solver for
    guided sampling of diffusion probabilistic models", algorithm 2).

    With m_i the model's x_0 guesses (algorithm_type "dpmsolver++": data prediction), a
    step from s = t_i to t = t_{i+1}, h = lambda_t - lambda_s, h_0 = lambda_s - lambda_{t_{i-1}}:

        order 1 (= DDIM):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_0,     D_0 = m_i
        order 2 (2M):      the same plus a term in D_1 = (m_i - m_{i-1}) / r_0, r_0 = h_0 / h:
                           solver_type "midpoint":  - alpha_t (e^{-h} - 1) D_1 / 2
                           solver_type "heun":      + alpha_t ((e^{-h} - 1) / h + 1) D_1
        order 3:           D_1, D_2 from divided differences of the last three m; adds
                           + alpha_t ((e^{-h} - 1) / h + 1) D_1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D_2

    algorithm_type "dpmsolver" (Lu et al. 2022, DPM-Solver, noise prediction) is the same
    with epsilon for x_0, h for -h, alpha_t / alpha_s for sigma_t / sigma_s and sigma_t for
    alpha_t, with the sign flipped; it cannot end on sigma = 0 (final_sigmas_type
    "sigma_min", as diffusers requires).

    Lower orders: the first steps (too few outputs yet); the last step when it ends on
    sigma = 0, or with euler_at_final, or with lower_order_final and fewer than 15 steps
    (which also keeps the second-to-last at order 2 or less). lambda_min_clipped drops the
    last timesteps whose lambda is below it (for cosine schedules).
    """

    _defaults = {**_SHARED, **_KARRAS, "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                 "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
                 "lambda_min_clipped": -math.inf}
    _unsupported = {**_OTHER_SIGMAS, "thresholding": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                    "variance_type": None, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False}

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        # as diffusers: a DEIS or UniPC config read as DPM-Solver keeps its schedule
        if c["algorithm_type"] == "deis":
            c["algorithm_type"] = "dpmsolver++"
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        if c["algorithm_type"] not in ("dpmsolver++", "dpmsolver"):
            raise ValueError(f"DPMSolverMultistepScheduler: algorithm_type {c['algorithm_type']!r} is not supported "
                             "by minisd; choose dpmsolver++ or dpmsolver")
        if c["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {c['solver_type']!r}; choose midpoint or heun")
        self._check_order()
        if c["solver_order"] > 3:
            raise ValueError(f"DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got {c['solver_order']}")
        if c["algorithm_type"] == "dpmsolver" and c["final_sigmas_type"] == "zero":
            raise ValueError("DPMSolverMultistepScheduler: algorithm_type 'dpmsolver' cannot end on sigma = 0; "
                             "set final_sigmas_type='sigma_min' (as diffusers requires)")

    def _last_timestep(self) -> int:
        lam = 0.5 * np.log(self.alphas_cumprod / (1 - self.alphas_cumprod))  # lambda_t, decreasing in t
        return self.num_train_timesteps - int(np.searchsorted(lam[::-1], self.config["lambda_min_clipped"]))

    def _karras_timesteps(self, t):
        # as diffusers: rounded, except for the cosine schedule, whose int64 cast truncates them
        return t if self.config["beta_schedule"] == "squaredcos_cap_v2" else np.round(t)

    def _update(self, order: int, x):
        """x_{t_{i+1}} from x = x_{t_i} and the last ``order`` outputs (the formulas above)."""
        i, m = self.step_index, self.model_outputs
        if self.sigmas[i + 1] == self.sigmas[i]:  # a step of length 0 (Karras' sigma_min repeated as the final one)
            return x
        lam = [self._lambda(i + 1)] + [self._lambda(i - k) for k in range(order)]  # lambda_t, lambda_s, ...
        h = lam[0] - lam[1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = self._alpha_sigma(i + 1), self._alpha_sigma(i)
        if self.config["algorithm_type"] == "dpmsolver++":
            hh, scale, ratio = -h, alpha_t, sigma_t / sigma_s
        else:
            hh, scale, ratio = h, sigma_t, alpha_t / alpha_s
        phi_1 = math.expm1(hh)
        update = phi_1 * m[-1]
        if order == 2:
            d1 = (h / (lam[1] - lam[2])) * (m[-1] - m[-2])
            update = update + (0.5 * phi_1 if self.config["solver_type"] == "midpoint" else phi_1 / hh - 1) * d1
        elif order == 3:
            r0, r1 = (lam[1] - lam[2]) / h, (lam[2] - lam[3]) / h
            d1_0, d1_1 = (1 / r0) * (m[-1] - m[-2]), (1 / r1) * (m[-2] - m[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1 / (r0 + r1)) * (d1_0 - d1_1)
            update = update + (phi_1 / hh - 1) * d1 + ((phi_1 - hh) / hh ** 2 - 0.5) * d2
        return ratio * x - scale * update

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One multistep step t_i -> t_{i+1} (``generator`` is ignored: deterministic)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before step()")
        i, c = self._step_index_for(timestep), self.config
        n, order = len(self.timesteps), int(c["solver_order"])
        few = c["lower_order_final"] and n < 15
        last = i == n - 1 and (c["euler_at_final"] or few or c["final_sigmas_type"] == "zero")
        x0, eps = self._x0_eps(model_output, sample)
        self._remember(x0 if c["algorithm_type"] == "dpmsolver++" else eps)
        if order == 1 or self.lower_order_nums < 1 or last:
            order = 1
        elif order == 2 or self.lower_order_nums < 2 or (i == n - 2 and few):
            order = 2
        prev = self._update(order, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, int(c["solver_order"]))
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class UniPCMultistepScheduler(MultistepScheduler):
    """UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast
    sampling of diffusion models", NeurIPS): a multistep predictor UniP and a corrector UniC
    that costs no extra model call.

    With data prediction (predict_x0, the default) and m_i the model's x_0 guesses, a step
    from s = t_i to t = t_{i+1} with h = lambda_t - lambda_s, hh = -h, of order p:

        UniP:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{hh} - 1) m_i - alpha_t B(h) sum_{k<p} a_k D_k
        D_k = (m_{i-k} - m_i) / r_k,  r_k = (lambda_{t_{i-k}} - lambda_s) / h,
        B(h) = hh (solver_type "bh1") or e^{hh} - 1 ("bh2", the default),

    and the a_k solve sum_k a_k r_k^{q-1} = b_q for q < p (a_1 = 1/2 when p = 2), with
    b_q = q! g_q / B(h), g_1 = (e^{hh} - 1) / hh - 1, g_{q+1} = g_q / hh - 1 / (q+1)!
    (the paper's algorithm 2 with its phi functions). Once the model has seen x_t, at the
    next step, UniC redoes the step from x_s with the new output m_t as one more point
    (r = 1, D = m_t - m_i), solving the full p x p system for its weights c (c_1 = 1/2
    when p = 1); the corrected x_t is where the next prediction starts.

    predict_x0 False: the same with epsilon, alpha_t / alpha_s, sigma_t for alpha_t and
    hh = h. disable_corrector lists the steps whose result is left uncorrected;
    lower_order_final caps the order at the number of steps left.

    Where diffusers' arithmetic ends in 0 * inf (NaN) on the final sigma = 0 (predict_x0
    False, or lower_order_final False at order 2+), minisd refuses the config; with bh1 the
    last step's empty sum is left out, where diffusers multiplies it by B(h) = -inf.
    """

    _defaults = {**_SHARED, **_KARRAS, "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
                 "lower_order_final": True, "disable_corrector": [], "final_sigmas_type": "zero",
                 "sigma_min": None, "sigma_max": None}
    _unsupported = {**_OTHER_SIGMAS, "thresholding": False, "solver_p": None, "use_flow_sigmas": False,
                    "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "shift_terminal": None}

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c["solver_type"] in ("midpoint", "heun", "logrho"):  # a DPM-Solver config read as UniPC, as diffusers
            c["solver_type"] = "bh2"
        if c["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"unknown solver_type {c['solver_type']!r}; choose bh1 or bh2")
        self._check_order()
        if c["final_sigmas_type"] == "zero" and not c["predict_x0"]:
            raise ValueError("UniPCMultistepScheduler: predict_x0=False cannot end on sigma = 0 (its last step is "
                             "0 * inf; diffusers returns NaN); set final_sigmas_type='sigma_min'")
        if c["final_sigmas_type"] == "zero" and not c["lower_order_final"] and c["solver_order"] > 1:
            raise ValueError("UniPCMultistepScheduler: lower_order_final=False cannot end on sigma = 0 at order 2 "
                             "or more (the last step divides by lambda = inf; diffusers returns NaN); set "
                             "lower_order_final=True or final_sigmas_type='sigma_min'")

    def _reset(self):
        super()._reset()
        self.last_sample = None  # the x_s the last prediction started from (for UniC)
        self.this_order = None   # the order of the last prediction

    def _final_sigma(self, sigmas) -> float:
        if self.config["use_karras_sigmas"] and self.config["final_sigmas_type"] == "sigma_min":
            return float(sigmas[-1])  # as diffusers: Karras' sigma_min, which the config may set
        return super()._final_sigma(sigmas)

    def _terms(self, j: int, order: int):
        """For a step from grid point j to j + 1 with the outputs at j, j-1, ...: the start
        of the update, its scale, B(h), the r_k, the system's matrix R and right side b."""
        c = self.config
        lam_s = self._lambda(j)
        h = self._lambda(j + 1) - lam_s
        rks = [(self._lambda(j - k) - lam_s) / h for k in range(1, order)] + [1.0]
        hh = -h if c["predict_x0"] else h
        phi_1 = math.expm1(hh)
        b_h = hh if c["solver_type"] == "bh1" else phi_1
        b, g, factorial = [], phi_1 / hh - 1, 1
        for q in range(1, order + 1):
            b.append(g * factorial / b_h)
            factorial *= q + 1
            g = g / hh - 1 / factorial
        R = np.array([[r ** (q - 1) for r in rks] for q in range(1, order + 1)])
        (alpha_t, sigma_t), (alpha_s, sigma_s) = self._alpha_sigma(j + 1), self._alpha_sigma(j)
        m0 = self.model_outputs[-1]
        if c["predict_x0"]:
            start, scale = lambda x: sigma_t / sigma_s * x - alpha_t * phi_1 * m0, alpha_t
        else:
            start, scale = lambda x: alpha_t / alpha_s * x - sigma_t * phi_1 * m0, sigma_t
        return start, scale * b_h, rks, R, np.array(b)

    def _differences(self, rks):
        m = self.model_outputs
        return [(m[-(k + 1)] - m[-1]) / rks[k - 1] for k in range(1, len(rks))]

    def _predict(self, x, order: int):
        """UniP: x at the next grid point from x here and the last ``order`` outputs."""
        if self.sigmas[self.step_index + 1] == self.sigmas[self.step_index]:
            return x  # a step of length 0: Karras' sigma_min repeated as the final sigma
        start, scale, rks, R, b = self._terms(self.step_index, order)
        x_t = start(x)
        if order >= 2:
            rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_t - scale * sum(float(r) * d for r, d in zip(rhos, self._differences(rks)))
        return x_t

    def _correct(self, m_t, x_last, order: int):
        """UniC: the last step redone from x_last with this step's output m_t as one more point."""
        start, scale, rks, R, b = self._terms(self.step_index - 1, order)
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
        terms = self._differences(rks) + [m_t - self.model_outputs[-1]]
        return start(x_last) - scale * sum(float(r) * d for r, d in zip(rhos, terms))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """Correct the last step with this output, then predict the next (``generator`` is
        ignored: deterministic)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before step()")
        i, c = self._step_index_for(timestep), self.config
        x0, eps = self._x0_eps(model_output, sample)
        m = x0 if c["predict_x0"] else eps
        if i > 0 and (i - 1) not in c["disable_corrector"] and self.last_sample is not None:
            sample = self._correct(m, self.last_sample, self.this_order)
        self._remember(m)
        order = int(c["solver_order"])
        if c["lower_order_final"]:
            order = min(order, len(self.timesteps) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, int(c["solver_order"]))
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------
# Choosing and loading a scheduler
# ---------------------------------------------------------------------------------------

# The short names (``minisd generate --scheduler``, as the UIs name them) -> the class.
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler, "lms": LMSDiscreteScheduler,
              "dpm++2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def read_config(path: str) -> dict:
    """The dict in a scheduler_config.json: ``path`` is the file, its folder, or a model folder."""
    candidates = [path, os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
    for p in candidates:
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read scheduler config {p}: {e}") from None
            if not isinstance(config, dict):
                raise ValueError(f"scheduler config {p} is not a JSON object")
            return config
    raise ValueError(f"no {CONFIG_NAME} at {path} (looked in {', '.join(candidates[1:])})")


def get_scheduler_class(name: str):
    """A short name ("ddim", "dpm++2m", ...: ``SCHEDULERS``) or a class name
    ("DDIMScheduler", as in a config's _class_name) -> the minisd class."""
    by_class = {cls.__name__: cls for cls in SCHEDULERS.values()}
    cls = SCHEDULERS.get(str(name).lower()) or by_class.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} "
                         f"(or a class name: {', '.join(by_class)})")
    return cls


def load_scheduler(path_or_config, name: str | None = None) -> Scheduler:
    """A scheduler from a config (dict or path): the class its "_class_name" names, or
    ``name`` (a short or class name) if given, which keeps the config's schedule keys as
    diffusers' ``DDIMScheduler.from_config(...)`` does. A class minisd lacks is an error
    that names it, never a silent substitute.
    """
    config = path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config)
    if name is not None:
        return get_scheduler_class(name).from_config(config)
    class_name = config.get("_class_name")
    known = {cls.__name__: cls for cls in SCHEDULERS.values()}
    if class_name not in known:
        said = "has no _class_name" if class_name is None else f"names {class_name!r}, which minisd does not have"
        raise ValueError(f"unknown scheduler: the scheduler config {said}; minisd has {', '.join(known)}; "
                         f"pass a name ({', '.join(SCHEDULERS)}) to sample with one of them on its schedule")
    return known[class_name].from_config(config)
