"""`diffuse data prepare`: a user's images, in any of the sources `diffuse.sources` and `diffuse.archives`
read, converted into a prepared DATA_DIR (`diffuse.prepared`).

Two passes: the source's headers give the count, sizes and modes; then each image is decoded,
converted (`diffuse.pixels`) and appended to the .npy files with plain writes (`files.NpyRows`; no memory
map, so a source larger than memory costs one chunk of it). An image that fails to decode is skipped and
reported; more than half skipped is a refusal.
"""

from __future__ import annotations

import dataclasses
import tarfile
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffuse import archives, hfdata, sources
from diffuse.errors import UserError
from diffuse.files import NpyRows
from diffuse.pixels import check_sizes, convert, default_resolution
from diffuse.prepared import FORMAT, VERSION, Prepared, check_out, write_prepared
from diffuse.sources import Source, why


@dataclass(frozen=True)
class PrepareOptions:
    resolution: int | None = None        # R: shorter side to R, centre crop; None: the images' own square size
    channels: int | None = None          # 1 or 3; None: 1 when every image is grey
    crop: str = "center"                 # "center" | "refuse" (non-square images refused)
    cond_resolution: int | None = None   # paired data: the conditions' size (None: R)
    cond_channels: int | None = None     # paired data: None: the conditions' own rule
    limit: int | None = None             # the first N examples in the source's order
    heldout: float = 0.1                 # the held-out fraction where the source has no test split
    seed: int = 0                        # the held-out draw
    name: str | None = None              # None: the source's folder or file stem
    labels: str | None = None            # a label file other than dataset.json / labels.csv
    image_column: str | None = None      # Hugging Face
    label_column: str | None = None      # Hugging Face


def check_options(o: PrepareOptions) -> None:
    for flag, value, lo, hi in (("--resolution", o.resolution, 16, 256), ("--cond-resolution", o.cond_resolution, 4, 256),
                                ("--limit", o.limit, 2, 10**9), ("--seed", o.seed, 0, 2**63 - 1)):
        if value is not None and not lo <= value <= hi:
            raise UserError(f"{flag} {value} is outside {lo}..{hi}; give a value in that range.")
    for flag, value in (("--channels", o.channels), ("--cond-channels", o.cond_channels)):
        if value not in (None, 1, 3):
            raise UserError(f"{flag} {value} must be 1 or 3.")
    if o.crop not in ("center", "refuse"):
        raise UserError(f"--crop {o.crop!r} must be center or refuse.")
    if not 0 < o.heldout <= 0.5:
        raise UserError(f"--heldout {o.heldout} must be a fraction in (0, 0.5].")
    if o.name is not None and not 0 < len(o.name) <= 200:
        raise UserError("--name must have 1 to 200 characters.")


def open_source(paths: list[Path], o: PrepareOptions) -> Source:
    """The Source the paths name: two folders are pairs; one is a folder, IDX folder, HF data, tarball or array."""
    if not 1 <= len(paths) <= 2:
        raise UserError(f"give one SOURCE, or two folders (conditions, then targets), not {len(paths)}.")
    for p in paths:
        if not p.exists():
            raise UserError(f"the source {p} does not exist; give a folder of images or a data file.")
    if len(paths) == 2:
        if not all(p.is_dir() for p in paths):
            raise UserError("two sources must both be folders: the conditions, then the targets.")
        return sources.open_pairs(paths[0], paths[1], o.limit)
    if o.cond_resolution or o.cond_channels:
        raise UserError("--cond-resolution and --cond-channels are for paired folders (two SOURCEs).")
    p = paths[0]
    if hfdata.is_hf(p):
        return hfdata.open_hf(p, o.image_column, o.label_column, o.limit)
    if p.is_dir():
        if any((p / f"train-images-idx3-ubyte{z}").is_file() for z in ("", ".gz")):
            return archives.open_idx(p, o.limit)
        return sources.open_folder(p, Path(o.labels) if o.labels else None, o.limit)
    if p.suffix == ".npy":
        return archives.open_npy(p, o.limit)
    if p.suffix == ".npz":
        return archives.open_npz(p, o.limit)
    if tarfile.is_tarfile(p):
        kind = archives.cifar_kind(p)
        if kind:
            return archives.open_cifar(p, kind, o.limit)
    raise UserError(f"{p} is not a source diffuse reads; give a folder of images, a CIFAR python tarball, an IDX "
                    "folder, a .npy, .npz, .parquet or a Hugging Face save_to_disk folder.")


