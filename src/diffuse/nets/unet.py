"""A conditional U-Net (ADM-style, Dhariwal & Nichol 2021) sized for small images.

The condition never touches the noisy input: a class label (or a real vector) is embedded and
added to the time embedding, and that sum modulates every residual block through adaptive group
normalization, h = GN(h) * (1 + scale) + shift. Label -1 (or a NaN row for vectors) selects a
learned null embedding, the "unconditional" half of classifier-free guidance.

An image condition (a low-res image, for super-resolution) goes through its own encoder
(`nets.image_encoder`) instead; its feature map at each level's resolution adds a per-pixel
scale and shift to that adaptive normalization (SPADE). The stem still sees only x_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.nets.image_encoder import ImageEncoder


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of t (B,) -> (B, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count dividing both `groups` and `channels`."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConditionEmbedding(nn.Module):
    """Class labels (B,) int64 with -1 = none, or vectors (B, D) float with a NaN row = none -> (B, emb_dim)."""

    def __init__(self, num_classes: int, cond_dim: int, emb_dim: int):
        super().__init__()
        self.num_classes, self.cond_dim = num_classes, cond_dim
        if num_classes:
            self.table = nn.Embedding(num_classes + 1, emb_dim)  # row num_classes is the null class
        if cond_dim:
            self.proj = nn.Linear(cond_dim, emb_dim)
            self.null = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, cond: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if not (self.num_classes or self.cond_dim):
            return like.new_zeros(batch, 1)  # unconditional net: broadcasts against the time embedding
        if self.num_classes:
            labels = cond if cond is not None else like.new_full((batch,), -1, dtype=torch.long)
            return self.table(torch.where(labels < 0, self.num_classes, labels))
        if cond is None:
            return self.null.expand(batch, -1)
        missing = cond.isnan().all(dim=1, keepdim=True)
        return torch.where(missing, self.null, self.proj(torch.nan_to_num(cond)))


class ResBlock(nn.Module):
    """GN-SiLU-conv, adaptive GN from the embedding, SiLU-dropout-conv (zero-initialized), plus skip.

    With feat_channels > 0 the adaptive GN also takes a per-pixel scale and shift from an image
    condition's feature map (B, feat_channels, H, W) through a zero-initialized 1x1 conv (SPADE).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int, feat_channels: int = 0):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # -> (scale, shift)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        if feat_channels:
            self.spade = nn.Conv2d(feat_channels, 2 * c_out, 1)  # -> per-pixel (scale, shift)
            nn.init.zeros_(self.spade.weight)  # starts as the plain block: the condition is learned in
            nn.init.zeros_(self.spade.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, feat: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        if feat is not None:
            pixel_scale, pixel_shift = self.spade(feat).chunk(2, dim=1)  # (B, C, H, W) each
            scale, shift = scale + pixel_scale, shift + pixel_shift
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels, residual, output projection zero-initialized."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, feat: torch.Tensor | None = None) -> torch.Tensor:
        """Unconditioned: emb and feat are accepted so a level's layers share one call signature."""
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (B, heads, HW, C/heads) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """forward(x (B, C, H, W), t (B,) float, cond (B,) labels, (B, D) vectors, (B, *cond_shape) images
    or None) -> (B, C, H, W).

    Level l works at resolution H / 2^l with channels[l]; attention at the levels in attn_levels
    and in the middle. H and W must be divisible by 2^(len(channels) - 1).
    """

    def __init__(
        self,
        in_channels: int = 1,            # image channels
        channels: tuple[int, ...] = (64, 128, 256),  # per level, top (full resolution) first
        blocks: int = 2,                 # residual blocks per level in the encoder (decoder: blocks + 1)
        attn_levels: tuple[int, ...] = (2,),  # levels with self-attention after each block
        num_classes: int = 10,           # 0 for no class condition
        cond_dim: int = 0,               # >0 for a real-vector condition of this size
        emb_dim: int = 256,              # time + condition embedding width
        head_dim: int = 64,              # channels per attention head
        dropout: float = 0.0,
        groups: int = 32,                # GroupNorm groups (fewer when a layer has fewer channels)
        cond_shape: tuple[int, int, int] | None = None,  # (C, h, w) of an image condition; None for none
    ):
        super().__init__()
        if cond_shape and (num_classes or cond_dim):
            raise ValueError("a UNet takes one kind of condition: an image, or labels / vectors")
        self.levels = len(channels)
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_emb = ConditionEmbedding(num_classes, cond_dim, emb_dim)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        feat = [channels[0] if cond_shape else 0] * self.levels  # image-encoder channels per level

        def block(c_in, c_out, level):
            layers = [ResBlock(c_in, c_out, emb_dim, dropout, groups, feat[level])]
            if level in attn_levels:
                layers.append(Attention(c_out, head_dim, groups))
            return nn.ModuleList(layers)

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [channels[0]], channels[0]
        for level, c_out in enumerate(channels):
            for _ in range(blocks):
                self.down.append(block(c, c_out, level))
                c = c_out
                skips.append(c)
            if level < self.levels - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, groups, feat[-1]),
                                  Attention(c, head_dim, groups),
                                  ResBlock(c, c, emb_dim, dropout, groups, feat[-1])])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(self.levels)):
            for _ in range(blocks + 1):
                self.up.append(block(c + skips.pop(), channels[level], level))
                c = channels[level]
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = group_norm(c, groups)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.blocks = blocks
        # built last, so the rest of the net draws the same initial weights as without it
        self.cond_encoder = ImageEncoder(cond_shape[0], channels[0], self.levels) if cond_shape else None

    @property
    def bottleneck(self) -> nn.Module:
        """The layer whose output (B, C, H/2^(L-1), W/2^(L-1)) is the innermost representation (for probes)."""
        return self.mid[-1]

    def embed(self, t: torch.Tensor, cond: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The per-sample embedding (B, emb_dim) that conditions every block."""
        t_emb = self.time_mlp(timestep_embedding(t, self.stem.out_channels).to(like.dtype))
        return F.silu(t_emb + self.cond_emb(cond, len(t), t_emb))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_encoder is not None:  # an image condition: per-level feature maps, nothing in the embedding
            emb, feats = self.embed(t, None, x), self.cond_encoder(cond, x)
        else:
            emb, feats = self.embed(t, cond, x), [None] * self.levels
        h = self.stem(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(self.levels):
            for _ in range(self.blocks):
                h = _run(next(blocks), h, emb, feats[level])
                hs.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        h = _run(self.mid, h, emb, feats[-1])
        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(self.levels))):
            for _ in range(self.blocks + 1):
                h = _run(next(blocks), torch.cat([h, hs.pop()], dim=1), emb, feats[level])
            if level > 0:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, feat: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        h = layer(h, emb, feat)
    return h
