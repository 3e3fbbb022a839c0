"""Training and sampling throughput of the fmnist preset against diffusers, in one run on this machine.

ours: `diffuse bench --preset fmnist --json` (fp32 and bf16 training side by side, the preset's
      sampler: 25 trailing DDIM steps with cfg 2), and once more for sampling without guidance
      (cfg 1), so both sides are also compared at the same 25 network evaluations per image.
peer: diffusers' UNet2DModel with the same level widths and blocks as ours (block channels
      32/64/128, 1 layer per block, attention at the lowest level, 10 class embeddings; about the
      same parameter count, both printed), 28x28 as in benchmarks/vs_diffusers.py; a training step
      is DDPMScheduler.add_noise, the eps MSE, backward and AdamW at the same batch, timed as ours
      (median of --steps steps after 2 untimed ones, random data of the same shape), fp32 and
      bf16 autocast; its FLOPs counted with FlopCounterMode as ours; sampling with DDIMScheduler at
      25 steps on one batch, after one untimed network call.
Both sides use --threads torch threads (torch.set_num_threads here; `--threads` for diffuse bench),
and GFLOP/s are set against the matmul peaks that diffuse bench measured in the same run.

    PYTHONPATH=src .venv/bin/python benchmarks/throughput_vs_diffusers.py [--threads 2] [--steps 10] [--out DIR]

Needs the test extras (diffusers). Prints Markdown tables and writes DIR/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

BATCH = 64           # the fmnist preset's train.batch and sample.batch
SAMPLE_STEPS = 25
WARMUP_STEPS = 2     # as diffuse.bench


def run_ours(threads: int, steps: int) -> tuple[dict, dict]:
    """(diffuse bench with the preset's settings, diffuse bench of unguided sampling), both parsed from --json."""
    cli = [sys.executable, "-m", "diffuse", "bench", "--preset", "fmnist", "--threads", str(threads), "--json"]
    full = subprocess.run([*cli, "--steps", str(steps), "--batch", str(BATCH)], check=True, capture_output=True,
                          text=True)
    unguided = subprocess.run([*cli, "--what", "sample", "--batch", str(BATCH), "--set", "sample.cfg=1"], check=True,
                              capture_output=True, text=True)
    return json.loads(full.stdout), json.loads(unguided.stdout)


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


def peer_train(precision: str, steps: int, peak_gflops: float) -> dict:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = peer_unet().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    generator = torch.Generator().manual_seed(0)
    x0, labels = torch.randn(BATCH, 1, 28, 28, generator=generator), torch.arange(BATCH) % 10
    seconds = []
    for _ in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        loss = peer_loss(model, scheduler, x0, labels, generator, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        seconds.append(time.perf_counter() - start)
    per_step = statistics.median(seconds[WARMUP_STEPS:])
    with FlopCounterMode(display=False) as counter:  # forward and backward, fp32: the work, whatever the precision
        peer_loss(model, scheduler, x0, labels, generator, "fp32").backward()
    flops = counter.get_total_flops()
    achieved = flops / per_step / 1e9
    return {"precision": precision, "batch": BATCH, "steps": steps, "seconds_per_step": per_step,
            "img_per_s": BATCH / per_step, "flops_per_step": flops, "achieved_gflops": achieved,
            "peak_gflops": peak_gflops, "of_peak": achieved / peak_gflops}


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


def ratios_of(ours: dict, unguided: dict, peer: dict) -> dict:
    """ours / peer training and sampling images/s, and bf16 / fp32 on each side."""
    our_train = {r["precision"]: r["img_per_s"] for r in ours["train"]}
    peer_train_ = {r["precision"]: r["img_per_s"] for r in peer["train"]}
    return {"train_img_per_s_fp32": our_train["fp32"] / peer_train_["fp32"],
            "train_img_per_s_bf16": our_train["bf16"] / peer_train_["bf16"],
            "bf16_over_fp32_ours": our_train["bf16"] / our_train["fp32"],
            "bf16_over_fp32_peer": peer_train_["bf16"] / peer_train_["fp32"],
            "sample_img_per_s_cfg1": unguided["sample"]["img_per_s"] / peer["sample"]["img_per_s"],
            "sample_img_per_s_preset": ours["sample"]["img_per_s"] / peer["sample"]["img_per_s"]}


def tables(ours: dict, unguided: dict, peer: dict, ratios: dict) -> str:
    m = ours["machine"]
    our_train = {r["precision"]: r for r in ours["train"]}
    peer_train_ = {r["precision"]: r for r in peer["train"]}
    lines = [f"{m['cpu']}, torch {m['torch']}, {m['threads']} threads, load average {m['load_average_1min']}; "
             f"matmul peak fp32 {ours['matmul_peak_gflops']:.0f} GFLOP/s, bf16 {ours['matmul_peak_gflops_bf16']:.0f} GFLOP/s", "",
             f"Training, batch {BATCH} (median of {ours['train'][0]['steps']} steps after {WARMUP_STEPS} untimed):", "",
             "| model | params | precision | img/s | GFLOP/step | GFLOP/s | of peak |", "|---|---|---|---|---|---|---|"]
    for name, params, runs in (("diffuse fmnist", ours["params"], our_train),
                               ("diffusers UNet2DModel", peer["params"], peer_train_)):
        for precision, r in runs.items():
            lines.append(f"| {name} | {params / 1e6:.2f}M | {precision} | {r['img_per_s']:.1f} | "
                         f"{r['flops_per_step'] / 1e9:.1f} | {r['achieved_gflops']:.1f} | {r['of_peak']:.3f} |")
    lines += ["", "| ratio | fp32 | bf16 |", "|---|---|---|"]
    lines.append(f"| train img/s ours / peer | {ratios['train_img_per_s_fp32']:.2f} | "
                 f"{ratios['train_img_per_s_bf16']:.2f} |")
    lines.append(f"| bf16 / fp32 img/s, ours | | {ratios['bf16_over_fp32_ours']:.2f} |")
    lines.append(f"| bf16 / fp32 img/s, peer | | {ratios['bf16_over_fp32_peer']:.2f} |")
    if "train_counted_ops" in ours:
        c = ours["train_counted_ops"]
        lines.append(f"\nours, fp32: convolutions and matrix products take {c['share_of_step']:.0%} of the step "
                     f"(torch.profiler) and run at {c['of_peak']:.3f} of the peak while they do")
    lines += ["", f"Sampling, batch {BATCH}, 25 DDIM steps:", "",
              "| model | cfg | NFE per image | img/s | image evaluations/s |", "|---|---|---|---|---|"]
    for name, s in (("diffuse fmnist", ours["sample"]), ("diffuse fmnist", unguided["sample"]),
                    ("diffusers UNet2DModel", peer["sample"])):
        lines.append(f"| {name} | {s['cfg']:g} | {s['nfe']:g} | {s['img_per_s']:.2f} | {s['img_evals_per_s']:.1f} |")
    lines.append(f"\nsampling img/s ours / peer at 25 NFE (cfg 1): {ratios['sample_img_per_s_cfg1']:.2f}; "
                 f"ours at the preset's cfg 2: {ratios['sample_img_per_s_preset']:.2f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per precision")
    parser.add_argument("--out", type=Path, default=Path("runs/throughput"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ours, unguided = run_ours(args.threads, args.steps)
    torch.set_num_threads(args.threads)
    peaks = {"fp32": ours["matmul_peak_gflops"], "bf16": ours["matmul_peak_gflops_bf16"]}
    peer = {"params": sum(p.numel() for p in peer_unet().parameters()),
            "train": [peer_train(precision, args.steps, peaks[precision]) for precision in ("fp32", "bf16")],
            "sample": peer_sample()}
    ratios = ratios_of(ours, unguided, peer)
    result = {"threads": args.threads, "ours": ours, "ours_unguided_sampling": unguided["sample"], "peer": peer,
              "ratios": ratios}
    (args.out / "throughput.json").write_text(json.dumps(result, indent=1))
    print(tables(ours, unguided, peer, ratios))
    print(f"\nwrote {args.out / 'throughput.json'}")


if __name__ == "__main__":
    main()
