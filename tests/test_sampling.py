"""Samplers against diffusers' schedulers on the same model function, and against hand computations."""

import pytest
import torch
from torch import nn

from diffuse.denoiser import Denoiser, from_prediction, training_target
from diffuse.process import RectifiedFlow, VPDiscrete, spaced_timesteps
from diffuse.sampling import Guided, ImageNoise, ddim, ddpm, euler, sample

from helpers import ListNoise

diffusers = pytest.importorskip("diffusers")


class FixedFunction(nn.Module):
    """A deterministic stand-in for a trained net: smooth in x, t and the label."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, cond=None):
        shift = 0.0 if cond is None else 0.1 * cond.float().clamp(min=-1).reshape(-1, *[1] * (x.ndim - 1))
        return torch.tanh(self.scale * x + t.reshape(-1, *[1] * (x.ndim - 1)) / 1000 + shift)


def reference_ddim(scheduler, x, eta, noises):
    """diffusers' DDIM loop; variance_noise given explicitly so both sides use the same draws."""
    net = FixedFunction()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = net(x, t.float().expand(len(x)))
            x = scheduler.step(out, t, x, eta=eta, variance_noise=noises[i] if noises else None).prev_sample
    return x


def scheduler_kwargs(prediction, zsnr, spacing):
    return dict(beta_schedule="linear", prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
                rescale_betas_zero_snr=zsnr, timestep_spacing=spacing, clip_sample=False)


# Where diffusers is right: leading spacing for any step count; trailing and linspace when it divides 1000.
CASES = [("eps", False, "leading", 13, 0.0), ("eps", False, "trailing", 50, 0.0), ("v", True, "trailing", 10, 0.0),
         ("v", True, "trailing", 25, 0.0), ("v", False, "linspace", 1000, 0.0), ("v", True, "leading", 20, 0.0),
         ("eps", False, "leading", 13, 0.5), ("eps", False, "trailing", 50, 1.0), ("v", True, "trailing", 10, 0.5),
         ("v", True, "trailing", 25, 0.5), ("v", True, "leading", 20, 1.0)]


@pytest.mark.parametrize("prediction,zsnr,spacing,steps,eta", CASES)
def test_ddim_matches_diffusers(prediction, zsnr, spacing, steps, eta):
    ref = diffusers.DDIMScheduler(**scheduler_kwargs(prediction, zsnr, spacing), set_alpha_to_one=True)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 6, 6, generator=g)
    noises = [torch.randn(4, 1, 6, 6, generator=g) for _ in range(steps)] if eta > 0 else None
    expected = reference_ddim(ref, x.clone(), eta, noises)
    process = VPDiscrete("linear", zero_terminal_snr=zsnr)
    denoiser = Denoiser(FixedFunction(), process, prediction)
    got = ddim(denoiser, x.clone(), process.sampling_times(steps, spacing), eta=eta,
               noise=ListNoise(noises) if noises else None)
    tol = 1e-5 * max(1.0, steps / 100)  # diffusers steps in float32: its rounding adds up over 1000 steps
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("prediction,steps", [("eps", 1000), ("v", 50), ("eps", 13)])
def test_ddpm_matches_diffusers(prediction, steps):
    """In float64 on both sides: over 1000 eps steps, x0 = (x - sigma * eps) / alpha amplifies float32
    rounding by up to 1 / alpha_999 = 156, and the two float32 loops drift apart by ~1e-3."""
    ref = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False, variance_type="fixed_small",
                                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), dim=0)
    ref.set_timesteps(steps)
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = FixedFunction().double()
    g = torch.Generator().manual_seed(2)
    xr = x.clone()
    with torch.no_grad():
        for t in ref.timesteps:  # diffusers draws noise only for t > 0, as we do before the last step
            xr = ref.step(net(xr, t.double().expand(3)), t, xr, generator=g).prev_sample
    g2 = torch.Generator().manual_seed(2)
    process = VPDiscrete("linear")
    got = ddpm(Denoiser(FixedFunction().double(), process, prediction), x.clone(),
               process.sampling_times(steps, "leading"),
               noise=lambda like: torch.randn(like.shape, generator=g2, dtype=like.dtype))
    torch.testing.assert_close(got, xr, rtol=1e-5, atol=1e-5)


