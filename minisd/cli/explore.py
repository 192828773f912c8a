"""`minisd explore [--model MODEL] [--port 7860] [--host 127.0.0.1]`: the live explorer.

What the page shows is in minisd/explore/ (its docstring); this serves it.
"""

from __future__ import annotations

import argparse

from minisd.cli import non_negative_int


def _port(text: str) -> int:
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
