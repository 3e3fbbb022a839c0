"""The Python API: what the `diffuse` command does, from a notebook or a script.

    import diffuse
    model = diffuse.load("runs/fmnist")                    # a run directory or one of its checkpoints
    images, labels = model.sample(20, labels=[3, 7], steps=10, seed=0)   # uint8 (20, 28, 28, 1), int64 (20,)
    x0_hat = model.denoiser(x_t, t, cond)                  # drive a sampler of your own
    diffuse.train("fmnist-tiny", "runs/tiny", overrides=["train.kimg=1"])
    diffuse.evaluate("runs/tiny", n=500)                   # {"fd": ..., "accuracy": ..., ...}

`Model.sample` (`diffuse.model`) gives exactly the images `diffuse sample` writes for the same arguments. Every
mistake raises the `UserError` the command prints (one sentence naming the thing and the fix);
nothing here calls `sys.exit`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from diffuse import distributed
from diffuse.checkpoint import check_run_config, load_checkpoint, load_denoiser, write_checkpoint
from diffuse.config import Config, DataConfig, load_config, read_config, validate
from diffuse.data import dataset
from diffuse.diagnostics import EARLY_STEPS, EARLY_WINDOW, early_loss_cache, run_doctor, write_doctor_json
from diffuse.distillation import distill as run_distillation
from diffuse.distillation import student_config
from diffuse.ema import PHEMA_DIR, reconstruct
from diffuse.errors import UserError
from diffuse.files import check_writable
from diffuse.images import MAX_SAMPLES, load_npz
from diffuse.lock import run_lock
from diffuse.metrics.fd import FeatureStats
from diffuse.metrics.feature_train import train_feature_net
from diffuse.metrics.features import evaluate_features, fd_name
from diffuse.metrics.inception import fid, inception_stats, read_reference, write_reference
from diffuse.metrics.superres import evaluate_superres
from diffuse.model import SETTINGS, Model, Samples, checkpoint_at, load, pick_device  # noqa: F401 (the API's)
from diffuse.nets import sized_for
from diffuse.outputs import check_checkpoint_out, check_file_out, check_run
from diffuse.prepared import Prepared, is_data_dir, open_prepared
from diffuse.preparing import PrepareOptions, prepare
from diffuse.report import ema_sweep_plot, write_report
from diffuse.training import train as run_training

SWEEP_FILES = ("ema_sweep.json", "ema_sweep.svg", "report.html")  # what `ema --sweep` writes into the run
DOCTOR_FILES = ("doctor.json", "report.html")  # what `doctor --run` writes into the run
SPLITS = ("train", "test", "all")  # the images of a DATA_DIR that FID measures; test is its held-out split


def make_config(config: str | Path | Config | None = None, overrides: Sequence[str] | Mapping = ()) -> Config:
    """A validated Config from a preset name ("fmnist"), a TOML file (a Path, or a string ending in
    .toml or holding a /) or a Config, with `key=value` overrides (a list of strings, or a mapping
    such as {"train.kimg": 50})."""
    items = _items(overrides)
    if isinstance(config, Config):
        return load_config(overrides=items, base=config)
    if isinstance(config, Path) or (isinstance(config, str) and (config.endswith(".toml") or "/" in config)):
        return load_config(None, config, items)
    return load_config(config, None, items)  # a preset name (None: the defaults)


def with_data(config: str | Path | Config | None, overrides: Sequence[str] | Mapping, data: str | Path | None
              ) -> tuple[str | Path | Config | None, list[str]]:
    """(config, overrides) that train on the prepared data set `data` (None: as given)."""
    items = _items(overrides)
    if data is None:
        return config, items
    path = Path(data).resolve()
    chosen, ds = ["data.name='prepared'", f"data.path={str(path)!r}"], dataset(DataConfig("prepared", str(path)))
    if ds.features is None:  # no feature net trained on it yet: no FD while training
        chosen.append("train.fd_kimg=0")
    if ds.condition == "none":  # nothing to guide by: one network pass per step
        chosen.append("sample.cfg=1.0")
    if config is None:
        config, chosen = "fmnist", chosen + sized_for(ds)
    return config, chosen + items


FEATURE_KIMG = 50.0  # the feature net's default training: one pass over a CIFAR-sized set (minutes on a CPU)


def prepare_data(sources: Sequence[str | Path], out: str | Path, options: PrepareOptions = PrepareOptions(),
                 feature_kimg: float = FEATURE_KIMG, *, device: str | torch.device | None = "auto", log=print
                 ) -> Prepared:
    """Prepare a user's data set into DATA_DIR `out` (`diffuse.preparing.prepare`), then train its own
    feature net for its FD (`train_features`) unless feature_kimg is 0."""
    if not 0 <= feature_kimg <= 100_000:
        raise UserError(f"--feature-kimg {feature_kimg:g} must lie in 0..100000 (0: train the feature net later).")
    prepared = prepare(sources, out, options, log=log)
    if feature_kimg > 0 and len(prepared.heldout) < 2:
        log(f"no feature net: {len(prepared.heldout)} held-out image cannot give reference statistics; raise "
            "--heldout and prepare again to measure an FD")
    elif feature_kimg > 0:
        train_features(out, feature_kimg, device=device, log=log)
    return prepared


def train_features(data_dir: str | Path, kimg: float = FEATURE_KIMG, *, device: str | torch.device | None = "auto",
                   log=print) -> dict:
    """Train DATA_DIR's feature net (a classifier on its labels, else rotation prediction) and its held-out
    reference statistics, which every FD of the data set is measured in; returns features.json's fields."""
    if not 0 < kimg <= 100_000:
        raise UserError(f"--feature-kimg {kimg:g} must lie in (0, 100000].")
    return train_feature_net(data_dir, kimg=kimg, device=pick_device(device), log=log)


