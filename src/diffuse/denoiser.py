"""The one denoiser interface: (x_t, t, cond) -> (x0_hat, eps_hat).

`Denoiser` wraps a raw network and reads its output in one of four parameterizations. With
x_t = alpha * x0 + sigma * eps:
    eps:  F = eps                        x0 = (x_t - sigma * F) / alpha
    x0:   F = x0                         eps = (x_t - alpha * F) / sigma
    v:    F = alpha * eps - sigma * x0   (Salimans & Ho 2022, general alpha, sigma):
          x0 = (alpha * x_t - sigma * F) / (alpha^2 + sigma^2), eps = (sigma * x_t + alpha * F) / (alpha^2 + sigma^2)
    flow: F = eps - x0                   (rectified-flow velocity, dx_t/dt when alpha = 1 - t, sigma = t):
          x0 = (x_t - sigma * F) / (alpha + sigma), eps = F + x0
Samplers, losses, guidance and distillation all speak this interface, so none of them knows which
parameterization or process sits underneath.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.data import condition_shape, data_shape
from diffuse.nets.mlp import MLP
from diffuse.nets.unet import UNet
from diffuse.process import Process, RectifiedFlow, VPDiscrete

PREDICTIONS = ("eps", "x0", "v", "flow")


def append_dims(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in like's dtype, for broadcasting against `like` (B, ...)."""
    return a.to(like.dtype).reshape(a.shape + (1,) * (like.ndim - a.ndim))


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor,
                    alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the network should output for (x0, eps) at (alpha, sigma), shaped like x0."""
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


def from_prediction(prediction: str, F: torch.Tensor, x_t: torch.Tensor,
                    alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network output F read as (x0_hat, eps_hat); the inverse of `training_target`."""
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
    """

    def __init__(self, net: nn.Module, process: Process, prediction: str):
        super().__init__()
        self.net, self.process, self.prediction = net, process, prediction

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The network's output F, in float32 at least (a bf16 net's output is promoted)."""
        F = self.net(x_t, self.process.net_time(t), cond)
        return F if F.dtype == torch.float64 else F.float()

    def forward(self, x_t, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t)
        F = self.raw(x_t, t, cond)
        return from_prediction(self.prediction, F, x_t.to(F.dtype), alpha, sigma)


def build_process(diffusion) -> Process:
    """The noise process a `DiffusionConfig` names."""
    if diffusion.process == "flow":
        return RectifiedFlow()
    return VPDiscrete(diffusion.schedule, diffusion.zero_terminal_snr)


def build_denoiser(config) -> Denoiser:
    """A freshly initialized denoiser for a `Config`; the data set fixes the shape and classes,
    the task the condition (class labels, or an image through the U-Net's image encoder)."""
    shape, num_classes = data_shape(config.data.name)
    cond_shape = condition_shape(config.data)
    m = config.model
    if m.net == "mlp":
        net = MLP(dim=shape[0], hidden=m.hidden, depth=m.depth, num_classes=num_classes,
                  emb_dim=m.emb_dim, dropout=m.dropout)
    else:
        net = UNet(in_channels=shape[0], channels=tuple(m.channels), blocks=m.blocks,
                   attn_levels=tuple(m.attn_levels), num_classes=0 if cond_shape else num_classes,
                   emb_dim=m.emb_dim, dropout=m.dropout, cond_shape=cond_shape)
    return Denoiser(net, build_process(config.diffusion), config.diffusion.prediction)