def test_ddim_takes_the_previous_time_from_the_list_where_diffusers_recomputes_it():
    """13 trailing steps: diffusers steps 999 -> 923 (a fixed stride of 76); the list says 922."""
    ref = diffusers.DDIMScheduler(**scheduler_kwargs("v", True, "trailing"))
    ref.set_timesteps(13)
    times = spaced_timesteps(13, "trailing")
    assert times[:2] == [999, 922] and ref.timesteps[0] - ref.config.num_train_timesteps // 13 == 923

    process = VPDiscrete("linear", zero_terminal_snr=True)
    denoiser = Denoiser(FixedFunction(), process, "v")
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    one_step = ddim(denoiser, x, [999, 922])
    # By hand: x_prev = alpha_922 * x0_hat + sigma_922 * eps_hat, with the v read at t = 999 (alpha = 0).
    v = FixedFunction()(x, torch.full((2,), 999.0))
    abar = process.alpha_bar[922].item()
    x0_hat, eps_hat = -v, x  # alpha = 0, sigma = 1: x0 = -v, eps = x
    torch.testing.assert_close(one_step, abar**0.5 * x0_hat + (1 - abar) ** 0.5 * eps_hat)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_parameterizations_round_trip(prediction):
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.rand(5, generator=g) * 0.9 + 0.05
    alpha, sigma = (1 - t, t) if prediction == "flow" else ((1 - t**2).sqrt(), t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    F = training_target(prediction, x0, eps, alpha, sigma)
    x0_hat, eps_hat = from_prediction(prediction, F, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_v_prediction_is_defined_at_zero_terminal_snr():
    F = torch.tensor([[0.3, -1.0]])
    x_t = torch.tensor([[0.5, 2.0]])
    x0, eps = from_prediction("v", F, x_t, torch.tensor([0.0]), torch.tensor([1.0]))
    torch.testing.assert_close(x0, -F)
    torch.testing.assert_close(eps, x_t)


def test_euler_on_rectified_flow_equals_deterministic_ddim():
    """With alpha = 1 - t, sigma = t, the DDIM update is exactly an Euler step of dx/dt = eps - x0."""
    process = RectifiedFlow()
    denoiser = Denoiser(FixedFunction(), process, "flow")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    times = process.sampling_times(9)
    torch.testing.assert_close(euler(denoiser, x, times), ddim(denoiser, x, times), rtol=1e-5, atol=1e-5)


def test_ddpm_is_ddim_with_eta_one():
    process = VPDiscrete("cosine")
    denoiser = Denoiser(FixedFunction(), process, "eps")
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(6))
    times = process.sampling_times(20, "linspace")
    a = ddpm(denoiser, x, times, noise=ImageNoise([1, 2]))
    b = ddim(denoiser, x, times, eta=1.0, noise=ImageNoise([1, 2]))
    assert torch.equal(a, b)


class LabelDenoiser(nn.Module):
    """x0_hat = label-dependent constant image, so guidance can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.process = VPDiscrete("linear")
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, cond):
        base = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
        x0 = torch.stack([base * (2.0 if c >= 0 else 1.0) + (0.5 if c >= 0 else 0.0) for c in cond])
        alpha, sigma = self.process.alpha_sigma(t)
        return x0, (x - alpha[:, None, None, None] * x0) / sigma[:, None, None, None]


def test_guidance_and_rescale_by_hand():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    t, y = torch.tensor([500, 500]), torch.tensor([3, 3])
    d = LabelDenoiser()
    x0_c, _ = d(x, t, y)
    x0_u, _ = d(x, t, torch.tensor([-1, -1]))
    w = 3.0
    cfg = x0_u + w * (x0_c - x0_u)
    x0, eps = Guided(d, w)(x, t, y)
    torch.testing.assert_close(x0, cfg)
    x0_r, eps_r = Guided(d, w, rescale=1.0)(x, t, y)  # phi = 1: the std is exactly that of x0_c
    torch.testing.assert_close(x0_r.std(dim=(1, 2, 3)), x0_c.std(dim=(1, 2, 3)))
    x0_h, _ = Guided(d, w, rescale=0.5)(x, t, y)
    torch.testing.assert_close(x0_h, 0.5 * cfg * x0_c.std() / cfg.std() + 0.5 * cfg)
    alpha, sigma = d.process.alpha_sigma(t)
    torch.testing.assert_close(alpha[0] * x0_r + sigma[0] * eps_r, x)  # the pair stays consistent
    torch.testing.assert_close(Guided(d, 1.0)(x, t, y)[0], x0_c)  # w = 1 is the conditional model


def test_samples_do_not_depend_on_the_batch_split():
    process = VPDiscrete("linear", zero_terminal_snr=True)
    denoiser = Denoiser(FixedFunction(), process, "v")
    labels = torch.arange(6) % 3
    a = sample(denoiser, (1, 4, 4), labels, range(6), sampler="ddpm", steps=8, batch=6)
    b = sample(denoiser, (1, 4, 4), labels, range(6), sampler="ddpm", steps=8, batch=4)
    assert torch.equal(a, b)
