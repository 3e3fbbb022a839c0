"""DMD and DMD2: distill a trained teacher into a one-step (or few-step) generator.

Three denoisers share the teacher's architecture, process and parameterization:
- real: the teacher, frozen; its x0_hat stands for the data's score;
- fake: a copy of the teacher, trained on the generator's (detached) samples over the whole noise
  range with the teacher's own diffusion loss, so it tracks the score of what the generator makes;
- generator: a copy too, used as G(z, y) = x0_hat(sigma_T z, T, y) at the first time of its sampling
  schedule (several times for a k-step generator, x0_hat noised afresh in between: `sampling.renoise`).

Generator turn (every gen_every-th iteration; Yin et al. 2023, eq. 7; DMD2 code, REFERENCE 1.6):
  t from the middle 96% of a 1000-level time grid, x_t = alpha x + sigma n, without gradient
  p_real = x - x0_real(x_t), p_fake = x - x0_fake(x_t), g = (p_real - p_fake) / mean|p_real| per sample,
  loss = 0.5 MSE(x, sg(x - g)): its gradient on x is g / numel, and no gradient reaches either score net.
  DMD adds a regression loss on the teacher's (noise, image) pairs (the paper's LPIPS; MSE here);
  DMD2 drops it and adds a GAN term softplus(-D(x)), D a head on the fake score's bottleneck.
Fake turn (every iteration): the fake score's diffusion loss on the detached generator samples,
  plus DMD2's classifier loss softplus(D(fake)) + softplus(-D(real)) on detached, noised inputs.
The teacher's weights never change; the generator's loss leaves the fake score (and its head)
untouched, and the fake turn leaves the generator untouched (tests/test_distill.py checks .grad
and bit-equality). Grids, FD and `diffuse sample` use an EMA of the generator (train.ema_halflife_kimg).
With train.precision = "bf16" every forward pass runs under autocast; backward passes, weights,
optimizers and the EMA stay as in fp32.

Under torchrun or accelerate launch each turn's losses are modules (`GeneratorLoss`, `FakeLoss`)
in DistributedDataParallel: every rank draws the whole global batch's randomness and computes its
own block, as `diffuse.train` does, so the student does not depend on the number of ranks.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from diffuse import distributed
from diffuse.checkpoint import (join_optimizer_state, load_denoiser, prune_checkpoints, save_checkpoint,
                                split_optimizer_state)
from diffuse.config import Config
from diffuse.data import load_train_data
from diffuse.denoiser import Denoiser, append_dims
from diffuse.ema import ema_beta, update_ema
from diffuse.errors import Diverged, UserError
from diffuse.files import fsync_path
from diffuse.losses import draw_noise, loss_at
from diffuse.process import EDM
from diffuse.report import write_report
from diffuse.sampling import Guided, ImageNoise, sample
from diffuse.seeding import derive_seed, image_seeds
from diffuse.speed import autocast
from diffuse.train import (append_jsonl, batch_at, crossed, interruption, learning_rate, newest_checkpoint_of_run,
                           resume_config, scaling_of, seed_dropout, silent, stop_requests, timed, training_fd,
                           trim_events, write_config, write_grid)

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


@dataclass
class Distillation:
    real: nn.Module                      # the frozen teacher (wrapped in CFG where real_cfg != 1)
    fake: Denoiser
    generator: Denoiser
    head: GANHead | None                 # DMD2's classifier, when its GAN term is on
    gen_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer      # the fake score and the head
    grid: torch.Tensor                   # (GRID,) ascending times
    times: list                          # the generator's times
    pairs: dict[str, torch.Tensor] | None = None  # DMD: noise "z", "cond", teacher images "x"
    ema: Denoiser = field(init=False)    # the generator's EMA: grids, FD, `diffuse sample`
    gen_loss: nn.Module = field(init=False)   # GeneratorLoss, in DDP under a launcher
    fake_loss: nn.Module = field(init=False)  # FakeLoss, in DDP under a launcher

    def __post_init__(self):
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        unused = hasattr(self.generator.net, "logvar")  # the MP U-Net's log-variance head: no loss here uses it
        self.gen_loss = distributed.wrap(GeneratorLoss(self.generator, self.real, self.fake, self.head), unused)
        # each of the fake turn's passes leaves part of FakeLoss unused: the head, or the decoder
        self.fake_loss = distributed.wrap(FakeLoss(self.fake, self.head), unused or self.head is not None)


def start_distillation(teacher: Denoiser, config: Config, example: torch.Tensor, cond) -> Distillation:
    """Generator and fake score start from the teacher; the teacher is frozen."""
    d, t = config.distill, config.train
    teacher = teacher.eval().requires_grad_(False)
    fake, generator = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    real = Guided(teacher, d.real_cfg, 0.0) if d.real_cfg != 1 else teacher
    head = make_head(fake, example, cond) if d.gan_gen > 0 else None

    def adamw(params):  # DMD2: AdamW (0.9, 0.999), weight decay 0.01
        return torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), weight_decay=0.01)

    fake_params = list(fake.parameters()) + (list(head.parameters()) if head else [])
    return Distillation(real, fake, generator, head, adamw(generator.parameters()), adamw(fake_params),
                        time_grid(teacher.process).to(example.device), generator_times(teacher.process,
                                                                                        d.generator_steps))


def dm_times(dist: Distillation, n: int, config: Config, rng: torch.Generator) -> torch.Tensor:
    d = config.distill
    index = torch.randint(int(d.dm_t_min * GRID), int(d.dm_t_max * GRID), (n,), generator=rng)
    return dist.grid[index.to(dist.grid.device)]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clipped_step(optimizer: torch.optim.Optimizer, params, clip: float) -> float:
    """Clip the gradient norm, step unless it is not finite; returns the norm before clipping."""
    norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf).item()
    if math.isfinite(norm):
        optimizer.step()
    return norm


def simulated_step(dist: Distillation, rng: torch.Generator) -> int:
    """The step (0-based) of a k-step generator to train or sample now, uniform over its k steps (DMD2's
    backward simulation); 0 for a one-step generator."""
    steps = len(dist.times) - 1  # the times end with the clean one
    return int(torch.randint(0, steps, (1,), generator=rng)) if steps > 1 else 0


def normal(shape, like: torch.Tensor, rng: torch.Generator, mine) -> torch.Tensor:
    """This rank's block of a global N(0, I) draw of `shape`: the same numbers on any number of ranks."""
    return torch.randn(shape, generator=rng)[mine].to(like)


