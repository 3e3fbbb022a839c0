"""A linear probe: can the class be read linearly from the denoiser's bottleneck, and since when?

A linear head is trained beside the model on the net's bottleneck features, taken in a separate
pass over the training batch noised to one moderate level (the time whose SNR is closest to 1).
The pass cannot change the model: it runs under no_grad, in eval mode (no dropout draws), with
its own generator, and the training step re-seeds the global one; a test checks the weights are
bit-identical with and without the probe. The net is given the null label, so the probe reads
what the model learned from the image, not the label it was given (`hide_label`).

The accuracy is progressive: each batch is classified before the head learns from it, so every
prediction is on images the probe has not seen. The baseline is the same head fitted to the
features of the untrained network: a model that does not beat it has learned nothing a random
network did not already give.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.denoiser import Denoiser, append_dims
from diffuse.sampling import null_condition
from diffuse.speed import autocast


def moderate_time(process) -> float | int:
    """The sampling time whose SNR alpha^2 / sigma^2 is closest to 1."""
    times = process.sampling_times(1000)[:-1]
    alpha, sigma = process.alpha_sigma(torch.tensor(times))
    return times[int((alpha.log() - sigma.log()).abs().argmin())]


@torch.no_grad()
def bottleneck_features(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None, t,
                        generator: torch.Generator, precision: str = "fp32") -> torch.Tensor:
    """Features (B, D): the bottleneck's output for x0 (B, ...) noised to time t, averaged over pixels,
    layer-normalized (so the head sees one scale while the model's changes), in float32; the net's pass
    in `precision` (`speed.autocast`)."""
    captured = []
    hook = denoiser.net.bottleneck.register_forward_hook(lambda module, args, out: captured.append(out))
    was_training = denoiser.training
    denoiser.eval()
    try:
        tt = torch.full((len(x0),), t, device=x0.device)
        alpha, sigma = denoiser.process.alpha_sigma(tt)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        with autocast(precision, x0.device):
            denoiser.raw(append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps, tt, cond)
    finally:
        hook.remove()
        denoiser.train(was_training)
    h = captured[0].float()
    h = h.flatten(2).mean(dim=2) if h.ndim > 2 else h  # (B, C, H, W) -> (B, C)
    return F.layer_norm(h, h.shape[-1:])


class Probe:
    """A linear classifier trained beside the model; `step` after optimizer steps, `summary` at log time.

    It remembers the features of its last `memory` examples and takes one pass over them at every
    step, so it keeps up with the model's changing features as fast as the baseline's head, which
    is fitted to a fixed set, converges.
    """

    def __init__(self, denoiser: Denoiser, example: torch.Tensor, num_classes: int, lr: float = 1e-2,
                 memory: int = 2048, precision: str = "fp32"):
        self.t, self.precision = moderate_time(denoiser.process), precision  # the net's passes: train.precision
        dim = bottleneck_features(denoiser, example[:1], None, self.t, torch.Generator()).shape[1]
        self.head = zero_linear(dim, num_classes).to(example.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.memory = memory
        self.features = example.new_zeros(0, dim)                    # (M, D), the newest last
        self.labels = torch.zeros(0, dtype=torch.long, device=example.device)  # (M,)
        self.baseline: float | None = None
        self.correct, self.count, self.seconds = 0, 0, 0.0

    def step(self, denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        """Classify the batch (counted: the head has not seen it), remember it, take a pass over the memory."""
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        features = bottleneck_features(denoiser, x0, hide_label(cond), self.t, generator, self.precision)
        with torch.no_grad():
            self.correct += (self.head(features).argmax(dim=1) == labels).sum().item()
        self.count += len(labels)
        self.features = torch.cat([self.features, features])[-self.memory:]
        self.labels = torch.cat([self.labels, labels])[-self.memory:]
        fit_head(self.head, self.optimizer, self.features, self.labels, epochs=1, batch=len(labels), generator=generator)
        self.seconds += time.perf_counter() - start

    def summary(self) -> dict:
        """Progressive accuracy and seconds spent since the last summary; resets both."""
        out = {"accuracy": self.correct / max(self.count, 1), "baseline": self.baseline, "seconds": self.seconds}
        self.correct, self.count, self.seconds = 0, 0, 0.0
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The head and the memory (the optimizer's state is saved with the optimizers)."""
        return {"weight": self.head.weight, "bias": self.head.bias, "features": self.features, "labels": self.labels}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
        self.features, self.labels = tensors["features"].to(self.features), tensors["labels"].to(self.labels)


def fit_head(head: nn.Linear, optimizer: torch.optim.Optimizer, features: torch.Tensor, labels: torch.Tensor, *,
             epochs: int, batch: int, generator: torch.Generator) -> None:
    """`epochs` passes of cross-entropy Adam steps over features (N, D) and labels (N,) in random minibatches."""
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for i in range(0, len(features), batch):
            index = order[i:i + batch]
            loss = F.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def zero_linear(dim: int, classes: int) -> nn.Linear:
    """A linear head starting at zero: logistic regression is convex, so no random init is needed, and
    without one the probe draws nothing from the global generator (a resumed probe matches a straight one)."""
    head = nn.utils.skip_init(nn.Linear, dim, classes)  # no default init: it would draw random numbers
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def hide_label(cond: torch.Tensor | None) -> torch.Tensor | None:
    """The condition the probe's pass gives the net: never the label it is asked to predict.

    A class label (integer) becomes the null label; an image condition (super-resolution) is kept,
    since it is part of the input the model reads, and a model trained without condition dropout
    has never seen the null image.
    """
    if cond is None or cond.dtype.is_floating_point:
        return cond
    return null_condition(cond)


def fit_baseline(untrained: Denoiser, fit: tuple, test: tuple, num_classes: int, t, *, seed: int,
                 epochs: int = 30, batch: int = 64, lr: float = 1e-2, precision: str = "fp32") -> float:
    """Held-out accuracy of the probe's head fitted to the untrained net's features.

    fit, test: (x (N, ...), cond (N, ...), labels (N,)); the head fits on `fit`'s examples and is
    tested on `test`'s, each noised once at time t, for `epochs` passes over the cached features; the
    net's passes in `precision`, as the probe's.
    """
    generator = torch.Generator().manual_seed(seed)

    def features(xs, cs):
        return torch.cat([bottleneck_features(untrained, xs[i:i + 256], hide_label(cs[i:i + 256]), t, generator,
                                              precision) for i in range(0, len(xs), 256)])

    f_fit, y_fit = features(*fit[:2]), fit[2]
    f_test, y_test = features(*test[:2]), test[2]
    head = zero_linear(f_fit.shape[1], num_classes).to(f_fit.device)
    fit_head(head, torch.optim.Adam(head.parameters(), lr=lr), f_fit, y_fit, epochs=epochs, batch=batch,
             generator=generator)
    with torch.no_grad():
        return (head(f_test).argmax(dim=1) == y_test).float().mean().item()
