"""Label files beside a folder of images.

`dataset.json` in EDM's format, {"labels": [["rel/path.png", label], ...]} ("labels": null for
none), or a CSV file (`labels.csv`; header optional): the relative path, then one integer column
(a class) or several float columns (a vector; one non-integer column is a vector of length 1).
Integer labels give K = max + 1 classes named "0".."K-1"; lists of numbers give vectors.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path, PurePosixPath

import numpy as np

from diffuse.errors import UserError

MAX_BYTES = 256 << 20   # a label file larger than this is not a label file
MAX_CLASSES = 100_000
MAX_VECTOR = 4096


def read_label_file(path: Path) -> dict[str, object] | None:
    """{relative path: int label or list of floats}, or None where dataset.json says "labels": null."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{path} is over {MAX_BYTES >> 20} MB, too large for a label file; give the labels "
                            "as dataset.json or labels.csv with one line per image.")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"the label file {path} does not exist; give an existing --labels file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as a UTF-8 label file ({e}); fix or replace it.") from None
    pairs = json_pairs(path, text) if path.suffix.lower() == ".json" else csv_pairs(path, text)
    if pairs is None:
        return None
    entries = {}
    for rel, value in pairs:
        key = clean_path(path, rel)
        if key in entries:
            raise UserError(f"{path} names {key} twice; give each image one label.")
        entries[key] = value
    if not entries:
        raise UserError(f"{path} holds no labels; add a line per image or remove the file.")
    return entries


def json_pairs(path: Path, text: str):
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); write it as {{\"labels\": [[\"a.png\", 0], ...]}}.") from None
    if not isinstance(doc, dict) or "labels" not in doc:
        raise UserError(f"{path} has no \"labels\" key; write it as {{\"labels\": [[\"a.png\", 0], ...]}}.")
    if doc["labels"] is None:
        return None
    if not isinstance(doc["labels"], list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                      for p in doc["labels"]):
        raise UserError(f"{path}: \"labels\" must be a list of [path, label] pairs, as in [[\"a.png\", 0], ...].")
    return [(p[0], p[1]) for p in doc["labels"]]


def csv_pairs(path: Path, text: str):
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and not all(is_number(c) for c in rows[0][1:]):
        rows = rows[1:]  # a header
    pairs = []
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or len(row) != len(rows[0]):
            raise UserError(f"{path} line {n} has {len(row)} columns, not {max(len(rows[0]), 2)}; give the path, "
                            "then one integer label or the same number of floats on every line.")
        cells = [c.strip() for c in row[1:]]
        if not all(is_number(c) for c in cells):
            raise UserError(f"{path} line {n} has a label that is not a number ({row[1:]}); fix that line.")
        if len(cells) == 1 and is_int(cells[0]):
            pairs.append((row[0].strip(), int(cells[0])))
        elif len(cells) == 1:
            pairs.append((row[0].strip(), float(cells[0])))  # a float scalar: a vector of length 1 if all are
        else:
            pairs.append((row[0].strip(), [float(c) for c in cells]))
    if pairs and all(isinstance(v, float) for _, v in pairs):
        pairs = [(p, [v]) for p, v in pairs]
    return pairs


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def clean_path(path: Path, rel: str) -> str:
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise UserError(f"{path} names {rel!r}, which is not a path inside the image folder; give paths relative "
                        "to it.")
    return p.as_posix()


def labels_of(values: list, path: Path, check_classes: bool = True):
    """("label", int64 (N,), class names) or ("vector", float32 (N, D), None), checked."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        labels = np.array(values, np.int64)
        if labels.min() < 0:
            raise UserError(f"{path} holds a negative label ({labels.min()}); labels are classes 0, 1, ..., K-1.")
        k = int(labels.max()) + 1
        if k > MAX_CLASSES:
            raise UserError(f"{path} holds label {k - 1}, more than the {MAX_CLASSES} classes diffuse takes; "
                            "number the classes 0..K-1.")
        if check_classes and len(np.unique(labels)) == 1:
            raise UserError(f"every image in {path} has the label {labels[0]}, a single class; drop the label file "
                            "to prepare unconditional data.")
        return "label", labels, [str(i) for i in range(k)]
    if all(isinstance(v, list) for v in values):
        dims = {len(v) for v in values}
        if len(dims) != 1 or not 1 <= min(dims) <= MAX_VECTOR:
            raise UserError(f"{path} holds vectors of lengths {sorted(dims)[:3]}; give every image a vector of one "
                            f"length between 1 and {MAX_VECTOR}.")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                   for v in values for x in v):
            raise UserError(f"{path} holds a vector entry that is not a finite number; fix it.")
        vectors = np.array(values, np.float32)
        if not np.isfinite(vectors).all():  # finite in float64, but not in float32
            raise UserError(f"{path} holds a vector entry beyond float32's range; scale the vectors down.")
        return "vector", vectors, None
    raise UserError(f"{path} mixes integer labels with other values (negative, non-integer or lists); give every "
                    "image an integer class 0..K-1, or every image a list of numbers.")
