"""The magnitude-preserving U-Net of EDM2 (Karras et al. 2023, "Analyzing and Improving the Training
Dynamics of Diffusion Models"), written from the paper's formulas and sized for 28x28 images.

The net is F in D = c_skip x + c_out F(c_in x, c_noise): the caller applies the EDM preconditioning,
so x is already c_in * x_t and c_noise = ln(sigma) / 4. Every layer is built so that unit-magnitude
(unit RMS) input gives unit-magnitude output at initialization, and the weights cannot grow:

- learned layers (`MPConv`, convs and linears alike): no biases; forced weight normalization (in
  training, the stored weight is overwritten by its per-output-channel normalized self) and, always,
  w = normalize(weight) * gain / sqrt(fan_in). EMA averages of normalized weights are not normalized,
  so the normalization in the forward pass is what makes them usable.
- no GroupNorm: the encoder blocks pixel-normalize their input (after the 1x1 skip conv); attention
  is cosine attention (q, k, v pixel-normalized per head); a constant channel of ones stands in for
  the input layer's bias; activations are clamped to +-256 after each block.
- the embedding c_noise -> Fourier features -> linear is summed with linear(one-hot(label) *
  sqrt(num_classes)), then SiLU; it modulates each block's residual branch by c = 1 + g * linear(emb)
  with a learned gain g that starts at 0. Label -1 (and cond=None) is the all-zero one-hot, so the
  label branch contributes nothing: EDM2's unconditional net for classifier-free guidance.
- the output conv has a learned gain `out_gain` that starts at 0, so F = 0 at initialization.

`fixed_mp` picks the fixed-function layers, the only difference between the two variants:
- True, config G: mp_silu = silu / 0.596; residuals, attention and the label joined by mp_sum
  (res_balance 0.3, attn_balance 0.3, label_balance 0.5); skips joined by mp_cat (concat_balance
  0.5); MP-Fourier features sqrt(2) cos(2 pi (f c_noise + phi)).
- False, config F: the same learned layers (configs D-F: weight normalization, forced; GroupNorm
  replaced by pixel norm) with plain SiLU, plain sums a + b, plain torch.cat and Fourier features
  without the sqrt(2); no balances.

Deviations from the paper, and why:
- Size: 3 levels at 28, 14, 7 with (24, 48, 128) channels, 1 block per level, emb_dim 128 (EDM2-S:
  4 levels, 64 to 8 pixels, 192 * [1, 2, 3, 4] channels, 3 blocks, attention at 16 and 8): 2.8M
  parameters and about the step time of the package's fmnist ADM U-Net on 2 CPU cores. The top
  level is narrow because EDM2's upsampling block runs at the finer resolution with the coarser
  level's channels, which makes full resolution the costly part. Attention at the 7x7 level (and
  in the decoder's first block there, as EDM2 does at its bottom). Fourier features: channels[0]
  of them, as EDM2.
- Heads: head_dim (64) channels each, or one head when a level has fewer channels.
- fixed_mp=False keeps the two zero-initialized learned gains (`out_gain`, `emb_gain`), which the
  paper introduces with config G: with forced weight normalization no layer can learn its own
  output scale, so without them that variant could not scale its output or its conditioning, and
  the two variants would differ by more than the fixed-function layers.
- The logvar head (EDM2's uncertainty for the loss weighting, in its preconditioning wrapper) lives
  here, since the net is what the optimizer sees; it uses MP-Fourier in both variants.
- dtype: the net computes in x's dtype (EDM2 casts to fp16 itself); parameters keep theirs; norms
  and Fourier features are computed in float32 (float64 for float64 input).
- The cosine attention is not exactly magnitude-preserving at initialization: its output is an
  attention-weighted average of unit vectors, of RMS sqrt(sum_j a_ij^2) < 1, so the block's output
  RMS drops to about 0.93 (the tests check the predicted value). EDM2 has the same property. With
  zero padding at 7x7 (a 3x3 conv keeps 82% of white noise's variance there) and no normalization
  in the decoder, decoder activations start at RMS 0.74-0.93 with the defaults; the encoder's
  pixel norm holds it within 7% of 1.
- Forced weight normalization writes the weights in place, so two training-mode forward passes
  before one backward would fail autograd's version check (as in EDM2); eval-mode passes are safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def normalize(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / RMS(x) over `dim` (default: every dimension but the first), the norm taken in float32
    (float64 for float64 x), whatever x's dtype."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    dtype = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    # EDM2 configs E, F (forced weight normalization; pixel norm): x / (eps + ||x|| sqrt(N_norm / N_x))
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit RMS on N(0, 1) input: E[silu(z)^2] = 0.596^2 for z ~ N(0, 1)."""
    # EDM2 config G, MP SiLU: silu(x) / 0.596
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum of two uncorrelated unit-RMS tensors."""
    # EDM2 config G, MP sum: ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation: b gets the share t of the energy, whatever N_a and N_b."""
    N_a, N_b = a.shape[dim], b.shape[dim]
    # EDM2 config G, MP concatenation: C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2))
    C = math.sqrt((N_a + N_b) / ((1 - t) ** 2 + t ** 2))
    # EDM2 config G: [C (1 - t) / sqrt(N_a) a, C t / sqrt(N_b) b]
    return torch.cat([C * (1 - t) / math.sqrt(N_a) * a, C * t / math.sqrt(N_b) * b], dim=dim)