def _items(overrides: Sequence[str] | Mapping) -> list[str]:
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={_toml(v)}" for k, v in overrides.items()] \
        if isinstance(overrides, Mapping) else list(overrides)


def _toml(value) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


# ---------------------------------------------------------------------------------------------
# Runs: train, distill, evaluate.


def train(config: str | Path | Config | None, out: str | Path, overrides: Sequence[str] | Mapping = (), *,
          data: str | Path | None = None, device: str | torch.device | None = "auto", progress: bool | None = None,
          log=print) -> Path:
    """Train (or resume) a run in `out` from a preset name, a TOML file or a Config, with overrides.

    data: a prepared data set (`diffuse data prepare`) to train on instead of the config's; with no
    config named, the `fmnist` preset's diffusion and training with the net and batch that
    `nets.sized_for` picks for the data set's resolution and channels.
    """
    config = make_config(*with_data(config, overrides, data))
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


def draw_from_run(model: Model, n: int | None, progress: bool | None, settings: dict) -> Samples:
    """n of the run's samples to measure (default: its sample.n_eval), with the run's sampler settings
    and `settings` on top."""
    show = sys.stderr.isatty() if progress is None else progress
    return model.sample(n or model.config.sample.n_eval, progress=show, **settings)


def measured_model(source: Path, n: int | None, ema: float | None, device, data: str | Path | None = None) -> Model:
    """The model of a run whose samples are to be measured, with n (if given) checked first."""
    if n is not None and (not isinstance(n, int) or n < 2):
        raise UserError(f"--n {n} must be at least 2 to fit a covariance.")
    return load(source, ema, device=device, data=data)


