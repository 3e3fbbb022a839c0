"""Samplers: pure functions over the denoiser interface, each owning its loop, and their registry.

Every sampler has the signature `run(denoiser, x, times, cond, *, noise, **settings) -> x0`: `x` is the
starting noise (B, ...), `times` the descending list from `process.sampling_times` (its last entry
is the clean state), `cond` the condition or None, `noise` a callable that returns fresh Gaussian
noise shaped like its argument (deterministic samplers take it and draw nothing), `settings` the
keywords of `sample()` that this sampler reads (its record's `settings`), named in its signature.
The previous time of each step is the next entry of `times`, never recomputed from a stride.
`SAMPLERS` maps each name to its `Sampler` record; `sample()` looks samplers up there, so a sampler
is added by registering it. The multistep solvers (DPM-Solver++, UniPC) live in `diffuse.multistep`,
with the step primitives all samplers share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType

import torch
from torch import nn
from tqdm import tqdm

from diffuse.denoiser import append_dims
from diffuse.errors import UserError
from diffuse.multistep import (
    coefficients,
    denoise,
    dpmpp_2m,
    dpmpp_3m,
    step_pairs,
    unipc,
)
from diffuse.process import RectifiedFlow
from diffuse.speed import autocast

Noise = Callable[[torch.Tensor], torch.Tensor]


class ImageNoise:
    """Gaussian noise drawn per image from its own seed.

    An image's noise then does not depend on its batch or on how images are split across ranks:
    image i of a run is the same whether it is drawn alone or among thousands.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        z = torch.stack([torch.randn(like.shape[1:], generator=g) for g in self.generators])
        return z.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def ddim(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *, eta: float = 0.0,
         noise: Noise | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity eta; eta = 0 is the deterministic ODE sampler.

    x_prev = alpha_prev * x0_hat + sqrt(sigma_prev^2 - c^2) * eps_hat + c * z,
    c = eta * (sigma_prev / sigma_t) * sqrt(1 - alpha_t^2 / alpha_prev^2).
    """
    if eta > 0 and noise is None:
        raise ValueError("ddim with eta > 0 needs a noise source")
    process = denoiser.process
    for t, t_prev in step_pairs(times, progress):
        x0, eps = denoiser(x, torch.full((len(x),), t, device=x.device), cond)
        alpha, sigma = coefficients(process, t)
        alpha_prev, sigma_prev = coefficients(process, t_prev)
        c = eta * sigma_prev / sigma * math.sqrt(max(1 - (alpha / alpha_prev) ** 2, 0.0))
        x = alpha_prev * x0 + math.sqrt(max(sigma_prev**2 - c**2, 0.0)) * eps
        if eta > 0 and sigma_prev > 0:
            x = x + c * noise(x)
    return x


def ddpm(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *,
         noise: Noise, progress: bool = False) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7, variance beta_tilde).

    Drawing x_prev from the posterior q(x_prev | x_t, x0_hat) is DDIM with eta = 1, whose c^2 is
    beta_tilde = (sigma_prev^2 / sigma_t^2) * (1 - alpha_t^2 / alpha_prev^2), so it is written as that.
    """
    return ddim(denoiser, x, times, cond, eta=1.0, noise=noise, progress=progress)


@torch.no_grad()
def euler(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *,
          noise: Noise | None = None, progress: bool = False) -> torch.Tensor:
    """Euler steps of the rectified-flow ODE dx/dt = eps - x0 (valid when alpha = 1 - t, sigma = t)."""
    for t, t_prev in step_pairs(times, progress):
        x0, eps = denoiser(x, torch.full((len(x),), t, device=x.device), cond)
        x = x + (t_prev - t) * (eps - x0)
    return x


@torch.no_grad()
def renoise(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *, noise: Noise,
            progress: bool = False) -> torch.Tensor:
    """Few-step generation (consistency models, DMD2's multi-step generator): each step predicts x0_hat
    and noises it afresh to the next time, x_prev = alpha_prev * x0_hat + sigma_prev * z; the last
    step returns x0_hat. One step is x0_hat of the first time, exactly DDIM's single step."""
    process = denoiser.process
    for t, t_prev in step_pairs(times, progress):
        x0, _ = denoiser(x, torch.full((len(x),), t, device=x.device), cond)
        alpha_prev, sigma_prev = coefficients(process, t_prev)
        x = alpha_prev * x0 + sigma_prev * noise(x) if sigma_prev > 0 else x0
    return x


def _churn(process, x: torch.Tensor, t, gamma: float, S_noise: float, noise: Noise):
    """EDM's churn (Algorithm 2, lines 4-6): x~ raised from sigma~ to sigma^ = sigma~ (1 + gamma).

    In EDM's variables x~ = x / alpha, sigma~ = sigma / alpha: x~^ = x~ + sqrt(sigma^^2 - sigma~^2) S_noise z.
    sigma^ is rounded to a time of the process (`time_of`; like EDM's `round_sigma`, the nearest
    step for a discrete process). Returns (x^, t^).
    """
    alpha, sigma = coefficients(process, t)
    t_hat = process.time_of(sigma / alpha * (1 + gamma))
    alpha_hat, sigma_hat = coefficients(process, t_hat)
    s, s_hat = sigma / alpha, sigma_hat / alpha_hat
    # x~^ = x~ + sqrt(sigma^^2 - sigma~^2) S_noise z, carried back to x by alpha^
    x_hat = alpha_hat * (x / alpha + math.sqrt(max(s_hat**2 - s**2, 0.0)) * S_noise * noise(x))
    return x_hat, t_hat


@torch.no_grad()
def heun(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *, S_churn: float = 0.0,
         S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0, noise: Noise | None = None,
         progress: bool = False) -> torch.Tensor:
    """EDM's second-order sampler with churn (Karras et al. 2022, Algorithm 2), for any process.

    In EDM's variables x~ = x / alpha, sigma~ = sigma / alpha (x~ = x0 + sigma~ eps; for EDM
    alpha = 1 and they are x and sigma) the ODE is dx~/dsigma~ = (x~ - D(x~)) / sigma~ = eps_hat.
    With N = len(times) - 1 steps, each step from sigma~ to sigma~':
      churn: gamma = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma~ <= S_max, else 0;
             sigma^ = sigma~ (1 + gamma), x~^ = x~ + sqrt(sigma^^2 - sigma~^2) S_noise z;
      Euler: x~' = x~^ + (sigma~' - sigma^) eps_hat(x~^);
      Heun:  x~' = x~^ + (sigma~' - sigma^) (eps_hat(x~^) + eps_hat(x~')) / 2, except into sigma~' = 0.
    Multiplied by alpha' these update x itself: the Euler step is DDIM's x' = alpha' x0_hat + sigma' eps_hat
    and the correction adds (sigma' - alpha' sigma^) (eps_hat' - eps_hat) / 2. Neither divides by
    alpha, so a first time with alpha = 0 (zero terminal SNR; flow's t = 1; sigma~ infinite) works:
    that step is Euler only (the trapezoid over an infinite interval is undefined) and has no churn.
    NFE = 2N - 1 (2N - 2 when the first time has alpha = 0 and N > 1; `heun_evaluations`). The loop
    runs in float64, as EDM's; the net sees x in the dtype it was given. Returns x0 shaped and typed like x.
    """
    if S_churn > 0 and noise is None:
        raise ValueError("heun with S_churn > 0 needs a noise source")
    process, dtype, N = denoiser.process, x.dtype, len(times) - 1
    x = x.double()
    for t, t_next in step_pairs(times, progress):
        alpha, sigma = coefficients(process, t)
        alpha_next, sigma_next = coefficients(process, t_next)
        churn = alpha > 0 and S_churn > 0 and S_min <= sigma / alpha <= S_max
        gamma = min(S_churn / N, math.sqrt(2) - 1) if churn else 0.0
        x_hat, t_hat = _churn(process, x, t, gamma, S_noise, noise) if gamma > 0 else (x, t)
        alpha_hat, sigma_hat = coefficients(process, t_hat)
        x0, eps = denoise(denoiser, x_hat, t_hat, cond, dtype)
        # Euler: x' = alpha' (x~^ + (sigma~' - sigma^) eps_hat) = alpha' x0_hat + sigma' eps_hat
        x = alpha_next * x0 + sigma_next * eps
        if sigma_next > 0 and alpha_hat > 0:
            _, eps_next = denoise(denoiser, x, t_next, cond, dtype)
            # Heun: x' += alpha' (sigma~' - sigma^) (eps_hat' - eps_hat) / 2
            x = x + (sigma_next - alpha_next * sigma_hat / alpha_hat) / 2 * (eps_next - eps)
    return x.to(dtype)


def null_condition(cond: torch.Tensor) -> torch.Tensor:
    """The "no condition" of the same kind: label -1, or a row of NaN for vector conditions."""
    if cond.dtype.is_floating_point:
        return torch.full_like(cond, math.nan)
    return torch.full_like(cond, -1)


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023, sec. 3.4).

    x0_cfg = x0_u + w * (x0_c - x0_u); with rescale phi > 0:
    x0 = phi * x0_cfg * std(x0_c) / std(x0_cfg) + (1 - phi) * x0_cfg, std per sample.

    The rescale acts on x0_hat. Std matching gives different results in the eps, x0 and v spaces
    (diffusers rescales whatever the net outputs); x0 is the one space whose std is the image's
    own, the quantity that large guidance inflates (over-exposure), and it makes the result the
    same for eps-, v-, x0- and flow-parameterized nets. eps_hat is then recomputed from x_t so the
    pair stays consistent: x_t = alpha * x0_hat + sigma * eps_hat.
    """

    def __init__(self, denoiser: nn.Module, scale: float, rescale: float = 0.0):
        super().__init__()
        self.denoiser, self.scale, self.rescale = denoiser, scale, rescale
        self.process = denoiser.process

    def forward(self, x_t, t, cond):
        x0, eps = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                torch.cat([cond, null_condition(cond)]))
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        x0 = x0_u + self.scale * (x0_c - x0_u)
        eps = eps_u + self.scale * (eps_c - eps_u)
        if self.rescale > 0:
            dims = list(range(1, x_t.ndim))
            ratio = x0_c.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True)
            x0 = self.rescale * x0 * ratio + (1 - self.rescale) * x0
            alpha, sigma = self.process.alpha_sigma(t)
            eps = (x_t - append_dims(alpha, x0) * x0) / append_dims(sigma, x0)
        return x0, eps


def one_per_step(times: Sequence, process) -> int:
    """N = len(times) - 1: one network evaluation per step."""
    return len(times) - 1


def heun_evaluations(times: Sequence, process) -> int:
    """Heun's: one per step, and a second where the step ends above sigma = 0 and starts at alpha > 0."""
    return sum(1 + (coefficients(process, t_next)[1] > 0 and coefficients(process, t)[0] > 0)
               for t, t_next in pairwise(times))


