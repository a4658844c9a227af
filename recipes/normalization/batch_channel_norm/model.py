"""
# Batch-Channel Normalization (Qiao, Wang, Liu, Shen & Yuille, 2019)

The second idea of "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization".
Channel-based norms (GroupNorm, LayerNorm) work with any batch size but, §4 argues, let channels drift
towards *elimination singularities* (channels that are always zero or always active), which batch
statistics prevent. Batch-Channel Normalization (BCN) uses both (Algorithm 1):

    batch knowledge:     x̂ = a · (x - μ̂_c) / √(σ̂²_c + ε) + b          per channel c, statistics over the batch
    channel norm:        y = α · (x̂ - μ_g(x̂)) / √(σ²_g(x̂) + ε) + β     per image, over groups of channels

With large batches μ̂_c, σ̂²_c are the batch's mean and variance: BCN is BatchNorm followed by GroupNorm
(`estimate=False`). With micro-batches (one or two images per GPU) the batch's statistics are too noisy,
so BCN normalizes with *estimates* that are updated from each batch by a moving average and treated as
constants (no gradient flows through them) (`estimate=True`):

    μ̂_c ← μ̂_c + r (μ_B,c - μ̂_c),    σ̂²_c ← σ̂²_c + r (σ²_B,c - σ̂²_c)

so every image is normalized with the same μ̂, σ̂ and the result no longer depends on which other images
share its micro-batch. At evaluation the estimates are used, as BatchNorm uses its running statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from papertrain.config.constraints import PositiveFloat, PositiveInt, Probability

from papertrain.recipes.normalization.batch_norm.model import BatchNorm, batch_moments, per_channel
from papertrain.recipes.normalization.group_norm.model import GroupNorm


class EstimatedBatchNorm(nn.Module):
    """Normalize each channel with moving-average estimates μ̂, σ̂² updated from each batch (no gradient)."""

    def __init__(self, num_features: PositiveInt, eps: PositiveFloat = 1e-5, rate: Probability = 0.1, sync: bool = True):
        super().__init__()
        self.eps, self.rate, self.sync = eps, rate, sync
        self.weight = nn.Parameter(torch.empty(num_features))  # a
        self.bias = nn.Parameter(torch.empty(num_features))  # b
        self.register_buffer("estimated_mean", torch.empty(num_features))  # μ̂
        self.register_buffer("estimated_var", torch.empty(num_features))  # σ̂²
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.estimated_mean.zero_()
        self.estimated_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():  # the estimates are constants to the gradient
                mean, var, _ = batch_moments(x, self.sync)
                self.estimated_mean.lerp_(mean, self.rate)  # μ̂ ← μ̂ + r(μ_B - μ̂)
                self.estimated_var.lerp_(var, self.rate)  # σ̂² ← σ̂² + r(σ²_B - σ̂²)
        # in fp32 whatever autocast made of x (the estimates are fp32 buffers), then back to x's precision
        inverse_std = per_channel(torch.rsqrt(self.estimated_var + self.eps), x)
        x_hat = (x.float() - per_channel(self.estimated_mean, x)) * inverse_std
        return (x_hat * per_channel(self.weight, x) + per_channel(self.bias, x)).to(x.dtype)  # a x̂ + b


class BatchChannelNorm(nn.Module):
    """Batch knowledge (BatchNorm, or its moving estimates) then channel normalization (GroupNorm)."""

    def __init__(self, num_channels: PositiveInt, num_groups: PositiveInt = 8, eps: PositiveFloat = 1e-5,
                 momentum: Probability = 0.1, estimate: bool = False, sync: bool = True):
        super().__init__()
        self.estimate = estimate
        self.batch = (EstimatedBatchNorm(num_channels, eps, momentum, sync) if estimate
                      else BatchNorm(num_channels, eps, momentum, sync=sync))
        self.channel = GroupNorm(num_groups, num_channels, eps)  # α, β per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel(self.batch(x))
