"""Fault drill: kill a training run again and again and check that nothing is lost.

    .venv/bin/python scripts/fault_drill.py [--random 40] [--signals 5] [--work DIR]

A toy run (80 steps, a checkpoint every 4) is trained once straight. A second run of the same
command is then SIGKILLed inside each step of the checkpoint write (before each file, while hashing
the manifest, at each fsync, at the rename, while pruning), then at random moments, and each
restart's resume point is compared with the newest checkpoint that verifies; the run is finished
and its weights compared bit for bit with the straight run. SIGTERM and SIGINT runs must exit 75
with a checkpoint of the step they stopped after, and resume bit-identically. Prints a table.
`tests/test_faults.py` runs a shorter drill with these same pieces.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffuse.checkpoint import latest_checkpoint, verify

# 80 steps of 512 points, a checkpoint every 4 steps, two kept; one thread, so runs are comparable.
TOY = ["--preset", "toy2d", "--set", "train.kimg=40.96", "--set", "train.checkpoint_kimg=2.048",
       "--set", "train.keep_checkpoints=2", "--set", "train.log_kimg=1.024", "--set", "train.grid_kimg=40.96",
       "--set", "train.probe_kimg=0", "--set", "train.threads=1", "--set", "sample.steps=4"]

# Runs `diffuse` with one function of the checkpoint writer replaced by one that SIGKILLs the process
# at its N-th call: argv = FUNCTION N diffuse-arguments...
KILL_AT_CALL = """
import os, signal, sys
import diffuse.checkpoint as checkpoint
name, count = sys.argv[1], int(sys.argv[2])
owner = checkpoint.os if name == "rename" else checkpoint.shutil if name == "rmtree" else checkpoint
original, calls = getattr(owner, name), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, wrapped)
from diffuse.cli import main
sys.exit(main(sys.argv[3:]))
"""
# Calls per checkpoint: 3 safetensors files, 5-6 hashes, 6-7 fsyncs, 1 rename, 1-2 removals by pruning.
WRITE_STEPS = [("save_file", 3), ("sha256_file", 6), ("fsync_path", 7), ("rename", 2), ("rmtree", 4)]


def diffuse_cmd(*args) -> list[str]:
    return [sys.executable, "-u", "-m", "diffuse", *args]


def resumed_from(output: str) -> float | None:
    """The kimg a (re)started run says it starts at; None if it was killed before it said."""
    line = next((line for line in output.splitlines() if line.startswith("model:")), None)
    return None if line is None else float(line.split(" at ")[1].split(" kimg")[0])


def newest_whole(run: Path) -> float:
    """The kimg of the newest checkpoint that verifies (0 if none), found independently of training."""
    root = run / "checkpoints"
    for path in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
        if verify(path) is None:
            return json.loads((path / "state.json").read_text())["nimg"] / 1000
    return 0.0


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    newest = latest_checkpoint(run, report=lambda *_: None)
    return {stem: load_file(newest / f"{stem}.safetensors") for stem in ("model", "ema", "optimizer")}


def bit_identical(a: dict, b: dict) -> bool:
    return all(a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in a)


def kill_at_call(run: Path, driver: Path, name: str, count: int) -> dict:
    """SIGKILL the run at the count-th call of `name`; what happened."""
    expected = newest_whole(run)
    proc = subprocess.run([sys.executable, "-u", str(driver), name, str(count), "train", *TOY, "--out", str(run)],
                          capture_output=True, text=True)
    return {"moment": f"{name} call {count}", "killed": proc.returncode == -signal.SIGKILL,
            "resumed": resumed_from(proc.stdout), "expected": expected, "skipped_torn": "skipping checkpoint" in proc.stdout}


def kill_after(run: Path, seconds: float) -> dict:
    """SIGKILL the run `seconds` after it starts training; what happened."""
    expected = newest_whole(run)
    proc = subprocess.Popen(diffuse_cmd("train", *TOY, "--out", str(run)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("model:"):
            break
    time.sleep(seconds)
    proc.kill()
    output += proc.stdout.readlines()
    proc.wait()
    text = "".join(output)
    return {"moment": f"{seconds:.2f} s into training", "killed": proc.returncode == -signal.SIGKILL,
            "resumed": resumed_from(text), "expected": expected, "skipped_torn": "skipping checkpoint" in text}


def interrupt(run: Path, sig: signal.Signals, seconds: float) -> dict:
    """Send `sig` `seconds` into training; then finish the run with the same command."""
    proc = subprocess.Popen(diffuse_cmd("train", *TOY, "--out", str(run)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("model:"):
            break
    time.sleep(seconds)
    proc.send_signal(sig)
    _, err = proc.communicate()
    stopped = float(err.split(" at ")[1].split(" kimg")[0]) if proc.returncode == 75 else None
    checkpointed = newest_whole(run)
    done = subprocess.run(diffuse_cmd("train", *TOY, "--out", str(run)), capture_output=True, text=True)
    return {"exit": proc.returncode, "one_line": err.count("\n") == 1, "stopped": stopped,
            "checkpointed": checkpointed, "resumed": resumed_from(done.stdout), "finished": done.returncode == 0}


# ---------------------------------------------------------------------------------------------
# The signal drill of every command (`tests/test_signals.py` runs a few cases of it).

TINY = ["--preset", "fmnist-tiny", "--set", "model.channels=[8, 16]", "--set", "model.emb_dim=32",
        "--set", "train.kimg=2", "--set", "train.batch=16", "--set", "train.checkpoint_kimg=0.032",
        "--set", "train.fd_kimg=0", "--set", "sample.steps=4", "--set", "train.threads=1"]
TEMPORARY = ("*.tmp", "*.tmp.*", ".tmp-*", "*.part", "part-*", ".*.prepare-*", ".diffuse-write-test-*")


def signal_case(command: str, work: Path, tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    """(argv, the names in work/run the command may write) of one command on the drill's run and images."""
    run = str(work / "run")
    return {
        "train": (["train", *TINY, "--out", str(tmp / "train")], ()),
        "sample": (["sample", run, "--n", "5000", "--out", str(tmp / "samples.npz")], ()),
        "eval": (["eval", run, "--n", "5000"], ()),
        "ema": (["ema", run, "--sweep", "--sigma-rels", "0.05,0.1", "--n", "3000"],
                ("ema_sweep.json", "ema_sweep.svg", "report.html")),
        "doctor": (["doctor", *TINY[:2], "--set", "model.channels=[8, 16]"], ()),
        "data prepare": (["data", "prepare", str(work / "images"), "--out", str(tmp / "data"), "--feature-kimg", "0"],
                         ()),
    }[command]


