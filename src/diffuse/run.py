"""The run shell that training and distillation share: the run directory's life, and the loop around a step.

A job (`training.Training`, `distillation.Distillation`) owns its networks, optimizers and EMA and knows
how to take one step on a global batch; this module owns everything around that step:

- the run directory: locked against a second writer (`claimed`), a new one claimed, an existing
  one resumed only with the same settings (`resume_config`), its config written, the events
  logged after its newest checkpoint dropped;
- the cadence, in images seen: log lines, the probe, grids, FD, EMA snapshots and checkpoints,
  keeping the newest `train.keep_checkpoints` and the best FD (`checkpoint.prune_checkpoints`);
- the report, rewritten at every log line;
- signals: SIGTERM or SIGINT lets the step in flight finish, writes a checkpoint and raises
  `Interrupted`; a SIGKILL leaves at worst a torn checkpoint, which the next start skips;
- non-finite values: a step whose losses or gradient norms are not finite was not applied by the
  job; train.nonfinite stops (`Diverged`) or skips and logs it; weights that are not finite are
  never checkpointed.

Under a launcher every rank runs the loop; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from diffuse import distributed
from diffuse.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from diffuse.config import Config, TrainConfig, read_config, resume_conflicts, to_toml
from diffuse.data import Dataset, Scaling, TrainData, described
from diffuse.denoiser import Denoiser
from diffuse.ema import PHEMA_DIR, PowerEMA
from diffuse.errors import Diverged, Interrupted, UserError
from diffuse.files import writing
from diffuse.lock import LOCK, run_lock
from diffuse.metrics.probe import Probe
from diffuse.outputs import MAX_EVENT_BYTES, RUN_MARK, check_run_out
from diffuse.report import write_report
from diffuse.seeding import derive_seed
from diffuse.speed import chosen_precision
from diffuse.watching import timed, training_fd, write_grid


class Job(Protocol):
    """What the shell drives: one step on a global batch, and the state a checkpoint holds."""

    ema: Denoiser               # the EMA the grids, the FD and `diffuse sample` read
    phema: PowerEMA | None      # EDM2's power-function EMA, whose snapshots the shell writes
    probe: Probe | None         # the linear probe, stepped by the shell on the training batch
    probed: Denoiser            # the denoiser in training, whose bottleneck the probe reads

    def step(self, step: int, lr: float, x0: torch.Tensor, cond: torch.Tensor) -> dict[str, float]:
        """One update on global batch `step`, of which x0 and cond are this rank's block
        (`distributed.block(train.batch)`; all of it in one process); returns its losses and gradient
        norms ("loss" first). A value that is not finite means the job applied no update with it (nor
        to its EMA)."""

    def current_ema(self) -> Denoiser:
        """`ema`, brought up to date (the power EMA copies its first profile in)."""

    def networks(self) -> dict[str, torch.nn.Module]:
        """The modules whose weights must be finite before a checkpoint, by name."""

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(tensors by file stem, JSON state) of a checkpoint; "model" and "ema" are what `diffuse sample` reads."""

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
        """Load a checkpoint's tensors and state (KeyError, RuntimeError, ... where they do not fit)."""


def silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


# ---------------------------------------------------------------------------------------------
# The run directory.


def claimed(run_dir: Path, command: str):
    """The run directory's lock (`diffuse.lock`), held by rank 0, its one writer; nothing on other ranks."""
    if distributed.is_main():
        check_run_out(run_dir)  # before the lock, whose file would be the first thing written there
        return run_lock(run_dir, command)
    return nullcontext()


def resume_config(run_dir: Path, config: Config) -> Config:
    """The config to run with: the new one with its data set's record (`data.described`), checked against the
    run's own if the run exists."""
    config.data = described(config.data)
    path = run_dir / "config.toml"
    if not path.is_file():
        if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()):
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


def resolve_precision(config: Config, device: torch.device, log) -> None:
    """train.precision "auto" made fp32 or bf16 for this device (`speed.chosen_precision`), said once;
    the run's config.toml then records the choice."""
    config.train.precision, why = chosen_precision(config.train.precision, device)
    log(f"precision: {config.train.precision} ({why})")