def evaluate(source: str | Path, n: int | None = None, *, ema: float | None = None, features: str = "fmnist",
             device: str | torch.device | None = "auto", progress: bool | None = None, data: str | Path | None = None,
             **settings) -> dict:
    """FD and class accuracy of a samples .npz (in `features`), or of n samples drawn from a run (default:
    its sample.n_eval; in its data set's features, from `data` where its DATA_DIR lies now) with the run's
    sampler settings and any given on top. A super-resolution run adds its consistency, PSNR and the
    upsampling baselines'."""
    source = Path(source)
    if not source.is_dir() and data is not None:
        raise UserError("--data gives a run's data set; a samples file is measured in --features DATA_DIR.")
    if not source.is_dir():
        images, labels = load_npz(source)
        try:
            return {"source": str(source), "features": features, **evaluate_features(features, images, labels)}
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    model = measured_model(source, n, ema, device, data)
    ds = model.dataset
    if not ds.at_hand:
        raise UserError(f"{source} measures its FD in its data set's own feature net, and {model.config.data.path} "
                        "is not there; give its DATA_DIR with --data.")
    if ds.features is None:
        hint = (f"; train one with `diffuse data features {model.config.data.path}`" if model.config.data.path
                else "")
        raise UserError(f"{source} is a {ds.name} run, which has no feature network to measure an FD in{hint}.")
    drawn = draw_from_run(model, n, progress, settings)
    if not distributed.is_main():  # every rank sampled its block; rank 0 measures
        return {}
    images, labels = drawn
    result = {"source": str(source), "features": ds.features, **evaluate_features(ds.features, images, labels)}
    if ds.condition == "image" and ds.factor > 1:  # super-resolution: its measures and the upsampling baselines'
        result |= evaluate_superres(images, labels, ds.eval_truth(len(images)).numpy(), ds.factor)
    return result | drawn.settings


def images_of(source: str | Path, n: int | None = None, *, ema: float | None = None,
              device: str | torch.device | None = "auto", progress: bool | None = None,
              data: str | Path | None = None, **settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images, labels, sampler settings) of a samples .npz, or of n samples drawn from a run (default:
    its sample.n_eval) with the run's sampler settings and any given on top; empty on ranks other than 0."""
    source = Path(source)
    if not source.is_dir() and data is not None:
        raise UserError("--data gives a run's data set; a samples file is measured in --features DATA_DIR.")
    if not source.is_dir():
        images, labels = load_npz(source)
        return images, labels, {}
    model = measured_model(source, n, ema, device, data)
    if not model.dataset.is_image:
        raise UserError(f"{source} is a {model.dataset.name} run of points, not images; FID measures images.")
    drawn = draw_from_run(model, n, progress, settings)
    return drawn.images, drawn.labels, drawn.settings


def fid_of(source: str | Path, ref: str | Path, n: int | None = None, *, split: str | None = None,
           device: str | torch.device | None = "auto", **options) -> dict:
    """FID (Inception-v3, the TF 2015-12-05 weights) against the reference statistics in `ref` (EDM's .npz
    with mu and sigma, e.g. from `write_fid_reference`) of a samples .npz, of a prepared DATA_DIR's split,
    or of n samples of a run (see `fid_stats_of`)."""
    reference = read_reference(ref)  # a bad file is found before the slow part
    stats, settings = fid_stats_of(source, n, split, device=device, **options)
    if stats is None:
        return {}
    return {"source": str(source), "features": "inception", "fid": fid(stats, reference), "n": stats.n,
            "ref": str(ref)} | settings


def write_fid_reference(source: str | Path, out: str | Path, n: int | None = None, *, split: str | None = None,
                        device: str | torch.device | None = "auto", **options) -> dict:
    """Write the Inception statistics of a samples .npz, of a prepared DATA_DIR's split (default: its
    training images) or of n samples of a run to `out`, as EDM's reference .npz; returns {"n", "ref"}."""
    out = Path(out)
    if out.exists() and not out.is_file():
        raise UserError(f"--write-ref {out} is a folder; give the path of an .npz file to write.")
    if out.exists():  # replace only a reference file, never someone's other file
        try:
            read_reference(out)
        except UserError:
            raise UserError(f"--write-ref {out} exists and is not a reference .npz; choose a new path.") from None
    stats, settings = fid_stats_of(source, n, split, device=device, **options)
    if stats is None:
        return {}
    if stats.n < 2:
        raise UserError(f"reference statistics need at least 2 images; {source} has {stats.n}.")
    write_reference(out, stats)
    return {"source": str(source), "n": stats.n, "ref": str(out)} | settings


