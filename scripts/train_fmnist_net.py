"""Train the FD-FMNIST classifier on the 60k Fashion-MNIST training images and ship its weights.

    python scripts/train_fmnist_net.py [--epochs 4] [--out src/diffuse/metrics/fmnist_net.safetensors]

Adam (lr 1e-3, cosine decay to 0), batch 128, random shifts of up to 2 pixels and horizontal
flips, seed 0: about 90% test accuracy in 1.5 minutes on 2 idle CPU cores. Prints the test accuracy and the SHA-256 to paste into
FMNIST_NET_SHA256 in src/diffuse/metrics/fmnist_net.py.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffuse.data import load_fmnist
from diffuse.metrics.fmnist_net import FMNIST_NET_PATH, FmnistNet

SHIFT = 2  # pixels, each way


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 (B, 28, 28, 1) -> the same, each image shifted by up to SHIFT pixels and maybe mirrored.

    Shifting pads with zeros (the background) and crops a random 28x28 window per image.
    """
    b, h, w, _ = images.shape
    padded = F.pad(images.squeeze(-1), (SHIFT, SHIFT, SHIFT, SHIFT))  # (B, 28 + 4, 28 + 4)
    dy = torch.randint(0, 2 * SHIFT + 1, (b, 1), generator=g)
    dx = torch.randint(0, 2 * SHIFT + 1, (b, 1), generator=g)
    rows = (dy + torch.arange(h))[:, :, None]  # (B, 28, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (B, 1, 28)
    flip = torch.rand(b, generator=g) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return padded[torch.arange(b)[:, None, None], rows, cols].unsqueeze(-1)


def train(epochs: int, batch_size: int, seed: int) -> FmnistNet:
    """The classifier after `epochs` passes of Adam over the augmented training set."""
    torch.manual_seed(seed)  # the weight initialisation
    g = torch.Generator().manual_seed(seed)  # order and augmentation
    images, labels = load_fmnist("train")
    model = FmnistNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * -(-len(images) // batch_size)
    # Cosine decay to 0: the last epoch fine-tunes at small steps, worth ~1-2% test accuracy.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            _, logits = model(model.preprocess(augment(images[idx], g)))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum().item()
            loss_sum += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}, train acc {correct / total:.4f}, "
              f"{time.perf_counter() - start:.0f} s")
    return model.eval()


def test_accuracy(model: FmnistNet) -> float:
    images, labels = load_fmnist("test")
    _, logits = model.features_and_logits(images)
    return (logits.argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=FMNIST_NET_PATH)
    args = parser.parse_args()

    model = train(args.epochs, args.batch_size, args.seed)
    print(f"test accuracy {test_accuracy(model):.4f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    print(f'FMNIST_NET_SHA256 = "{sha}"')


if __name__ == "__main__":
    main()
