"""Write the demo dataset once: crops of scikit-image's sample photographs as parquet shards.

    python scripts/make_demo_data.py --out outputs/demo_data [--num_crops 4096 --crop_size 64 --num_shards 4]

`scripts/pretrain.py --config configs/pretrain/demo.yaml` does this itself (`create_demo_data: true`).
The data goes only into a new or empty folder (marked as demo data), never into one holding other files.

Data that is not 8-bit RGB (configs/pretrain/demo_gray16.yaml, demo_bands6.yaml):

    python scripts/make_demo_data.py --pixels gray16 --out outputs/demo_gray16   # 16-bit 1-channel PNGs
    python scripts/make_demo_data.py --pixels bands6 --out outputs/demo_bands6   # 6-band uint16 .npy
"""

import argparse
import functools
import sys

from modeling_mae_cli import HelpFormatter, run_main
from modeling_mae_cli.choices import DEMO_PIXEL_KINDS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", default="outputs/demo_data", help="folder the parquet shards are written to")
    parser.add_argument("--num_crops", type=int, default=4096, help="square crops to write")
    parser.add_argument("--crop_size", type=int, default=64, help="side of each crop (pixels)")
    parser.add_argument("--num_shards", type=int, default=4, help="parquet files the crops are spread over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop positions and sizes")
    parser.add_argument("--pixels", choices=DEMO_PIXEL_KINDS, default=None,
                        help="write generated 16-bit / multi-band images instead of photo crops")
    args = parser.parse_args(argv)
    # after parsing: --help needs no torch
    from modeling_mae.training.data import write_demo_dataset
    from modeling_mae.training.demo_data import ensure_demo_data
    from modeling_mae.training.pixels import write_demo_pixel_dataset

    if args.pixels:
        written = ensure_demo_data(args.out, functools.partial(
            write_demo_pixel_dataset, kind=args.pixels, count=args.num_crops // 2, size=48, seed=args.seed), field="--out")
        print(f"wrote {args.pixels} images to {args.out}" if written else f"{args.out} already holds the demo data")
        return
    write = functools.partial(write_demo_dataset, num_crops=args.num_crops, crop_size=args.crop_size,
                              num_shards=args.num_shards, seed=args.seed)
    if ensure_demo_data(args.out, write, field="--out"):
        print(f"wrote {args.num_crops} crops in {args.num_shards} parquet shards to {args.out}")
    else:
        print(f"{args.out} already holds the demo data")


if __name__ == "__main__":
    sys.exit(run_main(main))