def plain_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """a + b: the fixed_mp=False residual; t is ignored."""
    return a + b


def plain_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """torch.cat: the fixed_mp=False skip join; t is ignored."""
    return torch.cat([a, b], dim=dim)


@dataclass(frozen=True)
class FixedFunctions:
    """The fixed-function layers of one variant: the one place where fixed_mp makes a difference."""
    silu: Callable[[torch.Tensor], torch.Tensor]
    sum: Callable[..., torch.Tensor]
    cat: Callable[..., torch.Tensor]
    fourier_gain: float


MAGNITUDE_PRESERVING = FixedFunctions(mp_silu, mp_sum, mp_cat, math.sqrt(2))  # config G
PLAIN = FixedFunctions(F.silu, plain_sum, plain_cat, 1.0)                    # configs D-F


class MPFourier(nn.Module):
    """Fourier features of a scalar: (B,) -> (B, channels), frozen f ~ N(0, 1) and phi ~ U(0, 1)."""

    def __init__(self, channels: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.gain = gain
        self.register_buffer("freqs", torch.randn(channels))
        self.register_buffer("phases", torch.rand(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EDM2 config G, MP Fourier features: sqrt(2) cos(2 pi (f x + phi)); E[cos^2] = 1/2 over phi
        dtype = torch.promote_types(x.dtype, torch.float32)  # float16 phases would be too coarse
        y = torch.cos(2 * math.pi * (x.to(dtype)[:, None] * self.freqs.to(dtype) + self.phases.to(dtype)))
        return (self.gain * y).to(x.dtype)


class MPConv(nn.Module):
    """A bias-free conv (kernel (k, k)) or linear layer (kernel ()) with forced weight normalization:
    (B, C_in, H, W) -> (B, C_out, H, W), or (B, C_in) -> (B, C_out)."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.training:  # forced weight normalization: the stored weight stays on the unit sphere
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        fan_in = self.weight[0].numel()
        # EDM2 config D, with config G's gain g: w = g normalize(weight) / sqrt(fan_in), so ||w|| = g per row
        w = (normalize(self.weight) * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class CosineAttention(nn.Module):
    """Self-attention over pixels with q, k, v pixel-normalized per head, joined to x by a (mp_)sum:
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, heads: int, balance: float, fixed: FixedFunctions):
        super().__init__()
        self.heads, self.balance, self.fixed = heads, balance, fixed
        self.qkv = MPConv(channels, 3 * channels, (1, 1))
        self.proj = MPConv(channels, channels, (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(x).reshape(B, 3, self.heads, C // self.heads, H * W)
        qkv = normalize(qkv, dim=3)  # cosine attention: unit RMS over each head's channels
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (B, heads, HW, C/heads) each
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        y = self.proj(y.transpose(-1, -2).reshape(B, C, H, W))
        return self.fixed.sum(x, y, self.balance)


class Block(nn.Module):
    """An encoder or decoder block: resample, (1x1 skip, pixel norm), residual branch modulated by the
    embedding, optional attention, clamp. forward(x (B, c_in, H, W), emb (B, emb_dim)) -> (B, c_out, H', W')."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_dim: int,
        fixed: FixedFunctions,
        encoder: bool,                   # encoder: pixel norm of the (skip-projected) input
        resample: str = "keep",          # keep | down (2x2 box filter) | up (nearest)
        heads: int = 0,                  # attention heads; 0 for no attention
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float = 256.0,
    ):
        super().__init__()
        self.fixed, self.encoder, self.resample = fixed, encoder, resample
        self.dropout, self.res_balance, self.clip_act = dropout, res_balance, clip_act
        self.skip = MPConv(c_in, c_out, (1, 1)) if c_in != c_out else None
        self.conv_res0 = MPConv(c_out if encoder else c_in, c_out, (3, 3))
        self.emb_linear = MPConv(emb_dim, c_out)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res1 = MPConv(c_out, c_out, (3, 3))
        self.attn = CosineAttention(c_out, heads, attn_balance, fixed) if heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)  # the [1, 1] box filter, stride 2
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # the [1, 1] filter, transposed
        if self.encoder:
            x = self.skip(x) if self.skip is not None else x
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(self.fixed.silu(x))
        # EDM2 config G: c = 1 + g linear(emb), g learned from 0
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, c_out)
        y = self.fixed.silu(y * c[:, :, None, None])
        y = F.dropout(y, self.dropout, self.training)
        y = self.conv_res1(y)
        if not self.encoder and self.skip is not None:
            x = self.skip(x)
        x = self.fixed.sum(x, y, self.res_balance)
        if self.attn is not None:
            x = self.attn(x)
        return x.clamp(-self.clip_act, self.clip_act)


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) int64 labels, -1 = no label -> (B, num_classes), an all-zero row for -1."""
    return F.one_hot(labels.clamp(min=0), num_classes).to(dtype) * (labels >= 0)[:, None].to(dtype)


class MPUNet(nn.Module):
    """forward(x (B, C, H, W), c_noise (B,) float, cond (B,) int64 labels, -1 = none, or None)
    -> F (B, C, H, W) in x's dtype.

    Level l works at resolution H / 2^l with channels[l]; H and W must be divisible by
    2^(len(channels) - 1). logvar(c_noise (B,)) -> (B,) is the learned uncertainty of the loss.
    """

    def __init__(
        self,
        in_channels: int = 1,            # image channels
        channels: tuple[int, ...] = (24, 48, 128),  # per level, top (full resolution) first
        blocks: int = 1,                 # blocks per level in the encoder (decoder: blocks + 1)
        attn_levels: tuple[int, ...] = (2,),  # levels with attention in their blocks
        num_classes: int = 10,           # 0 for no class condition
        emb_dim: int = 128,              # embedding width (EDM2: the widest level's channels)
        head_dim: int = 64,              # channels per attention head
        dropout: float = 0.0,            # in each residual branch, before its second conv
        fixed_mp: bool = True,           # True: config G; False: plain SiLU, sums and concatenation
        res_balance: float = 0.3,        # mp_sum t of residual branches
        attn_balance: float = 0.3,       # mp_sum t of attention
        label_balance: float = 0.5,      # mp_sum t of the label embedding against the noise embedding
        concat_balance: float = 0.5,     # mp_cat t of encoder skips in the decoder
        clip_act: float = 256.0,         # activations clamped to +-clip_act after each block
    ):
        super().__init__()
        self.fixed = fixed = MAGNITUDE_PRESERVING if fixed_mp else PLAIN
        self.num_classes, self.label_balance, self.concat_balance = num_classes, label_balance, concat_balance
        self.emb_fourier = MPFourier(channels[0], gain=fixed.fourier_gain)
        self.emb_noise = MPConv(channels[0], emb_dim)
        self.emb_label = MPConv(num_classes, emb_dim) if num_classes else None
        self.logvar_fourier = MPFourier(128)
        self.logvar_linear = MPConv(128, 1)

        def block(c_in, c_out, level, encoder, resample="keep", attention=None):
            attention = level in attn_levels if attention is None else attention
            heads = max(1, c_out // head_dim) if attention else 0
            if heads and c_out % heads:
                raise ValueError(f"{c_out} channels do not split into {heads} heads of about {head_dim}")
            return Block(c_in, c_out, emb_dim, fixed, encoder, resample, heads, dropout,
                         res_balance, attn_balance, clip_act)

        self.conv_in = MPConv(in_channels + 1, channels[0], (3, 3))  # +1: the constant channel of ones
        self.enc = nn.ModuleList()
        c, skips = channels[0], [channels[0]]
        for level, c_out in enumerate(channels):
            if level > 0:
                self.enc.append(block(c, c, level, encoder=True, resample="down", attention=False))
                skips.append(c)
            for _ in range(blocks):
                self.enc.append(block(c, c_out, level, encoder=True))
                c = c_out
                skips.append(c)
        bottom = len(channels) - 1
        self.mid = nn.ModuleList([block(c, c, bottom, encoder=False, attention=True),
                                  block(c, c, bottom, encoder=False, attention=False)])
        self.dec = nn.ModuleList()
        for level in reversed(range(len(channels))):
            if level < bottom:
                self.dec.append(block(c, c, level, encoder=False, resample="up", attention=False))
            for _ in range(blocks + 1):
                self.dec.append(block(c + skips.pop(), channels[level], level, encoder=False))
                c = channels[level]
        self.conv_out = MPConv(c, in_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([]))

    @property
    def bottleneck(self) -> nn.Module:
        """The block whose output (B, C, H/2^(L-1), W/2^(L-1)) is the innermost representation (for probes)."""
        return self.mid[-1]

    def embed(self, c_noise: torch.Tensor, cond: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The per-sample embedding (B, emb_dim) in like's dtype that modulates every block."""
        emb = self.emb_noise(self.emb_fourier(c_noise).to(like.dtype))
        if self.emb_label is not None:
            labels = cond if cond is not None else torch.full_like(c_noise, -1, dtype=torch.long)
            # one-hot * sqrt(N): unit RMS, so the label linear's output has unit RMS too
            y = one_hot(labels, self.num_classes, like.dtype) * math.sqrt(self.num_classes)
            emb = self.fixed.sum(emb, self.emb_label(y), self.label_balance)
        return self.fixed.silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, cond, x)
        x = self.conv_in(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))  # (B, C_0, H, W)
        skips = [x]
        for block in self.enc:
            x = block(x, emb)
            skips.append(x)
        for block in self.mid:
            x = block(x, emb)
        for block in self.dec:
            if block.resample != "up":  # every decoder block but the upsampling ones takes a skip
                x = self.fixed.cat(x, skips.pop(), dim=1, t=self.concat_balance)
            x = block(x, emb)
        return self.conv_out(x, gain=self.out_gain)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The learned log-variance u(sigma) (B,) of EDM2's loss (D - x)^2 lambda / exp(u) + u."""
        return self.logvar_linear(self.logvar_fourier(c_noise)).squeeze(1)
