"""Faults during training: SIGKILL at any moment, SIGTERM/SIGINT, a non-finite loss, a full disk.

Each ends cleanly and loses nothing: the run resumes from a checkpoint whose manifest verifies and
ends bit-identical to a run that was never disturbed.
"""

import errno
import importlib.util
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import diffuse.checkpoint
import diffuse.run
import diffuse.training
from diffuse.checkpoint import latest_checkpoint, verify
from diffuse.cli import main
from diffuse.errors import Diverged, Interrupted
from diffuse.training import train

# The drill's pieces: the toy run, the kill-at-N-th-call driver, and how a resume point is read.
spec = importlib.util.spec_from_file_location("fault_drill", Path(__file__).parents[1] / "scripts" / "fault_drill.py")
drill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drill)
TOY, KILL_AT_CALL, diffuse_cmd, resumed_from, newest_whole, weights = (
    drill.TOY, drill.KILL_AT_CALL, drill.diffuse_cmd, drill.resumed_from, drill.newest_whole, drill.weights)
IN_PROCESS = ["--set", "train.threads=0"]  # leave this test process's thread count alone


def assert_bit_identical(a: dict, b: dict):
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for key in a[stem]:
            assert torch.equal(a[stem][key], b[stem][key]), f"{stem}.{key} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The toy run trained without interruption, in a subprocess like the runs it is compared with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(diffuse_cmd("train", *TOY, "--out", str(run)), check=True, capture_output=True)
    return run