def signalled(argv: list[str], sigs: list[signal.Signals], seconds: float, marker: str | None,
              env: dict | None = None) -> dict:
    """Start `diffuse argv`, wait for the stdout line starting with `marker` (None: the start), then
    `seconds`, send `sigs` 10 ms apart; its exit code and stderr."""
    import os
    proc = subprocess.Popen(diffuse_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    if marker:
        for line in proc.stdout:
            if line.startswith(marker):
                break
    time.sleep(seconds)
    for i, sig in enumerate(sigs):
        time.sleep(0.01 if i else 0)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return {"exit": proc.returncode, "stderr": err}


def expected_exits(command: str, sigs: list[signal.Signals], marker: str | None) -> set[int]:
    """Training's steps checkpoint and exit 75 (a second signal there stops at once); all else 128 + signal."""
    stopped = {128 + sigs[0]}
    return stopped | {75} if command == "train" and marker == "model:" else stopped


def temporaries(*roots: Path) -> list[Path]:
    """Temporary files and folders left under the roots."""
    return sorted(p for root in roots for pattern in TEMPORARY for p in root.rglob(pattern))


def snapshot(root: Path, without: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under root but the lock and the names in `without`."""
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (*without, ".lock")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", type=int, default=40, help="SIGKILLs at random moments")
    parser.add_argument("--signals", type=int, default=5, help="SIGTERM runs and SIGINT runs, each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-drill-"))
    rng = random.Random(args.seed)
    straight = work / "straight"
    subprocess.run(diffuse_cmd("train", *TOY, "--out", str(straight)), check=True, capture_output=True)
    reference = weights(straight)

    run, driver = work / "killed", work / "kill_at_call.py"
    driver.write_text(KILL_AT_CALL)
    kills = [kill_at_call(run, driver, name, count) for name, per in WRITE_STEPS for count in range(1, 2 * per + 1)]
    kills += [kill_after(run, rng.uniform(0.0, 0.5)) for _ in range(args.random)]
    finished = subprocess.run(diffuse_cmd("train", *TOY, "--out", str(run)), capture_output=True, text=True)
    same = finished.returncode == 0 and bit_identical(weights(run), reference)

    signals = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        for i in range(args.signals):
            target = work / f"{sig.name.lower()}-{i}"
            result = interrupt(target, sig, rng.uniform(0.05, 0.6))
            result["identical"] = result["finished"] and bit_identical(weights(target), reference)
            signals.append((sig.name, result))

    landed = [k for k in kills if k["killed"]]
    correct = [k for k in landed if k["resumed"] is None or abs(k["resumed"] - k["expected"]) < 1e-9]
    print("| fault | times | outcome |\n|---|---|---|")
    print(f"| SIGKILL inside the checkpoint write (each call of save_file, sha256_file, fsync_path, rename, "
          f"rmtree) | {sum(k['killed'] for k in kills[:-args.random or None])} | every restart resumed from the newest "
          f"checkpoint that verifies |" if len(correct) == len(landed) else "| SIGKILL | - | A RESTART RESUMED WRONGLY |")
    print(f"| SIGKILL at a random moment of training | {sum(k['killed'] for k in kills[-args.random:])} | as above |")
    print(f"| restarts that were themselves killed before they said where they resume | "
          f"{sum(k['resumed'] is None for k in landed)} | counted above; the next restart resumed correctly |")
    print(f"| finished after {len(landed)} kills | 1 | weights, EMA and optimizer bit-identical to the straight run: "
          f"{same} |")
    for name in ("SIGTERM", "SIGINT"):
        rows = [r for n, r in signals if n == name]
        ok = [r for r in rows if r["exit"] == 75 and r["one_line"] and r["checkpointed"] == r["stopped"]
              and r["resumed"] == r["stopped"] and r["identical"]]
        print(f"| {name} during training | {len(rows)} | exit 75, one line, a checkpoint of the step it stopped "
              f"after, resumed there, bit-identical: {len(ok)} of {len(rows)} |")
    if len(correct) != len(landed) or not same:
        for k in landed:
            print(k)
        sys.exit(1)


if __name__ == "__main__":
    main()
