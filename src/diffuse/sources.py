"""The sources `diffuse data prepare` reads: folders of images, class folders, label files, paired folders.

Every reader returns a `Source`: how many rows it has, the sizes and modes found by opening each
image's header (pass 1), the labels, vectors or class names, and `rows()`, which yields each
image's loader in order (pass 2), so no folder is ever held in memory. Folders are searched
recursively (os.walk, links to folders not followed), hidden files and folders are ignored, and
the order is that of the sorted relative paths. CIFAR, IDX, .npy/.npz and Hugging Face data
are read by `diffuse.archives`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from diffuse.errors import UserError
from diffuse.labelfiles import labels_of, read_label_file
from diffuse.pixels import is_gray

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LABEL_FILES = ("dataset.json", "labels.csv")


@dataclass
class Row:
    """One example: its name (for the skipped list) and loaders of its image and of its image condition."""

    name: str
    image: Callable[[], Image.Image | np.ndarray]
    cond: Callable[[], Image.Image | np.ndarray] | None = None


@dataclass
class Source:
    kind: str                                   # data.json's source_kind
    path: str                                   # the absolute source path(s), joined by " + "
    name: str                                   # the default --name
    count: int                                  # rows() yields this many
    rows: Callable[[], Iterator[Row]]
    sizes: set[tuple[int, int]]                 # (width, height) of the images
    gray: bool                                  # every image is grey
    arrays: bool = False                        # arrays keep their size unless --resolution is given
    condition: str = "none"
    labels: np.ndarray | None = None            # int64 (count,)
    vectors: np.ndarray | None = None           # float32 (count, D)
    classes: list[str] | None = None
    heldout: np.ndarray | None = None           # the source's own test rows, or None
    cond_sizes: set[tuple[int, int]] | None = None
    cond_gray: bool = False
    skipped: list[dict] = field(default_factory=list)  # files that would not open in pass 1


def why(e: Exception) -> str:
    """A short one-line reason from an exception."""
    text = " ".join(str(e).split())[:100]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()  # the copy outlives the file, which the with closes


def probe(folder: Path, rels: list[str]):
    """Open each image's header: (the readable rels, their sizes, all grey?, skipped records)."""
    kept, sizes, gray, skipped = [], [], True, []
    for rel in rels:
        try:
            with Image.open(folder / rel) as im:  # PIL raises many kinds of error on a broken file
                size, mode = im.size, im.mode
        except Exception as e:  # noqa: BLE001 - any failure to open an untrusted image is a skip
            skipped.append({"file": rel, "why": why(e)})
            continue
        kept.append(rel)
        sizes.append(size)
        gray = gray and is_gray(mode)
    return kept, sizes, gray, skipped


def walk_images(folder: Path) -> list[str]:
    """Sorted relative paths (with /) of the image files under folder, hidden ones left out."""
    rels = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(root).relative_to(folder)
        for f in files:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                rels.append((base / f).as_posix())
    return sorted(rels)


def no_images(folder: Path) -> UserError:
    return UserError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); give a folder of images, "
                     "or a CIFAR tarball, IDX folder, .npy, .npz or Hugging Face dataset.")


def open_folder(folder: Path, label_file: Path | None, limit: int | None) -> Source:
    """A folder of images: plain, class folders, or with a label file (--labels, dataset.json, labels.csv)."""
    rels = walk_images(folder)
    if not rels:
        raise no_images(folder)
    found = [folder / n for n in LABEL_FILES if (folder / n).is_file()]
    label_file = label_file or (found[0] if found else None)
    if label_file is not None:
        return labelled_folder(folder, rels, label_file, limit)
    tops = sorted({r.split("/")[0] for r in rels if "/" in r})
    if all("/" in r for r in rels) and len(tops) == 1:
        raise UserError(f"{folder} holds one class folder, {tops[0]}; put the images directly in the folder to "
                        "prepare them without labels, or add a folder per class.")
    if all("/" in r for r in rels):
        return class_folders(folder, rels, tops, limit)
    rels, sizes, gray, skipped = probe(folder, rels[:limit])
    return folder_source(folder, "folder", rels, sizes, gray, skipped)


def folder_source(folder: Path, kind: str, rels: list[str], sizes, gray: bool, skipped, **conditions) -> Source:
    if not rels:
        raise UserError(f"none of the image files in {folder} could be opened (first: {skipped[0]['file']}, "
                        f"{skipped[0]['why']}); check that they are images.")

    def rows():
        for rel in rels:
            yield Row(rel, partial(load_image, folder / rel))

    return Source(kind, str(folder.resolve()), folder.resolve().name, len(rels), rows, set(sizes), gray,
                  skipped=skipped, **conditions)


