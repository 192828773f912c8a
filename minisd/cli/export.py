"""`minisd export PATH --to DIR [--dtype float16]`: a minisd model as a folder diffusers runs.

The writing is minisd.export's (export_pipeline: every part in diffusers' layout, under a
temporary name, then renamed); this checks --to before the load, and says how to load it.
"""

from __future__ import annotations

import numpy as np

from minisd.export import check_out_dir, export_pipeline


def add_arguments(parser) -> None:
    parser.add_argument("path", nargs="?", default=None,
                        help="model folder to export (default: the shipped shapes model)")
    parser.add_argument("--to", required=True, metavar="DIR", help="the folder to write (new or empty)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="how the weights are stored (default float32; float16 halves the files, "
                             "as SD's published fp16 weights)")


def run(args) -> int:
    from minisd.pipeline import DEFAULT_MODEL, load_pipeline

    check_out_dir(args.to)  # before the (maybe long) load
    pipe = load_pipeline(args.path)
    export_pipeline(pipe, args.to, np.dtype(args.dtype))
    print(f"minisd export: {args.path or DEFAULT_MODEL} -> {args.to} ({args.dtype}); load it with "
          f"diffusers.StableDiffusionPipeline.from_pretrained({args.to!r}, safety_checker=None)")
    return 0
