"""Config reading, overrides and validation: every mistake is one sentence naming the key."""

import tomllib

import numpy as np
import pytest

from diffuse.config import Config, load_config, preset_names, preset_path, read_config, to_toml
from diffuse.errors import UserError
from diffuse.preparing import PrepareOptions, prepare


def prepared_for(preset: str, folder) -> list[str]:
    """The overrides that give a preset for prepared data (data.name 'prepared') a small DATA_DIR of its size."""
    if tomllib.loads(preset_path(preset).read_text()).get("data", {}).get("name") != "prepared":
        return []
    side = int(preset.removeprefix("rgb"))
    g = np.random.default_rng(0)
    np.savez(folder / f"{preset}.npz", images=g.integers(0, 256, (8, side, side, 3), dtype=np.uint8),
             labels=np.arange(8) % 2)
    prepare([folder / f"{preset}.npz"], folder / preset, PrepareOptions(heldout=0.25), log=lambda *a: None)
    return [f"data.path='{folder / preset}'", "train.fd_kimg=0"]


def test_presets_load_and_round_trip_through_toml(tmp_path):
    assert {"fmnist", "fmnist-tiny", "toy2d", "rgb32", "rgb64"} <= set(preset_names())
    for name in preset_names():
        config = load_config(name, overrides=prepared_for(name, tmp_path))
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(config))
        assert read_config(path) == config


def test_overrides_are_typed():
    config = load_config("fmnist-tiny", overrides=["train.kimg=3", "train.lr=1e-4", "model.channels=[8, 16]",
                                                   "diffusion.schedule=cosine", "diffusion.zero_terminal_snr=false"])
    assert config.train.kimg == 3.0 and isinstance(config.train.kimg, float)
    assert config.train.lr == 1e-4 and config.model.channels == [8, 16]
    assert config.diffusion.schedule == "cosine" and config.diffusion.zero_terminal_snr is False


@pytest.mark.parametrize("override,message", [
    ("train.kimgg=3", "did you mean 'train.kimg'"),
    ("train.batch=many", "train.batch must be an integer"),
    ("train.batch=0", "train.batch must be greater than 0"),
    ("train.kimg=nan", "finite"),
    ("model.cond_drop=1.5", "model.cond_drop must lie in [0, 1]"),
    ("diffusion.schedule=quadratic", "diffusion.schedule = 'quadratic' is not one of"),
    ("diffusion.prediction=eps", "divides by zero"),
    ("model.channels=[8, 16, 32, 64]", "at most 3"),
    ("train.kimg", "is not key=value"),
])
def test_bad_overrides_are_refused_with_one_sentence(override, message):
    with pytest.raises(UserError) as e:
        load_config("fmnist-tiny", overrides=[override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_eps_prediction_is_refused_with_rectified_flow_but_allowed_without_zero_snr():
    with pytest.raises(UserError, match="rectified flow"):
        load_config("toy2d", overrides=["diffusion.process=flow", "diffusion.prediction=eps"])
    config = load_config("toy2d", overrides=["diffusion.zero_terminal_snr=false", "diffusion.prediction=eps"])
    assert config.diffusion.prediction == "eps"


def test_invalid_toml_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nkimg = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(path=bad)
    with pytest.raises(UserError, match="did you mean 'fmnist'"):
        load_config("fmnistt")


def test_defaults_are_valid():
    from diffuse.config import validate
    validate(Config())