def simulated_input(dist: Distillation, z: torch.Tensor, cond, rng: torch.Generator):
    """(x_in, t_in, cond) of this rank's block for the generator's simulated step, from the global
    batch's noise z (B, ...) and conditions (B, ...)."""
    mine = distributed.block(len(z))
    k = simulated_step(dist, rng)
    noises = [normal(z.shape, z, rng, mine) for _ in range(k)]
    cond = None if cond is None else cond[mine]
    return (*generator_input(dist.generator, z[mine], cond, dist.times, k, noises), cond)


def generator_turn(dist: Distillation, z: torch.Tensor, cond, config: Config,
                   rng: torch.Generator) -> tuple[dict, torch.Tensor]:
    """One generator update from the global batch's noise z (B, ...) and conditions; returns its
    losses (this rank's) and this rank's block of the generated x0_hat, detached."""
    d, n, mine = config.distill, len(z), distributed.block(len(z))
    dist.generator.train()
    x_in, t_in, c = simulated_input(dist, z, cond, rng)
    extra = {}
    if dist.pairs is not None:
        index = torch.randint(0, len(dist.pairs["z"]), (n,), generator=rng)[mine]
        p = {key: v[index.to(v.device)] for key, v in dist.pairs.items()}
        x_in_pair, t_in_pair = generator_input(dist.generator, p["z"], p["cond"], dist.times, 0, [])
        extra["pair"] = {"x_in": x_in_pair, "t_in": t_in_pair, "cond": p["cond"], "x": p["x"]}
    t, eps = dm_times(dist, n, config, rng)[mine], normal(z.shape, z, rng, mine)
    if dist.head is not None:
        extra["t_gan"], extra["eps_gan"] = dm_times(dist, n, config, rng)[mine], normal(z.shape, z, rng, mine)
    with autocast(config.train, z.device):  # bf16 forward passes if train.precision asks; backward outside
        losses, x = dist.gen_loss(x_in, t_in, c, t, eps, **extra)
    weights = {"dm": 1.0, "regression": d.regression, "gan_gen": d.gan_gen}
    total = sum(weights[key] * value for key, value in losses.items())
    dist.gen_opt.zero_grad(set_to_none=True)
    total.backward(inputs=list(dist.generator.parameters()))  # the score networks get no .grad at all
    norm = clipped_step(dist.gen_opt, dist.generator.parameters(), config.train.grad_clip)
    dist.gen_opt.zero_grad(set_to_none=True)
    return {key: weights[key] * v.item() for key, v in losses.items()} | {"gen_grad_norm": norm}, x


