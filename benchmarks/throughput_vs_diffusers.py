"""Training and sampling throughput of the fmnist preset against diffusers, in one run on this machine.

ours: the fmnist preset's training step as `diffuse bench` times it (`diffuse.bench.prepared_step`:
      `train.train_step` with the loop's optimizer), fp32 and bf16; sampling with the preset's
      sampler (25 trailing DDIM steps, cfg 2) and once more without guidance (cfg 1), so both
      sides are also compared at the same 25 network evaluations per image.
peer: diffusers' UNet2DModel with the same level widths and blocks as ours (block channels
      32/64/128, 1 layer per block, attention at the lowest level, 10 class embeddings; about the
      same parameter count, both printed), 28x28 as in benchmarks/vs_diffusers.py; a training step
      is DDPMScheduler.add_noise, the eps MSE, backward and AdamW at the same batch, fp32 and bf16
      autocast; its FLOPs counted with FlopCounterMode as ours; sampling with DDIMScheduler at 25
      steps on one batch, after one untimed network call.
The four training steps (ours and the peer's, fp32 and bf16) are timed in turn, one of each per
round, with the matmul peak read before every round (`diffuse.bench.timed_in_turn`): this
machine's speed drifts from minute to minute, and in turn every step sees the same drift, so the
ratios (the median over rounds of each round's ratio) hold. GFLOP/s are set against the best peak
reading of the run. Both sides use --threads torch threads.

    PYTHONPATH=src .venv/bin/python benchmarks/throughput_vs_diffusers.py [--threads 2] [--steps 10] [--out DIR]

Needs the test extras (diffusers). Prints Markdown tables and writes DIR/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffuse.bench import (WARMUP_STEPS, PeakMeter, bench_sample, counted_op_share, machine, prepared_step,
                           speed_ratio, step_rates, timed_in_turn, train_result, train_step_flops)
from diffuse.config import load_config
from diffuse.nets import build_denoiser

BATCH = 64           # the fmnist preset's train.batch and sample.batch
SAMPLE_STEPS = 25


def peer_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), num_class_embeds=10)


def peer_loss(model, scheduler, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
              precision: str) -> torch.Tensor:
    """diffusers' training recipe: eps-MSE at a uniform timestep, forward under bf16 autocast if asked."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)


def peer_step(precision: str) -> Callable[[int], None]:
    """step(i): one training step of the peer (loss, backward, AdamW), already run WARMUP_STEPS times."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = peer_unet().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    generator = torch.Generator().manual_seed(0)
    x0, labels = torch.randn(BATCH, 1, 28, 28, generator=generator), torch.arange(BATCH) % 10

    def step(i: int) -> None:
        loss = peer_loss(model, scheduler, x0, labels, generator, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    for i in range(WARMUP_STEPS):
        step(i)
    return step


def peer_step_flops() -> int:
    """FLOPs of the peer's forward and backward in fp32: the work, whatever the precision."""
    from diffusers import DDPMScheduler

    model, scheduler = peer_unet(), DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0, labels = torch.randn(BATCH, 1, 28, 28), torch.arange(BATCH) % 10
    with FlopCounterMode(display=False) as counter:
        peer_loss(model, scheduler, x0, labels, torch.Generator().manual_seed(0), "fp32").backward()
    return counter.get_total_flops()


@torch.no_grad()
def peer_sample() -> dict:
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    model = peer_unet().eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(SAMPLE_STEPS)
    labels = torch.arange(BATCH) % 10
    x = torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model(x, scheduler.timesteps[0], class_labels=labels)  # untimed warm-up
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, class_labels=labels).sample, t, x).prev_sample
    seconds = time.perf_counter() - start
    nfe = len(scheduler.timesteps)
    return {"sampler": "ddim (diffusers)", "steps": SAMPLE_STEPS, "cfg": 1.0, "batch": BATCH, "seconds": seconds,
            "nfe": nfe, "img_per_s": BATCH / seconds, "img_evals_per_s": BATCH * nfe / seconds}


def ratios_of(seconds: dict[str, list[float]], ours_sample: dict, unguided: dict, peer_sample_: dict) -> dict:
    """ours / peer training speed and bf16 / fp32 on each side (medians of each round's ratio), and
    ours / peer sampling images/s."""
    return {"train_img_per_s_fp32": speed_ratio(seconds["ours fp32"], seconds["peer fp32"]),
            "train_img_per_s_bf16": speed_ratio(seconds["ours bf16"], seconds["peer bf16"]),
            "bf16_over_fp32_ours": speed_ratio(seconds["ours bf16"], seconds["ours fp32"]),
            "bf16_over_fp32_peer": speed_ratio(seconds["peer bf16"], seconds["peer fp32"]),
            "sample_img_per_s_cfg1": unguided["img_per_s"] / peer_sample_["img_per_s"],
            "sample_img_per_s_preset": ours_sample["img_per_s"] / peer_sample_["img_per_s"]}