@dataclass(frozen=True)
class Sampler:
    """A registered sampler.

    run(denoiser, x, times, cond, *, noise, **settings) -> x0, the sampler itself (module docstring);
    evaluations(times, process) -> the network evaluations per image for that time list, as the
    sampler's docstring counts them, unguided: `Guided` runs the net on a doubled batch, so with
    cfg != 1 each image costs twice that; settings: which of `sample()`'s keywords run takes
    (the others it does not read, and they are not passed); processes: the process classes it
    suits, None for all.
    """

    run: Callable[..., torch.Tensor]
    evaluations: Callable[[Sequence, object], int]
    settings: tuple[str, ...] = ()
    processes: tuple[type, ...] | None = None


SAMPLERS: Mapping[str, Sampler] = MappingProxyType({
    "ddim": Sampler(ddim, one_per_step, settings=("eta",)),
    "ddpm": Sampler(ddpm, one_per_step),
    "euler": Sampler(euler, one_per_step, processes=(RectifiedFlow,)),
    "heun": Sampler(heun, heun_evaluations, settings=("S_churn", "S_min", "S_max", "S_noise")),
    "renoise": Sampler(renoise, one_per_step),
    "dpmpp_2m": Sampler(dpmpp_2m, one_per_step),
    "dpmpp_3m": Sampler(dpmpp_3m, one_per_step),
    "unipc": Sampler(unipc, one_per_step),
})
"""name -> Sampler; iterating it gives the names (`choices=SAMPLERS`, `name in SAMPLERS`)."""


