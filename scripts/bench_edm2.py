"""EDM2 against the fmnist baseline at the same wall-clock budget, and the post-hoc EMA sweep, in one run.

    .venv/bin/python scripts/bench_edm2.py [--work runs/bench-edm2] [--threads 1] [--n 5000] [--sweep-n 1000]

1. Trains the `fmnist` and `fmnist-edm2` presets side by side (both at once, `--threads` each, so
   both see the same machine for the whole run), or resumes them if the work folder has them.
2. Evaluates each (side by side again) with its own sampler settings (fmnist: 25 DDIM steps; fmnist-edm2: 13 Heun steps,
   25 network evaluations; both with the presets' guidance) on `--n` samples: FD-FMNIST, accuracy.
3. Sweeps the post-hoc EMA of the fmnist-edm2 run (`diffuse ema --sweep`) over sigma_rel, the
   tracked 0.10 included, on `--sweep-n` unguided 6-step Heun samples.
Prints a markdown table and writes WORK/bench.json. `--quick` runs the -tiny presets instead (a
minute or two), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DIFFUSE = [sys.executable, "-m", "diffuse"]
SWEEP = "0.03,0.05,0.07,0.10,0.13,0.16,0.20,0.25"


def run_side_by_side(commands: dict[str, list[str]], logs: Path, threads: int,
                     stdout: dict[str, Path] | None = None) -> dict[str, float]:
    """Run the commands at once with `threads` threads each, stdout to stdout[NAME] or logs/NAME.log
    (stderr there too); returns each one's wall seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    start, procs, seconds = time.perf_counter(), {}, {}
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    for name, argv in commands.items():
        log = open(logs / f"{name}.log", "a")
        out = open(stdout[name], "w") if stdout else log
        procs[name] = subprocess.Popen(argv, stdout=out, stderr=log, env=env)
    while procs:
        for name, proc in list(procs.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    sys.exit(f"{' '.join(commands[name])} failed with exit code {proc.returncode}; see {logs / name}.log")
                seconds[name] = time.perf_counter() - start
                del procs[name]
        time.sleep(1)
    return seconds


def training_seconds(run: Path) -> tuple[float, float]:
    """(seconds in training steps, seconds spent watching: probe, grids, FD) from the run's metrics."""
    steps = watch = 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "train":
            steps += event["train_seconds"]
        elif event["event"] in ("probe", "grid", "fd"):
            watch += event["seconds"]
    return steps, watch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-edm2"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--n", type=int, default=5000, help="samples for each final FD")
    parser.add_argument("--sweep-n", type=int, default=1000, help="samples per sigma_rel in the EMA sweep")
    parser.add_argument("--quick", action="store_true", help="the -tiny presets: checks the script, not EDM2")
    args = parser.parse_args(argv)
    presets = {"fmnist": "fmnist-tiny", "fmnist-edm2": "fmnist-edm2-tiny"} if args.quick else \
              {"fmnist": "fmnist", "fmnist-edm2": "fmnist-edm2"}
    runs = {name: args.work / name for name in presets}
    threads = ["--set", f"train.threads={args.threads}"]

    wall = run_side_by_side({name: [*DIFFUSE, "train", "--preset", preset, "--out", str(runs[name]), *threads]
                             for name, preset in presets.items()}, args.work / "logs", args.threads)
    run_side_by_side({name: [*DIFFUSE, "eval", str(run), "--n", str(args.n), "--json"] for name, run in runs.items()},
                     args.work / "logs", args.threads, stdout={name: run / "eval.json" for name, run in runs.items()})
    sweep_argv = [*DIFFUSE, "ema", str(runs["fmnist-edm2"]), "--sweep", "--sigma-rels", SWEEP,
                  "--n", str(args.sweep_n), "--steps", "6", "--cfg", "1"]
    subprocess.run(sweep_argv, check=True)

    rows = {}
    for name, run in runs.items():
        steps, watch = training_seconds(run)
        result = json.loads((run / "eval.json").read_text())
        kimg = max(json.loads(line).get("kimg", 0) for line in (run / "metrics.jsonl").read_text().splitlines())
        rows[name] = {"preset": presets[name], "kimg": kimg, "train_seconds": steps, "watch_seconds": watch,
                      "wall_seconds_this_call": wall[name], "fd": result["fd"], "accuracy": result["accuracy"],
                      "n": result["n"], "sampler": result["sampler"], "steps": result["steps"], "cfg": result["cfg"]}
    sweep = json.loads((runs["fmnist-edm2"] / "ema_sweep.json").read_text())
    tracked = next(r for r in sweep["rows"] if r["sigma_rel"] == sweep["tracked_sigma_rel"])
    summary = {"runs": rows, "fd_ratio": rows["fmnist-edm2"]["fd"] / rows["fmnist"]["fd"],
               "time_ratio": rows["fmnist-edm2"]["train_seconds"] / rows["fmnist"]["train_seconds"],
               "sweep": sweep, "sweep_best_beats_tracked": sweep["best"]["fd"] < tracked["fd"]}
    (args.work / "bench.json").write_text(json.dumps(summary, indent=1))

    print("\n| preset | kimg | training s | watching s | sampler | FD-FMNIST (n) | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {r['preset']} | {r['kimg']:g} | {r['train_seconds']:.0f} | {r['watch_seconds']:.0f} | "
              f"{r['sampler']} {r['steps']} steps, cfg {r['cfg']:g} | {r['fd']:.2f} ({r['n']}) | {r['accuracy']:.3f} |")
    print(f"\nFD ratio fmnist-edm2 / fmnist: {summary['fd_ratio']:.3f} (goal <= 0.85) at a training-time ratio "
          f"of {summary['time_ratio']:.3f}")
    print(f"\npost-hoc EMA sweep ({sweep['n']} samples, {sweep['steps']} Heun steps, cfg {sweep['cfg']:g}):")
    print("| sigma_rel | FD-FMNIST | accuracy |\n|---|---|---|")
    for r in sweep["rows"]:
        mark = " (tracked)" if r["sigma_rel"] == sweep["tracked_sigma_rel"] else ""
        print(f"| {r['sigma_rel']:.2f}{mark} | {r['fd']:.2f} | {r['accuracy']:.3f} |")
    print(f"best sigma_rel {sweep['best']['sigma_rel']:g}: FD {sweep['best']['fd']:.2f} against the tracked "
          f"{tracked['fd']:.2f} ({'beats' if summary['sweep_best_beats_tracked'] else 'does not beat'} it)")


if __name__ == "__main__":
    main()
