"""Write the demo dataset once: crops of scikit-image's sample photographs as parquet shards.

    python scripts/make_demo_data.py --out outputs/demo_data [--num_crops 4096 --crop_size 64 --num_shards 4]

`scripts/pretrain.py --config configs/pretrain/demo.yaml` does this itself (`create_demo_data: true`)
when its `train_dir` holds no parquet files yet.
"""

import argparse

from modeling_mae.training.data import write_demo_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo_data")
    parser.add_argument("--num_crops", type=int, default=4096)
    parser.add_argument("--crop_size", type=int, default=64)
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_demo_dataset(args.out, args.num_crops, args.crop_size, args.num_shards, args.seed)
    print(f"wrote {args.num_crops} crops in {len(paths)} parquet shards to {args.out}")


if __name__ == "__main__":
    main()
