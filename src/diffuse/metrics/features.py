"""The feature networks an FD can be measured in, by the name a `Dataset` gives (`Dataset.features`):
"fmnist", the shipped Fashion-MNIST classifier, or the path of a prepared data set's folder
(DATA_DIR with data.json), whose own net `metrics.feature_train.train_feature_net` trains.

Every FD is labelled with its features ("FD-FMNIST", "FD-<data set name>"); the word FID is kept for Inception's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffuse.errors import UserError
from diffuse.metrics.fmnist_fd import evaluate_images
from diffuse.metrics.prepared_fd import evaluate_prepared, prepared_fd_name

FEATURES = ("fmnist",)  # by name; any prepared DATA_DIR too


def is_prepared(features: str | None) -> bool:
    """Whether `features` names a prepared data set's folder (one holding data.json)."""
    return isinstance(features, (str, Path)) and features not in FEATURES and (Path(features) / "data.json").is_file()


def fd_name(features: str) -> str:
    """How an FD in these features is written: FD-FMNIST, or FD-<name> from a DATA_DIR's data.json."""
    if is_prepared(features):
        return prepared_fd_name(features)
    return f"FD-{features.upper()}"


def evaluate_features(features: str | None, images: torch.Tensor | np.ndarray,
                      labels: torch.Tensor | np.ndarray | None = None, device: str | torch.device = "cpu",
                      across_ranks: bool = False) -> dict:
    """{"fd", "n", "n_ref", "accuracy"} of uint8 images (N, H, W, C) in the named features, against
    their reference set (for fmnist the 10k test images, `metrics.fmnist_fd.evaluate_images`; for a
    DATA_DIR its held-out split, `metrics.prepared_fd.evaluate_prepared`)."""
    if features == "fmnist":
        return evaluate_images(images, labels, device=device, across_ranks=across_ranks)
    if is_prepared(features):
        return evaluate_prepared(features, images, labels, device=device, across_ranks=across_ranks)
    raise UserError(f"no feature network measures an FD for this data set (features {features!r}); "
                    "evaluate a Fashion-MNIST run, or give a prepared data set's folder.")
