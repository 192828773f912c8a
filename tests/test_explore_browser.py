"""minisd explore in a real browser: headless Chromium loads the page, types a prompt,
presses Generate and sees the step images appear; a screenshot is kept (tmp_path).

Chromium is Debian's (apt-get install chromium; .ci/run installs it), or $CHROMIUM. It is
driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended
by a NUL byte, read by Chromium on fd 3, written on fd 4), so the test needs no Python
package and no driver, and nothing downloads a browser. Chromium resolves no host but
127.0.0.1 and uses no proxy: the test's traffic stays on loopback. Skipped, with the
reason, where no Chromium can be started.

    python tests/test_explore_browser.py OUT.png [STEPS]

takes the README's screenshot and prints the time from pressing Generate to the first and
to the last step shown.
"""

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

import minisd
from minisd.explore.app import Explorer
from minisd.explore.server import make_server, url_of

PROMPT = "a large green circle in the bottom right"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--no-first-run", "--no-default-browser-check", "--mute-audio",
                  "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                  "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium and one page in it, commanded with DevTools protocol messages."""

    def __init__(self, executable: str, user_data_dir: str, timeout: float = 60):
        self.timeout = timeout
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()
        # Give Chromium its ends as fds 3 and 4: bash moves them there (no preexec_fn, which is
        # unsafe with the server's threads; not dash, which knows no fd above 9); above 10
        # first, so that neither lands on the other.
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{r} 4>&{w} {r}<&- {w}>&-; exec "$0" "$@"', executable, *CHROMIUM_FLAGS,
             f"--user-data-dir={user_data_dir}", "about:blank"],
            pass_fds=(r, w), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        os.close(r)
        os.close(w)
        self._buffer = b""
        self._next_id = 0
        self.session = None
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]

    def log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-2000:]

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Send one command and wait (bounded) for its answer; events in between are dropped."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise BrowserError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise BrowserError(f"{method}: no answer from Chromium in {self.timeout} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the pipe: {self.log_tail()}")
            self._buffer += chunk

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise BrowserError(f"waited {timeout} s for {what or expression}")

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field, select what is there and type over it (as keystrokes insert text)."""
        self.js(f"(e => {{ e.focus(); e.select(); }})(document.querySelector({json.dumps(selector)}))")
        self.send("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                      f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def screenshot(self, path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        for fd in (self._in, self._out):
            os.close(fd)
        self._log.close()


def open_page(browser: Browser, url: str, width: int = 1240, height: int = 1400) -> None:
    browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                        "deviceScaleFactor": 1, "mobile": False})
    browser.send("Page.navigate", {"url": url})
    browser.wait_for("document.readyState === 'complete' && !document.getElementById('generate').disabled",
                     what="the page to load its model")


def generate(browser: Browser, prompt: str, steps: int, timeout: float = 120) -> dict:
    """Type the prompt and the steps, press Generate, wait for the last step and the attention maps."""
    browser.type_into("#prompt", prompt)
    browser.type_into("#steps", str(steps))
    browser.click("#generate")
    browser.wait_for(f"document.getElementById('progress').dataset.done == '{steps}' && "
                     "document.getElementById('final').src.startsWith('data:') && "
                     "document.querySelectorAll('#attention canvas').length > 0", timeout, "the run to finish")
    return browser.js("""(() => { const $ = (id) => document.getElementById(id); return {
        xt: $('xt').src, eps: $('eps').src, x0: $('x0').src, final: $('final').src,
        scrub_max: $('scrub').max, tokens: [...document.querySelectorAll('#attention figcaption')].map(c => c.textContent),
        message: $('t2i-msg').textContent, bad: $('t2i-msg').classList.contains('bad'),
        first: Number($('timing').dataset.first), last: Number($('timing').dataset.last)}; })()""")


