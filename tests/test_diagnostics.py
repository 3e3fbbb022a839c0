"""`diffuse doctor`: a healthy config passes every check, and each planted fault is caught by its check."""

import json

import pytest
import torch
from torch import nn

from diffuse import diagnostics, losses
from diffuse.cli import main
from diffuse.config import load_config
from diffuse.data import fit_scaling, load_fmnist
from diffuse.denoiser import Denoiser
from diffuse.process import build_process
from diffuse.training import train

HEALTHY_CHECKS = ["type: data",
                  "type: x_t at t=100", "type: v-target at t=100",
                  "type: x_t at t=500", "type: v-target at t=500",
                  "type: x_t at t=900", "type: v-target at t=900",
                  "type: net output at init", "identity", "condition leak", "loss at step 20"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test records early losses under its own tmp_path, never in the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "diffuse" / "early-loss.json"


@pytest.fixture(scope="module")
def data():
    return diagnostics.doctor_data(load_config("fmnist-tiny"))


def with_scaling(config, data):
    """The config as the doctor completes it: the fitted scaling filled in."""
    config.data.mean, config.data.std = data.scaling.mean, data.scaling.std
    return config


def failed(checks):
    return {c.name: c for c in checks if not c.passed}


# ---------------------------------------------------------------------------------------------
# A healthy config.


def test_healthy_tiny_config_passes_every_check(tiny, cache):
    checks = diagnostics.run_doctor(tiny(), steps=20, label="tiny")
    assert [c.name for c in checks] == HEALTHY_CHECKS
    assert not failed(checks), diagnostics.format_table(checks)
    assert checks[-1].value.startswith("recorded") and cache.is_file()


def test_composition_recovers_a_known_mix():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, 1, 8, 8, generator=g)
    a, b, residual = diagnostics.composition(0.3 * x0 - 0.7 * eps, x0, eps)
    assert a == pytest.approx(0.3, abs=1e-6) and b == pytest.approx(-0.7, abs=1e-6) and residual < 1e-10
    *_, residual = diagnostics.composition(x0 * eps, x0, eps)  # not linear in (x0, eps): all residual
    assert residual > 0.99


