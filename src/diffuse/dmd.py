"""DMD and DMD2's losses (Yin et al. 2023, 2024): the time grid, the generator's input, the
distribution-matching gradient, DMD2's GAN head, and each turn's losses as modules DDP can wrap.

Three denoisers share the teacher's architecture, process and parameterization:
- real: the teacher, frozen; its x0_hat stands for the data's score;
- fake: a copy of the teacher, trained on the generator's (detached) samples over the whole noise
  range with the teacher's own diffusion loss, so it tracks the score of what the generator makes;
- generator: a copy too, used as G(z, y) = x0_hat(sigma_T z, T, y) at the first time of its sampling
  schedule (several times for a k-step generator, x0_hat noised afresh in between: `sampling.renoise`).

Generator turn (Yin et al. 2023, eq. 7; DMD2 code, REFERENCE 1.6):
  t from the middle 96% of a 1000-level time grid, x_t = alpha x + sigma n, without gradient
  p_real = x - x0_real(x_t), p_fake = x - x0_fake(x_t), g = (p_real - p_fake) / mean|p_real| per sample,
  loss = 0.5 MSE(x, sg(x - g)): its gradient on x is g / numel, and no gradient reaches either score net.
  DMD adds a regression loss on the teacher's (noise, image) pairs (the paper's LPIPS; MSE here);
  DMD2 drops it and adds a GAN term softplus(-D(x)), D a head on the fake score's bottleneck.
Fake turn: the fake score's diffusion loss on the detached generator samples, plus DMD2's
  classifier loss softplus(D(fake)) + softplus(-D(real)) on detached, noised inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.denoiser import Denoiser, append_dims
from diffuse.losses import loss_at

GRID = 1000  # noise levels of the DM loss's time grid, from the cleanest to pure noise


# ---------------------------------------------------------------------------------------------
# The pieces: time grid, generator, the two losses of each turn.


def time_grid(process) -> torch.Tensor:
    """The process's GRID sampling times (GRID,), ascending from the cleanest to pure noise: the
    timestep indices of DMD2's grid (for EDM its Karras grid flipped, for VP the 1000 DDPM steps)."""
    return torch.tensor(process.sampling_times(GRID, "trailing")[-2::-1])


def generator_times(process, steps: int) -> list:
    """The generator's times, noisiest first, then the clean end (4 steps of VP: 999, 749, 499, 249, -1)."""
    return process.sampling_times(steps, "trailing")


