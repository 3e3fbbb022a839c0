"""FD-<name> of planted faults on a prepared data set whose feature net is trained.

    PYTHONPATH=src .venv/bin/python benchmarks/fd_planted_faults.py DATA_DIR [--n 2000] [--seed 0] [--device cpu]

The reference is the held-out split (DATA_DIR/reference.npz), so the "real" row is a disjoint
sample of --n images drawn from the training split; the feature net saw those in training, which
is what a generator's samples are measured against too. The faults: the same images blurred by a
Gaussian of sigma 1 pixel, uniform noise, and (labelled data only) training images of the first
half of the classes. A sound FD ranks real < blurred < noise and real < half classes; FD is biased
upwards at small n, so the counts are printed beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from diffuse.metrics.planted import gaussian_blur, uniform_noise
from diffuse.metrics.prepared_fd import evaluate_prepared, prepared_fd_name
from diffuse.prepared import open_prepared


def planted_sets(data_dir: Path, n: int, seed: int) -> dict:
    """{row name: (uint8 images (n', R, R, C), labels (n',) or None)} drawn from the training split."""
    prepared = open_prepared(data_dir)
    meta, images, train = prepared.meta, prepared.images, prepared.train_index
    labels = None if prepared.labels is None else np.asarray(prepared.labels)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(train, min(n, len(train)), replace=False))
    real = np.array(images[pick])  # only these n images are read from the memmap
    sets = {"real (training split)": (real, None if labels is None else labels[pick]),
            "blurred, sigma 1 px": (gaussian_blur(real), None),
            "uniform noise": (uniform_noise(real.shape, seed), None)}
    if labels is not None:
        kept = train[labels[train] < (len(meta["classes"]) + 1) // 2]
        pick = np.sort(rng.choice(kept, min(n, len(kept)), replace=False))
        sets[f"half the classes dropped ({len(meta['classes']) // 2} of {len(meta['classes'])})"] = (
            np.array(images[pick]), labels[pick])
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    name = prepared_fd_name(args.data_dir)
    print(f"| set | n | n_ref | {name} | accuracy | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for row, (images, labels) in planted_sets(args.data_dir, args.n, args.seed).items():
        start = time.perf_counter()
        result = evaluate_prepared(args.data_dir, images, labels, device=args.device)
        acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
        print(f"| {row} | {result['n']} | {result['n_ref']} | {result['fd']:.3f} | {acc} | "
              f"{time.perf_counter() - start:.2f} |")


if __name__ == "__main__":
    main()