def sample(denoiser: nn.Module, shape: tuple[int, ...], cond: torch.Tensor, seeds: Sequence[int], *,
           sampler: str = "ddim", steps: int = 25, spacing: str = "trailing", eta: float = 0.0,
           cfg: float = 1.0, rescale: float = 0.0, S_churn: float = 0.0, S_min: float = 0.0,
           S_max: float = math.inf, S_noise: float = 1.0, batch: int = 256, precision: str = "fp32",
           progress: bool = False) -> torch.Tensor:
    """Draw len(seeds) samples in model space, (N, *shape); image i depends on seeds[i] and cond[i] only.

    cond: one condition per sample along dim 0, (N, ...): class labels int64 (N,) with -1 for
    unconditional, vectors (N, D), or images (N, C, h, w); NaN marks a missing float condition.
    Guidance applies where cfg != 1. The start is x_T = alpha_T * 0 + sigma_T * eps at the first
    sampling time (the data term dropped, as EDM does): sigma_max * eps for EDM, eps wherever
    sigma_T = 1 (flow, zero-terminal-SNR VP). eta: ddim's; S_*: heun's churn (EDM Algorithm 2); a
    sampler is given only the settings its record names. Each image costs
    `SAMPLERS[sampler].evaluations(times, process)` network evaluations, twice that with cfg != 1.
    precision: the net's forward passes, "fp32", "bf16" or "auto" (`speed.autocast`); the solvers' own
    arithmetic is elementwise, which autocast leaves in float32 or float64, and the net's outputs come back
    float32 (`Denoiser.raw`).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    record = SAMPLERS[sampler]
    if record.processes is not None and not isinstance(denoiser.process, record.processes):
        kinds = " or ".join(p.__name__ for p in record.processes)
        raise UserError(f"the {sampler} sampler needs a {kinds} process, not {type(denoiser.process).__name__}.")
    given = {"eta": eta, "S_churn": S_churn, "S_min": S_min, "S_max": S_max, "S_noise": S_noise}
    settings = {key: given[key] for key in record.settings}
    device = next(denoiser.parameters()).device
    model = Guided(denoiser, cfg, rescale) if cfg != 1.0 else denoiser
    times = denoiser.process.sampling_times(steps, spacing)
    _, sigma_T = coefficients(denoiser.process, times[0])
    out = []
    for start in tqdm(range(0, len(seeds), batch), desc="sampling", disable=not progress):
        noise = ImageNoise(seeds[start:start + batch])
        y = cond[start:start + batch].to(device)
        # x_T = alpha_T * 0 + sigma_T * eps
        x = sigma_T * noise(torch.empty((len(y), *shape), device=device))
        with autocast(precision, device):
            out.append(record.run(model, x, times, y, noise=noise, **settings).cpu())
    return torch.cat(out)
