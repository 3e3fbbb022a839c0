"""A residual MLP denoiser for 2-D points, conditioned like the U-Net (embedding + adaptive norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.nets.unet import ConditionEmbedding, timestep_embedding


class MLPBlock(nn.Module):
    """LayerNorm with scale and shift from the embedding, then Linear-SiLU-Linear, residual."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.emb = nn.Linear(emb_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.dropout(F.silu(self.fc1(z))))


class MLP(nn.Module):
    """forward(x (B, D), t (B,), cond (B,) labels or None) -> (B, D)."""

    def __init__(
        self,
        dim: int = 2,          # data dimension
        hidden: int = 256,     # width
        depth: int = 4,        # residual blocks
        num_classes: int = 0,  # 0 for no class condition
        cond_dim: int = 0,     # >0 for a real-vector condition
        emb_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_emb = ConditionEmbedding(num_classes, cond_dim, emb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def bottleneck(self) -> nn.Module:
        """The middle block, whose output (B, hidden) a probe reads."""
        return self.blocks[len(self.blocks) // 2]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t_emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype))
        emb = F.silu(t_emb + self.cond_emb(cond, len(x), t_emb))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h))
