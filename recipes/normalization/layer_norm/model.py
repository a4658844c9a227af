"""
# Layer Normalization (Ba, Kiros & Hinton, 2016)

Batch normalization needs a batch: its statistics come from other examples, so it behaves differently
in training and at test time, and it does not fit recurrent networks or batches of one. "Layer
Normalization" takes the statistics over the *features of one example* instead (§3):

    μ = 1/H Σᵢ aᵢ,    σ² = 1/H Σᵢ (aᵢ - μ)²,    yᵢ = gᵢ (aᵢ - μ)/√(σ² + ε) + bᵢ

where the H summed-over values are all units of the layer (for a transformer, the d_model features of
one token; for a convolution, every channel and position of one image). Each example is normalized on
its own, so training and inference compute the same function and no running statistics exist. The gain
g and bias b are per unit, learned (the paper's "adaptive gain and bias").

LayerNorm is the normalization of the transformer (Vaswani et al. 2017): every block of our GPT uses it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LayerNorm(nn.Module):
    """Normalize over the last `len(normalized_shape)` dimensions of the input (torch.nn.LayerNorm's contract)."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = nn.Parameter(torch.empty(shape)) if elementwise_affine else None  # g
        self.bias = nn.Parameter(torch.empty(shape)) if elementwise_affine else None  # b
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if tuple(a.shape[-len(self.normalized_shape):]) != self.normalized_shape:
            raise ValueError(f"LayerNorm{self.normalized_shape} got an input of shape {tuple(a.shape)}")
        dims = tuple(range(-len(self.normalized_shape), 0))  # the H units of one example
        mean = a.mean(dims, keepdim=True)  # μ
        var = a.var(dims, keepdim=True, unbiased=False)  # σ² (over H, not H - 1)
        normalized = (a - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return normalized
        return normalized * self.weight + self.bias  # g ⊙ â + b

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
