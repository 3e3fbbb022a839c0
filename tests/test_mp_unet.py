"""The EDM2 magnitude-preserving U-Net: each layer against its closed form or an independent
computation, unit magnitudes at initialization, forced weight normalization, the interface.

Magnitude is EDM2's: the RMS, sqrt(mean(x^2)), which is the std for zero-mean outputs but not for
SiLU's (mp_silu of N(0, 1) has RMS 1 and std 0.94). Tolerances: for unit-variance white input and
normalized weights, each MP layer's output has mean square exactly 1 in expectation, so what a test
sees is the sampling error of a mean of n squares, about sqrt(2 / n_eff) relative. The tests use
n_eff in the thousands (an error near 1%) and allow 3%, or more where a stated effect (SiLU's
non-zero mean, zero padding, attention's averaging) adds its own.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffuse.nets.mp_unet import (MAGNITUDE_PRESERVING, PLAIN, Block, CosineAttention, MPConv, MPFourier, MPUNet,
                                  mp_cat, mp_silu, mp_sum, normalize, one_hot)


def rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def unit_rows(weight: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The effective MPConv weight at gain 1: each output channel w / (eps sqrt(fan_in) + ||w||), norm ~1."""
    fan_in = weight[0].numel()
    return weight / (eps * math.sqrt(fan_in) + weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1)))


def rms_normalize(x: torch.Tensor, dim: int, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS over dim): the pixel norm, written out."""
    return x / (eps + x.square().mean(dim=dim, keepdim=True).sqrt())


def small_net(**kw) -> MPUNet:
    torch.manual_seed(0)
    return MPUNet(**{"channels": (16, 32, 32), "blocks": 1, "head_dim": 16, **kw})


def set_gains(net: torch.nn.Module, value: float) -> None:
    """Every learned gain (out_gain, each block's emb_gain) to `value`: at 0 they hide the rest of the net."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(value)


def test_normalize_is_the_per_channel_rms_division():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3) * 7
    fan_in = 27
    expected = w / (1e-4 + w.flatten(1).norm(dim=1).reshape(5, 1, 1, 1) / math.sqrt(fan_in))
    torch.testing.assert_close(normalize(w), expected)
    norms = normalize(w).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((5,), math.sqrt(fan_in)), rtol=1e-4, atol=0)
    x = torch.randn(2, 6, 4, 4) * 3  # pixel norm: unit RMS over the channels of each pixel
    torch.testing.assert_close(normalize(x, dim=1).square().mean(dim=1), torch.ones(2, 4, 4), rtol=1e-3, atol=0)
    big = torch.full((2, 1000), 1e4, dtype=torch.float16)  # ||big|| = 3.2e5 overflows float16 (max 65504)
    assert normalize(big).dtype == torch.float16 and torch.equal(normalize(big), torch.ones_like(big))


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mpconv_is_a_unit_norm_conv_and_keeps_unit_magnitude(kernel):
    torch.manual_seed(0)
    conv = MPConv(64, 48, kernel).eval()
    with torch.no_grad():
        conv.weight.mul_(0.5 + 5 * torch.rand(48, *[1] * (1 + len(kernel))))  # rows of any norm: the layer ignores it
    x = torch.randn(32, 64, 20, 20) if kernel else torch.randn(4096, 64)
    y = conv(x)
    w = unit_rows(conv.weight.detach().double())
    expected = x.double() @ w.t() if not kernel else F.conv2d(x.double(), w, padding=kernel[0] // 2)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5)
    interior = y[:, :, 1:-1, 1:-1] if kernel == (3, 3) else y  # zero padding thins the border
    assert abs(rms(interior) - 1) < 0.03
    torch.testing.assert_close(conv(x, gain=2.5), 2.5 * y)


def test_mp_silu_constant_and_magnitude():
    z = np.linspace(-12, 12, 200_001)  # E[silu(z)^2], z ~ N(0, 1), by quadrature
    silu = z / (1 + np.exp(-z))
    second_moment = np.trapezoid(silu ** 2 * np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi), z)
    assert abs(math.sqrt(second_moment) - 0.596) < 1e-3
    torch.manual_seed(0)
    assert abs(rms(mp_silu(torch.randn(1_000_000))) - 1) < 0.01  # n = 1e6: error ~ 0.1%


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.8])
def test_mp_sum_closed_form_and_magnitude(t):
    torch.manual_seed(0)
    a, b = torch.randn(2, 100_000)
    expected = ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)
    torch.testing.assert_close(mp_sum(a, b, t), expected)
    assert abs(rms(mp_sum(a, b, t)) - 1) < 0.01


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_mp_cat_magnitude_and_energy_share(t):
    torch.manual_seed(0)
    a, b = torch.randn(64, 48, 8, 8), torch.randn(64, 16, 8, 8)  # N_a != N_b
    y = mp_cat(a, b, dim=1, t=t)
    assert y.shape == (64, 64, 8, 8)
    assert abs(rms(y) - 1) < 0.01
    share = y[:, 48:].square().sum() / y.square().sum()  # b's share of the energy is t^2 / ((1-t)^2 + t^2)
    assert abs(share.item() - t ** 2 / ((1 - t) ** 2 + t ** 2)) < 0.01


