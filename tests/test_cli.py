"""The `diffuse` command end to end on a tiny run: train, resume, sample, eval, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from diffuse.cli import main

TINY = ["--set", "model.channels=[8, 16]", "--set", "model.emb_dim=32", "--set", "train.kimg=0.128",
        "--set", "train.batch=16", "--set", "train.threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "fmnist-tiny", *TINY, "--out", str(out)]) == 0
    return out


def test_sample_writes_the_stated_npz_format(run, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "12", "--steps", "3", "--labels", "2,5", "--cfg", "2",
                 "--rescale", "0.7", "--out", str(out), "--grid", str(tmp_path / "g.png")]) == 0
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (12, 28, 28, 1)
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == [2, 5] * 6
    assert (tmp_path / "g.png").stat().st_size > 0


def test_same_seed_same_samples_and_unconditional_labels(run, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for path in (a, b):
        assert main(["sample", str(run), "--n", "4", "--steps", "2", "--labels", "none", "--out", str(path)]) == 0
    with np.load(a) as fa, np.load(b) as fb:
        assert np.array_equal(fa["images"], fb["images"]) and fa["labels"].tolist() == [-1] * 4


def test_eval_prints_json(run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    main(["sample", str(run), "--n", "20", "--steps", "2", "--out", str(out)])
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 20 and result["n_ref"] == 10000 and result["fd"] > 0
    assert 0 <= result["accuracy"] <= 1


def test_rerunning_a_finished_run_trains_nothing_and_keeps_it(run):
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["train", "--preset", "fmnist-tiny", *TINY, "--out", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "nope", "--out", "x"],
    ["train", "--preset", "fmnist-tiny", "--set", "train.kimg=-1", "--out", "x"],
    ["sample", "missing-run", "--n", "3", "--out", "x.npz"],
    ["eval", "missing.npz", "--json"],
    ["frobnicate"],
])
def test_bad_input_is_one_sentence_and_exit_code_2(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffuse", *argv], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_refuses_an_npz_of_the_wrong_format(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 28, 28), np.float32))
    proc = subprocess.run([sys.executable, "-m", "diffuse", "eval", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "uint8" in proc.stderr


def test_eval_of_a_run_directory_samples_it_first(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "10", "--steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10 and result["steps"] == 2 and result["accuracy"] is not None
