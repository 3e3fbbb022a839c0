"""Data sets: the `Dataset` record, the files behind it, and the scaling that maps them to mean 0, std 1.

Fashion-MNIST is read from its four IDX files: Debian's `dataset-fashion-mnist` package puts
them in /usr/share/datasets/fashion-mnist; `DIFFUSE_FMNIST_DIR` may name another folder; where
neither holds them they are downloaded once into ~/.cache/diffuse with a SHA-256 check.
"""

from __future__ import annotations

import functools
import gzip
import math
import mmap
import os
import re
import shutil
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from diffuse.errors import UserError
from diffuse.files import sha256_file
from diffuse.images import first_of_each_class, panel, rows_by_label, save_grid, save_scatter
from diffuse.prepared import MAX_CLASSES, Prepared, open_prepared

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
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile, a truncated or a corrupt stream among them
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


@dataclass(frozen=True)
class Split:
    """One split of a data set's files, read a batch at a time.

    images: the rows of its file, uint8 (N_file, H, W, C), in memory (a tensor) or memory-mapped
    (a numpy array of a prepared data set, which may be larger than memory), or float32 points
    (N_file, D); conditions: the stored conditions of the same rows, float32 vectors (N_file, D)
    or uint8 images (N_file, h, w, c), or None; labels: int64 (n,) of this split's examples, -1
    where none; rows: int64 (n,) the file rows of this split's examples, None for all in order.
    """

    images: torch.Tensor | np.ndarray
    labels: torch.Tensor
    conditions: torch.Tensor | np.ndarray | None = None
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        """The examples `index` (n,) of this split as a tensor (n, ...), read from memory or the file."""
        return self._at(self.images, index)

    def conditions_at(self, index: torch.Tensor) -> torch.Tensor:
        return self._at(self.conditions, index)

    def _at(self, array: torch.Tensor | np.ndarray, index: torch.Tensor) -> torch.Tensor:
        i = index.cpu().numpy() if self.rows is None else self.rows[index.cpu().numpy()]
        if torch.is_tensor(array):
            return array[torch.from_numpy(i).to(array.device)]
        return torch.from_numpy(read_rows(array, i))


def read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] of a C-ordered array, read from its file where it is memory-mapped (a prepared data set).

    A memory map's pages stay in the process's resident memory once touched, so a long run of random
    batches would grow it towards the file's size; reading each row with os.pread keeps it at the
    batch's size, whatever the size of the data set."""
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous):
        return np.asarray(array[rows])  # in memory, or a view whose offset in the file the memmap does not track
    row = array.dtype.itemsize * math.prod(array.shape[1:])
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    with open(array.filename, "rb") as f:
        for k, r in enumerate(rows.tolist()):
            out[k] = np.frombuffer(os.pread(f.fileno(), row, array.offset + r * row), array.dtype).reshape(
                array.shape[1:])
    return out


