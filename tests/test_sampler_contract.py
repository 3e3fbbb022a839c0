"""One contract over every registered sampler and every process it suits: a sampler added to
`SAMPLERS` gets each check by being registered.

Checks, through `sample()` with a small deterministic net: the output's shape and dtype; the same seeds
give the same images and other seeds other images; splitting into batches changes no image (bit-equal);
image i depends only on its own seed and condition; sampling starts at x_T = sigma_T * eps at times[0]
(the first net input is c_in x_T, with default settings: heun's churn raises the noise before
its first evaluation); the network evaluations counted on the net equal the
record's `evaluations(times, process)` per image, twice that with guidance; guidance with rescale gives
finite images.
"""

import math

import pytest
import torch
from torch import nn

from diffuse.denoiser import Denoiser, input_scale
from diffuse.process import EDM, RectifiedFlow, VPDiscrete
from diffuse.sampling import SAMPLERS, ImageNoise, sample

PROCESSES = {"vp": (lambda: VPDiscrete("linear", zero_terminal_snr=True), "v"),
             "flow": (RectifiedFlow, "x0"), "edm": (EDM, "edm")}
# Non-default values of the settings a record names; samplers that name none run with defaults only.
SET = {"eta": 0.6, "S_churn": 3.0, "S_min": 0.0, "S_max": math.inf, "S_noise": 1.007}
SHAPE, LABELS, SEEDS = (1, 3, 3), torch.tensor([0, 1, -1, 2, 1]), [11, 3, 7, 29, 5]


class Net(nn.Module):
    """Smooth in x, the net time and the label, never constant over an image (guidance rescale divides
    by the image's std); remembers its first input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.first = None

    def forward(self, x, t, cond=None):
        if self.first is None:
            self.first = (x.clone(), t.clone())
        shift = 0.1 * cond.float().clamp(min=-1).reshape(-1, *[1] * (x.ndim - 1))
        return torch.tanh(self.scale * x + t.reshape(-1, *[1] * (x.ndim - 1)).float() / 1000 + shift) + 0.05 * x


def cases():
    for name, record in SAMPLERS.items():
        for kind, (make, _) in PROCESSES.items():
            if record.processes is None or isinstance(make(), record.processes):
                yield pytest.param(name, kind, {}, id=f"{name}-{kind}")
                if record.settings:
                    yield pytest.param(name, kind, {k: SET[k] for k in record.settings}, id=f"{name}-{kind}-set")


CASES = list(cases())
PLAIN = [case for case in CASES if not case.values[2]]  # defaults: heun's churn would move the first evaluation


def draw(name, kind, settings, steps=5, cond=LABELS, seeds=SEEDS, batch=256, net=None, **kw):
    make, prediction = PROCESSES[kind]
    denoiser = Denoiser(net or Net(), make(), prediction)
    return sample(denoiser, SHAPE, cond, seeds, sampler=name, steps=steps, batch=batch, **settings, **kw)


@pytest.mark.parametrize("name,kind,settings", CASES)
def test_shape_dtype_and_seeds(name, kind, settings):
    x = draw(name, kind, settings)
    assert x.shape == (len(SEEDS), *SHAPE) and x.dtype == torch.float32
    assert x.isfinite().all()
    assert torch.equal(x, draw(name, kind, settings))
    other = draw(name, kind, settings, seeds=[s + 100 for s in SEEDS])
    assert not torch.isclose(x, other).all(dim=(1, 2, 3)).any()  # every image changes with its seed


@pytest.mark.parametrize("name,kind,settings", CASES)
def test_batches_and_neighbours_change_no_image(name, kind, settings):
    x = draw(name, kind, settings)
    assert torch.equal(draw(name, kind, settings, batch=2), x)
    for i in (0, 3):
        alone = draw(name, kind, settings, cond=LABELS[i:i + 1], seeds=SEEDS[i:i + 1])
        assert torch.equal(alone[0], x[i])


@pytest.mark.parametrize("name,kind,settings", PLAIN)
def test_starts_at_sigma_T_eps(name, kind, settings):
    net = Net()
    draw(name, kind, settings, net=net)
    make, prediction = PROCESSES[kind]
    process = make()
    t0 = process.sampling_times(5)[0]
    alpha, sigma = process.alpha_sigma(torch.tensor([t0]))
    x_T = sigma.item() * ImageNoise(SEEDS)(torch.empty(len(SEEDS), *SHAPE))
    c_in = input_scale(prediction, alpha, sigma, 0.5).float()  # what the net sees is c_in x_t
    seen, t_seen = net.first
    assert torch.equal(seen, c_in * x_T)
    assert torch.equal(t_seen, process.net_time(torch.full((len(SEEDS),), t0)))


@pytest.mark.parametrize("steps", [1, 2, 6])
@pytest.mark.parametrize("name,kind,settings", CASES)
def test_evaluations_are_counted_on_the_net(name, kind, settings, steps):
    make, _ = PROCESSES[kind]
    process = make()
    expected = SAMPLERS[name].evaluations(process.sampling_times(steps), process)
    for cfg, per_image in [(1.0, expected), (2.5, 2 * expected)]:
        net, images = Net(), []
        net.register_forward_hook(lambda module, args, out, images=images: images.append(len(args[0])))
        draw(name, kind, settings, steps=steps, net=net, cfg=cfg)
        assert sum(images) == per_image * len(SEEDS), (cfg, images)


@pytest.mark.parametrize("name,kind,settings", CASES)
def test_guidance_with_rescale_is_finite(name, kind, settings):
    x = draw(name, kind, settings, cfg=3.0, rescale=0.7)
    assert x.shape == (len(SEEDS), *SHAPE) and x.isfinite().all()
    assert not torch.equal(x, draw(name, kind, settings))  # guidance did act


def test_every_sampler_is_checked_on_some_process():
    assert {case.values[0] for case in CASES} == set(SAMPLERS)
