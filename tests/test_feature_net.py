"""FD in a prepared data set's own features: a net trained on synthetic coloured shapes, checked
against planted faults, an independent numpy / scipy computation, and tampered files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffuse.errors import UserError
from diffuse.metrics.features import evaluate_features, fd_name
from diffuse.metrics.feature_net import FeatureNet, load_feature_net
from diffuse.metrics.feature_train import train_feature_net
from diffuse.metrics.planted import gaussian_blur, uniform_noise
from diffuse.metrics.prepared_fd import evaluate_prepared
from shapes_data import shapes, write_prepared

N, HELDOUT, N_EVAL = 1500, 300, 600


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    torch.set_num_threads(1)
    images, labels = shapes(N, seed=0)
    root = write_prepared(tmp_path_factory.mktemp("labelled"), images, labels, HELDOUT, "shapes")
    return root, train_feature_net(root, kimg=10, log=lambda s: None)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    torch.set_num_threads(1)
    images, _ = shapes(N, seed=0)
    root = write_prepared(tmp_path_factory.mktemp("unlabelled"), images, None, HELDOUT, "shapes-none")
    return root, train_feature_net(root, kimg=4, log=lambda s: None)


def planted_fds(root) -> dict:
    """FD of fresh real images (not the held-out ones), them blurred, uniform noise, and half the classes."""
    real, labels = shapes(N_EVAL, seed=1)
    half, _ = shapes(N_EVAL, seed=2, classes=np.array([0, 1]))
    sets = {"real": real, "blurred": gaussian_blur(real), "noise": uniform_noise(real.shape), "half": half}
    fd = {k: evaluate_prepared(root, x)["fd"] for k, x in sets.items()}
    print(fd_name(str(root)), {k: round(v, 3) for k, v in fd.items()})
    return fd


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message


def test_classifier_learns_the_classes(labelled):
    root, meta = labelled
    assert meta["method"] == "classifier" and meta["outputs"] == 4 and meta["feature_dim"] == 128
    assert meta["accuracy"] > 0.9  # chance is 0.25
    assert json.loads((root / "features.json").read_text()) == meta
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]  # every temporary renamed


def test_classifier_fd_ranks_planted_faults(labelled):
    fd = planted_fds(labelled[0])
    assert fd["real"] < fd["blurred"] < fd["noise"]
    assert fd["half"] > 5 * fd["real"]  # dropping classes costs far more than the sampling noise


def test_rotation_fd_ranks_planted_faults(unlabelled):
    root, meta = unlabelled
    assert meta["method"] == "rotation" and meta["outputs"] == 4
    assert meta["accuracy"] > 0.6  # chance 0.25: the lit background gives an up
    fd = planted_fds(root)
    assert fd["real"] < fd["blurred"] < fd["noise"]
    real, labels = shapes(20, seed=1)
    assert evaluate_prepared(root, real, labels)["accuracy"] is None  # turns are not classes


def heldout_features(root) -> np.ndarray:
    images = np.load(root / "images.npy")[np.load(root / "heldout.npy")]
    return load_feature_net(root).features_and_logits(images)[0].double().numpy()


def test_reference_is_the_heldout_mean_and_covariance(labelled):
    root, _ = labelled
    f = heldout_features(root)
    with np.load(root / "reference.npz") as ref:
        assert int(ref["n"]) == HELDOUT and ref["mu"].dtype == ref["sigma"].dtype == np.float64
        np.testing.assert_allclose(ref["mu"], f.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref["sigma"], np.cov(f, rowvar=False), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: rank-deficient covariances
def test_fd_matches_scipy_sqrtm(labelled):
    linalg = pytest.importorskip("scipy.linalg")
    root, _ = labelled
    images, labels = shapes(N_EVAL, seed=1)
    f = load_feature_net(root).features_and_logits(images)[0].double().numpy()
    with np.load(root / "reference.npz") as ref:
        mu_r, c_r = ref["mu"], ref["sigma"]
    mu, c = f.mean(axis=0), np.cov(f, rowvar=False)
    expected = np.sum((mu - mu_r) ** 2) + np.trace(c) + np.trace(c_r) - 2 * np.trace(linalg.sqrtm(c @ c_r).real)
    result = evaluate_prepared(root, images, labels)
    assert result["fd"] == pytest.approx(expected, rel=1e-5)
    assert result["n"] == N_EVAL and result["n_ref"] == HELDOUT and result["accuracy"] > 0.9


def test_memmap_and_dispatch_agree(labelled):
    root, _ = labelled
    images = np.load(root / "images.npy", mmap_mode="r")[:200]  # a memmap, read a batch at a time
    direct = evaluate_prepared(root, np.array(images))
    assert evaluate_prepared(root, images) == pytest.approx(direct)
    assert evaluate_features(str(root), images) == pytest.approx(direct)
    assert evaluate_prepared(root, images, across_ranks=True) == pytest.approx(direct)  # one rank: the same sums
    assert fd_name(str(root)) == "FD-shapes" and fd_name("fmnist") == "FD-FMNIST"


def test_accuracy_counts_only_labelled_images(labelled):
    root, _ = labelled
    images, labels = shapes(40, seed=5)
    labels[20:] = -1
    full = evaluate_prepared(root, images[:20], labels[:20])["accuracy"]
    assert evaluate_prepared(root, images, labels)["accuracy"] == pytest.approx(full)
    assert evaluate_prepared(root, images)["accuracy"] is None


@pytest.mark.parametrize("images", [
    np.zeros((4, 3, 16, 16), np.uint8),  # channels first
    np.zeros((4, 16, 16, 1), np.uint8),  # grey
    np.zeros((4, 16, 16), np.uint8),     # grey, no channel axis
    np.zeros((4, 16, 16, 3)),            # float
    np.zeros((1, 16, 16, 3), np.uint8),  # too few for a covariance
])
def test_bad_images_are_refused_naming_the_shape(labelled, images):
    with pytest.raises(UserError, match=r"FD-shapes needs .*(\(N, 16, 16, 3\)|at least 2)") as e:
        evaluate_prepared(labelled[0], images)
    assert one_sentence(str(e.value))


def copy_features(root, tmp_path):
    """A DATA_DIR holding only what an FD reads: data.json, the weights, features.json, reference.npz."""
    for name in ("data.json", "features.json", "features.safetensors", "reference.npz"):
        shutil.copy(root / name, tmp_path / name)
    return tmp_path


def edit_json(key, value):
    def edit(d):
        meta = json.loads((d / "features.json").read_text())
        meta[key] = value
        (d / "features.json").write_text(json.dumps(meta))
    return edit


def flip_byte(name):
    def edit(d):
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / name).write_bytes(bytes(data))
    return edit


def wrong_shape_reference(d):
    """A reference of the wrong dimension whose SHA-256 features.json is told: the shape check must catch it."""
    with open(d / "reference.npz", "wb") as f:
        np.savez(f, mu=np.zeros(64), sigma=np.eye(64), n=np.int64(300))
    from diffuse.files import sha256_file
    edit_json("reference_sha256", sha256_file(d / "reference.npz"))(d)


@pytest.mark.parametrize("tamper, match", [
    (lambda d: (d / "features.json").write_text("{not json"), "not UTF-8 JSON"),
    (lambda d: (d / "features.json").write_bytes(b'{"format": "\xff"}'), "not UTF-8 JSON"),
    (lambda d: (d / "features.json").write_text("[]"), "not a diffuse-features file"),
    (lambda d: (d / "features.json").write_text(" " * (2 << 20)), "too large"),
    (edit_json("resolution", "16"), '"resolution": "16", which must be an integer in 16..256'),
    (edit_json("resolution", 1000), "an integer in 16..256"),
    (edit_json("channels", True), '"channels": true'),
    (edit_json("mean", float("nan")), '"mean"'),
    (lambda d: (edit_json("outputs", 3)(d), edit_json("method", "rotation")(d)), "instead of 4"),
    (edit_json("outputs", 5), "does not fit the architecture"),
    (edit_json("sha256", "0" * 64), "does not match the SHA-256"),
    (lambda d: edit_json("kimg", None)(d), '"kimg": null'),
    (lambda d: (d / "features.safetensors").unlink(), "missing"),
    (flip_byte("features.safetensors"), "features.safetensors does not match the SHA-256"),
    (flip_byte("reference.npz"), "reference.npz does not match the SHA-256"),
    (wrong_shape_reference, r"must hold finite mu \(128,\)"),
    (lambda d: (d / "features.json").unlink(), "no trained feature net.*diffuse data features DATA_DIR"),
])
def test_tampered_files_are_refused_in_one_sentence(labelled, tmp_path, tamper, match):
    d = copy_features(labelled[0], tmp_path)
    images, _ = shapes(8, seed=3)
    evaluate_prepared(d, images)  # the intact copy measures
    tamper(d)
    with pytest.raises(UserError, match=match) as e:
        evaluate_prepared(d, images)
    assert one_sentence(str(e.value)), str(e.value)


def test_untrained_data_set_names_the_training(tmp_path):
    images, labels = shapes(10, seed=0)
    root = write_prepared(tmp_path, images, labels, 4, "fresh")
    with pytest.raises(UserError, match="diffuse data features DATA_DIR") as e:
        evaluate_features(str(root), images)
    assert one_sentence(str(e.value)) and fd_name(str(root)) == "FD-fresh"


def test_architecture_fits_every_resolution():
    for channels, r in [(1, 16), (3, 20), (1, 28), (3, 64), (3, 256)]:
        net = FeatureNet(channels, r, 10).eval()
        features, logits = net.features_and_logits(torch.zeros(2, r, r, channels, dtype=torch.uint8))
        assert features.shape == (2, 128) and logits.shape == (2, 10)
