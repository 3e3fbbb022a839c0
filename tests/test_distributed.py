"""Two gloo processes on the CPU, started by the real launchers (torchrun, accelerate launch), against one.

The global batch, the per-image seeds and the feature sums make a run independent of the number
of ranks: the weights agree to rounding, the samples and the FD agree exactly or to 1e-6.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffuse.checkpoint import latest_checkpoint, load_denoiser

# 16 steps of a global batch of 16, FD of 64 samples at the two checkpoints, the probe on.
TINY = ["--preset", "fmnist-tiny", "--set", "model.channels=[8, 16]", "--set", "model.emb_dim=32",
        "--set", "train.kimg=0.256", "--set", "train.batch=16", "--set", "train.log_kimg=0.064",
        "--set", "train.grid_kimg=0.256", "--set", "train.checkpoint_kimg=0.128", "--set", "train.fd_kimg=0.128",
        "--set", "train.fd_n=64", "--set", "train.fd_steps=2", "--set", "train.probe_kimg=0.064",
        "--set", "sample.steps=4", "--set", "train.threads=1",
        # fp32: what is checked is the ranks' arithmetic, to fp32's rounding; bf16's rounding of half a batch
        # against the whole batch's is larger than these tolerances
        "--set", "train.precision=fp32", "--set", "sample.precision=fp32"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run trained by one process and by two under torchrun."""
    root = tmp_path_factory.mktemp("ranks")
    run([sys.executable, "-m", "diffuse", "train", *TINY, "--out", str(root / "one")])
    two = run([*TORCHRUN, "-m", "diffuse", "train", *TINY, "--out", str(root / "two")])
    return root / "one", root / "two", two.stdout


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_the_weights_of_one(runs):
    """Equal to rounding: 99% of the weights within 1e-6 and the nets' outputs within 1e-5. The rest are
    biases in front of a group norm, whose gradient is zero in exact arithmetic; Adam divides their
    rounding noise by its own size, so they wander by up to lr each step (1e-3 here) on either run."""
    one, two, _ = runs
    a = load_file(latest_checkpoint(one) / "model.safetensors")
    b = load_file(latest_checkpoint(two) / "model.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff <= 1e-6).float().mean() >= 0.99 and diff.max() < 1e-3
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t, labels = torch.linspace(0, 999, 8).long(), torch.arange(8)
    outputs = [load_denoiser(run_dir, "model")[1].raw(x, t, labels) for run_dir in (one, two)]
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)


def test_rank_0_alone_writes_the_run_directory(runs):
    one, two, stdout = runs
    assert stdout.count("model: ") == 1  # one rank prints
    assert [e["event"] for e in events(two)] == [e["event"] for e in events(one)]  # each event once
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000008", "step-0000016"]
    assert (two / "report.html").is_file() and list((two / "samples").glob("grid-*.png"))


def test_fd_during_training_over_two_ranks_equals_one(runs):
    one, two, _ = runs
    fds = [[e["fd"] for e in events(r) if e["event"] == "fd"] for r in (one, two)]
    accuracies = [[e["accuracy"] for e in events(r) if e["event"] == "fd"] for r in (one, two)]
    assert len(fds[0]) == 2 and accuracies[0] == accuracies[1]
    # the two runs' weights agree to rounding, so their samples (and FDs) do too
    assert np.allclose(fds[0], fds[1], rtol=1e-6, atol=0)


def test_samples_and_eval_on_two_ranks_equal_one(runs, tmp_path):
    one, _, _ = runs
    args = ["sample", str(one), "--num-samples", "10", "--steps", "3", "--seed", "5"]  # torchrun's parser claims --n
    run([sys.executable, "-m", "diffuse", *args, "--out", str(tmp_path / "a.npz")])
    run([*TORCHRUN, "-m", "diffuse", *args, "--out", str(tmp_path / "b.npz")])  # ranks: 5 images each
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    evals = [json.loads(run([*launcher, "-m", "diffuse", "eval", str(one), "--n", "20", "--steps", "2",
                             "--json"]).stdout.splitlines()[-1]) for launcher in ([sys.executable], ACCELERATE)]
    assert evals[0]["fd"] == pytest.approx(evals[1]["fd"], rel=1e-6) and evals[0]["n"] == evals[1]["n"] == 20


