"""A one-step student against its teacher, in one run: FD-FMNIST, class accuracy, images per second.

    .venv/bin/python scripts/bench_dmd.py --teacher runs/fmnist [--work runs/bench-dmd] [--preset dmd2]
        [--set train.kimg=24 ...] [--threads 2] [--n 2000]

1. Distills the teacher run with `diffuse distill` (or resumes the student in WORK/student), timed.
2. Evaluates the student (its preset's sampler: one step) and the teacher (its own preset's
   sampler, e.g. 25 DDIM steps with guidance 2) on `--n` samples each: FD-FMNIST and accuracy.
3. Times sampling in this process for both, at the same batch, after a warm-up batch: images per
   second and network evaluations per image.
Prints a markdown table with the ratios the DMD issue asks for and writes WORK/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffuse.bench import NetEvaluations, cpu_model
from diffuse.checkpoint import load_denoiser
from diffuse.data import dataset
from diffuse.sampling import sample
from diffuse.seeding import image_seeds

DIFFUSE = [sys.executable, "-m", "diffuse"]


def run(argv: list[str], log: Path, stdout: Path | None = None, threads: int = 2) -> float:
    """Run a diffuse command, its output to `log` (stdout to `stdout` if given); returns wall seconds."""
    start = time.perf_counter()
    with open(log, "a") as err, open(stdout or log, "a") as out:
        proc = subprocess.run(argv, stdout=out, stderr=err, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed with exit code {proc.returncode}; see {log}")
    return time.perf_counter() - start


def sampling_speed(run_dir: Path, n: int, batch: int) -> dict:
    """Images per second of the run's own sampler settings, timed over n images after one warm-up
    batch; network evaluations per image counted as `diffuse bench` counts them."""
    config, denoiser = load_denoiser(run_dir, "ema", "cpu")
    settings = {**config.sample.sampler_args(), "batch": batch}
    shape = dataset(config.data).shape
    labels = torch.arange(n) % 10
    with torch.inference_mode():
        sample(denoiser, shape, labels[:batch], image_seeds(1, batch), **settings)  # warm-up
        evaluations = NetEvaluations(denoiser.net)
        start = time.perf_counter()
        sample(denoiser, shape, labels, image_seeds(0, n), **settings)
        seconds = time.perf_counter() - start
        evaluations.remove()
    return {"img_per_s": n / seconds, "nfe_per_image": evaluations.images / n, "sampler": settings["sampler"],
            "steps": settings["steps"], "cfg": settings["cfg"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="a trained run, e.g. of --preset fmnist")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-dmd"))
    parser.add_argument("--preset", default="dmd2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for diffuse distill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=2000, help="samples for each FD")
    parser.add_argument("--speed-n", type=int, default=512, help="images timed for each sampling speed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    student, log = args.work / "student", args.work / "log.txt"
    sets = [item for s in [*args.set, f"train.threads={args.threads}"] for item in ("--set", s)]

    distill_s = run([*DIFFUSE, "distill", str(args.teacher), "--preset", args.preset, *sets, "--out", str(student)],
                    log, threads=args.threads)
    steps_s = sum(json.loads(line).get("train_seconds", 0.0) for line in (student / "metrics.jsonl").open()
                  if '"event": "train"' in line)
    results = {}
    for name, run_dir in (("teacher", args.teacher), ("student", student)):
        out = args.work / f"eval-{name}.json"
        out.unlink(missing_ok=True)
        run([*DIFFUSE, "eval", str(run_dir), "--n", str(args.n), "--json"], log, stdout=out, threads=args.threads)
        results[name] = json.loads(out.read_text().splitlines()[-1]) | sampling_speed(run_dir, args.speed_n, 64)
    t, s = results["teacher"], results["student"]
    report = {"machine": cpu_model(), "torch": torch.__version__,
              "threads": args.threads, "preset": args.preset, "set": args.set, "distill_wall_s": distill_s,
              "distill_steps_s": steps_s, **results,
              "fd_ratio": s["fd"] / t["fd"], "accuracy_points": 100 * (s["accuracy"] - t["accuracy"]),
              "speedup": s["img_per_s"] / t["img_per_s"]}
    (args.work / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"| model | sampler | NFE per image | FD-FMNIST (n={args.n}) | accuracy | images/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['sampler']} {r['steps']}, cfg {r['cfg']:g} | {r['nfe_per_image']:g} | {r['fd']:.2f} | "
              f"{r['accuracy']:.3f} | {r['img_per_s']:.1f} |")
    print(f"\ndistillation {distill_s:.0f} s wall ({steps_s:.0f} s of steps); FD ratio {report['fd_ratio']:.2f} "
          f"(goal <= 1.5); accuracy {report['accuracy_points']:+.1f} points (goal within 5); "
          f"speed-up {report['speedup']:.1f}x (goal >= 20)")


if __name__ == "__main__":
    main()
