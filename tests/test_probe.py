import json

import pytest
import torch
from torch import nn

from diffuse.checkpoint import latest_checkpoint, load_checkpoint
from diffuse.denoiser import Denoiser
from diffuse.metrics.probe import Probe, fit_baseline, moderate_time
from diffuse.process import RectifiedFlow, VPDiscrete
from diffuse.training import train


class ReadsInput(nn.Module):
    """A 'network' whose bottleneck is its (noisy) input itself, or the embedding of its condition."""

    def __init__(self, dim: int, from_condition: bool = False):
        super().__init__()
        self.from_condition = from_condition
        self.embed = nn.Embedding(3, dim)  # rows 0, 1: the classes; row 2: null
        self.bottleneck = nn.Identity()

    def forward(self, x, t, cond=None):
        if self.from_condition:
            labels = torch.full((len(x),), -1) if cond is None else cond
            return self.bottleneck(self.embed(torch.where(labels < 0, 2, labels)))
        return self.bottleneck(x)


def two_classes(n: int, dim: int = 8, seed: int = 0):
    """Two Gaussian blobs at +-2 along the first axis, std 1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    x[:, 0] += 4.0 * y - 2.0
    return x, y


def test_moderate_time_has_snr_closest_to_one():
    vp = VPDiscrete("linear", zero_terminal_snr=True)
    t = moderate_time(vp)
    abar = vp.alpha_bar
    assert abar[t] >= 0.5 >= abar[t + 1] or abar[t - 1] >= 0.5 >= abar[t]  # alpha^2 = sigma^2 at abar = 1/2
    assert moderate_time(RectifiedFlow()) == pytest.approx(0.5)


def test_probe_learns_a_linearly_readable_class_and_counts_progressively():
    denoiser = Denoiser(ReadsInput(8), RectifiedFlow(), "flow")
    x, y = two_classes(4096)
    probe = Probe(denoiser, x[:1], num_classes=2, lr=1e-2)
    summaries = []
    for i in range(0, 4096, 64):
        probe.step(denoiser, x[i:i + 64], y[i:i + 64], y[i:i + 64], seed=i)
        if i in (0, 3072 - 64):  # the first batch; then the learning phase
            summaries.append(probe.summary())
    first, last = summaries[0], probe.summary()  # last: the final 1024 examples
    assert first["accuracy"] <= 0.8  # the first batch is classified before any learning
    # The blobs are 4 apart with unit std; at t = 0.5 (x_t = x0/2 + eps/2) the class means are
    # +-1 with std sqrt(1/2), a Bayes accuracy of Phi(sqrt(2)) = 0.92: the probe must get close.
    assert last["accuracy"] > 0.85
    baseline = fit_baseline(denoiser, (x[:2048], y[:2048], y[:2048]), (x[-1024:], y[-1024:], y[-1024:]), 2, probe.t,
                            seed=0)
    assert baseline > 0.85


def test_probe_reads_the_image_not_the_condition():
    """The net sees the null condition: a net whose features are its label embedding gives chance accuracy."""
    denoiser = Denoiser(ReadsInput(8, from_condition=True), RectifiedFlow(), "flow")
    x, y = two_classes(2048)
    probe = Probe(denoiser, x[:1], num_classes=2, lr=1e-2)
    for i in range(0, 2048, 64):
        probe.step(denoiser, x[i:i + 64], y[i:i + 64], y[i:i + 64], seed=i)
    assert abs(probe.summary()["accuracy"] - 0.5) < 0.06


def test_the_probe_does_not_change_the_model(tmp_path, tiny):
    """Weights, EMA and optimizer state after training are bit-identical with and without the probe."""
    runs = {}
    for name, every in (("without", "0"), ("with", "0.016")):  # 0.016 kimg = every step at batch 16
        train(tiny(f"train.probe_kimg={every}", "model.dropout=0.1"), tmp_path / name, log=lambda *a: None)
        runs[name] = load_checkpoint(latest_checkpoint(tmp_path / name))[1]
    for part in ("model", "ema", "optimizer"):
        assert runs["with"][part].keys() == runs["without"][part].keys()
        for key, value in runs["without"][part].items():
            assert torch.equal(runs["with"][part][key], value), (part, key)
    events = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    probes = [e for e in events if e["event"] == "probe"]
    assert probes and all(0 <= e["accuracy"] <= 1 and 0 <= e["baseline"] <= 1 for e in probes)
    assert not any(e["event"] == "probe" for e in
                   map(json.loads, (tmp_path / "without" / "metrics.jsonl").read_text().splitlines()))
