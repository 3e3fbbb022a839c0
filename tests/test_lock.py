"""One writer per run directory: a second `diffuse train` or `distill` on a run in use is refused in one
sentence naming the holder, and a lock left by a killed process does not block the next run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from diffuse.errors import UserError
from diffuse.lock import LOCK, run_lock
from diffuse.training import train


def diffuse(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffuse", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny, command):
    run = tmp_path / "run"
    if command == "train":
        argv = ["train", "--preset", "fmnist-tiny"]
    else:
        teacher = train(tiny("train.probe_kimg=0", "train.kimg=0.032", "train.checkpoint_kimg=0.032",
                             "train.grid_kimg=0.032"), tmp_path / "teacher", log=lambda *a: None)
        argv = ["distill", str(teacher), "--preset", "dmd2"]
    with run_lock(run, "train"):
        done = diffuse(*argv, "--out", str(run))
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # the refused command wrote nothing
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and f"in use by process {os.getpid()} (diffuse train)" in done.stderr
    assert not run.exists()  # the holder, which wrote nothing either, left no folder behind


def test_the_same_process_cannot_take_a_held_lock_twice(tmp_path):
    with run_lock(tmp_path / "run", "train"):
        with pytest.raises(UserError, match="is in use by process"):
            with run_lock(tmp_path / "run", "distill"):
                pass
    with run_lock(tmp_path / "run", "train"):  # released on leaving the block
        pass


def test_a_killed_holders_lock_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom diffuse.lock import run_lock\n"
        f"with run_lock({str(run)!r}, 'train'):\n    print('held', flush=True)\n    time.sleep(300)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
        with run_lock(run, "train"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    start = time.monotonic()
    with run_lock(run, "train"):  # the kernel released the dead holder's flock
        assert f"process {os.getpid()}" in (run / LOCK).read_text()
    assert time.monotonic() - start < 5