def fake_turn(dist: Distillation, x_gen: torch.Tensor, x_real, cond, config: Config, rng: torch.Generator) -> dict:
    """One update of the fake score (and the GAN head) on this rank's block x_gen of the generator's
    samples (detached here), with the global batch's real images x_real (B, ...) and conditions."""
    x_gen = x_gen.detach()
    shape = (len(x_gen) * distributed.size(), *x_gen.shape[1:])  # the global batch: it splits evenly
    mine = distributed.block(shape[0])
    c = None if cond is None else cond[mine]
    t, eps = draw_noise(dist.fake.process, torch.empty(shape, device=x_gen.device), rng)
    dist.fake.train()
    dist.fake_opt.zero_grad(set_to_none=True)
    with autocast(config.train, x_gen.device):
        loss = dist.fake_loss(x_gen, c, t[mine], eps[mine]).mean()  # the teacher's own loss and training density
    loss.backward()
    out = {"fake": loss.item()}
    if dist.head is not None:  # generator samples, then real ones: 2B draws, this rank takes its block of each
        index = torch.cat([torch.arange(shape[0])[mine], shape[0] + torch.arange(shape[0])[mine]])
        t_gan = dm_times(dist, 2 * shape[0], config, rng)[index.to(dist.grid.device)]
        eps_gan = normal((2 * shape[0], *shape[1:]), x_gen, rng, index)
        # one pass over both halves: the MP U-Net renormalizes its weights once per training pass
        with autocast(config.train, x_gen.device):
            logits = dist.fake_loss(torch.cat([x_gen, x_real[mine]]), None if c is None else torch.cat([c, c]),
                                    t_gan, eps_gan, gan=True)
        n = len(x_gen)
        disc = config.distill.gan_disc * (F.softplus(logits[:n]).mean() + F.softplus(-logits[n:]).mean())
        disc.backward()
        out["gan_disc"] = disc.item()
    params = [p for group in dist.fake_opt.param_groups for p in group["params"]]
    out["fake_grad_norm"] = clipped_step(dist.fake_opt, params, config.train.grad_clip)
    dist.fake_opt.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def sample_generator(dist: Distillation, z: torch.Tensor, cond, config: Config,
                     rng: torch.Generator) -> torch.Tensor:
    """This rank's block of generator samples, without gradient, for an iteration without a generator
    turn; for a k-step generator the x0_hat of a step drawn as in the generator's turn."""
    dist.generator.eval()
    x_in, t_in, c = simulated_input(dist, z, cond, rng)
    with autocast(config.train, z.device):
        return dist.generator(x_in, t_in, c)[0]


# ---------------------------------------------------------------------------------------------
# The run: like `diffuse.train.train`, with three networks.


