"""Data sets as in-memory tensors, and the scaling that maps them to mean 0, std 1.

Fashion-MNIST is read from its four IDX files: Debian's `dataset-fashion-mnist` package puts
them in /usr/share/datasets/fashion-mnist; `DIFFUSE_FMNIST_DIR` may name another folder; where
neither holds them they are downloaded once into ~/.cache/diffuse with a SHA-256 check.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffuse.config import DataConfig
from diffuse.errors import UserError
from diffuse.files import sha256_file

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Scaling: pixels <-> model space.


@dataclass(frozen=True)
class Scaling:
    """x_model = (x / 255 - mean) / std, so the training data has mean 0 and std 1."""

    mean: float
    std: float

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float32 (N, C, H, W) in model space."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, C, H, W) in model space -> uint8 (N, H, W, C), clipped to [0, 255]."""
        pixels = (x.float() * self.std + self.mean) * 255.0
        return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def fit_scaling(images: torch.Tensor) -> Scaling:
    """The mean and std of uint8 images in [0, 1] units, computed in float64."""
    x = images.double() / 255.0
    return Scaling(mean=round(x.mean().item(), 6), std=round(x.std().item(), 6))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST.


def fmnist_dir() -> Path:
    """The folder that holds the four IDX files, downloading them if no folder does."""
    names = list(FMNIST_SHA256)
    override = os.environ.get("DIFFUSE_FMNIST_DIR")
    if override:
        folder = Path(override)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"DIFFUSE_FMNIST_DIR={folder} lacks {missing[0]}; point it at the folder "
                            "that holds the four Fashion-MNIST .gz files.")
        return folder
    if all((DEBIAN_FMNIST_DIR / n).is_file() for n in names):
        return DEBIAN_FMNIST_DIR
    cache = Path.home() / ".cache" / "diffuse" / "fashion-mnist"
    for name in names:
        _download_checked(FMNIST_URL + name, cache / name, FMNIST_SHA256[name])
    return cache


def _download_checked(url: str, path: Path, sha256: str) -> None:
    if path.is_file() and sha256_file(path) == sha256:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); install Debian's dataset-fashion-mnist "
                        "or set DIFFUSE_FMNIST_DIR to a folder with the four files.") from None
    if sha256_file(tmp) != sha256:
        tmp.unlink()
        raise UserError(f"the download of {url} has the wrong SHA-256; try again later.")
    tmp.rename(path)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array: magic 0x0000 08 nd, then nd big-endian sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile and a truncated stream among them
        raise UserError(f"{path} cannot be read as {'a gzipped ' if path.suffix == '.gz' else 'an '}IDX file "
                        f"({e}); point DIFFUSE_FMNIST_DIR at the four Fashion-MNIST .gz files.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise UserError(f"{path} is truncated: expected {math.prod(shape)} bytes, found {body.size}.")
    return body.reshape(shape)


def load_fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (images uint8 (N, 28, 28, 1), labels int64 (N,)); split 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = fmnist_dir()
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{folder / f'{prefix}-images-idx3-ubyte.gz'} holds images of shape {images.shape[1:]}, "
                        "not the 28x28 grey images of Fashion-MNIST; point DIFFUSE_FMNIST_DIR at the real files.")
    if labels.shape != (len(images),) or labels.max(initial=0) > 9:
        raise UserError(f"{folder / f'{prefix}-labels-idx1-ubyte.gz'} does not hold one label 0-9 per image; "
                        "point DIFFUSE_FMNIST_DIR at the real files.")
    return torch.from_numpy(images.copy()).unsqueeze(-1), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# The data a training run sees.


