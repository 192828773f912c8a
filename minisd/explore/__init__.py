"""`minisd explore`: watch the model think, live in a browser, on a laptop CPU.

    minisd explore [--model MODEL] [--port 7860] [--host 127.0.0.1]

then open the printed address. The page has three panels:

- Text to image: prompt (and a negative prompt where the pipeline takes one), seed, steps,
  guidance scale w, scheduler. As sampling runs, every step shows x_t decoded, the
  predicted noise epsilon (the 4 latent channels) and the predicted x_0; afterwards a
  slider scrubs through the steps, with each prompt token's cross-attention over the
  latent grid at the chosen step.
- Forward noising: a shapes image or one of yours, and a slider for t showing x_t,
  alpha_bar_t and the signal-to-noise ratio, in pixels and in the latent.
- Guidance: one seed at several guidance scales side by side.

The server is Python's own http.server streaming Server-Sent Events to one static page
(minisd/explore/page.html); it needs nothing beyond minisd itself (README: why not gradio).
The computation is in app.py, the HTTP in server.py.
"""

from __future__ import annotations


def _port(text: str) -> int:
    import argparse

    from minisd.cli import non_negative_int

    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="a model folder (default: the shipped shapes model); the page can pick another")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                        "the network, and with it the page's model-folder field, which loads any folder here)")
    parser.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")


def run(args) -> int:
    from minisd.explore.server import serve

    return serve(model=args.model, host=args.host, port=args.port, verbose=args.verbose)