def test_sigkill_at_many_moments_always_resumes_from_a_verified_checkpoint(straight, tmp_path):
    """22 kills: 12 inside the checkpoint write (before each file, in the manifest hashing, at the fsyncs,
    the rename and the pruning) and 10 at random moments; every restart resumes from the newest checkpoint
    that verifies (or is killed while verifying, before it says), and the run ends bit-identical to the
    straight one. `scripts/fault_drill.py` runs the long version."""
    run, driver = tmp_path / "run", tmp_path / "kill_at_call.py"
    driver.write_text(KILL_AT_CALL)
    rng = random.Random(0)
    targeted = [("save_file", 1), ("save_file", 2), ("save_file", 6), ("sha256_file", 3), ("sha256_file", 13),
                ("fsync_path", 4), ("fsync_path", 7), ("fsync_path", 15), ("rename", 1), ("rename", 3),
                ("rmtree", 2), ("rmtree", 5)]
    kills = [drill.kill_at_call(run, driver, name, count) for name, count in targeted]
    assert all(k["killed"] for k in kills), kills
    kills += [drill.kill_after(run, rng.uniform(0.0, 0.4)) for _ in range(10)]
    landed = [k for k in kills if k["killed"]]
    assert len(landed) >= 20
    for k in landed:
        assert k["resumed"] is None or k["resumed"] == pytest.approx(k["expected"]), k
    proc = subprocess.run(diffuse_cmd("train", *TOY, "--out", str(run)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(weights(run), weights(straight))
    kimgs = [e["kimg"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "train"]
    assert kimgs == sorted(set(kimgs)) and len(kimgs) == 40  # every log line once: redone steps were trimmed
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert len(list((run / "checkpoints").glob("step-*"))) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_exit_75_and_resume_bit_identically(straight, tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(diffuse_cmd("train", *TOY, "--out", str(run)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("model:"):
            break
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate()
    assert proc.returncode == 75, err
    assert err.count("\n") == 1 and err.startswith(f"diffuse: {sig.name} at ") and "re-run" in err
    stopped_at = float(err.split(" at ")[1].split(" kimg")[0])
    assert newest_whole(run) == pytest.approx(stopped_at)  # the checkpoint is of the step it stopped after
    proc = subprocess.run(diffuse_cmd("train", *TOY, "--out", str(run)), capture_output=True, text=True)
    assert proc.returncode == 0 and resumed_from(proc.stdout) == pytest.approx(stopped_at)
    assert_bit_identical(weights(run), weights(straight))


def test_a_signal_after_the_save_decision_is_answered_at_the_next_step(tmp_path, tiny, monkeypatch):
    """A SIGTERM that lands late in a step (here: while the report is written, after the step decided not
    to checkpoint) must not stop the run before a checkpoint of the step it names is on disk."""
    real, sent = diffuse.run.write_report, []

    def write_report(run_dir):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run_dir)

    monkeypatch.setattr(diffuse.run, "write_report", write_report)
    with pytest.raises(Interrupted, match="SIGTERM at 0.08 kimg") as stopped:
        train(tiny("train.probe_kimg=0"), tmp_path / "run", log=lambda *a: None)
    assert newest_whole(tmp_path / "run") == pytest.approx(0.08)  # the step after the one it landed in (0.064)
    assert "wrote a checkpoint" in str(stopped.value)


# ---------------------------------------------------------------------------------------------
# In-process faults: a non-finite loss, non-finite weights, a full disk.


def nan_loss_at(monkeypatch, bad_steps: set[int]):
    """Make the training loss NaN at the given (0-based) training steps."""
    real, calls = diffuse.training.loss_at, [0]

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        return out * float("nan") if calls[0] - 1 in bad_steps else out

    monkeypatch.setattr(diffuse.training, "loss_at", loss)


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny, monkeypatch, capsys):
    run = tmp_path / "run"
    nan_loss_at(monkeypatch, {10})  # steps 0-7 fill the first checkpoint (0.128 kimg at batch 16)
    code = main(["train", "--preset", "fmnist-tiny", "--set", "model.channels=[8, 16]", "--set", "model.emb_dim=32",
                 "--set", "train.kimg=0.256", "--set", "train.batch=16", "--set", "train.checkpoint_kimg=0.128",
                 "--set", "train.probe_kimg=0", "--set", "train.fd_kimg=0", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1
    assert "step 11 had loss nan" in err and "step-0000008" in err
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-0000008"]


def test_skip_policy_skips_the_update_and_logs_it(tmp_path, tiny, monkeypatch):
    nan_loss_at(monkeypatch, {3, 4})
    run = train(tiny("train.nonfinite=skip", "train.probe_kimg=0"), tmp_path / "run", log=lambda *a: None)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [4, 5]
    _, tensors, _ = diffuse.checkpoint.load_checkpoint(latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in tensors["model"].values())
    adam_steps = {v.item() for k, v in tensors["optimizer"].items() if k.endswith(".step")}
    assert adam_steps == {16 - 2}  # 16 steps, two skipped: Adam stepped 14 times


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny, monkeypatch):
    real = diffuse.training.train_step

    def poisoning_step(denoiser, *args):  # a step that leaves an inf in the weights but reports a finite loss
        out = real(denoiser, *args)
        if len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 1:
            next(denoiser.parameters()).data[0] = float("inf")
        return out

    monkeypatch.setattr(diffuse.training, "train_step", poisoning_step)
    with pytest.raises(Diverged, match="not finite; no checkpoint was written"):
        train(tiny("train.probe_kimg=0", "train.nonfinite=skip"), tmp_path / "run", log=lambda *a: None)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-0000008"]


def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_loses_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real, calls = diffuse.checkpoint.save_file, [0]

    def save_file(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # the second checkpoint's second file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(diffuse.checkpoint, "save_file", save_file)
    args = ["train", *TOY, *IN_PROCESS, "--set", "train.kimg=4.096", "--out", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "intact" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000004"]  # no temporary folder left
    assert verify(run / "checkpoints" / "step-0000004") is None
    monkeypatch.setattr(diffuse.checkpoint, "save_file", real)  # space freed: the same command resumes
    assert main(args) == 0
    assert "resuming at 2.048 kimg" in capsys.readouterr().out


def test_a_full_disk_while_logging_is_one_sentence(tmp_path, monkeypatch, capsys):
    def append_jsonl(path, event):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(diffuse.run, "append_jsonl", append_jsonl)
    assert main(["train", *TOY, *IN_PROCESS, "--set", "train.kimg=1.024", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err and "No space left on device" in err


def test_an_unwritable_run_directory_is_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", *TOY, *IN_PROCESS, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be written" in err and "not a writable folder" in err


def test_pruning_keeps_the_newest_and_the_best_fd(tmp_path):
    """Checkpoints at steps 1-6 with FD measured at 2 (the best) and 4: keep=2 leaves 2, 5 and 6."""
    root = tmp_path / "checkpoints"
    fds = {2: 10.5, 4: 12.0}
    for step in range(1, 7):
        (root / f"step-{step:07d}").mkdir(parents=True)
        state = {"step": step, "nimg": step * 64} | ({"fd": fds[step]} if step in fds else {})
        (root / f"step-{step:07d}" / "state.json").write_text(json.dumps(state))
    (root / ".tmp-step-0000007-123").mkdir()  # a killed writer's leftover
    diffuse.checkpoint.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000005", "step-0000006"]


def test_a_run_with_in_training_fd_keeps_its_best_checkpoint(tmp_path, tiny):
    run = train(tiny("train.probe_kimg=0", "train.kimg=0.384", "train.fd_kimg=0.128", "train.fd_n=20",
                     "train.fd_steps=2", "train.keep_checkpoints=1"), tmp_path / "run", log=lambda *a: None)
    fds = {e["step"]: e["fd"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if e["event"] == "fd"}
    assert sorted(fds) == [8, 16, 24]
    best = min(fds, key=fds.get)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == sorted({f"step-{best:07d}", "step-0000024"})
    state = json.loads((run / "checkpoints" / f"step-{best:07d}" / "state.json").read_text())
    assert state["fd"] == fds[best]
