"""Sample files: `.npz` with images uint8 (N, H, W, C) and labels int64 (N,); PNG grids, panels and scatter plots."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from diffuse.errors import UserError
from diffuse.files import writing


def save_npz(path: Path, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
    """Write samples atomically: a temporary name, then rename."""
    images, labels = np.asarray(images), np.asarray(labels)
    assert images.dtype == np.uint8 and images.ndim == 4 and labels.dtype == np.int64
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, images=images, labels=labels)
        tmp.replace(path)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,)) from a samples file, checking its format."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise UserError(f"{path} has no 'images' array; write samples with `diffuse sample`.")
            images = f["images"]
            labels = f["labels"] if "labels" in f.files else np.full(len(images), -1, np.int64)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give a samples .npz or a run directory.") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz file ({e}).") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, C), not {images.dtype} {images.shape}.")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: 'labels' must be integers of shape ({len(images)},), not "
                        f"{labels.dtype} {labels.shape}.")
    return images, labels.astype(np.int64)


def grid(images: np.ndarray, nrow: int, pad: int = 2) -> Image.Image:
    """uint8 (N, H, W, C) -> one PIL image with `nrow` images per row on a white background."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def rows_by_label(labels: np.ndarray, per_row: int = 10, rows: int = 10) -> np.ndarray:
    """Indices that lay out a grid with a row per label (ascending): the first `per_row` of each.

    Unconditional samples (all labels -1) and classes with too few samples fall back to the first ones.
    """
    if (labels < 0).all():
        return np.arange(min(len(labels), per_row * rows))
    picked = [np.flatnonzero(labels == label)[:per_row] for label in np.unique(labels)[:rows]]
    full = [p for p in picked if len(p) == per_row]
    return np.concatenate(full) if full else np.arange(min(len(labels), per_row * rows))


# ---------------------------------------------------------------------------------------------
# Pixels in [0, 1] and the super-resolution panel.


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float64 (N, C, H, W) in [0, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded and clipped."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def low_res_of(images: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> their low-res versions float64 (N, C, H / factor, W / factor) in [0, 1]."""
    return F.avg_pool2d(to_unit(images), factor)


def upsample(low: torch.Tensor, factor: int, mode: str) -> np.ndarray:
    """Low-res images (N, C, h, w) in [0, 1] -> uint8 (N, h * factor, w * factor, C), 'nearest' or 'bilinear'."""
    align = {} if mode == "nearest" else {"align_corners": False}
    return to_uint8(F.interpolate(low, scale_factor=factor, mode=mode, **align))


def first_of_each_class(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Indices of the first image of each class present, classes ascending."""
    labels = np.asarray(labels)
    return np.array([np.flatnonzero(labels == c)[0] for c in np.unique(labels[labels >= 0])], dtype=np.int64)


def panel(samples: np.ndarray, truth: np.ndarray, factor: int, inputs: np.ndarray | None = None) -> np.ndarray:
    """Rows for a grid of k columns: input, sample, truth -> uint8 (3k, H, W, C).

    The input is the low-res truth nearest-upsampled (factor > 1), or the given condition images
    (k, h, w, c) of paired data, nearest-resized to H x W with gray repeated to C channels.
    """
    if inputs is None:
        inputs = upsample(low_res_of(truth, factor), factor, "nearest")
    else:
        size = truth.shape[1:3]
        inputs = np.stack([np.asarray(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im)
                                      .resize(size[::-1], Image.NEAREST)).reshape(*size, -1) for im in inputs])
        inputs = inputs[..., :truth.shape[-1]] if inputs.shape[-1] >= truth.shape[-1] else \
            np.repeat(inputs, truth.shape[-1], axis=-1)
    return np.concatenate([inputs, samples, truth])


# ---------------------------------------------------------------------------------------------
# PNG files.


def save_grid(path: Path, images: np.ndarray, nrow: int, scale: int = 2) -> None:
    img = grid(np.asarray(images), nrow)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    _save_png(img, path)


def save_scatter(path: Path, points: np.ndarray, labels: np.ndarray, size: int = 400, extent: float = 2.5) -> None:
    """2-D points in [-extent, extent]^2 as a PNG scatter plot, coloured by label."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for (x, y), label in zip(np.asarray(points), np.asarray(labels)):
        px, py = (x + extent) / (2 * extent) * size, (extent - y) / (2 * extent) * size
        draw.point((px, py), fill=colours[int(label) % len(colours)] if label >= 0 else (0, 0, 0))
    _save_png(img, path)


def _save_png(img: Image.Image, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp)
        tmp.replace(path)
