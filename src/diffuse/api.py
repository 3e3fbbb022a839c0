"""The Python API: what the `diffuse` command does, from a notebook or a script.

    import diffuse
    model = diffuse.load("runs/fmnist")                    # a run directory or one of its checkpoints
    images, labels = model.sample(20, labels=[3, 7], steps=10, seed=0)   # uint8 (20, 28, 28, 1), int64 (20,)
    x0_hat = model.denoiser(x_t, t, cond)                  # drive a sampler of your own
    diffuse.train("fmnist-tiny", "runs/tiny", overrides=["train.kimg=1"])
    diffuse.evaluate("runs/tiny", n=500)                   # {"fd": ..., "accuracy": ..., ...}

`Model.sample` gives exactly the images `diffuse sample` writes for the same arguments. Every
mistake raises the `UserError` the command prints (one sentence naming the thing and the fix);
nothing here calls `sys.exit`.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffuse import distributed
from diffuse.checkpoint import (
    load_checkpoint,
    load_denoiser,
    resolve_checkpoint,
    verify,
    write_checkpoint,
)
from diffuse.config import Config, load_config, read_config, validate
from diffuse.data import Dataset, Scaling, dataset
from diffuse.denoiser import Denoiser
from diffuse.diagnostics import EARLY_STEPS, EARLY_WINDOW, run_doctor, write_doctor_json
from diffuse.distillation import distill as run_distillation
from diffuse.distillation import student_config
from diffuse.ema import PHEMA_DIR, reconstruct
from diffuse.errors import UserError
from diffuse.images import load_npz, save_npz
from diffuse.metrics.features import evaluate_features, fd_name
from diffuse.metrics.inception import fid, inception_stats, read_reference, write_reference
from diffuse.metrics.superres import evaluate_superres
from diffuse.report import ema_sweep_plot, write_report
from diffuse.sampling import sample as draw
from diffuse.seeding import image_seeds
from diffuse.training import train as run_training

SETTINGS = ("sampler", "steps", "spacing", "eta", "cfg", "rescale", "S_churn")  # what a sampling call may override


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on, "auto" (or None) being CUDA where there is one; under a launcher each rank its own GPU."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu, cuda or cuda:N.") from None
    return distributed.rank_device(device)


def make_config(config: str | Path | Config | None = None, overrides: Sequence[str] | Mapping = ()) -> Config:
    """A validated Config from a preset name ("fmnist"), a TOML file (a Path, or a string ending in
    .toml or holding a /) or a Config, with `key=value` overrides (a list of strings, or a mapping
    such as {"train.kimg": 50})."""
    items = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={_toml(v)}" for k, v in overrides.items()] \
        if isinstance(overrides, Mapping) else list(overrides)
    if isinstance(config, Config):
        return load_config(overrides=items, base=config)
    if isinstance(config, Path) or (isinstance(config, str) and (config.endswith(".toml") or "/" in config)):
        return load_config(None, config, items)
    return load_config(config, None, items)  # a preset name (None: the defaults)


def _toml(value) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


# ---------------------------------------------------------------------------------------------
# A trained model.


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
        S_churn, as `diffuse sample`'s flags (unset ones keep the run's [sample] config).
        """
        if not isinstance(n, int) or n < 1:
            raise UserError(f"--n {n} must be at least 1.")
        resolved = sampler_settings(self.config, settings)
        cond, labels = self.conditions(n, labels, cond)
        mine = distributed.block(n)  # under a launcher each rank samples its block of the images
        x = draw(self.net, self.dataset.shape, cond[mine], image_seeds(seed, n)[mine], progress=progress,
                 **resolved)
        x = distributed.gather(x, n)
        images = self.scaling.decode(x).numpy() if self.scaling else x.numpy()
        return Samples(images, labels.numpy(), resolved)

    def conditions(self, n: int, labels, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditions (n, ...), labels (n,)) for n samples, checked against what the model takes."""
        ds = self.dataset
        if ds.condition == "image":
            if labels is not None:
                raise UserError(f"--labels {_text(labels)} does not apply to a model conditioned on images; "
                                "leave --labels out.")
            if cond is None:
                return ds.eval_conditions(self.scaling, n)
            return self.image_condition(cond, n), torch.full((n,), -1, dtype=torch.long)
        if cond is not None:
            raise UserError("cond= is for a model conditioned on images; give a class-conditional model labels=.")
        chosen = parse_labels(labels, n, ds.num_classes)
        return chosen, chosen

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
         device: str | torch.device | None = "cpu") -> Model:
    """The model of a run directory (its newest whole checkpoint) or of one checkpoint folder.

    ema: a sigma_rel to reconstruct the power-function EMA of, post hoc (runs with train.ema = "power");
    weights: "ema" (default) or "model", the raw training weights.
    """
    if weights not in ("ema", "model"):
        raise UserError(f"weights {weights!r} must be 'ema' or 'model'.")
    checkpoint = resolve_checkpoint(Path(source))
    config, denoiser = load_denoiser(checkpoint, weights, pick_device(device), sigma_rel=ema)
    return Model(config, denoiser, checkpoint)


def checkpoint_at(run_dir: Path, kimg: float | None) -> Path:
    """The run's checkpoint at `kimg` thousand images, or its newest whole one."""
    if kimg is None:
        return resolve_checkpoint(run_dir)
    for path in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
        if verify(path) is None and json.loads((path / "state.json").read_text())["nimg"] == round(kimg * 1000):
            return path
    raise UserError(f"{run_dir} has no whole checkpoint at {kimg:g} kimg; leave out --at for the newest.")


