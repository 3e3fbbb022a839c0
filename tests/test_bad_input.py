"""Bad input, property-based: every invalid config value, TOML file or command-line argument ends
with exit code 2 and one sentence on stderr, never a traceback; every valid one is accepted.

`diffuse train` is run through the real CLI with the training itself replaced by a recorder, so
thousands of inputs take seconds; `diffuse sample` runs for real on a tiny trained run.
"""

import contextlib
import io
import math
import string
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from diffuse.cli import main
from diffuse.config import all_keys, load_config
from diffuse.data import RECORD
from diffuse.validation import CHOICES, NONNEGATIVE, POSITIVE, PROBABILITY
from diffuse.sampling import SAMPLERS
from diffuse.training import train

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_cli(argv: list[str]) -> tuple[int, str, mock.Mock]:
    """(exit code, stderr, the recorder that stood in for training) of `diffuse argv`."""
    err = io.StringIO()
    with mock.patch("diffuse.api.run_training") as recorder, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue(), recorder


def assert_one_sentence(err: str):
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("diffuse: "), repr(err)
    assert err.rstrip().endswith((".", "?", "'")), repr(err)


def toml_literal(value) -> str:
    """A Python value as the TOML text `--set key=TEXT` takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return repr(value)


ANY_VALUE = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                      st.text(string.printable, max_size=12), st.lists(st.integers(-64, 512), max_size=4))
KEYS = st.sampled_from(all_keys())


def typo(key: str, draw) -> str:
    """`key` with one letter of its name dropped, doubled or swapped."""
    section, name = key.split(".")
    i = draw(st.integers(0, len(name) - 2))
    variant = draw(st.sampled_from(["drop", "double", "swap"]))
    name = {"drop": name[:i] + name[i + 1:], "double": name[:i] + name[i] + name[i:],
            "swap": name[:i] + name[i + 1] + name[i] + name[i + 2:]}[variant]
    return f"{section}.{name}"


@SETTINGS
@given(key=KEYS, value=ANY_VALUE)
@example(key="train.kimg", value=float("nan"))
@example(key="model.channels", value=[])
@example(key="train.batch", value=2.5)
def test_any_set_value_is_accepted_or_refused_in_one_sentence(tmp_path_factory, key, value):
    code, err, recorder = run_cli(["train", "--preset", "fmnist-tiny", "--set", f"{key}={toml_literal(value)}",
                                   "--out", str(tmp_path_factory.getbasetemp() / "never-written")])
    assert code in (0, 2)
    if code == 2:
        assert_one_sentence(err)
        assert not recorder.called
    else:
        config = recorder.call_args.args[0]
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == value  # accepted means taken as given


@SETTINGS
@given(data=st.data())
def test_misspelt_keys_are_refused_with_the_nearest_key(data):
    key = data.draw(KEYS)
    wrong = typo(key, data.draw)
    if wrong in all_keys():
        return
    code, err, _ = run_cli(["train", "--preset", "fmnist-tiny", "--set", f"{wrong}=1", "--out", "x"])
    assert code == 2 and f"unknown config key '{wrong}'" in err
    assert_one_sentence(err)


# values a run records rather than settings (the pixel scaling, the record of a DATA_DIR: test_prepare_bad)
RECORDED = ("data.mean", "data.std", *(f"data.{key}" for key in RECORD))


def valid_value(key: str, draw):
    """A value of `key` that the fmnist-tiny preset must accept with only this key changed."""
    if key in CHOICES:
        allowed = {"data.name": ["fmnist"], "diffusion.process": ["vp"], "diffusion.prediction": ["v", "x0"],
                   "model.net": ["unet"], "sample.sampler": ["ddim", "ddpm", "heun"],
                   "train.loss_weighting": ["uniform"], "distill.method": ["none"]}.get(key, list(CHOICES[key]))
        return draw(st.sampled_from(allowed))
    if key == "model.channels":  # fmnist-tiny attends at level 1: keep 2 or 3 levels
        return draw(st.lists(st.integers(1, 32).map(lambda c: 8 * c), min_size=2, max_size=3))
    if key == "model.attn_levels":
        return draw(st.lists(st.integers(0, 1), max_size=2))
    if key == "data.factor":
        return draw(st.sampled_from([2, 4, 7, 14, 28]))
    if key == "train.ema_sigma_rels":
        return draw(st.lists(st.floats(0.01, 0.28), min_size=1, max_size=3))
    if key == "train.adam_beta2":
        return draw(st.floats(0, 0.9999))
    if key == "sample.S_churn":  # the churn of heun only: fmnist-tiny samples with ddim
        return 0.0
    if key in ("distill.dm_t_min", "distill.dm_t_max"):  # min below the default max 0.98, max above min 0.02
        return draw(st.floats(0, 0.97) if key.endswith("min") else st.floats(0.03, 1))
    kind = type(getattr(getattr(load_config("fmnist-tiny"), key.split(".")[0]), key.split(".")[1]))
    if kind is bool:
        return draw(st.booleans())
    if kind is str:  # a free string (distill.teacher, recorded by `diffuse distill`)
        return draw(st.text(string.ascii_letters, max_size=8))
    low = 0 if key in NONNEGATIVE else 1e-9 if key in POSITIVE else None
    high = 1 if key in PROBABILITY else None
    if kind is int:
        high = 1000 if key in ("sample.steps", "train.fd_steps") else 10**6  # a vp process has 1000 steps
        return draw(st.integers(1 if key in POSITIVE else 0, high))
    return draw(st.floats(low if low is not None else (0 if key in PROBABILITY else -1e6), high or 1e6))


@SETTINGS
@given(data=st.data())
def test_every_valid_value_is_accepted(data):
    key = data.draw(st.sampled_from([k for k in all_keys() if k not in RECORDED]))
    if key == "diffusion.zero_terminal_snr":
        value = data.draw(st.booleans())
    else:
        value = valid_value(key, data.draw)
    code, err, recorder = run_cli(["train", "--preset", "fmnist-tiny", "--set", f"{key}={toml_literal(value)}",
                                   "--out", "x"])
    assert code == 0, err
    section, name = key.split(".")
    assert getattr(getattr(recorder.call_args.args[0], section), name) == value


def invalid_value(key: str, draw):
    """A value of `key` that is wrong whatever else is set: wrong type, out of range, not a choice."""
    kind = type(getattr(getattr(load_config("fmnist-tiny"), key.split(".")[0]), key.split(".")[1]))
    wrong_type = {int: st.one_of(st.floats(allow_nan=False).filter(lambda v: v != int(v) if math.isfinite(v) else True),
                                 st.text(max_size=5), st.booleans()),
                  float: st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)),
                  bool: st.one_of(st.integers(), st.text(max_size=5)),
                  str: st.one_of(st.integers(), st.floats(), st.booleans()),
                  list: st.one_of(st.integers(), st.text(max_size=5), st.lists(st.floats(allow_nan=False),
                                                                              min_size=1, max_size=2)
                                  .filter(lambda v: any(x != int(x) for x in v if math.isfinite(x))))}
    if key == "train.ema_sigma_rels":  # a list of floats, not of integers
        wrong_type[list] = st.one_of(st.integers(), st.text(max_size=5),
                                     st.lists(st.text(string.ascii_letters, min_size=1, max_size=3), min_size=1,
                                              max_size=2))
    options = [wrong_type.get(kind, st.just(object()))]
    if key in CHOICES:
        options.append(st.text(string.ascii_letters, max_size=8).filter(lambda v: v not in CHOICES[key]))
    if key in POSITIVE:
        options.append(st.integers(-10**6, 0) if kind is int else st.floats(-1e6, 0.0))
    if key in NONNEGATIVE:
        options.append(st.integers(-10**6, -1) if kind is int else st.floats(-1e6, -1e-9))
    if key in PROBABILITY:
        options.append(st.one_of(st.floats(1.0001, 1e6), st.floats(-1e6, -1e-6)))
    if kind is float:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return draw(st.one_of(options))


@SETTINGS
@given(data=st.data())
def test_every_invalid_value_is_refused_in_one_sentence(data):
    key = data.draw(st.sampled_from([k for k in all_keys() if k not in RECORDED]))
    value = invalid_value(key, data.draw)
    code, err, recorder = run_cli(["train", "--preset", "fmnist-tiny", "--set", f"{key}={toml_literal(value)}",
                                   "--out", "x"])
    assert code == 2 and key in err, (key, value, err)
    assert_one_sentence(err)
    assert not recorder.called


@SETTINGS
@given(text=st.text(max_size=200))
@example(text="[train\nkimg = 1")
@example(text="train = 3")
@example(text="[train]\nkimg = 1\nkimg = 2")
@example(text="[model]\nchannels = [8, 16, 24, 32]")
def test_any_toml_file_is_accepted_or_refused_in_one_sentence(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "config.toml"
    path.write_text(text)
    code, err, recorder = run_cli(["train", "--config", str(path), "--out", "x"])
    assert code in (0, 2)
    if code == 2:
        assert_one_sentence(err)
    assert recorder.called == (code == 0)


@pytest.mark.parametrize("sets, words", [
    (["diffusion.prediction=eps"], "eps-prediction cannot be used with zero terminal SNR"),
    (["diffusion.process=flow", "diffusion.prediction=eps"], "eps-prediction cannot be used with rectified flow"),
    (["sample.sampler=euler"], "euler sampler"),
    (["data.name=toy2d"], "goes with model.net"),
    (["data.mean=0.5"], "go together"),
    (["data.task=superres", "data.factor=5"], "must divide the 28-pixel side"),
    (["model.attn_levels=[3]"], "must name levels"),
    (["model.channels=[8, 16, 24, 32]"], "allow at most 3"),
])
def test_contradicting_settings_are_named(sets, words):
    code, err, _ = run_cli(["train", "--preset", "fmnist-tiny", *[a for s in sets for a in ("--set", s)],
                            "--out", "x"])
    assert code == 2 and words in err
    assert_one_sentence(err)


# ---------------------------------------------------------------------------------------------
# `diffuse sample` on a real run: every combination of flags is sampled or refused in one sentence.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_config
    return train(tiny_config("train.probe_kimg=0", "train.kimg=0.064", "train.checkpoint_kimg=0.064"),
                 tmp_path_factory.mktemp("bad-input") / "run", log=lambda *a: None)


NUMBER_TEXT = st.one_of(st.integers(-5, 5).map(str), st.floats(-3, 3).map(lambda v: f"{v:.3g}"),
                        st.sampled_from(["", "x", "nan", "inf", "1e9", "-0", "2,3"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n=NUMBER_TEXT, steps=NUMBER_TEXT, cfg=NUMBER_TEXT, rescale=NUMBER_TEXT, eta=NUMBER_TEXT,
       labels=st.sampled_from(["all", "none", "0,3", "9", "10", "-1", "a,b", "", "3,"]),
       sampler=st.sampled_from(["ddim", "ddpm", "euler", "heun", "DDIM"]),
       spacing=st.sampled_from(["trailing", "leading", "linspace", "middle"]),
       precision=st.sampled_from(["auto", "fp32", "fp16", "BF16", ""]))  # not bf16: emulated where not native
def test_any_sample_flags_are_sampled_or_refused_in_one_sentence(tiny_run, tmp_path, n, steps, cfg, rescale, eta,
                                                                  labels, sampler, spacing, precision):
    out = tmp_path / "s.npz"
    argv = ["sample", str(tiny_run), "--n", n, "--steps", steps, "--cfg", cfg, "--rescale", rescale, "--eta", eta,
            "--labels", labels, "--sampler", sampler, "--spacing", spacing, "--precision", precision,
            "--out", str(out)]
    out.unlink(missing_ok=True)
    code, err, _ = run_cli(argv)
    valid = (_int(n) is not None and 1 <= _int(n) <= 5 and _int(steps) is not None and 1 <= _int(steps) <= 1000
             and _float(cfg) is not None and _float(rescale) is not None and 0 <= _float(rescale) <= 1
             and _float(eta) is not None and 0 <= _float(eta) <= 1 and labels in ("all", "none", "0,3", "9")
             and _float(cfg) >= 0 and sampler in set(SAMPLERS) - {"euler"} and spacing != "middle"
             and precision in ("auto", "fp32"))
    if valid:
        assert code == 0, err
        assert len(np.load(out)["images"]) == _int(n)
    elif not valid:
        assert code == 2, argv
        assert_one_sentence(err)
        assert not out.exists()


def _int(text):
    try:
        return int(text)
    except ValueError:
        return None


def _float(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n=st.integers(1, 4), steps=st.integers(1, 3), cfg=st.floats(0, 5), rescale=st.floats(0, 1),
       eta=st.floats(0, 1), labels=st.sampled_from(["all", "none", "0,3", "9"]),
       sampler=st.sampled_from(sorted(set(SAMPLERS) - {"euler"})),
       spacing=st.sampled_from(["trailing", "leading", "linspace"]))
def test_every_valid_sample_flag_combination_samples(tiny_run, tmp_path, n, steps, cfg, rescale, eta, labels,
                                                     sampler, spacing):
    out = tmp_path / "s.npz"
    out.unlink(missing_ok=True)
    code, err, _ = run_cli(["sample", str(tiny_run), "--n", str(n), "--steps", str(steps), "--cfg", repr(cfg),
                            "--rescale", repr(rescale), "--eta", repr(eta), "--labels", labels, "--sampler", sampler,
                            "--spacing", spacing, "--out", str(out)])
    assert code == 0, err
    assert len(np.load(out)["images"]) == n


# ---------------------------------------------------------------------------------------------
# Data files: a missing folder, files that are not IDX images, images of the wrong size.


def write_idx(path, array: np.ndarray, gz: bool = True):
    import gzip
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("make, words", [
    (None, "lacks train-images-idx3-ubyte.gz"),
    (lambda d: [(d / n).write_text("<html>not found</html>") for n in FMNIST_FILES], "cannot be read as a gzipped IDX"),
    (lambda d: [write_idx(d / n, np.zeros((4, 32, 32)) if "images" in n else np.zeros(4)) for n in FMNIST_FILES],
     "images of shape (32, 32)"),
    (lambda d: [write_idx(d / n, np.zeros((4, 28, 28)) if "images" in n else np.full(3, 2)) for n in FMNIST_FILES],
     "does not hold one label 0-9 per image"),
    (lambda d: [(d / n).write_bytes(__import__("gzip").compress(b"\x00\x00\x08\x03" + bytes(20))) for n in FMNIST_FILES],
     "is truncated"),
])
def test_a_bad_data_folder_is_one_sentence(tmp_path, monkeypatch, capsys, make, words):
    folder = tmp_path / "fmnist"
    if make:
        folder.mkdir()
        make(folder)
    monkeypatch.setenv("DIFFUSE_FMNIST_DIR", str(folder))
    assert main(["train", "--preset", "fmnist-tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert_one_sentence(err)
    assert not (tmp_path / "run").exists()  # nothing written before the data was read


@pytest.mark.parametrize("images, words", [
    (np.zeros((5, 32, 32, 3), np.uint8), "needs images of shape (N, 28, 28, 1)"),
    (np.zeros((5, 28, 28, 3), np.uint8), "needs images of shape (N, 28, 28, 1)"),
    (np.zeros((5, 28, 28, 1), np.float32), "must be uint8"),
    (np.zeros((1, 28, 28, 1), np.uint8), "at least 2 images"),
])
def test_eval_refuses_images_of_the_wrong_size_channels_or_type(tmp_path, capsys, images, words):
    path = tmp_path / "s.npz"
    np.savez(path, images=images, labels=np.zeros(len(images), np.int64))
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert_one_sentence(err)


# ---------------------------------------------------------------------------------------------
# `diffuse eval DATA_DIR --features inception`: every --split, --n and reference path is measured or
# refused in one sentence, and a refused command leaves the reference path as it was.


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory):
    from diffuse.preparing import PrepareOptions, prepare
    folder = tmp_path_factory.mktemp("fid-data")
    g = np.random.default_rng(0)
    np.savez(folder / "src.npz", images=g.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8))
    prepare([folder / "src.npz"], folder / "data", PrepareOptions(heldout=0.5), log=lambda *a: None)
    return folder / "data"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(split=st.sampled_from(["train", "test", "all", "", "heldout", "TEST", None]),
       n=st.one_of(st.none(), NUMBER_TEXT),
       target=st.sampled_from(["new", "folder", "notes", "reference"]))
def test_any_fid_flags_on_a_data_dir_are_measured_or_refused_in_one_sentence(small_data_dir, tmp_path,
                                                                             split, n, target):
    ref = tmp_path / "ref.npz"
    if ref.is_dir():
        ref.rmdir()
    ref.unlink(missing_ok=True)
    if target == "folder":
        ref.mkdir()
    elif target == "notes":
        ref.write_text("my notes")
    elif target == "reference":
        assert main(["eval", str(small_data_dir), "--features", "inception", "--write-ref", str(ref)]) == 0
    before = ref.read_bytes() if ref.is_file() else None
    argv = ["eval", str(small_data_dir), "--features", "inception", "--write-ref", str(ref)]
    argv += ["--split", split] if split is not None else []
    argv += ["--n", n] if n is not None else []
    code, err, _ = run_cli(argv)
    size = {"train": 3, "test": 3, "all": 6, None: 3}.get(split)
    valid = (size is not None and (n is None or (_int(n) is not None and 2 <= _int(n) <= size))
             and target in ("new", "reference"))
    if valid:
        assert code == 0, err
        assert ref.is_file()
    else:
        assert code == 2, argv
        assert_one_sentence(err)
        assert (ref.read_bytes() if ref.is_file() else None) == before and ref.is_dir() == (target == "folder")
