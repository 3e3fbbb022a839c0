"""A data set larger than memory trains without being loaded whole: the peak resident memory of
`diffuse data prepare` and of `diffuse train --data` against the size of the prepared array.

    .venv/bin/python benchmarks/large_data.py --out /tmp/large [--gb 4] [--resolution 64] [--kimg 1.6] [--preset rgb64]

Writes an .npy of uint8 (N, R, R, 3) images of GB gigabytes (smooth random blobs, chunk by chunk,
so the writer itself stays small), prepares it, then trains on it for KIMG thousand images (with
--preset, rgb64 by default, whose seconds per kimg the run's metrics.jsonl gives), each command
under /usr/bin/time -v, whose "Maximum resident set size" is the figure. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 2048  # images written at a time


def write_source(path: Path, n: int, r: int) -> None:
    """n smooth colour images (n, r, r, 3): a 4x4 random field per image, upsampled bilinearly."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, r, r, 3))
    g = np.random.default_rng(0)
    grid = np.linspace(0, 3, r)
    i0 = np.minimum(grid.astype(int), 2)
    w = (grid - i0)[:, None]
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        field = g.uniform(0, 255, (k, 4, 4, 3))
        rows = field[:, i0] * (1 - w[None, :, :, None]) + field[:, i0 + 1] * w[None, :, :, None]  # (k, r, 4, 3)
        full = rows[:, :, i0] * (1 - w.T[None, :, :, None]) + rows[:, :, i0 + 1] * w.T[None, :, :, None]
        out[start:start + k] = full.round().astype(np.uint8)
    out.flush()
    del out


def peak_rss_gb(command: list[str], log: Path) -> tuple[float, float]:
    """(peak resident GB, seconds) of a command run under /usr/bin/time -v (its output in `log`)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(["/usr/bin/time", "-v", *command], stdout=f, stderr=subprocess.STDOUT, check=True)
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text()).group(1))
    return kb / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--kimg", type=float, default=1.6)
    parser.add_argument("--preset", default="rgb64", help="the training run's preset; 'none' for the net "
                        "nets.sized_for picks (give it with another --resolution)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    r = args.resolution
    n = int(args.gb * 2**30 / (r * r * 3))
    source, data, run = args.out / "large.npy", args.out / "data", args.out / "run"
    if not source.is_file():
        write_source(source, n, r)
    cli = [sys.executable, "-m", "diffuse"]
    rows = []
    if not (data / "data.json").is_file():
        rows.append(("data prepare", *peak_rss_gb([*cli, "data", "prepare", str(source), "--out", str(data),
                                                  "--feature-kimg", "0"], args.out / "prepare.log")))
    sets = ["train.kimg=%g" % args.kimg, "train.grid_kimg=%g" % args.kimg, "train.checkpoint_kimg=%g" % args.kimg]
    preset = [] if args.preset == "none" else ["--preset", args.preset]
    rows.append((" ".join(["train --data", *preset]),
                 *peak_rss_gb([*cli, "train", "--data", str(data), *preset, "--out", str(run),
                               *[a for kv in sets for a in ("--set", kv)]], args.out / "train.log")))
    array_gb = (data / "images.npy").stat().st_size / 2**30
    print(f"prepared array: {n} images of {r}x{r}x3, {array_gb:.2f} GB (images.npy)\n")
    print("| command | peak resident memory GB | share of the array | seconds |")
    print("|---|---|---|---|")
    for name, gb, seconds in rows:
        print(f"| {name} | {gb:.2f} | {gb / array_gb:.1%} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
