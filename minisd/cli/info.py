"""`minisd info [--model MODEL] [--json]`: the model's sizes next to Stable Diffusion v1.5's.

The figures are minisd.info's (describe: parameter counts, configs in brief, tensor shapes;
SD15: SD v1.5's, from its published configs); this prints them side by side, or as JSON.
"""

from __future__ import annotations

import json
import os

from minisd.info import SD15, describe


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the shipped shapes model)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args) -> int:
    from minisd.pipeline import load_pipeline

    pipe = load_pipeline(args.model)
    mine = describe(pipe)
    if args.json:
        print(json.dumps({"model": os.path.abspath(pipe.path), "minisd": mine, "sd_v1_5": SD15}, indent=2))
        return 0
    print(f"model: {os.path.abspath(pipe.path)}")
    total_mine = sum(mine[k]["parameters"] for k in ("vae", "text_encoder", "unet"))
    total_sd = sum(SD15[k]["parameters"] for k in ("vae", "text_encoder", "unet"))
    for part in ("vae", "text_encoder", "unet"):
        m, s = mine[part], SD15[part]
        print(f"\n{part}: {m['parameters']:,} parameters (SD v1.5: {s['parameters']:,}, "
              f"{s['parameters'] / m['parameters']:,.0f}x more)")
        print(f"  minisd   {m['brief']}\n           {m['tensors']}")
        print(f"  SD v1.5  {s['brief']}\n           {s['tensors']}")
    print(f"\nsampling: minisd {mine['sampling']}; SD v1.5 {SD15['sampling']}")
    print(f"total: {total_mine:,} parameters, {mine['size_on_disk_mb']:.1f} MB on disk "
          f"(SD v1.5: {total_sd:,}, {SD15['size_on_disk_mb'] / 1024:.1f} GB in float32)")
    return 0
