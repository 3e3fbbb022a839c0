"""The training loop, readable top to bottom: one step, EMA, logs, sample grids, checkpoints.

Time is counted in images seen (`nimg`), so schedules do not shift with the batch size. All the
randomness of a step (its batch order, t, eps, condition dropout, dropout masks) is derived from
(seed, step), so a run stopped and resumed from a checkpoint ends bit-identical to one that
never stopped.

Under `torchrun` or `accelerate launch` the same loop runs on every rank (`diffuse.distributed`):
each trains on its block of the global batch through DDP, and rank 0 alone writes the run
directory; the result does not depend on the number of ranks.

Faults end cleanly. SIGTERM or SIGINT lets the step in flight finish, writes a checkpoint and
raises `Interrupted`; a SIGKILL leaves at worst a torn checkpoint, which the next start skips.
A non-finite loss or gradient never reaches the weights: the step is skipped, or training stops
with `Diverged` (train.nonfinite), and a checkpoint is never written from non-finite weights.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from diffuse import distributed

from diffuse.checkpoint import (join_optimizer_state, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                save_checkpoint, split_optimizer_state)
from diffuse.config import Config, TrainConfig, read_config, resume_conflicts, to_toml
from diffuse.data import Scaling, TrainData, eval_conditions, load_fmnist, load_train_data, low_res
from diffuse.denoiser import Denoiser, build_denoiser
from diffuse.ema import PHEMA_DIR, PowerEMA, ema_beta, update_ema
from diffuse.errors import Diverged, Interrupted, UserError
from diffuse.images import save_grid, save_scatter
from diffuse.losses import draw_noise, loss_at
from diffuse.metrics.fmnist_fd import evaluate_images
from diffuse.metrics.probe import Probe, fit_baseline
from diffuse.metrics.superres import first_of_each_class, panel
from diffuse.report import read_events, write_report
from diffuse.sampling import null_condition, sample
from diffuse.seeding import derive_seed, image_seeds
from diffuse.speed import autocast, prepare, to_memory_format


def train(config: Config, run_dir: Path, device: str | torch.device = "cpu", progress: bool | None = None,
          log=print) -> Path:
    """Train (or resume) the run in `run_dir` until config.train.kimg thousand images; returns the run dir."""
    run_dir = Path(run_dir)
    main = distributed.is_main()
    progress = main and (sys.stderr.isatty() if progress is None else progress)
    log = log if main else silent
    config = resume_config(run_dir, config)
    t = config.train
    distributed.check_batch(t.batch)
    if t.threads:
        torch.set_num_threads(t.threads)
    data = load_train_data(config.data, scaling_of(config), seed=t.seed)
    if data.scaling:
        config.data.mean, config.data.std = data.scaling.mean, data.scaling.std
    distributed.barrier()  # every rank has read the run directory before rank 0 writes to it
    if main:
        write_config(run_dir, config)
    log(f"data: {data.describe()}")
    data.x, data.y, data.cond = data.x.to(device), data.y.to(device), data.cond.to(device)

    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(derive_seed(t.seed, "init"))
        denoiser = build_denoiser(config).to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    prepare(denoiser.net, t)  # channels_last, torch.compile, as train.* asks (the EMA, copied before, stays plain)
    phema = PowerEMA(denoiser.net, t.ema_sigma_rels) if t.ema == "power" else None  # ema then mirrors its first
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=t.lr, betas=(0.9, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    probe = start_probe(denoiser, data, t, log) if t.probe_kimg > 0 and main else None  # before restore: untrained net
    nimg = restore(run_dir, denoiser, ema, phema, optimizer, probe, log)
    model = training_loss(denoiser, config)
    log(f"model: {sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters; "
        f"{'resuming at' if nimg else 'starting at'} {nimg / 1000:g} kimg of {t.kimg:g}")

    total = round(t.kimg * 1000)
    metrics = run_dir / "metrics.jsonl"
    if main:
        trim_events(metrics, nimg)  # a run killed after its last checkpoint logged steps it will now redo
    window = Window()
    bar = tqdm(total=total, initial=min(nimg, total), unit="img", desc="training", disable=not progress)
    with stop_requests() as stop:
        while nimg < total:
            start = time.perf_counter()
            step = nimg // t.batch
            x0, cond, labels = batch_at(data, step, t.batch, t.seed)
            lr = learning_rate(t, nimg)
            loss, grad_norm = train_step(model, optimizer, x0, cond, lr, config, derive_seed(t.seed, "step", step))
            before, nimg = nimg, nimg + t.batch
            where = {"step": step + 1, "kimg": nimg / 1000}
            if math.isfinite(loss) and math.isfinite(grad_norm):
                if phema:
                    phema.update(denoiser.net, nimg)
                else:
                    update_ema(ema, denoiser, ema_beta(nimg, t.batch, t.ema_halflife_kimg, t.ema_rampup))
                window.add(loss, grad_norm, t.batch, time.perf_counter() - start)
            else:
                handle_nonfinite(t.nonfinite, step, loss, grad_norm, run_dir, metrics if main else None, where, log)
            bar.update(t.batch)
            if probe and crossed(before, nimg, t.probe_kimg):
                probe.step(denoiser, x0, cond, labels, derive_seed(t.seed, "probe", step))
            done = nimg >= total
            # read once, and agreed by every rank: a signal arriving later waits for the next step
            stopping = distributed.agree(stop.requested, device)
            grid_due = main and (crossed(before, nimg, t.grid_kimg) or done)
            fd_due = t.fd_kimg > 0 and (crossed(before, nimg, t.fd_kimg) or done)
            save_due = main and (crossed(before, nimg, t.checkpoint_kimg) or done or fd_due or stopping)
            if phema and main and (crossed(before, nimg, t.ema_snapshot_kimg) or done):
                phema.save_snapshots(run_dir / PHEMA_DIR, nimg)
            if phema and (grid_due or fd_due or save_due):
                ema.net.load_state_dict(phema.ema_state_dict(0))  # the run's EMA, for grids, FD and checkpoints
            logged = main and (crossed(before, nimg, t.log_kimg) or done)
            if logged:
                event = {"event": "train", **where, "lr": lr, **window.summary()}
                append_jsonl(metrics, event)
                if probe:
                    append_jsonl(metrics, {"event": "probe", **where, **probe.summary()})
                bar.set_postfix(loss=f"{event['loss']:.4f}")
            if grid_due:
                seconds = timed(write_grid, ema, config, data, run_dir / "samples" / f"grid-{nimg // 1000:06d}kimg.png")
                append_jsonl(metrics, {"event": "grid", **where, "seconds": seconds})
            fd = training_fd(ema, config, data) if fd_due else None  # on every rank: each samples its block
            if fd and main:
                append_jsonl(metrics, {"event": "fd", **where, **fd})
            if save_due:
                save(run_dir, step + 1, nimg, config, denoiser, ema, phema, optimizer, probe, fd and fd["fd"])
            if logged:
                write_report(run_dir)
            if stopping and not done:
                bar.close()
                raise interruption(stopping, nimg)
    bar.close()
    log(overhead_line(metrics))
    return run_dir


class BlockLoss(nn.Module):
    """The per-sample training loss of this rank's block of a global batch, as a module so DDP can wrap it.

    All the batch's randomness (condition dropout, t, eps) is drawn for the whole global batch from
    the step's generator and then sliced, so rank r's block gets exactly the draws a single process
    gives those examples: the update does not depend on the number of ranks.
    """

    def __init__(self, denoiser: Denoiser, cond_drop: float, uncertainty: bool):
        super().__init__()
        self.denoiser, self.cond_drop, self.uncertainty = denoiser, cond_drop, uncertainty

    def forward(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cond = drop_condition(cond, self.cond_drop, generator)
        t, eps = draw_noise(self.denoiser.process, x0, generator)
        mine = distributed.block(len(x0))
        return loss_at(self.denoiser, x0[mine], cond[mine], t[mine], eps[mine], uncertainty=self.uncertainty)


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
               lr: float, config: Config, seed: int) -> tuple[float, float]:
    """One optimizer step on one global batch (x0, cond); returns (loss, gradient norm before clipping).

    model: from `training_loss`; under DDP it computes this rank's block and averages the gradients.
    The loss returned is the global batch's mean on every rank. A non-finite loss or gradient norm
    skips the optimizer step, so the weights stay as they were.
    """
    model.train()
    seed_dropout(seed)
    generator = torch.Generator().manual_seed(seed)
    x0, cond = to_memory_format(x0, config.train), to_memory_format(cond, config.train)
    with autocast(config.train, x0.device):  # bf16 forward and loss if train.precision asks; backward outside
        loss = model(x0, cond, generator).mean()
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


def handle_nonfinite(policy: str, step: int, loss: float, grad_norm: float, run_dir: Path, metrics: Path | None,
                     where: dict, log) -> None:
    """A step whose loss or gradient was not finite (its update was skipped): log it, or stop."""
    what = f"step {step + 1} had loss {loss} and gradient norm {grad_norm}"
    if policy == "stop":
        newest = latest_checkpoint(run_dir, report=lambda *_: None)
        kept = f"the newest checkpoint, {newest.name}, holds the last good state" if newest else "no checkpoint was written"
        raise Diverged(f"{what}; training stopped ({kept}); lower train.lr or set train.nonfinite = \"skip\".")
    if metrics:  # None on ranks other than 0
        append_jsonl(metrics, {"event": "nonfinite", **where, "loss": loss, "grad_norm": grad_norm})
    log(f"{what}; skipped it (train.nonfinite = \"skip\")")


def interruption(signal_name: str, nimg: int) -> Interrupted:
    """What a run stopped by a signal raises once its checkpoint is written."""
    return Interrupted(f"{signal_name} at {nimg / 1000:g} kimg: wrote a checkpoint; re-run the same command to resume.")


class StopRequest:
    """Set by SIGTERM or SIGINT: the name of the signal, or None."""

    requested: str | None = None


@contextmanager
def stop_requests():
    """Turn SIGTERM and SIGINT into a request that the loop answers after its current step.

    A second signal of either kind stops at once (KeyboardInterrupt). Handlers are installed only
    in the main thread (Python allows no other) and restored on exit.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each condition by the null condition (label -1, NaN) with probability p, for CFG."""
    drop = (torch.rand(len(cond), generator=generator) < p).to(cond.device)
    drop = drop.reshape(-1, *[1] * (cond.ndim - 1))  # (B, 1, ...) against cond (B, ...)
    return torch.where(drop, null_condition(cond), cond)


def learning_rate(t: TrainConfig, nimg: int) -> float:
    """Linear warm-up over warmup_kimg, then constant or (inv_sqrt, EDM2 eq. 16) lr / sqrt(max(nimg / t_ref, 1));
    nimg counts the images of this step too, and nothing depends on the run's length."""
    nimg = nimg + t.batch
    lr = t.lr
    if t.lr_schedule == "inv_sqrt":
        lr /= math.sqrt(max(nimg / (t.lr_ref_kimg * 1000), 1.0))
    if t.warmup_kimg > 0:
        lr *= min(nimg / (t.warmup_kimg * 1000), 1.0)
    return lr