def generator_input(generator: Denoiser, z: torch.Tensor, cond, times: list, k: int,
                    noises: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's input x (B, ...) and time (B,) at step k (0-based) from noise z (B, ...): steps
    0..k-1 run without gradient (backward simulation, DMD2), each x0_hat noised afresh to the next
    time with noises[i] (B, ...)."""
    def at(t):
        return torch.full((len(z),), t, device=z.device)

    sigma = generator.process.alpha_sigma(at(times[0])[:1])[1].item()
    x = sigma * z  # x_T = alpha_T * 0 + sigma_T * z, as `sampling.sample` starts
    training = generator.training
    with torch.no_grad():
        generator.eval()
        for i in range(k):
            x0 = generator(x, at(times[i]), cond)[0]
            alpha, sigma = (s.item() for s in generator.process.alpha_sigma(at(times[i + 1])[:1]))
            x = alpha * x0 + sigma * noises[i]
    generator.train(training)
    return x, at(times[k])


def noise_at(process, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    alpha, sigma = process.alpha_sigma(t)
    return append_dims(alpha, x) * x + append_dims(sigma, x) * eps


@torch.no_grad()
def dm_gradient(real: nn.Module, fake: Denoiser, x: torch.Tensor, cond, t: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient g (B, ...) at generator samples x (B, ...), noised to t (B,)
    with eps: (p_real - p_fake) / mean|p_real| per sample; no gradient flows anywhere."""
    x_t = noise_at(fake.process, x, t, eps)
    p_real = x - real(x_t, t, cond)[0]
    p_fake = x - fake(x_t, t, cond)[0]
    # g = (p_real - p_fake) / mean_{C,H,W} |p_real|
    g = (p_real - p_fake) / p_real.abs().flatten(1).mean(1).reshape(-1, *[1] * (x.ndim - 1))
    return torch.nan_to_num(g)


def dm_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """0.5 MSE(x, sg(x - g)): its gradient on x is g / x.numel(), its value 0.5 mean(g^2)."""
    return 0.5 * F.mse_loss(x, (x - g).detach())


class GANHead(nn.Module):
    """DMD2's classifier on the fake score's bottleneck features: (B, C, h, w) or (B, C) -> logits (B,)."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        groups = math.gcd(32, channels)
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                      nn.SiLU())
        else:
            self.body = nn.Sequential(nn.Linear(channels, channels), nn.SiLU())
        self.out = nn.Linear(channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.body(h.float())
        h = h.mean(dim=(2, 3)) if h.ndim == 4 else h
        return self.out(h)[:, 0].float()  # float32 logits under bf16 autocast too


def bottleneck(fake: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The fake score's bottleneck features for the noisy x_t (B, ...), read by a hook in a forward pass."""
    captured = []
    hook = fake.net.bottleneck.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        fake.raw(x_t, t, cond)
    finally:
        hook.remove()
    return captured[0]


def bottleneck_logits(fake: Denoiser, head: GANHead, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The head's logits (B,) on the fake score's bottleneck for the noisy x_t (B, ...)."""
    return head(bottleneck(fake, x_t, t, cond))


@torch.no_grad()
def make_head(fake: Denoiser, example: torch.Tensor, cond) -> GANHead:
    """A GAN head sized to the fake score's bottleneck, found by one forward pass on `example` (1, ...)."""
    fake.eval()
    h = bottleneck(fake, example, time_grid(fake.process)[GRID // 2].expand(1).to(example.device), cond)
    return GANHead(h.shape[1], spatial=h.ndim == 4).to(example.device)


# ---------------------------------------------------------------------------------------------
# One iteration: the generator's turn, then the fake score's.


class GeneratorLoss(nn.Module):
    """The generator turn's unweighted losses on this rank's block, as a module DDP can wrap.

    It holds the generator alone: the frozen teacher, the fake score and its head sit in a tuple
    outside the module tree, so DDP neither syncs them nor waits for their gradients.
    """

    def __init__(self, generator: Denoiser, real: nn.Module, fake: Denoiser, head: GANHead | None):
        super().__init__()
        self.generator = generator
        self.scores = (real, fake, head)

    def forward(self, x_in, t_in, cond, t, eps, pair=None, t_gan=None, eps_gan=None):
        """x_in, t_in: the generator's inputs; t, eps: the DM loss's noise; pair: DMD's teacher pairs
        ("x_in", "t_in", "cond", "x"); t_gan, eps_gan: the GAN term's noise. Returns (losses, x0_hat)."""
        real, fake, head = self.scores
        n = len(x_in)
        if pair is None:
            x = self.generator(x_in, t_in, cond)[0]
        else:  # one training pass for both: the MP U-Net renormalizes its weights once per pass
            both = self.generator(torch.cat([x_in, pair["x_in"]]), torch.cat([t_in, pair["t_in"]]),
                                  None if cond is None else torch.cat([cond, pair["cond"]]))[0]
            x, x_pair = both[:n], both[n:]
        fake.eval()
        g = dm_gradient(real, fake, x, cond, t, eps)
        losses = {"dm": dm_loss(x, g)}
        if pair is not None:
            losses["regression"] = F.mse_loss(x_pair, pair["x"])
        if head is not None:
            x_t = noise_at(fake.process, x, t_gan, eps_gan)
            losses["gan_gen"] = F.softplus(-bottleneck_logits(fake, head, x_t, t_gan, cond)).mean()
        return losses, x.detach()


class FakeLoss(nn.Module):
    """The fake turn's two passes on this rank's block, as a module DDP can wrap (the fake score and
    the GAN head): the fake score's per-sample diffusion loss on generator samples, or (gan=True)
    the head's logits on noised samples from the fake score's bottleneck.

    Each pass is followed by its own backward (DDP needs a backward after every forward, and the MP
    U-Net renormalizes its weights in every training pass); the classifier's backward stops at the
    bottleneck, so the decoder costs it nothing.
    """

    def __init__(self, fake: Denoiser, head: GANHead | None):
        super().__init__()
        self.fake, self.head = fake, head

    def forward(self, x, cond, t, eps, gan: bool = False) -> torch.Tensor:
        if not gan:
            return loss_at(self.fake, x, cond, t, eps)
        return bottleneck_logits(self.fake, self.head, noise_at(self.fake.process, x, t, eps), t, cond)
