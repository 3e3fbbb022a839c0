"""Multistep solvers of the probability-flow ODE in lambda: DPM-Solver++(2M), (3M) and UniPC, and the
step primitives that every sampler shares (`step_pairs`, `coefficients`, `denoise`).

Symbols (Lu et al. 2022, arXiv 2211.01095, DPM-Solver++; Zhao et al. 2023, arXiv 2302.04867, UniPC):
  x_i, t_i          the state after step i at time t_i = times[i]; x_0 is the start x_T, t_N the clean state
  alpha_i, sigma_i  the process at t_i: x_t = alpha x0 + sigma eps
  lambda_i          log(alpha_i / sigma_i), half the log-SNR: -inf where alpha = 0 (zero terminal SNR, flow's
                    t = 1), +inf at the clean state (sigma = 0)
  h_i               lambda_i - lambda_{i-1} > 0, the length of step i in lambda; r_i = h_{i-1} / h_i
  m_i               x0_hat(x_i, t_i), the data prediction (the one network evaluation of each step)
  w_j               the weights on m_{i-1}, m_{i-2}, ... of one step:
                    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i sum_j w_j m_j

All three solve the data-prediction form of the exact step (DPM-Solver++, sec. 3.1 in data prediction):
  x_i = (sigma_i / sigma_{i-1}) x_{i-1} + sigma_i int_{lambda_{i-1}}^{lambda_i} e^lambda x0(lambda) dlambda,
whose first-order evaluation (x0 held at m_{i-1}) is DDIM: w = [-expm1(-h_i)]. Higher orders extrapolate x0
in lambda from the last evaluations. The multiplicative form stays finite at the infinite ends: alpha = 0 at
the start gives e^{-h_1} = 0 and x_1 = alpha_1 m_0 + (sigma_1 / sigma_0) x_0; the clean end gives
sigma_N / sigma_{N-1} = 0 and x_N = m_{N-1} exactly. No step subtracts two infinities: lambda is -inf only at
the first time and +inf only at the last. A history that reaches back past an infinite step cannot be
extrapolated (r = inf), and neither can a step of infinite length: those steps drop to the order that
their finite steps support (`usable_order`). Coefficients are Python floats (float64), the loop state
float64 as in heun; the net is fed in the dtype of the x it was given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from tqdm import tqdm


def step_pairs(times: Sequence, show: bool):
    """(t, t_next) of each step, with a progress bar when `show`."""
    pairs = list(pairwise(times))
    return tqdm(pairs, desc="sampling", leave=False, disable=not show)


def coefficients(process, t) -> tuple[float, float]:
    """(alpha_t, sigma_t) of one time as Python floats: step coefficients in float64."""
    alpha, sigma = process.alpha_sigma(torch.tensor([t]))
    return alpha.item(), sigma.item()


def denoise(denoiser: nn.Module, x: torch.Tensor, t, cond, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) in float64 for the float64 loop state x (B, ...), the net fed in `dtype`."""
    x0, eps = denoiser(x.to(dtype), torch.full((len(x),), t, device=x.device), cond)
    return x0.double(), eps.double()


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), -inf at alpha = 0 and +inf at sigma = 0 (math.log refuses 0)."""
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def usable_order(order: int, hs: Sequence[float]) -> int:
    """The order a step can take given its h and the earlier ones, newest first (hs[0] = h_i): at most
    `order`, one more than the history's length, and first order for a step of infinite length; the
    history stops at an infinite step, where r = h_{i-1} / h_i is infinite."""
    if not math.isfinite(hs[0]):
        return 1
    k = 1
    while k < min(order, len(hs)) and math.isfinite(hs[k]):
        k += 1
    return k


def dpmpp_weights(order: int, hs: Sequence[float]) -> list[float]:
    """w on m_{i-1}, m_{i-2}, m_{i-3} of a DPM-Solver++ multistep step of `order` 1, 2 or 3.

    1: w = [c0], c0 = -expm1(-h) (DDIM).
    2 (Alg. 2, "midpoint" as diffusers names it): D = m_{i-1} + (m_{i-1} - m_{i-2}) / (2 r), r = h_{i-1} / h.
    3 (the "third-order" multistep step of LuChengTHU/dpm-solver and diffusers; see `dpmpp_3m` for
      its actual order): with r0 = h_{i-1} / h,
      r1 = h_{i-2} / h, D1_0 = (m_{i-1} - m_{i-2}) / r0, D1_1 = (m_{i-2} - m_{i-3}) / r1,
      D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1):
      x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i (c0 m_{i-1} + c1 D1 + c2 D2),
      c1 = expm1(-h) / h + 1, c2 = 1/2 - (expm1(-h) + h) / h^2.
    """
    h = hs[0]
    c0 = -math.expm1(-h)
    if order == 1:
        return [c0]
    if order == 2:
        r = hs[1] / h
        # D = (1 + 1 / (2 r)) m_{i-1} - (1 / (2 r)) m_{i-2}
        return [c0 * (1 + 1 / (2 * r)), -c0 / (2 * r)]
    r0, r1 = hs[1] / h, hs[2] / h
    d1_0, d1_1 = [1 / r0, -1 / r0, 0.0], [0.0, 1 / r1, -1 / r1]
    diff = [a - b for a, b in zip(d1_0, d1_1)]
    d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d1_0, diff)]  # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)
    d2 = [b / (r0 + r1) for b in diff]  # D2 = (D1_0 - D1_1) / (r0 + r1)
    c1 = math.expm1(-h) / h + 1
    c2 = 0.5 - (math.expm1(-h) + h) / h**2
    return [c0 * (j == 0) + c1 * a + c2 * b for j, (a, b) in enumerate(zip(d1, d2))]


def unic_weights(order: int, hs: Sequence[float]) -> list[float]:
    """w on m_i (new), m_{i-1}, m_{i-2} of UniC-`order`, correcting x_i after the predictor of step i.

    With B(h) = expm1(-h) ("bh2") and hh = -h: b_1 = (expm1(hh) / hh - 1) / B,
    b_2 = 2 ((expm1(hh) / hh - 1) / hh - 1/2) / B; x_i^c = (sigma_i / sigma_{i-1}) x_{i-1}
    - alpha_i B (m_{i-1} + rho_0 (m_{i-2} - m_{i-1}) / r_k + rho_1 (m_i - m_{i-1})), r_k = -h_{i-1} / h.
    Order 1: rho_1 = 1/2 (the trapezoid in lambda; UniPC's code and diffusers use it, b_1 -> 1/2 as h -> 0).
    Order 2: [[1, 1], [r_k, 1]] (rho_0, rho_1) = (b_1, b_2), solved in closed form.
    """
    h = hs[0]
    B = math.expm1(-h)
    if order == 1:
        return [-B / 2, -B / 2]
    hh, r_k = -h, -hs[1] / h
    b1 = (math.expm1(hh) / hh - 1) / B
    b2 = 2 * ((math.expm1(hh) / hh - 1) / hh - 0.5) / B
    rho0 = (b1 - b2) / (1 - r_k)
    rho1 = b1 - rho0
    # -B (m_{i-1} (1 - rho_0 / r_k - rho_1) + (rho_0 / r_k) m_{i-2} + rho_1 m_i)
    return [-B * rho1, -B * (1 - rho0 / r_k - rho1), -B * rho0 / r_k]


def _combine(weights: Sequence[float], ms: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_j w_j m_j over the first len(weights) predictions."""
    return sum(w * m for w, m in zip(weights, ms))


@torch.no_grad()
def _dpmpp(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond, order: int,
           lower_order_final: bool, progress: bool) -> torch.Tensor:
    """DPM-Solver++ multistep of `order`; the loop of `dpmpp_2m` and `dpmpp_3m`."""
    process, dtype, N = denoiser.process, x.dtype, len(times) - 1
    x, ms, hs = x.double(), [], []  # ms, hs newest first
    for i, (t, t_next) in enumerate(step_pairs(times, progress)):
        alpha, sigma = coefficients(process, t)
        alpha_next, sigma_next = coefficients(process, t_next)
        m, _ = denoise(denoiser, x, t, cond, dtype)
        h = half_log_snr(alpha_next, sigma_next) - half_log_snr(alpha, sigma)
        ms, hs = [m, *ms][:order], [h, *hs][:order]
        # diffusers' lower_order_final: second order on the next-to-last step when N < 15
        cap = min(order, 2) if lower_order_final and i == N - 2 and N < 15 else order
        # x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i sum_j w_j m_j
        x = sigma_next / sigma * x + alpha_next * _combine(dpmpp_weights(usable_order(cap, hs), hs), ms)
    return x.to(dtype)


def dpmpp_2m(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *, noise=None,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, for any process.

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i expm1(-h_i) D_i,
    D_i = (1 + 1 / (2 r_i)) m_{i-1} - (1 / (2 r_i)) m_{i-2}, r_i = h_{i-1} / h_i.
    The first step, a step after one from alpha = 0 and the last step into the clean state are first
    order (DDIM); k-diffusion's `sample_dpmpp_2m` and diffusers (final_sigmas_type "zero") do the same
    at the end, so diffusers' lower_order_final changes nothing here. NFE = N, one evaluation per step.
    Returns x0 shaped and typed like x.
    """
    return _dpmpp(denoiser, x, times, cond, 2, True, progress)


def dpmpp_3m(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *, noise=None,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M): the third-order multistep step (`dpmpp_weights`), after a first- and a
    second-order step to build the history; the last step into the clean state is first order.

    The step is the one diffusers, k-diffusion and LuChengTHU/dpm-solver publish. Its D2 estimates
    h^2 x0'' / 2 where the phi_3 term wants h^2 x0'', so a parabola in lambda gets half its weight and the
    method is formally second order with a small constant: on the Gaussian mixture its slope is 2.65
    (EDM) / 2.37 (VP) over 20-160 steps against 2M's 2.10 / 1.88, falling to 2.27 on EDM over 40-320.
    It is kept as published, so that it is diffusers' solver_order = 3.

    lower_order_final is on, as in diffusers: with N < 15 the next-to-last step (into sigma_min) is second
    order. Measured on the Gaussian mixture (RMS error of 256 samples against a 4000-step Heun solve):
    on EDM's rho schedule it keeps few steps stable, 0.41 instead of 1.61 at N = 4, 0.44 / 1.21 at 5,
    0.58 / 0.77 at 6, 0.13 / 0.16 at 12 (slightly worse at 8 and 10: 0.68 / 0.64, 0.23 / 0.21); on VP's
    trailing steps it costs 10-30% (0.036 / 0.028 at N = 4, 0.029 / 0.023 at 10). Third order
    extrapolated over EDM's few, unequal steps can blow up; the cost where it does not is small.
    NFE = N, one evaluation per step. Returns x0 shaped and typed like x.
    """
    return _dpmpp(denoiser, x, times, cond, 3, True, progress)


@torch.no_grad()
def unipc(denoiser: nn.Module, x: torch.Tensor, times: Sequence, cond=None, *, noise=None,
          progress: bool = False) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): UniP-2 predictor and UniC corrector, data prediction, B(h) = expm1(-h)
    ("bh2"), diffusers' UniPCMultistepScheduler defaults (solver_order 2, lower_order_final).

    Each step i evaluates m_{i-1} at the predicted x_{i-1}, first corrects x_{i-1} with it (UniC of the
    previous predictor's order, `unic_weights`), then predicts x_i from the corrected x_{i-1} with the
    same m_{i-1}: the corrector costs no evaluation, NFE = N. UniP-2 with B = expm1(-h) and rho = 1/2 is
    the DPM-Solver++(2M) step (`dpmpp_weights`). The last step into the clean state is first order and
    not corrected (there is no later evaluation), so lower_order_final, which lowers only that step
    for order 2, changes nothing. A step out of alpha = 0 is not corrected: a trapezoid over an
    infinite interval in lambda is undefined, as in heun. Returns x0 shaped and typed like x.
    """
    process, dtype = denoiser.process, x.dtype
    x, ms, hs, last = x.double(), [], [], None  # last: (x_{i-1}, sigma_i / sigma_{i-1}, alpha_i, order)
    for t, t_next in step_pairs(times, progress):
        alpha, sigma = coefficients(process, t)
        alpha_next, sigma_next = coefficients(process, t_next)
        m, _ = denoise(denoiser, x, t, cond, dtype)
        if last is not None and math.isfinite(hs[0]):
            x_prev, ratio, a, p = last
            # UniC: x^c = (sigma / sigma_prev) x_prev + alpha sum_j w_j m_j, over m (new) and the history
            x = ratio * x_prev + a * _combine(unic_weights(p, hs), [m, *ms])
        h = half_log_snr(alpha_next, sigma_next) - half_log_snr(alpha, sigma)
        ms, hs = [m, *ms][:2], [h, *hs][:2]
        p = usable_order(2, hs)
        last = (x, sigma_next / sigma, alpha_next, p)
        # UniP: x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i sum_j w_j m_j
        x = sigma_next / sigma * x + alpha_next * _combine(dpmpp_weights(p, hs), ms)
    return x.to(dtype)