def class_folders(folder: Path, rels: list[str], classes: list[str], limit: int | None) -> Source:
    """One class per top-level subfolder, in sorted order: labels 0..K-1."""
    rels, sizes, gray, skipped = probe(folder, rels[:limit])
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[r.split("/")[0]] for r in rels], np.int64)
    return folder_source(folder, "class-folders", rels, sizes, gray, skipped, condition="label", labels=labels,
                         classes=classes)


def labelled_folder(folder: Path, rels: list[str], label_file: Path, limit: int | None) -> Source:
    """Images with their labels or vectors from a label file; every image needs one, every entry an image."""
    entries = read_label_file(label_file)
    if entries is None:  # dataset.json with "labels": null
        rels, sizes, gray, skipped = probe(folder, rels[:limit])
        return folder_source(folder, "folder", rels, sizes, gray, skipped)
    present = set(rels)
    missing = [p for p in entries if p not in present]
    if missing:
        raise UserError(f"{label_file} names {missing[0]}, which is not an image file in {folder}"
                        f"{f' ({len(missing)} such entries)' if len(missing) > 1 else ''}; fix the label file "
                        "or add the image.")
    unlabelled = [r for r in rels if r not in entries]
    if unlabelled:
        raise UserError(f"{folder / unlabelled[0]} has no label in {label_file} ({len(unlabelled)} images "
                        "lack one); add them to the label file or remove them.")
    condition, _, _ = labels_of([entries[r] for r in rels], label_file)  # checks all of them
    rels, sizes, gray, skipped = probe(folder, rels[:limit])
    condition, values, classes = labels_of([entries[r] for r in rels], label_file, check_classes=False)
    extra = {"labels": values, "classes": classes} if condition == "label" else {"vectors": values}
    return folder_source(folder, "label-file", rels, sizes, gray, skipped, condition=condition, **extra)


def open_pairs(conds: Path, targets: Path, limit: int | None) -> Source:
    """Two folders whose images pair by relative path without extension: SOURCE the conditions, SOURCE2 the targets."""
    sides = []
    for folder in (conds, targets):
        rels = walk_images(folder)
        if not rels:
            raise no_images(folder)
        stems = {}
        for rel in rels:
            stem = rel.rsplit(".", 1)[0]
            if stem in stems:
                raise UserError(f"{folder} holds both {stems[stem]} and {rel}; paired images must differ in "
                                "more than their extension, so remove one.")
            stems[stem] = rel
        sides.append(stems)
    only = [sorted(set(a) - set(b)) for a, b in ((sides[0], sides[1]), (sides[1], sides[0]))]
    if only[0] or only[1]:
        first = [f"{sides[i][o[0]]}" if o else "none" for i, o in enumerate(only)]
        raise UserError(f"{len(only[0])} images in {conds} have no partner in {targets} (first: {first[0]}) and "
                        f"{len(only[1])} in {targets} none in {conds} (first: {first[1]}); images pair by relative "
                        "path without extension, so add or remove the unpaired ones.")
    keys = sorted(sides[1])[:limit]
    c_rels, c_sizes, c_gray, c_skipped = probe(conds, [sides[0][k] for k in keys])
    t_rels, t_sizes, t_gray, t_skipped = probe(targets, [sides[1][k] for k in keys])
    good = {r.rsplit(".", 1)[0] for r in c_rels} & {r.rsplit(".", 1)[0] for r in t_rels}
    pairs = [(sides[0][k], sides[1][k]) for k in keys if k in good]
    if not pairs:
        raise UserError(f"no pair of images in {conds} and {targets} could be opened; check that they are images.")
    c_size = dict(zip(c_rels, c_sizes))
    t_size = dict(zip(t_rels, t_sizes))

    def rows():
        for c, t in pairs:
            yield Row(t, partial(load_image, targets / t), partial(load_image, conds / c))

    return Source("paired", f"{conds.resolve()} + {targets.resolve()}", targets.resolve().name, len(pairs), rows,
                  {t_size[t] for _, t in pairs}, t_gray, condition="image",
                  cond_sizes={c_size[c] for c, _ in pairs}, cond_gray=c_gray,
                  skipped=[{"file": f"{targets.name}/{s['file']}", "why": s["why"]} for s in t_skipped]
                  + [{"file": f"{conds.name}/{s['file']}", "why": s["why"]} for s in c_skipped])