class TrainData:
    """A split as training sees it: `take(index)` -> (x0, cond, labels) in model space on `device`.

    x0: float32 (n, C, H, W) images (`Scaling.encode` of the uint8 rows) or (n, D) points; cond:
    what the model is conditioned on: the labels (class data; -1 for unconditional data), the
    vectors (n, D), or an image (n, *cond_shape) in model space, stored beside the images or the
    images average-pooled `factor` x `factor` (super-resolution); labels: int64 (n,), the probe's
    and the class accuracy's targets, -1 where the data set has none.
    """

    def __init__(self, split: Split, num_classes: int, scaling: Scaling | None, condition: str, factor: int = 1):
        self.split, self.num_classes, self.scaling = split, num_classes, scaling
        self.condition, self.factor = condition, factor
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.split)

    @property
    def y(self) -> torch.Tensor:
        return self.split.labels

    def to(self, device: str | torch.device) -> TrainData:
        """Examples held in memory move to `device` once; memory-mapped ones are read a batch at a time."""
        self.device, s = torch.device(device), self.split
        move = lambda a: a.to(self.device) if torch.is_tensor(a) else a  # noqa: E731
        self.split = Split(move(s.images), s.labels, move(s.conditions), s.rows)
        return self

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, cond, labels) of the examples `index` (n,), on this data's device."""
        x = self.split.images_at(index).to(self.device)
        x = self.scaling.encode(x) if self.scaling else x
        labels = self.split.labels[index.cpu()].to(self.device)
        if self.condition == "vector":
            cond = self.split.conditions_at(index).to(self.device, torch.float32)
        elif self.condition == "image" and self.split.conditions is not None:
            cond = self.scaling.encode(self.split.conditions_at(index).to(self.device))
        elif self.condition == "image":
            cond = low_res(x, self.factor)
        else:
            cond = labels
        return x, cond, labels

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, cond, labels) of the first n examples."""
        return self.take(torch.arange(min(n, len(self))))

    def describe(self) -> str:
        x, _, _ = self.first(2048)
        kind = {"label": f"{self.num_classes} classes", "none": "unconditional", "vector": "vector condition",
                "image": "image condition"}[self.condition]
        return (f"{len(self)} examples of shape {tuple(x.shape[1:])}, {kind}; "
                f"scaled data mean {x.mean().item():+.3f}, std {x.std().item():.3f} (first {len(x)})")


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

DATASETS = ("fmnist", "toy2d", "prepared")  # prepared: a DATA_DIR of `diffuse data prepare` (data.path)
TASKS = ("class", "superres")  # data.task: condition on what the data set holds | on a low-res version of the image
CONDITIONS = ("none", "label", "vector", "image")
GRID_PER_CLASS = 10            # images per class in the training grid
GRID_CLASSES = 10              # classes in the training grid (the first ones, where there are more)
GRID_UNLABELLED = 64           # images in the grid of data without classes


@dataclass(frozen=True)
class Dataset:
    """A data set as training, sampling, evaluation and the pictures see it; made by `dataset(config.data)`
    reading at most a prepared data set's description.

    Images are uint8 (N, H, W, C) in files and float32 (N, C, H, W) in model space (`Scaling`);
    points are float32 (N, D), already in model space.
    """

    name: str
    shape: tuple[int, ...]                # one example in model space: (C, H, W), or (D,) for points
    num_classes: int                      # classes of the labels y: the probe's and the accuracy's targets (0: none)
    condition: str                        # what the model is conditioned on: "none" | "label" | "vector" | "image"
    cond_shape: tuple[int, ...] | None    # one vector (D,) or image condition (C, h, w); None for labels or none
    factor: int                           # super-resolution: the condition is the image average-pooled factor x factor
    features: str | None                  # the feature net of its FD: "fmnist" (FD-FMNIST), a DATA_DIR, or None
    read: Callable[[str], Split]          # "train" | "test" (the held-out split) -> its files
    stats: Scaling | None = None          # the pixel mean and std recorded with the files, else fitted by `load`
    at_hand: bool = True                  # False: a run's record of a prepared data set whose folder is not
                                          # there (`data.described`): its net builds and samples, nothing is read

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def paired(self) -> bool:
        """An image condition stored beside each image (image-to-image), not pooled from it."""
        return self.condition == "image" and self.factor == 1

    def load(self, split: str = "train", scaling: Scaling | None = None) -> TrainData:
        """The split, read a batch at a time in model space, with the scaling fitted to it where `scaling` is None."""
        files = self.read(split)
        if self.is_image:
            scaling = scaling or self.stats or fit_scaling(files.images)
        return TrainData(files, self.num_classes, scaling if self.is_image else None, self.condition, self.factor)

    def eval_truth(self, n: int) -> torch.Tensor | None:
        """The images the evaluation conditions come from: the first n held-out images, cycling; None
        where the condition is not an image."""
        if self.condition != "image":
            return None
        held = self.read("test")
        return held.images_at(torch.arange(n) % len(held))

    def eval_conditions(self, scaling: Scaling | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditions (n, ...), class labels (n,)) of n evaluation samples.

        Labels: the classes in turn, 0, 1, ..., as both; no condition: -1 as both. Vectors and
        images: those of the first n held-out examples, cycling (images in model space), and their
        labels (-1 where the data set has none).
        """
        if self.condition == "label":
            labels = torch.arange(n) % self.num_classes
            return labels, labels
        if self.condition == "none":
            labels = torch.full((n,), -1, dtype=torch.long)
            return labels, labels
        held = self.read("test")
        _, cond, labels = TrainData(held, self.num_classes, scaling, self.condition, self.factor).take(
            torch.arange(n) % len(held))
        return cond, labels

    def grid_conditions(self, scaling: Scaling | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(conditions, labels, truth or None) of the fixed picture drawn during training: GRID_PER_CLASS
        images of each of the first GRID_CLASSES classes; GRID_UNLABELLED images of unlabelled data
        (vector conditions: the first held-out ones); for an image condition the first held-out
        image of each class (or the first ten); 2,000 points."""
        if not self.is_image:
            labels = torch.arange(2000) % self.num_classes
            return labels, labels, None
        if self.condition == "image":
            held = self.read("test")
            first = torch.as_tensor(first_of_each_class(held.labels) if self.num_classes else
                                    np.arange(min(GRID_CLASSES, len(held))))
            _, cond, labels = TrainData(held, self.num_classes, scaling, self.condition, self.factor).take(first)
            return cond, labels, held.images_at(first)
        if self.condition == "label":
            labels = torch.arange(min(self.num_classes, GRID_CLASSES)).repeat_interleave(GRID_PER_CLASS)
            return labels, labels, None
        return self.eval_conditions(scaling, GRID_UNLABELLED) + (None,)

    def picture(self, path: Path, samples: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None) -> None:
        """A PNG of samples: points as a scatter plot; class data a row per class (GRID_PER_CLASS of each);
        unlabelled data rows of 8; for an image condition rows input / sample / truth, a column per example."""
        samples, labels = np.asarray(samples), np.asarray(labels)
        if not self.is_image:
            save_scatter(path, samples, labels)
        elif self.condition == "image":
            cols = first_of_each_class(labels) if self.num_classes else np.arange(min(GRID_CLASSES, len(samples)))
            inputs = None if self.factor > 1 else self.read("test").conditions_at(torch.as_tensor(cols)).numpy()
            save_grid(path, panel(samples[cols], np.asarray(truth)[cols], self.factor, inputs), nrow=len(cols))
        elif self.condition == "label":
            save_grid(path, samples[rows_by_label(labels, per_row=GRID_PER_CLASS)], nrow=GRID_PER_CLASS)
        else:
            save_grid(path, samples, nrow=8)


def dataset(data: DataConfig) -> Dataset:
    """The Dataset a `DataConfig` names (data.name, data.task, data.factor, data.path)."""
    if data.name not in DATASETS:
        raise UserError(f"unknown data set '{data.name}'; choose one of {', '.join(DATASETS)}.")
    if data.task not in TASKS:
        raise UserError(f"data.task {data.task!r} is not one of {', '.join(TASKS)}.")
    if data.name == "toy2d":
        if data.task != "class":
            raise UserError(f"data.task {data.task!r} needs image data; the toy2d points take 'class'.")
        return Dataset("toy2d", (2,), 8, "label", None, 1, None, read_toy2d)
    if data.name == "prepared":
        return prepared_dataset(data)
    shape = (1, 28, 28)  # Fashion-MNIST: 28x28 grey images, 10 classes
    if data.task == "class":
        return Dataset("fmnist", shape, 10, "label", None, 1, "fmnist", read_fmnist)
    return superres(Dataset("fmnist", shape, 10, "image", None, 1, "fmnist", read_fmnist), data.factor)


def superres(base: Dataset, factor: int) -> Dataset:
    """The data set conditioned on its images average-pooled factor x factor (data.task = "superres")."""
    side = base.shape[1]
    if factor < 2 or side % factor:
        raise UserError(f"data.factor {factor} must divide the {side}-pixel side and be at least 2.")
    cond_shape = (base.shape[0], side // factor, side // factor)
    return replace(base, condition="image", cond_shape=cond_shape, factor=factor)


def read_fmnist(split: str) -> Split:
    images, labels = load_fmnist(split)
    return Split(images, labels)


def read_toy2d(split: str) -> Split:
    points, labels = toy2d(50_000, seed={"train": 0, "test": 1}[split])
    return Split(points, labels)


def prepared_dataset(data: DataConfig) -> Dataset:
    """A DATA_DIR of `diffuse data prepare` (data.path): its description read and checked, its arrays mapped;
    where the folder is not there, the run's record of it (`described`), which samples but reads nothing."""
    if not data.path:
        raise UserError("data.name 'prepared' needs the data set's folder: pass --data DATA_DIR "
                        "(made by `diffuse data prepare`).")
    prepared = opened(data)
    if prepared is None:
        base = recorded_dataset(data)
    else:
        record = record_of(prepared)
        base = Dataset(prepared.name, tuple(record["shape"]), prepared.num_classes, prepared.condition,
                       tuple(record["cond_shape"]) or None, 1,
                       str(prepared.path) if (prepared.path / "features.json").is_file() else None,
                       functools.partial(read_prepared, prepared),
                       Scaling(round(prepared.meta["mean"], 6), round(prepared.meta["std"], 6)))
    if data.task == "superres":
        if base.condition != "none" and base.condition != "label":
            raise UserError(f"data.task 'superres' conditions on the images alone; {data.path} has "
                            f"{base.condition} conditions: train it with data.task 'class'.")
        return superres(base, data.factor)
    return base


RECORD = ("shape", "classes", "condition", "cond_shape", "sha256")  # the DataConfig keys `described` fills


def record_of(prepared: Prepared) -> dict:
    """What a run records of its prepared data set: enough to build its net and sample without the folder."""
    m = prepared.meta
    cond_shape = {"vector": lambda: [m["vector_dim"]],
                  "image": lambda: [m["cond_channels"], m["cond_resolution"], m["cond_resolution"]]}.get(
        prepared.condition, list)()
    return {"shape": [prepared.channels, prepared.resolution, prepared.resolution], "classes": prepared.num_classes,
            "condition": prepared.condition, "cond_shape": cond_shape, "sha256": m["files"]["images.npy"]["sha256"]}


def recorded(data: DataConfig) -> dict:
    """The record a DataConfig holds ({} where it holds none)."""
    record = {key: getattr(data, key) for key in RECORD}
    return record if any(v is not None for v in record.values()) else {}


def opened(data: DataConfig) -> Prepared | None:
    """The DATA_DIR at data.path, opened and checked against the run's record of it where the config holds
    one; None where the record stands for a folder that is not there."""
    folder, record = Path(data.path), recorded(data)
    if record:
        check_record(data)
    if record and not folder.exists():
        return None
    prepared = open_prepared(folder)
    if record and record_of(prepared) != record:
        raise UserError(f"{folder} holds another data set than the one this run was trained on (its images.npy "
                        f"or description differs from data.sha256 {data.sha256[:12]}...); put the run's "
                        "DATA_DIR there, or move that folder away to sample without it.")
    return prepared


def described(data: DataConfig) -> DataConfig:
    """`data` with its prepared data set's record (data.shape, classes, condition, cond_shape, sha256) filled
    from the DATA_DIR, checked against the record already there; other data sets as they are."""
    prepared = opened(data) if data.name == "prepared" else None
    return data if prepared is None else replace(data, **record_of(prepared))


def check_record(data: DataConfig) -> None:
    """Each value of a run's record of its prepared data set in range, and all of them there."""
    shape, classes, condition, cond_shape, sha = recorded(data).values()
    ints = lambda v, n: isinstance(v, list) and len(v) == n and all(isinstance(x, int) for x in v)  # noqa: E731
    checks = (
        ("shape", lambda: ints(shape, 3) and shape[0] in (1, 3) and shape[1] == shape[2] and 16 <= shape[1] <= 256),
        ("classes", lambda: isinstance(classes, int) and (classes == 0 or 2 <= classes <= MAX_CLASSES)),
        ("condition", lambda: condition in CONDITIONS and (condition != "label" or classes > 0)),
        ("cond_shape", {"vector": lambda: ints(cond_shape, 1) and 1 <= cond_shape[0] <= 4096,
                        "image": lambda: ints(cond_shape, 3) and cond_shape[0] in (1, 3)
                        and cond_shape[1] == cond_shape[2] and 1 <= cond_shape[1] <= 256}.get(
            condition, lambda: cond_shape == [])),
        ("sha256", lambda: isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha) is not None))
    wrong = next((key for key, ok in checks if not ok()), None)
    if wrong:
        raise UserError(f"data.{wrong} does not describe a prepared data set; data.shape, classes, condition, "
                        "cond_shape and sha256 are the run's record of its DATA_DIR, written by `diffuse train`: "
                        f"remove them all to record {data.path} again.")


