"""FD-FMNIST: the Frechet distance between generated images and the 10k Fashion-MNIST test images,
in the 128-d feature space of the shipped classifier, plus that classifier's accuracy on them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from diffuse import distributed
from diffuse.data import load_fmnist
from diffuse.errors import UserError
from diffuse.metrics.fd import FeatureStats, frechet_distance
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
    labels = _check_labels(labels, len(images))  # before the slow part
    device = str(torch.device(device))
    features, logits = _net(device).features_and_logits(images)
    stats = FeatureStats.of(features)
    correct, counted = _hits(logits, labels)
    if across_ranks:
        sums = distributed.all_sum(np.concatenate([[stats.n, correct, counted], stats.sum, stats.sum_outer.ravel()]),
                                   torch.device(device))
        (n, correct, counted), dim = sums[:3].round().astype(int), stats.dim
        stats = FeatureStats(int(n), sums[3:3 + dim], sums[3 + dim:].reshape(dim, dim))
        if stats.n < 2:
            raise UserError(f"FD-FMNIST needs at least 2 images to fit a covariance; got {stats.n}.")
    ref = _reference_stats(device)
    return {
        "fd": frechet_distance(stats, ref),
        "n": stats.n,
        "n_ref": ref.n,
        "accuracy": correct / counted if counted else None,
    }


def _check_images(images: torch.Tensor | np.ndarray, at_least: int = 2) -> torch.Tensor:
    """uint8 (N, 28, 28, 1) or (N, 28, 28) -> uint8 tensor (N, 28, 28, 1); UserError otherwise."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise UserError("FD-FMNIST needs uint8 images of shape (N, 28, 28, 1); "
                        f"got {getattr(images, 'dtype', type(images).__name__)}.")
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (28, 28, 1):
        raise UserError(f"FD-FMNIST needs images of shape (N, 28, 28, 1); got {tuple(images.shape)}.")
    if len(images) < at_least:
        raise UserError(f"FD-FMNIST needs at least 2 images to fit a covariance; got {len(images)}.")
    return images


def _check_labels(labels, n: int) -> torch.Tensor | None:
    """Labels as int64 (N,) on the CPU, or None; UserError if there is not one per image."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != n:
        raise UserError(f"got {len(labels)} labels for {n} images; pass one label per image.")
    return labels.to("cpu", torch.int64)


def _hits(logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[int, int]:
    """(correct, counted): of the rows with a label >= 0, how many have that label as argmax of logits (N, 10)."""
    if labels is None:
        return 0, 0
    keep = labels >= 0
    predicted = logits.argmax(dim=1).cpu()
    return int((predicted[keep] == labels[keep]).sum()), int(keep.sum())
