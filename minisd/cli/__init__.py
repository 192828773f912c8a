"""The command line: `minisd ...` or `python -m minisd ...`.

This package is minisd's command-line face, one module a command (generate.py, train.py,
lessons.py, ...); this file is the dispatcher, the usage error and the argument types.

    minisd generate "a large blue square in the center" --n 4 --steps 50 --out out/
    minisd train {vae,clip,unet,all} --dataset shapes --out checkpoints/mine
    minisd eval | minisd info | minisd export PATH --to DIR
    minisd lesson N | minisd lessons
    minisd bench {ops,kernels,unet,sd15,generate}

Usage errors exit with status 2 and one line on stderr; errors in the work itself
(a missing checkpoint, an unwritable folder) exit with status 1 and one line.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block), exit status 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


# Argument types for numbers given on the command line. argparse reports a failure as
# "argument --seed: must be a whole number >= 0, got '-1'", naming the option, and
# main() turns that into one line and exit status 2.

def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {'whole number' if kind is int else 'number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (img2img's strength, a validation split)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def _add_bench(sub) -> None:
    from minisd.benchmarks import NAMES

    bench = sub.add_parser("bench", help="benchmarks: minisd side by side with PyTorch / CuPy")
    which = bench.add_subparsers(dest="bench", metavar="{" + ",".join(NAMES) + "}", parser_class=_Parser)
    which.required = True
    for name in NAMES:
        try:
            module = importlib.import_module(f"minisd.benchmarks.{name}")
        except ModuleNotFoundError:
            continue  # a benchmark whose part of minisd has not landed yet
        p = which.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(run=module.run)


# Each subcommand is a module of this package, minisd/cli/NAME.py, with add_arguments(parser)
# and run(args) (or add_<name>_arguments / run_<name> where one module serves two commands);
# the work it drives is in the library (minisd/train.py, minisd/pipeline.py, ...). Modules
# not present yet are simply not offered.
_COMMANDS = {
    "generate": ("minisd.cli.generate", "text -> images with a trained model"),
    "train": ("minisd.cli.train", "train the VAE, CLIP and the UNet on a dataset"),
    "eval": ("minisd.cli.evaluate", "measure a model: VAE PSNR, prompt adherence, CLIP score"),
    "info": ("minisd.cli.info", "the model's sizes next to Stable Diffusion v1.5's"),
    "export": ("minisd.cli.export", "write a model as a diffusers StableDiffusionPipeline folder"),
    "lesson": ("minisd.cli.lessons", "run one chapter script: minisd lesson N"),
    "lessons": ("minisd.cli.lessons", "run every chapter script in order"),
    "explore": ("minisd.cli.explore", "a live diffusion explorer in the browser (localhost)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minisd", description="Stable Diffusion from scratch on NumPy and hand-written CUDA kernels.")
    parser.add_argument("--backend", choices=("naive", "numpy", "emulated", "cupy"),
                        help="array backend (default: $MINISD_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in _COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text)
        add = getattr(module, f"add_{name}_arguments", None) or getattr(module, "add_arguments")
        add(p)
        p.set_defaults(run=getattr(module, f"run_{name}", None) or getattr(module, "run"))
    _add_bench(sub)
    return parser


def _parse(argv) -> argparse.Namespace:
    """The command line, read; a usage error in it is said by one rank of an MPI launch only
    (every rank reads the same line and fails alike: N copies of one line say nothing more)."""
    try:
        return build_parser().parse_args(argv)
    except UsageError as e:
        from minisd.distributed import launched_as

        launch = launched_as()
        raise UsageError(str(e) if launch is None or launch[1] == 0 else "") from None


def main(argv=None) -> int:
    try:
        args = _parse(argv)
        if args.backend:
            import minisd

            minisd.set_backend(args.backend)
        return int(args.run(args) or 0)
    except UsageError as e:
        if str(e):
            print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minisd: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, RuntimeError, OSError, TypeError, MemoryError) as e:
        # Errors in the work itself, already phrased for a person: one line, no traceback
        # (a message of several lines, as some libraries' are, is joined onto one).
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, MemoryError):
            message = f"out of memory: {message or 'an allocation failed'}"
        print("minisd: error: " + " ".join(str(message).split("\n")), file=sys.stderr)
        return 1