def batch_at(data: TrainData, step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, cond, labels) of examples [step * batch, (step + 1) * batch) of an endless stream of
    per-epoch permutations."""
    n = len(data.x)
    positions = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = positions // n, positions % n
    index = torch.empty(batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        index[mask] = epoch_permutation(n, seed, epoch)[offsets[mask]]
    index = index.to(data.x.device)
    return data.x[index], data.cond[index], data.y[index]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the data in one epoch, from (seed, epoch) alone (about 1 ms for 60k: not cached)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


def crossed(before: int, after: int, every_kimg: float) -> bool:
    """Whether a multiple of every_kimg thousand images lies in (before, after]."""
    every = every_kimg * 1000
    return math.floor(after / every) > math.floor(before / every)


class Window:
    """Loss, gradient norm and training throughput since the last log line (grids and checkpoints excluded)."""

    def __init__(self):
        self.losses, self.norms, self.images, self.seconds = [], [], 0, 0.0

    def add(self, loss: float, grad_norm: float, images: int, seconds: float):
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.images += images
        self.seconds += seconds

    def summary(self) -> dict:
        """Means over the window; NaN where every step in it was skipped as non-finite."""
        mean = lambda values: float(np.mean(values)) if values else math.nan  # noqa: E731
        out = {"loss": mean(self.losses), "grad_norm": mean(self.norms),
               "img_per_s": self.images / max(self.seconds, 1e-9), "train_seconds": self.seconds}
        self.__init__()
        return out


# ---------------------------------------------------------------------------------------------
# The run directory.


def resume_config(run_dir: Path, config: Config) -> Config:
    """The config to train with: the new one, checked against the run's own if the run exists."""
    path = run_dir / "config.toml"
    if not path.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir} exists and is not a diffuse run directory; choose a new --out.")
        return config
    old = read_config(path)
    if config.data.mean is None:
        config.data.mean, config.data.std = old.data.mean, old.data.std
    conflicts = resume_conflicts(old, config)
    if conflicts:
        raise UserError(f"{run_dir} was trained with other settings ({', '.join(conflicts)} differ); "
                        "re-run with the same settings to resume, or choose a new --out.")
    return config


