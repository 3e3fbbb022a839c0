"""Watching a run as it trains: the FD of fixed-seed EMA samples and a fixed-seed picture of them, both
on the run shell's cadence (`diffuse.run.watch`), and what they cost against the training steps.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffuse import distributed
from diffuse.config import Config
from diffuse.data import Dataset, Scaling, TrainData
from diffuse.denoiser import Denoiser
from diffuse.metrics.features import evaluate_features
from diffuse.report import read_events
from diffuse.sampling import sample
from diffuse.seeding import derive_seed, image_seeds


def watching_settings(config: Config) -> dict:
    """The run's sampler settings in the training's own precision (train.precision, "auto" resolved by now)."""
    return {**config.sample.sampler_args(), "precision": config.train.precision}


def training_fd(ema: Denoiser, config: Config, dataset: Dataset, data: TrainData) -> dict:
    """The FD of fd_n EMA samples: fixed seeds (the same noise each time), fd_steps steps, no guidance.
    Under a launcher each rank samples its block of the images and the feature sums are added up."""
    start = time.perf_counter()
    t = config.train
    cond, labels = dataset.eval_conditions(data.scaling, t.fd_n)
    settings = {**watching_settings(config), "steps": t.fd_steps, "cfg": 1.0}
    mine = distributed.block(t.fd_n)
    seeds = image_seeds(derive_seed(t.seed, "fd"), t.fd_n)[mine]
    x = sample(ema, dataset.shape, cond[mine], seeds, **settings)
    result = evaluate_features(dataset.features, data.scaling.decode(x), labels[mine], device=data.device,
                               across_ranks=True)
    return {"fd": result["fd"], "accuracy": result["accuracy"], "n": t.fd_n, "steps": t.fd_steps,
            "seconds": time.perf_counter() - start}


def write_grid(ema: Denoiser, config: Config, dataset: Dataset, scaling: Scaling | None, path: Path) -> None:
    """A fixed-seed picture of what the EMA model samples now (`Dataset.grid_conditions`, `Dataset.picture`)."""
    cond, labels, truth = dataset.grid_conditions(scaling)
    x = sample(ema, dataset.shape, cond, range(len(cond)), **watching_settings(config))
    samples = scaling.decode(x) if scaling else x
    dataset.picture(path, samples.numpy(), labels.numpy(), None if truth is None else truth.numpy())


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
