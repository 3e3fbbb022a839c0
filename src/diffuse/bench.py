"""`diffuse bench`: how fast this machine trains and samples a preset, against its own matmul peak.

Every number is measured in the same run: the roof (the best rate of a large matrix product, fp32
and bf16), the training step (`training.train_step`, the loop's own step, with the optimizer the loop
builds) and the sampler (`sampling.sample` with the preset's settings). The step's work is counted
by `FlopCounterMode` (matrix products, convolutions and attention, forward and backward), so
achieved GFLOP/s over the peak says how much of the machine the network uses; what the counter
does not see (norms, activations, the optimizer) shows up as a lower ratio, which is the point.

On a shared machine the speed drifts: one 2048x2048 product ran anywhere from 173 to 323 GFLOP/s
within 40 seconds on this project's 2-core VM. So the variants compared (fp32 and bf16) are timed
in turn, one step of each per round, and the peak is read again before every round; the peak
reported is the best reading of the run, the machine's rate when nothing slowed it, so a
reading taken in a slow spell cannot flatter the ratios set against it.

Inputs are random tensors of the data's shape: throughput does not depend on pixel values, and
the bench then needs no data files.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffuse.config import Config
from diffuse.data import dataset
from diffuse.nets import build_denoiser
from diffuse.sampling import sample
from diffuse.seeding import derive_seed
from diffuse.speed import chosen_precision, native_bf16, prepare
from diffuse.training import train_step, training_loss

WARMUP_STEPS = 2     # untimed: the first steps allocate memory, pick kernels and, with train.compile, compile
PEAK_REPEATS = 3     # timed matrix products per dtype in one reading of the peak
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine(device: torch.device) -> dict:
    """What the numbers were measured on, and how busy it was: a 1-minute load average above the
    threads' count means other processes shared the cores and the timings are low."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "device": str(device), "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "load_average_1min": load,
            "python": platform.python_version()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work's end and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(device: torch.device) -> int:
    """Side of the square matrices of the peak: large enough to fill the machine, small enough to be quick."""
    return 2048 if device.type == "cpu" else 8192


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """GFLOP/s of the best of PEAK_REPEATS n x n products (2 n^3 FLOPs each), after one untimed product."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(PEAK_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


class PeakMeter:
    """The matrix-product peak of each dtype, read as often as asked during a run; `best` is the peak."""

    def __init__(self, device: torch.device, bf16: bool = True):
        self.device, self.n = device, matmul_size(device)
        # bf16 only where the device computes it natively: an emulated reading takes minutes and means nothing
        self.readings: dict[str, list[float]] = {name: [] for name in PEAK_DTYPES if bf16 or name != "bf16"}

    def read(self) -> None:
        for name in self.readings:
            self.readings[name].append(matmul_peak_gflops(PEAK_DTYPES[name], self.device, self.n))

    def best(self, name: str) -> float | None:
        return max(self.readings[name]) if self.readings.get(name) else None


def timed_in_turn(steps: dict[str, Callable[[int], None]], rounds: int, device: torch.device,
                  meter: PeakMeter) -> dict[str, list[float]]:
    """Seconds of each step function over `rounds` rounds, each round one call of every step in turn
    after a reading of the peak (and one more reading at the end): a drift of the machine's speed
    then falls on every step alike, and on the peak too. step(i) is called with i = WARMUP_STEPS,
    WARMUP_STEPS + 1, ..., so the steps go on from their warm-up."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(WARMUP_STEPS, WARMUP_STEPS + rounds):
        meter.read()
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step(i)
            synchronize(device)  # train_step reads the loss with .item(), which waits too; this keeps it explicit
            seconds[name].append(time.perf_counter() - start)
    meter.read()
    return seconds


def speed_ratio(seconds: list[float], baseline: list[float]) -> float:
    """How many times faster the first step ran than the baseline: the median over rounds of the
    ratio within each round, so a slow spell that spans a round cancels."""
    return statistics.median(b / a for a, b in zip(seconds, baseline))


