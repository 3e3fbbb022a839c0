"""Training, readable top to bottom: the state of a run (`Training`) and its step, handed to the run shell.

Time is counted in images seen (`nimg`), so schedules do not shift with the batch size. All the
randomness of a step (its batch order, t, eps, condition dropout, dropout masks) is derived from
(seed, step), so a run stopped and resumed from a checkpoint ends bit-identical to one that
never stopped.

Under `torchrun` or `accelerate launch` the same loop runs on every rank (`diffuse.distributed`):
each trains on its block of the global batch through DDP, and rank 0 alone writes the run
directory; the result does not depend on the number of ranks. The run directory, the cadence of
logs, grids, FD, probe and checkpoints, signals and the non-finite policy are `diffuse.run`'s.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from diffuse import distributed
from diffuse.checkpoint import join_optimizer_state, split_optimizer_state
from diffuse.config import Config, TrainConfig
from diffuse.data import TrainData, dataset
from diffuse.denoiser import Denoiser
from diffuse.ema import PowerEMA, ema_beta, update_ema
from diffuse.losses import draw_noise, loss_at
from diffuse.metrics.probe import Probe, fit_baseline
from diffuse.nets import build_denoiser
from diffuse.run import claimed, drive, load_data, resolve_precision, restore, resume_config, silent, write_config
from diffuse.watching import overhead_line
from diffuse.sampling import null_condition
from diffuse.seeding import derive_seed
from diffuse.speed import autocast, prepare, to_memory_format


def train(config: Config, run_dir: Path, device: str | torch.device = "cpu", progress: bool | None = None,
          log=print) -> Path:
    """Train (or resume) the run in `run_dir` until config.train.kimg thousand images; returns the run dir."""
    run_dir, main = Path(run_dir), distributed.is_main()
    progress = main and (sys.stderr.isatty() if progress is None else progress)
    log = log if main else silent
    with claimed(run_dir, "train"):
        config = resume_config(run_dir, config)
        resolve_precision(config, torch.device(device), log)
        t, data_set = config.train, dataset(config.data)
        distributed.check_batch(t.batch)
        if t.threads:
            torch.set_num_threads(t.threads)
        data = load_data(config, data_set, device)
        distributed.barrier()  # every rank has read the run directory before rank 0 writes to it
        if main:
            write_config(run_dir, config)
        log(f"data: {data.describe()}")
        job = Training(config, data, device, log)
        nimg = restore(run_dir, job, log)
        log(f"model: {sum(p.numel() for p in job.denoiser.parameters()) / 1e6:.2f}M parameters; "
            f"{'resuming at' if nimg else 'starting at'} {nimg / 1000:g} kimg of {t.kimg:g}")
        drive(job, config, run_dir, data, data_set, nimg, device=device, log=log, progress=progress, desc="training")
        log(overhead_line(run_dir / "metrics.jsonl"))
    return run_dir


class Training:
    """A denoiser in training, its optimizer, its EMA (traditional, or EDM2's power EMA) and the probe:
    the job `diffuse.run.drive` steps."""

    def __init__(self, config: Config, data: TrainData, device: str | torch.device, log):
        self.config, t = config, config.train
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(derive_seed(t.seed, "init"))
            self.denoiser = build_denoiser(config).to(device)
        self.ema = copy.deepcopy(self.denoiser).eval().requires_grad_(False)
        prepare(self.denoiser.net, t)  # channels_last, torch.compile, as train.* asks (the EMA, copied before, stays plain)
        # the power EMA's first profile is the run's EMA: `ema` mirrors it (`current_ema`)
        self.phema = PowerEMA(self.denoiser.net, t.ema_sigma_rels) if t.ema == "power" else None
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=t.lr, betas=(0.9, t.adam_beta2),
                                           weight_decay=t.weight_decay)
        # the probe starts before any checkpoint is restored: its baseline is the untrained net's
        self.probe = (start_probe(self.denoiser, data, t, log) if t.probe_kimg > 0 and data.num_classes
                      and distributed.is_main() else None)  # the probe reads class labels
        self.probed = self.denoiser
        self.model = training_loss(self.denoiser, config)

    def step(self, step: int, lr: float, x0: torch.Tensor, cond: torch.Tensor) -> dict[str, float]:
        """One optimizer step on global batch `step`, then the EMA's, both skipped if a value is not finite."""
        t, nimg = self.config.train, (step + 1) * self.config.train.batch
        loss, grad_norm = train_step(self.model, self.optimizer, x0, cond, lr, self.config,
                                     derive_seed(t.seed, "step", step), t.batch)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            if self.phema:
                self.phema.update(self.denoiser.net, nimg)
            else:
                update_ema(self.ema, self.denoiser, ema_beta(nimg, t.batch, t.ema_halflife_kimg, t.ema_rampup))
        return {"loss": loss, "grad_norm": grad_norm}

    def current_ema(self) -> Denoiser:
        if self.phema:
            self.ema.net.load_state_dict(self.phema.ema_state_dict(0))
        return self.ema

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.denoiser, "EMA": self.ema}

    def state(self) -> tuple[dict, dict]:
        opt_tensors, opt_rest = split_optimizer_state(self.optimizer.state_dict())
        tensors = {"model": self.denoiser.net.state_dict(), "ema": self.ema.net.state_dict(), "optimizer": opt_tensors}
        state = {"optimizer": opt_rest}
        if self.phema:
            tensors["phema"], state["phema"] = self.phema.state_dict()
        if self.probe:
            probe_opt_tensors, state["probe_optimizer"] = split_optimizer_state(self.probe.optimizer.state_dict())
            tensors |= {"probe": self.probe.state_dict(), "probe_optimizer": probe_opt_tensors}
        return tensors, state

    def restore(self, tensors: dict, state: dict) -> None:
        self.denoiser.net.load_state_dict(tensors["model"])
        self.ema.net.load_state_dict(tensors["ema"])
        self.optimizer.load_state_dict(join_optimizer_state(tensors["optimizer"], state["optimizer"]))
        if self.phema:
            self.phema.load_state_dict(tensors["phema"], state["phema"])
        if self.probe and "probe" in tensors:  # a run started without a probe starts it fresh
            self.probe.load_state_dict(tensors["probe"])
            self.probe.optimizer.load_state_dict(join_optimizer_state(tensors["probe_optimizer"],
                                                                      state["probe_optimizer"]))


