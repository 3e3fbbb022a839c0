"""Super-resolution measures: does a sample agree with its low-res input, and how close is it to the truth?

All in [0, 1] pixel units on uint8 images (N, H, W, C), as written to sample files:
- consistency: RMSE between the factor x factor average pool of each sample and its low-res input.
  A sampler that ignores its input scores about `consistency_shuffled`, the same RMSE against the
  inputs of other images; an exactly consistent one at most 0.5 / 255 (the uint8 rounding).
- psnr: mean over images of 10 log10(1 / MSE(sample, truth)), in dB. A sample from the posterior
  is not its mean, so it scores below a good regressor here; FD is where sharpness shows.
The trivial baselines, nearest and bilinear upsampling of the low-res input, get the same numbers
and FD-FMNIST, so a reader can judge the model against them. Nearest upsampling is consistent by
construction (the mean of a constant block is that constant), so consistency alone ranks nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffuse.metrics.fmnist_fd import evaluate_images

BASELINES = ("nearest", "bilinear")


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float64 (N, C, H, W) in [0, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded and clipped."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def low_res_of(images: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> their low-res versions float64 (N, C, H / factor, W / factor) in [0, 1]."""
    return F.avg_pool2d(to_unit(images), factor)


def upsample(low: torch.Tensor, factor: int, mode: str) -> np.ndarray:
    """Low-res images (N, C, h, w) in [0, 1] -> uint8 (N, h * factor, w * factor, C), 'nearest' or 'bilinear'."""
    align = {} if mode == "nearest" else {"align_corners": False}
    return to_uint8(F.interpolate(low, scale_factor=factor, mode=mode, **align))


def consistency_rmse(samples: np.ndarray | torch.Tensor, low: torch.Tensor, factor: int) -> float:
    """sqrt(mean((avgpool_factor(sample) - low)^2)) over all pixels of all images, [0, 1] units."""
    return (low_res_of(samples, factor) - low).pow(2).mean().sqrt().item()


def psnr(samples: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE_i) in dB, [0, 1] units (MSE floored at 1e-10: identical images)."""
    mse = (to_unit(samples) - to_unit(truth)).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()


def measures(samples: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, factor: int) -> dict:
    """{consistency, consistency_shuffled, psnr} of samples (N, H, W, C) made from the low-res truth (N, H, W, C).

    consistency_shuffled pairs sample i with the input of image i - 1: what ignoring the input scores.
    """
    low = low_res_of(truth, factor)
    return {"consistency": consistency_rmse(samples, low, factor),
            "consistency_shuffled": consistency_rmse(samples, low.roll(1, dims=0), factor),
            "psnr": psnr(samples, truth)}


def evaluate_superres(samples: np.ndarray, labels: np.ndarray, truth: np.ndarray, factor: int,
                      device: str | torch.device = "cpu") -> dict:
    """Measures of the samples and of the upsampling baselines, as one flat dict.

    samples, truth: uint8 (N, 28, 28, 1), sample i made from the low-res version of truth i;
    labels: int64 (N,), truth's classes. Keys: consistency, consistency_shuffled, psnr, and for
    each baseline B in BASELINES: B_fd, B_accuracy, B_consistency, B_psnr.
    """
    result = measures(samples, truth, factor)
    low = low_res_of(truth, factor)
    for mode in BASELINES:
        images = upsample(low, factor, mode)
        fd = evaluate_images(images, labels, device=device)
        base = measures(images, truth, factor)
        result |= {f"{mode}_fd": fd["fd"], f"{mode}_accuracy": fd["accuracy"],
                   f"{mode}_consistency": base["consistency"], f"{mode}_psnr": base["psnr"]}
    return result


def first_of_each_class(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Indices of the first image of each class present, classes ascending."""
    labels = np.asarray(labels)
    return np.array([np.flatnonzero(labels == c)[0] for c in np.unique(labels[labels >= 0])], dtype=np.int64)


def panel(samples: np.ndarray, truth: np.ndarray, factor: int) -> np.ndarray:
    """Rows for a grid of k columns: low-res input (nearest-upsampled), sample, truth -> uint8 (3k, H, W, C)."""
    return np.concatenate([upsample(low_res_of(truth, factor), factor, "nearest"), samples, truth])
