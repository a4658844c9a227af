"""
# Weight Standardization (Qiao, Wang, Liu, Shen & Yuille, 2019)

"Micro-Batch Training with Batch-Channel Normalization and Weight Standardization" normalizes the
*weights* of a convolution instead of its activations. For the weight W ∈ ℝ^{O×I} of a layer (I = C_in ·
k_h · k_w inputs per output channel), it uses (eq. 5-7)

    Ŵ_{i,j} = (W_{i,j} - μ_{W_i,·}) / σ_{W_i,·}
    μ_{W_i,·} = 1/I Σ_j W_{i,j},    σ_{W_i,·} = √(1/I Σ_j (W_{i,j} - μ_{W_i,·})² + ε)

and convolves with Ŵ, while the gradient flows back to W through the standardization. Each output
channel's filter has zero mean and unit variance at every step. §3 argues that this smooths the loss
landscape further (it bounds the Lipschitz constants of loss and gradient more tightly than BN alone), and
that it removes the *mean shift* of the activations that batch-independent norms such as GroupNorm cannot
correct. The paper pairs it with GroupNorm for micro-batches (1-2 images per GPU), where it matches or
beats BatchNorm with large batches.

A property follows directly: the output does not change when a filter is scaled or shifted,
W_i ← a W_i + b (a > 0), because Ŵ is the same. (The authors' code computes σ with the unbiased
estimator and adds ε outside the root; we follow the paper's equations.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Ŵ: each output channel's filter (row i of W viewed as [O, I]) to zero mean, unit variance."""
    rows = weight.flatten(1)  # [O, I]
    mean = rows.mean(1, keepdim=True)  # μ_{W_i,·}
    var = rows.var(1, keepdim=True, unbiased=False)
    return ((rows - mean) * torch.rsqrt(var + eps)).view_as(weight)  # (W - μ)/σ


class WSConv2d(nn.Module):
    """A 2-d convolution whose filters are standardized on every forward pass."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.stride, self.padding, self.eps = stride, padding, eps
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))  # W
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # torch.nn.Conv2d's default
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, standardize(self.weight, self.eps), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, stride={self.stride}, padding={self.padding}, eps={self.eps}"
