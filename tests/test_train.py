"""The training loop: exact resume, run-directory contents, refusal of a foreign config."""

import json

import pytest
from safetensors.torch import load_file

from diffuse.checkpoint import latest_checkpoint, verify
from diffuse.errors import UserError
from diffuse.speed import native_bf16
from diffuse.training import train


def weights(run_dir):
    ckpt = latest_checkpoint(run_dir)
    stems = ("model", "ema", "optimizer", "probe", "probe_optimizer")
    return {stem: load_file(ckpt / f"{stem}.safetensors") for stem in stems}


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not native_bf16("cpu"), reason="bf16 is emulated on this CPU (no AVX-512 BF16 or AMX)"))])
def test_stopped_and_resumed_run_is_bit_identical_to_a_straight_run(tmp_path, tiny, precision):
    """Within a precision: bf16's rounding is the same on the straight and on the resumed run."""
    chosen = f"train.precision={precision}"
    straight = train(tiny("train.kimg=0.256", chosen), tmp_path / "straight", log=lambda *a: None)
    train(tiny("train.kimg=0.128", chosen), tmp_path / "resumed", log=lambda *a: None)
    resumed = train(tiny("train.kimg=0.256", chosen), tmp_path / "resumed", log=lambda *a: None)
    a, b = weights(straight), weights(resumed)
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for key in a[stem]:
            assert a[stem][key].equal(b[stem][key]), f"{stem}/{key} differs"
    # equality is not vacuous: the second half of training changed the weights
    half_way = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert any(not half_way[k].equal(b["model"][k]) for k in half_way)


def test_run_directory_layout(tmp_path, tiny):
    run = train(tiny(), tmp_path / "run", log=lambda *a: None)
    assert (run / "config.toml").is_file()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    assert [e["kimg"] for e in steps] == [0.064, 0.128, 0.192, 0.256]
    assert all(e["loss"] > 0 for e in steps)
    assert [e["kimg"] for e in events if e["event"] == "probe"] == [0.064, 0.128, 0.192, 0.256]
    assert [e["kimg"] for e in events if e["event"] == "grid"] == [0.256]
    assert list((run / "samples").glob("grid-*.png"))
    assert "<svg" in (run / "report.html").read_text()
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-0000016" and verify(ckpt) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_resume_with_other_model_settings_is_refused(tmp_path, tiny):
    train(tiny(), tmp_path / "run", log=lambda *a: None)
    with pytest.raises(UserError, match="model.channels"):
        train(tiny("model.channels=[16, 16]"), tmp_path / "run", log=lambda *a: None)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, tiny):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a diffuse run directory"):
        train(tiny(), tmp_path, log=lambda *a: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
