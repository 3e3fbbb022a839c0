"""The `diffuse` command: train, sample, eval, distill, ema, doctor, bench.

Every mistake a user can make ends in one sentence on stderr and exit code 2, with no traceback;
a diverged run exits with 3, an interrupted one with 75 after writing a checkpoint (`diffuse.errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffuse import distributed
from diffuse.bench import format_report, run_bench
from diffuse.checkpoint import load_checkpoint, load_denoiser, resolve_checkpoint, verify, write_checkpoint
from diffuse.config import Config, load_config, read_config, validate
from diffuse.diagnostics import EARLY_STEPS, EARLY_WINDOW, doctor_report, format_table, run_doctor, write_doctor_json
from diffuse.data import Scaling, data_shape, eval_conditions, eval_images
from diffuse.errors import Diverged, Interrupted, UserError
from diffuse.images import load_npz, rows_by_label, save_grid, save_npz, save_scatter
from diffuse.metrics.fmnist_fd import evaluate_images
from diffuse.metrics.superres import evaluate_superres, first_of_each_class, panel
from diffuse.process import SPACINGS
from diffuse.distill import distill, student_config
from diffuse.ema import PHEMA_DIR, reconstruct
from diffuse.report import ema_sweep_plot, write_report
from diffuse.sampling import SAMPLERS, sample
from diffuse.seeding import image_seeds
from diffuse.train import train


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see `{self.prog} --help`.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        distributed.start()  # under torchrun or accelerate launch: join the other ranks
        with contextlib.redirect_stdout(sys.stdout if distributed.is_main() else io.StringIO()):
            return args.run(args) or 0  # ranks other than 0 print nothing but errors
    except (UserError, Diverged, Interrupted) as e:
        print(f"diffuse: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk or a read-only folder met outside the writes that check for it
        where = f" {e.filename}" if e.filename else ""
        print(f"diffuse: could not read or write{where} ({e.strerror or e}); free disk space or fix the "
              "permissions and re-run: a training run resumes from its newest whole checkpoint.", file=sys.stderr)
        return 2
    finally:
        distributed.stop()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="diffuse", description="Train, sample and measure diffusion models.")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)

    p = sub.add_parser("train", help="train a model, or resume the run in --out")
    p.add_argument("--preset", help="a preset name, e.g. fmnist, fmnist-tiny, toy2d")
    p.add_argument("--config", help="a TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a run or checkpoint into an .npz")
    p.add_argument("source", help="RUN_DIR or RUN_DIR/checkpoints/step-NNNNNNN")
    p.add_argument("--n", "--num-samples", dest="n", type=int, required=True,
                   help="number of samples (under torchrun write --num-samples: torchrun's parser claims --n)")
    add_sampler_flags(p)
    p.add_argument("--labels", default="all", help="'all' (cycle through the classes), 'none', or e.g. 0,3,7")
    p.add_argument("--seed", type=int, default=0, help="sample i uses a seed derived from (seed, i)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--out", required=True, help="samples file, .npz")
    p.add_argument("--grid", help="also write a PNG grid (or a scatter plot for 2-D data)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("eval", help="FD-FMNIST and class accuracy of a samples file or a run")
    p.add_argument("source", help="samples .npz, or a RUN_DIR to sample from first")
    p.add_argument("--n", "--num-samples", dest="n", type=int,
                   help="samples drawn from a run (default: its sample.n_eval); --num-samples under torchrun")
    add_sampler_flags(p)
    p.add_argument("--features", choices=("fmnist",), default="fmnist")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("distill", help="distill a trained run into a one-step (or few-step) generator: DMD, DMD2")
    p.add_argument("teacher", metavar="TEACHER_RUN", help="the trained teacher's run directory")
    p.add_argument("--preset", default="dmd2", help="dmd or dmd2 (default), or their -tiny versions")
    p.add_argument("--config", help="a TOML file with [distill], [train] and [sample] sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a distill.*, train.* or sample.* key")
    p.add_argument("--out", required=True, help="the student's run directory (re-running resumes it)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_distill)

    p = sub.add_parser("ema", help="post-hoc EMA: reconstruct any EMA length from a run's snapshots, or sweep FD")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with train.ema = \"power\"")
    p.add_argument("--sigma-rel", type=float, help="the EMA length to reconstruct into --out")
    p.add_argument("--at", type=float, metavar="KIMG", help="a snapshot time with a checkpoint (default: the newest)")
    p.add_argument("--out", help="the checkpoint folder to write, for `diffuse sample` and `diffuse eval`")
    p.add_argument("--sweep", action="store_true",
                   help="FD-FMNIST over a range of sigma_rel: RUN_DIR/ema_sweep.json and ema_sweep.svg")
    p.add_argument("--sigma-rels", default="0.02,0.03,0.05,0.07,0.10,0.13,0.16,0.20,0.25",
                   help="the sweep's values, comma-separated")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=2000,
                   help="samples per sigma_rel in the sweep; --num-samples under torchrun")
    add_sampler_flags(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_ema)

    p = sub.add_parser("doctor", help="sanity checks that catch silent training bugs: a pass/fail table")
    p.add_argument("--preset", help="a preset name, e.g. fmnist, fmnist-tiny, toy2d")
    p.add_argument("--config", help="a TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR",  # `run` holds the command function
                   help="check a training run: its config, its EMA weights; writes RUN_DIR/doctor.json")
    p.add_argument("--steps", type=int, default=EARLY_STEPS,
                   help="training steps of the early-loss check, whose model the leak check reads without --run")
    p.add_argument("--json", action="store_true", help="print the doctor.json object instead of the table")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_doctor)

    p = sub.add_parser("bench", help="training and sampling throughput on this machine, against its matmul peak")
    p.add_argument("--preset", help="a preset name (default: fmnist)")
    p.add_argument("--config", help="a TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.precision=bf16 (default: fp32 and bf16 side by side)")
    p.add_argument("--what", choices=("train", "sample", "all"), default="all")
    p.add_argument("--batch", type=int, help="images per training step and per sampler call "
                                             "(default: the config's train.batch and sample.batch)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps of each variant (fp32 and bf16 "
                                                          "take turns, one step each), after untimed warm-up steps")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's train.threads, else "
                                               "torch's default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_bench)
    return parser


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override the run's [sample] config (unset ones keep it), and the EMA to sample."""
    p.add_argument("--ema", type=float, metavar="SIGMA_REL",
                   help="sample the power-function EMA of this length, reconstructed post hoc (train.ema = power)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=int)
    p.add_argument("--spacing", choices=SPACINGS)
    p.add_argument("--eta", type=float)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1]")
    p.add_argument("--churn", type=float, dest="S_churn", help="heun: EDM's stochastic churn S_churn (0 = none)")