# ---------------------------------------------------------------------------------------------
# Runs: train, distill, evaluate.


def train(config: str | Path | Config | None, out: str | Path, overrides: Sequence[str] | Mapping = (), *,
          device: str | torch.device | None = "auto", progress: bool | None = None, log=print) -> Path:
    """Train (or resume) a run in `out` from a preset name, a TOML file or a Config, with overrides."""
    config = make_config(config, overrides)
    if config.distill.method != "none":
        raise UserError(f"distill.method '{config.distill.method}' is for `diffuse distill TEACHER_RUN`; "
                        "`diffuse train` trains a model from scratch.")
    return run_training(config, Path(out), device=pick_device(device), progress=progress, log=log)


def distill(teacher: str | Path, out: str | Path, config: str | Path | Config | None = "dmd2",
            overrides: Sequence[str] | Mapping = (), *, device: str | torch.device | None = "auto",
            progress: bool | None = None, log=print) -> Path:
    """Distill a trained run into a one-step (or few-step) student in `out`. The student's config is
    the teacher's, with the preset's (or file's) [distill], [train] and [sample] on top."""
    items = list(overrides) if not isinstance(overrides, Mapping) else [f"{k}={v}" for k, v in overrides.items()]
    for item in items:
        if item.partition("=")[0].strip().split(".")[0] not in ("distill", "train", "sample"):
            raise UserError(f"--set {item!r}: a student takes its data, process and model from the teacher; "
                            "set only distill.*, train.* and sample.* keys.")
    settings = make_config(config, overrides)
    if settings.distill.method == "none":
        raise UserError("distill.method is 'none'; use --preset dmd or dmd2, or set distill.method.")
    teacher_dir = Path(teacher)
    teacher_config, _ = load_denoiser(teacher_dir, "ema")
    if teacher_config.distill.method != "none":
        raise UserError(f"{teacher_dir} is itself a distilled student; distill a trained run.")
    student = student_config(teacher_config, settings, teacher_dir)
    validate(student)
    return run_distillation(student, teacher_dir, Path(out), device=pick_device(device), progress=progress, log=log)