def scaling_of(config: Config) -> Scaling | None:
    """The pixel scaling the config records, or None where it is still to be fitted."""
    if config.data.mean is None:
        return None
    return Scaling(config.data.mean, config.data.std)


def load_data(config: Config, dataset: Dataset, device: torch.device) -> TrainData:
    """The training split on `device`; a scaling fitted here is recorded in config.data."""
    data = dataset.load("train", scaling_of(config))
    if data.scaling:
        config.data.mean, config.data.std = data.scaling.mean, data.scaling.std
    return data.to(device)


def write_config(run_dir: Path, config: Config) -> None:
    tmp = run_dir / "config.toml.tmp"
    with writing(run_dir / "config.toml", tmp):
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.toml.tmp"
        tmp.write_text(f"{RUN_MARK}\n{to_toml(config)}")
        tmp.replace(run_dir / "config.toml")


def append_jsonl(path: Path, event: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def trim_events(path: Path, nimg: int) -> None:
    """Drop the events logged after `nimg` images (and a torn last line), rewriting the file atomically."""
    if not path.is_file():
        return
    lines = list(event_lines(path))
    kept = [line for line in lines if event_kimg(line) is not None and event_kimg(line) <= nimg / 1000]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        with writing(path, tmp):
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)


def event_lines(path: Path):
    """The lines of metrics.jsonl without their newline; a line over MAX_EVENT_BYTES (no event is) as ''."""
    with open(path, "rb") as f:
        while line := f.readline(MAX_EVENT_BYTES + 1):
            if len(line) > MAX_EVENT_BYTES:
                while line and not line.endswith(b"\n"):  # skip the rest of it without holding it
                    line = f.readline(MAX_EVENT_BYTES + 1)
                yield ""
                continue
            yield line.decode("utf-8", errors="replace").rstrip("\n")


def event_kimg(line: str) -> float | None:
    try:
        kimg = json.loads(line).get("kimg")
    except (ValueError, RecursionError, AttributeError):
        return None
    return kimg if type(kimg) in (int, float) and math.isfinite(kimg) else None


# ---------------------------------------------------------------------------------------------
# Checkpoints of a job.


def save(run_dir: Path, step: int, nimg: int, config: Config, job: Job, fd: float | None = None) -> None:
    """Checkpoint the job (with the FD measured at this step, if any) and prune old checkpoints.

    Weights that are not finite are never written: the newest checkpoint stays the last good state.
    """
    for name, module in job.networks().items():
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise Diverged(f"the {name} weights at step {step} are not finite; no checkpoint was written, so the "
                           "newest one holds the last good state; lower train.lr.")
    tensors, state = job.state()
    state = {"step": step, "nimg": nimg, **state} | ({"fd": fd} if fd is not None else {})
    save_checkpoint(run_dir, step, config, tensors, state)
    prune_checkpoints(run_dir, config.train.keep_checkpoints)