def pick_device(name: str) -> torch.device:
    """The --device, "auto" being CUDA where there is one; under a launcher each rank its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu, cuda or cuda:N.") from None
    return distributed.rank_device(device)


# ---------------------------------------------------------------------------------------------


def cmd_train(args) -> None:
    config = load_config(args.preset, args.config, args.set)
    if config.distill.method != "none":
        raise UserError(f"distill.method '{config.distill.method}' is for `diffuse distill TEACHER_RUN`; "
                        "`diffuse train` trains a model from scratch.")
    train(config, Path(args.out), device=pick_device(args.device))


def cmd_distill(args) -> None:
    """The student's config is the teacher's, with the preset's [distill], [train] and [sample] on top."""
    teacher_dir = Path(args.teacher)
    for item in args.set:
        if item.partition("=")[0].strip().split(".")[0] not in ("distill", "train", "sample"):
            raise UserError(f"--set {item!r}: a student takes its data, process and model from the teacher; "
                            "set only distill.*, train.* and sample.* keys.")
    settings = load_config(args.preset if not args.config else None, args.config, args.set)
    if settings.distill.method == "none":
        raise UserError("distill.method is 'none'; use --preset dmd or dmd2, or set distill.method.")
    teacher_config, _ = load_denoiser(teacher_dir, "ema")
    if teacher_config.distill.method != "none":
        raise UserError(f"{teacher_dir} is itself a distilled student; distill a trained run.")
    config = student_config(teacher_config, settings, teacher_dir)
    validate(config)
    distill(config, teacher_dir, Path(args.out), device=pick_device(args.device))