def test_mp_fourier_magnitude_and_frozen():
    torch.manual_seed(0)
    fourier = MPFourier(4096)  # E[cos^2] = 1/2 over random phases: 4096 of them give an error ~ 1%
    assert not list(fourier.parameters())
    x = torch.randn(256)
    y = fourier(x)
    assert y.shape == (256, 4096)
    assert abs(rms(y) - 1) < 0.03
    expected = math.sqrt(2) * torch.cos(2 * math.pi * (torch.outer(x, fourier.freqs) + fourier.phases))
    torch.testing.assert_close(y, expected)


def test_cosine_attention_against_an_independent_computation_and_its_predicted_magnitude():
    torch.manual_seed(0)
    C, heads, t = 64, 2, 0.3
    attn = CosineAttention(C, heads, t, MAGNITUDE_PRESERVING).eval().double()  # float64: compare to 1e-10
    x = torch.randn(16, C, 7, 7, dtype=torch.float64)
    y = attn(x)
    d = C // heads
    qkv = torch.einsum("oc,bchw->bohw", unit_rows(attn.qkv.weight.detach())[:, :, 0, 0], x)
    q, k, v = (rms_normalize(u.reshape(16, heads, d, 49), dim=2) for u in qkv.chunk(3, dim=1))
    a = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(d), dim=-1)  # (B, heads, HW, HW)
    o = torch.einsum("bhqk,bhck->bhcq", a, v).reshape(16, C, 7, 7)
    o = torch.einsum("oc,bchw->bohw", unit_rows(attn.proj.weight.detach())[:, :, 0, 0], o)
    torch.testing.assert_close(y, ((1 - t) * x + t * o) / math.sqrt((1 - t) ** 2 + t ** 2), rtol=1e-10, atol=1e-10)
    # an average of independent unit vectors with weights a_ij has mean square sum_j a_ij^2 < 1
    r2 = a.square().sum(dim=-1).mean().item()
    predicted = math.sqrt(((1 - t) ** 2 + t ** 2 * r2) / ((1 - t) ** 2 + t ** 2))
    assert abs(rms(y) - predicted) < 0.03 and predicted < 0.97  # not exactly MP: see the module docstring


