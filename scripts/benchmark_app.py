#!/usr/bin/env python
"""Time the reconstruction page's work per image (no browser): decode + crop + mask + forward + five panels.

    python scripts/benchmark_app.py                                   # random ViT-B/16 + 8x512 decoder, CPU
    python scripts/benchmark_app.py --preset mae-vit-large-patch16 --repeats 10

A random model of the preset's size (the time does not depend on the weights), one 500x375 photograph-like
JPEG, `--repeats` runs after one warm-up at the page's defaults (random masking, ratio 0.75), each with another
seed; prints the median and the range, and the load average (other processes share the cores). Threads:
torch's default (all cores) unless `--threads` or OMP_NUM_THREADS says otherwise.
"""

import argparse
import io
import os
import statistics
import time

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def parse_args(argv=None):
    """The flags, before torch loads (`--help` answers at once)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mae-vit-base-patch16", help="MAEConfig preset (default: ViT-B/16)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image

    from modeling_mae import MAEConfig, MAEForPreTraining
    from modeling_mae.training.pixels import decode_array
    from modeling_mae_app.reconstruction import LoadedModel, reconstruct_image

    if args.threads:
        torch.set_num_threads(args.threads)

    model = MAEForPreTraining(MAEConfig.from_preset(args.preset, norm_pix_loss=True)).eval()
    loaded = LoadedModel(model, args.preset, *IMAGENET, (0.0, 255.0))
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()

    def one(seed: int) -> float:
        start = time.perf_counter()
        reconstruct_image(loaded, loaded.prepare(decode_array(data)), 0.75, "random", seed)
        return time.perf_counter() - start

    load_before = os.getloadavg()[0]
    one(0)  # warm-up
    times = [one(seed) for seed in range(1, args.repeats + 1)]
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f} M parameters, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"per image (decode + crop + mask + forward + panels): median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, max {max(times):.3f} s over {len(times)} runs; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
