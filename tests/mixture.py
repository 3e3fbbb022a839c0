"""A 2-D Gaussian mixture whose exact denoiser is known in closed form, and distances to it: the
independent reference of the sampler tests (test_edm.py) and the distillation test (test_distill.py)."""

import math

import numpy as np
import torch
from torch import nn

MODES = 8
ANGLE = torch.arange(MODES, dtype=torch.float64) * (2 * math.pi / MODES)
MU = torch.stack([ANGLE.cos(), ANGLE.sin()], dim=1)  # (K, 2), on the unit circle
S = 0.1                                               # each mode's std: neighbours 7.7 std apart
WEIGHTS = torch.arange(2.0, MODES + 2, dtype=torch.float64) / sum(range(2, MODES + 2))  # 0.045 to 0.205
N_SAMPLES = 16000
SHARE_TOL, MEAN_TOL, STD_TOL, SW_TOL = 0.02, 0.02, 0.1, 0.02  # measured values in the tests' docstrings


def exact_denoiser(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t = x] (B, 2) for the mixture, x_t = alpha x0 + sigma eps; alpha, sigma (B,).

    x_t | k ~ N(alpha mu_k, v I), v = alpha^2 s^2 + sigma^2; E[x0 | x_t, k] = mu_k + (alpha s^2 / v)(x_t - alpha mu_k).
    For alpha = 1: sum_k w_k N(x; mu_k, (s^2 + sigma^2) I) (x s^2 + mu_k sigma^2) / (s^2 + sigma^2) / sum_k (...).
    The posterior over modes is softmax_k(ln w_k - |x - alpha mu_k|^2 / 2v) = softmax_k(ln w_k + alpha x.mu_k / v),
    as |x|^2 and |mu_k|^2 = 1 are the same for every k.
    """
    a, v = alpha[:, None], (alpha**2 * S**2 + sigma**2)[:, None]  # (B, 1)
    r = torch.softmax(WEIGHTS.log() + a * (x @ MU.T) / v, dim=1)  # (B, K)
    c = a * S**2 / v
    return (1 - c * a) * (r @ MU) + c * x


class ExactVPNet(nn.Module):
    """The exact denoiser as an x0-predicting net of a VP process (the net time is the step)."""

    def __init__(self, process):
        super().__init__()
        self.p, self.process = nn.Parameter(torch.zeros(())), process

    def forward(self, x, t, cond=None):
        alpha, sigma = self.process.alpha_sigma(t.round().long())
        return exact_denoiser(x.double(), alpha, sigma)


def exact_sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MU[k] + S * torch.randn(n, 2, generator=g, dtype=torch.float64)


def exact_quantiles(n: int, directions: torch.Tensor) -> torch.Tensor:
    """Quantiles (n, P) at levels (i + 1/2) / n of the mixture projected on each direction (P, 2):
    a 1-D mixture sum_k w_k N(mu_k . theta, s^2), its CDF inverted on a fine grid."""
    grid = torch.linspace(-1 - 8 * S, 1 + 8 * S, 20001, dtype=torch.float64)
    means = MU @ directions.T  # (K, P)
    cdf = (WEIGHTS[:, None, None] * torch.special.ndtr((grid[None, :, None] - means[:, None]) / S)).sum(0)  # (G, P)
    levels = (np.arange(n) + 0.5) / n
    return torch.tensor(np.stack([np.interp(levels, cdf[:, j].numpy(), grid.numpy())
                                  for j in range(len(directions))], axis=1))


def sliced_w1(x: torch.Tensor, projections: int = 64) -> float:
    """Sliced 1-Wasserstein distance of the points x (N, 2) to the mixture itself (not to a sample of
    it), over evenly spread directions: the mean over directions of mean_i |x_(i) - Q((i + 1/2) / N)|."""
    theta = torch.arange(projections, dtype=torch.float64) * (math.pi / projections)
    directions = torch.stack([theta.cos(), theta.sin()], dim=1)  # (P, 2)
    projected = (x.double() @ directions.T).sort(dim=0).values  # (N, P)
    return (projected - exact_quantiles(len(x), directions)).abs().mean().item()


def mixture_report(x: torch.Tensor) -> dict:
    """Share, mean and std of each mode (points go to the nearest mean) against the truth, and sliced W1."""
    x = x.double()
    nearest = torch.cdist(x, MU).argmin(dim=1)
    share = torch.bincount(nearest, minlength=MODES) / len(x)
    mean_err = torch.stack([(x[nearest == k].mean(0) - MU[k]).norm() for k in range(MODES)])
    std = torch.stack([(x[nearest == k] - MU[k]).pow(2).mean().sqrt() for k in range(MODES)])
    return dict(share_err=(share - WEIGHTS).abs().max().item(), mean_err=mean_err.max().item(),
                std_err=(std / S - 1).abs().max().item(), sw=sliced_w1(x))