@dataclass
class TrainData:
    """Scaled training data in memory.

    x: float32 (N, C, H, W) or (N, 2) in model space; y: int64 (N,) class labels (what the probe
    and the class accuracy are measured against); cond: what the model is conditioned on, (N, ...),
    the labels themselves for class-conditional data.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    scaling: Scaling | None  # None for data that is not an image (toy 2-D)
    cond: torch.Tensor | None = None

    def __post_init__(self):
        if self.cond is None:
            self.cond = self.y

    def describe(self) -> str:
        return (f"{len(self.x)} examples of shape {tuple(self.x.shape[1:])}, {self.num_classes} classes; "
                f"scaled data mean {self.x.mean().item():+.3f}, std {self.x.std().item():.3f}")


def toy2d(n: int, seed: int = 0, modes: int = 8, radius: float = 2.0, std: float = 0.25):
    """A mixture of `modes` Gaussians on a circle: (points float32 (n, 2), mode labels int64 (n,)).

    Points are divided by sqrt(radius^2 / 2 + std^2), so each coordinate has std 1; the exact
    mixture is `toy2d_mixture`.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, modes, (n,), generator=g)
    means, scale = toy2d_mixture(modes, radius, std)
    x = means[labels] + scale * torch.randn(n, 2, generator=g)
    return x, labels


def toy2d_mixture(modes: int = 8, radius: float = 2.0, std: float = 0.25) -> tuple[torch.Tensor, float]:
    """Means (modes, 2) and common std of the toy mixture, in model space (per-coordinate std 1)."""
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    norm = math.sqrt((radius**2) / 2 + std**2)  # per-coordinate std of the mixture
    means = torch.stack([angle.cos(), angle.sin()], dim=1) * radius / norm
    return means.float(), std / norm


def data_shape(name: str) -> tuple[tuple[int, ...], int]:
    """(shape of one example, number of classes) of the data set called `name`."""
    return {"fmnist": ((1, 28, 28), 10), "toy2d": ((2,), 8)}[name]


def condition_shape(data: DataConfig) -> tuple[int, ...] | None:
    """The shape of one image condition (C, H / factor, W / factor), or None where the condition is a label."""
    if data.task != "superres":
        return None
    channels, height, width = data_shape(data.name)[0]
    return channels, height // data.factor, width // data.factor


def low_res(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H / factor, W / factor): the mean of each factor x factor block.

    The scaling to model space is affine with weights summing to 1 in each block, so pooling
    commutes with it: low_res(encode(images)) == encode(low_res(images)) up to float rounding.
    """
    return F.avg_pool2d(x, factor)


def load_train_data(data: DataConfig, scaling: Scaling | None, seed: int = 0) -> TrainData:
    """The training set a `DataConfig` names, scaled.

    Fits the scaling if None. For the superres task the condition is the low-res image in model
    space (N, C, H / factor, W / factor); y stays the class labels.
    """
    if data.name == "fmnist":
        images, labels = load_fmnist("train")
        scaling = scaling or fit_scaling(images)
        x = scaling.encode(images)
        cond = low_res(x, data.factor) if data.task == "superres" else None
        return TrainData(x, labels, 10, scaling, cond)
    if data.name == "toy2d":
        x, labels = toy2d(50_000, seed=seed)
        return TrainData(x, labels, 8, None)
    raise UserError(f"unknown data set '{data.name}'; choose fmnist or toy2d.")


def eval_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n Fashion-MNIST test images, cycling past 10000: (uint8 (n, 28, 28, 1), labels (n,))."""
    images, labels = load_fmnist("test")
    index = torch.arange(n) % len(images)
    return images[index], labels[index]


def eval_conditions(data: DataConfig, scaling: Scaling | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditions (n, ...), class labels (n,)) of n evaluation samples.

    Class task: the classes in turn, 0, 1, ..., as both. Superres: the low-res versions
    (n, C, H / factor, W / factor) in model space of the images of `eval_images(n)`, and their labels.
    """
    if data.task == "superres":
        images, labels = eval_images(n)
        return low_res(scaling.encode(images), data.factor), labels
    _, num_classes = data_shape(data.name)
    labels = torch.arange(n) % num_classes
    return labels, labels