FD_OVER_RANKS = """
import json, sys, torch
from diffuse import distributed
from diffuse.data import load_fmnist
from diffuse.metrics.fmnist_fd import evaluate_images
distributed.start()
images, labels = load_fmnist("train")
images, labels = images[:301], labels[:301]  # uneven blocks: 151 and 150
mine = distributed.block(len(images))
result = evaluate_images(images[mine], labels[mine], across_ranks=True)
if distributed.is_main():
    print(json.dumps(result))
distributed.stop()
"""


def test_fd_over_two_ranks_equals_one_to_1e_6(tmp_path):
    script = tmp_path / "fd.py"
    script.write_text(FD_OVER_RANKS)
    one, two = (json.loads(run([*launcher, str(script)]).stdout.splitlines()[-1])
                for launcher in ([sys.executable], TORCHRUN))
    assert abs(one["fd"] - two["fd"]) <= 1e-6 and one["accuracy"] == two["accuracy"] and two["n"] == 301


def test_a_batch_that_does_not_split_is_refused(tmp_path):
    proc = subprocess.run([*TORCHRUN, "-m", "diffuse", "train", *TINY, "--set", "train.batch=15",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "train.batch = 15 does not split over 2 processes" in proc.stderr


def test_resume_on_two_ranks_continues_a_one_rank_run(runs, tmp_path):
    """Checkpoints do not record the number of ranks: a run started on one process goes on on two."""
    one, _, _ = runs
    shutil.copytree(one, tmp_path / "run")
    proc = run([*TORCHRUN, "-m", "diffuse", "train", *TINY, "--set", "train.kimg=0.32", "--out", str(tmp_path / "run")])
    assert "resuming at 0.256 kimg of 0.32" in proc.stdout
    assert latest_checkpoint(tmp_path / "run").name == "step-0000020"


DISTILL = ["--set", "train.kimg=0.128", "--set", "train.batch=16", "--set", "train.log_kimg=0.064",
           "--set", "train.grid_kimg=0.128", "--set", "train.checkpoint_kimg=0.064", "--set", "train.fd_kimg=0.128",
           "--set", "train.fd_n=32", "--set", "train.threads=1", "--set", "distill.gen_every=2",
           "--set", "train.precision=fp32", "--set", "sample.precision=fp32"]


@pytest.mark.parametrize("method", [
    # one step, the GAN head on the fake score; in fp32 (the preset's bf16 rounds a 16-image block
    # differently from the 32-image batch: 65% of weights within 1e-6 after 8 iterations)
    ["--preset", "dmd2", "--set", "train.precision=fp32"],
    ["--preset", "dmd", "--set", "distill.pairs=24", "--set", "distill.pair_steps=2",
     "--set", "distill.generator_steps=2"],  # regression pairs sampled over the ranks, a 2-step generator
], ids=["dmd2", "dmd-2step"])
def test_two_ranks_distill_the_student_of_one(runs, tmp_path, method):
    """Generator, fake score (and head) after 8 iterations agree to rounding as in training; rank 0
    alone writes; the in-training FD agrees; DMD's teacher pairs sampled over two ranks equal one's."""
    teacher = runs[0]
    args = ["distill", str(teacher), *method, *DISTILL]
    run([sys.executable, "-m", "diffuse", *args, "--out", str(tmp_path / "one")])
    proc = run([*TORCHRUN, "-m", "diffuse", *args, "--out", str(tmp_path / "two")])
    one, two = tmp_path / "one", tmp_path / "two"
    assert proc.stdout.count("distilling ") == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert [e["event"] for e in events(two)] == [e["event"] for e in events(one)]
    for name in ("model", "ema", "fake") + (("head",) if "dmd2" in method else ()):
        a = load_file(latest_checkpoint(one) / f"{name}.safetensors")
        b = load_file(latest_checkpoint(two) / f"{name}.safetensors")
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert (diff <= 1e-6).float().mean() >= 0.99 and diff.max() < 1e-3, (name, diff.max())
    fds = [[e["fd"] for e in events(r) if e["event"] == "fd"] for r in (one, two)]
    assert len(fds[0]) == 1 and np.allclose(fds[0], fds[1], rtol=1e-5, atol=0)
    if "dmd" in method:
        pairs = [load_file(r / "pairs.safetensors") for r in (one, two)]
        assert all(torch.equal(pairs[0][k], pairs[1][k]) for k in pairs[0])