def png(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def start_server():
    server = make_server(Explorer(), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def stop_server(server, thread) -> None:
    server.explorer.cancel_all("done")
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium to drive (apt-get install chromium, or set $CHROMIUM)")
    try:
        b = Browser(executable, str(tmp_path_factory.mktemp("chromium-profile")))
    except (BrowserError, OSError) as e:
        pytest.skip(f"Chromium ({executable}) does not start here: {str(e)[-300:]}")
    yield b
    b.close()


@pytest.fixture(scope="module")
def server():
    server, thread = start_server()
    yield server
    stop_server(server, thread)


@pytest.mark.slow
def test_page_types_a_prompt_generates_and_shows_each_step(browser, server, tmp_path):
    open_page(browser, url_of(server))
    steps = 5
    shown = generate(browser, PROMPT, steps)
    assert not shown["bad"], shown["message"]
    for key in ("xt", "eps", "x0", "final"):
        assert shown[key].startswith("data:image/png;base64,")
    assert shown["scrub_max"] == str(steps - 1)
    assert [t.split(" ")[0] for t in shown["tokens"]] == PROMPT.split()
    assert 0 < shown["first"] <= shown["last"]
    # what the page shows is the pipeline's image for the same seed (the page's default, 0), bit for bit
    expected = minisd.load_pipeline()(PROMPT, steps=steps, seed=0, guidance_scale=5.0)[0]
    np.testing.assert_array_equal(png(shown["final"]), expected)
    np.testing.assert_array_equal(png(shown["xt"]), expected)  # the slider followed to the last step

    # scrubbing back to the first step shows that step's images
    browser.js("(s => { s.value = 0; s.dispatchEvent(new Event('input')); })(document.getElementById('scrub'))")
    assert browser.js("document.getElementById('scrub-label').textContent").startswith(f"step 1 of {steps}, t = ")
    assert browser.js("document.getElementById('xt').src") != shown["xt"]

    browser.wait_for("document.getElementById('n-xt').src.startsWith('data:')", what="the forward-noising panel")
    path = tmp_path / "explorer.png"
    browser.screenshot(path)
    shot = Image.open(path)
    assert shot.width == 1240 and shot.height >= 1000
    print(f"screenshot: {path}")


@pytest.mark.slow
def test_bad_input_shows_a_message_in_the_page(browser, server):
    open_page(browser, url_of(server))
    browser.type_into("#steps", "0")
    browser.click("#generate")
    message = browser.wait_for("(m => m.classList.contains('bad') && m.textContent)(document.getElementById('t2i-msg'))",
                               what="the message")
    assert message == "steps must be a whole number >= 1, got 0"
    browser.type_into("#model", "/nonexistent/model")
    browser.click("#load")
    message = browser.wait_for("(m => m.classList.contains('bad') && m.textContent)(document.getElementById('model-msg'))",
                               what="the model message")
    assert message.startswith("model: no model at '/nonexistent/model'")
    # and the server still serves the page's next request
    browser.type_into("#model", "")
    browser.click("#load")
    browser.wait_for("!document.getElementById('generate').disabled", what="the model to load again")
    assert not generate(browser, PROMPT, 2)["bad"]


@pytest.mark.slow
def test_guidance_row_supersedes_a_long_run_in_the_page(browser, server):
    open_page(browser, url_of(server))
    browser.type_into("#steps", "900")  # minutes, if it ran to the end
    browser.click("#generate")
    browser.wait_for("Number(document.getElementById('progress').dataset.done) >= 1", what="the first step")
    browser.type_into("#g-steps", "2")
    browser.type_into("#g-scales", "1, 5")
    browser.click("#compare")
    browser.wait_for("document.querySelectorAll('#g-row img').length == 2", what="the guidance row")
    assert re.fullmatch(r"2 images in \d+\.\d\d s", browser.js("document.getElementById('g-msg').textContent"))
    assert browser.js("[...document.querySelectorAll('#g-row figcaption')].map(c => c.textContent)") \
        == ["w = 1 (no guidance)", "w = 5"]
    # the long run stopped where the guidance row began, and stays stopped
    done = browser.js("Number(document.getElementById('progress').dataset.done)")
    time.sleep(0.5)
    assert browser.js("Number(document.getElementById('progress').dataset.done)") == done < 900
    assert browser.js("document.getElementById('stop').disabled")


@pytest.mark.slow
def test_stop_ends_the_run_and_frees_the_server(browser, server):
    open_page(browser, url_of(server))
    browser.type_into("#steps", "900")
    browser.click("#generate")
    browser.wait_for("Number(document.getElementById('progress').dataset.done) >= 1", what="the first step")
    browser.click("#stop")
    assert browser.js("document.getElementById('t2i-msg').textContent") == "stopped"
    # the noise panel needs the model: it answers once the server has seen the page go
    before = browser.wait_for("document.getElementById('n-xt').src", what="the noise panel")
    browser.js("(s => { s.value = 123; s.dispatchEvent(new Event('input')); })(document.getElementById('n-t'))")
    browser.wait_for(f"document.getElementById('n-xt').src != {json.dumps(before)}", 20, "x_t at t = 123")


def main(argv) -> int:
    """The README's screenshot and timings: a run of STEPS (default 50) steps, then the other panels."""
    out = argv[0] if argv else "explorer.png"
    steps = int(argv[1]) if len(argv) > 1 else 50
    server, thread = start_server()
    profile = tempfile.mkdtemp()
    browser = Browser(find_chromium() or "chromium", profile)
    try:
        open_page(browser, url_of(server))
        generate(browser, "a small red circle in the top left", 5)  # warm up: the first run pays for page faults
        shown = generate(browser, PROMPT, steps)
        print(f"{steps} steps: first step shown {shown['first']:.3f} s after pressing Generate, "
              f"the last {shown['last']:.3f} s")
        browser.js("(s => { s.value = Math.round(s.max * 0.3); s.dispatchEvent(new Event('input')); })"
                   "(document.getElementById('scrub'))")
        browser.js("(s => { s.value = 300; s.dispatchEvent(new Event('input')); })(document.getElementById('n-t'))")
        browser.click("#compare")
        browser.wait_for("document.getElementById('g-msg').textContent.includes('images in')", 120, "the guidance row")
        time.sleep(0.3)
        browser.screenshot(out)
        print(f"screenshot: {out}")
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
        stop_server(server, thread)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
