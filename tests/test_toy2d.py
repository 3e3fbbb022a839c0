"""End to end on a mixture of Gaussians, where the true distribution is known exactly."""

import pytest
import torch

from diffuse.checkpoint import load_denoiser
from diffuse.config import load_config
from diffuse.data import toy2d_mixture
from diffuse.sampling import sample
from diffuse.training import train


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """A v-prediction VP run and a rectified-flow run, each trained briefly."""
    runs = {}
    for name, overrides in {"vp": [], "flow": ["diffusion.process=flow", "diffusion.prediction=flow",
                                               "sample.sampler=euler"]}.items():
        config = load_config("toy2d", overrides=overrides)
        runs[name] = train(config, tmp_path_factory.mktemp(name), log=lambda *a: None)
    return runs


def mode_report(points: torch.Tensor):
    """(index of the nearest mode, distance to it in units of the mode's std) per point."""
    means, std = toy2d_mixture()
    d = torch.cdist(points.float(), means)
    dist, nearest = d.min(dim=1)
    return nearest, dist / std


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_unconditional_samples_cover_every_mode(toy_runs, kind):
    config, denoiser = load_denoiser(toy_runs[kind])
    x = sample(denoiser, (2,), torch.full((4000,), -1), range(4000), **config.sample.sampler_args())
    nearest, dist = mode_report(x)
    share = torch.bincount(nearest, minlength=8) / len(x)
    assert share.min() > 0.08, f"a mode is missed: {share.tolist()}"  # 1/8 = 0.125 each when exact
    # exact samples: 98.9% within 3 std of their mode; the null condition sees 30% of a short run
    assert (dist < 3).float().mean() > 0.75, f"samples off the modes: median {dist.median():.2f} std"


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_conditional_samples_land_on_their_mode(toy_runs, kind):
    config, denoiser = load_denoiser(toy_runs[kind])
    labels = torch.arange(800) % 8
    x = sample(denoiser, (2,), labels, range(800), **config.sample.sampler_args())
    nearest, dist = mode_report(x)
    assert (nearest == labels).float().mean() > 0.98
    assert (dist < 3).float().mean() > 0.95