def cmd_sample(args) -> None:
    if args.n < 1:
        raise UserError(f"--n {args.n} must be at least 1.")
    config, x, labels, _ = draw(Path(args.source), args.n, args.labels, args.seed, args.weights, args)
    if not distributed.is_main():
        return
    if config.data.name == "toy2d":
        points = x.numpy()
        np.savez(args.out, points=points, labels=labels.numpy())
        if args.grid:
            save_scatter(Path(args.grid), points, labels.numpy())
    else:
        images = Scaling(config.data.mean, config.data.std).decode(x).numpy()
        save_npz(Path(args.out), images, labels.numpy())
        if args.grid and config.data.task == "superres":  # rows: low-res input, sample, truth
            truth = eval_images(args.n)[0].numpy()
            cols = first_of_each_class(labels.numpy())
            save_grid(Path(args.grid), panel(images[cols], truth[cols], config.data.factor), nrow=len(cols))
        elif args.grid:
            save_grid(Path(args.grid), images[rows_by_label(labels.numpy())], nrow=10)
    print(f"wrote {args.n} samples to {args.out}")


def cmd_eval(args) -> None:
    source = Path(args.source)
    if source.is_dir():
        config, x, labels, settings = draw(source, args.n, "all", 0, "ema", args)
        if not distributed.is_main():  # every rank sampled its block; rank 0 measures and prints
            return
        if config.data.name != "fmnist":
            raise UserError(f"{source} is a {config.data.name} run; FD-FMNIST needs a Fashion-MNIST run.")
        images = Scaling(config.data.mean, config.data.std).decode(x).numpy()
        labels = labels.numpy()
        superres = {}  # a super-resolution run also gets its measures and the upsampling baselines'
        if config.data.task == "superres":
            truth = eval_images(len(images))[0].numpy()
            superres = evaluate_superres(images, labels, truth, config.data.factor)
    else:
        images, labels = load_npz(source)
        settings, superres = {}, {}
    result = {"source": str(source), **evaluate_images(images, labels), **superres, **settings}
    if args.json:
        print(json.dumps(result))
    else:
        acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
        print(f"FD-FMNIST {result['fd']:.3f} over {result['n']} samples (reference {result['n_ref']} test "
              f"images); class accuracy {acc}")
        if superres:
            print(f"super-resolution: consistency RMSE {result['consistency']:.4f} (against other images' "
                  f"inputs {result['consistency_shuffled']:.4f}), PSNR {result['psnr']:.2f} dB")
            for mode in ("nearest", "bilinear"):
                print(f"  {mode} upsampling: FD-FMNIST {result[f'{mode}_fd']:.3f}, consistency RMSE "
                      f"{result[f'{mode}_consistency']:.4f}, PSNR {result[f'{mode}_psnr']:.2f} dB")


