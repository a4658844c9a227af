"""
# Group Normalization (Wu & He, 2018)

Batch normalization's error grows quickly as the batch shrinks: with 2 images per GPU (detection,
segmentation, video) its statistics are too noisy. "Group Normalization" computes them per image, over
*groups of channels* (§3.1, eq. 1 and 7):

    S_i = {k | k_N = i_N, ⌊k_C / (C/G)⌋ = ⌊i_C / (C/G)⌋}
    μ_i = 1/m Σ_{k∈S_i} x_k,    σ_i = √(1/m Σ_{k∈S_i} (x_k - μ_i)² + ε),    x̂_i = (x_i - μ_i)/σ_i

the set S_i being every position of every channel in i's group of C/G channels, in the same image. Then
a per-channel scale and shift, y_i = γ x̂_i + β. Nothing depends on the batch, so training and inference
agree and any batch size works.

The paper's framing (its Figure 2): LayerNorm is GroupNorm with G = 1 (all channels one group), and
InstanceNorm is GroupNorm with G = C (each channel its own group). G = 32 is its default.
"""

from __future__ import annotations

import torch
from torch import nn


class GroupNorm(nn.Module):
    """GroupNorm over [B, C, *spatial] inputs: G groups of C/G channels, per image."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} must be divisible by num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.empty(num_channels)) if affine else None  # γ
        self.bias = nn.Parameter(torch.empty(num_channels)) if affine else None  # β
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if c != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}) got {c} channels")
        grouped = x.reshape(b, self.num_groups, -1)  # [B, G, C/G · positions]: one row per S_i
        mean = grouped.mean(-1, keepdim=True)  # μ_i
        var = grouped.var(-1, keepdim=True, unbiased=False)
        x_hat = ((grouped - mean) * torch.rsqrt(var + self.eps)).view_as(x)  # (x - μ_i)/σ_i
        if self.weight is None:
            return x_hat
        channel = (1, -1) + (1,) * (x.dim() - 2)
        return x_hat * self.weight.view(channel) + self.bias.view(channel)  # γ x̂ + β, per channel

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
