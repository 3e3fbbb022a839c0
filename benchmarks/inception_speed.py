"""Seconds per 1,000 images of the FID feature extractor: 28x28 gray Fashion-MNIST test images
resized to 299x299 and run through Inception-v3 (diffuse.metrics.inception), at torch's default
thread count unless --threads is given.

    PYTHONPATH=src .venv/bin/python benchmarks/inception_speed.py [--n 128] [--batch 8] [--device cpu]

One untimed batch first (TorchScript's profiling runs), then --n images timed; prints the rate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffuse.data import load_fmnist
from diffuse.metrics.inception import default_batch, inception_features


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or 'unknown CPU'."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images timed")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on a CPU, 64 on an accelerator")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_fmnist("test")[0]
    batch = args.batch or default_batch(torch.device(args.device))
    inception_features(images[:batch], args.device, batch)  # warm-up, untimed
    start = time.perf_counter()
    inception_features(images[batch:batch + args.n], args.device, batch)
    seconds = time.perf_counter() - start
    print(f"{1000 * seconds / args.n:.1f} s per 1,000 images ({args.n} timed, batch {batch}, "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_model()})")


if __name__ == "__main__":
    main()