def draw(source: Path, n: int | None, labels_text: str, seed: int, weights: str, args):
    """(config, samples in model space, labels, sampler settings) drawn from a run or checkpoint.

    A super-resolution run samples from the low-res versions of the first n test images
    (`data.eval_conditions`), and its labels are those images' classes. Under a launcher each rank
    samples its block of the images and every rank gets all of them.
    """
    config, denoiser = load_denoiser(source, weights, pick_device(args.device), sigma_rel=args.ema)
    settings = sampler_settings(config, args)
    n = n or config.sample.n_eval
    shape, num_classes = data_shape(config.data.name)
    if config.data.task == "superres":  # conditioned on the low-res first n test images; labels: their classes
        if labels_text != "all":
            raise UserError(f"--labels {labels_text} does not apply to a super-resolution run, which is "
                            "conditioned on low-res test images; leave --labels out.")
        cond, labels = eval_conditions(config.data, Scaling(config.data.mean, config.data.std), n)
    else:
        cond = labels = parse_labels(labels_text, n, num_classes)
    mine = distributed.block(n)  # under a launcher each rank samples its block of the images
    x = sample(denoiser, shape, cond[mine], image_seeds(seed, n)[mine], progress=sys.stderr.isatty(), **settings)
    return config, distributed.gather(x, n), labels, settings


