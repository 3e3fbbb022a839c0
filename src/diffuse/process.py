"""Noise processes: x_t = alpha_t * x0 + sigma_t * eps, each with its own clock t.

A process answers four questions: the (alpha_t, sigma_t) of a time (in float64;
callers cast to their data's dtype), how to draw
training times, what time value the network sees, and which times a sampler visits. Every time list
a sampler gets ends at the clean state (alpha = 1, sigma = 0), so samplers never special-case the
last step. A fifth, `time_of(sigma / alpha)`, inverts the noise level for samplers that raise it
(EDM's churn); it returns a time of the kind `sampling_times` lists.

Three processes: `VPDiscrete` (DDPM), `RectifiedFlow`, and `EDM` (Karras et al. 2022), where
alpha = 1 and the time is sigma itself.
"""

from __future__ import annotations

import math

import torch

from diffuse.errors import UserError

PROCESSES = ("vp", "flow", "edm")
SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("trailing", "leading", "linspace")


# ---------------------------------------------------------------------------------------------
# DDPM beta schedules (diffusers' names and constants).


def make_betas(schedule: str, T: int = 1000) -> torch.Tensor:
    """Betas (T,) in float64 for 'linear', 'scaled_linear' or 'cosine'."""
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta), as Stable Diffusion
        return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, offset s = 0.008, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise UserError(f"unknown beta schedule '{schedule}'; choose linear, scaled_linear or cosine.")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so alpha_bar_T is exactly 0."""
    s = torch.cumprod(1 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)  # s_T = 0, s_0 unchanged
    alpha_bar = s**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def spaced_timesteps(steps: int, spacing: str, T: int = 1000) -> list[int]:
    """Descending integer timesteps for a sampler, as diffusers' `set_timesteps` makes them.

    trailing: round(arange(T, 0, -T/N)) - 1, starting at T-1 (Lin et al. recommend it);
    leading: arange(N) * (T // N), reversed; linspace: round(linspace(0, T-1, N)), reversed.
    """
    if not 1 <= steps <= T:
        raise UserError(f"--steps {steps} is out of range; choose 1 to {T}.")
    if spacing == "trailing":
        t = torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1
    elif spacing == "leading":
        t = (torch.arange(steps) * (T // steps)).flip(0)
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
    else:
        raise UserError(f"unknown spacing '{spacing}'; choose one of {', '.join(SPACINGS)}.")
    return [int(v) for v in t.tolist()]


class VPDiscrete:
    """DDPM's variance-preserving process on T integer steps: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t).

    Time -1 stands for the clean data (abar = 1), the "previous time" of the last sampling step.
    """

    def __init__(self, schedule: str = "linear", zero_terminal_snr: bool = False, T: int = 1000):
        self.T = T
        betas = make_betas(schedule, T)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas  # (T,) float64
        self.alpha_bar = torch.cumprod(1 - betas, dim=0)  # (T,) float64
        self._alpha_bar_ext = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float64 tensors shaped like t (integer steps, -1 = clean)."""
        abar = self._alpha_bar_ext.to(t.device)[t.long() + 1]
        return abar.sqrt(), (1 - abar).sqrt()

    def sample_train_t(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """Uniform integer steps in [0, T), shape (n,)."""
        return torch.randint(0, self.T, (n,), generator=generator).to(device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The step index itself, as float, is what the network sees."""
        return t.float()

    def sampling_times(self, steps: int, spacing: str = "trailing") -> list[int]:
        """Descending steps ending with -1 (clean): each step's previous time is the next entry."""
        return spaced_timesteps(steps, spacing, self.T) + [-1]

    def time_of(self, s: float) -> int:
        """The step whose sigma / alpha is nearest s: EDM's `round_sigma` for a discrete process."""
        # sigma / alpha = sqrt((1 - abar) / abar); infinite at a zero-terminal-SNR last step
        s_all = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()  # (T,) float64
        return int((s_all - s).abs().argmin())


class RectifiedFlow:
    """Rectified flow: x_t = (1 - t) * x0 + t * eps for t in [0, 1]; alpha = 1 - t, sigma = t."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - t, t) as float64 tensors shaped like t."""
        t = t.double()
        return 1 - t, t

    def sample_train_t(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """Logit-normal times (Esser et al. 2024, m = 0, s = 1): more weight to mid-range t."""
        return torch.sigmoid(torch.randn(n, generator=generator)).to(device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """Scaled by 1000 so the same time embedding serves both processes."""
        return t.float() * 1000

    def sampling_times(self, steps: int, spacing: str = "trailing") -> list[float]:
        """Uniform steps from t = 1 (pure noise) down to t = 0 (clean); spacing does not apply."""
        if steps < 1:
            raise UserError(f"--steps {steps} is out of range; choose at least 1.")
        return [1 - i / steps for i in range(steps)] + [0.0]

    def time_of(self, s: float) -> float:
        """The t whose sigma / alpha = t / (1 - t) is s: t = s / (1 + s)."""
        return s / (1 + s)


class EDM:
    """Karras et al. 2022 (EDM): x_t = x0 + sigma * eps; alpha = 1, and the time t *is* sigma.

    Training draws ln sigma ~ N(P_mean, P_std). The default (-0.8, 1.6) is EDM2's for pixels
    (ImageNet-64, Karras et al. 2024), chosen because the EDM2 net and its learned-uncertainty loss
    were tuned with it; EDM1's is (-1.2, 1.2), EDM2's for latents (-0.4, 1.0). All of EDM's sigmas
    are in the units of data with std sigma_data = 0.5.
    """

    def __init__(self,
                 P_mean: float = -0.8,       # mean of ln sigma at training
                 P_std: float = 1.6,         # std of ln sigma at training
                 sigma_min: float = 0.002,   # last noise level a sampler visits before 0
                 sigma_max: float = 80.0,    # first noise level a sampler visits
                 rho: float = 7.0):          # curvature of the sampling schedule
        self.P_mean, self.P_std = P_mean, P_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, sigma = t) as float64 tensors shaped like t."""
        sigma = t.double()
        return torch.ones_like(sigma), sigma

    def sample_train_t(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """sigma (n,) in float64 with ln sigma ~ N(P_mean, P_std^2) (EDM Table 1, "noise distribution")."""
        # ln sigma = P_mean + P_std * n,  n ~ N(0, 1)
        ln_sigma = self.P_mean + self.P_std * torch.randn(n, generator=generator, dtype=torch.float64)
        return ln_sigma.exp().to(device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's c_noise = ln(sigma) / 4 (Table 1), in float32; -inf at the clean state, which no net sees."""
        # c_noise = ln(sigma) / 4
        return (t.double().log() / 4).float()

    def sampling_times(self, steps: int, spacing: str = "trailing") -> list[float]:
        """`steps` sigmas of the rho schedule (EDM eq. 5), then 0 (clean); spacing does not apply.

        sigma_i = (sigma_max^(1/rho) + i / (N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N.
        Each is rounded to float32, so a time tensor of the default dtype (the samplers' `torch.full`)
        holds it exactly and a sampler's step sizes use the very sigma the net is given (EDM's
        preconditioning casts sigma to float32 too). One step is just [sigma_max, 0].
        """
        if steps < 1:
            raise UserError(f"--steps {steps} is out of range; choose at least 1.")
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        # sigma_i = (hi + i / (N - 1) * (lo - hi))^rho
        sigmas = (hi + i / max(steps - 1, 1) * (lo - hi)) ** self.rho
        return sigmas.float().double().tolist() + [0.0]

    def time_of(self, s: float) -> float:
        """The time whose sigma is s: s itself, rounded to float32 like the sampling times."""
        return torch.tensor(s, dtype=torch.float64).float().item()


Process = VPDiscrete | RectifiedFlow | EDM


def build_process(diffusion) -> Process:
    """The noise process a `DiffusionConfig` names."""
    if diffusion.process == "flow":
        return RectifiedFlow()
    if diffusion.process == "edm":
        return EDM(P_mean=diffusion.P_mean, P_std=diffusion.P_std, sigma_min=diffusion.sigma_min,
                   sigma_max=diffusion.sigma_max, rho=diffusion.rho)
    return VPDiscrete(diffusion.schedule, diffusion.zero_terminal_snr)
