"""EDM2 in the training loop and the CLI: the power EMA resumes exactly, `diffuse ema` reconstructs
the run's tracked EMA and sweeps FD, the learned loss weighting trains its head, the inverse-square-
root learning rate, and the config's refusals."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffuse.checkpoint import latest_checkpoint
from diffuse.cli import main
from diffuse.config import load_config, validate
from diffuse.diagnostics import doctor_data, type_checks
from diffuse.nets import build_denoiser
from diffuse.errors import UserError
from diffuse.run import learning_rate
from diffuse.training import train, train_step, training_loss

QUIET = {"log": lambda *a: None}


def edm2_config(*overrides):
    """fmnist-edm2-tiny made smaller still: seconds per run, for the machinery, not for quality."""
    base = ["model.channels=[8, 16]", "model.emb_dim=32", "train.kimg=0.256", "train.batch=16",
            "train.log_kimg=0.064", "train.grid_kimg=0.256", "train.checkpoint_kimg=0.128", "train.fd_kimg=0",
            "train.ema_snapshot_kimg=0.064", "train.probe_kimg=0.064", "sample.steps=3"]
    return load_config("fmnist-edm2-tiny", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def edm2_run(tmp_path_factory):
    return train(edm2_config(), tmp_path_factory.mktemp("edm2") / "run", **QUIET)


def snapshot_tensors(run_dir):
    return {p.name: load_file(p) for p in sorted((run_dir / "phema").glob("*.safetensors"))}


def test_power_ema_run_resumed_half_way_is_bit_identical(tmp_path, edm2_run):
    train(edm2_config("train.kimg=0.128"), tmp_path / "resumed", **QUIET)
    resumed = train(edm2_config(), tmp_path / "resumed", **QUIET)
    a, b = latest_checkpoint(edm2_run), latest_checkpoint(resumed)
    for stem in ("model", "ema", "phema", "optimizer", "probe"):
        x, y = load_file(a / f"{stem}.safetensors"), load_file(b / f"{stem}.safetensors")
        assert x.keys() == y.keys()
        assert all(x[k].equal(y[k]) for k in x), f"{stem} differs"
    snaps_a, snaps_b = snapshot_tensors(edm2_run), snapshot_tensors(resumed)
    assert list(snaps_a) == list(snaps_b) and len(snaps_a) == 2 * 4  # two sigma_rels, every 0.064 kimg
    for name in snaps_a:
        assert all(snaps_a[name][k].equal(snaps_b[name][k]) for k in snaps_a[name]), name


def test_the_checkpoints_ema_is_the_first_tracked_power_ema(edm2_run):
    ckpt = latest_checkpoint(edm2_run)
    ema = load_file(ckpt / "ema.safetensors")
    tracked = load_file(edm2_run / "phema" / "phema-000000000256-0.100.safetensors")
    assert ema.keys() == tracked.keys() and all(ema[k].equal(tracked[k]) for k in ema)
    model = load_file(ckpt / "model.safetensors")
    assert any(not ema[k].equal(model[k]) for k in ema)


def test_diffuse_ema_reconstructs_the_tracked_length_and_samples_others(edm2_run, tmp_path):
    """Reconstructing sigma_rel 0.10, which the run tracked, from all snapshots gives back that EMA."""
    assert main([str(p) for p in ("ema", edm2_run, "--sigma-rel", 0.10, "--out", tmp_path / "ema10")]) == 0
    rebuilt = load_file(tmp_path / "ema10" / "ema.safetensors")
    tracked = load_file(latest_checkpoint(edm2_run) / "ema.safetensors")
    for k in tracked:
        error = (rebuilt[k].double() - tracked[k].double()).norm() / tracked[k].double().norm().clamp_min(1e-12)
        assert error < 1e-4, f"{k}: relative error {error:.2e}"
    # an untracked length, sampled straight from the run and through the written checkpoint
    assert main([str(p) for p in ("ema", edm2_run, "--sigma-rel", 0.07, "--out", tmp_path / "ema07")]) == 0
    common = ["--n", "8", "--steps", "2"]
    assert main(["sample", str(edm2_run), "--ema", "0.07", *common, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", str(tmp_path / "ema07"), *common, "--out", str(tmp_path / "b.npz")]) == 0
    assert main(["sample", str(edm2_run), "--ema", "0.15", *common, "--out", str(tmp_path / "c.npz")]) == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz")["images"] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_diffuse_ema_sweep_writes_fd_against_sigma_rel(edm2_run, capsys):
    argv = ["ema", str(edm2_run), "--sweep", "--sigma-rels", "0.05,0.15", "--n", "20", "--steps", "2", "--cfg", "1"]
    assert main(argv) == 0
    sweep = json.loads((edm2_run / "ema_sweep.json").read_text())
    assert [r["sigma_rel"] for r in sweep["rows"]] == [0.05, 0.15]
    assert all(math.isfinite(r["fd"]) for r in sweep["rows"])
    assert sweep["best"] == min(sweep["rows"], key=lambda r: r["fd"]) and sweep["tracked_sigma_rel"] == 0.10
    assert "<svg" in (edm2_run / "ema_sweep.svg").read_text()
    report = (edm2_run / "report.html").read_text()
    assert "Post-hoc EMA" in report and f"best sigma_rel {sweep['best']['sigma_rel']:g}" in report
    assert "best sigma_rel" in capsys.readouterr().out


def test_uncertainty_weighting_trains_the_logvar_head_and_uniform_does_not():
    moved = {}
    for weighting in ("uncertainty", "uniform"):
        config = edm2_config(f"train.loss_weighting={weighting!r}")
        data = doctor_data(config)
        torch.manual_seed(0)
        denoiser = build_denoiser(config)
        before = {k: v.clone() for k, v in denoiser.net.state_dict().items() if k.startswith("logvar")}
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
        train_step(training_loss(denoiser, config), optimizer, *data.first(16)[:2], 1e-2, config, seed=0)
        after = denoiser.net.state_dict()
        moved[weighting] = any(not before[k].equal(after[k]) for k in before)
    assert moved == {"uncertainty": True, "uniform": False}


def test_inverse_square_root_learning_rate():
    t = edm2_config("train.lr=0.01", "train.lr_ref_kimg=1.0", "train.warmup_kimg=0.1", "train.batch=16").train
    assert learning_rate(t, 0) == pytest.approx(0.01 * 16 / 100)          # warm-up: (nimg + batch) / warm-up images
    assert learning_rate(t, 1000 - 16) == pytest.approx(0.01)             # flat until the reference time
    assert learning_rate(t, 4000 - 16) == pytest.approx(0.01 / 2)         # lr / sqrt(nimg / t_ref)
    assert learning_rate(t, 100_000 - 16) == pytest.approx(0.001)


def test_edm2_doctor_type_checks_pass():
    config = edm2_config()
    checks = type_checks(config, build_denoiser(config), doctor_data(config))
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert any(c.name.startswith("type: edm-target") for c in checks)


@pytest.mark.parametrize("overrides, words", [
    (["diffusion.process='vp'"], "use it with diffusion.process 'edm'"),
    (["model.net='unet'", "model.channels=[16, 32]"], "needs the log-variance head"),
    (["sample.sampler='ddim'", "sample.S_churn=5"], "heun sampler's churn"),
    (["diffusion.prediction='v'"], "does not suit process 'edm'"),
    (["train.ema_sigma_rels=[0.1, 0.3]"], "(0, 0.2887)"),
    (["diffusion.sigma_min=100.0"], "must be below"),
])
def test_contradictory_edm2_settings_are_refused(overrides, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate(edm2_config(*overrides))


def test_edm_process_with_eps_prediction_and_the_unet_is_accepted():
    validate(edm2_config("diffusion.prediction='eps'", "model.net='unet'", "train.loss_weighting='uniform'"))
