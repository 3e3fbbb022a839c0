"""The one denoiser interface: (x_t, t, cond) -> (x0_hat, eps_hat).

`Denoiser` wraps a raw network and reads its output in one of four parameterizations. With
x_t = alpha * x0 + sigma * eps:
    eps:  F = eps                        x0 = (x_t - sigma * F) / alpha
    x0:   F = x0                         eps = (x_t - alpha * F) / sigma
    v:    F = alpha * eps - sigma * x0   (Salimans & Ho 2022, general alpha, sigma):
          x0 = (alpha * x_t - sigma * F) / (alpha^2 + sigma^2), eps = (sigma * x_t + alpha * F) / (alpha^2 + sigma^2)
    flow: F = eps - x0                   (rectified-flow velocity, dx_t/dt when alpha = 1 - t, sigma = t):
          x0 = (x_t - sigma * F) / (alpha + sigma), eps = F + x0
    edm:  EDM's preconditioning (Karras et al. 2022, Table 1), D = c_skip x + c_out F(c_in x, c_noise),
          for any process through its EDM variables: x_t / alpha = x0 + (sigma / alpha) eps is EDM's
          x at sigma_edm = sigma / alpha. The coefficients are written on x_t itself, multiplied out
          so nothing divides by alpha or sigma (see `edm_coefficients`); with
          s^2 = sigma^2 + alpha^2 sigma_data^2:
          net input c_in x_t, c_in = 1 / s;  x0 = c_skip x_t + c_out F, c_skip = alpha sigma_data^2 / s^2,
          c_out = sigma sigma_data / s;  eps = sigma x_t / s^2 - alpha sigma_data F / s;
          F = (sigma x0 - alpha sigma_data^2 eps) / (sigma_data s).
          It is -v-prediction of x0 / sigma_data under the variance-preserving (alpha sigma_data / s,
          sigma / s); for sigma_data = 1 on a VP process F = -v exactly. c_noise is the process's
          `net_time`: EDM's ln(sigma) / 4 for the EDM process.
The net sees c_in * x_t, with c_in = 1 for every parameterization but edm.
Samplers, losses, guidance and distillation all speak this interface, so none of them knows which
parameterization or process sits underneath.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.process import Process

PREDICTIONS = ("eps", "x0", "v", "flow", "edm")


def append_dims(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in like's dtype, for broadcasting against `like` (B, ...)."""
    return a.to(like.dtype).reshape(a.shape + (1,) * (like.ndim - a.ndim))


def edm_coefficients(alpha: torch.Tensor, sigma: torch.Tensor,
                     sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in), each (B,) like alpha (B,): EDM's preconditioning acting on x_t.

    With sigma_edm = sigma / alpha and x_edm = x_t / alpha these are EDM's (Table 1) folded into
    x_t: c_skip = c_skip_edm / alpha, c_out = c_out_edm, c_in = c_in_edm / alpha. For alpha = 1
    they are EDM's exactly. Finite wherever alpha and sigma are not both 0 (the clean state gives
    c_skip = 1, c_out = 0; alpha = 0 gives c_skip = 0, c_out = sigma_data).
    """
    s = (sigma**2 + alpha**2 * sigma_data**2).sqrt()  # = alpha * sqrt(sigma_edm^2 + sigma_data^2)
    # c_skip = sigma_data^2 / (sigma_edm^2 + sigma_data^2), divided by alpha
    c_skip = alpha * sigma_data**2 / s**2
    # c_out = sigma_edm * sigma_data / sqrt(sigma_edm^2 + sigma_data^2)
    c_out = sigma * sigma_data / s
    # c_in = 1 / sqrt(sigma_edm^2 + sigma_data^2), divided by alpha
    c_in = 1 / s
    return c_skip, c_out, c_in


def input_scale(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """c_in (B,): the net sees c_in * x_t; EDM's c_in for edm, exactly 1 otherwise."""
    if prediction == "edm":
        return edm_coefficients(alpha, sigma, sigma_data)[2]
    return torch.ones_like(alpha)


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor,
                    alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """What the network should output for (x0, eps) at (alpha, sigma), shaped like x0.

    For edm, F = (x0 - c_skip x_t) / c_out: uniform MSE on F is then EDM's lambda-weighted loss on
    D, lambda = 1 / c_out^2 (EDM eq. 8 with lambda c_out^2 = 1). Multiplied out it is finite at
    sigma = 0 too (F = -eps there).
    """
    if prediction == "edm":
        s = append_dims((sigma**2 + alpha**2 * sigma_data**2).sqrt(), x0)
        alpha, sigma = append_dims(alpha, x0), append_dims(sigma, x0)
        # F = (x0 - c_skip x_t) / c_out = (sigma x0 - alpha sigma_data^2 eps) / (sigma_data s)
        return (sigma * x0 - alpha * sigma_data**2 * eps) / (sigma_data * s)
    alpha, sigma = append_dims(alpha, x0), append_dims(sigma, x0)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction '{prediction}'")


