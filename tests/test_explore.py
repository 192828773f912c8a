"""minisd explore: the server driven by a real HTTP client, loopback only, every wait bounded.

The images it streams are held against the pipeline's own, computed here independently:
the final image bit for bit, each step's x_t and x_0 as pipe.decode_latents gives them
from the callback's arrays, the forward process against its formula in float64.
"""

import base64
import http.client
import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import minisd
from minisd import pipeline as pipeline_module
from minisd.explore.app import NOISE_RANGE, Explorer
from minisd.explore.server import make_server, url_of
from minisd.pipeline import token_attention

PROMPT = "a small red circle in the top left"
TIMEOUT = 60  # s: any one request; a run of 5 steps takes well under a second


@pytest.fixture(scope="module")
def server():
    """The explorer on a free loopback port, served from a thread of this process."""
    httpd = make_server(Explorer(), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.explorer.cancel_all("the tests are done")
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def pipe():
    """A pipeline of our own, independent of the server's: the reference."""
    return minisd.load_pipeline()


def _connect(server, timeout=TIMEOUT):
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=timeout)


def get(server, path, headers=None):
    conn = _connect(server)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.getheader("Content-Type"), r.read()


def post(server, path, body, content_type="application/json"):
    """POST a JSON body: (status, the JSON answer) or, for a stream, (200, [(event, data), ...])."""
    conn = _connect(server)
    conn.request("POST", path, body if isinstance(body, (str, bytes)) else json.dumps(body),
                 {"Content-Type": content_type})
    r = conn.getresponse()
    if r.getheader("Content-Type", "").startswith("text/event-stream"):
        return r.status, list(events(r))
    return r.status, json.loads(r.read())


def events(response):
    """The Server-Sent Events of a response as (event, data) pairs, as they arrive."""
    event, data = None, []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and event is not None:
            yield event, json.loads("".join(data))
            event, data = None, []


def image(data_url):
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def by_event(stream, name):
    return [d for e, d in stream if e == name]


# ---- the command: starts on a free port, answers, stops on a signal ------------------------

