"""What the explorer computes, apart from HTTP: three panels of the page, one method each.

    generate(request, emit)          text to image, streamed: after every step of the sampling
                                     loop, x_t decoded, the predicted noise epsilon and the
                                     predicted x_0; at the end the image and each prompt
                                     token's cross-attention over the latent grid, per step
    compare_guidance(request, emit)  one seed at several guidance scales w, side by side
    noise(request)                   the forward process at one t: x_t = sqrt(alpha_bar_t) x_0
                                     + sqrt(1 - alpha_bar_t) epsilon, for the pixels and for the
                                     VAE's latent, with alpha_bar_t and the signal-to-noise ratio

Everything goes through the pipeline's public API: ``minisd.load_pipeline``, ``pipe(...)``
with ``callback=`` and ``collect_attention=True``, ``pipe.decode_latents``,
``pipe.make_scheduler`` and ``minisd.pipeline.token_attention``. There is no second
sampling loop: the streamed steps are the pipeline's own, seen through its callback, and
the final image is what ``pipe(...)`` returns, bit for bit.

One computation at a time, all on one worker thread (the model is not shared between
threads, and a laptop has few cores): a new sampling request cancels the one before it.
The cancelled run's callback raises ``Cancelled`` at its next step, so it stops within one
UNet step instead of finishing (or waiting in a queue) for nobody. One long-lived thread
also keeps the memory flat: glibc gives each thread that allocates its own arena, and
minisd has each arena keep up to 64 MB of freed memory for reuse (backends/cpu_settings.py);
with the work on the HTTP server's thread per request the server grew from 110 to 258 MiB
over 40 requests (measured; on one worker it stays at 114 MiB over 100).

Input from the page is checked here; what cannot be used raises ``BadInput`` with one line
that names the field, which the server shows in the page while it keeps serving.
"""

from __future__ import annotations

import base64
import inspect
import io
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minisd.data.images import to_model_input, to_uint8

MAX_SIZE = 256  # px: every step is decoded twice on the CPU, so the explorer stays small
MAX_SCALES = 8  # guidance scales compared side by side
MAX_PROMPT_CHARS = 1000
MAX_UPLOAD_BYTES = 8 << 20
MAX_UPLOAD_PIXELS = 40_000_000
# The pipeline keeps every step's cross-attention probabilities until the run ends, about
# 0.5 MB a step for the shapes model: runs longer than this show no attention maps.
MAX_ATTENTION_STEPS = 200
NOISE_RANGE = 3.0  # latent channels and epsilon are drawn with [-3, 3] mapped to black ... white



def native_size(pipe) -> int:
    """The image side the model draws by default: the UNet's latent size times the VAE's
    factor, as the pipeline (and diffusers) choose it, not the VAE's own sample_size."""
    return int(pipe.default_size[0])

class BadInput(ValueError):
    """Input from the page that cannot be used: the message is shown in the page."""


class Cancelled(Exception):
    """Raised inside the pipeline's callback to stop a run that a newer request superseded."""


class Run:
    """One sampling request; ``cancel(reason)`` asks it to stop at its next step."""

    def __init__(self):
        self.reason = None

    def cancel(self, reason: str) -> None:
        self.reason = reason

    def check(self) -> None:
        if self.reason is not None:
            raise Cancelled(self.reason)


# ---- images for the page ---------------------------------------------------------------

