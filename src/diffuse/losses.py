"""Training losses: `loss_fn(denoiser, x0, cond, generator) -> per-sample loss (B,)`.

`diffusion_loss` draws (t, eps) with `draw_noise` and hands them to `loss_at`, which computes the loss for given
(t, eps) through `noised`. The doctor (`diffuse.diagnostics`) calls the same two functions with
its own t and eps (eps = 0 for the identity check), so it checks the code that trains.

With `uncertainty=True` the per-sample loss is weighted by the net's learned log-variance u
(EDM2, Karras et al. 2024; Kendall & Gal 2017): loss / exp(u) + u, for nets with a `logvar` head.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.denoiser import append_dims, training_target


def diffusion_loss(denoiser: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None,
                   generator: torch.Generator, *, uncertainty: bool = False) -> torch.Tensor:
    """Uniformly weighted MSE in the net's own parameterization (Ho et al. 2020, eq. 14, generalized).

    t is drawn from the process's training density, eps ~ N(0, I), x_t = alpha * x0 + sigma * eps,
    and the net's output is compared with the target of its parameterization (eps, x0, v or flow).
    Randomness comes from `generator` (on the CPU), so a step is reproducible from its seed.
    For the edm parameterization the uniform MSE on F is EDM's lambda-weighted MSE on D (eq. 8).
    """
    t, eps = draw_noise(denoiser.process, x0, generator)
    return loss_at(denoiser, x0, cond, t, eps, uncertainty=uncertainty)


def draw_noise(process, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (B,), eps like x0 (B, ...)) for a batch x0: t from the process's training density, eps ~ N(0, I)."""
    t = process.sample_train_t(len(x0), generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    return t, eps


def loss_at(denoiser: nn.Module, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
            eps: torch.Tensor, *, uncertainty: bool = False) -> torch.Tensor:
    """The per-sample loss (B,) of x0 (B, ...) noised with the given eps (B, ...) at times t (B,).

    uncertainty: weight it by the net's learned log-variance (`uncertainty_weighted`); the net must
    have a `logvar(c_noise) -> (B,)` head.
    """
    x_t, target = noised(denoiser, x0, t, eps)
    error = (denoiser.raw(x_t, t, cond) - target) ** 2
    loss = error.flatten(1).mean(dim=1)
    if not uncertainty:
        return loss
    if not hasattr(denoiser.net, "logvar"):
        raise ValueError("the uncertainty-weighted loss needs a net with a logvar(c_noise) head")
    return uncertainty_weighted(loss, denoiser.logvar(t))


def uncertainty_weighted(loss: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """EDM2's loss with learned uncertainty, per sample: loss (B,), log-variance u (B,) -> (B,).

    Minimized over u at u = ln(loss), where it equals ln(loss) + 1: the net learns the expected
    loss of each noise level and each level's gradient is scaled by 1 / exp(u), evening out the
    levels' contributions. EDM2 sums over elements (N u); the per-element mean used here divides
    the whole loss by N, the same optimum.
    """
    # L = loss / exp(u) + u
    return loss / u.exp() + u


def noised(denoiser: nn.Module, x0: torch.Tensor, t: torch.Tensor,
           eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target), each shaped like x0: the net's input x_t = alpha * x0 + sigma * eps and what it should output."""
    alpha, sigma = denoiser.process.alpha_sigma(t)
    x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
    return x_t, training_target(denoiser.prediction, x0, eps, alpha, sigma, denoiser.sigma_data)