def evaluate(source: str | Path, n: int | None = None, *, ema: float | None = None, features: str = "fmnist",
             device: str | torch.device | None = "auto", progress: bool | None = None, **settings) -> dict:
    """FD and class accuracy of a samples .npz (in `features`), or of n samples drawn from a run (default:
    its sample.n_eval; in its data set's features) with the run's sampler settings and any given on top.
    A super-resolution run adds its consistency, PSNR and the upsampling baselines'."""
    source = Path(source)
    if not source.is_dir():
        images, labels = load_npz(source)
        return {"source": str(source), "features": features, **evaluate_features(features, images, labels)}
    if n is not None and (not isinstance(n, int) or n < 2):
        raise UserError(f"--n {n} must be at least 2 to fit a covariance.")
    model = load(source, ema, device=device)
    ds = model.dataset
    if ds.features is None:
        raise UserError(f"{source} is a {ds.name} run, which has no feature network to measure an FD in.")
    show = sys.stderr.isatty() if progress is None else progress
    drawn = model.sample(n or model.config.sample.n_eval, progress=show, **settings)
    if not distributed.is_main():  # every rank sampled its block; rank 0 measures
        return {}
    images, labels = drawn
    result = {"source": str(source), "features": ds.features, **evaluate_features(ds.features, images, labels)}
    if ds.condition == "image":  # a super-resolution run: its measures and the upsampling baselines'
        result |= evaluate_superres(images, labels, ds.eval_truth(len(images)).numpy(), ds.factor)
    return result | drawn.settings


def images_of(source: str | Path, n: int | None = None, *, ema: float | None = None,
              device: str | torch.device | None = "auto", progress: bool | None = None,
              **settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images, labels, sampler settings) of a samples .npz, or of n samples drawn from a run (default:
    its sample.n_eval) with the run's sampler settings and any given on top; empty on ranks other than 0."""
    source = Path(source)
    if not source.is_dir():
        images, labels = load_npz(source)
        return images, labels, {}
    if n is not None and (not isinstance(n, int) or n < 2):
        raise UserError(f"--n {n} must be at least 2 to fit a covariance.")
    model = load(source, ema, device=device)
    if not model.dataset.is_image:
        raise UserError(f"{source} is a {model.dataset.name} run of points, not images; FID measures images.")
    show = sys.stderr.isatty() if progress is None else progress
    drawn = model.sample(n or model.config.sample.n_eval, progress=show, **settings)
    return drawn.images, drawn.labels, drawn.settings


def fid_of(source: str | Path, ref: str | Path, n: int | None = None, *, device: str | torch.device | None = "auto",
           **options) -> dict:
    """FID (Inception-v3, the TF 2015-12-05 weights) of a samples .npz or of n samples of a run, against the
    reference statistics in `ref` (EDM's .npz with mu and sigma, e.g. from `write_fid_reference`)."""
    reference = read_reference(ref)  # a bad file is found before the slow part
    images, _, settings = images_of(source, n, device=device, **options)
    if not distributed.is_main():
        return {}
    stats = inception_stats(images, pick_device(device))
    return {"source": str(source), "features": "inception", "fid": fid(stats, reference), "n": stats.n,
            "ref": str(ref)} | settings


def write_fid_reference(source: str | Path, out: str | Path, n: int | None = None, *,
                        device: str | torch.device | None = "auto", **options) -> dict:
    """Write the Inception statistics of a samples .npz (real images saved as one, say) or of n samples of a
    run to `out`, as EDM's reference .npz; returns {"n", "ref"}."""
    out = Path(out)
    if out.exists() and not out.is_file():
        raise UserError(f"--write-ref {out} is a folder; give the path of an .npz file to write.")
    images, _, _ = images_of(source, n, device=device, **options)
    if not distributed.is_main():
        return {}
    stats = inception_stats(images, pick_device(device))
    if stats.n < 2:
        raise UserError(f"reference statistics need at least 2 images; {source} has {stats.n}.")
    write_reference(out, stats)
    return {"source": str(source), "n": stats.n, "ref": str(out)}


def fd(images: np.ndarray | torch.Tensor, labels=None, features: str = "fmnist",
       device: str | torch.device | None = "cpu") -> dict:
    """{"fd", "n", "n_ref", "accuracy"} of uint8 images (N, H, W, C) in a feature network's space."""
    return evaluate_features(features, images, labels, device=pick_device(device))


# ---------------------------------------------------------------------------------------------
# Post-hoc EMA and the doctor.