def _start_cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minisd", "explore", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if not line or "http://" not in line[0]:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"minisd explore did not print its address: {line} {err}")
    return proc, line[0].split("serving ", 1)[1].split()[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_on_a_free_port_and_stops_on_a_signal_mid_run(signum):
    proc, url = _start_cli()
    try:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        host, port = url[len("http://"):].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("GET", "/")
        r = conn.getresponse()
        assert r.status == 200 and b"minisd explore" in r.read()
        # a long run is streaming when the signal comes: the server stops all the same, at once
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("POST", "/api/generate", json.dumps({"prompt": PROMPT, "steps": 900}),
                     {"Content-Type": "application/json"})
        stream = events(conn.getresponse())
        assert next(stream)[0] == "start" and next(stream)[0] == "step"
        start = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "minisd explore: stopped" in out
    assert "Traceback" not in err


def test_cli_bad_port_and_bad_model_are_one_line(tmp_path, capsys):
    from minisd.cli import main

    assert main(["explore", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "70000" in err and len(err.strip().splitlines()) == 1
    assert main(["explore", "--port", "0", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not a complete model folder" in err and len(err.strip().splitlines()) == 1


def test_cli_port_taken_is_one_line(capsys):
    from minisd.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["explore", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"minisd: error: cannot listen on 127.0.0.1:{port}: Address already in use"


# ---- the page and what it is told about the model --------------------------------------------

def test_page_and_info(server, pipe):
    status, kind, body = get(server, "/")
    assert status == 200 and kind.startswith("text/html") and b'id="generate"' in body
    status, _, body = get(server, "/api/info")
    info = json.loads(body)
    assert status == 200
    # what the pipeline offers today, read at run time (other schedulers, a negative prompt may come)
    assert info["schedulers"] == list(pipeline_module.SCHEDULER_NAMES)
    assert info["negative_prompt"] == _takes(pipe, "negative_prompt")
    assert info["size"]["adjustable"] == _takes(pipe, "height", "width")
    assert info["latent_shape"] == list(pipe.latent_shape)
    assert info["num_train_timesteps"] == pipe.scheduler.num_train_timesteps
    assert get(server, "/nothing")[0] == 404


def test_requests_must_name_this_server_and_be_json(server):
    status, _, body = get(server, "/api/info", headers={"Host": "attacker.example:7860"})
    assert status == 403 and "Host" in json.loads(body)["error"]
    status, answer = post(server, "/api/noise", "t=5", content_type="application/x-www-form-urlencoded")
    assert status == 400 and "application/json" in answer["error"]
    status, answer = post(server, "/api/noise", "{not json")
    assert status == 400 and "not JSON" in answer["error"]


# ---- text to image: the pipeline's images, streamed ------------------------------------------

def _unet_inputs(pipe):
    """Record what the UNet is fed at each call (the first image of the batch): x_t, variance-preserving."""
    seen, forward = [], pipe.unet.forward

    def recording(sample, *args, **kwargs):
        seen.append(np.array(sample[:1]))
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = recording
    return seen, lambda: vars(pipe.unet).pop("forward")


@pytest.mark.parametrize("scheduler", pipeline_module.SCHEDULER_NAMES)
def test_generate_streams_the_pipelines_own_steps_and_image(server, pipe, scheduler):
    steps, seed, w = 4, 3, 5.0  # PNDM's warm-up needs 4
    status, stream = post(server, "/api/generate", {"prompt": PROMPT, "steps": steps, "seed": seed,
                                                     "guidance": w, "scheduler": scheduler})
    assert status == 200, stream
    start = by_event(stream, "start")[0]
    calls = start["steps"]  # model calls: Heun makes two a step
    assert start["requested_steps"] == steps and calls >= steps
    assert [e for e, _ in stream] == ["start"] + ["step"] * calls + ["done"]

    seen = []
    fed, restore = _unet_inputs(pipe)
    try:
        reference = pipe(PROMPT, steps=steps, guidance_scale=w, seed=seed, scheduler=scheduler,
                         collect_attention=True,
                         callback=lambda i, t, z, eps, x0: seen.append((t, np.array(z), np.array(eps), np.array(x0))))
    finally:
        restore()
    assert len(seen) == calls == len(fed)
    done = by_event(stream, "done")[0]
    np.testing.assert_array_equal(image(done["image"]), reference[0])  # bit-identical uint8

    for i, (step, (t, z, eps, x0)) in enumerate(zip(by_event(stream, "step"), seen)):
        assert step["i"] == i and step["t"] == t
        np.testing.assert_array_equal(image(step["x0"]), pipe.decode_latents(x0[:1])[0])
        # x_t after a step is what the UNet is fed at the next one (for Euler & co: x / sqrt(sigma^2 + 1))
        x_t = fed[i + 1] if i + 1 < calls else z[:1]
        np.testing.assert_array_equal(image(step["xt"]), pipe.decode_latents(x_t)[0])
        # the noise, channel by channel on a 2 x 2 grid, grey = (eps / 3 + 1) * 127.5
        tiles = image(step["eps"]).astype(np.float64) / 127.5 - 1
        for c in range(4):
            r, k = divmod(c, 2)
            np.testing.assert_allclose(tiles[r * 9:r * 9 + 8, k * 9:k * 9 + 8] * NOISE_RANGE,
                                       np.clip(eps[0, c], -NOISE_RANGE, NOISE_RANGE), atol=NOISE_RANGE / 127.5)
    np.testing.assert_array_equal(image(by_event(stream, "step")[-1]["xt"]), reference[0])

    # each word's cross-attention over the latent grid, at every step: the pipeline's maps
    attention = done["attention"]
    expected = token_attention(pipe.attention_maps, pipe.tokenizer, PROMPT, pipe.latent_shape[1:])
    assert attention["tokens"] == PROMPT.split()
    maps = np.array(attention["maps"])
    assert maps.shape == (calls, len(expected), pipe.latent_shape[1] * pipe.latent_shape[2])
    for k, key in enumerate(expected):
        np.testing.assert_allclose(maps[:, k], expected[key].reshape(calls, -1), atol=6e-5)


def _takes(pipe, *names):
    return all(n in inspect.signature(pipe.__call__).parameters for n in names)


def test_negative_prompt_where_the_pipeline_takes_one(server, pipe):
    body = {"prompt": PROMPT, "negative_prompt": "a large blue square in the center", "steps": 3, "seed": 2}
    status, answer = post(server, "/api/generate", body)
    if not _takes(pipe, "negative_prompt"):
        assert status == 400 and "negative_prompt" in answer["error"]
        return
    assert status == 200, answer
    expected = pipe(PROMPT, negative_prompt=body["negative_prompt"], steps=3, seed=2, guidance_scale=5.0)[0]
    np.testing.assert_array_equal(image(by_event(answer, "done")[0]["image"]), expected)


def test_another_size_where_the_pipeline_takes_height_and_width(server, pipe):
    status, answer = post(server, "/api/generate", {"prompt": PROMPT, "size": 40, "steps": 2, "seed": 5})
    if not _takes(pipe, "height", "width"):
        assert status == 400 and "takes no height/width" in answer["error"]
        return
    assert status == 200, answer
    done = by_event(answer, "done")[0]
    expected = pipe(PROMPT, height=40, width=40, steps=2, seed=5, guidance_scale=5.0)[0]
    np.testing.assert_array_equal(image(done["image"]), expected)
    assert (done["attention"]["h"], done["attention"]["w"]) == (10, 10)
    status, answer = post(server, "/api/generate", {"prompt": PROMPT, "size": 42, "steps": 2})
    assert status == 400 and "size must be a multiple of 4" in answer["error"]


def test_guidance_scales_side_by_side_are_the_pipelines(server, pipe):
    status, stream = post(server, "/api/guidance", {"prompt": PROMPT, "steps": 3, "seed": 1, "scales": [0, 1, 7.5]})
    assert status == 200, stream
    shown = by_event(stream, "image")
    assert [d["scale"] for d in shown] == [0, 1, 7.5] and by_event(stream, "done")
    for d in shown:
        np.testing.assert_array_equal(image(d["image"]), pipe(PROMPT, steps=3, seed=1, guidance_scale=d["scale"])[0])


# ---- forward noising -------------------------------------------------------------------------

def test_noise_is_the_forward_process(server, pipe):
    from minisd.data import shapes

    t, seed = 400, 7
    status, d = post(server, "/api/noise", {"t": t, "seed": seed, "shape": {"color": "green", "shape": "triangle",
                                                                           "size": "large", "position": "center"}})
    assert status == 200, d
    a = float(pipe.scheduler.alphas_cumprod[t])
    assert d["alpha_bar"] == pytest.approx(a, rel=1e-12) and d["snr"] == pytest.approx(a / (1 - a), rel=1e-12)
    x0_uint8 = shapes.render("green", "triangle", "large", "center")
    np.testing.assert_array_equal(image(d["pixel"]["x0"]), x0_uint8)
    x0 = x0_uint8.astype(np.float64).transpose(2, 0, 1) / 127.5 - 1
    eps = np.random.default_rng(seed).standard_normal((1, *x0.shape)).astype(np.float32)[0]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps  # float64: the server's float32 may round a level apart
    expected = np.clip(np.round((xt + 1) * 127.5), 0, 255).transpose(1, 2, 0)
    assert np.abs(image(d["pixel"]["xt"]).astype(int) - expected).max() <= 1
    measured = a * np.sum(x0 ** 2) / ((1 - a) * np.sum(eps.astype(np.float64) ** 2))
    assert d["pixel"]["measured_snr"] == pytest.approx(measured, rel=1e-5)
    assert image(d["latent"]["zt"]).shape == (17, 17) and image(d["latent"]["decoded_zt"]).shape == (32, 32, 3)


def test_noise_of_an_uploaded_image_is_its_centre_square_resized(server):
    picture = np.zeros((48, 64, 3), np.uint8)
    picture[:, 8:56] = (200, 30, 30)  # the centre 48 x 48 is red, the sides black
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, d = post(server, "/api/noise", {"t": 0, "image": url})
    assert status == 200, d
    x0 = image(d["pixel"]["x0"])
    assert x0.shape == (32, 32, 3) and np.abs(x0.astype(int) - (200, 30, 30)).max() <= 2


def test_every_computation_runs_on_the_one_worker_thread(server, monkeypatch):
    # A thread per request that allocates images grows the process (glibc gives each its own
    # arena): 110 -> 258 MiB over 40 requests before the work moved to one worker thread.
    threads = set()
    decode = minisd.pipeline.StableDiffusionPipeline.decode_latents

    def recording(self, latents):
        threads.add(threading.current_thread().name)
        return decode(self, latents)

    monkeypatch.setattr(minisd.pipeline.StableDiffusionPipeline, "decode_latents", recording)
    for _ in range(2):
        assert post(server, "/api/generate", {"prompt": PROMPT, "steps": 2})[0] == 200
        assert post(server, "/api/guidance", {"prompt": PROMPT, "steps": 2, "scales": [3]})[0] == 200
        assert post(server, "/api/noise", {"t": 50})[0] == 200
    assert len(threads) == 1 and threads.pop().startswith("minisd-explore"), threads


# ---- bad input: a message for the page, and the server serves on ------------------------------

BAD = [
    ("/api/generate", {"prompt": PROMPT, "steps": 0}, "steps must be a whole number >= 1, got 0"),
    ("/api/generate", {"prompt": PROMPT, "steps": None}, "steps must be a whole number, got None"),
    ("/api/generate", {"prompt": PROMPT, "steps": 5000}, "steps must be from 1 to 1000 (the model's 1000 training"),
    ("/api/generate", {"prompt": PROMPT, "steps": 1000}, "steps: DDIMScheduler: 1000 steps with steps_offset=1"),
    ("/api/generate", {"prompt": PROMPT, "steps": 3, "size": 100000}, "size must be from 1 to 256"),
    ("/api/generate", {"prompt": PROMPT, "steps": 3, "guidance": -1}, "guidance must be a number >= 0"),
    ("/api/generate", {"prompt": PROMPT, "steps": 3, "scheduler": "nope"}, "scheduler must be one of"),
    ("/api/generate", {"prompt": PROMPT, "steps": 3, "seed": -4}, "seed must be a whole number >= 0"),
    ("/api/generate", {"prompt": 5}, "prompt must be text"),
    ("/api/guidance", {"prompt": PROMPT, "steps": 3, "scales": []}, "scales must be a list of 1 to 8"),
    ("/api/guidance", {"prompt": PROMPT, "steps": 3, "scales": [1, None]}, "scale must be a finite number"),
    ("/api/noise", {"t": 1000}, "t must be from 0 to 999"),
    ("/api/noise", {"t": 3, "shape": {"color": "mauve"}}, "unknown colour 'mauve'"),
    ("/api/noise", {"t": 3, "image": "data:image/png;base64,AAAA"}, "image cannot be read"),
    ("/api/noise", {"t": 3, "image": "hello"}, "image must be a data: URL"),
]


@pytest.mark.parametrize("path, body, message", BAD, ids=[m.split(" ")[0] + "-" + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_input_is_a_message_and_the_server_keeps_serving(server, path, body, message):
    status, answer = post(server, path, body)
    assert status == 400 and message in answer["error"], answer
    assert "\n" not in answer["error"]
    assert get(server, "/api/info")[0] == 200


def test_an_empty_model_folder_is_a_message(server, tmp_path):
    status, answer = post(server, "/api/generate", {"model": str(tmp_path), "prompt": PROMPT, "steps": 3})
    assert status == 400 and answer["error"].startswith("model: ") and "not a complete model folder" in answer["error"]
    status, _, body = get(server, "/api/info?model=" + str(tmp_path))
    assert status == 400 and "missing model_index.json" in json.loads(body)["error"]
    status, stream = post(server, "/api/generate", {"prompt": PROMPT, "steps": 2})
    assert status == 200 and by_event(stream, "done")


# ---- a superseded run stops; so does one whose page went away ------------------------------

def _open_stream(server, body):
    conn = _connect(server)
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    return conn, events(conn.getresponse())


def test_a_superseded_run_is_cancelled_not_queued(server):
    conn, first = _open_stream(server, {"prompt": PROMPT, "steps": 900})  # minutes, if it ran to the end
    assert next(first)[0] == "start" and next(first)[0] == "step"
    start = time.monotonic()
    status, second = post(server, "/api/generate", {"prompt": PROMPT, "steps": 3})
    rest = list(first)
    assert rest[-1][0] == "cancelled" and "superseded" in rest[-1][1]["reason"]
    assert len(by_event(rest, "step")) < 100
    assert status == 200 and [e for e, _ in second][-1] == "done"
    assert time.monotonic() - start < 30
    conn.close()


def test_a_run_whose_page_went_away_stops(server):
    sock = socket.create_connection(server.server_address[:2], timeout=TIMEOUT)
    body = json.dumps({"prompt": PROMPT, "steps": 900}).encode()
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"event: step" not in received:
        chunk = sock.recv(1 << 16)
        assert chunk, received
        received += chunk
    sock.close()  # the page goes away mid-run
    start = time.monotonic()  # the noise panel needs the model: it gets it once the run has noticed
    status, d = post(server, "/api/noise", {"t": 10})
    assert status == 200 and time.monotonic() - start < 20


def test_the_native_size_comes_from_the_unet_as_the_pipeline_draws_it():
    """A folder whose VAE sample_size disagrees with its UNet's: the page's default is the
    UNet's latent size times the VAE factor (what pipe(...) draws), not the VAE's sample_size."""
    import minisd
    from minisd.explore.app import native_size

    pipe = minisd.load_pipeline()
    assert native_size(pipe) == pipe(["a small red circle in the top left"], steps=2, seed=0).shape[1] == 32
    pipe.unet.config["sample_size"] = 4  # latents 4x4 -> 16x16 images, whatever the VAE's config says
    assert pipe.vae.config["sample_size"] == 32 and native_size(pipe) == 16
