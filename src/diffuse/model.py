"""A trained model: `load(run)` gives a `Model`, whose `sample` draws exactly the images `diffuse sample`
writes for the same arguments and whose `denoiser` drives a sampler of your own.

    model = diffuse.load("runs/fmnist")                    # a run directory or one of its checkpoints
    images, labels = model.sample(20, labels=[3, 7], steps=10, seed=0)   # uint8 (20, 28, 28, 1), int64 (20,)
    x0_hat = model.denoiser(x_t, t, cond)
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffuse import distributed
from diffuse.checkpoint import load_checkpoint, load_denoiser, resolve_checkpoint, verify
from diffuse.config import Config, validate
from diffuse.data import Dataset, Scaling, dataset, moved
from diffuse.denoiser import Denoiser
from diffuse.errors import UserError
from diffuse.images import MAX_SAMPLES, NpzWriter, save_npz
from diffuse.sampling import sample as draw
from diffuse.seeding import image_seeds
from diffuse.speed import chosen_precision

CHUNK_SAMPLES = 1024  # images drawn, then written, at a time by save_samples (at least a sampler batch per rank)
GRID_SAMPLES = 1000  # the first images a --grid picture is drawn from (rows of each class, or rows of 8)
SETTINGS = ("sampler", "steps", "spacing", "eta", "cfg", "rescale", "S_churn", "precision")  # a sampling call's own


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on, "auto" (or None) being CUDA where there is one; under a launcher each rank its own GPU."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu, cuda or cuda:N.") from None
    return distributed.rank_device(device)



@dataclass
class Samples:
    """What `Model.sample` returns: images uint8 (N, H, W, C) (float points (N, D) for 2-D data) and
    the class each was asked to be, int64 (N,), -1 where none was (for an image condition: the class
    of the image the condition came from). Unpacks as (images, labels)."""

    images: np.ndarray
    labels: np.ndarray
    settings: dict

    def __iter__(self):
        return iter((self.images, self.labels))

    def save(self, path: str | Path, dataset: Dataset, grid: str | Path | None = None) -> None:
        """The samples file (.npz: `images` and `labels`; `points` for 2-D data) and, with `grid`, its
        picture (`Dataset.picture`)."""
        if dataset.is_image:
            save_npz(Path(path), self.images, self.labels)
        else:
            np.savez(path, points=self.images, labels=self.labels)
        if grid:
            truth = dataset.eval_truth(len(self.images))
            dataset.picture(Path(grid), self.images, self.labels, None if truth is None else truth.numpy())


class Model:
    """A trained run's denoiser (EMA weights by default), its config and data set; from `load`."""

    def __init__(self, config: Config, denoiser: Denoiser, checkpoint: Path):
        self.config, self.net, self.checkpoint = config, denoiser, checkpoint
        self.dataset: Dataset = dataset(config.data)
        self.scaling = Scaling(config.data.mean, config.data.std) if self.dataset.is_image else None
        self.process = denoiser.process

    def denoiser(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat (B, *shape) of x_t (B, *shape) in model space at the process's time t (a number or (B,)):
        VP steps 0..999, flow t in [0, 1], EDM sigma. cond: labels int64 (B,) (-1 = none), an image
        condition (B, *cond_shape) in model space, or None."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(len(x_t)) if t.ndim == 0 else t
        with torch.no_grad():
            return self.net(x_t, t, cond)[0]

    def sample(self, n: int, labels=None, cond=None, *, seed: int = 0, progress: bool = False,
               **settings) -> Samples:
        """n samples, image i drawn from the noise of seed (seed, i): the same images for the same
        arguments on any batch size, device count or call order.

        labels: for a class-conditional model, None (the classes in turn), "none" (unconditional,
        through the null label), or a list of classes repeated to n. cond: for an image-conditioned
        model, uint8 images (n, h, w, C) or model-space (n, *cond_shape); None takes the low-res
        versions of the first n test images. settings: sampler, steps, spacing, eta, cfg, rescale,
        S_churn, precision, as `diffuse sample`'s flags (unset ones keep the run's [sample] config).
        """
        resolved, cond, labels = self.prepare(n, labels, cond, settings)
        x = self.draw_rows(cond, seed, 0, n, resolved, progress)
        return Samples(self.decode(x), labels.numpy(), resolved)

    def save_samples(self, path: str | Path, n: int, labels=None, cond=None, *, seed: int = 0, progress: bool = False,
                     grid: str | Path | None = None, **settings) -> dict:
        """Draw the n samples `sample` gives for the same arguments and stream them into the .npz at `path`
        (with `grid`: also its picture, of the first GRID_SAMPLES), CHUNK_SAMPLES at a time: memory does not
        grow with n. Returns the sampler settings. Under a launcher every rank draws its part of each chunk
        and rank 0 writes."""
        resolved, cond, labels = self.prepare(n, labels, cond, settings)
        first = []
        chunk = max(CHUNK_SAMPLES, resolved["batch"] * distributed.size())
        point = not self.dataset.is_image
        shape = (n, *self.dataset.shape) if point else (n, *self.dataset.shape[1:], self.dataset.shape[0])
        main = distributed.is_main()
        writer = NpzWriter(Path(path), "points" if point else "images", np.float32 if point else np.uint8, shape)
        with writer if main else contextlib.nullcontext() as out, \
                tqdm(total=n, unit="img", desc="sampling", disable=not (progress and main)) as bar:
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                rows = self.decode(self.draw_rows(cond[start:stop], seed, start, stop, resolved, False))
                if main:
                    out.write(rows)
                first += [rows[:GRID_SAMPLES - sum(map(len, first))]] if grid else []
                bar.update(stop - start)
            if main:
                out.finish(labels.numpy())
        if grid and main:
            kept = np.concatenate(first)
            truth = self.dataset.eval_truth(len(kept))
            self.dataset.picture(Path(grid), kept, labels.numpy()[:len(kept)], None if truth is None else truth.numpy())
        return resolved

    def prepare(self, n: int, labels, cond, settings: Mapping) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(sampler settings, conditions (n, ...), labels (n,)) of a sampling call, every argument checked."""
        if type(n) is not int or not 1 <= n <= MAX_SAMPLES:
            raise UserError(f"--n {n} must be from 1 to {MAX_SAMPLES}.")
        resolved = sampler_settings(self.config, settings)
        resolved["precision"] = chosen_precision(resolved["precision"], next(self.net.parameters()).device)[0]
        cond, labels = self.conditions(n, labels, cond)
        return resolved, cond, labels

    def draw_rows(self, cond: torch.Tensor, seed: int, start: int, stop: int, settings: dict,
                  progress: bool) -> torch.Tensor:
        """Images start..stop-1 in model space, (stop - start, *shape), cond those rows' conditions; under a
        launcher each rank draws its block of them and every rank gets them all."""
        k = stop - start
        mine = distributed.block(k)
        seeds = image_seeds(seed, stop, start)[mine]
        x = draw(self.net, self.dataset.shape, cond[mine], seeds, progress=progress, **settings)
        return distributed.gather(x, k)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Model space -> uint8 images (N, H, W, C), or the points themselves for 2-D data."""
        return self.scaling.decode(x).numpy() if self.scaling else x.numpy()

    def conditions(self, n: int, labels, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditions (n, ...), labels (n,)) for n samples, checked against what the model takes."""
        ds, none = self.dataset, torch.full((n,), -1, dtype=torch.long)
        if ds.condition in ("image", "vector"):
            if labels is not None:
                raise UserError(f"--labels {_text(labels)} does not apply to a model conditioned on "
                                f"{ds.condition}s; leave --labels out.")
            if cond is None:  # those of the held-out examples
                return ds.eval_conditions(self.scaling, n)
            made = self.image_condition(cond, n) if ds.condition == "image" else self.vector_condition(cond, n)
            return made, none
        if cond is not None:
            raise UserError("cond= is for a model conditioned on images or vectors; give a class-conditional "
                            "model labels=.")
        if ds.condition == "none":
            if labels is not None and not (isinstance(labels, str) and labels in ("none", "all")):
                raise UserError(f"--labels {_text(labels)} does not apply to an unconditional model; leave it out.")
            return none, none
        chosen = parse_labels(labels, n, ds.num_classes)
        return chosen, chosen

    def vector_condition(self, cond, n: int) -> torch.Tensor:
        """Vectors (n, D) (a NaN row: none) -> float32 (n, D), checked against the model's D."""
        cond = torch.as_tensor(np.asarray(cond, dtype=np.float32))
        if tuple(cond.shape) != (n, *self.dataset.cond_shape):
            raise UserError(f"cond has shape {tuple(cond.shape)}; this model takes {n} vectors of "
                            f"{self.dataset.cond_shape[0]} numbers.")
        return cond

    def image_condition(self, cond, n: int) -> torch.Tensor:
        """uint8 images (n, h, w, C) or a model-space tensor (n, *cond_shape) -> model space (n, *cond_shape)."""
        want = self.dataset.cond_shape
        if isinstance(cond, np.ndarray) or (torch.is_tensor(cond) and cond.dtype == torch.uint8):
            cond = self.scaling.encode(torch.as_tensor(np.asarray(cond)))
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if tuple(cond.shape) != (n, *want):
            raise UserError(f"cond has shape {tuple(cond.shape)}; this model takes {n} image conditions of "
                            f"shape {want} (channels first) or ({want[1]}, {want[2]}, {want[0]}) uint8.")
        return cond


def _text(labels) -> str:
    return labels if isinstance(labels, str) else ",".join(map(str, np.asarray(labels).ravel().tolist()))


def parse_labels(labels, n: int, num_classes: int) -> torch.Tensor:
    """None or 'all' -> 0, 1, ..., C-1, 0, ...; 'none' or -1 -> -1 (unconditional); [3, 5] or '3,5' -> 3, 5, 3, ..."""
    if labels is None or (isinstance(labels, str) and labels == "all"):
        return torch.arange(n) % num_classes
    if isinstance(labels, str) and labels == "none":
        return torch.full((n,), -1, dtype=torch.long)
    if isinstance(labels, str):
        try:
            labels = [int(v) for v in labels.split(",")]
        except ValueError:
            raise UserError(f"--labels {labels!r} is not 'all', 'none' or a comma-separated list of classes.") from None
    chosen = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if chosen.dtype.is_floating_point or chosen.dtype == torch.bool or len(chosen) == 0:
        raise UserError(f"labels {_text(labels)} must be class numbers, integers 0 to {num_classes - 1}.")
    if not num_classes:
        raise UserError("this model takes no class labels; leave labels out.")
    if any(not (0 <= v < num_classes or v == -1) for v in chosen.tolist()):
        raise UserError(f"--labels {_text(labels)!r} names a class outside 0..{num_classes - 1}.")
    return chosen.long().repeat(n // len(chosen) + 1)[:n]


def sampler_settings(config: Config, overrides: Mapping) -> dict:
    """The run's sampler settings with the given ones on top, validated against the run's config
    (e.g. the euler sampler needs a rectified-flow run)."""
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise UserError(f"unknown sampler setting {sorted(unknown)[0]!r}; choose from {', '.join(SETTINGS)}.")
    settings = config.sample.sampler_args() | {k: v for k, v in overrides.items() if v is not None}
    if not isinstance(settings["steps"], int) or settings["steps"] < 1:
        raise UserError(f"--steps {settings['steps']} must be at least 1.")
    if not 0 <= settings["rescale"] <= 1 or not 0 <= settings["eta"] <= 1:
        raise UserError("--rescale and --eta must lie in [0, 1].")
    if not 0 <= settings["cfg"] < math.inf:
        raise UserError(f"--cfg {settings['cfg']} must be a finite guidance scale of 0 or more (1 = none).")
    if not 0 <= settings["S_churn"] < math.inf:
        raise UserError(f"--churn {settings['S_churn']} must be a finite churn of 0 or more (0 = none).")
    flagged = copy.deepcopy(config)
    for key, value in settings.items():
        setattr(flagged.sample, key, value)
    validate(flagged)
    return settings


def load(source: str | Path, ema: float | None = None, *, weights: str = "ema",
         device: str | torch.device | None = "cpu", data: str | Path | None = None) -> Model:
    """The model of a run directory (its newest whole checkpoint) or of one checkpoint folder.

    ema: a sigma_rel to reconstruct the power-function EMA of, post hoc (runs with train.ema = "power");
    weights: "ema" (default) or "model", the raw training weights; data: where the run's prepared data set
    lies now, if not where it trained (without it, a run whose DATA_DIR is gone samples from its record).
    """
    if weights not in ("ema", "model"):
        raise UserError(f"weights {weights!r} must be 'ema' or 'model'.")
    checkpoint = resolve_checkpoint(Path(source))
    config, denoiser = load_denoiser(checkpoint, weights, pick_device(device), sigma_rel=ema)
    if data is not None:
        config.data = moved(config.data, data)
    return Model(config, denoiser, checkpoint)


def checkpoint_at(run_dir: Path, kimg: float | None) -> Path:
    """The run's checkpoint at `kimg` thousand images, or its newest whole one."""
    if kimg is None:
        return resolve_checkpoint(run_dir)
    for path in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
        if verify(path) is None and load_checkpoint(path)[2]["nimg"] == round(kimg * 1000):
            return path
    raise UserError(f"{run_dir} has no whole checkpoint at {kimg:g} kimg; leave out --at for the newest.")