def post_hoc_ema(run_dir: str | Path, sigma_rel: float, out: str | Path, at: float | None = None) -> Path:
    """Reconstruct the power-function EMA of length sigma_rel at the checkpoint at `at` kimg (default:
    the newest) into the checkpoint folder `out`, for `load`, `diffuse sample` and `diffuse eval`."""
    run_dir = Path(run_dir)
    config, tensors, state = load_checkpoint(checkpoint_at(run_dir, at))
    if config.train.ema != "power":
        raise UserError(f"{run_dir} was trained with train.ema = \"{config.train.ema}\"; post-hoc EMA needs "
                        "\"power\".")
    weights = reconstruct(run_dir / PHEMA_DIR, sigma_rel, at_nimg=state["nimg"])
    return write_checkpoint(Path(out), config, {"model": tensors["model"], "ema": weights},
                            {"step": state["step"], "nimg": state["nimg"], "ema_sigma_rel": sigma_rel})


def ema_sweep(run_dir: str | Path, sigma_rels: Sequence[float], n: int = 2000, at: float | None = None, *,
              device: str | torch.device | None = "auto", log=print, **settings) -> dict:
    """FD of n samples for each post-hoc EMA length; writes RUN_DIR/ema_sweep.json, ema_sweep.svg and the
    report's section, and returns the sweep (rows, best, the length the run tracked)."""
    run_dir = Path(run_dir)
    if not isinstance(n, int) or n < 2:
        raise UserError(f"--n {n} must be at least 2 to fit a covariance.")
    checkpoint, rows = checkpoint_at(run_dir, at), []
    for sigma_rel in sigma_rels:
        model = load(checkpoint, sigma_rel, device=device)
        drawn = model.sample(n, **settings)
        if not distributed.is_main():  # every rank samples its block; rank 0 measures
            continue
        result = evaluate_features(model.dataset.features, *drawn)
        rows.append({"sigma_rel": sigma_rel, "fd": result["fd"], "accuracy": result["accuracy"]})
        log(f"sigma_rel {sigma_rel:.3f}: {fd_name(model.dataset.features)} {result['fd']:.3f}, class accuracy "
            f"{result['accuracy']:.3f}")
    if not distributed.is_main():
        return {}
    tracked = model.config.train.ema_sigma_rels[0]
    sweep = {"checkpoint": str(checkpoint), "n": n, **drawn.settings, "tracked_sigma_rel": tracked,
             "best": min(rows, key=lambda r: r["fd"]), "rows": rows}
    (run_dir / "ema_sweep.json").write_text(json.dumps(sweep, indent=1))
    (run_dir / "ema_sweep.svg").write_text(ema_sweep_plot(rows))
    write_report(run_dir)
    return sweep


def doctor(config: str | Path | Config | None = None, overrides: Sequence[str] | Mapping = (), *,
           run: str | Path | None = None, steps: int = EARLY_STEPS, device: str | torch.device | None = "auto",
           progress: bool = False) -> tuple[str, list]:
    """The doctor's checks of a config, or (run=RUN_DIR) of a trained run, whose doctor.json and report
    it writes; returns (what was checked, the checks)."""
    if steps < EARLY_WINDOW:
        raise UserError(f"--steps {steps} is too few; the early loss is averaged over the last "
                        f"{EARLY_WINDOW} steps, so give at least {EARLY_WINDOW}.")
    run_dir = Path(run) if run is not None else None
    if run_dir is not None:
        if config is not None or overrides:
            raise UserError("--run takes the config from the run; leave out --preset, --config and --set.")
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"{run_dir} is not a diffuse run directory (no config.toml); give the --out of a "
                            "training run.")
        resolved, label = read_config(run_dir / "config.toml"), str(run_dir)
    else:
        resolved = make_config(config, overrides)
        label = " ".join([str(config or "defaults"), *(f"--set {s}" for s in overrides)])
    checks = run_doctor(resolved, pick_device(device), run_dir, steps, label, progress=progress)
    if run_dir is not None:
        write_doctor_json(run_dir / "doctor.json", label, checks)
        write_report(run_dir)
    return label, checks
