"""Sources held in archives and arrays: CIFAR-10/100 python tarballs, IDX folders, .npy/.npz, Hugging Face.

CIFAR's batches are pickles; they are read from the tar without extracting it, by an unpickler
that builds nothing but numpy arrays (`CifarUnpickler`). Arrays are read through their .npy
header first, whose claimed size is checked against the bytes present, then in chunks.
"""

from __future__ import annotations

import io
import math
import pickle
import tarfile
import zipfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from diffuse.data import read_idx
from diffuse.errors import UserError
from diffuse.files import NPY_BROKEN, npy_header, read_chunks
from diffuse.sources import Row, Source, why

MAX_MEMBER = 512 << 20  # CIFAR-100's train pickle is 155 MB
CIFAR = {"cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                     ["test_batch"], "batches.meta", "labels", "label_names"),
         "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names")}
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings and numpy arrays; refuses every other class a pickle names."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data), encoding="latin1")  # CIFAR's pickles come from Python 2
        self.where = where

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise UserError(f"{self.where} asks to load {module}.{name}, which a CIFAR batch never holds; it was "
                            "not loaded: download the official tarball again.")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def unpickle(data: bytes, where: str) -> dict:
    try:
        obj = CifarUnpickler(data, where).load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted pickle is a refusal
        raise UserError(f"{where} is not a readable CIFAR batch ({why(e)}); download the tarball again.") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a CIFAR batch (a {type(obj).__name__}, not a dict); download it again.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_kind(path: Path) -> str | None:
    """"cifar10" or "cifar100" by the tarball's member names, or None where it is not a CIFAR tarball."""
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {Path(m).name for m in tar.getnames()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read as a tar file ({why(e)}); download it again.") from None
    for kind, (train, test, meta, _, _) in CIFAR.items():
        if {*train, *test, meta} <= names:
            return kind
    return None


def open_cifar(path: Path, kind: str, limit: int | None) -> Source:
    """The training batches in order, then the test batch: the held-out split."""
    train, test, meta_name, label_key, names_key = CIFAR[kind]
    batches = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar.getmembers():
                base = Path(m.name).name
                if base not in {*train, *test, meta_name}:
                    continue
                if not m.isfile() or m.size > MAX_MEMBER:
                    raise UserError(f"{path} holds {m.name} as {'a link' if not m.isfile() else 'a huge file'}, "
                                    "which the official CIFAR tarball does not; download it again.")
                batches[base] = unpickle(tar.extractfile(m).read(), f"{path}:{m.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read as a tar file ({why(e)}); download it again.") from None
    names = batches[meta_name].get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{path}: {meta_name} has no list {names_key}; download the tarball again.")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    data, labels = [], []
    for b in [*train, *test]:
        d, y = batches[b].get("data"), batches[b].get(label_key)
        if not (isinstance(d, np.ndarray) and d.dtype == np.uint8 and d.ndim == 2 and d.shape[1] == 3072
                and isinstance(y, list) and len(y) == len(d)
                and all(isinstance(v, int) and 0 <= v < len(names) for v in y)):
            raise UserError(f"{path}: {b} does not hold uint8 rows of 3072 bytes with one label 0..{len(names) - 1} "
                            "each; download the tarball again.")
        data.append(d)
        labels.extend(y)
    n_train = sum(len(d) for d in data[:len(train)])
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-first rows -> (32, 32, 3)
    heldout = np.arange(n_train, len(images))
    return array_source(kind, path, images[:limit], np.array(labels, np.int64)[:limit], names, heldout)


def array_source(kind, path: Path, images: np.ndarray, labels=None, classes=None, heldout=None, **extra) -> Source:
    """A Source over in-memory (or memory-mapped) uint8 images (N, H, W, C)."""
    def rows():
        for i in range(len(images)):
            yield Row(f"{path.name}[{i}]", partial(np.asarray, images[i]))

    _, h, w, c = images.shape
    return Source(kind, str(path.resolve()), path.resolve().name.split(".")[0], len(images), rows, {(w, h)},
                  c == 1, arrays=True, condition="label" if labels is not None else extra.pop("condition", "none"),
                  labels=labels, classes=classes, heldout=heldout, **extra)


def open_idx(folder: Path, limit: int | None) -> Source:
    """train-images/-labels (and t10k-, the held-out split) IDX files, optionally gzipped."""
    def find(name):
        for p in (folder / name, folder / f"{name}.gz"):
            if p.is_file():
                return p
        return None

    parts = []
    for prefix in ("train", "t10k"):
        im, lb = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
        if (im is None) != (lb is None) or (prefix == "train" and im is None):
            raise UserError(f"{folder} lacks {prefix}-{'labels-idx1' if lb is None else 'images-idx3'}-ubyte[.gz]; "
                            "an IDX folder needs the images and the labels of each split.")
        if im is not None:
            x, y = read_idx(im, fix="give a folder of IDX files"), read_idx(lb, fix="give a folder of IDX files")
            if x.ndim != 3 or y.shape != (len(x),):
                raise UserError(f"{im} and {lb} do not hold (N, H, W) images with one label each; check the files.")
            parts.append((x, y))
    images = np.concatenate([x for x, _ in parts])[..., None]
    labels = np.concatenate([y for _, y in parts]).astype(np.int64)
    k = int(labels.max()) + 1
    heldout = np.arange(len(parts[0][0]), len(images)) if len(parts) == 2 else None
    return array_source("idx", folder, images[:limit], labels[:limit], [str(i) for i in range(k)], heldout)


# ---------------------------------------------------------------------------------------------
# .npy and .npz: the header's claim checked against the bytes present, then chunked reads.


def checked_header(f, where: str, available: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the .npy stream f holding `available` bytes, or a refusal."""
    try:
        shape, fortran, dtype, _ = npy_header(f)
    except NPY_BROKEN as e:
        raise UserError(f"{where} is not a readable .npy array ({why(e)}); write it with numpy.save.") from None
    if fortran or dtype.hasobject:
        raise UserError(f"{where} is {'Fortran-ordered' if fortran else 'an object array'}; save a C-ordered "
                        "numeric array (numpy.ascontiguousarray) without pickles.")
    need = math.prod(shape) * dtype.itemsize
    if need != available - f.tell():
        raise UserError(f"{where} claims {shape} {dtype} ({need} bytes) but holds {available - f.tell()} bytes of "
                        "data; write it again with numpy.save.")
    return shape, dtype, f.tell()


def stream(opener, where: str, shape, dtype, offset: int):
    """The array's rows in chunks of about CHUNK_BYTES, read with plain reads (no memory map)."""
    try:
        with opener() as f:
            f.read(offset)
            yield from read_chunks(f, shape, dtype)
    except NPY_BROKEN as e:
        raise UserError(f"{where} cannot be read ({why(e)}); write it again with numpy.save.") from None


def as_nhwc(shape, dtype, where: str) -> tuple[int, ...]:
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)) or not shape[0]:
        raise UserError(f"{where} holds {dtype} {shape}; give uint8 images (N, H, W) or (N, H, W, C) with C 1 or 3.")
    return tuple(shape) if len(shape) == 4 else (*shape, 1)


