"""Noise schedules and timestep lists against diffusers, the reference implementation."""

import pytest
import torch

from diffuse.process import RectifiedFlow, VPDiscrete, spaced_timesteps

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("zsnr", [False, True])
def test_alpha_bar_matches_diffusers(schedule, zsnr):
    ours = VPDiscrete(schedule, zero_terminal_snr=zsnr)
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], rescale_betas_zero_snr=zsnr,
                                  beta_start=0.00085 if schedule == "scaled_linear" else 0.0001,
                                  beta_end=0.012 if schedule == "scaled_linear" else 0.02)
    torch.testing.assert_close(ours.alpha_bar.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_is_exact_and_keeps_the_first_step(schedule):
    plain, rescaled = VPDiscrete(schedule), VPDiscrete(schedule, zero_terminal_snr=True)
    assert rescaled.alpha_bar[-1].item() == 0.0
    assert rescaled.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-12)
    alpha, sigma = rescaled.alpha_sigma(torch.tensor([999]))
    assert alpha.item() == 0.0 and sigma.item() == 1.0
    assert torch.all(rescaled.alpha_bar[1:] < rescaled.alpha_bar[:-1])  # still decreasing


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 13, 25, 50, 999])
def test_timesteps_match_diffusers_set_timesteps(spacing, steps):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert spaced_timesteps(steps, spacing) == ref.timesteps.tolist()


def test_trailing_starts_at_the_last_step():
    assert spaced_timesteps(10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spaced_timesteps(10, "linspace")[0] == 999
    assert spaced_timesteps(10, "leading")[0] == 900


def test_sampling_times_end_at_the_clean_state():
    vp, flow = VPDiscrete(), RectifiedFlow()
    for process, times in [(vp, vp.sampling_times(7)), (flow, flow.sampling_times(7))]:
        alpha, sigma = process.alpha_sigma(torch.tensor([times[-1]]))
        assert (alpha.item(), sigma.item()) == (1.0, 0.0)
        assert len(times) == 8


def test_flow_alpha_sigma_is_linear_interpolation():
    alpha, sigma = RectifiedFlow().alpha_sigma(torch.tensor([0.0, 0.25, 1.0]))
    assert alpha.tolist() == [1.0, 0.75, 0.0] and sigma.tolist() == [0.0, 0.25, 1.0]
