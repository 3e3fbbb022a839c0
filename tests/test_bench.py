"""`diffuse bench`: the JSON it prints, FLOP counts against hand counts, NFE counts against the
samplers' formulas, and bad input in one sentence."""

import json
import statistics

import pytest
import torch
from torch import nn

from diffuse import bench
from diffuse.bench import format_report, step_flops, train_step_flops
from diffuse.cli import main
from diffuse.config import load_config
from diffuse.denoiser import Denoiser
from diffuse.process import VPDiscrete
from diffuse.speed import native_bf16


@pytest.fixture(autouse=True)
def keep_threads():
    """`diffuse bench --threads` sets torch's threads for the whole process: restore them after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench_json(capsys, *args) -> dict:
    assert main(["bench", "--preset", "fmnist-tiny", "--threads", "1", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_has_the_machine_the_peak_and_both_precisions(capsys):
    """fp32 and bf16 side by side where the CPU computes bf16 natively; fp32 alone where bf16 would be
    emulated (its peak reading alone would take minutes), and the JSON says which."""
    native = native_bf16("cpu")
    result = bench_json(capsys, "--steps", "3", "--batch", "4", "--set", "sample.steps=2", "--set", "sample.cfg=2")
    assert set(result["machine"]) >= {"cpu", "torch", "threads", "device", "load_average_1min"}
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"] == torch.__version__
    assert result["bf16_native"] is native
    # the peak is the best of its readings: one before each round of steps, one after the last, one
    # before and one after sampling
    readings = result["matmul_peak_readings"]
    assert len(readings["fp32"]) == 3 + 1 + 2 and (len(readings["bf16"]) == 3 + 1 + 2 if native else "bf16" not in readings)
    assert result["matmul_peak_gflops"] == max(readings["fp32"]) > 0
    assert result["matmul_peak_gflops_bf16"] == (max(readings["bf16"]) if native else None)
    runs = result["train"]
    assert [run["precision"] for run in runs] == (["fp32", "bf16"] if native else ["fp32"])
    for run in runs:
        assert run["batch"] == 4 and run["steps"] == len(run["seconds_each"]) == 3
        assert run["img_per_s"] > 0 and run["achieved_gflops"] > 0 and 0 < run["of_peak"]
        assert run["img_per_s"] == pytest.approx(4 / run["seconds_per_step"])
    fp32 = runs[0]
    assert fp32["peak_gflops"] == result["matmul_peak_gflops"]
    # the count is the net's work, the same for both precisions, and the one a plain step has
    plain_step = train_step_flops(load_config("fmnist-tiny"), 4, torch.device("cpu"))
    assert all(run["flops_per_step"] == plain_step for run in runs)
    if native:
        bf16 = runs[1]
        assert bf16["peak_gflops"] == result["matmul_peak_gflops_bf16"]
        # the median of each round's ratio (the steps took turns), not the ratio of the medians
        assert result["bf16_over_fp32"] == statistics.median(
            f / b for f, b in zip(fp32["seconds_each"], bf16["seconds_each"]))
    else:
        assert "bf16_over_fp32" not in result
        assert "bf16 is not native" in format_report(result)
    # the profiled share of the step inside the counted operations, and their rate while in them
    counted = result["train_counted_ops"]
    assert 0 < counted["share_of_step"] < 1
    assert counted["of_peak"] == pytest.approx(fp32["of_peak"] / counted["share_of_step"])
    s = result["sample"]
    assert s["nfe"] == 4  # 2 DDIM steps, each evaluating the conditional and the unconditional image
    assert s["img_per_s"] > 0 and s["img_evals_per_s"] == pytest.approx(4 * s["img_per_s"])
    peak = result["matmul_peak_gflops_bf16" if s["precision"] == "bf16" else "matmul_peak_gflops"]
    assert s["precision"] == ("bf16" if result["bf16_native"] else "fp32")  # sample.precision auto
    assert s["of_peak"] == pytest.approx(s["achieved_gflops"] / peak)
    # the sampler's forward costs a third of a training step's forward and backward
    assert s["flops_per_img_eval"] * 3 == pytest.approx(fp32["flops_per_step"] / 4, rel=0.01)


def test_variants_are_timed_in_turn_and_their_ratio_is_the_median_of_each_rounds(monkeypatch):
    """A slow spell that spans one round slows both variants in it and leaves the ratio alone."""
    calls = []

    class Meter:
        def read(self):
            calls.append("peak")

    def step_of(name):
        return lambda i: calls.append((name, i))

    # the clock reads start, end for each step: rounds of (fp32, bf16) seconds (2, 1), (20, 10) in a
    # slow spell, (3, 1)
    stamps = [t for k, d in enumerate([2, 1, 20, 10, 3, 1]) for t in (100 * k, 100 * k + d)]
    monkeypatch.setattr(bench.time, "perf_counter", lambda clock=iter(stamps): next(clock))
    seconds = bench.timed_in_turn({"fp32": step_of("fp32"), "bf16": step_of("bf16")}, 3, torch.device("cpu"),
                                  Meter())
    assert calls == ["peak", ("fp32", 2), ("bf16", 2), "peak", ("fp32", 3), ("bf16", 3), "peak", ("fp32", 4),
                     ("bf16", 4), "peak"]
    assert seconds == {"fp32": [2, 20, 3], "bf16": [1, 10, 1]}
    assert bench.speed_ratio(seconds["bf16"], seconds["fp32"]) == 2  # median of 2, 2, 3 (medians' ratio: 3)


def test_a_precision_asked_for_is_the_only_one_timed(capsys):
    result = bench_json(capsys, "--what", "train", "--steps", "1", "--batch", "2", "--set", "train.precision=bf16",
                        "--set", "train.channels_last=true")
    assert [(r["precision"], r["channels_last"]) for r in result["train"]] == [("bf16", True)]
    assert "bf16_over_fp32" not in result and "sample" not in result
    if not native_bf16("cpu"):  # asked for, it is timed; its share of an unread bf16 peak is unknown
        assert result["train"][0]["of_peak"] is None


def test_heun_nfe_is_counted_not_assumed(capsys):
    """heun's NFE is 2N - 1, less one where the first time has alpha = 0 (zero terminal SNR): 4 for 3 steps."""
    result = bench_json(capsys, "--what", "sample", "--batch", "2", "--set", "sample.sampler=heun",
                        "--set", "sample.steps=3")
    assert "train" not in result and result["sample"]["nfe"] == 4


