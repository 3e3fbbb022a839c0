"""DMD and DMD2: distill a trained teacher into a one-step (or few-step) generator, as a job of the run shell.

The losses are `diffuse.dmd`'s. An iteration is the generator's turn (every gen_every-th) and the
fake score's turn (every one). The teacher's weights never change; the generator's loss leaves
the fake score (and its head) untouched, and the fake turn leaves the generator untouched
(tests/test_distill.py checks .grad and bit-equality). Grids, FD and `diffuse sample` use an EMA
of the generator (train.ema_halflife_kimg). With train.precision = "bf16" every forward pass runs
under autocast; backward passes, weights, optimizers and the EMA stay as in fp32.

Under torchrun or accelerate launch each turn's losses are modules (`GeneratorLoss`, `FakeLoss`)
in DistributedDataParallel: every rank draws the whole global batch's randomness and computes its
own block, as `diffuse.training` does, so the student does not depend on the number of ranks.
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

from diffuse import distributed
from diffuse.checkpoint import (
    join_optimizer_state,
    load_denoiser,
    split_optimizer_state,
)
from diffuse.config import Config
from diffuse.data import TrainData, dataset
from diffuse.denoiser import Denoiser
from diffuse.dmd import (
    GRID,
    FakeLoss,
    GANHead,
    GeneratorLoss,
    generator_input,
    generator_times,
    make_head,
    time_grid,
)
from diffuse.ema import ema_beta, update_ema
from diffuse.files import fsync_path
from diffuse.losses import draw_noise
from diffuse.process import EDM
from diffuse.run import claimed, drive, load_data, resolve_precision, restore, resume_config, silent, write_config
from diffuse.sampling import Guided, ImageNoise, sample
from diffuse.seeding import derive_seed, image_seeds
from diffuse.speed import autocast
from diffuse.training import seed_dropout


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

    config: Config | None = None        # the student's
    phema = None                         # the run shell's job contract: no power EMA, no probe
    probe = None

    def __post_init__(self):
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.probed = self.generator
        unused = hasattr(self.generator.net, "logvar")  # the MP U-Net's log-variance head: no loss here uses it
        self.gen_loss = distributed.wrap(GeneratorLoss(self.generator, self.real, self.fake, self.head), unused)
        # each of the fake turn's passes leaves part of FakeLoss unused: the head, or the decoder
        self.fake_loss = distributed.wrap(FakeLoss(self.fake, self.head), unused or self.head is not None)

    def step(self, step: int, lr: float, x_real: torch.Tensor, cond: torch.Tensor) -> dict[str, float]:
        """One iteration on global batch `step`, of which x_real and cond are this rank's block: the
        generator's turn (every gen_every-th) or a sample of it, the fake score's turn, then the
        generator's EMA. A turn whose loss or gradient is not finite applies no update
        (`clipped_step`); the EMA then waits for a finite iteration."""
        config, t = self.config, self.config.train
        rng = torch.Generator().manual_seed(derive_seed(t.seed, "distill", step))
        seed_dropout(derive_seed(t.seed, "dropout", step))
        z = torch.randn((t.batch, *x_real.shape[1:]), generator=rng).to(x_real)  # the global batch's noise
        set_lr(self.gen_opt, lr)
        set_lr(self.fake_opt, lr)
        out = {}
        if step % config.distill.gen_every == 0:
            out, x_gen = generator_turn(self, z, cond, config, rng)
        else:
            x_gen = sample_generator(self, z, cond, config, rng)
        out |= fake_turn(self, x_gen, x_real, cond, config, rng)
        out = distributed.mean(out, x_real.device)  # each rank's losses are its block's
        if all(math.isfinite(v) for v in out.values()):  # beta of the images seen before this iteration
            update_ema(self.ema, self.generator, ema_beta(step * t.batch, t.batch, t.ema_halflife_kimg, t.ema_rampup))
        return {"loss": out["fake"]} | {k if k.endswith("grad_norm") else f"loss_{k}": v for k, v in out.items()}

    def current_ema(self) -> Denoiser:
        return self.ema

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "generator EMA": self.ema, "fake score": self.fake}

    def state(self) -> tuple[dict, dict]:
        """The generator as `model`, its EMA as `ema` (what `diffuse sample` reads), the fake score, the
        head and both optimizers."""
        gen_opt, gen_rest = split_optimizer_state(self.gen_opt.state_dict())
        fake_opt, fake_rest = split_optimizer_state(self.fake_opt.state_dict())
        tensors = {"model": self.generator.net.state_dict(), "ema": self.ema.net.state_dict(),
                   "optimizer": gen_opt, "fake": self.fake.net.state_dict(), "fake_optimizer": fake_opt}
        if self.head is not None:
            tensors["head"] = self.head.state_dict()
        return tensors, {"optimizer": gen_rest, "fake_optimizer": fake_rest}

    def restore(self, tensors: dict, state: dict) -> None:
        self.generator.net.load_state_dict(tensors["model"])
        self.ema.net.load_state_dict(tensors["ema"])
        self.fake.net.load_state_dict(tensors["fake"])
        if self.head is not None:
            self.head.load_state_dict(tensors["head"])
        self.gen_opt.load_state_dict(join_optimizer_state(tensors["optimizer"], state["optimizer"]))
        self.fake_opt.load_state_dict(join_optimizer_state(tensors["fake_optimizer"], state["fake_optimizer"]))


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
                                                                                        d.generator_steps),
                        config=config)


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
    batch's noise z (B, ...) and this rank's block of its conditions."""
    mine = distributed.block(len(z))
    k = simulated_step(dist, rng)
    noises = [normal(z.shape, z, rng, mine) for _ in range(k)]
    return (*generator_input(dist.generator, z[mine], cond, dist.times, k, noises), cond)