def reference_block(block: Block, x: torch.Tensor, emb: torch.Tensor, mp: bool) -> torch.Tensor:
    """The block written out with plain torch ops and independently normalized weights (no attention)."""
    W = lambda conv: unit_rows(conv.weight.detach())  # noqa: E731
    silu = (lambda v: F.silu(v) / 0.596) if mp else F.silu
    add = (lambda a, b: (0.7 * a + 0.3 * b) / math.sqrt(0.7 ** 2 + 0.3 ** 2)) if mp else (lambda a, b: a + b)
    if block.encoder:
        x = F.conv2d(x, W(block.skip)) if block.skip is not None else x
        x = rms_normalize(x, dim=1)
    y = F.conv2d(silu(x), W(block.conv_res0), padding=1)
    c = 1 + block.emb_gain.item() * emb @ W(block.emb_linear).t()
    y = F.conv2d(silu(y * c[:, :, None, None]), W(block.conv_res1), padding=1)
    if not block.encoder and block.skip is not None:
        x = F.conv2d(x, W(block.skip))
    x = add(x, y)
    x = block.attn(x) if block.attn is not None else x  # checked on its own above
    return x.clamp(-256, 256)


def reference_net(net: MPUNet, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor, mp: bool) -> torch.Tensor:
    """The EDM2 U-Net's wiring written out: embedding, ones channel, skips, resampling, output gain."""
    W = lambda conv: unit_rows(conv.weight.detach())  # noqa: E731
    fourier = torch.cos(2 * math.pi * (torch.outer(c_noise, net.emb_fourier.freqs) + net.emb_fourier.phases))
    noise = (math.sqrt(2) if mp else 1) * fourier.to(x.dtype) @ W(net.emb_noise).t()
    hot = torch.zeros(len(labels), 10, dtype=x.dtype)
    hot[labels >= 0, labels[labels >= 0]] = math.sqrt(10)
    label = hot @ W(net.emb_label).t()
    emb = F.silu((noise + label) / math.sqrt(2)) / 0.596 if mp else F.silu(noise + label)
    h = F.conv2d(torch.cat([x, torch.ones_like(x)], dim=1), W(net.conv_in), padding=1)
    skips = [h]
    for block in net.enc:
        h = reference_block(block, F.avg_pool2d(h, 2) if block.resample == "down" else h, emb, mp)
        skips.append(h)
    for block in [*net.mid, *net.dec]:
        if block.resample == "up":
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        elif block in net.dec:
            s = skips.pop()
            N_h, N_s = h.shape[1], s.shape[1]  # mp_cat at t = 0.5: both halves get the same energy
            h = torch.cat([h * math.sqrt((N_h + N_s) / (2 * N_h)), s * math.sqrt((N_h + N_s) / (2 * N_s))], dim=1) \
                if mp else torch.cat([h, s], dim=1)
        h = reference_block(block, h, emb, mp)
    assert not skips
    return net.out_gain.item() * F.conv2d(h, W(net.conv_out), padding=1)


