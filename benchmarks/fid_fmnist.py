"""FID of the Fashion-MNIST test images against the training set's Inception-v3 statistics.

    PYTHONPATH=src .venv/bin/python benchmarks/fid_fmnist.py [--n-test 10000] [--n-train 60000] [--ref PATH]
                                                              [--device cpu] [--batch 8]

The statistics of the first --n-train training images are written once as EDM's reference .npz
(default runs/fid-refs/fmnist-train-<n>.npz) and read back by later runs; the first --n-test test
images are measured against them. FID is biased upwards at small n, so both counts are printed
beside it. On a quiet 2-core Intel Xeon the 60k training images took 3532 s (58.9 s per 1,000).
The same through the command line, on a prepared copy of the data set:

    diffuse data prepare /usr/share/datasets/fashion-mnist --out DATA_DIR --feature-kimg 0
    diffuse eval DATA_DIR --features inception --write-ref STATS.npz           # its training split
    diffuse eval DATA_DIR --features inception --split test --ref STATS.npz    # its 10k test images
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffuse.data import load_fmnist
from diffuse.metrics.inception import fid, inception_stats, read_reference, write_reference


def reference(path: Path, n_train: int, device: str, batch: int | None) -> tuple:
    """(mu, sigma) of the first n_train training images, from `path` if it is there, else computed and written there."""
    if not path.exists():
        start = time.perf_counter()
        stats = inception_stats(load_fmnist("train")[0][:n_train], device, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_reference(path, stats)
        print(f"wrote {path}: {stats.n} training images in {time.perf_counter() - start:.0f} s")
    return read_reference(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--n-train", type=int, default=60_000)
    parser.add_argument("--ref", type=Path, default=None, help="reference .npz (default runs/fid-refs/fmnist-train-<n>.npz)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on a CPU, 64 on an accelerator")
    args = parser.parse_args()
    ref_path = args.ref or Path("runs/fid-refs") / f"fmnist-train-{args.n_train}.npz"
    mu_sigma = reference(ref_path, args.n_train, args.device, args.batch)
    start = time.perf_counter()
    stats = inception_stats(load_fmnist("test")[0][:args.n_test], args.device, args.batch)
    value = fid(stats, mu_sigma)
    print(f"FID {value:.3f} (n = {stats.n} test images against the training stats in {ref_path}; "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
