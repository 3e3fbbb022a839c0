"""Data sets: the `Dataset` record, the files behind it, and the scaling that maps them to mean 0, std 1.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from diffuse.errors import UserError
from diffuse.files import sha256_file
from diffuse.images import first_of_each_class, panel, rows_by_label, save_grid, save_scatter

if TYPE_CHECKING:  # config imports this module's choice lists
    from diffuse.config import DataConfig

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


def read_idx(path: Path, fix: str = "point DIFFUSE_FMNIST_DIR at the four Fashion-MNIST .gz files") -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array: magic 0x0000 08 nd, then nd big-endian sizes.
    `fix` ends the sentence of a file that cannot be read."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile and a truncated stream among them
        raise UserError(f"{path} cannot be read as {'a gzipped ' if path.suffix == '.gz' else 'an '}IDX file "
                        f"({e}); {fix}.") from None
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
    """Scaled data in memory.

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

    def to(self, device: str | torch.device) -> TrainData:
        self.x, self.y, self.cond = self.x.to(device), self.y.to(device), self.cond.to(device)
        return self

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


def low_res(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H / factor, W / factor): the mean of each factor x factor block.

    The scaling to model space is affine with weights summing to 1 in each block, so pooling
    commutes with it: low_res(encode(images)) == encode(low_res(images)) up to float rounding.
    """
    return F.avg_pool2d(x, factor)


# ---------------------------------------------------------------------------------------------
# The Dataset record: everything the rest of diffuse knows of a data set.

DATASETS = ("fmnist", "toy2d")
TASKS = ("class", "superres")  # data.task: condition on the label | on a low-res version of the image
GRID_PER_CLASS = 10            # images per class in the training grid


@dataclass(frozen=True)
class Dataset:
    """A data set as training, sampling, evaluation and the pictures see it; made by `dataset(config.data)`
    without reading a file.

    Images are uint8 (N, H, W, C) in files and float32 (N, C, H, W) in model space (`Scaling`);
    points are float32 (N, D), already in model space.
    """

    name: str
    shape: tuple[int, ...]                # one example in model space: (C, H, W), or (D,) for points
    num_classes: int                      # classes of the labels y: the probe's and the accuracy's targets
    condition: str                        # what the model is conditioned on: "label" | "image"
    cond_shape: tuple[int, ...] | None    # one image condition, (C, H / factor, W / factor); None for labels
    factor: int                           # image condition: the image average-pooled factor x factor
    features: str | None                  # the feature net of its FD ("fmnist": FD-FMNIST), or None
    read: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None  # split -> (uint8 images, labels); None: points

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def load(self, split: str = "train", scaling: Scaling | None = None, seed: int = 0) -> TrainData:
        """The split in model space, with the scaling fitted to it where `scaling` is None."""
        if not self.is_image:
            return TrainData(*toy2d(50_000, seed=seed), self.num_classes, None)
        images, labels = self.read(split)
        scaling = scaling or fit_scaling(images)
        x = scaling.encode(images)
        return TrainData(x, labels, self.num_classes, scaling, self.condition_of(x))

    def condition_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """The image condition of examples x (N, C, H, W) in model space; None where the condition is the label."""
        return low_res(x, self.factor) if self.condition == "image" else None

    def eval_truth(self, n: int) -> torch.Tensor | None:
        """The images the evaluation conditions come from: the first n test images, cycling; None for labels."""
        if self.condition != "image":
            return None
        images, _ = self.read("test")
        return images[torch.arange(n) % len(images)]

    def eval_conditions(self, scaling: Scaling | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditions (n, ...), class labels (n,)) of n evaluation samples.

        Labels: the classes in turn, 0, 1, ..., as both. Image condition: the low-res versions
        (n, C, H / factor, W / factor) in model space of `eval_truth(n)`, and their classes.
        """
        if self.condition == "image":
            images, labels = self.read("test")
            index = torch.arange(n) % len(images)
            return self.condition_of(scaling.encode(images[index])), labels[index]
        labels = torch.arange(n) % self.num_classes
        return labels, labels

    def grid_conditions(self, scaling: Scaling | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(conditions, labels, truth or None) of the fixed picture drawn during training: GRID_PER_CLASS
        images of each class; for an image condition the first test image of each class; 2,000 points."""
        if not self.is_image:
            labels = torch.arange(2000) % self.num_classes
            return labels, labels, None
        if self.condition == "image":
            images, labels = self.read("test")
            first = torch.as_tensor(first_of_each_class(labels))
            return self.condition_of(scaling.encode(images[first])), labels[first], images[first]
        labels = torch.arange(self.num_classes).repeat_interleave(GRID_PER_CLASS)
        return labels, labels, None

    def picture(self, path: Path, samples: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None) -> None:
        """A PNG of samples: points as a scatter plot; images a row per class (GRID_PER_CLASS of each);
        for an image condition rows low-res input / sample / truth, a column per class."""
        samples, labels = np.asarray(samples), np.asarray(labels)
        if not self.is_image:
            save_scatter(path, samples, labels)
        elif self.condition == "image":
            cols = first_of_each_class(labels)
            save_grid(path, panel(samples[cols], np.asarray(truth)[cols], self.factor), nrow=len(cols))
        else:
            save_grid(path, samples[rows_by_label(labels, per_row=GRID_PER_CLASS)], nrow=GRID_PER_CLASS)


def dataset(data: DataConfig) -> Dataset:
    """The Dataset a `DataConfig` names (data.name, data.task, data.factor); reads no file."""
    if data.name not in DATASETS:
        raise UserError(f"unknown data set '{data.name}'; choose one of {', '.join(DATASETS)}.")
    if data.task not in TASKS:
        raise UserError(f"data.task {data.task!r} is not one of {', '.join(TASKS)}.")
    if data.name == "toy2d":
        if data.task != "class":
            raise UserError(f"data.task {data.task!r} needs image data; the toy2d points take 'class'.")
        return Dataset("toy2d", (2,), 8, "label", None, 1, None, None)
    shape = (1, 28, 28)  # Fashion-MNIST: 28x28 grey images, 10 classes
    if data.task == "class":
        return Dataset("fmnist", shape, 10, "label", None, 1, "fmnist", load_fmnist)
    if data.factor < 2 or shape[1] % data.factor:
        raise UserError(f"data.factor {data.factor} must divide the {shape[1]}-pixel side and be at least 2.")
    cond_shape = (shape[0], shape[1] // data.factor, shape[2] // data.factor)
    return Dataset("fmnist", shape, 10, "image", cond_shape, data.factor, "fmnist", load_fmnist)
