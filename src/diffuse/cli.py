"""The `diffuse` command: parses the arguments, calls `diffuse.api` and prints.

Every mistake a user can make ends in one sentence on stderr and exit code 2, with no traceback;
a diverged run exits with 3, an interrupted one with 75 after writing a checkpoint (`diffuse.errors`);
a signal anywhere else ends any command in one line with 130 (SIGINT) or 143 (SIGTERM) (`diffuse.signals`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

from diffuse import api, distributed, preparing
from diffuse.bench import format_report, run_bench
from diffuse.config import load_config
from diffuse.diagnostics import EARLY_STEPS, doctor_report, format_table
from diffuse.errors import Diverged, Interrupted, UserError
from diffuse.files import check_writable, failure
from diffuse.metrics.features import fd_name
from diffuse.outputs import check_samples_out
from diffuse.prepared import verify_prepared
from diffuse.process import SPACINGS
from diffuse.sampling import SAMPLERS
from diffuse.signals import Stopped, stopped_by_signals
from diffuse.speed import PRECISIONS


def finite(text: str) -> float:
    """A number flag: float() takes 'nan' and 'inf', which no flag here means."""
    value = float(text)  # a ValueError becomes argparse's "invalid finite value: 'x'"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see `{self.prog} --help`.")


def main(argv: list[str] | None = None) -> int:
    with stopped_by_signals() as guard:
        parser, command = build_parser(), "start-up"
        try:
            try:
                args = parser.parse_args(argv)
                if args.command is None:
                    parser.print_help()
                    return 2
                command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
                distributed.start()  # under torchrun or accelerate launch: join the other ranks
                with contextlib.redirect_stdout(sys.stdout if distributed.is_main() else io.StringIO()):
                    return args.run(args) or 0  # ranks other than 0 print nothing but errors
            finally:
                guard.ignore()  # a signal from here on would tear the line below: ignored
        except Stopped as e:
            print(f"diffuse: interrupted by {e.name} during {command}; {KEPT.get(command, KEPT[None])}",
                  file=sys.stderr)
            return e.exit_code
        except (UserError, Diverged, Interrupted) as e:
            print(f"diffuse: {e}", file=sys.stderr)
            return e.exit_code
        except OSError as e:  # a read or write met outside the ones that name their file
            print(f"diffuse: {failure(e.filename or 'a file', e, 'read or write')}", file=sys.stderr)
            return 2
        finally:
            distributed.stop()


# What a command interrupted by a signal leaves behind (`diffuse.signals`).
KEPT = {
    "train": "the checkpoints already written are intact; re-run the same command to resume.",
    "distill": "the checkpoints already written are intact; re-run the same command to resume.",
    "data prepare": "no DATA_DIR was written or replaced, and no partial file is left.",
    None: "the files written before it are intact, and no partial file is left.",
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="diffuse", description="Train, sample and measure diffusion models.")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)

    p = sub.add_parser("train", help="train a model, or resume the run in --out")
    add_config_flags(p)
    p.add_argument("--data", metavar="DATA_DIR", help="train on a data set made by `diffuse data prepare` "
                   "(without --preset: a net and batch sized for its resolution and channels)")
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    p.set_defaults(run=cmd_train)
    add_sampling_commands(sub)
    add_data_commands(sub)
    add_other_commands(sub)
    return parser


def add_data_commands(sub) -> None:
    """data prepare and data verify: a user's own images, converted once into DATA_DIR."""
    data = sub.add_parser("data", help="prepare your own images into a DATA_DIR, or verify one")
    group = data.add_subparsers(dest="data_command", parser_class=ArgumentParser, required=True)
    p = group.add_parser("prepare", help="convert a folder, CIFAR tarball, IDX folder, .npy/.npz or Hugging Face "
                                         "data set into DATA_DIR")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="the data; two folders: conditions, then targets")
    p.add_argument("--out", required=True, help="DATA_DIR: a new path, an empty folder, or a DATA_DIR to replace")
    p.add_argument("--resolution", type=int, help="R, 16..256: shorter side to R, centre crop (default: the "
                                                  "images' own size where all are square and equal)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="default: 1 when every image is grey, else 3")
    p.add_argument("--crop", choices=("center", "refuse"), default="center", help="refuse: non-square images are an error")
    p.add_argument("--cond-resolution", type=int, help="paired data: the conditions' size (default: R)")
    p.add_argument("--cond-channels", type=int, choices=(1, 3), help="paired data: the conditions' channels")
    p.add_argument("--labels", help="a label file (default: dataset.json or labels.csv in the folder)")
    p.add_argument("--limit", type=int, help="only the first N examples, in sorted order")
    p.add_argument("--heldout", type=finite, default=0.1, help="held-out fraction where the source has no test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    p.add_argument("--name", help="the data set's name (default: the source's folder or file name)")
    p.add_argument("--image-column", help="Hugging Face: the image column (default: the first Image)")
    p.add_argument("--label-column", help="Hugging Face: the label column (default: the first ClassLabel)")
    add_feature_flags(p, "then train the data set's FD feature net for this many thousand images (0: not now)")
    p.set_defaults(run=cmd_data_prepare)
    p = group.add_parser("features", help="train (again) a DATA_DIR's own feature net, which its FD is measured in")
    p.add_argument("data_dir", metavar="DATA_DIR")
    add_feature_flags(p, "thousands of training images (a classifier on the labels, else rotation prediction)")
    p.set_defaults(run=cmd_data_features)
    p = group.add_parser("verify", help="check a DATA_DIR: every field, header and SHA-256")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.set_defaults(run=cmd_data_verify)


def add_sampling_commands(sub) -> None:
    """sample, eval and ema: the commands that draw from a trained run."""
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
    add_data_flag(p)
    add_device_flag(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("eval", help="FD-FMNIST and class accuracy of a samples file or a run")
    p.add_argument("source", help="samples .npz, a RUN_DIR to sample from first, or (inception) a DATA_DIR")
    p.add_argument("--n", "--num-samples", dest="n", type=int,
                   help="samples drawn from a run (default: its sample.n_eval); --num-samples under torchrun")
    add_sampler_flags(p)
    p.add_argument("--features", default="fmnist", metavar="fmnist|inception|DATA_DIR",
                   help="of a samples .npz (a run is measured in its data set's own): fmnist: FD-FMNIST and class "
                        "accuracy; DATA_DIR: FD in a prepared data set's own feature net; inception: FID against "
                        "--ref (extra install: bash scripts/setup.sh fid)")
    p.add_argument("--ref", metavar="STATS.npz", help="inception: the reference statistics (EDM's .npz: mu, sigma)")
    p.add_argument("--write-ref", metavar="STATS.npz",
                   help="inception: write the source's statistics as a reference .npz instead of measuring")
    p.add_argument("--split", choices=api.SPLITS,
                   help="inception, a DATA_DIR source: its training images (default), its held-out ones, or all")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_data_flag(p)
    add_device_flag(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("ema", help="post-hoc EMA: reconstruct any EMA length from a run's snapshots, or sweep FD")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with train.ema = \"power\"")
    p.add_argument("--sigma-rel", type=finite, help="the EMA length to reconstruct into --out")
    p.add_argument("--at", type=finite, metavar="KIMG", help="a snapshot time with a checkpoint (default: the newest)")
    p.add_argument("--out", help="the checkpoint folder to write, for `diffuse sample` and `diffuse eval`")
    p.add_argument("--sweep", action="store_true",
                   help="FD-FMNIST over a range of sigma_rel: RUN_DIR/ema_sweep.json and ema_sweep.svg")
    p.add_argument("--sigma-rels", default="0.02,0.03,0.05,0.07,0.10,0.13,0.16,0.20,0.25",
                   help="the sweep's values, comma-separated")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=2000,
                   help="samples per sigma_rel in the sweep; --num-samples under torchrun")
    add_sampler_flags(p)
    add_device_flag(p)
    p.set_defaults(run=cmd_ema)


def add_other_commands(sub) -> None:
    """distill, doctor and bench."""
    p = sub.add_parser("distill", help="distill a trained run into a one-step (or few-step) generator: DMD, DMD2")
    p.add_argument("teacher", metavar="TEACHER_RUN", help="the trained teacher's run directory")
    add_config_flags(p, preset="dmd2", preset_help="dmd or dmd2 (default), or their -tiny versions",
                     config_help="a TOML file with [distill], [train] and [sample] sections",
                     set_help="override a distill.*, train.* or sample.* key")
    p.add_argument("--out", required=True, help="the student's run directory (re-running resumes it)")
    p.set_defaults(run=cmd_distill)

    p = sub.add_parser("doctor", help="sanity checks that catch silent training bugs: a pass/fail table")
    add_config_flags(p)
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR",  # `run` holds the command function
                   help="check a training run: its config, its EMA weights; writes RUN_DIR/doctor.json")
    p.add_argument("--steps", type=int, default=EARLY_STEPS,
                   help="training steps of the early-loss check, whose model the leak check reads without --run")
    p.add_argument("--json", action="store_true", help="print the doctor.json object instead of the table")
    p.set_defaults(run=cmd_doctor)

    p = sub.add_parser("bench", help="training and sampling throughput on this machine, against its matmul peak")
    add_config_flags(p, preset_help="a preset name (default: fmnist)",
                     set_help="override a config key, e.g. train.precision=bf16 (default: fp32 and bf16 side by side)")
    p.add_argument("--what", choices=("train", "sample", "all"), default="all")
    p.add_argument("--batch", type=int, help="images per training step and per sampler call "
                                             "(default: the config's train.batch and sample.batch)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps of each variant (fp32 and bf16 "
                                                          "take turns, one step each), after untimed warm-up steps")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's train.threads, else "
                                               "torch's default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_bench)


