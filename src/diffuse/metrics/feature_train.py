"""Train a prepared data set's feature net (`metrics.feature_net.FeatureNet`) and write its reference.

    train_feature_net(DATA_DIR)  ->  DATA_DIR/features.safetensors, features.json, reference.npz

The task, on the training split only:
- classifier, where the data set has labels (condition "label"): cross-entropy on the K classes,
  as FD-FMNIST's net is trained (scripts/train_fmnist_net.py).
- rotation, where it has none (condition "none", "vector", "image"): which of 0, 90, 180 or 270
  degrees an image was turned by (Gidaris et al. 2018, "Unsupervised representation learning by
  predicting image rotations"), all four turns of each image in the batch. Why this one: to tell
  the turn the net must find the objects and how they stand (shapes, parts, their layout), which
  is what an FD must see; it is a plain 4-way cross-entropy that learns in a few passes on a CPU,
  where contrastive methods (SimCLR, BYOL) need large batches and hundreds of epochs, and an
  autoencoder's features weigh pixels rather than shapes. Caveat: data with no canonical
  orientation (textures, micrographs, aerial views) leaves the task nearly unsolvable, so the
  features are weak there; features.json records the held-out rotation accuracy (chance 0.25) to show it.

Both: random shifts of up to R / 14 pixels (edge padding, as a background may not be black) and
horizontal flips; Adam (lr 1e-3) with cosine decay to 0; time counted in images seen (kimg).
Images are read a batch at a time from the memmap, so the set may be larger than memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffuse.files import sha256_file
from diffuse.metrics.fd import FeatureStats
from diffuse.metrics.feature_files import FEATURE_DIM, publish, write_atomically
from diffuse.metrics.feature_net import FeatureNet, net_of_meta
from diffuse.prepared import open_prepared

CHUNK = 2000  # images read from the memmap at a time outside training


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 (B, R, R, C) -> the same, each shifted by up to R // 14 pixels (edges repeated) and maybe mirrored."""
    b, r = images.shape[:2]
    shift = max(1, r // 14)
    dy = torch.randint(-shift, shift + 1, (b, 1), generator=g)
    dx = torch.randint(-shift, shift + 1, (b, 1), generator=g)
    rows = (dy + torch.arange(r)).clamp(0, r - 1)[:, :, None]  # (B, R, 1)
    cols = (dx + torch.arange(r)).clamp(0, r - 1)[:, None, :]  # (B, 1, R)
    flip = torch.rand(b, generator=g) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return images[torch.arange(b)[:, None, None], rows, cols]


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, R, R, C) -> (the 4 turns (4B, R, R, C), turn k = 0..3 of each (4B,)): k quarter turns."""
    turned = torch.cat([torch.rot90(images, k, dims=(1, 2)) for k in range(4)])
    return turned, torch.arange(4).repeat_interleave(len(images))


def task_batch(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the net's task: the images and their labels, or their four turns."""
    return (images, labels) if labels is not None else rotations(images)


def read_rows(images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """uint8 (len(idx), R, R, C) read from the memmap, rows in increasing order (idx need not be)."""
    return torch.from_numpy(np.array(images[np.sort(idx)]))


def fit(net: FeatureNet, images: np.ndarray, labels: np.ndarray | None, train: np.ndarray, steps: int,
        batch: int, g: torch.Generator, log: Callable[[str], None]) -> None:
    """`steps` Adam steps of the task on batches of the training split `train` (indices (T,))."""
    device = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # Cosine decay to 0: the last steps fine-tune at small steps, worth ~1-2% accuracy (FmnistNet).
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order, at, start, seen, hit, loss_sum = np.zeros(0, dtype=np.int64), 0, time.perf_counter(), 0, 0, 0.0
    net.train()
    for step in range(steps):
        if at + batch > len(order):  # a new pass over the training split
            order, at = train[torch.randperm(len(train), generator=g).numpy()], 0
        idx, at = np.sort(order[at:at + batch]), at + batch
        x, y = task_batch(augment(read_rows(images, idx), g), None if labels is None else torch.from_numpy(labels[idx]))
        x, y = x.to(device), y.to(device)
        _, logits = net(net.preprocess(x))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen, hit, loss_sum = seen + len(y), hit + (logits.argmax(1) == y).sum().item(), loss_sum + loss.item() * len(y)
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"feature net: {(step + 1) * batch / 1000:.1f} kimg, loss {loss_sum / seen:.4f}, "
                f"train accuracy {hit / seen:.4f}, {time.perf_counter() - start:.0f} s")
            seen, hit, loss_sum = 0, 0, 0.0
    net.eval()


