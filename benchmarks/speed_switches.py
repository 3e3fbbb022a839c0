"""The speed switches measured against each other in one run: fp32 and bf16, each plain, with
channels_last and (with --compile) with torch.compile, on the fmnist preset's training step.

Every variant's step (`diffuse.bench.prepared_step`: the loop's `train_step` and optimizer, the
switches set by `diffuse.speed.prepare`) is timed in turn with the others, one step of each per
round, with the matmul peak read before every round (`diffuse.bench.timed_in_turn`), so the speed
drift of a shared machine falls on all of them alike. Each variant's speed-up is the median over
rounds of its ratio to plain fp32 within the round.

    PYTHONPATH=src .venv/bin/python benchmarks/speed_switches.py [--threads 2] [--rounds 12] [--compile]
        [--preset fmnist] [--out DIR]

Prints a Markdown table and writes DIR/speed_switches.json. torch.compile compiles during the
untimed warm-up steps (1.5-2 minutes per compiled variant on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffuse.bench import PeakMeter, machine, prepared_step, speed_ratio, timed_in_turn, train_result, train_step_flops
from diffuse.config import load_config


def variants(compile_too: bool) -> dict[str, list[str]]:
    """name -> the --set overrides of each variant; plain fp32 first, the baseline."""
    switches = {"": [], "channels_last": ["train.channels_last=true"]}
    if compile_too:
        switches["compile"] = ["train.compile=true"]
        switches["channels_last + compile"] = ["train.channels_last=true", "train.compile=true"]
    return {f"{precision} {name}".strip(): [f"train.precision={precision}", *sets]
            for precision in ("fp32", "bf16") for name, sets in switches.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, one step of every variant each")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile, alone and with channels_last")
    parser.add_argument("--out", type=Path, default=Path("runs/speed_switches"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    cpu, meter = torch.device("cpu"), PeakMeter(torch.device("cpu"))
    configs = {name: load_config(args.preset, None, sets) for name, sets in variants(args.compile).items()}
    batch = configs["fp32"].train.batch
    steps = {name: prepared_step(config, batch, cpu) for name, config in configs.items()}
    seconds = timed_in_turn(steps, args.rounds, cpu, meter)
    flops = train_step_flops(configs["fp32"], batch, cpu)
    rows = {name: train_result(config, batch, seconds[name], flops, meter.best(config.train.precision))
            | {"over_fp32": speed_ratio(seconds[name], seconds["fp32"])} for name, config in configs.items()}
    result = {"machine": machine(cpu), "preset": args.preset, "rounds": args.rounds,
              "matmul_peak_readings": meter.readings, "variants": rows}
    (args.out / "speed_switches.json").write_text(json.dumps(result, indent=1))
    m, fp32_peaks = result["machine"], meter.readings["fp32"]
    print(f"{m['cpu']}, torch {m['torch']}, {m['threads']} threads, load average {m['load_average_1min']}; "
          f"fp32 matmul peak {max(fp32_peaks):.0f} GFLOP/s (best of {len(fp32_peaks)} readings, "
          f"{min(fp32_peaks):.0f}-{max(fp32_peaks):.0f}); {args.preset}, batch {batch}, {args.rounds} rounds\n")
    print("| variant | img/s | speed over fp32 | GFLOP/s | of its dtype's peak |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['img_per_s']:.1f} | {r['over_fp32']:.2f} | {r['achieved_gflops']:.1f} | {r['of_peak']:.3f} |")
    print(f"\nwrote {args.out / 'speed_switches.json'}")


if __name__ == "__main__":
    main()