def fid_stats_of(source: str | Path, n: int | None = None, split: str | None = None, *,
                 device: str | torch.device | None = "auto", **options) -> tuple[FeatureStats | None, dict]:
    """(Inception FeatureStats, what was measured) of a samples .npz, of the first n images (default: all)
    of a prepared DATA_DIR's split ("train", the default; "test", its held-out images; or "all"), or of n
    samples of a run; (None, {}) on ranks other than 0."""
    source = Path(source)
    if is_data_dir(source):
        if options.get("data") is not None:
            raise UserError("--data gives a run's data set; this source is a DATA_DIR itself.")
        prepared, split = open_prepared(source), split or "train"
        rows = split_rows(prepared, split, n)
        if not distributed.is_main():
            return None, {}
        return inception_stats(prepared.images, pick_device(device), rows=rows), {"split": split}
    if split is not None:
        raise UserError(f"--split picks images of a prepared DATA_DIR; {source} is not one.")
    images, _, settings = images_of(source, n, device=device, **options)
    if not distributed.is_main():
        return None, {}
    return inception_stats(images, pick_device(device)), settings


def split_rows(prepared: Prepared, split: str, n: int | None) -> np.ndarray:
    """The first n (default: all) row indices of a prepared data set's split: train, test (held out) or all."""
    if split not in SPLITS:
        raise UserError(f"--split {split} is not one of {', '.join(SPLITS)}.")
    if split == "all":
        rows = np.arange(prepared.meta["count"])
    else:
        rows = prepared.train_index if split == "train" else prepared.heldout
    if n is not None and not 2 <= n <= len(rows):
        raise UserError(f"--n {n} must be between 2 and the {len(rows)} images of {prepared.path}'s {split} split.")
    return rows[:n]


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
    check_checkpoint_out(Path(out))
    check_writable(Path(out) / "manifest.json", "--out")
    checkpoint = checkpoint_at(run_dir, at)
    config, tensors, state = load_checkpoint(checkpoint)
    check_run_config(checkpoint, config)
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
    if type(n) is not int or not 2 <= n <= MAX_SAMPLES:
        raise UserError(f"--n {n} must be from 2 (to fit a covariance) to {MAX_SAMPLES}.")
    check_run(run_dir, "RUN_DIR")
    with run_lock(run_dir, "ema --sweep") if distributed.is_main() else contextlib.nullcontext():
        for name in SWEEP_FILES:
            check_file_out(run_dir / name, "RUN_DIR")
        return _sweep(run_dir, sigma_rels, n, at, device, log, settings)


def _sweep(run_dir: Path, sigma_rels: Sequence[float], n: int, at: float | None, device, log, settings: dict) -> dict:
    """The sweep of `ema_sweep`, in a run directory whose lock it holds."""
    checkpoint, rows = checkpoint_at(run_dir, at), []
    if distributed.is_main():  # before the sampling, which takes minutes
        for name in ("ema_sweep.json", "ema_sweep.svg", "report.html"):
            check_writable(run_dir / name, "the sweep's output")
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
    (run_dir / "ema_sweep.svg").write_text(ema_sweep_plot(rows, fd_name(model.dataset.features)))
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
        check_run(run_dir, "--run")
        resolved, label = read_config(run_dir / "config.toml"), str(run_dir)
    else:
        resolved = make_config(config, overrides)
        label = " ".join([str(config or "defaults"), *(f"--set {s}" for s in overrides)])
    cache = (early_loss_cache(), "the doctor's cache (set XDG_CACHE_HOME to move it)")
    if run_dir is None:
        check_writable(*cache)  # before the checks, which take a minute
        return label, run_doctor(resolved, pick_device(device), run_dir, steps, label, progress=progress)
    with run_lock(run_dir, "doctor --run") if distributed.is_main() else contextlib.nullcontext():
        for name in DOCTOR_FILES:
            check_file_out(run_dir / name, "--run")
        for path, what in [(run_dir / "doctor.json", "the run's doctor.json"), (run_dir / "report.html",
                                                                                "the run's report"), cache]:
            check_writable(path, what)
        checks = run_doctor(resolved, pick_device(device), run_dir, steps, label, progress=progress)
        if distributed.is_main():
            write_doctor_json(run_dir / "doctor.json", label, checks)
            write_report(run_dir)
    return label, checks
