"""A prepared data set, DATA_DIR, as `diffuse data prepare` writes it and training reads it.

    DATA_DIR/
      data.json        the description (below)
      images.npy       uint8 (N, R, R, C), C in {1, 3}, read memory-mapped (np.memmap)
      labels.npy       int64 (N,), values in [0, K)       only for condition "label"
      vectors.npy      float32 (N, D), all finite          only for condition "vector"
      conditions.npy   uint8 (N, Rc, Rc, Cc)               only for condition "image" (paired data)
      heldout.npy      int64 (M,), sorted, unique, in [0, N): the held-out split; the rest is the training split
      preview.png      the first 64 images (for the eye; not read back)

data.json: "format": "diffuse-data", "version": 1, "name", "source", "source_kind", "count" N,
"resolution" R, "channels" C, "condition", "classes" and "class_counts" (K entries, or null),
"vector_dim", "cond_resolution", "cond_channels" (ints or null), "heldout" M, "seed", "mean" and
"std" (float64, of all pixels in [0, 1] units), "files" {name: {"sha256", "bytes"}} for every .npy,
"skipped" [{"file", "why"}], "options". Keys beyond these are allowed (later steps add theirs).

Bounds that `open_prepared` enforces: 2 <= N <= 10^9; 16 <= R <= 256; 1 <= M < N; 2 <= K <= 100000
and the class counts sum to N; 1 <= D <= 4096; 1 <= Rc <= 256; C and Cc in {1, 3}; seed an int
in [0, 2^63); 0 <= mean <= 1, 0 <= std <= 0.5; ints are never bools, floats always finite.
`open_prepared` is cheap: it reads the headers, the labels and the held-out split, and scans the
vectors, never the images; `verify_prepared` also checks every SHA-256.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffuse.errors import UserError
from diffuse.files import failure, fsync_path, npy_chunks, read_npy_header, sha256_file
from diffuse.images import grid

FORMAT, VERSION = "diffuse-data", 1
MAX_JSON = 1 << 20
KINDS = ("folder", "class-folders", "label-file", "paired", "cifar10", "cifar100", "idx", "npz", "npy", "hf")
CONDITIONS = ("none", "label", "vector", "image")
MAX_CLASSES = 100_000
FIX = "re-run `diffuse data prepare`"


@dataclass(frozen=True)
class Prepared:
    path: Path
    meta: dict
    images: np.ndarray               # uint8 (N, R, R, C), memory-mapped
    labels: np.ndarray | None        # int64 (N,)
    vectors: np.ndarray | None       # float32 (N, D)
    conditions: np.ndarray | None    # uint8 (N, Rc, Rc, Cc)
    heldout: np.ndarray              # int64 (M,)
    train_index: np.ndarray          # int64 (N - M,), the complement of heldout

    name = property(lambda self: self.meta["name"])
    condition = property(lambda self: self.meta["condition"])
    num_classes = property(lambda self: len(self.meta["classes"] or ()))
    resolution = property(lambda self: self.meta["resolution"])
    channels = property(lambda self: self.meta["channels"])


def refuse(path: Path, what: str) -> UserError:
    return UserError(f"{path} {what}; {FIX} to write it again.")


def is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_float(v, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def read_meta(folder: Path) -> dict:
    path = folder / "data.json"
    if not folder.is_dir() or folder.is_symlink():
        raise UserError(f"{folder} is not a prepared data folder; run `diffuse data prepare SOURCE --out {folder}` "
                        "first.")
    if not path.is_file() or path.is_symlink():
        raise refuse(path, "is missing or not a plain file")
    if path.stat().st_size > MAX_JSON:
        raise refuse(path, f"is over {MAX_JSON >> 20} MB, far more than a description needs")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise refuse(path, "is not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise refuse(path, "is not valid JSON") from None
    if not isinstance(meta, dict):
        raise refuse(path, "does not hold a JSON object")
    check_meta(path, meta)
    return meta


def check_meta(path: Path, m: dict) -> None:
    """Every field of data.json, by type and range; a refusal names the first wrong one."""
    def need(key, ok, what):
        if key not in m or not ok(m[key]):
            raise refuse(path, f"has a missing or wrong \"{key}\" (it must be {what})")

    need("format", lambda v: v == FORMAT, f'"{FORMAT}"')
    need("version", lambda v: is_int(v, VERSION, VERSION), str(VERSION))
    need("name", lambda v: isinstance(v, str) and 0 < len(v) <= 200, "a name of 1 to 200 characters")
    need("source", lambda v: isinstance(v, str) and len(v) <= 100_000, "a string")
    need("source_kind", lambda v: v in KINDS, f"one of {', '.join(KINDS)}")
    need("count", lambda v: is_int(v, 2, 10**9), "an int from 2 to 10^9")
    n = m["count"]
    need("resolution", lambda v: is_int(v, 16, 256), "an int from 16 to 256")
    need("channels", lambda v: v in (1, 3) and not isinstance(v, bool), "1 or 3")
    need("condition", lambda v: v in CONDITIONS, f"one of {', '.join(CONDITIONS)}")
    c = m["condition"]
    labelled, vector, image = c == "label", c == "vector", c == "image"
    need("classes", lambda v: v is None if not labelled else (isinstance(v, list) and 2 <= len(v) <= MAX_CLASSES
                                                              and all(isinstance(s, str) for s in v)),
         "a list of 2 to 100000 class names for condition label, else null")
    k = len(m["classes"]) if labelled else 0
    need("class_counts", lambda v: v is None if not labelled else (isinstance(v, list) and len(v) == k and
                                                                   all(is_int(x, 0, n) for x in v) and sum(v) == n),
         "one count per class summing to count for condition label, else null")
    need("vector_dim", lambda v: is_int(v, 1, 4096) if vector else v is None,
         "an int from 1 to 4096 for condition vector, else null")
    need("cond_resolution", lambda v: is_int(v, 1, 256) if image else v is None,
         "an int from 1 to 256 for condition image, else null")
    need("cond_channels", lambda v: (v in (1, 3) and not isinstance(v, bool)) if image else v is None,
         "1 or 3 for condition image, else null")
    need("heldout", lambda v: is_int(v, 1, n - 1), "an int from 1 to count - 1")
    need("seed", lambda v: is_int(v, 0, 2**63 - 1), "an int from 0 to 2^63 - 1")
    need("mean", lambda v: is_float(v, 0.0, 1.0), "a finite number in [0, 1]")
    need("std", lambda v: is_float(v, 0.0, 0.5), "a finite number in [0, 0.5]")
    names = set(expected_arrays(m))
    need("files", lambda v: isinstance(v, dict) and set(v) == names and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and re.fullmatch("[0-9a-f]{64}", e["sha256"])
        and is_int(e.get("bytes"), 0, 2**62) for e in v.values()),
        f"an entry with sha256 and bytes for each of {', '.join(sorted(names))}")
    need("skipped", lambda v: isinstance(v, list) and all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("why"), str) for e in v),
        'a list of {"file", "why"} entries')
    need("options", lambda v: isinstance(v, dict), "an object")


def expected_arrays(m: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The .npy files data.json implies: {name: (dtype, shape)}."""
    n, r = m["count"], m["resolution"]
    arrays = {"images.npy": (np.dtype(np.uint8), (n, r, r, m["channels"])),
              "heldout.npy": (np.dtype(np.int64), (m.get("heldout"),))}
    extra = {"label": ("labels.npy", np.int64, (n,)), "vector": ("vectors.npy", np.float32, (n, m.get("vector_dim"))),
             "image": ("conditions.npy", np.uint8, (n, m.get("cond_resolution"), m.get("cond_resolution"),
                                                    m.get("cond_channels")))}.get(m["condition"])
    if extra:
        arrays[extra[0]] = (np.dtype(extra[1]), extra[2])
    return arrays