def prepare(sources_: list[str | Path], out: str | Path, options: PrepareOptions = PrepareOptions(),
            log: Callable[[str], None] = print) -> Prepared:
    """Read the source(s), convert every image, and write DATA_DIR at `out`; returns it opened."""
    start = time.perf_counter()
    check_options(options)
    out = Path(out)
    check_out(out)
    source = open_source([Path(s) for s in sources_], options)
    r = options.resolution or (default_resolution(source.sizes, f"the images of {source.path}")
                               if not source.arrays or len(source.sizes) > 1 else first_square(source))
    if not 16 <= r <= 256:
        raise UserError(f"the images of {source.path} are {r}x{r}, outside the 16..256 diffuse trains on; give "
                        "--resolution R to resize them.")
    check_sizes(source.sizes, r, options.crop, f"the images of {source.path}")
    c = options.channels or (1 if source.gray else 3)
    cond = None
    if source.condition == "image":
        rc = options.cond_resolution or r
        check_sizes(source.cond_sizes, rc, options.crop, f"the conditions of {source.path}")
        cond = (rc, options.cond_channels or (1 if source.cond_gray else 3))
    prepared = write_prepared(out, lambda folder: fill(folder, source, r, c, cond, options, log))
    m = prepared.meta
    log(f"prepared {m['count']} images of {r}x{r}x{c} ({m['condition']} condition"
        + (f", {len(m['classes'])} classes" if m["classes"] else "") + f"), {m['heldout']} held out, "
        f"{len(m['skipped'])} skipped, in {time.perf_counter() - start:.1f} s: {out}")
    return prepared


def first_square(source: Source) -> int:
    (w, h), = source.sizes
    if w != h:
        raise UserError(f"the images of {source.path} are {w}x{h}, not square; give --resolution R to resize and "
                        "centre-crop them.")
    return w


def fill(folder: Path, source: Source, r: int, c: int, cond: tuple[int, int] | None, o: PrepareOptions,
         log: Callable[[str], None]) -> dict:
    """Write images.npy (and conditions.npy) row by row, then the labels, vectors and held-out split."""
    n = source.count
    with NpyRows(folder / "images.npy", n, (r, r, c)) as images, \
            (NpyRows(folder / "conditions.npy", n, (cond[0], cond[0], cond[1])) if cond else nullcontext()) as conds:
        kept, skipped = [], list(source.skipped)
        for i, row in enumerate(source.rows()):
            try:
                x = convert(row.image(), r, c)
                y = convert(row.cond(), *cond) if cond else None
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to decode an untrusted image is a skip
                skipped.append({"file": row.name, "why": why(e)})
                continue
            images.append(x)
            if conds is not None:
                conds.append(y)
            kept.append(i)
    total = n + len(source.skipped)
    if skipped:
        log(f"skipped {len(skipped)} of {total} image files that could not be read: "
            + ", ".join(s["file"] for s in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    if len(kept) < 2 or len(skipped) * 2 > total:
        raise UserError(f"{len(skipped)} of the {total} images in {source.path} could not be read (first: "
                        f"{skipped[0]['file'] if skipped else 'none'}), leaving {len(kept)}; fix or remove the broken "
                        "files.")
    kept = np.array(kept, np.int64)
    return describe(folder, source, kept, skipped, r, c, cond, o)


def describe(folder: Path, source: Source, kept: np.ndarray, skipped: list, r: int, c: int, cond, o) -> dict:
    """Write labels/vectors/heldout.npy and return data.json's fields (write_prepared adds mean, std, files)."""
    n = len(kept)
    classes = counts = dim = None
    if source.condition == "label":
        labels = source.labels[kept]
        classes = source.classes
        counts = np.bincount(labels, minlength=len(classes)).tolist()
        np.save(folder / "labels.npy", labels.astype(np.int64))
    if source.condition == "vector":
        vectors = source.vectors[kept].astype(np.float32)
        dim = vectors.shape[1]
        np.save(folder / "vectors.npy", vectors)
    heldout = np.flatnonzero(np.isin(kept, source.heldout)) if source.heldout is not None else np.zeros(0, np.int64)
    if not 0 < len(heldout) < n:  # no test split of its own (or --limit cut it off): a seeded draw
        m = max(1, round(o.heldout * n))
        heldout = np.sort(np.random.default_rng(o.seed).choice(n, m, replace=False))
    np.save(folder / "heldout.npy", heldout.astype(np.int64))
    return {"format": FORMAT, "version": VERSION, "name": o.name or source.name, "source": source.path,
            "source_kind": source.kind, "count": n, "resolution": r, "channels": c, "condition": source.condition,
            "classes": classes, "class_counts": counts, "vector_dim": dim,
            "cond_resolution": cond[0] if cond else None, "cond_channels": cond[1] if cond else None,
            "heldout": int(len(heldout)), "seed": o.seed, "skipped": skipped,
            "options": dataclasses.asdict(o)}
