"""Issue 19's cases through the command line: exceptions that escaped as tracebacks, messages that named
the wrong cause, and work thrown away. Each ends in one sentence naming the file and the real cause,
exit code 2, no temporary file left, and (where the outputs cannot be written) before the long work."""

import errno
import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

import diffuse.api
import diffuse.checkpoint
import diffuse.images
from diffuse.checkpoint import verify
from diffuse.cli import main
from diffuse.training import train

TINY = ["--preset", "fmnist-tiny", "--set", "model.channels=[8, 16]", "--set", "model.emb_dim=32", "--set",
        "train.batch=16", "--set", "train.log_kimg=0.064", "--set", "train.grid_kimg=0.256", "--set",
        "train.checkpoint_kimg=0.128", "--set", "train.fd_kimg=0", "--set", "sample.steps=4", "--set",
        "train.probe_kimg=0", "--set", "train.threads=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny run of `conftest.tiny_config`, with checkpoints at steps 8 and 16 (tests change copies)."""
    from conftest import tiny_config
    return train(tiny_config("train.probe_kimg=0"), tmp_path_factory.mktemp("trained") / "run", log=lambda *a: None)


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def refused(argv, capsys) -> str:
    """The one sentence of `diffuse argv`, which must exit with 2."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("diffuse: ") and "Traceback" not in err, err
    return err


def edit_state(run: Path, **fields) -> Path:
    """Change fields of the newest checkpoint's state.json and re-sign the manifest, as a tamperer would."""
    checkpoint = run / "checkpoints" / "step-0000016"
    state = json.loads((checkpoint / "state.json").read_text()) | fields
    (checkpoint / "state.json").write_text(json.dumps(state))
    return resign(checkpoint)


def resign(checkpoint: Path) -> Path:
    manifest = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
                for p in sorted(checkpoint.iterdir()) if p.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Class 5: exceptions that escaped as tracebacks.


def test_a_config_in_latin_1_is_refused(tmp_path, capsys):
    path = tmp_path / "latin.toml"
    path.write_bytes("[train]\nkimg = 1  # café\n".encode("latin-1"))
    err = refused(["train", "--config", str(path), "--out", str(tmp_path / "out")], capsys)
    assert f"{path} is not UTF-8 text" in err  # was UnicodeDecodeError


@pytest.mark.parametrize("where", ["file", "set"])
def test_deeply_nested_values_are_refused(tmp_path, capsys, where):
    deep = "[" * 5000 + "]" * 5000
    path = tmp_path / "deep.toml"
    path.write_text(f"[model]\nchannels = {deep}\n")
    argv = ["--config", str(path)] if where == "file" else ["--preset", "fmnist-tiny", "--set", f"model.channels={deep}"]
    err = refused(["train", *argv, "--out", str(tmp_path / "out")], capsys)
    assert "nests arrays" in err  # was RecursionError


@pytest.mark.parametrize("value, key", [("1" + "0" * 400, "train.kimg"), ("1" + "0" * 30, "train.batch"),
                                        ("9" * 5000, "train.seed")])
def test_huge_integers_are_refused(tmp_path, capsys, value, key):
    err = refused(["train", "--preset", "fmnist-tiny", "--set", f"{key}={value}", "--out", str(tmp_path / "o")], capsys)
    assert key in err or "too long" in err  # was OverflowError (kimg, batch) or ValueError (over 4300 digits)


def test_a_corrupt_gzip_idx_file_is_refused(tmp_path, capsys):
    folder = tmp_path / "idx"
    folder.mkdir()
    good = gzip.compress(b"\0\0\x08\x03" + struct.pack(">III", 2, 16, 16) + bytes(512))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(good[:12] + bytes([good[12] ^ 0xFF, good[13] ^ 0x55]) + good[14:])
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + struct.pack(">I", 2) + bytes(2)))
    err = refused(["data", "prepare", str(folder), "--out", str(tmp_path / "data")], capsys)
    assert "train-images-idx3-ubyte.gz cannot be read" in err  # was zlib.error


@pytest.mark.parametrize("argv", [["ema", "RUN", "--sigma-rel", "0.1", "--at", "nan", "--out", "x"],
                                  ["sample", "RUN", "--n", "2", "--eta", "inf", "--out", "x.npz"],
                                  ["ema", "RUN", "--sigma-rel", "nan", "--out", "x"]])
def test_nan_and_inf_flags_are_refused(capsys, argv):
    err = refused(argv, capsys)
    assert "is not a finite number" in err  # --at nan was ValueError: cannot convert float NaN to integer


@pytest.mark.parametrize("n", ["0", "-3"])
def test_eval_of_a_run_needs_at_least_two_samples(run, capsys, n):
    err = refused(["eval", str(run), "--n", n], capsys)
    assert f"--n {n} must be at least 2" in err


