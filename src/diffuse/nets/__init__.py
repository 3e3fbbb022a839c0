"""The networks and their one factory: `build_net(model_config, dataset)`, `build_denoiser(config)`.

Every net honours one contract (`Net`), so training, sampling, the probe and distillation never
ask which net they hold:

    forward(x (B, *shape), t (B,) the process's net time, cond (B, ...) or None) -> F (B, *shape)
    bottleneck   the layer whose output is the innermost representation: the probe's features and
                 DMD2's GAN head read it through a forward hook
    logvar(t)    optional (EDM2's MP U-Net only): the learned log-variance u (B,) of the loss

A net sees a condition of the data set's kind: class labels int64 (B,) with -1 for none, or an
image (B, *cond_shape) through its own encoder (the U-Net's SPADE path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from diffuse.data import Dataset, dataset
from diffuse.denoiser import Denoiser
from diffuse.nets.mlp import MLP
from diffuse.nets.mp_unet import MPUNet
from diffuse.nets.unet import UNet
from diffuse.process import build_process

if TYPE_CHECKING:  # config imports NETS from here
    from diffuse.config import Config, ModelConfig

NETS = ("unet", "mp_unet", "mlp")  # unet, mp_unet: images; mlp: points


class Net(Protocol):
    """The contract every net of `build_net` keeps (see the module docstring)."""

    bottleneck: nn.Module

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


def build_net(m: ModelConfig, dataset: Dataset) -> nn.Module:
    """A freshly initialized net of model.net for the data set's shape, classes and kind of condition."""
    labels = dataset.num_classes if dataset.condition == "label" else 0
    if m.net == "mlp":
        return MLP(dim=dataset.shape[0], hidden=m.hidden, depth=m.depth, num_classes=labels,
                   emb_dim=m.emb_dim, dropout=m.dropout)
    if m.net == "mp_unet":
        return MPUNet(in_channels=dataset.shape[0], channels=tuple(m.channels), blocks=m.blocks,
                      attn_levels=tuple(m.attn_levels), num_classes=labels, emb_dim=m.emb_dim,
                      dropout=m.dropout, fixed_mp=m.fixed_mp)
    return UNet(in_channels=dataset.shape[0], channels=tuple(m.channels), blocks=m.blocks,
                attn_levels=tuple(m.attn_levels), num_classes=labels, emb_dim=m.emb_dim,
                dropout=m.dropout, cond_shape=dataset.cond_shape)


def build_denoiser(config: Config) -> Denoiser:
    """A freshly initialized denoiser for a `Config`: its data set's net read in its process and prediction."""
    d = config.diffusion
    net = build_net(config.model, dataset(config.data))
    return Denoiser(net, build_process(d), d.prediction, d.sigma_data)  # only the edm prediction reads sigma_data