def random_batch(config: Config, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 (B, *shape), cond): a batch shaped like the data, with class labels or low-res images as conditions."""
    generator = torch.Generator().manual_seed(seed)
    data = dataset(config.data)
    x0 = torch.randn((batch, *data.shape), generator=generator)
    if data.cond_shape:
        cond = torch.randn((batch, *data.cond_shape), generator=generator)
    else:
        cond = torch.arange(batch) % data.num_classes
    return x0.to(device), cond.to(device)


def adamw_of_the_loop(denoiser: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """The optimizer `train.train` builds, so the bench times the same optimizer step."""
    t = config.train
    return torch.optim.AdamW(denoiser.parameters(), lr=t.lr, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay)


def step_flops(denoiser: torch.nn.Module, config: Config, x0: torch.Tensor, cond: torch.Tensor) -> int:
    """FLOPs of one `train_step` of `denoiser` on (x0, cond), as FlopCounterMode counts them: 2 M N K
    per (M x K) @ (K x N) product and the like for convolutions and attention, forward and backward.
    Backward costs twice the forward for every layer but the first, whose input needs no gradient;
    the optimizer step and the elementwise work count 0."""
    with FlopCounterMode(display=False) as counter:
        train_step(training_loss(denoiser, config), adamw_of_the_loop(denoiser, config), x0, cond, config.train.lr,
                   config, seed=0)
    return counter.get_total_flops()


def train_step_flops(config: Config, batch: int, device: torch.device) -> int:
    """FLOPs of one training step of the config's net on `batch` images, counted on a plain fp32
    net: the work is the same whichever switches the timed run uses (and a compiled net hides its
    operations from the counter)."""
    plain = copy.deepcopy(config)
    plain.train.precision, plain.train.channels_last, plain.train.compile = "fp32", False, False
    denoiser = build_denoiser(plain).to(device)
    return step_flops(denoiser, plain, *random_batch(plain, batch, device))


def prepared_step(config: Config, batch: int, device: torch.device):
    """A fresh net with this config's switches, the loop's optimizer and a random batch; returns
    step(i), one `train_step`, already run WARMUP_STEPS times (untimed: allocation, kernel choice,
    compiling)."""
    torch.manual_seed(config.train.seed)
    denoiser = build_denoiser(config).to(device)
    prepare(denoiser.net, config.train)
    optimizer = adamw_of_the_loop(denoiser, config)
    x0, cond = random_batch(config, batch, device)
    model = training_loss(denoiser, config)

    def step(i: int) -> None:
        train_step(model, optimizer, x0, cond, config.train.lr, config, derive_seed(config.train.seed, "step", i))

    for i in range(WARMUP_STEPS):
        step(i)
    return step


def train_result(config: Config, batch: int, seconds: list[float], flops: int, peak_gflops: float) -> dict:
    """`step_rates` of the config's steps, with the switches they ran with."""
    t = config.train
    return {"precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
            **step_rates(batch, seconds, flops, peak_gflops)}


def step_rates(batch: int, seconds: list[float], flops: int, peak_gflops: float) -> dict:
    """Images/s and achieved GFLOP/s (`flops` per step) of the training steps timed in `seconds`
    (after WARMUP_STEPS untimed); seconds per step is the median, so one stall does not move it."""
    per_step = statistics.median(seconds)
    achieved = flops / per_step / 1e9
    return {"batch": batch, "steps": len(seconds), "warmup_steps": WARMUP_STEPS, "seconds_per_step": per_step,
            "seconds_each": seconds, "img_per_s": batch / per_step, "flops_per_step": flops,
            "achieved_gflops": achieved, "peak_gflops": peak_gflops,
            "of_peak": achieved / peak_gflops if peak_gflops else None}


