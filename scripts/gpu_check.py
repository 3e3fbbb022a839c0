"""The device checks of a CUDA machine, in one short script: `bash scripts/gpu_check.sh [OUT_DIR]`.

1. train: fmnist-tiny on cuda:0 (the default precision, auto: bf16 where the device supports it);
2. sample: 64 images on cuda:0, and the same seeds again (the same images);
3. exact resume: the run stopped half way and resumed ends with the same weights as a straight one;
4. DDP: with two or more devices, torchrun with NCCL, one process per device, against one process;
5. bench: `diffuse bench` (training and sampling) in fp32 and bf16.
Each check prints one line; OUT_DIR/gpu_check.md gets the table and OUT_DIR/gpu_check.json the numbers.
On a machine without CUDA it says so in one sentence and exits 2, before any work.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

TINY = ["--set", "train.kimg=1.0", "--set", "train.checkpoint_kimg=0.5", "--set", "train.fd_kimg=0"]


def diffuse(*args: str, launcher: list[str] | None = None) -> str:
    """The stdout of `diffuse ARGS` (under `launcher`, e.g. torchrun, where given); a failure raises."""
    command = [*(launcher or [sys.executable, "-m", "diffuse"]), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def weights(run: Path) -> str:
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return hashlib.sha256((newest / "ema.safetensors").read_bytes()).hexdigest()[:16]


def check_train_sample_resume(out: Path) -> list[tuple[str, bool, str]]:
    rows = []
    start = time.perf_counter()
    diffuse("train", "--preset", "fmnist-tiny", *TINY, "--device", "cuda", "--out", str(out / "straight"))
    config = (out / "straight" / "config.toml").read_text()
    precision = next(line for line in config.splitlines() if line.startswith("precision"))
    rows.append(("train fmnist-tiny on cuda", True, f"{time.perf_counter() - start:.0f} s, {precision}"))
    for name in ("a", "b"):
        diffuse("sample", str(out / "straight"), "--n", "64", "--seed", "3", "--device", "cuda",
                "--out", str(out / f"{name}.npz"))
    same = (out / "a.npz").read_bytes() == (out / "b.npz").read_bytes()
    rows.append(("sample 64 on cuda, twice", same, "the same images" if same else "the images differ"))
    diffuse("train", "--preset", "fmnist-tiny", *TINY, "--set", "train.kimg=0.5", "--device", "cuda",
            "--out", str(out / "resumed"))
    diffuse("train", "--preset", "fmnist-tiny", *TINY, "--device", "cuda", "--out", str(out / "resumed"))
    equal = weights(out / "resumed") == weights(out / "straight")
    rows.append(("exact resume on cuda", equal, f"EMA {weights(out / 'resumed')} vs {weights(out / 'straight')}"))
    return rows


def check_ddp(out: Path) -> list[tuple[str, bool, str]]:
    n = torch.cuda.device_count()
    if n < 2:
        return [("DDP with NCCL", True, f"skipped: {n} device")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "diffuse"]
    diffuse("train", "--preset", "fmnist-tiny", *TINY, "--device", "cuda", "--out", str(out / "ddp"),
            launcher=launcher)
    loss = [json.loads(line)["loss"] for line in (out / "ddp" / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line]
    return [("DDP with NCCL", bool(loss), f"{n} processes, last loss {loss[-1]:.4f}" if loss else "no log")]


def check_bench(out: Path) -> tuple[list[tuple[str, bool, str]], dict]:
    rows, results = [], {}
    for precision in ("fp32", "bf16"):
        result = json.loads(diffuse("bench", "--preset", "fmnist", "--device", "cuda", "--what", "all",
                                    "--set", f"train.precision={precision}", "--set", f"sample.precision={precision}",
                                    "--json"))
        results[precision] = result
        train, sampled = result["train"][0], result["sample"]
        rows.append((f"bench {precision}", True, f"train {train['img_per_s']:.0f} img/s, sample "
                                                 f"{sampled['img_per_s']:.1f} img/s ({sampled['nfe']:g} NFE)"))
    return rows, results


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: this machine has no CUDA device (torch.cuda.is_available() is False); run it on one "
              "with a GPU.", file=sys.stderr)
        return 2
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    rows = check_train_sample_resume(out) + check_ddp(out)
    bench_rows, bench = check_bench(out)
    rows += bench_rows
    table = ["| check | passed | detail |", "|---|---|---|"] + [f"| {a} | {'yes' if b else 'NO'} | {c} |"
                                                                 for a, b, c in rows]
    (out / "gpu_check.md").write_text(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n\n"
                                      + "\n".join(table) + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"rows": rows, "bench": bench}, indent=1))
    print("\n".join(table))
    return 0 if all(b for _, b, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
