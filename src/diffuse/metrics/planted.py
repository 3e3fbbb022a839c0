"""Planted faults: image sets a sound FD must rank as worse than real images.

Shared by tests/test_feature_net.py and benchmarks/fd_planted_faults.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_blur(images: np.ndarray | torch.Tensor, sigma: float = 1.0) -> np.ndarray:
    """uint8 (N, H, W, C) -> the same blurred by a Gaussian of `sigma` pixels (radius 3 sigma, edges repeated)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double()  # (N, C, H, W)
    radius = max(1, round(3 * sigma))
    # g(t) = exp(-t^2 / (2 sigma^2)), normalised; separable, so rows then columns
    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def uniform_noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 images of `shape` (N, H, W, C), every pixel uniform in 0..255."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