# The operations FlopCounterMode counts, as the CPU profiler names them: their kernels run inside.
COUNTED_OPS = {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::mm", "aten::bmm", "aten::addmm",
               "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def counted_op_share(config: Config, batch: int, device: torch.device, steps: int = 3) -> float | None:
    """The share of a training step's wall time (this config's switches) spent inside the operations
    the FLOP counter counts (convolutions, matrix products, attention), from torch.profiler's self
    times over `steps` steps after WARMUP_STEPS: the rest is elementwise work, normalization, copies,
    the optimizer and Python. CPU only (on CUDA the profiler's CPU times are launch times); None elsewhere."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    step = prepared_step(config, batch, device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(WARMUP_STEPS, WARMUP_STEPS + steps):
            step(i)
        wall = time.perf_counter() - start
    inside = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in COUNTED_OPS) / 1e6
    return inside / wall


class NetEvaluations:
    """Counts the images the network sees: guidance's doubled batch counts twice, heun's second
    evaluation once more, so NFE per image is exact for every sampler."""

    def __init__(self, net: torch.nn.Module):
        self.images = 0
        self.hook = net.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.images += len(args[0])

    def remove(self) -> None:
        self.hook.remove()


def bench_sample(config: Config, batch: int, device: torch.device) -> dict:
    """Images/s of one `sample` call on `batch` images with the config's sampler settings, after an
    untimed one-step call; NFE per image counted, and the network's FLOPs per image evaluation
    counted during the warm-up."""
    torch.manual_seed(config.train.seed)
    denoiser = build_denoiser(config).to(device).eval().requires_grad_(False)
    _, cond = random_batch(config, batch, device)
    shape = dataset(config.data).shape
    settings = {**config.sample.sampler_args(), "batch": batch}
    warmup = NetEvaluations(denoiser.net)
    with FlopCounterMode(display=False) as counter:
        sample(denoiser, shape, cond, range(batch), **{**settings, "steps": 1})
    warmup.remove()
    flops_per_eval = counter.get_total_flops() / warmup.images
    evaluations = NetEvaluations(denoiser.net)
    synchronize(device)
    start = time.perf_counter()
    sample(denoiser, shape, cond, range(batch), **settings)
    synchronize(device)
    seconds = time.perf_counter() - start
    evaluations.remove()
    nfe = evaluations.images / batch
    achieved = flops_per_eval * evaluations.images / seconds / 1e9
    s = config.sample
    return {"sampler": s.sampler, "steps": s.steps, "cfg": s.cfg, "batch": batch, "seconds": seconds,
            "precision": chosen_precision(s.precision, device)[0],
            "nfe": nfe, "img_per_s": batch / seconds, "img_evals_per_s": batch * nfe / seconds,
            "flops_per_img_eval": flops_per_eval, "achieved_gflops": achieved}


def precision_variants(config: Config, overrides: list[str], bf16: bool = True) -> list[Config]:
    """The configs whose training is timed: the one asked for if --set names train.precision, else
    fp32 and (where the device computes bf16 natively) bf16 side by side, so their ratio comes from one run."""
    if any(item.partition("=")[0].strip() == "train.precision" for item in overrides):
        return [config]
    variants = []
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        variant = copy.deepcopy(config)
        variant.train.precision = precision
        variants.append(variant)
    return variants


def run_bench(config: Config, label: str, overrides: list[str], what: str, batch: int | None, steps: int,
              device: torch.device) -> dict:
    """The whole measurement as one JSON-ready dict; `what` is train, sample or all. Every ratio to
    the peak uses the best reading of the whole run."""
    native = native_bf16(device)
    meter = PeakMeter(device, bf16=native)
    result = {"preset": label, "overrides": list(overrides), "machine": machine(device), "bf16_native": native,
              "matmul_size": meter.n,
              "params": sum(p.numel() for p in build_denoiser(config).parameters())}
    train_batch, sample_batch = batch or config.train.batch, batch or config.sample.batch
    timing_train, timing_sample = what in ("train", "all"), what in ("sample", "all")
    if timing_train:
        variants = precision_variants(config, overrides, bf16=native)
        prepared = {c.train.precision: prepared_step(c, train_batch, device) for c in variants}
        seconds = timed_in_turn(prepared, steps, device, meter)
    if timing_sample:
        meter.read()
        result["sample"] = bench_sample(config, sample_batch, device)
        meter.read()
    peak = {name: meter.best(name) for name in PEAK_DTYPES}
    result |= {"matmul_peak_gflops": peak["fp32"], "matmul_peak_gflops_bf16": peak["bf16"],
               "matmul_peak_readings": meter.readings}
    if timing_sample:
        # of its own precision's peak, fp32's where bf16 was asked for but not native (its peak is not read)
        against = result["sample"]["precision"] if peak[result["sample"]["precision"]] else "fp32"
        result["sample"] |= {"peak_of": against, "peak_gflops": peak[against],
                             "of_peak": result["sample"]["achieved_gflops"] / peak[against]}
    if timing_train:
        flops = train_step_flops(config, train_batch, device)
        result["train"] = [train_result(c, train_batch, seconds[c.train.precision], flops, peak[c.train.precision])
                           for c in variants]
        if len(variants) == 2:
            result["bf16_over_fp32"] = speed_ratio(seconds["bf16"], seconds["fp32"])
        fp32 = [(c, run) for c, run in zip(variants, result["train"]) if c.train.precision == "fp32"]
        share = counted_op_share(fp32[0][0], train_batch, device) if fp32 else None
        if share:  # the counted work's own rate: what of_peak would be if nothing else took time
            result["train_counted_ops"] = {"share_of_step": share, "of_peak": fp32[0][1]["of_peak"] / share}
    return result


def format_report(result: dict) -> str:
    """A few lines and a small table for people; --json prints `result` itself."""
    m, readings = result["machine"], result["matmul_peak_readings"]
    lines = [f"{m['device_name']} ({m['device']}), torch {m['torch']}, {m['threads']} threads, "
             f"{m['cpu_cores']} cores, load average {m['load_average_1min']}",
             f"matmul peak ({result['matmul_size']}x{result['matmul_size']}, the best of "
             f"{len(readings['fp32'])} readings): fp32 {result['matmul_peak_gflops']:.0f} GFLOP/s (readings "
             f"{min(readings['fp32']):.0f}-{max(readings['fp32']):.0f})" + (
                 f", bf16 {result['matmul_peak_gflops_bf16']:.0f} GFLOP/s ({min(readings['bf16']):.0f}-"
                 f"{max(readings['bf16']):.0f})" if readings.get("bf16") else
                 "; bf16 is not native on this device (no AVX-512 BF16 or AMX): not timed"),
             f"{result['preset']}: {result['params'] / 1e6:.2f}M parameters"]
    if "train" in result:
        lines += ["", "train  precision  channels_last  compile  batch  img/s    GFLOP/s  of peak"]
        for r in result["train"]:
            lines.append(f"       {r['precision']:<9}  {str(r['channels_last']).lower():<13}  "
                         f"{str(r['compile']).lower():<7}  {r['batch']:<5}  {r['img_per_s']:<7.1f}  "
                         f"{r['achieved_gflops']:<7.1f}  {fmt_share(r['of_peak'])}")
        if "train_counted_ops" in result:
            c = result["train_counted_ops"]
            lines.append(f"fp32: convolutions and matrix products take {c['share_of_step']:.0%} of the step and run at "
                         f"{c['of_peak']:.3f} of the peak while they do")
        if "bf16_over_fp32" in result:
            lines.append(f"bf16 / fp32 training images/s: {result['bf16_over_fp32']:.2f}")
    if "sample" in result:
        s = result["sample"]
        lines += ["", f"sample {s['sampler']}, {s['steps']} steps, cfg {s['cfg']:g}, {s['precision']}: {s['nfe']:g} "
                      f"network evaluations per image, batch {s['batch']}: {s['img_per_s']:.2f} img/s, "
                      f"{s['img_evals_per_s']:.1f} image evaluations/s, {s['achieved_gflops']:.1f} GFLOP/s "
                      f"({s['of_peak']:.3f} of the {s['peak_of']} peak)"]
    return "\n".join(lines)


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
