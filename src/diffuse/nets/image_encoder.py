"""The encoder of an image condition: a low-res image y -> one feature map per U-Net level.

y never joins the noisy input x_t (a net fed y beside x_t learns to copy y and ignore x_t). It
enters the U-Net only through these feature maps, which modulate the residual blocks of each
level per pixel (SPADE, Park et al. 2019), so the U-Net's own path still starts from x_t alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize(h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size): nearest copies when growing, block means (area) when shrinking."""
    if tuple(h.shape[-2:]) == tuple(size):
        return h
    mode = "nearest" if size[0] >= h.shape[-2] else "area"
    return F.interpolate(h, size=size, mode=mode)


class EncoderBlock(nn.Module):
    """h + conv(SiLU(conv(SiLU(h)))): refines the features (B, C, H, W) at one resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.silu(self.conv1(F.silu(h))))


class ImageEncoder(nn.Module):
    """forward(y (B, C, h, w) or None, x (B, C_x, H, W)) -> [features (B, width, H / 2^l, W / 2^l) per level l].

    Works coarse to fine: y is lifted to features at its own resolution, then at each level, from
    the coarsest, resized to that level's resolution and refined by a block, so every level sees
    all of y. An all-NaN y (the null condition of classifier-free guidance), or y = None, selects a
    learned null feature map per level instead; NaN never enters a convolution.
    """

    def __init__(
        self,
        in_channels: int,                # channels of y
        width: int,                      # feature channels at every level
        levels: int,                     # U-Net levels, each at half the resolution of the one above
    ):
        super().__init__()
        self.in_channels = in_channels
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(EncoderBlock(width) for _ in range(levels))  # coarsest level first
        self.null = nn.ParameterList(nn.Parameter(torch.zeros(width, 1, 1)) for _ in range(levels))

    def forward(self, y: torch.Tensor | None, x: torch.Tensor) -> list[torch.Tensor]:
        levels = len(self.blocks)
        if y is None:
            y = x.new_full((len(x), self.in_channels, 1, 1), float("nan"))
        if y.ndim != 4:
            raise ValueError(f"an image condition is (B, C, h, w), not {tuple(y.shape)}: was the net given "
                             "class labels? (load super-resolution data with the run's DataConfig)")
        missing = y.isnan().flatten(1).all(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
        h = self.inp(torch.nan_to_num(y).to(x.dtype))
        height, width = x.shape[-2:]
        features = []
        for k, (block, null) in enumerate(zip(self.blocks, self.null)):
            level = levels - 1 - k
            h = block(resize(h, (-(-height // 2**level), -(-width // 2**level))))  # ceil: the U-Net's stride-2 sizes
            features.append(torch.where(missing, null.to(h.dtype), h))
        return features[::-1]  # top level first