def distill(config: Config, teacher_dir: Path, run_dir: Path, device: str | torch.device = "cpu",
            progress: bool | None = None, log=print) -> Path:
    """Distill (or resume distilling) the teacher run into the student run in `run_dir`.

    Under a launcher every rank runs this loop on its block of the global batch, as `train` does:
    all the randomness is drawn for the whole batch, DDP averages each network's gradients, rank 0
    alone writes the run directory."""
    run_dir, t, d = Path(run_dir), config.train, config.distill
    main = distributed.is_main()
    progress = main and (sys.stderr.isatty() if progress is None else progress)
    log = log if main else silent
    config = resume_config(run_dir, config)
    distributed.check_batch(t.batch)
    if t.threads:
        torch.set_num_threads(t.threads)
    _, teacher = load_denoiser(Path(teacher_dir), "ema", device)
    data = load_train_data(config.data, scaling_of(config), seed=t.seed)
    distributed.barrier()  # every rank has read the run directory before rank 0 writes to it
    if main:
        write_config(run_dir, config)
    data.x, data.y, data.cond = data.x.to(device), data.y.to(device), data.cond.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(t.seed, "init"))
        dist = start_distillation(teacher, config, data.x[:1], data.cond[:1])
    if d.regression > 0:
        dist.pairs = teacher_pairs(run_dir, teacher, config, data, log)
    nimg = restore(run_dir, dist, log)
    log(f"distilling {teacher_dir} ({d.method}, {d.generator_steps}-step generator): "
        f"{'resuming at' if nimg else 'starting at'} {nimg / 1000:g} kimg of {t.kimg:g}")

    total, metrics = round(t.kimg * 1000), run_dir / "metrics.jsonl"
    if main:
        trim_events(metrics, nimg)
    window: dict[str, list[float]] = {}
    seconds = 0.0
    bar = tqdm(total=total, initial=min(nimg, total), unit="img", desc="distilling", disable=not progress)
    with stop_requests() as stop:
        while nimg < total:
            start = time.perf_counter()
            step = nimg // t.batch
            rng = torch.Generator().manual_seed(derive_seed(t.seed, "distill", step))
            seed_dropout(derive_seed(t.seed, "dropout", step))
            x_real, cond, _ = batch_at(data, step, t.batch, t.seed)
            z = torch.randn(x_real.shape, generator=rng).to(x_real)
            lr = learning_rate(t, nimg)
            set_lr(dist.gen_opt, lr)
            set_lr(dist.fake_opt, lr)
            out = {}
            if step % d.gen_every == 0:
                out, x_gen = generator_turn(dist, z, cond, config, rng)
            else:
                x_gen = sample_generator(dist, z, cond, config, rng)
            out |= fake_turn(dist, x_gen, x_real, cond, config, rng)
            out = distributed.mean(out, x_real.device)  # each rank's losses are its block's
            if not all(math.isfinite(v) for v in out.values()):
                raise Diverged(f"step {step + 1} had non-finite losses {out}; the newest checkpoint holds the last "
                               "good state; lower train.lr.")
            update_ema(dist.ema, dist.generator, ema_beta(nimg, t.batch, t.ema_halflife_kimg, t.ema_rampup))
            for key, value in out.items():
                window.setdefault(key, []).append(value)
            seconds += time.perf_counter() - start
            before, nimg = nimg, nimg + t.batch
            where = {"step": step + 1, "kimg": nimg / 1000}
            bar.update(t.batch)
            done = nimg >= total
            stopping = distributed.agree(stop.requested, device)  # read once: a later signal waits a step
            fd_due = t.fd_kimg > 0 and (crossed(before, nimg, t.fd_kimg) or done)
            logged = main and (crossed(before, nimg, t.log_kimg) or done)
            if logged:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                images = len(window["fake"]) * t.batch
                append_jsonl(metrics, {"event": "train", **where, "lr": lr, "loss": means["fake"],
                                       **{k if k.endswith("grad_norm") else f"loss_{k}": v for k, v in means.items()},
                                       "img_per_s": images / max(seconds, 1e-9), "train_seconds": seconds})
                window, seconds = {}, 0.0
            if main and (crossed(before, nimg, t.grid_kimg) or done):
                path = run_dir / "samples" / f"grid-{nimg // 1000:06d}kimg.png"
                append_jsonl(metrics, {"event": "grid", **where, "seconds": timed(write_grid, dist.ema, config,
                                                                                  data, path)})
            fd = training_fd(dist.ema, config, data) if fd_due else None  # on every rank: each samples its block
            if fd and main:
                append_jsonl(metrics, {"event": "fd", **where, **fd})
            if main and (crossed(before, nimg, t.checkpoint_kimg) or done or fd or stopping):
                save(run_dir, step + 1, nimg, config, dist, fd and fd["fd"])
            if logged:
                write_report(run_dir)
            if stopping and not done:
                bar.close()
                raise interruption(stopping, nimg)
    bar.close()
    return run_dir