def restore(run_dir: Path, job: Job, log) -> int:
    """Load the newest whole checkpoint of the run into the job, if any; returns the images seen (0 if none).

    A checkpoint whose config differs from the run's, or whose tensors do not fit the job's
    networks, is refused with a sentence naming it: it belongs to another run.
    """
    path = latest_checkpoint(run_dir, report=log)
    if path is None:
        return 0
    saved, tensors, state = load_checkpoint(path)
    conflicts = resume_conflicts(saved, read_config(run_dir / "config.toml"))
    if conflicts:
        raise UserError(f"checkpoint {path} was written with other settings than {run_dir / 'config.toml'} "
                        f"({', '.join(conflicts)} differ); it belongs to another run: move it away.")
    batch = saved.train.batch
    if state["nimg"] % batch or state.get("step", state["nimg"] // batch) != state["nimg"] // batch:
        raise UserError(f"{path / 'state.json'} says step {state.get('step')} at {state['nimg']} images, which "
                        f"batches of {batch} never reach; the file is damaged: move the checkpoint away.")
    try:
        job.restore(tensors, state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:  # fields of the
        # wrong type in state.json among them
        raise UserError(f"checkpoint {path} does not fit the model its config describes "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); move it away.") from None
    return state["nimg"]


# ---------------------------------------------------------------------------------------------
# The loop.


def drive(job: Job, config: Config, run_dir: Path, data: TrainData, dataset: Dataset, nimg: int, *,
          device: torch.device, log, progress: bool, desc: str) -> None:
    """Step the job from `nimg` images to train.kimg thousand, logging, watching and checkpointing on
    the way; raises Interrupted after a signal's checkpoint, Diverged on train.nonfinite = "stop"."""
    t, main = config.train, distributed.is_main()
    total, metrics = round(t.kimg * 1000), run_dir / "metrics.jsonl"
    if main:
        trim_events(metrics, nimg)  # a run killed after its last checkpoint logged steps it will now redo
    window = Window()
    bar = tqdm(total=total, initial=min(nimg, total), unit="img", desc=desc, disable=not progress)
    mine = distributed.block(t.batch)  # the rows of each global batch this rank reads
    with stop_requests() as stop:
        while nimg < total:
            start = time.perf_counter()
            step = nimg // t.batch
            x0, cond, labels = batch_at(data, step, t.batch, t.seed, config.data.xflip, mine)
            lr = learning_rate(t, nimg)
            out = job.step(step, lr, x0, cond)
            before, nimg = nimg, nimg + t.batch
            where = {"step": step + 1, "kimg": nimg / 1000}
            if all(math.isfinite(v) for v in out.values()):
                window.add(out, t.batch, time.perf_counter() - start)
            else:
                handle_nonfinite(t.nonfinite, step, out, run_dir, metrics if main else None, where, log)
            bar.update(t.batch)
            if job.probe and crossed(before, nimg, t.probe_kimg):  # rank 0's probe, on the whole global batch
                whole = (x0, cond, labels) if distributed.size() == 1 else batch_at(
                    data, step, t.batch, t.seed, config.data.xflip)
                job.probe.step(job.probed, *whole, derive_seed(t.seed, "probe", step))
            done = nimg >= total
            # read once, and agreed by every rank: a signal arriving later waits for the next step
            stopping = distributed.agree(stop.requested, device)
            logged = main and (crossed(before, nimg, t.log_kimg) or done)
            if logged:
                event = {"event": "train", **where, "lr": lr, **window.summary()}
                append_jsonl(metrics, event)
                if job.probe:
                    append_jsonl(metrics, {"event": "probe", **where, **job.probe.summary()})
                bar.set_postfix(loss=f"{event['loss']:.4f}")
            watch(job, config, run_dir, data, dataset, before, nimg, done or stopping, where)
            if logged:
                write_report(run_dir)
            if stopping and not done:
                bar.close()
                raise Interrupted(f"{stopping} at {nimg / 1000:g} kimg: wrote a checkpoint; re-run the same command "
                                  "to resume.")
    bar.close()


def watch(job: Job, config: Config, run_dir: Path, data: TrainData, dataset: Dataset, before: int, nimg: int,
          last: bool, where: dict) -> None:
    """What falls due between `before` and `nimg` images: EMA snapshots, a grid, the FD, a checkpoint
    (every one at the end of the run, `last`, and a checkpoint before a signal stops it)."""
    t, main, done = config.train, distributed.is_main(), nimg >= round(config.train.kimg * 1000)
    metrics = run_dir / "metrics.jsonl"
    grid_due = main and (crossed(before, nimg, t.grid_kimg) or done)
    fd_due = t.fd_kimg > 0 and dataset.features is not None and (crossed(before, nimg, t.fd_kimg) or done)
    save_due = main and (crossed(before, nimg, t.checkpoint_kimg) or last or fd_due)
    if job.phema and main and (crossed(before, nimg, t.ema_snapshot_kimg) or done):
        job.phema.save_snapshots(run_dir / PHEMA_DIR, nimg)
    if not (grid_due or fd_due or save_due):
        return
    ema = job.current_ema()  # brought up to date once for the grid, the FD and the checkpoint
    if grid_due:
        path = run_dir / "samples" / f"grid-{nimg // 1000:06d}kimg.png"
        seconds = timed(write_grid, ema, config, dataset, data.scaling, path)
        append_jsonl(metrics, {"event": "grid", **where, "seconds": seconds})
    fd = training_fd(ema, config, dataset, data) if fd_due else None  # every rank samples its block
    if fd and main:
        append_jsonl(metrics, {"event": "fd", **where, **fd})
    if save_due:
        save(run_dir, where["step"], nimg, config, job, fd and fd["fd"])


def handle_nonfinite(policy: str, step: int, out: dict[str, float], run_dir: Path, metrics: Path | None,
                     where: dict, log) -> None:
    """A step with a loss or gradient norm that was not finite (the job applied nothing): log it, or stop."""
    what = f"step {step + 1} had " + " and ".join(f"{key.replace('_', ' ')} {value}" for key, value in out.items())
    if policy == "stop":
        newest = latest_checkpoint(run_dir, report=lambda *_: None)
        kept = f"the newest checkpoint, {newest.name}, holds the last good state" if newest else "no checkpoint was written"
        raise Diverged(f"{what}; training stopped ({kept}); lower train.lr or set train.nonfinite = \"skip\".")
    if metrics:  # None on ranks other than 0
        append_jsonl(metrics, {"event": "nonfinite", **where, **out})
    log(f"{what}; skipped it (train.nonfinite = \"skip\")")


class StopRequest:
    """Set by SIGTERM or SIGINT: the name of the signal, or None."""

    requested: str | None = None


@contextmanager
def stop_requests():
    """Turn SIGTERM and SIGINT into a request that the loop answers after its current step.

    A second signal of either kind stops at once: it goes to the handler that was there before
    (`diffuse.signals` under the command line: one line, exit 130 or 143; KeyboardInterrupt elsewhere).
    Handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if not stop.requested:
            stop.requested = signal.Signals(signum).name
        elif callable(previous[signum]):
            previous[signum](signum, frame)
        else:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def batch_at(data: TrainData, step: int, batch: int, seed: int, xflip: bool = False, rows: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, cond, labels) of examples [step * batch, (step + 1) * batch) of an endless stream of
    per-epoch permutations; with xflip each image (and an image condition) mirrored with probability 1/2.
    rows: the rows of that global batch to read (a rank's block under a launcher); only they are read,
    and they are the same examples, flipped the same way, as in the whole batch."""
    n = len(data)
    positions = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = positions // n, positions % n
    index = torch.empty(batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        index[mask] = epoch_permutation(n, seed, epoch)[offsets[mask]]
    x0, cond, labels = data.take(index[rows])
    if xflip:
        flip = (torch.rand(batch, generator=torch.Generator().manual_seed(derive_seed(seed, "xflip", step))) < 0.5)[rows]
        x0 = torch.where(flip.to(x0.device)[:, None, None, None], x0.flip(-1), x0)
        if cond.ndim == 4:
            cond = torch.where(flip.to(cond.device)[:, None, None, None], cond.flip(-1), cond)
    return x0, cond, labels


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the data in one epoch, from (seed, epoch) alone (about 1 ms for 60k: not cached)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


def crossed(before: int, after: int, every_kimg: float) -> bool:
    """Whether a multiple of every_kimg thousand images lies in (before, after]."""
    every = every_kimg * 1000
    return math.floor(after / every) > math.floor(before / every)


class Window:
    """Each step value's mean and the training throughput since the last log line (watching excluded)."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.images, self.seconds = 0, 0.0

    def add(self, values: dict[str, float], images: int, seconds: float):
        for key, value in values.items():
            self.values.setdefault(key, []).append(value)
        self.images += images
        self.seconds += seconds

    def summary(self) -> dict:
        """Means over the window; the loss NaN where every step in it was skipped as non-finite."""
        out = {"loss": math.nan} | {key: float(np.mean(v)) for key, v in self.values.items()}
        out |= {"img_per_s": self.images / max(self.seconds, 1e-9), "train_seconds": self.seconds}
        self.__init__()
        return out