class BlockLoss(nn.Module):
    """The per-sample training loss of this rank's block of a global batch, as a module so DDP can wrap it.

    x0 and cond are the block (`distributed.block(n)`) of a global batch of n. All the batch's
    randomness (condition dropout, t, eps) is drawn for the whole global batch from the step's
    generator and then sliced, so rank r's block gets exactly the draws a single process gives those
    examples: the update does not depend on the number of ranks.
    """

    def __init__(self, denoiser: Denoiser, cond_drop: float, uncertainty: bool):
        super().__init__()
        self.denoiser, self.cond_drop, self.uncertainty = denoiser, cond_drop, uncertainty

    def forward(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator, n: int) -> torch.Tensor:
        mine = distributed.block(n)
        cond = drop_condition(cond, self.cond_drop, generator, n)
        t, eps = draw_noise(self.denoiser.process, x0.new_empty((n, *x0.shape[1:])), generator)
        return loss_at(self.denoiser, x0, cond, t[mine], eps[mine], uncertainty=self.uncertainty)


def training_loss(denoiser: Denoiser, config: Config) -> nn.Module:
    """The module a training step calls: `BlockLoss`, wrapped in DistributedDataParallel under a launcher."""
    uncertainty = config.train.loss_weighting == "uncertainty"
    model = BlockLoss(denoiser, config.model.cond_drop, uncertainty)
    # the MP U-Net's log-variance head gets no gradient without the uncertainty loss
    return distributed.wrap(model, find_unused_parameters=hasattr(denoiser.net, "logvar") and not uncertainty)


def seed_dropout(seed: int) -> None:
    """Seed the global generator, which dropout draws from, for this step: `seed` on rank 0 (and in
    one process), a seed derived from it and the rank elsewhere, so no two ranks share masks."""
    rank = distributed.rank()
    torch.manual_seed(seed if rank == 0 else derive_seed(seed, "rank", rank))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor, cond: torch.Tensor,
               lr: float, config: Config, seed: int, n: int | None = None) -> tuple[float, float]:
    """One optimizer step on one global batch of n examples (len(x0) by default: one process), of which
    x0 and cond are this rank's block; returns (loss, gradient norm before clipping).

    model: from `training_loss`; under DDP it computes this rank's block and averages the gradients.
    The loss returned is the global batch's mean on every rank. A non-finite loss or gradient norm
    skips the optimizer step, so the weights stay as they were.
    """
    model.train()
    seed_dropout(seed)
    generator = torch.Generator().manual_seed(seed)
    x0, cond = to_memory_format(x0, config.train), to_memory_format(cond, config.train)
    with autocast(config.train.precision, x0.device):  # bf16 forward and loss where it says so; backward outside
        loss = model(x0, cond, generator, n or len(x0)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.train.grad_clip if config.train.grad_clip > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)  # of the averaged gradient: the same on every rank
    loss, grad_norm = distributed.mean(loss.item(), x0.device), grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss, grad_norm


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator, n: int) -> torch.Tensor:
    """Replace each condition of this rank's block `cond` of a global batch of n by the null condition
    (label -1, NaN) with probability p, for CFG; the draws are the whole batch's, then sliced."""
    drop = (torch.rand(n, generator=generator)[distributed.block(n)] < p).to(cond.device)
    drop = drop.reshape(-1, *[1] * (cond.ndim - 1))  # (B, 1, ...) against cond (B, ...)
    return torch.where(drop, null_condition(cond), cond)


def start_probe(denoiser: Denoiser, data: TrainData, t: TrainConfig, log) -> Probe:
    """A fresh probe whose baseline is its head fitted to the features of the untrained `denoiser`."""
    start = time.perf_counter()
    probe = Probe(denoiser, data.first(1)[0], data.num_classes, precision=t.precision)
    fit = data.first(2048)
    held = data.take(torch.arange(max(len(data) - 1024, 0), len(data)))
    probe.baseline = fit_baseline(denoiser, fit, held, data.num_classes, probe.t,
                                  seed=derive_seed(t.seed, "probe-baseline"), precision=t.precision)
    probe.seconds = time.perf_counter() - start  # counted with the first summary
    log(f"probe: linear head on the bottleneck at t={probe.t}; untrained-net baseline accuracy "
        f"{probe.baseline:.3f} ({probe.seconds:.1f} s)")
    return probe