@pytest.mark.parametrize("fields, said", [
    ({"nimg": -16}, "nimg is -16"),                          # was accepted, and emptied metrics.jsonl
    ({"nimg": 10 ** 30}, "nimg is 100000000000000000000"),  # was accepted
    ({"step": float("nan")}, "NaN is not a number JSON allows"),
    ({"nimg": 8}, "batches of 16 never reach"),
    ({"optimizer": {"param_groups": [], "scalars": "x"}}, "does not fit the model"),  # was AttributeError
])
def test_state_json_fields_of_the_wrong_type_or_range_are_refused(run, capsys, fields, said):
    edit_state(run, **fields)
    events = (run / "metrics.jsonl").read_text()
    err = refused(["train", *TINY, "--set", "train.kimg=0.384", "--out", str(run)], capsys)
    assert said in err, err
    assert (run / "metrics.jsonl").read_text() == events


@pytest.mark.parametrize("text, said", [("[" * 100_000 + "]" * 100_000, "nests values too deeply"),
                                        (b'{"nimg": 256, "step": 16, "x": "caf\xe9"}', "UTF-8")])
def test_a_state_json_too_deep_or_not_utf8_is_refused(run, tmp_path, capsys, text, said):
    checkpoint = run / "checkpoints" / "step-0000016"
    (checkpoint / "state.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    resign(checkpoint)
    err = refused(["sample", str(checkpoint), "--n", "2", "--out", str(tmp_path / "s.npz")], capsys)
    assert said in err and "state.json" in err  # was RecursionError


def test_a_manifest_too_deep_is_skipped_as_damaged(run):
    checkpoint = run / "checkpoints" / "step-0000016"
    (checkpoint / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "unreadable" in verify(checkpoint)  # was RecursionError


def test_a_full_disk_in_safetensors_is_one_sentence_and_leaves_no_temporary_folder(run, monkeypatch, capsys):
    def save_file(*args, **kwargs):  # what safetensors raises when the disk fills mid-file
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(diffuse.checkpoint, "save_file", save_file)
    err = refused(["train", *TINY, "--set", "train.kimg=0.384", "--out", str(run)], capsys)
    assert "step-0000024" in err and "free disk space" in err and "intact" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008", "step-0000016"]


# ---------------------------------------------------------------------------------------------
# Class 7: messages that named the wrong cause, and work thrown away.


def test_out_naming_a_file_says_so(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(["train", *TINY, "--out", str(tmp_path / "file")], capsys)
    assert "is a file" in err and "disk space" not in err


def test_config_naming_a_folder_says_so(tmp_path, capsys):
    err = refused(["train", "--config", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "is a folder" in err and "disk space" not in err


def test_a_full_disk_during_sample_names_the_file(run, tmp_path, monkeypatch, capsys):
    def write(self, rows):
        self.member.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # the write names no file

    monkeypatch.setattr(diffuse.images.NpzWriter, "write", write)
    out = tmp_path / "samples.npz"
    err = refused(["sample", str(run), "--n", "2", "--out", str(out)], capsys)
    assert str(out) in err and "free disk space" in err
    assert list(tmp_path.glob("samples*")) == []  # the temporary file is gone


@pytest.mark.parametrize("out", ["folder", "file/samples.npz"])
def test_sample_checks_its_output_before_sampling(run, tmp_path, monkeypatch, capsys, out):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(diffuse.api, "load", lambda *a, **k: pytest.fail("sampled before checking --out"))
    err = refused(["sample", str(run), "--n", "2", "--out", str(tmp_path / out)], capsys)
    assert "is a folder" in err or "is a file, not a folder" in err or "not a writable folder" in err


def test_doctor_with_an_unwritable_cache_stops_before_the_checks(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    monkeypatch.setattr(diffuse.api, "run_doctor", lambda *a, **k: pytest.fail("ran the checks first"))
    err = refused(["doctor", *TINY[:2]], capsys)
    assert "the doctor's cache" in err and "XDG_CACHE_HOME" in err


def test_ema_sweep_on_an_unwritable_run_stops_before_sampling(run, monkeypatch, capsys):
    (run / "ema_sweep.json").mkdir()  # as root, a folder in the way is how a write is made to fail
    monkeypatch.setattr(diffuse.api, "load", lambda *a, **k: pytest.fail("sampled before checking"))
    err = refused(["ema", str(run), "--sweep", "--n", "2"], capsys)
    assert "ema_sweep.json is a folder" in err


def test_labels_outside_the_classes_are_refused(tmp_path, capsys):
    path = tmp_path / "samples.npz"
    np.savez(path, images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.array([0, 1, 12, 99]))
    err = refused(["eval", str(path)], capsys)  # was accepted with accuracy 0
    assert f"{path}: label 12 is not one of the 10 classes" in err
