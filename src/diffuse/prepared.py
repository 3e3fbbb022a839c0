"""A prepared data set (DATA_DIR): the arrays `diffuse data prepare` writes and their description.

    data.json        format "diffuse-data", version 1, name, count N, resolution R, channels C, condition, ...
    images.npy       uint8 (N, R, R, C)
    labels.npy       int64 (N,) in [0, K)          condition "label"
    vectors.npy      float32 (N, D)                condition "vector"
    conditions.npy   uint8 (N, Rc, Rc, Cc)         condition "image"
    heldout.npy      int64 (M,) sorted row indices: the held-out split
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffuse.errors import UserError


@dataclass(frozen=True)
class Prepared:
    path: Path
    meta: dict
    images: np.ndarray
    labels: np.ndarray | None
    vectors: np.ndarray | None
    conditions: np.ndarray | None
    heldout: np.ndarray
    train_index: np.ndarray

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def condition(self) -> str:
        return self.meta["condition"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"]) if self.meta.get("classes") else 0

    @property
    def resolution(self) -> int:
        return self.meta["resolution"]

    @property
    def channels(self) -> int:
        return self.meta["channels"]


def open_prepared(path: Path) -> Prepared:
    """The DATA_DIR at `path`, its arrays memory-mapped."""
    path = Path(path)
    try:
        meta = json.loads((path / "data.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a prepared data set ({e}); make one with `diffuse data prepare`.") from None

    def array(name: str) -> np.ndarray | None:
        file = path / name
        return np.load(file, mmap_mode="r", allow_pickle=False) if file.is_file() else None

    images = array("images.npy")
    heldout = np.asarray(array("heldout.npy"), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(images)), heldout)
    return Prepared(path, meta, images, array("labels.npy"), array("vectors.npy"), array("conditions.npy"),
                    heldout, train)