class TwoLayers(nn.Module):
    """first(x) -> ReLU -> second: a net whose FLOPs a person can count. Ignores t and cond."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x, t, cond):
        return self.second(torch.relu(self.first(x)))


def test_linear_step_flops_match_a_hand_count():
    B, D, H = 16, 2, 32
    denoiser = Denoiser(TwoLayers(nn.Linear(D, H), nn.Linear(H, D)), VPDiscrete("linear", True), "v")
    # each product 2 M N K: forward 2BDH per layer; backward 2BDH for the weight's gradient of each layer
    # and 2BDH for the input gradient of the second only (the first layer's input x_t needs none)
    expected = 2 * (2 * B * D * H) + 2 * (2 * B * D * H) + 1 * (2 * B * D * H)
    flops = step_flops(denoiser, load_config("toy2d"), torch.randn(B, D), torch.arange(B) % 8)
    assert flops == expected


def test_convolution_step_flops_match_a_hand_count():
    B, C, side = 4, 8, 28
    denoiser = Denoiser(TwoLayers(nn.Conv2d(1, C, 3, padding=1), nn.Conv2d(C, 1, 3, padding=1)),
                        VPDiscrete("linear", True), "v")
    per_pass = 2 * B * side * side * C * 1 * 3 * 3  # 2 x outputs x (in channels x kernel) per layer, either layer
    flops = step_flops(denoiser, load_config("fmnist-tiny"), torch.randn(B, 1, side, side), torch.arange(B) % 10)
    assert flops == 5 * per_pass  # forward 2, backward 3 (no input gradient for the first layer)


def assert_one_sentence(err: str):
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("diffuse: "), repr(err)
    assert err.rstrip().endswith((".", "?", "'")), repr(err)


@pytest.mark.parametrize("args, words", [
    (["--preset", "fmnist-tiyn"], "unknown preset 'fmnist-tiyn' (did you mean 'fmnist-tiny'?)"),
    (["--set", "train.precision=fp16"], "train.precision = 'fp16' is not one of auto, fp32, bf16"),
    (["--set", "train.precison=bf16"], "unknown config key 'train.precison'"),
    (["--set", "train.channels_last=1"], "train.channels_last must be true or false"),
    (["--set", "train.precision"], "is not key=value"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--batch", "-3"], "--batch -3 must be at least 1"),
    (["--threads", "-1"], "--threads -1 must be at least 0"),
    (["--what", "everything"], "invalid choice"),
    (["--preset", "dmd"], "is for `diffuse distill`"),
])
def test_bad_bench_input_is_one_sentence_and_exit_code_2(capsys, args, words):
    assert main(["bench", *args]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and captured.out == ""
    assert_one_sentence(captured.err)