def png(image: np.ndarray) -> str:
    """uint8 (H, W, 3) or (H, W) -> a data: URL of a PNG (the page scales it up, pixelated)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def channel_tiles(z: np.ndarray, value_range: float = NOISE_RANGE) -> np.ndarray:
    """A latent (C, h, w) as C grey tiles in a square grid, one white pixel apart: [-r, r] -> 0 ... 255.

    The 4 channels of a latent (or of the predicted noise) are not colours, so each is
    drawn on its own (2 x 2 for SD's 4), all on one fixed scale so that tiles and steps compare.
    """
    c, h, w = z.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grey = np.clip(np.round((np.asarray(z, np.float64) / value_range + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 255, np.uint8)
    for i in range(c):
        r, k = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = grey[i]
    return out


def _decode_data_url(text: str) -> bytes:
    if not isinstance(text, str) or not text.startswith("data:") or "," not in text:
        raise BadInput("image must be a data: URL (the page reads the file you pick)")
    header, payload = text.split(",", 1)
    if ";base64" not in header:
        raise BadInput("image must be base64-encoded")
    if len(payload) * 3 // 4 > MAX_UPLOAD_BYTES:
        raise BadInput(f"image is larger than {MAX_UPLOAD_BYTES >> 20} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise BadInput("image is not valid base64") from None


def read_image(data_url: str, size: int) -> np.ndarray:
    """An uploaded image -> uint8 (size, size, 3): transparency over white, the centre square, resized."""
    from PIL import Image, UnidentifiedImageError

    raw = _decode_data_url(data_url)
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_UPLOAD_PIXELS:
            raise BadInput(f"image is {img.width} x {img.height} pixels, more than {MAX_UPLOAD_PIXELS:,}")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadInput(f"image cannot be read: {e}") from None
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    img = img.convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


# ---- checking what the page sent -------------------------------------------------------

def _whole(request: dict, name: str, default, low: int, high: int | None = None, why: str = "") -> int:
    value = request.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInput(f"{name} must be a whole number, got {value!r}")
    if high is None and value < low:
        raise BadInput(f"{name} must be a whole number >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise BadInput(f"{name} must be from {low} to {high}{why}, got {value}")
    return value


def _number(request: dict, name: str, default, low: float, high: float = math.inf) -> float:
    value = request.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise BadInput(f"{name} must be a number >= {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
                       + f", got {value:g}")
    return float(value)


def _text(request: dict, name: str) -> str:
    value = request.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise BadInput(f"{name} must be text, got {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadInput(f"{name} is {len(value)} characters long; at most {MAX_PROMPT_CHARS}")
    return value


def _token_label(token: str) -> str:
    """"3:circle</w>" (token_attention's key) -> "circle"; a word piece keeps its place in the word."""
    word = token.split(":", 1)[1]
    return word[:-4] if word.endswith("</w>") else word + "-"


# ---- the explorer ----------------------------------------------------------------------

class Explorer:
    """The pipelines (a few, by folder), the worker thread that runs them, and the latest sampling run.

    The public methods are called from the server's threads; each hands its work to the one
    worker and waits for it (emit, called on the worker, writes to the caller's stream).
    """

    def __init__(self, model: str | None = None, cache_size: int = 2):
        self.default_model = model
        self.cache_size = cache_size
        self._pipes: OrderedDict = OrderedDict()  # touched on the worker only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minisd-explore")
        self._state = threading.Lock()  # guards _current
        self._current: Run | None = None

    def _on_worker(self, work, *args):
        """Run work(*args) on the worker thread, after what is queued there; its result or its exception."""
        return self._worker.submit(work, *args).result()

    # -- models --------------------------------------------------------------------------

    def model_path(self, model) -> str:
        from minisd.pipeline import DEFAULT_MODEL

        if model is not None and not isinstance(model, str):
            raise BadInput(f"model must be a folder path, got {model!r}")
        model = (model or "").strip() or self.default_model or DEFAULT_MODEL
        return os.path.abspath(os.path.expanduser(model))

    def pipeline(self, model=None):
        """The pipeline of the model folder (the server's --model when empty), loaded once and kept."""
        from minisd.pipeline import load_pipeline

        path = self.model_path(model)
        if path in self._pipes:
            self._pipes.move_to_end(path)
            return self._pipes[path]
        try:
            pipe = load_pipeline(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            message = e.args[0] if e.args else str(e)
            raise BadInput(f"model: {message}") from None
        self._pipes[path] = pipe
        while len(self._pipes) > self.cache_size:
            self._pipes.popitem(last=False)
        return pipe

    def load(self, model=None):
        return self._on_worker(self.pipeline, model)

    @staticmethod
    def scheduler_names() -> tuple[str, ...]:
        """The scheduler names the pipeline accepts today (other helpers add more; read at run time)."""
        from minisd import pipeline, schedulers

        names = getattr(pipeline, "SCHEDULER_NAMES", None) or tuple(schedulers.SCHEDULERS)
        return tuple(names)

    @staticmethod
    def accepts(pipe, name: str) -> bool:
        """Does pipe(...) take this keyword (negative_prompt, height, width)?"""
        return name in inspect.signature(pipe.__call__).parameters

    def info(self, request: dict) -> dict:
        """What the page offers for a model: schedulers, sizes, whether there is a negative prompt."""
        from minisd.data import shapes
        from minisd.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

        pipe = self.load(request.get("model"))
        native = native_size(pipe)
        return {
            "model": pipe.path,
            "schedulers": list(self.scheduler_names()),
            "default_scheduler": type(pipe.scheduler).__name__,
            "negative_prompt": self.accepts(pipe, "negative_prompt"),
            "size": {"native": native, "adjustable": self.accepts(pipe, "height") and self.accepts(pipe, "width"),
                     "multiple": pipe.vae.downsample_factor, "max": MAX_SIZE},
            "latent_shape": list(pipe.latent_shape),
            "num_train_timesteps": pipe.scheduler.num_train_timesteps,
            "defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "seed": 0},
            "shapes": {"colors": list(shapes.COLORS), "shapes": list(shapes.SHAPES), "sizes": list(shapes.SIZES),
                       "positions": list(shapes.POSITIONS)},
        }

    # -- runs ----------------------------------------------------------------------------

    def _supersede(self) -> Run:
        """A new run becomes the current one; the one before it is cancelled."""
        run = Run()
        with self._state:
            if self._current is not None:
                self._current.cancel("superseded by a newer request")
            self._current = run
        return run

    def cancel_all(self, reason: str) -> None:
        with self._state:
            if self._current is not None:
                self._current.cancel(reason)

    def _sampling(self, request: dict, pipe) -> dict:
        """The keyword arguments of pipe(...) from the page's fields, each checked."""
        T = pipe.scheduler.num_train_timesteps
        kwargs = {
            "prompt": _text(request, "prompt"),
            "steps": _whole(request, "steps", 50, 1, T, f" (the model's {T} training timesteps)"),
            "guidance_scale": _number(request, "guidance", 5.0, 0.0),
            "seed": _whole(request, "seed", 0, 0),
        }
        scheduler = request.get("scheduler") or None
        if scheduler is not None:
            names = self.scheduler_names()
            if not isinstance(scheduler, str) or scheduler.lower() not in names:
                raise BadInput(f"scheduler must be one of {', '.join(names)}, got {scheduler!r}")
            kwargs["scheduler"] = scheduler.lower()
        negative = _text(request, "negative_prompt")
        if negative:
            if not self.accepts(pipe, "negative_prompt"):
                raise BadInput("negative_prompt: this pipeline has none yet (pipe(...) takes no negative_prompt)")
            kwargs["negative_prompt"] = negative
        native = native_size(pipe)
        size = request.get("size")
        if size not in (None, "", native):
            size = _whole(request, "size", native, 1, MAX_SIZE, " px (every step is decoded on the CPU)")
            factor = pipe.vae.downsample_factor
            if size % factor:
                raise BadInput(f"size must be a multiple of {factor} (the VAE's downsampling), got {size}")
            if not (self.accepts(pipe, "height") and self.accepts(pipe, "width")):
                raise BadInput(f"size: this pipeline samples only at {native} x {native} px "
                               "(pipe(...) takes no height/width yet)")
            kwargs["height"] = kwargs["width"] = size
        try:  # the scheduler has the last word on steps (DDIM's steps_offset pushes 1000 of 1000 past the end)
            pipe.make_scheduler(kwargs.get("scheduler")).set_timesteps(kwargs["steps"])
        except ValueError as e:
            raise BadInput(f"steps: {e}") from None
        return kwargs

    def _new_run(self, request) -> Run:
        """Check what needs no model, then cancel the run before this one: a bad request
        (steps 0) does not stop a good run. The rest is checked once the model is loaded."""
        if not isinstance(request, dict):
            raise BadInput("the request must be a JSON object")
        _text(request, "prompt")
        _whole(request, "steps", 50, 1)
        _number(request, "guidance", 5.0, 0.0)
        return self._supersede()

    @staticmethod
    def _display_divisor(sched):
        """A function i -> what the sample after model call i is divided by to be a variance-preserving x_t.

        DDPM, DDIM, PNDM, DPM-Solver and UniPC sample x_t itself (init_noise_sigma 1).
        Euler, Euler a, Heun and LMS work in sigma-space, x = x_0 + sigma epsilon, whose noise
        is 15 times the image at the start: x_t = x / sqrt(sigma^2 + 1), what the UNet is fed
        next (scale_model_input), with sigma = sigmas[i + 1] (0 after the last call).
        ``sched`` is a scheduler like the run's, after set_timesteps.
        """
        sigmas = getattr(sched, "sigmas", None)
        if float(sched.init_noise_sigma) == 1.0 or sigmas is None or len(sigmas) != len(sched.timesteps) + 1:
            return lambda i: 1.0
        return lambda i: math.sqrt(float(sigmas[i + 1]) ** 2 + 1)

    def generate(self, request: dict, emit) -> None:
        """Text to image, streamed through ``emit(event, data)`` (see _generate)."""
        run = self._new_run(request)
        self._on_worker(self._generate, run, request, emit)

    def _generate(self, run: Run, request: dict, emit) -> None:
        """Text to image, streamed through ``emit(event, data)``:

            start      {steps (model calls, each a step event), requested_steps, timesteps, tokens}
            warning    {messages}                        what the pipeline warned of (before step 0)
            step       {i, t, xt, eps, x0, seconds}      PNG data URLs, after each step
            done       {image, attention: {tokens, h, w, maps[step][token][h*w]}, seconds}
            cancelled  {reason}                          superseded by a newer request
        """
        from minisd.backends import to_numpy
        from minisd.pipeline import token_attention

        if run.reason is not None:  # superseded while it waited for the worker
            emit("cancelled", {"reason": run.reason})
            return
        pipe = self.pipeline(request.get("model"))
        kwargs = self._sampling(request, pipe)
        sched = pipe.make_scheduler(kwargs.get("scheduler"))  # the run's timesteps, for the page
        sched.set_timesteps(kwargs["steps"])
        divisor = self._display_divisor(sched)
        calls = len(sched.timesteps)  # one callback per model call: Heun makes 2 a step, PNDM's warm-up more
        words = pipe.tokenizer.tokenize(kwargs["prompt"])
        emit("start", {"steps": calls, "requested_steps": kwargs["steps"], "timesteps": [int(t) for t in sched.timesteps],
                       "tokens": [_token_label(f"{i}:{w}") for i, w in enumerate(words)]})
        start = time.perf_counter()

        def callback(i, t, latents, noise_pred, pred_x0):
            run.check()
            if caught:  # the pipeline's warnings (an unknown word, a prompt cut at 77 tokens) come before step 0
                emit("warning", {"messages": [str(w.message) for w in caught]})
                caught.clear()
            z = to_numpy(latents)[:1] / divisor(i)  # as scale_model_input rounds it
            # one image per decode: a batch of two rounds differently from the pipeline's own decode
            xt = pipe.decode_latents(z)[0]
            x0 = pipe.decode_latents(to_numpy(pred_x0)[:1])[0]
            emit("step", {"i": i, "t": int(t), "xt": png(xt), "x0": png(x0),
                          "eps": png(channel_tiles(to_numpy(noise_pred)[0])),
                          "seconds": round(time.perf_counter() - start, 4)})

        attend = calls <= MAX_ATTENTION_STEPS
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = pipe(callback=callback, collect_attention=attend, **kwargs)[0]
        except Cancelled as e:
            emit("cancelled", {"reason": str(e)})
            return
        size = kwargs.get("height", native_size(pipe))
        latent_hw = (size // pipe.vae.downsample_factor,) * 2
        maps = token_attention(pipe.attention_maps, pipe.tokenizer, kwargs["prompt"], latent_hw) if attend else {}
        pipe.attention_maps = None  # the pipeline keeps the last run's maps; the page has them now
        order = list(maps)
        stacked = np.stack([maps[k] for k in order], axis=1) if order else np.zeros((calls, 0, *latent_hw))
        emit("done", {"image": png(image), "seconds": round(time.perf_counter() - start, 4),
                      "attention": {"tokens": [_token_label(k) for k in order], "h": latent_hw[0],
                                    "w": latent_hw[1], "kept": attend, "max_steps": MAX_ATTENTION_STEPS,
                                    "maps": np.round(stacked.reshape(len(stacked), len(order), -1), 4).tolist()}})

    def compare_guidance(self, request: dict, emit) -> None:
        """One seed, one prompt, several guidance scales w, streamed one image at a time:

            start      {scales}
            image      {scale, image, seconds}
            done       {seconds}
            cancelled  {reason}
        The same seed draws the same z_T for every w, so the images differ by w alone.
        """
        scales = request.get("scales") if isinstance(request, dict) else None
        if not isinstance(scales, list) or not 1 <= len(scales) <= MAX_SCALES:
            raise BadInput(f"scales must be a list of 1 to {MAX_SCALES} numbers, got {scales!r}")
        scales = [_number({"scale": s}, "scale", None, 0.0) for s in scales]
        run = self._new_run(request)
        self._on_worker(self._compare_guidance, run, request, scales, emit)

    def _compare_guidance(self, run: Run, request: dict, scales: list, emit) -> None:
        if run.reason is not None:
            emit("cancelled", {"reason": run.reason})
            return
        pipe = self.pipeline(request.get("model"))
        kwargs = self._sampling(request, pipe)
        emit("start", {"scales": scales})
        start = time.perf_counter()
        for w in scales:
            try:
                image = pipe(callback=lambda *step: run.check(), **{**kwargs, "guidance_scale": w})[0]
            except Cancelled as e:
                emit("cancelled", {"reason": str(e)})
                return
            emit("image", {"scale": w, "image": png(image), "seconds": round(time.perf_counter() - start, 4)})
        emit("done", {"seconds": round(time.perf_counter() - start, 4)})

    def noise(self, request: dict) -> dict:
        """The forward process at timestep t (see _noise)."""
        if not isinstance(request, dict):
            raise BadInput("the request must be a JSON object")
        return self._on_worker(self._noise, request)

    def _noise(self, request: dict) -> dict:
        """The forward process at timestep t, in pixels and in the latent (DDPM eq. 4):

            x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) epsilon,   SNR(t) = alpha_bar_t / (1 - alpha_bar_t)

        x_0 is a shapes image (request["shape"]: color, shape, size, position) or an uploaded
        one (request["image"], a data: URL); epsilon is drawn from request["seed"]. The latent
        is z_0 = scaling_factor * E(x_0).mean, noised with the same alpha_bar_t and decoded.
        Also returned: the SNR measured on this sample, |sqrt(a) x_0|^2 / |sqrt(1-a) epsilon|^2,
        which depends on the image's own power (a white picture in [-1, 1] has a lot; the
        latent, scaled to unit variance, less).
        """
        from minisd.data import shapes
        from minisd.tensor import no_grad

        pipe = self.pipeline(request.get("model"))
        size = native_size(pipe)
        T = pipe.scheduler.num_train_timesteps
        t = _whole(request, "t", 0, 0, T - 1, " (the model's training timesteps)")
        seed = _whole(request, "seed", 0, 0)
        if request.get("image"):
            picture = read_image(request["image"], size)
        else:
            spec = request.get("shape") or {}
            if not isinstance(spec, dict):
                raise BadInput("shape must be an object with color, shape, size and position")
            try:
                picture = shapes.render(spec.get("color", "red"), spec.get("shape", "circle"),
                                        spec.get("size", "large"), spec.get("position", "center"))
            except (ValueError, KeyError) as e:
                raise BadInput(f"shape: {e.args[0] if e.args else e}") from None
            if picture.shape[0] != size:
                from PIL import Image

                picture = np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.NEAREST))
        # The forward process is the same for every scheduler of this schedule; DDPM's add_noise
        # is its formula (Euler's works in sigma-space instead).
        forward = pipe.make_scheduler("ddpm")
        a = float(forward.alphas_cumprod[t])
        rng = np.random.default_rng(seed)
        x0 = to_model_input(picture)[None]
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        xt = forward.add_noise(x0, eps, np.array([t]))
        with no_grad():
            z0 = pipe.vae.encode(x0).mean.numpy() * np.float32(pipe.vae.config["scaling_factor"])
        eps_z = rng.standard_normal(z0.shape).astype(np.float32)
        zt = forward.add_noise(z0, eps_z, np.array([t]))
        decoded = pipe.decode_latents(np.concatenate([z0, zt]))

        def measured_snr(signal, noise):
            noise_power = float(np.sum((math.sqrt(1 - a) * noise.astype(np.float64)) ** 2))
            signal_power = float(np.sum((math.sqrt(a) * signal.astype(np.float64)) ** 2))
            return signal_power / noise_power if noise_power > 0 else None

        snr = a / (1 - a) if a < 1 else None
        return {
            "t": t, "alpha_bar": a, "sqrt_alpha_bar": math.sqrt(a), "sqrt_one_minus_alpha_bar": math.sqrt(1 - a),
            "snr": snr, "snr_db": 10 * math.log10(snr) if snr else None,
            "image": png(picture),
            "pixel": {"x0": png(picture), "xt": png(to_uint8(xt[0])), "measured_snr": measured_snr(x0, eps)},
            "latent": {"z0": png(channel_tiles(z0[0])), "zt": png(channel_tiles(zt[0])),
                       "decoded_z0": png(decoded[0]), "decoded_zt": png(decoded[1]),
                       "measured_snr": measured_snr(z0, eps_z), "shape": list(z0.shape[1:])},
        }
