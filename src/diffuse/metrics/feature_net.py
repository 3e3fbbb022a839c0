"""FeatureNet: the feature network of a prepared data set, FmnistNet generalised to C in {1, 3}, R in 16..256.

Conv-pool stages halve the side until it is at most 4, the last stage is flattened (where an
object's parts lie matters, as in FmnistNet) into Linear -> 128 -> ReLU: the features of its FD.
Trained on the data set itself by `metrics.feature_train.train_feature_net`; loaded here with
every file checked (`metrics.feature_files`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from diffuse.errors import UserError
from diffuse.metrics.feature_files import FEATURE_DIM, TRAIN_HINT, check_sha, read_features_meta
from diffuse.metrics.fmnist_net import _conv

MAX_WIDTH = 128  # channels; caps the deep stages of large images so CPU training stays quick


def stages_of(resolution: int) -> tuple[list[int], int]:
    """(widths of the conv-pool stages, side after them): 32, 64, 128, 128, ... until the side is <= 4."""
    widths, side = [], resolution
    while side > 4:
        widths.append(min(32 * 2 ** len(widths), MAX_WIDTH))
        side //= 2  # MaxPool2d(2) floors: 28 -> 14 -> 7 -> 3
    return widths, side


class FeatureNet(nn.Module):
    """uint8 images (N, R, R, C) -> (features (N, 128), logits (N, outputs)).

    Pixels are normalised with the data set's own mean and std ([0, 1] units), kept as buffers
    so the weights file holds everything that measures.
    """

    def __init__(self,
                 channels: int,      # C, 1 or 3
                 resolution: int,    # R, 16..256
                 outputs: int,       # classes K, or 4 rotations
                 mean: float = 0.5,  # pixel mean of the data set, [0, 1] units
                 std: float = 0.25,  # pixel std of the data set
                 ) -> None:
        super().__init__()
        widths, side = stages_of(resolution)
        layers, c = [], channels
        for w in widths:
            layers += [_conv(c, w), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, outputs)
        self.register_buffer("pixel_mean", torch.tensor(float(mean)))
        self.register_buffer("pixel_std", torch.tensor(float(std)))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, R, R, C) -> float32 (N, C, R, R), (x / 255 - mean) / std."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed float (N, C, R, R) -> (features (N, 128), logits (N, outputs))."""
        features = self.body(x)
        return features, self.head(features)

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor | np.ndarray, batch_size: int = 500
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, R, R, C), a tensor on any device or a numpy array (a memmap too) ->
        (features float32 (N, 128), logits float32 (N, outputs)) on the net's device.

        Images move to that device one batch at a time, so a memmap larger than memory works.
        """
        device = next(self.parameters()).device
        features, logits = [], []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="features", leave=False, disable=len(starts) < 4 or not sys.stderr.isatty()):
            batch = images[start:start + batch_size]
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(np.array(batch))  # a writable copy of this batch only
            f, z = self(self.preprocess(batch.to(device)))
            features.append(f.float())
            logits.append(z.float())
        if not features:
            return torch.zeros(0, FEATURE_DIM, device=device), torch.zeros(0, self.head.out_features, device=device)
        return torch.cat(features), torch.cat(logits)


def net_of_meta(meta: dict) -> FeatureNet:
    """An untrained FeatureNet of the architecture that features.json (or a new one) describes."""
    return FeatureNet(meta["channels"], meta["resolution"], meta["outputs"], meta["mean"], meta["std"])


def load_feature_net(data_dir: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """The data set's trained FeatureNet in eval mode on `device`: features.json checked, the weights'
    SHA-256 and then their names and shapes checked against the architecture it describes."""
    data_dir = Path(data_dir)
    meta = read_features_meta(data_dir)
    path = data_dir / "features.safetensors"
    check_sha(path, meta["sha256"])
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}); {TRAIN_HINT}.") from None
    model = net_of_meta(meta)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        bad = sorted(set(want.items()) ^ set(got.items()))[0][0]
        raise UserError(f"{path} does not fit the architecture in features.json (first at {bad}); {TRAIN_HINT}.")
    model.load_state_dict(state)
    if not (abs(model.pixel_mean.item() - meta["mean"]) < 1e-6 and abs(model.pixel_std.item() - meta["std"]) < 1e-6):
        raise UserError(f"{path} normalises pixels with other stats than features.json; {TRAIN_HINT}.")
    return model.to(device).eval()
