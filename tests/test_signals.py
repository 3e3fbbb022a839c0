"""The signal drill: every command, started as a subprocess, gets SIGINT or SIGTERM at a seeded random
moment (start-up included, and two signals 10 ms apart) and ends with exactly one line on stderr,
no traceback, its documented exit code (75 after training's checkpoint, else 128 + the signal), no
temporary file, and the files written before it intact. `scripts/fault_drill.py --signals-all N`
runs a longer sweep of the same cases."""

import random
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuse.checkpoint import verify
from diffuse.training import train

import importlib.util

spec = importlib.util.spec_from_file_location("fault_drill", Path(__file__).parents[1] / "scripts" / "fault_drill.py")
drill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drill)

RNG = random.Random(19)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny power-EMA run (for sample, eval and ema) and a folder of 400 small images (for data prepare)."""
    from conftest import tiny_config
    root = tmp_path_factory.mktemp("signals")
    train(tiny_config("train.probe_kimg=0", "train.ema=power", "train.ema_snapshot_kimg=0.128"), root / "run",
          log=lambda *a: None)
    images = root / "images"
    images.mkdir()
    for i in range(400):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8)).save(images / f"{i}.png")
    return root


# (command, signals, seconds after the marker, the marker on stdout to wait for: None = from the start)
CASES = [
    ("train", [signal.SIGINT], 0.5, None),              # the imports
    ("train", [signal.SIGTERM], RNG.uniform(0, 1), "data:"),   # the probe's baseline
    ("train", [signal.SIGINT, signal.SIGINT], RNG.uniform(0, 1), "data:"),
    ("train", [signal.SIGTERM, signal.SIGTERM], RNG.uniform(0, 0.3), "model:"),  # in the steps: 75 or 143
    ("sample", [signal.SIGINT], RNG.uniform(0.5, 4), None),
    ("sample", [signal.SIGTERM, signal.SIGTERM], RNG.uniform(2, 6), None),
    ("eval", [signal.SIGTERM], RNG.uniform(0.5, 6), None),
    ("ema", [signal.SIGINT], RNG.uniform(0.5, 5), None),
    ("doctor", [signal.SIGTERM], RNG.uniform(1, 6), None),
    ("data prepare", [signal.SIGINT, signal.SIGINT], RNG.uniform(0.5, 2), None),  # a quiet CPU prepares in ~1 s
]


@pytest.mark.parametrize("command, sigs, seconds, marker", CASES,
                         ids=[f"{c[0]}-{'+'.join(s.name for s in c[1])}-{c[3] or 'start'}" for c in CASES])
def test_a_signal_ends_every_command_in_one_line(work, tmp_path, command, sigs, seconds, marker):
    argv, outputs = drill.signal_case(command, work, tmp_path)
    before = drill.snapshot(work / "run", without=outputs)
    result = drill.signalled(argv, sigs, seconds, marker, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert result["stderr"].count("\n") == 1, result["stderr"]
    assert result["exit"] in drill.expected_exits(command, sigs, marker), result
    assert drill.temporaries(work, tmp_path) == [], drill.temporaries(work, tmp_path)
    assert drill.snapshot(work / "run", without=outputs) == before
    for checkpoint in (work / "run" / "checkpoints").glob("step-*"):
        assert verify(checkpoint) is None
