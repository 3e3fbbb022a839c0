"""Input no longer decides how much memory or time is spent: sizes read from flags and files are checked
against limits or the bytes present before anything is allocated, text files are read up to a limit, and
samples stream to their file a chunk at a time."""

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from diffuse import model as model_module
from diffuse.cli import main
from diffuse.errors import UserError
from diffuse.images import load_npz
from diffuse.model import load
from diffuse.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import tiny_config
    return train(tiny_config("train.probe_kimg=0", "train.kimg=0.128"), tmp_path_factory.mktemp("limits") / "run",
                 log=lambda *a: None)


def timed_cli(argv, capsys, bound: float = 20.0) -> tuple[int, str]:
    start = time.perf_counter()
    code = main([str(a) for a in argv])
    assert time.perf_counter() - start < bound
    return code, capsys.readouterr().err


@pytest.mark.parametrize("n", [10**8, 10**9, 0, -1])
def test_sample_n_is_bounded_before_any_work(run, tmp_path, capsys, n):
    code, err = timed_cli(["sample", run, "--n", n, "--out", tmp_path / "s.npz"], capsys, bound=10)
    assert code == 2 and err.count("\n") == 1 and "--n" in err and "10000000" in err, err
    assert not any(tmp_path.iterdir())


def lying_npz(path: Path, n: int = 10**9) -> None:
    """A tiny .npz whose images header claims n images of 28x28x1."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (n, 28, 28, 1)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue() + b"\0" * 64)


def test_a_header_that_claims_a_billion_images_allocates_nothing(tmp_path, capsys):
    path = tmp_path / "lie.npz"
    lying_npz(path)
    assert path.stat().st_size < 1000
    code, err = timed_cli(["eval", path], capsys, bound=10)
    assert code == 2 and err.count("\n") == 1 and "header claims" in err, err


def test_a_truncated_samples_file_is_refused(run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "3", "--steps", "1", "--out", str(out)]) == 0
    out.write_bytes(out.read_bytes()[:-200])
    code, err = timed_cli(["eval", out], capsys)
    assert code == 2 and err.count("\n") == 1, err


@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_a_config_is_read_up_to_a_limit(tmp_path, capsys, source):
    if source == "big":
        source = tmp_path / "big.toml"
        source.write_text("# " + "x" * (2 << 20) + "\n")
    code, err = timed_cli(["train", "--config", source, "--out", tmp_path / "run"], capsys, bound=10)
    assert code == 2 and err.count("\n") == 1 and "more than any config needs" in err, err


def test_a_deeply_nested_config_is_refused(tmp_path, capsys):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, err = timed_cli(["train", "--config", path, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1, err


def test_samples_stream_to_their_file_a_chunk_at_a_time(run, tmp_path, monkeypatch):
    model = load(run)
    expected = model.sample(7, steps=2, seed=3)
    drawn = []
    real = model_module.draw
    monkeypatch.setattr(model_module, "CHUNK_SAMPLES", 3)
    monkeypatch.setattr(model_module, "draw", lambda net, shape, cond, seeds, **kw: (drawn.append(len(seeds)),
                                                                                   real(net, shape, cond, seeds, **kw))[1])
    model.config.sample.batch = 2  # the chunk is at least a sampler batch per rank
    out = tmp_path / "s.npz"
    model.save_samples(out, 7, steps=2, seed=3, grid=tmp_path / "g.png")
    assert drawn == [3, 3, 1]  # never more than a chunk in memory
    images, labels = load_npz(out)
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.labels)
    with np.load(out, allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["labels"].dtype == np.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]  # no temporary left


def test_a_failed_stream_leaves_no_temporary_and_the_old_file_whole(run, tmp_path, monkeypatch):
    model = load(run)
    out = tmp_path / "s.npz"
    model.save_samples(out, 2, steps=1)
    before = out.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module, "draw", broken)
    with pytest.raises(UserError, match="disk is full"):
        model.save_samples(out, 2, steps=1)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_huge_metrics_line_is_read_without_holding_it(tmp_path):
    from diffuse.run import MAX_EVENT_BYTES, trim_events
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "kimg": 0.1}\n' + "x" * (3 * MAX_EVENT_BYTES) + "\n"
                    + '{"event": "train", "kimg": 0.2}\n')
    trim_events(path, 150)
    assert path.read_text() == '{"event": "train", "kimg": 0.1}\n'
