"""The feature networks an FD can be measured in, by the name a `Dataset` gives (`Dataset.features`).

Every FD is labelled with its features ("FD-FMNIST"); the word FID is kept for Inception's.
"""

from __future__ import annotations

import numpy as np
import torch

from diffuse.errors import UserError
from diffuse.metrics.fmnist_fd import evaluate_images

FEATURES = ("fmnist",)


def fd_name(features: str) -> str:
    """How an FD in these features is written: FD-FMNIST."""
    return f"FD-{features.upper()}"


def evaluate_features(features: str | None, images: torch.Tensor | np.ndarray,
                      labels: torch.Tensor | np.ndarray | None = None, device: str | torch.device = "cpu",
                      across_ranks: bool = False) -> dict:
    """{"fd", "n", "n_ref", "accuracy"} of uint8 images (N, H, W, C) in the named features, against
    their reference set (for fmnist the 10k test images; see `metrics.fmnist_fd.evaluate_images`)."""
    if features == "fmnist":
        return evaluate_images(images, labels, device=device, across_ranks=across_ranks)
    raise UserError(f"no feature network measures an FD for this data set (features {features!r}); "
                    "evaluate a Fashion-MNIST run.")
