"""Each convolution of a preset's net on its own: forward and backward rate against the fp32 matmul peak.

`diffuse bench` says how much of a training step the convolutions and matrix products take and how
fast they run together; this says which of them are slow. The net's forward pass is run once with
hooks that record each Conv2d's input shape; every distinct (shape, layer) is then rebuilt alone
and timed at batch --batch: forward, and forward + backward (the input's and the weight's
gradients), median of --repeats after 2 untimed calls, with the peak read before each layer (the
best reading of the run is the peak). FLOPs are counted as FlopCounterMode counts them: 2 x
outputs x (input channels x kernel area) per pass, backward twice the forward.

    PYTHONPATH=src .venv/bin/python benchmarks/conv_layers.py [--preset fmnist] [--threads 2] [--batch 64]

Prints a Markdown table, slowest share of the time first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch import nn

from diffuse.bench import PeakMeter, random_batch
from diffuse.config import load_config
from diffuse.nets import build_denoiser


def conv_inputs(preset: str, batch: int) -> Counter:
    """(input shape, in channels, out channels, kernel, stride, padding) -> how many layers of the net have it."""
    config = load_config(preset)
    denoiser = build_denoiser(config)
    x0, cond = random_batch(config, batch, torch.device("cpu"))
    seen = Counter()

    def record(module: nn.Conv2d, args, output):
        seen[(tuple(args[0].shape), module.in_channels, module.out_channels, module.kernel_size[0],
              module.stride[0], module.padding[0])] += 1

    hooks = [m.register_forward_hook(record) for m in denoiser.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        denoiser.net(x0, torch.rand(batch), cond)
    for hook in hooks:
        hook.remove()
    return seen


def median_seconds(fn, repeats: int) -> float:
    for _ in range(2):  # untimed: allocation and oneDNN's kernel choice
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meter, rows = PeakMeter(torch.device("cpu")), []
    for (shape, c_in, c_out, k, stride, pad), count in conv_inputs(args.preset, args.batch).items():
        meter.read()
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad)
        x = torch.randn(shape, requires_grad=True)
        y = conv(x)
        grad = torch.randn_like(y)
        forward_flops = 2 * y.numel() * c_in * k * k
        forward = median_seconds(lambda: conv(x), args.repeats)
        both = median_seconds(lambda: torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad), args.repeats)
        rows.append({"layer": f"{c_in}->{c_out} k{k} s{stride} at {shape[2]}x{shape[3]}", "count": count,
                     "flops": 3 * forward_flops, "forward": forward, "backward": both - forward,
                     "forward_flops": forward_flops})
    meter.read()
    peak = meter.best("fp32")
    total = sum(r["count"] * (r["forward"] + r["backward"]) for r in rows)
    total_flops = sum(r["count"] * r["flops"] for r in rows)
    print(f"{args.preset}, batch {args.batch}, {args.threads} threads; fp32 matmul peak {peak:.0f} GFLOP/s (best of "
          f"{len(meter.readings['fp32'])} readings, {min(meter.readings['fp32']):.0f}-{peak:.0f})\n")
    print("| layer | layers | share of conv time | forward, of peak | backward, of peak |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["count"] * (r["forward"] + r["backward"])):
        share = r["count"] * (r["forward"] + r["backward"]) / total
        print(f"| {r['layer']} | {r['count']} | {share:.1%} | {r['forward_flops'] / r['forward'] / 1e9 / peak:.2f} | "
              f"{2 * r['forward_flops'] / r['backward'] / 1e9 / peak:.2f} |")
    print(f"\nall convolutions, forward and backward: {total * 1e3:.0f} ms per step, "
          f"{total_flops / total / 1e9:.1f} GFLOP/s, {total_flops / total / 1e9 / peak:.3f} of the peak")


if __name__ == "__main__":
    main()