def scaling_of(config: Config) -> Scaling | None:
    if config.data.mean is None:
        return None
    return Scaling(config.data.mean, config.data.std)


def write_config(run_dir: Path, config: Config) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.toml.tmp"
        tmp.write_text(to_toml(config))
        tmp.replace(run_dir / "config.toml")
    except OSError as e:
        raise UserError(f"cannot write to the run directory {run_dir} ({e.strerror or e}); choose a writable "
                        "--out with free space.") from None


def append_jsonl(path: Path, event: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def trim_events(path: Path, nimg: int) -> None:
    """Drop the events logged after `nimg` images (and a torn last line), rewriting the file atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if event_kimg(line) is not None and event_kimg(line) <= nimg / 1000]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def event_kimg(line: str) -> float | None:
    try:
        kimg = json.loads(line).get("kimg")
    except (ValueError, AttributeError):
        return None
    return kimg if isinstance(kimg, (int, float)) else None


def save(run_dir: Path, step: int, nimg: int, config: Config, denoiser: nn.Module, ema: nn.Module,
         phema: PowerEMA | None, optimizer: torch.optim.Optimizer, probe: Probe | None, fd: float | None = None) -> None:
    """Checkpoint the run (with the FD measured at this step, if any) and prune old checkpoints.

    Weights that are not finite are never written: the newest checkpoint stays the last good state.
    """
    for name, module in (("model", denoiser), ("EMA", ema)):
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise Diverged(f"the {name} weights at step {step} are not finite; no checkpoint was written, so the "
                           "newest one holds the last good state; lower train.lr.")
    opt_tensors, opt_rest = split_optimizer_state(optimizer.state_dict())
    tensors = {"model": denoiser.net.state_dict(), "ema": ema.net.state_dict(), "optimizer": opt_tensors}
    state = {"step": step, "nimg": nimg, "optimizer": opt_rest} | ({"fd": fd} if fd is not None else {})
    if phema:
        tensors["phema"], state["phema"] = phema.state_dict()
    if probe:
        probe_opt_tensors, state["probe_optimizer"] = split_optimizer_state(probe.optimizer.state_dict())
        tensors |= {"probe": probe.state_dict(), "probe_optimizer": probe_opt_tensors}
    save_checkpoint(run_dir, step, config, tensors, state)
    prune_checkpoints(run_dir, config.train.keep_checkpoints)


def newest_checkpoint_of_run(run_dir: Path, log) -> tuple[Path, dict, dict] | None:
    """(path, tensors, state) of the run's newest whole checkpoint, or None; one written with
    another config than the run's is refused with a sentence naming it."""
    path = latest_checkpoint(run_dir, report=log)
    if path is None:
        return None
    saved, tensors, state = load_checkpoint(path)
    conflicts = resume_conflicts(saved, read_config(run_dir / "config.toml"))
    if conflicts:
        raise UserError(f"checkpoint {path} was written with other settings than {run_dir / 'config.toml'} "
                        f"({', '.join(conflicts)} differ); it belongs to another run: move it away.")
    return path, tensors, state


def restore(run_dir: Path, denoiser: nn.Module, ema: nn.Module, phema: PowerEMA | None,
            optimizer: torch.optim.Optimizer, probe: Probe | None, log) -> int:
    """Load the newest whole checkpoint of the run, if any; returns the images seen (0 if none).

    A checkpoint whose config differs from the run's, or whose tensors do not fit the model, is
    refused with a sentence naming it: it belongs to another run.
    """
    found = newest_checkpoint_of_run(run_dir, log)
    if found is None:
        return 0
    path, tensors, state = found
    try:
        denoiser.net.load_state_dict(tensors["model"])
        ema.net.load_state_dict(tensors["ema"])
        optimizer.load_state_dict(join_optimizer_state(tensors["optimizer"], state["optimizer"]))
        if phema:
            phema.load_state_dict(tensors["phema"], state["phema"])
        if probe and "probe" in tensors:  # a run started without a probe starts it fresh
            probe.load_state_dict(tensors["probe"])
            probe.optimizer.load_state_dict(join_optimizer_state(tensors["probe_optimizer"], state["probe_optimizer"]))
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path} does not fit the model its config describes "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); move it away.") from None
    return state["nimg"]