def map_array(folder: Path, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The memory-mapped array, after its header and byte size were checked against data.json."""
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise refuse(path, "is missing or not a plain file (links are refused)")
    with open(path, "rb") as f:
        header = read_npy_header(f)
    if header is None:
        raise refuse(path, "has no readable .npy header")
    got_shape, fortran, got_dtype, offset = header
    if got_dtype != dtype or tuple(got_shape) != shape or fortran:
        raise refuse(path, f"holds {got_dtype} {tuple(got_shape)} where data.json says {dtype} {shape}")
    need = offset + math.prod(shape) * dtype.itemsize
    if path.stat().st_size != need:
        raise refuse(path, f"has {path.stat().st_size} bytes where its header implies {need} (truncated or padded)")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def open_prepared(path: str | Path) -> Prepared:
    """DATA_DIR, checked cheaply (headers, sizes, labels, heldout, vectors in chunks), its arrays memory-mapped."""
    folder = Path(path)
    meta = read_meta(folder)
    links = [p.name for p in folder.iterdir() if p.is_symlink()]
    if links:
        raise refuse(folder / links[0], "is a link, which a prepared data folder never holds")
    arrays = {name: map_array(folder, name, *spec) for name, spec in expected_arrays(meta).items()}
    n = meta["count"]
    heldout = np.array(arrays["heldout.npy"])
    if heldout[0] < 0 or heldout[-1] >= n or (len(heldout) > 1 and not (np.diff(heldout) > 0).all()):
        raise refuse(folder / "heldout.npy", f"is not a sorted list of distinct indices in [0, {n})")
    labels, vectors = arrays.get("labels.npy"), arrays.get("vectors.npy")
    if labels is not None:
        k = len(meta["classes"])
        if labels.min() < 0 or labels.max() >= k:
            raise refuse(folder / "labels.npy", f"holds labels outside [0, {k})")
        if np.bincount(labels, minlength=k).tolist() != meta["class_counts"]:
            raise refuse(folder / "labels.npy", "disagrees with data.json's class_counts")
    if vectors is not None:
        step = max(1, (1 << 22) // vectors.shape[1])
        if not all(np.isfinite(vectors[i:i + step]).all() for i in range(0, n, step)):
            raise refuse(folder / "vectors.npy", "holds values that are not finite")
    train = np.ones(n, bool)
    train[heldout] = False
    return Prepared(folder, meta, arrays["images.npy"], labels, vectors, arrays.get("conditions.npy"), heldout,
                    np.flatnonzero(train).astype(np.int64))


def verify_prepared(path: str | Path) -> Prepared:
    """open_prepared, plus every file's byte count and SHA-256 against data.json."""
    prepared = open_prepared(path)
    for name, entry in prepared.meta["files"].items():
        file = prepared.path / name
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise refuse(file, "does not match the SHA-256 or byte count in data.json (it was changed or damaged)")
    return prepared


# ---------------------------------------------------------------------------------------------
# Writing: into a temporary sibling folder, renamed into place last.


def is_data_dir(folder: Path) -> bool:
    try:
        return json.loads((folder / "data.json").read_bytes()[:MAX_JSON]).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not a data folder
        return False


def check_out(out: Path) -> None:
    """--out must be a new path, an empty folder, or a prepared data folder (then replaced); others stay untouched."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a {'link' if out.is_symlink() else 'file'}; give a new path, an empty "
                        "folder, or a prepared data folder to replace.")
    if out.is_dir() and any(out.iterdir()) and not is_data_dir(out):
        raise UserError(f"--out {out} is a folder with files that is not a prepared data folder; give a new path, an "
                        "empty folder, or a prepared data folder to replace.")


def pixel_stats(chunks) -> tuple[float, float]:
    """Mean and std (ddof 0) of all pixels in [0, 1] units over uint8 chunks, exact from a histogram."""
    counts = np.zeros(256, np.int64)
    for chunk in chunks:
        counts += np.bincount(chunk.ravel(), minlength=256)
    v = np.arange(256, dtype=np.float64) / 255
    mean = float(counts @ v / counts.sum())
    return mean, float(math.sqrt(counts @ (v - mean) ** 2 / counts.sum()))


def write_prepared(out: str | Path, fill: Callable[[Path], dict]) -> Prepared:
    """Write DATA_DIR at `out`: fill(folder) writes the .npy files into a temporary sibling folder and returns
    data.json's fields but mean, std and files, which this adds with the preview; the folder is renamed into
    place last, replacing an older DATA_DIR, so a crash leaves no half-written one."""
    out = Path(out)
    check_out(out)
    tmp = out.parent / f".{out.name}.prepare-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = fill(tmp)
        meta["mean"], meta["std"] = pixel_stats(npy_chunks(tmp / "images.npy"))
        meta["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(tmp.glob("*.npy"))}
        grid(next(npy_chunks(tmp / "images.npy"))[:64], nrow=8).save(tmp / "preview.png")
        check_meta(tmp / "data.json", meta)  # what is written must read back
        (tmp / "data.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for p in tmp.iterdir():
            fsync_path(p)
        fsync_path(tmp)
        publish(tmp, out)
    except OSError as e:
        raise failure(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_prepared(out)


def publish(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an empty folder or an older DATA_DIR at out gives way."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.is_dir():
        out.rename(old)
    tmp.rename(out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)