@pytest.mark.parametrize("fixed", [MAGNITUDE_PRESERVING, PLAIN], ids=["mp", "plain"])
@pytest.mark.parametrize("encoder", [True, False], ids=["enc", "dec"])
def test_block_against_a_reference(fixed, encoder):
    torch.manual_seed(0)
    block = Block(24, 16, 32, fixed, encoder).eval().double()  # float64: compare to 1e-10
    set_gains(block, 0.7)
    x, emb = torch.randn(4, 24, 8, 8, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(block(x, emb), reference_block(block, x, emb, fixed is MAGNITUDE_PRESERVING),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fixed_mp", [True, False], ids=["mp", "plain"])
def test_net_against_a_reference(fixed_mp):
    net = small_net(fixed_mp=fixed_mp, channels=(8, 16, 24), blocks=2, head_dim=8).eval().double()
    set_gains(net, 0.6)
    x, c_noise = torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    labels = torch.tensor([4, -1, 9])
    torch.testing.assert_close(net(x, c_noise, labels), reference_net(net, x, c_noise, labels, fixed_mp),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("encoder", [True, False], ids=["enc", "dec"])
def test_blocks_keep_unit_magnitude(encoder):
    torch.manual_seed(0)
    block = Block(96, 64, 64, MAGNITUDE_PRESERVING, encoder).eval()  # a 1x1 skip conv: channels change
    x, emb = torch.randn(32, 96, 16, 16), torch.randn(32, 64)
    y = block(x, emb)[:, :, 2:-2, 2:-2]  # past the reach of the two 3x3 convs' zero padding
    # 5%: the residual branch's SiLU output has a non-zero mean, which the next conv turns into a
    # per-channel offset; its mean square is 1 only on average over random weights (64 channels)
    assert abs(rms(y) - 1) < 0.05


def test_forced_weight_normalization_survives_large_adam_steps():
    torch.manual_seed(0)
    conv = MPConv(16, 8, (3, 3)).train()
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.5)
    x = torch.randn(4, 16, 6, 6)
    target_norm = math.sqrt(16 * 9)
    for _ in range(5):
        loss = (conv(x) - 1).square().mean()  # the forward normalizes the stored weight first
        norms = conv.weight.detach().flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((8,), target_norm), rtol=1e-3, atol=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moved = conv.weight.detach().flatten(1).norm(dim=1)
        assert (moved / target_norm - 1).abs().max() > 0.01  # the step did leave the sphere


def test_eval_forward_of_an_unnormalized_weight_equals_normalizing_it_first():
    torch.manual_seed(0)
    a, b = MPConv(16, 8, (3, 3)), MPConv(16, 8, (3, 3))
    ema = MPConv(16, 8, (3, 3)).eval()
    with torch.no_grad():  # an EMA of two normalized weights is not normalized
        ema.weight.copy_(0.5 * (normalize(a.weight) + normalize(b.weight)))
    stored = ema.weight.detach().clone()
    assert (stored.flatten(1).norm(dim=1) / math.sqrt(144) - 1).abs().max() > 0.05
    x = torch.randn(2, 16, 6, 6)
    y = ema(x)
    assert torch.equal(ema.weight.detach(), stored)  # eval never writes the weight
    normalized = MPConv(16, 8, (3, 3)).eval()
    with torch.no_grad():
        normalized.weight.copy_(normalize(stored))
    torch.testing.assert_close(y, normalized(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, F.conv2d(x, unit_rows(stored), padding=1), rtol=1e-5, atol=1e-5)


def test_net_is_zero_at_init_and_unit_magnitude_inside():
    torch.manual_seed(0)
    net = MPUNet().eval()  # the defaults
    x, c_noise, labels = torch.randn(16, 1, 28, 28), torch.randn(16), torch.randint(0, 10, (16,))
    with torch.no_grad():
        assert torch.equal(net(x, c_noise, labels), torch.zeros_like(x))
        net.out_gain.fill_(1.0)
        magnitudes = {}
        hooks = [m.register_forward_hook(lambda m, a, out, n=n: magnitudes.__setitem__(n, rms(out)))
                 for n, m in net.named_modules() if isinstance(m, Block)]
        F_out = net(x, c_noise, labels)
        for h in hooks:
            h.remove()
    # one output channel: a single random unit-norm filter over correlated features, so only a range
    assert 0.3 < F_out.std().item() < 2.0
    assert len(magnitudes) == len(net.enc) + len(net.mid) + len(net.dec)
    # the decoder has no normalization, so losses compound there (0.74 at the lowest, seed 0): attention's
    # averaging (about -7% per attention block, see its test) and zero padding (a 3x3 conv on 7x7 white
    # noise keeps (19/7)^2 / 9 = 82% of the variance, on 14x14 91%); the encoder stays within 7% of 1
    assert all(0.7 < v < 1.2 for v in magnitudes.values()), magnitudes
    encoder = [v for n, v in magnitudes.items() if n.startswith("enc") and net.get_submodule(n).attn is None]
    assert len(encoder) == 4 and all(0.93 < v < 1.07 for v in encoder), magnitudes


def test_minus_one_is_the_all_zero_one_hot_and_none_means_minus_one():
    net = small_net().eval()
    set_gains(net, 1.0)
    c_noise = torch.tensor([0.3, -0.5, 0.3])
    assert torch.equal(one_hot(torch.tensor([2, -1]), 4, torch.float32), torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 0]]))
    emb = net.embed(c_noise, torch.tensor([-1, -1, 4]), c_noise)
    noise = net.emb_noise(net.emb_fourier(c_noise))
    zero_label = net.emb_label(torch.zeros(3, 10))  # an MPConv has no bias: all zero
    torch.testing.assert_close(emb[:2], mp_silu(mp_sum(noise, zero_label, 0.5))[:2])
    torch.testing.assert_close(emb[:2], mp_silu(noise / math.sqrt(2))[:2])
    torch.testing.assert_close(net.embed(c_noise, None, c_noise), net.embed(c_noise, torch.full((3,), -1), c_noise))
    assert (emb[2] - net.embed(c_noise, torch.tensor([-1, -1, -1]), c_noise)[2]).abs().mean() > 1e-2
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(net(x, c_noise, None), net(x, c_noise, torch.full((3,), -1)))


