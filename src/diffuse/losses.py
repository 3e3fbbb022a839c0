"""Training losses: `loss_fn(denoiser, x0, cond, generator) -> per-sample loss (B,)`.

`diffusion_loss` draws (t, eps) and hands them to `loss_at`, which computes the loss for given
(t, eps) through `noised`. The doctor (`diffuse.diagnostics`) calls the same two functions with
its own t and eps (eps = 0 for the identity check), so it checks the code that trains.
"""

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
    t = denoiser.process.sample_train_t(len(x0), generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    return loss_at(denoiser, x0, cond, t, eps)


def loss_at(denoiser: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
            eps: torch.Tensor) -> torch.Tensor:
    """The per-sample loss (B,) of x0 (B, ...) noised with the given eps (B, ...) at times t (B,)."""
    x_t, target = noised(denoiser, x0, t, eps)
    error = (denoiser.raw(x_t, t, cond) - target) ** 2
    return error.flatten(1).mean(dim=1)


def noised(denoiser: nn.Module, x0: torch.Tensor, t: torch.Tensor,
           eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target), each shaped like x0: the net's input x_t = alpha * x0 + sigma * eps and what it should output."""
    alpha, sigma = denoiser.process.alpha_sigma(t)
    x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
    return x_t, training_target(denoiser.prediction, x0, eps, alpha, sigma)
