"""What every FD in a classifier's feature space shares: the image and label checks, the class
hits, and the result dict with its sums added over ranks (`diffuse.distributed.all_sum`).

Used by FD-FMNIST (`metrics.fmnist_fd`) and by the FD of a prepared data set (`metrics.prepared_fd`).
"""

from __future__ import annotations

import numpy as np
import torch

from diffuse import distributed
from diffuse.errors import UserError
from diffuse.metrics.fd import FeatureStats, frechet_distance


def check_images(images: torch.Tensor | np.ndarray, shape: tuple[int, int, int], name: str,
                 at_least: int = 2) -> torch.Tensor | np.ndarray:
    """uint8 (N, H, W, C), or (N, H, W) where C = 1, as a tensor or numpy array (a memmap stays one).

    shape: (H, W, C) that the feature net reads; name: the FD's name for the messages ("FD-FMNIST").
    Returns the images as (N, H, W, C), of the kind given; UserError otherwise.
    """
    want = f"(N, {shape[0]}, {shape[1]}, {shape[2]})"
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            or isinstance(images, np.ndarray) and images.dtype == np.uint8):
        raise UserError(f"{name} needs uint8 images of shape {want}; "
                        f"got {getattr(images, 'dtype', type(images).__name__)}.")
    if images.ndim == 3 and shape[2] == 1:
        images = images[..., None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise UserError(f"{name} needs images of shape {want}; got {tuple(images.shape)}.")
    if len(images) < at_least:
        raise UserError(f"{name} needs at least 2 images to fit a covariance; got {len(images)}.")
    return images


def check_labels(labels, n: int, classes: int | None = None) -> torch.Tensor | None:
    """Labels as int64 (N,) on the CPU, or None; UserError if there is not one per image, or (with
    `classes`) one is neither -1 (unconditional) nor a class 0..classes-1 of the feature net."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != n:
        raise UserError(f"got {len(labels)} labels for {n} images; pass one label per image.")
    labels = labels.to("cpu", torch.int64)
    outside = labels[(labels < -1) | (labels >= (classes if classes is not None else 2 ** 62))]
    if len(outside):
        raise UserError(f"label {outside[0].item()} is not one of the {classes} classes 0..{classes - 1} (or -1 for "
                        f"an unconditional sample); {len(outside)} of the {n} labels are outside them: fix the labels.")
    return labels


def hits(logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[int, int]:
    """(correct, counted): of the rows with a label >= 0, how many have that label as argmax of logits (N, K)."""
    if labels is None:
        return 0, 0
    keep = labels >= 0
    predicted = logits.argmax(dim=1).cpu()
    return int((predicted[keep] == labels[keep]).sum()), int(keep.sum())


def fd_result(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None, ref: FeatureStats,
              name: str, device: str | torch.device, across_ranks: bool) -> dict:
    """{"fd", "n", "n_ref", "accuracy"} of features (N, D) and logits (N, K) against the reference stats.

    labels: int64 (N,), -1 where unconditional, or None (then accuracy is None).
    across_ranks: the features are this rank's block; the sums and counts are added over the ranks.
    """
    stats = FeatureStats.of(features)
    correct, counted = hits(logits, labels)
    if across_ranks:
        sums = distributed.all_sum(np.concatenate([[stats.n, correct, counted], stats.sum, stats.sum_outer.ravel()]),
                                   torch.device(device))
        (n, correct, counted), dim = sums[:3].round().astype(int), stats.dim
        stats = FeatureStats(int(n), sums[3:3 + dim], sums[3 + dim:].reshape(dim, dim))
        if stats.n < 2:
            raise UserError(f"{name} needs at least 2 images to fit a covariance; got {stats.n}.")
    return {
        "fd": frechet_distance(stats, ref),
        "n": stats.n,
        "n_ref": ref.n,
        "accuracy": correct / counted if counted else None,
    }