def tables(result: dict) -> str:
    m, ours, peer, ratios = result["machine"], result["ours"], result["peer"], result["ratios"]
    readings = result["matmul_peak_readings"]
    rounds = ours["train"][0]["steps"]
    lines = [f"{m['cpu']}, torch {m['torch']}, {m['threads']} threads, load average {m['load_average_1min']}; "
             f"matmul peak fp32 {result['matmul_peak_gflops']:.0f} GFLOP/s (the best of {len(readings['fp32'])} "
             f"readings, {min(readings['fp32']):.0f}-{max(readings['fp32']):.0f}), bf16 "
             f"{result['matmul_peak_gflops_bf16']:.0f} GFLOP/s ({min(readings['bf16']):.0f}-{max(readings['bf16']):.0f})",
             "", f"Training, batch {BATCH}: {rounds} rounds of one step of each, in turn, after {WARMUP_STEPS} untimed "
             "(img/s from the median step):", "",
             "| model | params | precision | img/s | GFLOP/step | GFLOP/s | of peak |", "|---|---|---|---|---|---|---|"]
    for name, side in (("diffuse fmnist", ours), ("diffusers UNet2DModel", peer)):
        for r in side["train"]:
            lines.append(f"| {name} | {side['params'] / 1e6:.2f}M | {r['precision']} | {r['img_per_s']:.1f} | "
                         f"{r['flops_per_step'] / 1e9:.1f} | {r['achieved_gflops']:.1f} | {r['of_peak']:.3f} |")
    lines += ["", "Ratios of training speed (median over rounds of each round's ratio):", "",
              "| ratio | fp32 | bf16 |", "|---|---|---|",
              f"| ours / peer | {ratios['train_img_per_s_fp32']:.2f} | {ratios['train_img_per_s_bf16']:.2f} |",
              f"| bf16 / fp32, ours | | {ratios['bf16_over_fp32_ours']:.2f} |",
              f"| bf16 / fp32, peer | | {ratios['bf16_over_fp32_peer']:.2f} |"]
    c = ours["train_counted_ops"]
    lines.append(f"\nours, fp32: convolutions and matrix products take {c['share_of_step']:.0%} of the step "
                 f"(torch.profiler) and run at {c['of_peak']:.3f} of the peak while they do")
    lines += ["", f"Sampling, batch {BATCH}, 25 DDIM steps:", "",
              "| model | cfg | NFE per image | img/s | image evaluations/s |", "|---|---|---|---|---|"]
    for name, s in (("diffuse fmnist", ours["sample"]), ("diffuse fmnist", ours["sample_unguided"]),
                    ("diffusers UNet2DModel", peer["sample"])):
        lines.append(f"| {name} | {s['cfg']:g} | {s['nfe']:g} | {s['img_per_s']:.2f} | {s['img_evals_per_s']:.1f} |")
    lines.append(f"\nsampling img/s ours / peer at 25 NFE (cfg 1): {ratios['sample_img_per_s_cfg1']:.2f}; "
                 f"ours at the preset's cfg 2: {ratios['sample_img_per_s_preset']:.2f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one training step of each side and "
                                                               "precision per round)")
    parser.add_argument("--out", type=Path, default=Path("runs/throughput"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    cpu, meter = torch.device("cpu"), PeakMeter(torch.device("cpu"))
    configs = {p: load_config("fmnist", None, [f"train.precision={p}"]) for p in ("fp32", "bf16")}
    steps = {f"ours {p}": prepared_step(c, BATCH, cpu) for p, c in configs.items()}
    steps |= {f"peer {p}": peer_step(p) for p in ("fp32", "bf16")}
    seconds = timed_in_turn(steps, args.steps, cpu, meter)
    ours_sample = bench_sample(configs["fp32"], BATCH, cpu)
    unguided = bench_sample(load_config("fmnist", None, ["sample.cfg=1"]), BATCH, cpu)
    peer_sample_ = peer_sample()
    meter.read()
    peak = {p: meter.best(p) for p in ("fp32", "bf16")}
    our_flops, peer_flops = train_step_flops(configs["fp32"], BATCH, cpu), peer_step_flops()
    ours = {"params": sum(p.numel() for p in build_denoiser(configs["fp32"]).parameters()),
            "train": [train_result(c, BATCH, seconds[f"ours {p}"], our_flops, peak[p]) for p, c in configs.items()],
            "sample": ours_sample, "sample_unguided": unguided}
    share = counted_op_share(configs["fp32"], BATCH, cpu)
    ours["train_counted_ops"] = {"share_of_step": share, "of_peak": ours["train"][0]["of_peak"] / share}
    peer = {"params": sum(p.numel() for p in peer_unet().parameters()),
            "train": [{"precision": p, **step_rates(BATCH, seconds[f"peer {p}"], peer_flops, peak[p])}
                      for p in ("fp32", "bf16")],
            "sample": peer_sample_}
    ratios = ratios_of(seconds, ours_sample, unguided, peer_sample_)
    result = {"machine": machine(cpu), "matmul_peak_gflops": peak["fp32"], "matmul_peak_gflops_bf16": peak["bf16"],
              "matmul_peak_readings": meter.readings, "ours": ours, "peer": peer, "ratios": ratios}
    (args.out / "throughput.json").write_text(json.dumps(result, indent=1))
    print(tables(result))
    print(f"\nwrote {args.out / 'throughput.json'}")


if __name__ == "__main__":
    main()
