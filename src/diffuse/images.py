"""Sample files: `.npz` with images uint8 (N, H, W, C) and labels int64 (N,); PNG grids, panels and scatter plots."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from diffuse.errors import UserError
from diffuse.files import NPY_BROKEN, failure, read_npy_header, writing


MAX_SAMPLES = 10**7  # images in one samples file: 200 times a 50k FID, and 7.8 GB even at 28x28 grey
DEFLATE_RATIO = 1032  # the most a deflated zip member can expand: a size claimed beyond it is a lie


def save_npz(path: Path, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
    """Write samples atomically: a temporary name, then rename."""
    images, labels = np.asarray(images), np.asarray(labels)
    assert images.dtype == np.uint8 and images.ndim == 4 and labels.dtype == np.int64
    with NpzWriter(Path(path), "images", images.dtype, images.shape) as out:
        out.write(images)
        out.finish(labels)


class NpzWriter:
    """A samples .npz written a chunk at a time: `key` (N, ...) streamed into an uncompressed zip member
    under a temporary name beside `path`, then `finish(labels)` adds the labels and renames it into place.
    Only the chunk in hand is ever in memory; a failure removes the temporary file.

        with NpzWriter(path, "images", np.uint8, (n, h, w, c)) as out:
            out.write(chunk)  # ... until n rows
            out.finish(labels)
    """

    def __init__(self, path: Path, key: str, dtype, shape: tuple[int, ...]):
        self.path, self.key, self.dtype, self.shape = Path(path), key, np.dtype(dtype), tuple(shape)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}.npz")
        self.rows = 0

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zip.open(f"{self.key}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.member, header)
        return self

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.shape[1:] == self.shape[1:] and self.rows + len(rows) <= self.shape[0]
        self.member.write(rows.tobytes())
        self.rows += len(rows)

    def finish(self, labels: np.ndarray) -> None:
        assert self.rows == self.shape[0] and labels.shape == (self.rows,)
        self.member.close()
        with self.zip.open("labels.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(labels, np.int64), allow_pickle=False)
        self.zip.close()
        os.replace(self.tmp, self.path)

    def __exit__(self, kind, error, trace):
        if kind is None:
            return
        try:
            self.member.close()  # a no-op where finish closed it
            self.zip.close()
        except OSError:  # the disk that failed a write may fail these too; the temporary file goes anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, a folder in the way: one sentence naming the file
            raise failure(self.path, error) from None


def member_header(z: zipfile.ZipFile, name: str, path: Path, archive_bytes: int) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy member `name`, its header checked against the bytes the archive holds
    before anything the header asks for is allocated."""
    info = z.getinfo(name)
    with z.open(info) as f:
        header = read_npy_header(f)
    if header is None:
        raise UserError(f"{path}: {name} has no readable .npy header; write samples with `diffuse sample`.")
    shape, fortran, dtype, offset = header
    if dtype.hasobject or fortran:
        raise UserError(f"{path}: {name} is not a plain C-ordered array ({dtype}); write samples with `diffuse sample`.")
    need = offset + math.prod(shape) * dtype.itemsize
    most = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_RATIO)
    if need != info.file_size or need > most or info.compress_size > archive_bytes:
        raise UserError(f"{path}: {name}'s header claims {dtype} {shape} ({need} bytes) where the file holds "
                        f"{info.compress_size} (truncated, or a header that lies); write samples with `diffuse sample`.")
    return shape, dtype


def check_samples_file(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of a samples .npz, from its headers alone, each checked against the bytes
    present and the images (or points) against MAX_SAMPLES; raises UserError where it is not one."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if "images" not in names and "points" not in names:
                raise UserError(f"{path} has no 'images' array; write samples with `diffuse sample`.")
            arrays = {n: member_header(z, f"{n}.npy", path, path.stat().st_size) for n in names
                      if n in ("images", "points", "labels")}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give a samples .npz or a run directory.") from None
    except NPY_BROKEN as e:
        raise UserError(f"{path} is not a readable .npz file ({e}).") from None
    shape = arrays.get("images", arrays.get("points"))[0]
    if shape and shape[0] > MAX_SAMPLES:
        raise UserError(f"{path} claims {shape[0]} samples, over the limit of {MAX_SAMPLES}; it is not a samples file.")
    return arrays


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,)) from a samples file, checking its format (headers
    first, against the bytes present, so that a lying header allocates nothing)."""
    path = Path(path)
    arrays = check_samples_file(path)
    if "images" not in arrays:
        raise UserError(f"{path} has no 'images' array; write samples with `diffuse sample`.")
    (shape, dtype), labels_of = arrays["images"], arrays.get("labels")
    if dtype != np.uint8 or len(shape) != 4:
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, C), not {dtype} {shape}.")
    if labels_of is not None and (labels_of[0] != shape[:1] or labels_of[1].kind not in "iu"):
        raise UserError(f"{path}: 'labels' must be integers of shape ({shape[0]},), not "
                        f"{labels_of[1]} {labels_of[0]}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
            labels = f["labels"] if labels_of is not None else np.full(len(images), -1, np.int64)
    except NPY_BROKEN as e:
        raise UserError(f"{path} is not a readable .npz file ({e}).") from None
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
