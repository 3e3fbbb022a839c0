"""FD-FMNIST: the Frechet distance core against independent formulas, and the shipped classifier."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffuse.data import load_fmnist
from diffuse.errors import UserError
from diffuse.metrics.fd import FeatureStats, frechet_distance
from diffuse.metrics.fmnist_fd import evaluate_images, reference_stats
from diffuse.metrics.fmnist_net import FMNIST_NET_PATH, load_fmnist_net


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """float64 (n, dim) from a random correlated Gaussian."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mix + shift + rng.normal(size=dim)


def stats_with(mean: np.ndarray, cov: np.ndarray, n: int = 100) -> FeatureStats:
    """Stats whose mean and (unbiased) covariance are exactly `mean` (D,) and `cov` (D, D)."""
    return FeatureStats(n, n * mean, (n - 1) * cov + n * np.outer(mean, mean))


# ---------------------------------------------------------------------------------------------
# The Frechet distance core.


def test_fd_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    a = FeatureStats.of(gaussian_features(400, 16, seed=1))
    b = FeatureStats.of(gaussian_features(300, 16, seed=2, shift=0.3))
    mu_a, mu_b, c_a, c_b = a.mean(), b.mean(), a.cov(), b.cov()
    expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(c_a) + np.trace(c_b)
                - 2 * np.trace(linalg.sqrtm(c_a @ c_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_fd_closed_form_one_dimension():
    x = np.random.default_rng(3).normal(1.0, 2.0, size=(500, 1))
    y = np.random.default_rng(4).normal(-0.5, 0.7, size=(700, 1))
    m1, m2, s1, s2 = x.mean(), y.mean(), x.var(ddof=1), y.var(ddof=1)
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
    assert frechet_distance(FeatureStats.of(x), FeatureStats.of(y)) == pytest.approx(expected, rel=1e-12)


def test_fd_closed_form_diagonal():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    s1[0] = 0.0  # a degenerate direction: sqrt must not see a negative from rounding
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    fd = frechet_distance(stats_with(mu1, np.diag(s1)), stats_with(mu2, np.diag(s2)))
    assert fd == pytest.approx(expected, rel=1e-10)


def test_fd_of_identical_stats_is_zero():
    a = FeatureStats.of(gaussian_features(200, 32, seed=6))
    assert abs(frechet_distance(a, a)) < 1e-9


def test_merge_of_halves_equals_whole():
    x = torch.from_numpy(gaussian_features(1000, 8, seed=7)).float()  # tensors are accepted too
    whole = FeatureStats.of(x)
    merged = FeatureStats.of(x[:400]).merge(FeatureStats.of(x[400:]))
    assert merged.n == whole.n == 1000
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# FD-FMNIST with the shipped classifier.


def box_blur(images: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of uint8 (N, 28, 28, 1), edges padded by replication."""
    x = images.permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x.round().to(torch.uint8).permute(0, 2, 3, 1)


def test_fd_ranks_real_blurred_noise():
    train, _ = load_fmnist("train")
    real = train[:2000]
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fd = {name: evaluate_images(images)["fd"]
          for name, images in [("real", real), ("blurred", box_blur(real)), ("noise", noise)]}
    print("FD-FMNIST vs the test set:", {k: round(v, 3) for k, v in fd.items()})
    assert fd["real"] < fd["blurred"] < fd["noise"]
    # Loose bounds (measured: real 0.73, blurred 82, noise 494): 2000 real images are close to
    # the test set, the small-sample bias of FD being most of what is left.
    assert fd["real"] < 5.0
    assert fd["real"] < 0.1 * fd["blurred"]


def test_classifier_accuracy_on_test_images():
    images, labels = load_fmnist("test")
    result = evaluate_images(images[:2000], labels[:2000])
    print("accuracy on 2000 test images:", result["accuracy"], "FD:", result["fd"])
    assert result["n"] == 2000 and result["n_ref"] == 10_000
    assert result["accuracy"] > 0.85


def test_accuracy_counts_only_labelled_images():
    images, labels = load_fmnist("test")
    images, labels = images[:20, :, :, 0], labels[:20].clone()  # (N, 28, 28) is accepted too
    assert evaluate_images(images)["accuracy"] is None
    assert evaluate_images(images, torch.full((20,), -1))["accuracy"] is None
    labels[10:] = -1
    full = evaluate_images(images[:10], labels[:10])["accuracy"]
    assert evaluate_images(images, labels)["accuracy"] == pytest.approx(full)


def test_reference_stats_are_the_test_set():
    ref = reference_stats()
    assert ref.n == 10_000 and ref.dim == 128
    ref.merge(ref)  # a copy: mutating it must not touch the cache
    assert reference_stats().n == 10_000


@pytest.mark.parametrize("images", [
    torch.zeros(4, 1, 28, 28, dtype=torch.uint8),  # channels first
    torch.zeros(4, 28, 28, 3, dtype=torch.uint8),  # RGB
    torch.zeros(4, 28, 28, 1),                     # float
    torch.zeros(1, 28, 28, 1, dtype=torch.uint8),  # too few for a covariance
])
def test_bad_images_are_refused(images):
    with pytest.raises(UserError, match=r"\(N, 28, 28, 1\)|at least 2"):
        evaluate_images(images)


def test_wrong_label_count_is_refused():
    with pytest.raises(UserError, match="one label per image"):
        evaluate_images(torch.zeros(4, 28, 28, 1, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_corrupt_weights_are_refused(tmp_path):
    path = tmp_path / "fmnist_net.safetensors"
    shutil.copy(FMNIST_NET_PATH, path)
    load_fmnist_net(path=path)  # the intact copy loads
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_fmnist_net(path=path)
