"""The explorer's web server: Python's own http.server, one page, four JSON endpoints.

    GET  /                the page (page.html: HTML, CSS and JavaScript in one file, nothing fetched)
    GET  /api/info        ?model=FOLDER: schedulers, sizes, negative prompt or not, the shapes' names
    POST /api/generate    text to image: a stream of Server-Sent Events, one per sampling step
    POST /api/guidance    one seed at several guidance scales: an event per image
    POST /api/noise       the forward process at one t: one JSON answer

A stream is ``text/event-stream`` (``event: step`` / ``data: {json}`` / blank line), which
a browser's fetch() reads as it arrives and ``curl -N`` shows as text. The page's JSON
bodies and answers carry images as PNG data: URLs (a 32 x 32 PNG is about 1 kB).

Bad input is answered with status 400 and ``{"error": "one line"}``, or, once a stream has
started, an ``error`` event; a failure inside the server with 500 and its one line (the
traceback goes to stderr). Either way the server keeps serving. A client that goes away
mid-stream ends its run at the next step (the write fails).

Only loopback by default. Requests must name this server in their Host header (a web page
elsewhere cannot reach it through DNS rebinding), and POSTs must be application/json
(which another site's form cannot send without the browser asking first).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from minisd.explore.app import BadInput, Explorer

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
MAX_BODY = 12 << 20  # an uploaded image, base64: 8 MB of file


class _Stream:
    """emit(event, data) for Explorer's streaming methods: the headers go out with the first event."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.handler = handler
        self.started = False

    def __call__(self, event: str, data) -> None:
        h = self.handler
        if not self.started:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream; charset=utf-8")
            h.send_header("Cache-Control", "no-store")
            h.end_headers()
            self.started = True
        h.wfile.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
        h.wfile.flush()


class Handler(BaseHTTPRequestHandler):
    server_version = "minisd-explore"
    explorer: Explorer  # set on the class made by make_server
    verbose = False
    allowed_hosts: frozenset | None = None  # Host header names accepted (None: any)

    # -- plumbing --------------------------------------------------------------------------

    def log_message(self, format, *args):
        if self.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data, separators=(",", ":")).encode(), "application/json")

    def _host_ok(self) -> bool:
        if self.allowed_hosts is None:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name in self.allowed_hosts:
            return True
        self._json(403, {"error": f"Host {host!r} is not this server's; open it at 127.0.0.1 or localhost"})
        return False

    def _body(self):
        if "application/json" not in (self.headers.get("Content-Type") or ""):
            raise BadInput("send the request as application/json")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadInput("Content-Length is not a number") from None
        if length > MAX_BODY:
            raise BadInput(f"the request is {length:,} bytes; at most {MAX_BODY:,}")
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"the request is not JSON: {e}") from None

    def _answer(self, work, stream: _Stream | None = None) -> None:
        """Run work(); turn what goes wrong into a message for the page, and keep serving."""
        try:
            work()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away (a newer request, a closed tab): nothing to tell it
        except BadInput as e:
            self._fail(400, str(e), stream)
        except Exception as e:  # a failure of ours: one line for the page, the traceback for the console
            traceback.print_exc(file=sys.stderr)
            self._fail(500, f"internal error: {type(e).__name__}: {e}", stream)

    def _fail(self, status: int, message: str, stream: _Stream | None) -> None:
        try:
            if stream is not None and stream.started:
                stream("error", {"error": message})
            else:
                self._json(status, {"error": message})
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- the routes ------------------------------------------------------------------------

    def do_GET(self):
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                self._send(200, f.read(), "text/html; charset=utf-8")
        elif url.path == "/api/info":
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            self._answer(lambda: self._json(200, self.explorer.info(query)))
        elif url.path == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
        else:
            self._json(404, {"error": f"no page {url.path}"})

    def do_POST(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in ("/api/generate", "/api/guidance"):
            stream = _Stream(self)
            method = self.explorer.generate if path == "/api/generate" else self.explorer.compare_guidance
            self._answer(lambda: method(self._body(), stream), stream)
        elif path == "/api/noise":
            self._answer(lambda: self._json(200, self.explorer.noise(self._body())))
        else:
            self._json(404, {"error": f"no endpoint {path}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request still running never holds the process at exit
    # Without this a port just freed by a server that stopped cannot be bound again for a minute.
    allow_reuse_address = True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False):
    """A server bound to (host, port) serving the explorer (port 0: any free port); not yet serving."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    allowed = frozenset({"127.0.0.1", "localhost", "[::1]", _url_host(host).lower()}) if _loopback(host) else None
    handler = type("ExplorerHandler", (Handler,), {"explorer": explorer, "verbose": verbose,
                                                   "allowed_hosts": allowed})
    server_class = type("ExplorerServer", (_Server,), {"address_family": family})
    server = server_class((host, port), handler)
    server.explorer = explorer
    return server


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def url_of(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{_url_host(host)}:{port}/"


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False) -> int:
    """Load the model, serve until SIGINT or SIGTERM, then stop: the running request is cancelled."""
    explorer = Explorer(model)
    pipe = explorer.load()  # a bad --model fails here, before the server says it is up
    try:
        server = make_server(explorer, host, port, verbose)
    except OSError as e:  # the port taken, an address not of this machine
        raise OSError(f"cannot listen on {_url_host(host.strip('[]'))}:{port}: {e.strerror or e}") from None

    def stop(signum, frame):
        explorer.cancel_all("the server is stopping")
        # shutdown() waits for serve_forever to return, so it cannot run in serve_forever's thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"minisd explore: serving {url_of(server)} (model {pipe.path}); Ctrl+C stops it", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("minisd explore: stopped", flush=True)
    return 0