def generator_turn(dist: Distillation, z: torch.Tensor, cond, config: Config,
                   rng: torch.Generator) -> tuple[dict, torch.Tensor]:
    """One generator update from the global batch's noise z (B, ...) and this rank's conditions; returns its
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
    with autocast(config.train.precision, z.device):  # bf16 forward passes where it says so; backward outside
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
    samples (detached here), with this rank's block of the real images x_real and of the conditions."""
    x_gen, c = x_gen.detach(), cond
    shape = (len(x_gen) * distributed.size(), *x_gen.shape[1:])  # the global batch: it splits evenly
    mine = distributed.block(shape[0])
    t, eps = draw_noise(dist.fake.process, torch.empty(shape, device=x_gen.device), rng)
    dist.fake.train()
    dist.fake_opt.zero_grad(set_to_none=True)
    with autocast(config.train.precision, x_gen.device):
        loss = dist.fake_loss(x_gen, c, t[mine], eps[mine]).mean()  # the teacher's own loss and training density
    loss.backward()
    out = {"fake": loss.item()}
    if dist.head is not None:  # generator samples, then real ones: 2B draws, this rank takes its block of each
        index = torch.cat([torch.arange(shape[0])[mine], shape[0] + torch.arange(shape[0])[mine]])
        t_gan = dm_times(dist, 2 * shape[0], config, rng)[index.to(dist.grid.device)]
        eps_gan = normal((2 * shape[0], *shape[1:]), x_gen, rng, index)
        # one pass over both halves: the MP U-Net renormalizes its weights once per training pass
        with autocast(config.train.precision, x_gen.device):
            logits = dist.fake_loss(torch.cat([x_gen, x_real]), None if c is None else torch.cat([c, c]),
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
    with autocast(config.train.precision, z.device):
        return dist.generator(x_in, t_in, c)[0]


# ---------------------------------------------------------------------------------------------
# The run: the run shell drives a `Distillation` as it drives `training.Training`.


def distill(config: Config, teacher_dir: Path, run_dir: Path, device: str | torch.device = "cpu",
            progress: bool | None = None, log=print) -> Path:
    """Distill (or resume distilling) the teacher run into the student run in `run_dir`.

    Under a launcher every rank runs this loop on its block of the global batch, as `train` does:
    all the randomness is drawn for the whole batch, DDP averages each network's gradients, rank 0
    alone writes the run directory."""
    run_dir, main = Path(run_dir), distributed.is_main()
    progress = main and (sys.stderr.isatty() if progress is None else progress)
    log = log if main else silent
    with claimed(run_dir, "distill"):
        config = resume_config(run_dir, config)
        resolve_precision(config, torch.device(device), log)
        t, d, data_set = config.train, config.distill, dataset(config.data)
        distributed.check_batch(t.batch)
        if t.threads:
            torch.set_num_threads(t.threads)
        _, teacher = load_denoiser(Path(teacher_dir), "ema", device)
        data = load_data(config, data_set, device)
        distributed.barrier()  # every rank has read the run directory before rank 0 writes to it
        if main:
            write_config(run_dir, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(t.seed, "init"))
            x0, cond, _ = data.first(1)
            job = start_distillation(teacher, config, x0, cond)
        if d.regression > 0:
            job.pairs = teacher_pairs(run_dir, teacher, config, data, log)
        nimg = restore(run_dir, job, log)
        log(f"distilling {teacher_dir} ({d.method}, {d.generator_steps}-step generator): "
            f"{'resuming at' if nimg else 'starting at'} {nimg / 1000:g} kimg of {t.kimg:g}")
        drive(job, config, run_dir, data, data_set, nimg, device=device, log=log, progress=progress, desc="distilling")
    return run_dir


def teacher_pairs(run_dir: Path, teacher: Denoiser, config: Config, data: TrainData, log) -> dict[str, torch.Tensor]:
    """DMD's regression pairs: noise z, conditions and the teacher's deterministic samples from z,
    drawn once with the teacher's sampler (eta 0, no churn) and kept in RUN/pairs.safetensors."""
    path = run_dir / "pairs.safetensors"
    if path.is_file():
        pairs = load_file(path)
    else:
        d = config.distill
        start = time.perf_counter()
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(
            config.train.seed, "pairs")))[:d.pairs]
        x0, cond, _ = data.take(index)
        seeds = image_seeds(derive_seed(config.train.seed, "pairs"), d.pairs)
        shape = tuple(x0.shape[1:])
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
    return {k: v.to(data.device) for k, v in pairs.items()}


def student_config(teacher: Config, distill_settings: Config, teacher_dir: Path) -> Config:
    """The teacher's data, process and model with the distillation's [distill], [train], [sample]."""
    config = copy.deepcopy(teacher)
    config.distill, config.train, config.sample = (copy.deepcopy(distill_settings.distill),
                                                   copy.deepcopy(distill_settings.train),
                                                   copy.deepcopy(distill_settings.sample))
    config.distill.teacher = str(teacher_dir)
    config.train.probe_kimg = 0.0  # the probe watches a denoiser in training; the generator is not one
    return config