def recorded_dataset(data: DataConfig) -> Dataset:
    """The Dataset of a run's record of a prepared data set whose folder is not there (checked by check_record)."""
    folder, (shape, classes, condition, cond_shape, _) = Path(data.path), recorded(data).values()
    stats = Scaling(data.mean, data.std) if data.mean is not None else None
    return Dataset(folder.name, tuple(shape), classes, condition, tuple(cond_shape) or None, 1, None,
                   functools.partial(not_there, folder), stats, at_hand=False)


def moved(data: DataConfig, folder: str | Path) -> DataConfig:
    """`data` read from `folder`, where the run's prepared data set now lies (checked against the run's record)."""
    if data.name != "prepared":
        raise UserError(f"--data gives the folder of a run's prepared data set; this run trained on {data.name}.")
    if not Path(folder).is_dir():
        raise UserError(f"--data {folder} is not a folder; give the DATA_DIR the run was trained on.")
    new = replace(data, path=str(Path(folder).resolve()))
    opened(new)  # that folder holds the run's data set
    return new


def not_there(folder: Path, split: str) -> Split:
    raise UserError(f"this needs the run's data set, and {folder} is not there; give its DATA_DIR with --data "
                    "(from Python: load(run, data=...), or the conditions themselves: model.sample(n, cond=...)).")


def read_prepared(prepared: Prepared, split: str) -> Split:
    rows = {"train": prepared.train_index, "test": prepared.heldout}[split]
    labels = (torch.from_numpy(np.asarray(prepared.labels[rows], dtype=np.int64)) if prepared.labels is not None
              else torch.full((len(rows),), -1, dtype=torch.long))
    conditions = prepared.vectors if prepared.vectors is not None else prepared.conditions
    return Split(prepared.images, labels, conditions, rows)
