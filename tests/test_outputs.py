"""An output replaces only what is its own: every writing command writes into a path that is new or that
verifies as its own kind of output, says so in one sentence otherwise, and leaves nothing behind under a
hidden name; `ema --sweep` and `doctor --run` hold the run lock and check their outputs before the long work."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffuse.cli import main
from diffuse.lock import run_lock
from diffuse.training import train


def edm2_config(*overrides):
    from test_edm2_train import edm2_config as config
    return config(*overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny power-EMA run (kept pristine: tests use copies)."""
    return train(edm2_config(), tmp_path_factory.mktemp("outputs") / "run", log=lambda *a: None)


@pytest.fixture
def run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under folder, hidden ones included, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return folder


def test_ema_out_refuses_a_users_folder_and_a_training_checkpoint(run, tmp_path, capsys):
    mine = user_folder(tmp_path)
    before, run_before = digest(tmp_path / "mine"), digest(run)
    for out in (mine, run / "checkpoints" / "step-0000016", tmp_path / "mine" / "notes.txt"):
        code, err = cli(["ema", run, "--sigma-rel", "0.07", "--out", out], capsys)
        assert code == 2 and err.count("\n") == 1 and str(out) in err, err
    assert digest(mine) == before and digest(run) == run_before  # nothing moved aside, nothing written


def test_ema_out_replaces_its_own_checkpoint_and_leaves_no_hidden_copy(run, tmp_path, capsys):
    out = tmp_path / "ema"
    for sigma in ("0.07", "0.05"):
        assert cli(["ema", run, "--sigma-rel", sigma, "--out", out], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema", "run"]  # no .tmp-* copy beside it
    assert '"ema_sigma_rel": 0.05' in (out / "state.json").read_text()


def marked_config(run: Path) -> str:
    return (run / "config.toml").read_text()


@pytest.mark.parametrize("own", ["config.toml", "report.html", "metrics.jsonl"])
def test_train_out_refuses_a_folder_of_a_users_files(tmp_path, capsys, own, trained):
    folder = tmp_path / "exp"
    folder.mkdir()
    text = marked_config(trained).split("\n", 1)[1] if own == "config.toml" else "mine"  # a config, unmarked
    (folder / own).write_text(text)
    before = digest(folder)
    code, err = cli(["train", "--preset", "fmnist-tiny", "--set", "train.kimg=0.016", "--out", folder], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a diffuse run directory" in err, err
    assert digest(folder) == before and not (folder / ".lock").exists()


def test_a_run_killed_before_its_first_event_is_still_a_run(tmp_path, trained):
    from diffuse.outputs import is_run_dir
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(marked_config(trained))
    assert is_run_dir(run) and is_run_dir(trained)
    (run / "config.toml").write_text(marked_config(trained).split("\n", 1)[1])
    assert not is_run_dir(run)


def test_sample_out_and_grid_refuse_other_files_before_sampling(run, tmp_path, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    for flags in (["--out", mine], ["--out", tmp_path / "s.npz", "--grid", mine], ["--out", tmp_path]):
        code, err = cli(["sample", run, "--n", "2", "--steps", "1", *flags], capsys)
        assert code == 2 and err.count("\n") == 1, err
    assert mine.read_text() == "keep me" and not (tmp_path / "s.npz").exists()
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    for _ in range(2):  # its own outputs are replaced
        assert cli(["sample", run, "--n", "2", "--steps", "1", "--out", out, "--grid", grid], capsys)[0] == 0
    assert np.load(out)["images"].shape == (2, 28, 28, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "mine.txt", "run", "s.npz"]


@pytest.mark.parametrize("argv", [
    ["ema", "{run}", "--sweep", "--sigma-rels", "0.05", "--n", "4", "--steps", "1"],
    ["doctor", "--run", "{run}", "--steps", "20"],
])
def test_sweep_and_doctor_take_the_run_lock(run, capsys, argv):
    with run_lock(run, "train"):
        code, err = cli([a.format(run=run) for a in argv], capsys)
    assert code == 2 and "is in use by" in err, err


@pytest.mark.parametrize("argv, name", [
    (["ema", "{run}", "--sweep", "--sigma-rels", "0.05", "--n", "4", "--steps", "1"], "ema_sweep.json"),
    (["doctor", "--run", "{run}", "--steps", "20"], "doctor.json"),
])
def test_sweep_and_doctor_check_their_outputs_first(run, capsys, argv, name):
    (run / name).mkdir()
    code, err = cli([a.format(run=run) for a in argv], capsys)
    assert code == 2 and err.count("\n") == 1 and name in err, err


def test_doctor_and_sweep_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    mine = user_folder(tmp_path)
    (mine / "config.toml").write_text("[train]\nkimg = 1\n")
    for argv in (["doctor", "--run", mine], ["ema", mine, "--sweep"]):
        code, err = cli(argv, capsys)
        assert code == 2 and "not a diffuse run directory" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["config.toml", "notes.txt"]
