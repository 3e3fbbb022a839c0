"""Untrusted files: a checkpoint is loaded only if its manifest verifies, tensors only from
safetensors and state only from JSON; anything else is refused with a sentence naming the file."""

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffuse.checkpoint import load_checkpoint, verify
from diffuse.cli import main
from diffuse.errors import UserError
from diffuse.training import train

SRC = Path(__file__).parents[1] / "src" / "diffuse"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 8 and 16 (kept pristine: tests tamper with copies)."""
    from conftest import tiny_config
    return train(tiny_config("train.probe_kimg=0"), tmp_path_factory.mktemp("trained") / "run", log=lambda *a: None)


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step-0000016"


def remanifest(checkpoint: Path) -> None:
    """Rewrite the manifest to match the files, as someone who tampers on purpose would."""
    manifest = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
                for p in sorted(checkpoint.iterdir()) if p.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def sample_cli(source, tmp_path, capsys, seed=0):
    out = tmp_path / f"samples-{seed}.npz"
    code = main(["sample", str(source), "--n", "4", "--steps", "2", "--seed", str(seed), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def test_a_flipped_byte_is_refused_and_the_run_falls_back_to_the_older_checkpoint(run, tmp_path, capsys):
    model = newest(run) / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, _, err, _ = sample_cli(newest(run), tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{model} does not match its SHA-256 in the manifest" in err
    code, out, _, fallback = sample_cli(run, tmp_path, capsys)
    assert code == 0 and "skipping checkpoint step-0000016" in out
    code, _, _, older = sample_cli(run / "checkpoints" / "step-0000008", tmp_path, capsys, seed=0)
    assert np.array_equal(np.load(fallback)["images"], np.load(older)["images"])  # drawn from step 8
    from conftest import tiny_config
    logs = []
    train(tiny_config("train.probe_kimg=0"), run, log=logs.append)  # resuming skips it too
    assert any(line.startswith("skipping checkpoint step-0000016") for line in logs)
    assert any("resuming at 0.128 kimg" in line for line in logs)


def test_a_truncated_file_is_refused(run, tmp_path, capsys):
    ema = newest(run) / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    code, _, err, _ = sample_cli(newest(run), tmp_path, capsys)
    assert code == 2 and "bytes, not the" in err and "truncated" in err


def test_a_pickle_in_place_of_safetensors_is_never_unpickled(run, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (newest(run) / "ema.safetensors").write_bytes(pickle.dumps({"weight": Payload()}))
    remanifest(newest(run))  # the manifest agrees: only the format can give it away
    code, _, err, _ = sample_cli(newest(run), tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "ema.safetensors is not a safetensors file" in err and "never unpickled" in err
    assert not marker.exists()


@pytest.mark.parametrize("tamper, message", [
    (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing or unreadable"),
    (lambda c: (c / "manifest.json").write_text("[1, 2]"), "is not a diffuse manifest"),
    (lambda c: (c / "manifest.json").write_text(json.dumps({"../../config.toml": {"sha256": "0", "bytes": 1}})),
     "names a file outside its folder"),
    (lambda c: ((c / "model.safetensors").unlink(), remanifest(c)), "lacks model.safetensors"),
    (lambda c: ((c / "state.json").write_text("{not json"), remanifest(c)), "state.json is not valid JSON"),
    (lambda c: ((c / "state.json").write_text('{"step": 3}'), remanifest(c)), "has no images-seen count"),
    (lambda c: ((c / "config.toml").write_text("[train]\nkimg = -1\n"), remanifest(c)),
     "config.toml: train.kimg must be greater than 0"),
    (lambda c: ((c / "config.toml").write_text("[train\n"), remanifest(c)), "config.toml is not valid TOML"),
])
def test_tampered_checkpoint_files_are_refused(run, tmp_path, capsys, tamper, message):
    tamper(newest(run))
    code, _, err, _ = sample_cli(newest(run), tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err


def set_channels(checkpoint: Path, channels: str) -> None:
    """model.channels changed in the checkpoint's config and its run's alike (the two must agree)."""
    for path in (checkpoint / "config.toml", checkpoint.parents[1] / "config.toml"):
        path.write_text(re.sub(r"channels = \[[^\]]*\]", f"channels = {channels}", path.read_text()))
    remanifest(checkpoint)


def test_weights_that_do_not_fit_the_config_are_refused(run, tmp_path, capsys):
    checkpoint = newest(run)
    set_channels(checkpoint, "[16, 32]")
    code, _, err, _ = sample_cli(checkpoint, tmp_path, capsys)
    assert code == 2 and "do not fit the model its config describes" in err


def test_a_checkpoint_from_another_run_is_refused_on_resume(run):
    from conftest import tiny_config
    foreign = run / "checkpoints" / "step-0000024"  # a whole checkpoint of a run with another seed
    shutil.copytree(newest(run), foreign)
    config = (foreign / "config.toml").read_text()
    (foreign / "config.toml").write_text(re.sub(r"seed = \d+", "seed = 7", config))
    remanifest(foreign)
    assert verify(foreign) is None
    with pytest.raises(UserError, match="train.seed differ.*belongs to another run"):
        train(tiny_config("train.probe_kimg=0", "train.kimg=0.384"), run, log=lambda *a: None)


def test_the_pristine_checkpoint_loads(trained):
    config, tensors, state = load_checkpoint(newest(trained))
    assert state["nimg"] == 256 and {"model", "ema", "optimizer"} <= tensors.keys()


def test_no_code_path_can_unpickle():
    """Every torch.load passes weights_only=True, every np.load allow_pickle=False; pickle is imported only by
    the CIFAR reader, whose Unpickler subclass allows numpy's arrays alone (a malicious batch is refused:
    tests/test_prepare_bad.py), and nothing calls pickle.load or pickle.loads."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        for call in re.findall(r"(?<![\w`])np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, f"{path}: {call}"
        assert not re.search(r"pickle\.loads?\(|(dill|cloudpickle)", text), path
        if re.search(r"^\s*(import|from) pickle", text, re.M):
            assert path.name == "archives.py" and "def find_class(self, module, name)" in text, path


# ---------------------------------------------------------------------------------------------
# The manifest covers its folder; the weights are the ones the config implies; the config is the run's.


def rewrite_weights(checkpoint: Path, stem: str, change) -> None:
    """Replace each tensor t of stem.safetensors by change(t) and re-manifest, as a deliberate tamperer would."""
    from safetensors.torch import load_file, save_file
    path = checkpoint / f"{stem}.safetensors"
    save_file({k: change(v) for k, v in load_file(path).items()}, path)
    remanifest(checkpoint)


def emptied_manifest(c: Path):
    (c / "ema.safetensors").write_bytes((c / "model.safetensors").read_bytes())  # other weights, no complaint before
    (c / "manifest.json").write_text("{}")


@pytest.mark.parametrize("tamper, message", [
    (emptied_manifest, "config.toml is not listed in"),
    (lambda c: (c / "extra.safetensors").write_bytes((c / "ema.safetensors").read_bytes()), "extra.safetensors is not listed"),
    (lambda c: ((c / "state.json").unlink(), (c / "state.json").symlink_to(c.parent / "step-0000008" / "state.json"),
                remanifest(c)), "state.json is a link"),
    (lambda c: (c / "sub").mkdir(), "sub is a folder"),
    (lambda c: rewrite_weights(c, "ema", lambda t: t * float("nan")), "not finite"),
    (lambda c: rewrite_weights(c, "ema", lambda t: t.double()), "where the config implies torch.float32"),
    (lambda c: rewrite_weights(c, "ema", lambda t: t[..., :1].contiguous()), "where the config implies"),
    (lambda c: ((c / "state.json").write_text('{"step": 3, "nimg": true}'), remanifest(c)), "no images-seen count"),
    (lambda c: set_channels(c, "[60000, 120000]"), "over the limit of"),
])
def test_a_checkpoint_must_be_exactly_what_its_manifest_and_config_say(run, tmp_path, capsys, tamper, message):
    tamper(newest(run))
    code, _, err, out = sample_cli(newest(run), tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err and not out.exists()


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_refuse_a_checkpoint_whose_config_is_not_its_runs(run, tmp_path, capsys, command):
    checkpoint = newest(run)
    (checkpoint / "config.toml").write_text(re.sub(r"seed = \d+", "seed = 7", (checkpoint / "config.toml").read_text()))
    remanifest(checkpoint)
    assert verify(checkpoint) is None
    for source in (run, checkpoint):
        argv = ["--n", "4", "--steps", "2"] + (["--out", str(tmp_path / "s.npz")] if command == "sample" else [])
        code = main([command, str(source), *argv])
        err = capsys.readouterr().err
        assert code == 2 and "train.seed differ" in err and "belongs to another run" in err, err