def teacher_pairs(run_dir: Path, teacher: Denoiser, config: Config, data, log) -> dict[str, torch.Tensor]:
    """DMD's regression pairs: noise z, conditions and the teacher's deterministic samples from z,
    drawn once with the teacher's sampler (eta 0, no churn) and kept in RUN/pairs.safetensors."""
    path = run_dir / "pairs.safetensors"
    if path.is_file():
        pairs = load_file(path)
    else:
        d, device = config.distill, data.x.device
        start = time.perf_counter()
        index = torch.randperm(len(data.cond), generator=torch.Generator().manual_seed(derive_seed(
            config.train.seed, "pairs")))[:d.pairs]
        cond = data.cond[index.to(device)]
        seeds = image_seeds(derive_seed(config.train.seed, "pairs"), d.pairs)
        shape = tuple(data.x.shape[1:])
        settings = {**config.sample.sampler_args(), "sampler": "heun" if isinstance(teacher.process, EDM) else "ddim",
                    "steps": d.pair_steps, "eta": 0.0, "S_churn": 0.0, "cfg": d.real_cfg}
        mine = distributed.block(d.pairs)  # each rank samples its block of the pairs
        x = distributed.gather(sample(teacher, shape, cond[mine], seeds[mine], **settings), d.pairs)
        z = ImageNoise(seeds)(torch.empty((len(seeds), *shape)))
        pairs = {"z": z, "cond": cond.cpu(), "x": x.cpu()}
        if distributed.is_main():
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.contiguous() for k, v in pairs.items()}, tmp)
            fsync_path(tmp)
            tmp.replace(path)
        log(f"teacher pairs: {d.pairs} samples of {settings['steps']} {settings['sampler']} steps "
            f"({time.perf_counter() - start:.0f} s)")
    return {k: v.to(data.x.device) for k, v in pairs.items()}


def save(run_dir: Path, step: int, nimg: int, config: Config, dist: Distillation, fd: float | None) -> None:
    """Checkpoint: the generator as `model`, its EMA as `ema` (what `diffuse sample` reads), the fake
    score, the head and both optimizers."""
    for name, module in (("generator", dist.generator), ("generator EMA", dist.ema), ("fake score", dist.fake)):
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise Diverged(f"the {name} weights at step {step} are not finite; no checkpoint was written; lower "
                           "train.lr.")
    gen_opt, gen_rest = split_optimizer_state(dist.gen_opt.state_dict())
    fake_opt, fake_rest = split_optimizer_state(dist.fake_opt.state_dict())
    tensors = {"model": dist.generator.net.state_dict(), "ema": dist.ema.net.state_dict(),
               "optimizer": gen_opt, "fake": dist.fake.net.state_dict(), "fake_optimizer": fake_opt}
    if dist.head is not None:
        tensors["head"] = dist.head.state_dict()
    state = {"step": step, "nimg": nimg, "optimizer": gen_rest, "fake_optimizer": fake_rest}
    save_checkpoint(run_dir, step, config, tensors, state | ({"fd": fd} if fd is not None else {}))
    prune_checkpoints(run_dir, config.train.keep_checkpoints)


def restore(run_dir: Path, dist: Distillation, log) -> int:
    """Load the newest whole checkpoint of the student run, if any; returns the images seen."""
    found = newest_checkpoint_of_run(run_dir, log)
    if found is None:
        return 0
    path, tensors, state = found
    try:
        dist.generator.net.load_state_dict(tensors["model"])
        dist.ema.net.load_state_dict(tensors["ema"])
        dist.fake.net.load_state_dict(tensors["fake"])
        if dist.head is not None:
            dist.head.load_state_dict(tensors["head"])
        dist.gen_opt.load_state_dict(join_optimizer_state(tensors["optimizer"], state["optimizer"]))
        dist.fake_opt.load_state_dict(join_optimizer_state(tensors["fake_optimizer"], state["fake_optimizer"]))
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path} does not fit the student its config describes "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); move it away.") from None
    return state["nimg"]


def student_config(teacher: Config, distill_settings: Config, teacher_dir: Path) -> Config:
    """The teacher's data, process and model with the distillation's [distill], [train], [sample]."""
    config = copy.deepcopy(teacher)
    config.distill, config.train, config.sample = (copy.deepcopy(distill_settings.distill),
                                                   copy.deepcopy(distill_settings.train),
                                                   copy.deepcopy(distill_settings.sample))
    config.distill.teacher = str(teacher_dir)
    config.train.probe_kimg = 0.0  # the probe watches a denoiser in training; the generator is not one
    return config
