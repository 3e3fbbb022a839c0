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

from diffuse.images import low_res_of, to_unit, upsample
from diffuse.metrics.fmnist_fd import evaluate_images

BASELINES = ("nearest", "bilinear")


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

    samples, truth: uint8 (N, H, W, C), sample i made from the low-res version of truth i;
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