# ---------------------------------------------------------------------------------------------
# Watching the run: probe, FD, grids. Their cost is logged so it can be bounded.


def start_probe(denoiser: Denoiser, data: TrainData, t: TrainConfig, log) -> Probe:
    """A fresh probe whose baseline is its head fitted to the features of the untrained `denoiser`."""
    start = time.perf_counter()
    probe = Probe(denoiser, data.x[:1], data.num_classes)
    probe.baseline = fit_baseline(denoiser, data.x, data.cond, data.y, data.num_classes, probe.t,
                                  seed=derive_seed(t.seed, "probe-baseline"))
    probe.seconds = time.perf_counter() - start  # counted with the first summary
    log(f"probe: linear head on the bottleneck at t={probe.t}; untrained-net baseline accuracy "
        f"{probe.baseline:.3f} ({probe.seconds:.1f} s)")
    return probe


def training_fd(ema: Denoiser, config: Config, data: TrainData) -> dict:
    """FD-FMNIST of fd_n EMA samples: fixed seeds (the same noise each time), fd_steps steps, no guidance.
    Under a launcher each rank samples its block of the images and the feature sums are added up."""
    start = time.perf_counter()
    t = config.train
    cond, labels = eval_conditions(config.data, data.scaling, t.fd_n)
    settings = {**config.sample.sampler_args(), "steps": t.fd_steps, "cfg": 1.0}
    mine = distributed.block(t.fd_n)
    seeds = image_seeds(derive_seed(t.seed, "fd"), t.fd_n)[mine]
    x = sample(ema, tuple(data.x.shape[1:]), cond[mine], seeds, **settings)
    result = evaluate_images(data.scaling.decode(x), labels[mine], device=data.x.device, across_ranks=True)
    return {"fd": result["fd"], "accuracy": result["accuracy"], "n": t.fd_n, "steps": t.fd_steps,
            "seconds": time.perf_counter() - start}


