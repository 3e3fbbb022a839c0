"""Training losses: `loss_fn(denoiser, x0, cond, generator) -> per-sample loss (B,)`."""

from __future__ import annotations

import torch
from torch import nn

from diffuse.denoiser import append_dims, training_target


def diffusion_loss(denoiser: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None,
                   generator: torch.Generator) -> torch.Tensor:
    """Uniformly weighted MSE in the net's own parameterization (Ho et al. 2020, eq. 14, generalized).

    t is drawn from the process's training density, eps ~ N(0, I), x_t = alpha * x0 + sigma * eps,
    and the net's output is compared with the target of its parameterization (eps, x0, v or flow).
    Randomness comes from `generator` (on the CPU), so a step is reproducible from its seed.
    """
    process = denoiser.process
    t = process.sample_train_t(len(x0), generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    alpha, sigma = process.alpha_sigma(t)
    x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
    target = training_target(denoiser.prediction, x0, eps, alpha, sigma)
    error = (denoiser.raw(x_t, t, cond) - target) ** 2
    return error.flatten(1).mean(dim=1)
