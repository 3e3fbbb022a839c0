"""The networks and their one factory: `build_net(model_config, dataset)`, `build_denoiser(config)`.

Every net honours one contract (`Net`), so training, sampling, the probe and distillation never
ask which net they hold:

    forward(x (B, *shape), t (B,) the process's net time, cond (B, ...) or None) -> F (B, *shape)
    bottleneck   the layer whose output is the innermost representation: the probe's features and
                 DMD2's GAN head read it through a forward hook
    logvar(t)    optional (EDM2's MP U-Net only): the learned log-variance u (B,) of the loss

A net sees a condition of the data set's kind: class labels int64 (B,) with -1 for none (and
nothing else for unconditional data), a vector (B, D) with a NaN row for none, or an image
(B, *cond_shape) through its own encoder (the U-Net's SPADE path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from diffuse.data import Dataset, dataset
from diffuse.denoiser import Denoiser
from diffuse.errors import UserError
from diffuse.nets.mlp import MLP
from diffuse.nets.mp_unet import MPUNet
from diffuse.nets.unet import UNet
from diffuse.process import build_process

if TYPE_CHECKING:  # config imports NETS from here
    from diffuse.config import Config, ModelConfig

NETS = ("unet", "mp_unet", "mlp")  # unet, mp_unet: images; mlp: points
MAX_PARAMETERS = 4 * 10**9  # over twice EDM2-XXL's 1.5 billion; more is a typo (or a hostile config), not a model


class Net(Protocol):
    """The contract every net of `build_net` keeps (see the module docstring)."""

    bottleneck: nn.Module

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


def build_net(m: ModelConfig, dataset: Dataset) -> nn.Module:
    """A freshly initialized net of model.net for the data set's shape, classes and kind of condition."""
    labels = dataset.num_classes if dataset.condition == "label" else 0
    vector = dataset.cond_shape[0] if dataset.condition == "vector" else 0
    image = dataset.cond_shape if dataset.condition == "image" else None
    if m.net == "mlp":
        return MLP(dim=dataset.shape[0], hidden=m.hidden, depth=m.depth, num_classes=labels,
                   emb_dim=m.emb_dim, dropout=m.dropout)
    if m.net == "mp_unet":
        return MPUNet(in_channels=dataset.shape[0], channels=tuple(m.channels), blocks=m.blocks,
                      attn_levels=tuple(m.attn_levels), num_classes=labels, emb_dim=m.emb_dim,
                      dropout=m.dropout, fixed_mp=m.fixed_mp)
    return UNet(in_channels=dataset.shape[0], channels=tuple(m.channels), blocks=m.blocks,
                attn_levels=tuple(m.attn_levels), num_classes=labels, cond_dim=vector, emb_dim=m.emb_dim,
                dropout=m.dropout, cond_shape=image)


def sized_for(dataset: Dataset) -> list[str]:
    """The U-Net and batch a data set gets where no preset is named (`diffuse train --data DIR`), as
    `key=value` overrides: one level per halving of the side down to 8 pixels or an odd side (16: 2
    levels, 28 and 32: 3, 64: 4, 128: 5, 256: 6), widths 32, 64, then 128 from the third level on,
    attention at the coarsest level, and a batch of 64 up to 32 pixels, halved per doubling of the side
    above that (256 pixels: 8). Colour costs little more than grey at these widths (a 32x32x3 step
    about 1.2x a 28x28x1 one on 2 CPU cores); 64 base channels would cost 3.6x (measured 2026-12-01)."""
    side = dataset.shape[1]
    sides = [side]
    while sides[-1] > 8 and sides[-1] % 2 == 0:
        sides.append(sides[-1] // 2)
    widths = [32 * 2 ** min(level, 2) for level in range(len(sides))]
    batch = max(64 * 32 // max(side, 32), 8)
    return [f"model.channels={widths}", f"model.attn_levels=[{len(widths) - 1}]", f"train.batch={batch}"]


def build_denoiser(config: Config) -> Denoiser:
    """A freshly initialized denoiser for a `Config`: its data set's net read in its process and prediction."""
    d = config.diffusion
    data = dataset(config.data)
    check_size(config.model, data)
    net = build_net(config.model, data)
    return Denoiser(net, build_process(d), d.prediction, d.sigma_data)  # only the edm prediction reads sigma_data


def check_size(m: ModelConfig, dataset: Dataset) -> None:
    """Refuse a net of more than MAX_PARAMETERS, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in build_net(m, dataset).parameters())
    if count > MAX_PARAMETERS:
        size = f"model.hidden {m.hidden}" if m.net == "mlp" else f"model.channels {list(m.channels)}"
        raise UserError(f"{size} with model.emb_dim {m.emb_dim} make a net of {count / 1e9:.1f} billion parameters, "
                        f"over the limit of {MAX_PARAMETERS / 1e9:g} billion; choose a smaller model.")