def timed(fn, *args) -> float:
    """Seconds that fn(*args) took."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def overhead_line(metrics: Path) -> str:
    """What the probe, the FD and the grids cost against the training steps, over the whole run."""
    seconds = {"train": 0.0, "probe": 0.0, "fd": 0.0, "grid": 0.0}
    for event in read_events(metrics):  # skips a line torn by a killed run
        kind = event.get("event")
        if kind in seconds:
            seconds[kind] += event["train_seconds" if kind == "train" else "seconds"]
    train = max(seconds.pop("train"), 1e-9)
    parts = ", ".join(f"{kind} {value:.1f} s ({100 * value / train:.1f}%)" for kind, value in seconds.items())
    return f"watching cost against {train:.1f} s of training steps: {parts}"


def write_grid(ema: Denoiser, config: Config, data: TrainData, path: Path) -> None:
    """A fixed-seed picture of what the EMA model samples now: a row per class, or a scatter plot;
    for super-resolution, rows low-res input / sample / truth for the first test image of each class."""
    settings, shape = config.sample.sampler_args(), tuple(data.x.shape[1:])
    if config.data.task == "superres":
        images, labels = load_fmnist("test")
        truth = images[first_of_each_class(labels)]  # (10, 28, 28, 1): the same conditions every time
        cond = low_res(data.scaling.encode(truth), config.data.factor)
        x = sample(ema, shape, cond, range(len(cond)), **settings)
        save_grid(path, panel(data.scaling.decode(x).numpy(), truth.numpy(), config.data.factor), nrow=len(truth))
    elif data.scaling is None:  # 2-D points
        labels = torch.arange(2000) % data.num_classes
        points = sample(ema, shape, labels, range(2000), **settings)
        save_scatter(path, points.numpy(), labels.numpy())
    else:
        labels = torch.arange(data.num_classes).repeat_interleave(10)
        x = sample(ema, shape, labels, range(len(labels)), **settings)
        save_grid(path, data.scaling.decode(x).numpy(), nrow=10)
