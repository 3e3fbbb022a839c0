"""diffuse against a peer on one data set, side by side on this machine, with the same wall-clock training budget.

ours: `diffuse train --preset fmnist` (or `--data DATA_DIR --preset P`), sampled with its preset's sampler.
peer: diffusers' UNet2DModel (the block channels of ours, 2 layers per block, attention at the lowest
      level, a class embedding per class), linear betas, eps-prediction, AdamW 5e-4, batch 64, EMA 0.9995,
      data in [-1, 1] as in diffusers' examples, trained for as many seconds as ours took, then
      sampled with DDIMScheduler at ours' number of steps (its defaults otherwise).
Both: N samples with labels i % K, the FD in the data set's features (FD-FMNIST against the 10k test
images; a prepared data set's own feature net against its held-out split) and class accuracy.

    .venv/bin/python benchmarks/vs_diffusers.py --out runs/bench [--n 5000] [--budget-s SECONDS]
    .venv/bin/python benchmarks/vs_diffusers.py --data data/cifar10 --preset rgb32 --out runs/bench-cifar10

Needs the test extras (diffusers). Prints a Markdown table and writes RESULT.json in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffuse.bench import cpu_model
from diffuse.config import load_config
from diffuse.data import dataset
from diffuse.images import load_npz
from diffuse.metrics.features import evaluate_features, fd_name


def run_ours(out: Path, n: int, data: Path | None, preset: str, overrides: list[str]) -> dict:
    run = out / "ours"
    cli = [sys.executable, "-m", "diffuse"]
    flags = [*(["--data", str(data)] if data else []), "--preset", preset, *[a for kv in overrides for a in ("--set", kv)]]
    start = time.perf_counter()
    subprocess.run([*cli, "train", *flags, "--out", str(run)], check=True)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([*cli, "sample", str(run), "--n", str(n), "--out", str(run / "samples.npz"),
                    "--grid", str(out / "grid-ours.png")], check=True)
    sample_s = time.perf_counter() - start
    images, labels = load_npz(run / "samples.npz")
    config = load_config(None, run / "config.toml")
    params = sum(p.numel() for p in _our_net(run).parameters())
    return {"train_s": train_s, "sample_s": sample_s, "params": params, "steps": config.sample.steps,
            "sampler": config.sample.sampler, "cfg": config.sample.cfg, "channels": config.model.channels,
            **evaluate_features(dataset(config.data).features, images, labels)}


def _our_net(run: Path):
    from diffuse.checkpoint import load_denoiser

    return load_denoiser(run)[1].net


def peer_unet(shape: tuple[int, int, int], widths: list[int], num_classes: int):
    from diffusers import UNet2DModel

    down = ["DownBlock2D"] * (len(widths) - 1) + ["AttnDownBlock2D"]
    return UNet2DModel(sample_size=shape[1], in_channels=shape[0], out_channels=shape[0],
                       block_out_channels=tuple(widths), layers_per_block=2, down_block_types=tuple(down),
                       up_block_types=tuple(["AttnUpBlock2D"] + ["UpBlock2D"] * (len(widths) - 1)),
                       num_class_embeds=num_classes)


def run_peer(out: Path, n: int, budget_s: float, ours_run: Path, steps: int, seed: int = 0) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    config = load_config(None, ours_run / "config.toml")
    ds = dataset(config.data)
    train = ds.read("train")
    k = ds.num_classes
    model = peer_unet(ds.shape, config.model.channels, k)
    # diffusers' own EMA: decay min((1 + step) / (10 + step), 0.9995), so early steps do not keep the init
    ema = EMAModel(model.parameters(), decay=0.9995)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    start, nimg = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        idx = torch.randint(0, len(train), (64,))
        x0 = train.images_at(idx).permute(0, 3, 1, 2).float() / 127.5 - 1  # diffusers' examples: [-1, 1]
        y = train.labels[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (64,))
        pred = model(train_sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(model.parameters())
        nimg += 64
    train_s = time.perf_counter() - start
    ema.copy_to(model.parameters())

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(steps)
    model.eval()
    start, out_images = time.perf_counter(), []
    want = torch.arange(n) % k
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(0, n, 64):
            y = want[s:s + 64]
            x = torch.randn(len(y), *ds.shape, generator=g)
            for t in sched.timesteps:
                x = sched.step(model(x, t, class_labels=y).sample, t, x).prev_sample
            out_images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    sample_s = time.perf_counter() - start
    imgs = torch.cat(out_images).numpy()
    ds.picture(out / "grid-peer.png", imgs[:len(imgs)], want.numpy())
    params = sum(p.numel() for p in model.parameters())
    return {"train_s": train_s, "kimg": nimg / 1000, "loss": loss.item(), "sample_s": sample_s, "params": params,
            **evaluate_features(ds.features, imgs, want.numpy())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--data", type=Path, help="a prepared DATA_DIR with its feature net (default: Fashion-MNIST)")
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of ours")
    parser.add_argument("--n", type=int, default=5000, help="samples per model for FD")
    parser.add_argument("--budget-s", type=float, help="peer's training seconds (default: what ours took)")
    parser.add_argument("--reuse-ours", action="store_true", help="take ours from OUT/ours.json of an earlier run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse_ours:
        ours = json.loads((args.out / "ours.json").read_text())
    else:
        ours = run_ours(args.out, args.n, args.data, args.preset, args.set)
        ours["kimg"] = json.loads((args.out / "ours" / "metrics.jsonl").read_text().splitlines()[-1])["kimg"]
        (args.out / "ours.json").write_text(json.dumps(ours, indent=1))
    peer = run_peer(args.out, args.n, args.budget_s or ours["train_s"], args.out / "ours", ours["steps"])
    result = {"machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "ours": ours, "peer": peer,
              "fd_ratio": ours["fd"] / peer["fd"]}
    (args.out / "RESULT.json").write_text(json.dumps(result, indent=1))
    name = fd_name(dataset(load_config(None, args.out / "ours" / "config.toml").data).features)
    print(f"CPU: {result['cpu']}, torch {result['torch']}, {result['threads']} threads\n")
    print(f"| model | params | train s | kimg | {name} (n) | class accuracy | sampling s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in ((f"diffuse {args.preset}", ours), ("diffusers UNet2DModel", peer)):
        print(f"| {label} | {r['params'] / 1e6:.2f}M | {r['train_s']:.0f} | {r['kimg']:.1f} | {r['fd']:.2f} ({r['n']}) "
              f"| {r['accuracy']:.3f} | {r['sample_s']:.0f} |")
    print(f"\nFD ratio ours / peer: {result['fd_ratio']:.3f}")


if __name__ == "__main__":
    main()