def add_config_flags(p: argparse.ArgumentParser, preset: str | None = None,
                     preset_help: str = "a preset name, e.g. fmnist, fmnist-tiny, toy2d",
                     config_help: str = "a TOML config file", set_help: str = "override a config key") -> None:
    """--preset, --config, --set and --device: how every command that builds a config is told which."""
    p.add_argument("--preset", default=preset, help=preset_help)
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    add_device_flag(p)


def add_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DATA_DIR", help="a run on a prepared data set: where its DATA_DIR lies now, "
                   "if it has moved (checked against the run's record of it)")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override the run's [sample] config (unset ones keep it), and the EMA to sample."""
    p.add_argument("--ema", type=finite, metavar="SIGMA_REL",
                   help="sample the power-function EMA of this length, reconstructed post hoc (train.ema = power)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=int)
    p.add_argument("--spacing", choices=SPACINGS)
    p.add_argument("--eta", type=finite)
    p.add_argument("--cfg", type=finite, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--rescale", type=finite, help="guidance rescale phi in [0, 1]")
    p.add_argument("--churn", type=finite, dest="S_churn", help="heun: EDM's stochastic churn S_churn (0 = none)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the net's forward passes (default: the run's sample.precision, auto: bf16 where native)")


def sampler_flags(args) -> dict:
    """The sampler settings given on the command line (None: keep the run's)."""
    return {key: getattr(args, key) for key in api.SETTINGS}


def config_source(args, preset_wins: bool = False):
    """What --preset or --config names, for `api.make_config`: a preset name, or a Path to a TOML file."""
    if args.config and args.preset and not preset_wins:
        raise UserError("give --preset or --config, not both.")
    return Path(args.config) if args.config else args.preset


def progress() -> bool:
    return sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------


def cmd_train(args) -> None:
    api.train(config_source(args), args.out, args.set, data=args.data, device=args.device)


def cmd_distill(args) -> None:
    """The student's config is the teacher's, with the preset's [distill], [train] and [sample] on top."""
    api.distill(args.teacher, args.out, config_source(args, preset_wins=True), args.set, device=args.device)


def cmd_sample(args) -> None:
    """Stream the samples into --out a chunk at a time, after checking --out and --grid can be written."""
    check_samples_out(Path(args.out), Path(args.grid) if args.grid else None)
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path:
            check_writable(Path(path), flag)  # before the sampling
    model = api.load(args.source, args.ema, weights=args.weights, device=args.device, data=args.data)
    labels = None if args.labels == "all" else args.labels
    model.save_samples(args.out, args.n, labels, seed=args.seed, progress=progress(), grid=args.grid,
                       **sampler_flags(args))
    print(f"wrote {args.n} samples to {args.out}")


def cmd_eval(args) -> None:
    if args.features == "inception":
        return cmd_fid(args)
    if args.ref or args.write_ref or args.split:
        raise UserError("--ref, --write-ref and --split are for --features inception; an FD's feature net has its own "
                        "reference.")
    result = api.evaluate(args.source, args.n, ema=args.ema, features=args.features, device=args.device,
                          progress=progress(), data=args.data, **sampler_flags(args))
    if not result:  # a rank other than 0
        return
    if args.json:
        print(json.dumps(result))
        return
    acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
    name = fd_name(result["features"])
    print(f"{name} {result['fd']:.3f} over {result['n']} samples (reference {result['n_ref']} held-out images); "
          f"class accuracy {acc}")
    if "consistency" in result:
        print(f"super-resolution: consistency RMSE {result['consistency']:.4f} (against other images' "
              f"inputs {result['consistency_shuffled']:.4f}), PSNR {result['psnr']:.2f} dB")
        for mode in ("nearest", "bilinear"):
            print(f"  {mode} upsampling: {name} {result[f'{mode}_fd']:.3f}, consistency RMSE "
                  f"{result[f'{mode}_consistency']:.4f}, PSNR {result[f'{mode}_psnr']:.2f} dB")


def cmd_fid(args) -> None:
    """FID against --ref, or (--write-ref) the source's Inception statistics written as a reference."""
    if (args.ref is None) == (args.write_ref is None):
        raise UserError("--features inception needs --ref STATS.npz to measure against, or --write-ref STATS.npz "
                        "to write the source's statistics; give one of them.")
    options = dict(split=args.split, ema=args.ema, device=args.device, progress=progress(), data=args.data,
                   **sampler_flags(args))
    if args.write_ref:
        result = api.write_fid_reference(args.source, args.write_ref, args.n, **options)
        if result:
            print(json.dumps(result) if args.json else f"wrote the Inception statistics of {result['n']} "
                                                         f"{what(result, 'images')} to {result['ref']}")
        return
    result = api.fid_of(args.source, args.ref, args.n, **options)
    if result:
        print(json.dumps(result) if args.json else f"FID {result['fid']:.3f} over {result['n']} "
                                                     f"{what(result, 'samples')} against {result['ref']}")


def what(result: dict, files: str) -> str:
    """What an FID result measured: `files` (of an .npz or a run), or "images (the test split)" of a DATA_DIR."""
    return f"images (the {result['split']} split)" if "split" in result else files


def cmd_ema(args) -> None:
    """Reconstruct one EMA length into a checkpoint (--sigma-rel, --out), or sweep FD over many (--sweep)."""
    if args.sweep == (args.sigma_rel is not None) or (args.sigma_rel is not None) != (args.out is not None):
        raise UserError("give --sigma-rel S with --out CHECKPOINT, or --sweep; see `diffuse ema --help`.")
    if args.ema is not None:
        raise UserError("--ema does not apply to `diffuse ema`; give the length with --sigma-rel or --sigma-rels.")
    if args.out:
        path = api.post_hoc_ema(args.run_dir, args.sigma_rel, args.out, args.at)
        print(f"wrote the EMA with sigma_rel {args.sigma_rel} to {path}")
        return
    try:
        sigma_rels = [float(v) for v in args.sigma_rels.split(",")]
    except ValueError:
        raise UserError(f"--sigma-rels {args.sigma_rels!r} is not a comma-separated list of numbers.") from None
    sweep = api.ema_sweep(args.run_dir, sigma_rels, args.n, args.at, device=args.device,
                          **{k: v for k, v in sampler_flags(args).items() if k != "ema"})
    if sweep:
        best = sweep["best"]
        print(f"best sigma_rel {best['sigma_rel']:g} (FD {best['fd']:.3f}); the run tracked "
              f"{sweep['tracked_sigma_rel']:g}; wrote {Path(args.run_dir) / 'ema_sweep.json'}, ema_sweep.svg and "
              "the report's post-hoc EMA section")


def cmd_data_prepare(args) -> None:
    names = [f.name for f in dataclasses.fields(preparing.PrepareOptions)]
    api.prepare_data(args.sources, args.out, preparing.PrepareOptions(**{k: getattr(args, k) for k in names}),
                     args.feature_kimg, device=args.device)


def add_feature_flags(p: argparse.ArgumentParser, kimg_help: str) -> None:
    p.add_argument("--feature-kimg", type=float, default=api.FEATURE_KIMG, help=kimg_help)
    add_device_flag(p)


def cmd_data_features(args) -> None:
    api.train_features(args.data_dir, args.feature_kimg, device=args.device)


def cmd_data_verify(args) -> None:
    prepared = verify_prepared(args.data_dir)
    print(f"{prepared.path}: {len(prepared.images)} images of {prepared.resolution}x{prepared.resolution}x"
          f"{prepared.channels}, condition {prepared.condition}; every file matches its SHA-256")


def cmd_doctor(args) -> int:
    """Run the checks; exit code 1 when one fails (a finding, not a usage error)."""
    start = time.perf_counter()
    source = config_source(args) if args.preset or args.config else None
    label, checks = api.doctor(source, args.set, run=args.run_dir, steps=args.steps, device=args.device,
                               progress=progress())
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
                       api.pick_device(args.device))
    print(json.dumps(result) if args.json else format_report(result))


if __name__ == "__main__":
    sys.exit(main())