def sampler_settings(config: Config, args) -> dict:
    """The run's sampler settings with the command-line flags that were given on top, validated
    against the run's config (e.g. the euler sampler needs a rectified-flow run)."""
    settings = config.sample.sampler_args()
    for key in ("sampler", "steps", "spacing", "eta", "cfg", "rescale", "S_churn"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["steps"] < 1:
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


def parse_labels(text: str, n: int, num_classes: int) -> torch.Tensor:
    """'all' -> 0, 1, ..., C-1, 0, ...; 'none' -> -1 (unconditional); '3,5' -> 3, 5, 3, 5, ..."""
    if text == "all":
        return torch.arange(n) % num_classes
    if text == "none":
        return torch.full((n,), -1, dtype=torch.long)
    try:
        chosen = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--labels {text!r} is not 'all', 'none' or a comma-separated list of classes.") from None
    if any(not 0 <= v < num_classes for v in chosen):
        raise UserError(f"--labels {text!r} names a class outside 0..{num_classes - 1}.")
    return torch.tensor(chosen, dtype=torch.long).repeat(n // len(chosen) + 1)[:n]


def cmd_ema(args) -> None:
    """Reconstruct one EMA length into a checkpoint (--sigma-rel, --out), or sweep FD over many (--sweep)."""
    if args.sweep == (args.sigma_rel is not None) or (args.sigma_rel is not None) != (args.out is not None):
        raise UserError("give --sigma-rel S with --out CHECKPOINT, or --sweep; see `diffuse ema --help`.")
    if args.ema is not None:
        raise UserError("--ema does not apply to `diffuse ema`; give the length with --sigma-rel or --sigma-rels.")
    run_dir = Path(args.run_dir)
    checkpoint = checkpoint_at(run_dir, args.at)
    if args.out:
        config, tensors, state = load_checkpoint(checkpoint)
        if config.train.ema != "power":
            raise UserError(f"{run_dir} was trained with train.ema = \"{config.train.ema}\"; post-hoc EMA needs "
                            "\"power\".")
        weights = reconstruct(run_dir / PHEMA_DIR, args.sigma_rel, at_nimg=state["nimg"])
        path = write_checkpoint(Path(args.out), config, {"model": tensors["model"], "ema": weights},
                                {"step": state["step"], "nimg": state["nimg"], "ema_sigma_rel": args.sigma_rel})
        print(f"wrote the EMA with sigma_rel {args.sigma_rel} at {state['nimg'] / 1000:g} kimg to {path}")
        return
    try:
        sigma_rels = [float(v) for v in args.sigma_rels.split(",")]
    except ValueError:
        raise UserError(f"--sigma-rels {args.sigma_rels!r} is not a comma-separated list of numbers.") from None
    if args.n < 2:
        raise UserError(f"--n {args.n} must be at least 2 to fit a covariance.")
    rows = []
    for sigma_rel in sigma_rels:
        args.ema = sigma_rel
        config, x, labels, settings = draw(checkpoint, args.n, "all", 0, "ema", args)
        if not distributed.is_main():  # every rank samples its block; rank 0 measures
            continue
        result = evaluate_images(Scaling(config.data.mean, config.data.std).decode(x).numpy(), labels.numpy())
        rows.append({"sigma_rel": sigma_rel, "fd": result["fd"], "accuracy": result["accuracy"]})
        print(f"sigma_rel {sigma_rel:.3f}: FD-FMNIST {result['fd']:.3f}, class accuracy {result['accuracy']:.3f}")
    if not distributed.is_main():
        return
    tracked = config.train.ema_sigma_rels[0]
    best = min(rows, key=lambda r: r["fd"])
    sweep = {"checkpoint": str(checkpoint), "n": args.n, **settings, "tracked_sigma_rel": tracked,
             "best": best, "rows": rows}
    (run_dir / "ema_sweep.json").write_text(json.dumps(sweep, indent=1))
    (run_dir / "ema_sweep.svg").write_text(ema_sweep_plot(rows))
    write_report(run_dir)
    print(f"best sigma_rel {best['sigma_rel']:g} (FD {best['fd']:.3f}); the run tracked {tracked:g}; "
          f"wrote {run_dir / 'ema_sweep.json'}, ema_sweep.svg and the report's post-hoc EMA section")


def checkpoint_at(run_dir: Path, kimg: float | None) -> Path:
    """The run's checkpoint at `kimg` thousand images, or its newest whole one."""
    if kimg is None:
        return resolve_checkpoint(run_dir)
    for path in sorted((run_dir / "checkpoints").glob("step-*")):
        if verify(path) is None and json.loads((path / "state.json").read_text())["nimg"] == round(kimg * 1000):
            return path
    raise UserError(f"{run_dir} has no whole checkpoint at {kimg:g} kimg; leave out --at for the newest.")


def cmd_doctor(args) -> int:
    """Run the checks; exit code 1 when one fails (a finding, not a usage error)."""
    if args.steps < EARLY_WINDOW:
        raise UserError(f"--steps {args.steps} is too few; the early loss is averaged over the last "
                        f"{EARLY_WINDOW} steps, so give at least {EARLY_WINDOW}.")
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None:
        if args.preset or args.config or args.set:
            raise UserError("--run takes the config from the run; leave out --preset, --config and --set.")
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"{run_dir} is not a diffuse run directory (no config.toml); give the --out of a "
                            "training run.")
        config, label = read_config(run_dir / "config.toml"), str(run_dir)
    else:
        config = load_config(args.preset, args.config, args.set)
        label = " ".join([args.preset or args.config or "defaults", *(f"--set {s}" for s in args.set)])
    start = time.perf_counter()
    checks = run_doctor(config, pick_device(args.device), run_dir, args.steps, label, progress=sys.stderr.isatty())
    if run_dir is not None:
        write_doctor_json(run_dir / "doctor.json", label, checks)
        write_report(run_dir)
    failed = [c.name for c in checks if not c.passed]
    if args.json:
        print(json.dumps(doctor_report(label, checks)))
    else:
        print(format_table(checks))
        print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed in {time.perf_counter() - start:.0f} s"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_bench(args) -> None:
    for flag, value, least in (("--batch", args.batch, 1), ("--steps", args.steps, 1), ("--threads", args.threads, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value} must be at least {least}.")
    preset = args.preset or (None if args.config else "fmnist")
    config = load_config(preset, args.config, args.set)
    if config.distill.method != "none":
        raise UserError(f"distill.method '{config.distill.method}' is for `diffuse distill`; `diffuse bench` "
                        "measures the training step and the sampler of a model preset such as fmnist.")
    threads = args.threads if args.threads is not None else config.train.threads
    if threads:
        torch.set_num_threads(threads)
    result = run_bench(config, preset or args.config, args.set, args.what, args.batch, args.steps,
                       pick_device(args.device))
    print(json.dumps(result) if args.json else format_report(result))


if __name__ == "__main__":
    sys.exit(main())