@torch.no_grad()
def heldout_pass(net: FeatureNet, images: np.ndarray, labels: np.ndarray | None,
                 heldout: np.ndarray) -> tuple[FeatureStats, float]:
    """(stats of the held-out images' features (D = 128), the net's held-out accuracy on its own task)."""
    stats, hit, total = FeatureStats.empty(FEATURE_DIM), 0, 0
    for start in range(0, len(heldout), CHUNK):
        idx = heldout[start:start + CHUNK]
        x = read_rows(images, idx)
        features, _ = net.features_and_logits(x)
        stats.update(features)
        x, y = task_batch(x, None if labels is None else torch.from_numpy(labels[idx]))
        _, logits = net.features_and_logits(x)
        hit, total = hit + (logits.argmax(1).cpu() == y).sum().item(), total + len(y)
    return stats, hit / total


def write_outputs(data_dir: Path, net: FeatureNet, ref: FeatureStats, meta: dict) -> dict:
    """Write the weights, reference.npz and features.json (with both SHA-256s) atomically; returns features.json."""
    weights = write_atomically(data_dir / "features.safetensors", lambda p: save_file(
        {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, p))

    def write_ref(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.savez would append .npz to the name
            np.savez(f, mu=ref.mean(), sigma=ref.cov(), n=np.int64(ref.n))

    reference = write_atomically(data_dir / "reference.npz", write_ref)
    meta = {**meta, "sha256": sha256_file(weights), "reference_sha256": sha256_file(reference)}
    spec = write_atomically(data_dir / "features.json", lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    publish([(weights, data_dir / "features.safetensors"), (reference, data_dir / "reference.npz"),
             (spec, data_dir / "features.json")])
    return meta


def train_feature_net(data_dir: str | Path, *, kimg: float = 200.0, batch: int = 128, seed: int = 0,
                      device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> dict:
    """Train DATA_DIR's feature net on its training split, measure the held-out split, write the files.

    kimg: thousands of training images seen (for rotation, each is seen in all four turns).
    Returns the dict written to features.json: method, outputs, channels, resolution, mean, std,
    feature_dim, kimg, batch, seed, seconds, accuracy (held-out, of its own task), sha256, reference_sha256.
    """
    data_dir = Path(data_dir)
    prepared = open_prepared(data_dir)
    data, images, heldout, train = prepared.meta, prepared.images, prepared.heldout, prepared.train_index
    labels = None if prepared.labels is None else np.asarray(prepared.labels)
    method = "classifier" if labels is not None else "rotation"
    meta = {"format": "diffuse-features", "version": 1, "method": method,
            "outputs": len(data["classes"]) if labels is not None else 4, "channels": data["channels"],
            "resolution": data["resolution"], "mean": float(data["mean"]), "std": float(data["std"]),
            "feature_dim": FEATURE_DIM, "kimg": float(kimg), "batch": batch, "seed": seed}
    torch.manual_seed(seed)  # the weight initialisation
    g = torch.Generator().manual_seed(seed)  # order and augmentation
    net = net_of_meta(meta).to(device)
    start = time.perf_counter()
    fit(net, images, labels, train, max(1, round(kimg * 1000 / batch)), min(batch, len(train)), g, log)
    ref, accuracy = heldout_pass(net, images, labels, heldout)
    meta.update(seconds=round(time.perf_counter() - start, 3), accuracy=accuracy)
    log(f"feature net ({method}): held-out accuracy {accuracy:.4f} over {len(heldout)} images, {meta['seconds']:.0f} s")
    return write_outputs(data_dir, net, ref, meta)
