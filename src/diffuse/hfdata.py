"""Hugging Face data sets: a folder written by `save_to_disk`, or .parquet files, read through the optional
`datasets` package (pip install -e '.[hf]').

The image column is the first of type Image (or --image-column); the label column the first
ClassLabel (or --label-column; plain integers then give K = max + 1 classes "0".."K-1"). A
DatasetDict contributes its "train" split, and its "test" split, if it has one, as the held-out rows.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from diffuse.errors import UserError
from diffuse.sources import Row, Source, load_image, why

BATCH = 256


def is_hf(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    return any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")) or \
        any(path.glob("*.parquet"))


def load(path: Path):
    """(the rows as one Dataset, the number of training rows before the test rows)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a Hugging Face data set, which needs the datasets package: "
                        "pip install -e '.[hf]'") from None
    try:
        if path.is_file() or not any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                    "dataset_dict.json")):
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
            ds = datasets.Dataset.from_parquet(files)
            return ds, len(ds)
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path} holds the splits {', '.join(ds)} but no 'train'; save the split to "
                                "prepare with save_to_disk.")
            if "test" in ds:
                return datasets.concatenate_datasets([ds["train"], ds["test"]]), len(ds["train"])
            ds = ds["train"]
        return ds, len(ds)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds on a broken folder
        raise UserError(f"{path} cannot be read as a Hugging Face data set ({why(e)}); write it with "
                        "save_to_disk or to_parquet.") from None


def column(ds, wanted: str | None, kind, what: str, path: Path) -> str | None:
    if wanted is not None:
        if wanted not in ds.features:
            raise UserError(f"{path} has no column {wanted!r} (it has {', '.join(ds.features)}); give one of them "
                            f"as the {what} column.")
        return wanted
    return next((k for k, f in ds.features.items() if isinstance(f, kind)), None)


def open_hf(path: Path, image_column: str | None, label_column: str | None, limit: int | None) -> Source:
    ds, n_train = load(path)
    import datasets
    image_col = column(ds, image_column, datasets.Image, "image", path)
    if image_col is None or not isinstance(ds.features[image_col], datasets.Image):
        raise UserError(f"{path} has no column of type Image; give the image column with --image-column.")
    label_col = column(ds, label_column, datasets.ClassLabel, "label", path)
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    openers, sizes, gray, skipped = [], set(), True, []
    for i, cell in enumerate(ds[image_col]):
        opener = partial(io.BytesIO, cell["bytes"]) if cell.get("bytes") else partial(Path, cell.get("path") or "")
        try:
            with Image.open(opener()) as im:
                sizes.add(im.size)
                gray = gray and im.mode in ("1", "L", "LA", "I", "I;16", "F")
        except Exception as e:  # noqa: BLE001 - a broken image is a skip
            skipped.append({"file": f"{path.name}[{i}]", "why": why(e)})
            continue
        openers.append((i, opener))
    if not openers:
        raise UserError(f"none of the images in {path} could be opened; check the data set.")
    fields = {}
    if label_col is not None:
        feature = ds.features[label_col]
        labels = np.asarray(ds[label_col], np.int64)[[i for i, _ in openers]]
        if labels.min() < 0:
            raise UserError(f"{path}: column {label_col!r} holds a negative label; labels are classes 0..K-1.")
        names = feature.names if isinstance(feature, datasets.ClassLabel) else \
            [str(k) for k in range(int(labels.max()) + 1)]
        fields = {"condition": "label", "labels": labels, "classes": list(names)}
    kept = np.array([i for i, _ in openers])

    def rows():
        for i, opener in openers:
            yield Row(f"{path.name}[{i}]", partial(load_image, opener()))

    heldout = np.nonzero(kept >= n_train)[0]
    return Source("hf", str(path.resolve()), path.resolve().stem, len(openers), rows, sizes, gray,
                  heldout=heldout if len(heldout) else None, skipped=skipped, **fields)
