"""The Frechet distance between two sets of features, each summarised as a Gaussian.

For means mu_a, mu_b and covariances C_a, C_b (Dowson & Landau 1982; Heusel et al. 2017, "FID"):

    FD = ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))

Statistics are running sums in float64, so batches (or ranks) can be added up in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FeatureStats:
    """Running sums of D-dimensional features.

    n: how many feature vectors; sum: float64 (D,); sum_outer: float64 (D, D), the sum of x x^T.
    """

    n: int
    sum: np.ndarray
    sum_outer: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        """Stats of no features, of dimension `dim`."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Stats of features (N, D)."""
        stats = cls.empty(features.shape[1])
        stats.update(features)
        return stats

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add features (N, D), a tensor on any device or a numpy array."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the sums of `other` (from another batch or rank) into these; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {other.dim} into {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def copy(self) -> FeatureStats:
        return FeatureStats(self.n, self.sum.copy(), self.sum_outer.copy())

    def mean(self) -> np.ndarray:
        """float64 (D,)."""
        self._need(1)
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance, float64 (D, D): (sum x x^T - n mu mu^T) / (n - 1)."""
        self._need(2)
        mu = self.mean()
        c = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (c + c.T) / 2  # exactly symmetric, which eigh assumes

    def _need(self, n: int) -> None:
        if self.n < n:
            raise ValueError(f"these stats hold {self.n} features; need at least {n}")


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Frechet distance between the Gaussians fitted to `a` and `b` (the equation above)."""
    if a.dim != b.dim:
        raise ValueError(f"stats of dimension {a.dim} and {b.dim} cannot be compared")
    return frechet_distance_gaussian(a.mean(), a.cov(), b.mean(), b.cov())


def frechet_distance_gaussian(mu_a: np.ndarray, c_a: np.ndarray, mu_b: np.ndarray, c_b: np.ndarray) -> float:
    """The Frechet distance between N(mu_a, C_a) and N(mu_b, C_b): means (D,), covariances (D, D), float64.

    tr (C_a C_b)^(1/2) is the sum of the square roots of the eigenvalues of C_a C_b, which are
    those of the symmetric S C_b S with S = C_a^(1/2); symmetric eigendecompositions keep this
    real and stable where a general sqrtm of the non-symmetric C_a C_b is not.
    """
    s = _sqrt_psd(c_a)
    m = s @ c_b @ s
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()  # rounding makes tiny negatives
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(c_a) + np.trace(c_b) - 2.0 * tr_sqrt)


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (D, D)."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