def test_type_checks_see_the_closed_form_schedule(tiny, data):
    """x_t at t=500 is sqrt(abar) x0 + sqrt(1 - abar) eps, abar from the linear betas rescaled to zero
    terminal SNR (Lin et al. 2023, Algorithm 1), computed here independently in numpy."""
    import numpy as np
    s = np.sqrt(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    alpha, sigma = s[500], np.sqrt(1 - s[500] ** 2)
    config = with_scaling(tiny(), data)
    checks = {c.name: c for c in diagnostics.type_checks(config, diagnostics.fresh_denoiser(config), data)}
    assert checks["type: x_t at t=500"].expected.endswith(f"{alpha:+.3f} x0 {sigma:+.3f} eps")
    assert checks["type: v-target at t=500"].expected.endswith(f"{-sigma:+.3f} x0 {alpha:+.3f} eps")


# ---------------------------------------------------------------------------------------------
# Planted faults, each caught by the check meant for it.


@pytest.mark.parametrize("fault", ["flipped target", "negated loss"])
def test_identity_fails_when_the_loss_path_has_a_flipped_sign(tiny, data, monkeypatch, fault):
    config = with_scaling(tiny(), data)
    if fault == "flipped target":
        target = losses.training_target
        monkeypatch.setattr(losses, "training_target", lambda *args: -target(*args))
    else:
        loss_at = losses.loss_at
        monkeypatch.setattr(losses, "loss_at", lambda *args: -loss_at(*args))
    check = diagnostics.identity_check(config, data=data, steps=50)
    assert not check.passed
    assert "zero noise" in check.detail and "x0_hat" in check.detail


def test_type_check_names_a_target_of_the_wrong_type(tiny, data, monkeypatch):
    """The v config gets the eps target: the three target checks fail and say it looks like eps."""
    target = losses.training_target
    monkeypatch.setattr(losses, "training_target", lambda prediction, *args: target("eps", *args))
    config = with_scaling(tiny(), data)
    bad = failed(diagnostics.type_checks(config, diagnostics.fresh_denoiser(config), data))
    assert sorted(bad) == ["type: v-target at t=100", "type: v-target at t=500", "type: v-target at t=900"]
    assert bad["type: v-target at t=500"].detail.startswith("v-target at t=500 looks like eps, expected v")


def test_type_check_names_data_that_is_not_normalized(tiny):
    """Raw pixels in [0, 1]: only the data check fails, and its value is the raw pixels' mean and std."""
    config = tiny("data.mean=0", "data.std=1")
    data = diagnostics.doctor_data(config)
    bad = failed(diagnostics.type_checks(config, diagnostics.fresh_denoiser(config), data))
    assert list(bad) == ["type: data"]
    assert "training data" in bad["type: data"].detail
    reference = fit_scaling(load_fmnist("test")[0])  # raw pixels of other images, in [0, 1] units
    mean, std = (float(v) for v in bad["type: data"].value.split()[1:4:2])
    assert mean == pytest.approx(reference.mean, abs=0.01) and std == pytest.approx(reference.std, abs=0.01)


class ClassImage(nn.Module):
    """A network with the U-Net's signature that ignores x_t: a learned image per class (last: null)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.images = nn.Parameter(torch.randn(num_classes + 1, 1, 28, 28))

    def forward(self, x, t, cond=None):
        return self.images[torch.where(cond < 0, len(self.images) - 1, cond)]


def test_leak_check_fails_a_net_that_ignores_x_t_and_passes_a_trained_unet(tiny, data):
    config = with_scaling(tiny(), data)
    x0, cond = diagnostics.held_out(data, seed=0)
    leaky = Denoiser(ClassImage(), build_process(config.diffusion), config.diffusion.prediction)
    check = diagnostics.leak_check(leaky, x0, cond)
    assert not check.passed and "condition alone" in check.detail
    assert check.value == "t=200: 0.000, t=700: 0.000"
    trained, _ = diagnostics.train_briefly(config, data, steps=30)
    assert diagnostics.leak_check(trained, x0, cond).passed


# ---------------------------------------------------------------------------------------------
# Early loss.


def test_early_loss_records_then_passes_then_catches_a_harmful_change(tiny, data, monkeypatch, cache):
    config = with_scaling(tiny(), data)
    first = diagnostics.early_loss_check(config, steps=20, data=data)
    assert first.passed and first.value.startswith("recorded")
    stored = json.loads(cache.read_text())[diagnostics.early_loss_key(config, 20)]["loss"]
    second = diagnostics.early_loss_check(config, steps=20, data=data)
    assert second.passed and float(second.value) == pytest.approx(stored, rel=0.01)
    # a planted harmful change to the training code: the learning rate 100x too small
    lr = diagnostics.learning_rate
    monkeypatch.setattr(diagnostics, "learning_rate", lambda t, nimg: lr(t, nimg) / 100)
    third = diagnostics.early_loss_check(config, steps=20, data=data)
    assert not third.passed and float(third.value) > 1.05 * stored
    assert "above what this config reached before" in third.detail


def test_early_loss_key_ignores_only_what_does_not_change_training(tiny, data):
    key = diagnostics.early_loss_key(with_scaling(tiny(), data), 100)
    same = ["train.kimg=9", "train.log_kimg=1", "sample.steps=50", "sample.cfg=3", "train.threads=2",
            "train.probe_kimg=0", "train.fd_kimg=5"]
    for item in same:
        assert diagnostics.early_loss_key(with_scaling(tiny(item), data), 100) == key, item
    for item in ["train.lr=1e-4", "model.channels=[16, 16]", "diffusion.prediction=x0", "train.seed=1"]:
        assert diagnostics.early_loss_key(with_scaling(tiny(item), data), 100) != key, item
    assert diagnostics.early_loss_key(with_scaling(tiny(), data), 50) != key
    assert diagnostics.early_loss_key(tiny(), 100) == key  # the fitted scaling: the same data either way


def test_shipped_reference_covers_the_presets(data):
    """A fresh clone compares the presets against shipped values; a change to a preset changes its key,
    and then `diagnostics.ship_early_loss()` must be re-run."""
    shipped = json.loads(diagnostics.SHIPPED_EARLY_LOSS.read_text())
    for preset in ("fmnist-tiny", "fmnist"):
        key = diagnostics.early_loss_key(with_scaling(load_config(preset), data), diagnostics.EARLY_STEPS)
        assert key in shipped, f"{preset}: re-run diagnostics.ship_early_loss()"
        assert 0.05 < shipped[key]["loss"] < 1.0


def test_shipped_reference_is_consulted_before_the_cache(tiny, data, monkeypatch, tmp_path, cache):
    config = with_scaling(tiny(), data)
    shipped = tmp_path / "early_loss.json"
    shipped.write_text(json.dumps({diagnostics.early_loss_key(config, 20): {"loss": 0.5}}))
    monkeypatch.setattr(diagnostics, "SHIPPED_EARLY_LOSS", shipped)
    check = diagnostics.compare_early_loss(config, 20, 0.52)
    assert check.passed and "stored 0.5000" in check.expected and not cache.exists()
    assert not diagnostics.compare_early_loss(config, 20, 0.53).passed  # 6% above


# ---------------------------------------------------------------------------------------------
# The command.


def test_cli_doctor_json_on_a_preset(tiny, capsys):
    overrides = ["model.channels=[8, 16]", "model.emb_dim=32", "train.batch=16"]
    code = main(["doctor", "--preset", "fmnist-tiny", *[a for o in overrides for a in ("--set", o)],
                 "--steps", "10", "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["config"] == "fmnist-tiny " + " ".join(f"--set {o}" for o in overrides)
    assert [c["name"] for c in report["checks"]][-1] == "loss at step 10"
    assert all(c["passed"] for c in report["checks"])


def test_cli_doctor_on_a_run_writes_doctor_json_and_matches_the_runs_own_loss(tmp_path, tiny, capsys):
    """The early-loss training is the real one: its mean loss of steps 11-20 equals the run's logged loss."""
    run = train(tiny("train.kimg=0.32", "train.log_kimg=0.16"), tmp_path / "run", log=lambda *a: None)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [e for e in logged if e.get("event") == "train" and e["step"] == 20][0]["loss"]
    code = main(["doctor", "--run", str(run), "--steps", "20", "--device", "cpu"])
    table = capsys.readouterr().out
    doctor = json.loads((run / "doctor.json").read_text())
    assert doctor["config"] == str(run)
    assert code == 0 and all(c["passed"] for c in doctor["checks"]), table
    early = {c["name"]: c for c in doctor["checks"]}["loss at step 20"]
    assert early["value"] == f"recorded {loss:.4f}"
    assert "loss at step 20" in table and "checks passed" in table
    assert f"of {len(doctor['checks'])} checks passed" in (run / "report.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--preset", "fmnist-tiny", "--steps", "5"], "--steps 5 is too few"),
    (["--run", "RUN", "--preset", "fmnist-tiny"], "leave out --preset"),
    (["--run", "NOWHERE"], "not a diffuse run directory"),
])
def test_cli_doctor_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "RUN").mkdir()
    argv = [str(tmp_path / a) if a in ("RUN", "NOWHERE") else a for a in argv]
    assert main(["doctor", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_table_is_aligned():
    checks = [diagnostics.Check("identity", True, "0.01", "<= 0.1"),
              diagnostics.Check("condition leak", False, "t=300: 0.000", ">= 0.1", "a leak")]
    lines = diagnostics.format_table(checks).splitlines()
    assert [line.index("PASS" if i == 1 else ("FAIL" if i == 2 else "result")) for i, line in enumerate(lines)] == [16] * 3
    assert lines[2].endswith("a leak") and lines[1].endswith("<= 0.1")
