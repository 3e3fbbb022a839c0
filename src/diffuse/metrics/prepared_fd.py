"""FD-<name>: the Frechet distance between images and a prepared data set's held-out split, in the
128-d feature space of the net trained on that data set (`metrics.feature_train`), plus, where that
net is a classifier, its accuracy on the images' labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffuse.metrics.feature_fd import check_images, check_labels, fd_result
from diffuse.metrics.feature_files import load_reference, read_features_meta
from diffuse.metrics.feature_net import load_feature_net
from diffuse.prepared import read_meta


def prepared_fd_name(data_dir: str | Path) -> str:
    """"FD-" + the data set's name in its data.json."""
    return f"FD-{read_meta(Path(data_dir))['name']}"


def evaluate_prepared(data_dir: str | Path, images: torch.Tensor | np.ndarray,
                      labels: torch.Tensor | np.ndarray | None = None, device: str | torch.device = "cpu",
                      across_ranks: bool = False) -> dict:
    """FD-<name> of uint8 images (N, R, R, C) (or (N, R, R) where C = 1; a memmap is read a batch at a time).

    labels: int (N,), the class each image was asked to be, -1 for unconditional ones; or None.
    across_ranks: the images are this rank's block of the set (`diffuse.distributed`); the feature
    sums and the accuracy counts are added over the ranks, and every rank gets the whole set's result.
    Returns {"fd": float, "n": N, "n_ref": M held-out images, "accuracy": float or None}, where
    accuracy (classifier nets only) is the fraction of the images with a label >= 0 put in that class.
    """
    data_dir = Path(data_dir)
    name = prepared_fd_name(data_dir)
    meta = read_features_meta(data_dir)
    r, c = meta["resolution"], meta["channels"]
    images = check_images(images, (r, r, c), name, at_least=1 if across_ranks else 2)
    classes = meta["outputs"] if meta["method"] == "classifier" else None
    labels = check_labels(labels, len(images), classes)  # before the slow part
    ref = load_reference(data_dir, meta)
    features, logits = load_feature_net(data_dir, device).features_and_logits(images)
    if meta["method"] != "classifier":
        labels = None  # a rotation net's logits are turns, not classes: no accuracy
    return fd_result(features, logits, labels, ref, name, device, across_ranks)
