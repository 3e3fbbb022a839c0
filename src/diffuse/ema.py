"""Exponential moving average of the weights, with the half-life counted in images (Karras et al. 2022)."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(nimg: int, batch: int, halflife_kimg: float, rampup: float) -> float:
    """Decay for one step of `batch` images after `nimg` images seen (EDM training_loop).

    The half-life is capped at rampup * nimg, so early in training the average forgets the random
    initialization quickly; later it is halflife_kimg thousand images.
    """
    halflife = halflife_kimg * 1000
    if rampup > 0:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, parameter by parameter; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - beta)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