def open_npy(path: Path, limit: int | None) -> Source:
    with open(path, "rb") as f:
        shape, dtype, offset = checked_header(f, str(path), path.stat().st_size)
    nhwc = as_nhwc(shape, dtype, str(path))
    n = min(nhwc[0], limit or nhwc[0])

    def rows():
        images = (x for chunk in stream(partial(open, path, "rb"), str(path), shape, dtype, offset) for x in chunk)
        for i in range(n):
            yield Row(f"{path.name}[{i}]", partial(np.asarray, next(images).reshape(nhwc[1:])))

    return Source("npy", str(path.resolve()), path.resolve().name.split(".")[0], n, rows, {(nhwc[2], nhwc[1])},
                  nhwc[3] == 1, arrays=True)


def open_npz(path: Path, limit: int | None) -> Source:
    """images (uint8) and at most one of labels (integers (N,)), vectors (floats (N, D)), conditions (uint8 images)."""
    try:
        with zipfile.ZipFile(path) as z:
            members = {Path(i.filename).stem: i for i in z.infolist() if i.filename.endswith(".npy")}
            headers = {k: member_header(z, path, i) for k, i in members.items()}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read as an .npz file ({why(e)}); write it with numpy.savez.") from None
    if "images" not in headers:
        raise UserError(f"{path} has no 'images' array; save the images as numpy.savez(path, images=...).")
    extra = [k for k in ("labels", "vectors", "conditions") if k in headers]
    if len(extra) > 1:
        raise UserError(f"{path} holds both {extra[0]} and {extra[1]}; keep one condition per data set.")
    nhwc = as_nhwc(*headers["images"][:2], f"{path}:images")
    n = min(nhwc[0], limit or nhwc[0])

    def reader(key):
        @contextmanager
        def opener():
            with zipfile.ZipFile(path) as z, z.open(members[key]) as f:
                yield f
        return stream(opener, f"{path}:{key}", *headers[key])

    def rows():
        images = (x for chunk in reader("images") for x in chunk)
        conds = (x for chunk in reader("conditions") for x in chunk) if "conditions" in headers else None
        for i in range(n):
            x = next(images).reshape(nhwc[1:])
            c = next(conds).reshape(cond_shape[1:]) if conds is not None else None
            yield Row(f"{path.name}[{i}]", partial(np.asarray, x), None if c is None else partial(np.asarray, c))

    fields = {"condition": "none"}
    cond_shape = None
    if extra == ["labels"] or extra == ["vectors"]:
        key = extra[0]
        shape, dtype, _ = headers[key]
        want = (nhwc[0],) if key == "labels" else (nhwc[0], shape[-1] if shape else 0)
        if tuple(shape) != want or dtype.kind not in ("iu" if key == "labels" else "f") or (key == "vectors" and not 1 <= want[1] <= 4096):
            raise UserError(f"{path}: '{key}' is {dtype} {shape}; give {'integers' if key == 'labels' else 'floats'} "
                            f"of shape {want if key == 'labels' else f'({nhwc[0]}, D)'}.")
        values = np.concatenate(list(reader(key)))[:n]
        fields = numeric_condition(path, key, values)
    elif extra == ["conditions"]:
        cond_shape = as_nhwc(*headers["conditions"][:2], f"{path}:conditions")
        if cond_shape[0] != nhwc[0]:
            raise UserError(f"{path}: 'conditions' has {cond_shape[0]} images for {nhwc[0]} images; give one each.")
        fields = {"condition": "image", "cond_sizes": {(cond_shape[2], cond_shape[1])}, "cond_gray": cond_shape[3] == 1}
    return Source("npz", str(path.resolve()), path.stem, n, rows, {(nhwc[2], nhwc[1])}, nhwc[3] == 1, arrays=True,
                  **fields)


def member_header(z: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo):
    """A member's .npy header, its size claim bounded by the archive's real bytes."""
    where = f"{path}:{info.filename}"
    real = path.stat().st_size
    if info.compress_size > real or info.file_size > 1100 * info.compress_size + 4096:  # deflate packs < 1032:1
        raise UserError(f"{where} claims {info.file_size} bytes in a {real}-byte file; write it again with numpy.savez.")
    with z.open(info) as f:
        return checked_header(f, where, info.file_size)


def numeric_condition(path: Path, key: str, values: np.ndarray) -> dict:
    if key == "vectors":
        values = values.astype(np.float32)
        if not np.isfinite(values).all():
            raise UserError(f"{path}: 'vectors' holds values that are not finite in float32; fix them.")
        return {"condition": "vector", "vectors": values}
    if values.min() < 0 or values.max() >= 100_000 or len(np.unique(values)) < 2:
        raise UserError(f"{path}: 'labels' must be classes 0..K-1 with K between 2 and 100000 (found "
                        f"{values.min()}..{values.max()}); renumber them.")
    k = int(values.max()) + 1
    return {"condition": "label", "labels": values.astype(np.int64), "classes": [str(i) for i in range(k)]}
