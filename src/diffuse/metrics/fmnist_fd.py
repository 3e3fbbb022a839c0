"""FD-FMNIST: the Frechet distance between generated images and the 10k Fashion-MNIST test images,
in the 128-d feature space of the shipped classifier, plus that classifier's accuracy on them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from diffuse.data import load_fmnist
from diffuse.metrics.fd import FeatureStats
from diffuse.metrics.feature_fd import check_images, check_labels, fd_result
from diffuse.metrics.fmnist_net import FmnistNet, load_fmnist_net


@functools.lru_cache(maxsize=None)
def _net(device: str) -> FmnistNet:
    return load_fmnist_net(device)


@functools.lru_cache(maxsize=None)
def _reference_stats(device: str) -> FeatureStats:
    images, _ = load_fmnist("test")
    features, _ = _net(device).features_and_logits(images)
    return FeatureStats.of(features)


def reference_stats(device: str | torch.device = "cpu") -> FeatureStats:
    """Feature stats (D = 128) of the 10k Fashion-MNIST test images, computed once per device."""
    return _reference_stats(str(torch.device(device))).copy()  # a copy: callers may merge into it


def evaluate_images(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None,
                    device: str | torch.device = "cpu", across_ranks: bool = False) -> dict:
    """FD-FMNIST of uint8 images (N, 28, 28, 1) or (N, 28, 28), with N >= 2.

    labels: int (N,), the class each image was asked to be, -1 for unconditional ones; or None.
    across_ranks: the images are this rank's block of the set (`diffuse.distributed`); the feature
    sums and the accuracy counts are added over the ranks, and every rank gets the whole set's result.
    Returns {"fd": float, "n": N, "n_ref": 10000, "accuracy": float or None}, where accuracy is
    the fraction of the images with a label >= 0 that the classifier puts in that class.
    """
    images = _check_images(images, at_least=1 if across_ranks else 2)
    labels = check_labels(labels, len(images), classes=10)  # before the slow part
    device = str(torch.device(device))
    features, logits = _net(device).features_and_logits(images)
    return fd_result(features, logits, labels, _reference_stats(device), "FD-FMNIST", device, across_ranks)


def _check_images(images: torch.Tensor | np.ndarray, at_least: int = 2) -> torch.Tensor:
    """uint8 (N, 28, 28, 1) or (N, 28, 28) -> uint8 tensor (N, 28, 28, 1); UserError otherwise."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return check_images(images, (28, 28, 1), "FD-FMNIST", at_least)