@pytest.mark.parametrize("fixed_mp", [True, False])
def test_gradients_reach_every_parameter(fixed_mp):
    net = small_net(fixed_mp=fixed_mp, dropout=0.1).train()
    x, c_noise, labels = torch.randn(4, 1, 28, 28), torch.randn(4), torch.tensor([0, 3, -1, 9])
    (net(x, c_noise, labels) - x).square().mean().backward()  # at init: only out_gain has a gradient
    assert all(p.grad is None or not p.grad.any() for n, p in net.named_parameters() if n != "out_gain")
    assert net.out_gain.grad.abs() > 0
    net.zero_grad()
    set_gains(net, 0.5)
    ((net(x, c_noise, labels) - x).square().mean() + net.logvar(c_noise).square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_logvar_bottleneck_and_shapes():
    net = small_net().eval()
    c_noise = torch.randn(5)
    assert net.logvar(c_noise).shape == (5,)
    captured = []
    hook = net.bottleneck.register_forward_hook(lambda m, a, out: captured.append(out))
    assert net(torch.randn(5, 1, 28, 28), c_noise, torch.arange(5)).shape == (5, 1, 28, 28)
    hook.remove()
    assert captured[0].shape == (5, 32, 7, 7)


def test_dtype_follows_the_input():
    net = small_net().eval()
    set_gains(net, 1.0)
    x, c_noise, labels = torch.randn(2, 1, 28, 28), torch.randn(2), torch.tensor([1, -1])
    y64 = net(x.double(), c_noise.double(), labels)
    assert y64.dtype == torch.float64 and net.logvar(c_noise.double()).dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in net.parameters())
    torch.testing.assert_close(y64.float(), net(x, c_noise, labels), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fixed", [MAGNITUDE_PRESERVING, PLAIN], ids=["mp", "plain"])
def test_the_clamp_clamps(fixed):
    torch.manual_seed(0)
    x, emb = 1e4 * torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    unclamped = Block(8, 8, 16, fixed, encoder=False, clip_act=math.inf).eval()
    clamped = Block(8, 8, 16, fixed, encoder=False).eval()
    clamped.load_state_dict(unclamped.state_dict())
    y = clamped(x, emb)
    assert unclamped(x, emb).abs().max() > 1000  # the test's input does reach past the clamp
    assert y.abs().max().item() == 256.0
    torch.testing.assert_close(y, unclamped(x, emb).clamp(-256, 256))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    block = Block(8, 8, 16, MAGNITUDE_PRESERVING, encoder=False, dropout=0.5)
    plain = Block(8, 8, 16, MAGNITUDE_PRESERVING, encoder=False)
    plain.load_state_dict(block.state_dict())
    set_gains(block, 0.5)
    set_gains(plain, 0.5)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    torch.testing.assert_close(block.eval()(x, emb), plain.eval()(x, emb))
    assert (block.train()(x, emb) - plain.eval()(x, emb)).abs().max() > 0.1
