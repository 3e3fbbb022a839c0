"""A small synthetic prepared data set for the FD tests: coloured shapes on a lit, noisy background.

Written by the data preparation code (`diffuse.preparing.prepare`) from an .npz, as a user would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffuse.preparing import PrepareOptions, prepare

CLASSES = ("square", "disc", "triangle", "tee")
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40]])  # one per class


def shapes(n: int, seed: int, resolution: int = 16, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (n, R, R, 3), int64 labels (n,)): a shape of its class at a random place and size
    on a background that is lighter at the top (so images have an up) with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n) if classes is None else rng.choice(classes, n)
    r = resolution
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float64)
    cy, cx = (rng.uniform(0.3 * r, 0.7 * r, (2, n, 1, 1)))
    s = rng.uniform(0.18 * r, 0.32 * r, (n, 1, 1))
    dy, dx = yy - cy, xx - cx
    masks = np.stack([
        (np.abs(dx) <= s) & (np.abs(dy) <= s),                             # square
        dx ** 2 + dy ** 2 <= s ** 2,                                        # disc
        (np.abs(dy) <= s) & (np.abs(dx) <= (dy + s) / 2),                   # triangle, point up
        ((np.abs(dy + s * 0.8) <= 1) & (np.abs(dx) <= s)) | ((np.abs(dx) <= 1) & (np.abs(dy) <= s)),  # T
    ])[labels, np.arange(n)]                                               # (n, R, R)
    background = rng.uniform(30, 90, (n, 1, 1, 1)) + 60 * (1 - yy / r)[None, :, :, None]
    colour = COLOURS[labels][:, None, None, :] + rng.uniform(-30, 30, (n, 1, 1, 3))
    x = np.where(masks[..., None], colour, background) + rng.normal(0, 10, (n, r, r, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_prepared(root: Path, images: np.ndarray, labels: np.ndarray | None, heldout: int, name: str) -> Path:
    """Images (N, R, R, C) (and labels) as a DATA_DIR made by `diffuse data prepare` from an .npz,
    with `heldout` of them held out."""
    source = root.parent / f"{root.name}-{name}.npz"
    np.savez(source, images=images, **({} if labels is None else {"labels": labels}))
    prepare([source], root / name, PrepareOptions(heldout=heldout / len(images), name=name), log=lambda *a: None)
    return root / name