def from_prediction(prediction: str, F: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The network output F read as (x0_hat, eps_hat); the inverse of `training_target`.

    edm is defined at the clean state: sigma = 0 gives x0_hat = x_t and eps_hat = -F (no division).
    """
    if prediction == "edm":
        c_skip, c_out, c_in = edm_coefficients(alpha, sigma, sigma_data)  # float64 (B,)
        # D = c_skip x + c_out F (EDM eq. 7)
        x0 = append_dims(c_skip, x_t) * x_t + append_dims(c_out, x_t) * F
        # eps = (x_t - alpha D) / sigma, multiplied out: sigma c_in^2 x_t - alpha sigma_data c_in F
        eps = append_dims(sigma * c_in**2, x_t) * x_t - append_dims(alpha * sigma_data * c_in, x_t) * F
        return x0, eps
    alpha, sigma = append_dims(alpha, x_t), append_dims(sigma, x_t)
    if prediction == "eps":
        return (x_t - sigma * F) / alpha, F
    if prediction == "x0":
        return F, (x_t - alpha * F) / sigma
    if prediction == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * F) / norm, (sigma * x_t + alpha * F) / norm
    if prediction == "flow":
        x0 = (x_t - sigma * F) / (alpha + sigma)
        return x0, F + x0
    raise ValueError(f"unknown prediction '{prediction}'")


class Denoiser(nn.Module):
    """A network read as a denoiser of `process` in parameterization `prediction`.

    forward(x_t (B, ...), t (B,), cond (B,) or None) -> (x0_hat, eps_hat), each shaped like x_t.
    The network computes in its own dtype; the conversions run in float32 (float64 for a float64 net).
    sigma_data (the data's std, EDM's sigma_d) is read by the edm parameterization only.
    """

    def __init__(self, net: nn.Module, process: Process, prediction: str, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.process, self.prediction = net, process, prediction
        self.sigma_data = sigma_data

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The network's output F (B, ...) for x_t (B, ...), in float32 at least (a bf16 net's output
        is promoted). The net sees c_in * x_t (c_in = 1 but for edm) and the process's net time."""
        alpha, sigma = self.process.alpha_sigma(t)
        c_in = input_scale(self.prediction, alpha, sigma, self.sigma_data)
        F = self.net(append_dims(c_in, x_t) * x_t, self.process.net_time(t), cond)
        return F if F.dtype == torch.float64 else F.float()

    def logvar(self, t: torch.Tensor) -> torch.Tensor:
        """The net's learned log-variance u (B,) of the loss at times t (B,) (EDM2), in float32 at least."""
        u = self.net.logvar(self.process.net_time(t)).reshape(len(t))
        return u if u.dtype == torch.float64 else u.float()

    def forward(self, x_t, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t)
        F = self.raw(x_t, t, cond)
        return from_prediction(self.prediction, F, x_t.to(F.dtype), alpha, sigma, self.sigma_data)
